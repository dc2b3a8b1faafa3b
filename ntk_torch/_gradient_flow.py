"""Outputs of a model trained under a fixed kernel.

Gradient flow and gradient descent on the squared error, and the distribution of
infinitely wide networks after training.

Loss and time conventions as in :mod:`ntk_torch.predict`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ntk_torch._checks import check_int, check_kernel, check_like, check_number
from ntk_torch._gaussian_process import Gaussian, check_blocks
from ntk_torch._kernel_matrix import (
    Targets,
    as_matrix,
    from_matrix,
    inverse_filter,
    n_out_of,
    null_mask,
    symmetric_eigh,
    symmetrize,
)

__all__ = ["FlowPrediction", "gradient_descent_mse", "gradient_flow_mse", "ntk_gp_posterior"]


class FlowPrediction(NamedTuple):
    """Outputs after training under a fixed kernel.

    ``train`` is shaped like ``y_train``, ``test`` like the test labels (``None`` when no
    test kernel was given).
    """

    __module__ = "ntk_torch.predict"  # its public home, which pickles record

    train: torch.Tensor
    test: torch.Tensor | None


def _check_time(t: object, lr: object) -> tuple[float, float]:
    return check_number("t", t, finite=False), check_number("lr", lr, strict=True)


def _flow_filters(values: torch.Tensor, time: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``decay = exp(-τλ)`` and ``gain = (1 - exp(-τλ))/λ`` at ``τ = lr·t``.

    ``gain`` is ``τ·φ(τλ)`` with ``φ(z) = -expm1(-z)/z``, ``φ(0) = 1``: exact for tiny
    ``λ``.
    At ``τ = ∞`` null directions keep their residual (``decay = 1``) and contribute nothing
    to test points (``gain = 0``), the pseudo-inverse.
    """
    if math.isinf(time):
        null = null_mask(values)
        decay = null.to(values.dtype)
        return decay, inverse_filter(values, 0.0)
    z = time * values
    decay = torch.exp(-z)
    safe = torch.where(z > 0, z, torch.ones_like(z))  # keeps 0/0 out of the unused branch
    phi = torch.where(z > 0, -torch.expm1(-z) / safe, torch.ones_like(z))
    return decay, time * phi


def gradient_flow_mse(k_train: torch.Tensor, y_train: torch.Tensor, f0_train: torch.Tensor,
                      t: float, *, lr: float = 1.0, k_test_train: torch.Tensor | None = None,
                      f0_test: torch.Tensor | None = None) -> FlowPrediction:
    """Outputs at time ``t`` of gradient flow on ``½ Σ ‖f - y‖²`` under a fixed kernel.

    With ``Θ`` the training NTK and ``τ = lr·t`` (see the module docstring for the loss and
    time conventions),

        f_t(X)  = y + exp(-τΘ) (f0(X) - y),
        f_t(X*) = f0(X*) + Θ(X*, X) Θ⁻¹ (I - exp(-τΘ)) (y - f0(X)),

    exactly what a linearized network (:func:`ntk_torch.linearize`) trained by gradient
    flow follows, and what a wide network follows approximately. At ``t = inf``:
    ``f(X) = y`` on the range of ``Θ`` and ``f(X*) = f0(X*) + Θ(X*, X) Θ⁺ (y - f0(X))``,
    which is :func:`ntk_torch.kernel_regression` of the residual.

    Args:
        k_train: NTK ``(N, N)`` or ``(N, N, O, O)`` of the training inputs.
        y_train: targets ``(N,)``/``(N, C)`` (trace) or ``(N, O)`` (full).
        f0_train: outputs at ``t = 0``, shaped like ``y_train``.
        t: time ``≥ 0``; ``float('inf')`` gives the converged outputs.
        lr: learning rate ``η > 0`` of the flow.
        k_test_train: NTK ``(M, N)`` or ``(M, N, O, O)`` between test and training inputs.
        f0_test: test outputs at ``t = 0``, shaped like the predictions; zeros if omitted
            (the infinite-width mean).

    Returns:
        :class:`FlowPrediction` ``(train, test)``: ``train`` shaped like ``y_train``,
        ``test`` ``(M,)``/``(M, C)``/``(M, O)`` or ``None`` without ``k_test_train``.

    Example:
        One training point with ``Θ = 2``: the residual decays as ``exp(-2t)``.

        >>> import torch, ntk_torch as nt
        >>> k = torch.tensor([[2.0]], dtype=torch.float64)
        >>> out = nt.gradient_flow_mse(k, torch.tensor([1.0]), torch.tensor([0.0]), t=0.5,
        ...                            k_test_train=torch.tensor([[1.0]], dtype=torch.float64))
        >>> torch.allclose(out.train, 1 - torch.exp(torch.tensor(-1.0, dtype=torch.float64)))
        True
        >>> torch.allclose(out.test, out.train / 2)
        True
    """
    time, lr = _check_time(t, lr)
    return _evolve(k_train, y_train, f0_train, lambda values: _flow_filters(values, lr * time),
                   k_test_train, f0_test)


