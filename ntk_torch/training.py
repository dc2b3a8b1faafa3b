"""The built-in trainer of width sweeps: full-batch gradient descent on the MSE loss.

Beside the trained network it reports what two kernel pictures predict for the same run:
the network linearized at initialisation and trained the same way, and the same descent
under the infinite-width NTK. The gaps between the three are the measured effect of
feature learning (network vs linearized) and of the finite-width kernel (linearized vs
infinite width).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import nn

from ntk_torch import metrics
from ntk_torch._checks import check_choice, check_int, check_module, check_number
from ntk_torch._kernel_matrix import symmetrize
from ntk_torch.empirical import empirical_ntk
from ntk_torch.predict import gradient_descent_mse
from ntk_torch.records import Record


class GradientDescent:
    """Full-batch gradient descent ``θ ← θ − η ∇L`` on ``L = 1/(2N) Σ_a ‖f(x_a) − y_a‖²``.

    Calling it on a model trains the model in place for ``steps`` steps and returns
    long-format records ``{"predictor", "metric", "value"}`` with ``metric`` in
    ``train_loss``, ``test_loss``, ``train_accuracy``, ``test_accuracy`` (accuracy when
    targets have several columns: argmax agreement) for three predictors:

    - ``"network"``: the trained network.
    - ``"linearized"``: ``f_lin(x; θ) = f(x; θ0) + J(x)(θ − θ0)`` trained with the same
      steps and step size. Its outputs move in function space by
      ``f ← f − (η/N) Θ0 (f(X) − Y)`` with the initial full NTK ``Θ0``, so they are computed
      exactly from ``Θ0`` (:func:`linearized_descent`) instead of by ``jvp`` per step.
    - ``"kernel"``: the infinite-width NTK ``Θ∞`` of :func:`ntk_torch.analytic.kernel` (when
      the architecture is supported) under the same steps from the same initial outputs
      ``f0``: against ``"linearized"`` only the kernel changes (``Θ0`` of this network for
      its infinite-width limit). ``Θ∞`` is per output, so outputs train independently.
      (The mean over initialisations, Lee et al. 2019, starts from ``f0 = 0``: pass zeros
      to :func:`ntk_torch.gradient_descent_mse` or :func:`ntk_torch.gradient_flow_mse`.)

    Also a record ``{"metric": "lr", "value": η}``.

    Args:
        x_train: ``(N, ...)`` training inputs; ``y_train``: ``(N, O)`` targets.
        x_test, y_test: optional ``(M, ...)``, ``(M, O)`` held-out data.
        steps: gradient steps.
        lr: step size ``η``, or ``"auto"``: ``η = lr_factor · N / λ_max(Θ0)`` with ``Θ0`` the
            initial full NTK on the training set seen as an ``(N·O, N·O)`` matrix. Gradient
            descent on the linearized model is stable for ``η λ_max / N < 2``; ``"auto"``
            keeps every parameterization and width at the same point of that range (for
            the standard parameterization, whose NTK grows with width, this is the usual
            ``η ∝ 1/width``).
        lr_factor: ``η λ_max / N`` under ``lr="auto"``.
        kernel_predictor: ``"analytic"`` adds the ``"kernel"`` predictor, ``None`` skips it.
        implementation: engine for the empirical NTKs (see :func:`ntk_torch.empirical_ntk`).

    Example:
        >>> import torch, ntk_torch as nt
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 2)
        >>> net = nt.nn.MLP(3, 64, 1, 2)
        >>> records = GradientDescent(x, y, steps=20, kernel_predictor=None)(net)
        >>> losses = {r["predictor"]: r["value"] for r in records if r["metric"] == "train_loss"}
        >>> losses["network"] < 0.5 * float(((y) ** 2).sum(1).mean() / 2)
        True
    """

    def __init__(self, x_train: torch.Tensor, y_train: torch.Tensor,
                 x_test: torch.Tensor | None = None, y_test: torch.Tensor | None = None, *,
                 steps: int = 100, lr: float | Literal["auto"] = "auto",
                 lr_factor: float = 0.5, kernel_predictor: Literal["analytic"] | None = "analytic",
                 implementation: str = "auto") -> None:
        for name, value in (("x_train", x_train), ("y_train", y_train)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
        if y_train.dim() != 2 or y_train.shape[0] != x_train.shape[0]:
            raise ValueError(f"`y_train` must have shape (N, O) with N = {x_train.shape[0]} "
                             f"inputs, got {tuple(y_train.shape)}")
        if (x_test is None) != (y_test is None):
            raise ValueError("`x_test` and `y_test` must be given together")
        if y_test is not None and tuple(y_test.shape) != (x_test.shape[0], y_train.shape[1]):
            raise ValueError(f"`y_test` must have shape ({x_test.shape[0]}, {y_train.shape[1]}), "
                             f"got {tuple(y_test.shape)}")
        check_int("steps", steps, low=1)
        if lr != "auto":
            check_number("lr", lr, strict=True, alternative="'auto'")
        check_number("lr_factor", lr_factor, strict=True)
        check_choice("kernel_predictor", kernel_predictor, ("analytic", None))
        self.x_train, self.y_train, self.x_test, self.y_test = x_train, y_train, x_test, y_test
        self.steps, self.lr, self.lr_factor = steps, lr, lr_factor
        self.kernel_predictor, self.implementation = kernel_predictor, implementation

    def __call__(self, model: nn.Module) -> list[Record]:
        """Train ``model`` in place; the records described in the class docstring."""
        check_module("model", model)
        n = self.x_train.shape[0]
        x_all = self.x_train if self.x_test is None else torch.cat([self.x_train, self.x_test])
        with torch.no_grad():
            f0 = model(x_all).reshape(x_all.shape[0], -1)
        theta = empirical_ntk(model, x_all, self.x_train, mode="full",
                              implementation=self.implementation)
        lr = float(self.lr) if self.lr != "auto" else (
            self.lr_factor * n / float(metrics.spectrum(theta[:n].double(), 1)))

        parameters = [p for p in model.parameters() if p.requires_grad]
        for _ in range(self.steps):
            loss = (model(self.x_train).reshape(n, -1) - self.y_train).square().sum() / (2 * n)
            grads = torch.autograd.grad(loss, parameters)
            with torch.no_grad():
                for p, g in zip(parameters, grads):
                    p.sub_(lr * g)
        with torch.no_grad():
            trained = model(x_all).reshape(x_all.shape[0], -1)

        outputs = {"network": trained,
                   "linearized": linearized_descent(theta, f0, self.y_train, lr=lr,
                                                    steps=self.steps)}
        if self.kernel_predictor == "analytic":
            kernel = _infinite_width_descent(model, x_all, f0, self.y_train, lr=lr,
                                             steps=self.steps)
            if kernel is not None:
                outputs["kernel"] = kernel
        records: list[Record] = [{"metric": "lr", "value": lr}]
        for predictor, f in outputs.items():
            records += [{"predictor": predictor, **r} for r in self._scores(f)]
        return records

    def _scores(self, f: torch.Tensor) -> list[Record]:
        n = self.x_train.shape[0]
        splits = [("train", f[:n], self.y_train)]
        if self.y_test is not None:
            splits.append(("test", f[n:], self.y_test))
        out = []
        for split, pred, target in splits:
            pred = pred.to(target.dtype)
            loss = float((pred - target).square().sum(1).mean() / 2)
            out.append({"metric": f"{split}_loss", "value": loss})
            if target.shape[1] > 1:
                accuracy = (pred.argmax(1) == target.argmax(1)).double().mean()
                out.append({"metric": f"{split}_accuracy", "value": float(accuracy)})
        return out


def linearized_descent(theta: torch.Tensor, f0: torch.Tensor, y_train: torch.Tensor, *,
                       lr: float, steps: int) -> torch.Tensor:
    """Outputs after ``steps`` of :class:`GradientDescent` on the linearized model, from its NTK.

    Under ``L = 1/(2N) Σ ‖f(x_a) − y_a‖²`` the linearized model's outputs move exactly as
    :func:`ntk_torch.gradient_descent_mse` with step ``η/N`` and the full NTK ``Θ0``.

    Args:
        theta: full NTK ``(N + M, N, O, O)`` between all inputs (the ``N`` training inputs
            first) and the training inputs.
        f0: initial outputs ``(N + M, O)``.
        y_train: targets ``(N, O)``.
        lr: step size ``η``.
        steps: number of steps ``k``.

    Returns:
        ``(N + M, O)`` outputs after ``k`` steps.

    Example:
        One input, one output, ``Θ = 2``, ``η/N = 0.25``: the residual halves per step.

        >>> import torch
        >>> f = linearized_descent(torch.tensor([[[[2.0]]]]), torch.zeros(1, 1),
        ...                        torch.ones(1, 1), lr=0.25, steps=3)
        >>> float(f)
        0.875
    """
    n = y_train.shape[0]
    dtype = torch.float64
    theta, f0 = theta.to(dtype), f0.to(dtype)
    # Θ(X, X) came out of a rectangular block: symmetric only up to rounding.
    out = gradient_descent_mse(symmetrize(theta[:n]), y_train.to(dtype), f0[:n], steps, lr=lr / n,
                               k_test_train=theta[n:] if theta.shape[0] > n else None,
                               f0_test=f0[n:] if theta.shape[0] > n else None)
    return (out.train if out.test is None else torch.cat([out.train, out.test])).to(y_train.dtype)


def _infinite_width_descent(model: nn.Module, x_all: torch.Tensor, f0: torch.Tensor,
                            y_train: torch.Tensor, *, lr: float, steps: int) -> torch.Tensor | None:
    """Outputs ``(N + M, O)`` of the same gradient descent under the analytic NTK, or None."""
    from ntk_torch import analytic

    n = y_train.shape[0]
    try:
        ntk = analytic.kernel(model, x_all).ntk
    except (TypeError, ValueError, NotImplementedError) as error:
        warnings.warn(f"no infinite-width kernel predictor: {error}", RuntimeWarning, stacklevel=3)
        return None
    ntk, f0 = ntk.to(torch.float64), f0.to(torch.float64)
    test = x_all.shape[0] > n
    out = gradient_descent_mse(ntk[:n, :n], y_train.to(torch.float64), f0[:n], steps, lr=lr / n,
                               k_test_train=ntk[n:, :n] if test else None,
                               f0_test=f0[n:] if test else None)
    return (torch.cat([out.train, out.test]) if test else out.train).to(y_train.dtype)