def gradient_descent_mse(k_train: torch.Tensor, y_train: torch.Tensor, f0_train: torch.Tensor,
                         steps: int, *, lr: float, k_test_train: torch.Tensor | None = None,
                         f0_test: torch.Tensor | None = None) -> FlowPrediction:
    """Outputs after ``steps`` of gradient descent on ``½ Σ ‖f - y‖²`` under a fixed kernel.

    The discrete counterpart of :func:`gradient_flow_mse`: a model linear in its
    parameters with NTK ``Θ`` (a linearized network) trained with step size ``η`` moves
    exactly as ``f_{k+1}(X) = f_k(X) − η Θ (f_k(X) − y)``, so

        f_k(X)  = y + (I − ηΘ)^k (f0(X) − y),
        f_k(X*) = f0(X*) + Θ(X*, X) Θ⁻¹ (I − (I − ηΘ)^k) (y − f0(X))

    (``Θ⁻¹(I − (I − ηΘ)^k)`` read as ``kη`` on the null space). It tends to the flow at
    ``t = k`` as ``η → 0``; it diverges when ``η λ_max(Θ) > 2``. For a mean loss
    ``1/(2N) Σ ‖f − y‖²`` pass ``lr = η / N``. Shapes as in :func:`gradient_flow_mse`.

    Example:
        One training point with ``Θ = 2`` and ``η = 0.25``: the residual halves per step.

        >>> import torch, ntk_torch as nt
        >>> k = torch.tensor([[2.0]], dtype=torch.float64)
        >>> out = nt.gradient_descent_mse(k, torch.tensor([1.0]), torch.tensor([0.0]), 3, lr=0.25)
        >>> float(out.train)
        0.875
    """
    steps = check_int("steps", steps, low=0)
    lr = check_number("lr", lr, strict=True)

    def filters(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decay = (1 - lr * values) ** steps
        # Σ_{m<k} η (1 − ηλ)^m = (1 − (1 − ηλ)^k)/λ, and kη where ηλ is negligible.
        small = (lr * values).abs() < 1e-12
        safe = torch.where(small, torch.ones_like(values), values)
        return decay, torch.where(small, torch.full_like(values, steps * lr), (1 - decay) / safe)

    return _evolve(k_train, y_train, f0_train, filters, k_test_train, f0_test)


def _evolve(k_train, y_train, f0_train, filters, k_test_train, f0_test) -> FlowPrediction:
    """Training and test outputs for ``(decay, gain) = filters(eigenvalues)``.

    Training outputs ``y + V diag(decay) Vᵀ (f0 − y)``, test outputs
    ``f0* + Θ*ᵀ V diag(gain) Vᵀ (y − f0)``.
    """
    k_train = check_kernel("k_train", k_train)
    n, n_out = k_train.shape[0], n_out_of(k_train)
    layout, y = Targets.read("y_train", y_train, n, n_out, k_train)
    _, f0 = Targets.read("f0_train", f0_train, n, n_out, k_train)
    if tuple(f0_train.shape) != tuple(y_train.shape):
        raise ValueError(f"`f0_train` must have `y_train`'s shape {tuple(y_train.shape)}, "
                         f"got {tuple(f0_train.shape)}")
    values, vectors = symmetric_eigh("k_train", as_matrix(k_train), psd=True)
    decay, gain = filters(values)
    residual = vectors.T @ (y - f0)  # (n, C) in the eigenbasis
    train = y - vectors @ (decay[:, None] * residual)
    test = None
    if k_test_train is not None:
        k_test_train = check_kernel("k_test_train", k_test_train, cols=n, n_out=n_out)
        check_like("k_test_train", k_test_train, "k_train", k_train)
        m = k_test_train.shape[0]
        moved = as_matrix(k_test_train) @ (vectors @ (gain[:, None] * residual))
        if f0_test is None:
            start = torch.zeros_like(moved)
        else:
            expected = layout.write(moved, m).shape
            if not isinstance(f0_test, torch.Tensor) or tuple(f0_test.shape) != tuple(expected):
                got = (tuple(f0_test.shape) if isinstance(f0_test, torch.Tensor)
                       else type(f0_test).__name__)
                raise ValueError(f"`f0_test` must have shape {tuple(expected)} (the test "
                                 f"predictions), got {got}")
            _, start = Targets.read("f0_test", f0_test, m, n_out, k_train)
        test = layout.write(start + moved, m)
    elif f0_test is not None:
        raise ValueError("`f0_test` was given without `k_test_train`; pass the test-train "
                         "kernel too")
    return FlowPrediction(layout.write(train, n), test)


def ntk_gp_posterior(nngp_train: torch.Tensor, nngp_test_train: torch.Tensor,
                     nngp_test: torch.Tensor, ntk_train: torch.Tensor,
                     ntk_test_train: torch.Tensor, y_train: torch.Tensor,
                     t: float = math.inf, *, lr: float = 1.0) -> Gaussian:
    """Distribution of test outputs of infinitely wide networks after gradient flow for time ``t``.

    At infinite width (Lee et al. 2019, "Wide neural networks of any depth evolve as linear
    models under gradient descent", eqs. 15–16) the initial outputs are a Gaussian process
    with the NNGP kernel ``K`` and training follows the fixed NTK ``Θ``. With
    ``A = Θ(X*, X) Θ⁻¹ (I - exp(-τΘ))``, ``τ = lr·t`` (loss ``½ Σ ‖f - y‖²``):

        f_t(X*) = f0(X*) + A (y - f0(X)),
        mean    = A y,
        cov     = K(X*, X*) - A K(X, X*) - K(X*, X) Aᵀ + A K(X, X) Aᵀ.

    ``t = 0`` is the prior ``N(0, K(X*, X*))``; ``t = inf`` takes ``A = Θ(X*, X) Θ⁺``, an
    ensemble of trained networks, which is *not* the NNGP posterior
    (:func:`ntk_torch.gp_posterior`) unless ``Θ ∝ K``.

    Args:
        nngp_train: NNGP of the training inputs, ``(N, N)`` or full ``(N, N, O, O)``.
        nngp_test_train: NNGP ``(M, N)`` between test and training inputs, same layout.
        nngp_test: NNGP ``(M, M)`` of the test inputs, same layout.
        ntk_train: NTK ``(N, N)`` of the training inputs, same layout.
        ntk_test_train: NTK ``(M, N)`` between test and training inputs, same layout.
        y_train: ``(N,)``/``(N, C)`` (trace) or ``(N, O)`` (full).
        t: training time ``≥ 0`` (``float('inf')`` allowed).
        lr: learning rate ``η > 0``.

    Returns:
        :class:`Gaussian` ``(mean, covariance)`` over the test points: mean like the test
        labels, covariance ``(M, M)`` or ``(M, M, O, O)``.

    Example:
        When ``Θ = K`` the converged ensemble is the noise-free GP posterior:

        >>> import torch, ntk_torch as nt
        >>> k = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> y = torch.tensor([1.0])
        >>> a = nt.ntk_gp_posterior(k[:1, :1], k[1:, :1], k[1:, 1:], k[:1, :1], k[1:, :1], y)
        >>> b = nt.gp_posterior(k[:1, :1], k[1:, :1], k[1:, 1:], y)
        >>> torch.allclose(a.mean, b.mean) and torch.allclose(a.covariance, b.covariance)
        True
    """
    time, lr = _check_time(t, lr)
    nngp_train, nngp_test_train, nngp_test = check_blocks(nngp_train, nngp_test_train, nngp_test,
                                                           prefix="nngp")
    n, m, n_out = nngp_train.shape[0], nngp_test.shape[0], n_out_of(nngp_train)
    ntk_train = check_kernel("ntk_train", ntk_train, rows=n, cols=n, n_out=n_out)
    ntk_test_train = check_kernel("ntk_test_train", ntk_test_train, rows=m, cols=n, n_out=n_out)
    for name, block in (("ntk_train", ntk_train), ("ntk_test_train", ntk_test_train)):
        check_like(name, block, "nngp_train", nngp_train)
    layout, y = Targets.read("y_train", y_train, n, n_out, nngp_train)
    values, vectors = symmetric_eigh("ntk_train", as_matrix(ntk_train), psd=True)
    # The NNGP training block is a covariance: PSD like the NTK's.
    symmetric_eigh("nngp_train", as_matrix(nngp_train), psd=True)
    _, gain = _flow_filters(values, lr * time)
    a = (as_matrix(ntk_test_train) @ vectors) * gain @ vectors.T  # (m', n')
    k_cross = as_matrix(nngp_test_train)
    a_k = a @ k_cross.T  # A K(X, X*)
    cov = as_matrix(nngp_test) - a_k - a_k.T + a @ as_matrix(nngp_train) @ a.T
    return Gaussian(layout.write(a @ y, m), from_matrix(symmetrize(cov), m, m, n_out))
