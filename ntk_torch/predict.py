"""What a fixed kernel predicts: gradient flow, kernel regression, Gaussian-process posteriors.

Layouts as in :mod:`ntk_torch.kernels`: trace kernels ``(N1, N2)`` shared by all outputs
and full kernels ``(N1, N2, O, O)`` read as ``(N1·O, N2·O)`` matrices; labels ``(N,)`` or
``(N, C)`` (trace) and ``(N, O)`` (full). ``N`` counts training inputs, ``M`` test inputs.

Loss convention. Gradient flow here is on the summed squared error

    L(θ) = ½ Σ_a ‖f(x_a; θ) - y_a‖²,      dθ/dt = -η ∇L,

so for a model linear in ``θ`` with NTK ``Θ = J Jᵀ`` the training outputs obey
``df/dt = -η Θ (f - y)``. One step of gradient descent with step size ``η`` on this loss
advances ``t`` by one; the time of ``k`` steps is ``t = k`` at ``lr = η``, or equivalently
``t = k·η`` at ``lr = 1``. With a mean loss ``½ Σ ‖f - y‖² / (N·O)`` divide ``lr`` by
``N·O``.

Every solve goes through the eigendecomposition of the (symmetric, PSD-checked) training
kernel. Where the kernel is singular the infinite-time limits use the pseudo-inverse: the
minimum-norm interpolant that gradient flow from ``f0`` reaches.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ntk_torch import _krylov, _operators
from ntk_torch.kernels import (
    _Targets,
    _check_kernel,
    _check_like,
    _check_nonnegative,
    _check_symmetric,
    _flatten,
    _n_out_of,
    _null_mask,
    _symmetric_eigh,
    _unflatten,
)


class Gaussian(NamedTuple):
    """A Gaussian over ``M`` test points: ``mean`` shaped like the labels (``(M,)``,
    ``(M, C)`` or ``(M, O)``), ``covariance`` ``(M, M)`` for a trace kernel (shared by every
    output column) or ``(M, M, O, O)`` for a full one."""

    mean: torch.Tensor
    covariance: torch.Tensor

    @property
    def variance(self) -> torch.Tensor:
        """Marginal variances: ``(M,)`` for a trace kernel, ``(M, O)`` for a full one."""
        c = self.covariance
        if c.dim() == 2:
            return c.diagonal()
        # (M, M, O, O) -> (O, O, M) -> (M, O)
        return c.diagonal(dim1=0, dim2=1).diagonal(dim1=0, dim2=1)


class FlowPrediction(NamedTuple):
    """Outputs after gradient flow: ``train`` shaped like ``y_train``, ``test`` like the
    test labels (``None`` when no test kernel was given)."""

    train: torch.Tensor
    test: torch.Tensor | None


def _check_time(t: object, lr: object) -> tuple[float, float]:
    return (_check_nonnegative("t", t, allow_inf=True), _check_nonnegative("lr", lr, positive=True))


def _flow_filters(values: torch.Tensor, time: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``decay = exp(-τλ)`` and ``gain = (1 - exp(-τλ))/λ`` at ``τ = lr·t``.

    ``gain`` is ``τ·φ(τλ)`` with ``φ(z) = -expm1(-z)/z``, ``φ(0) = 1``: exact for tiny
    ``λ``.
    At ``τ = ∞`` null directions keep their residual (``decay = 1``) and contribute nothing
    to test points (``gain = 0``), the pseudo-inverse.
    """
    if math.isinf(time):
        null = _null_mask(values)
        decay = null.to(values.dtype)
        return decay, _inverse_filter(values, 0.0)
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
    which is :func:`kernel_regression` of the residual.

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
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"`steps` must be an int >= 0, got {steps!r}")
    lr = _check_nonnegative("lr", lr, positive=True)

    def filters(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decay = (1 - lr * values) ** steps
        # Σ_{m<k} η (1 − ηλ)^m = (1 − (1 − ηλ)^k)/λ, and kη where ηλ is negligible.
        small = (lr * values).abs() < 1e-12
        safe = torch.where(small, torch.ones_like(values), values)
        return decay, torch.where(small, torch.full_like(values, steps * lr), (1 - decay) / safe)

    return _evolve(k_train, y_train, f0_train, filters, k_test_train, f0_test)


def _evolve(k_train, y_train, f0_train, filters, k_test_train, f0_test) -> FlowPrediction:
    """Training outputs ``y + V diag(decay) Vᵀ (f0 − y)`` and test outputs
    ``f0* + Θ*ᵀ V diag(gain) Vᵀ (y − f0)`` for ``(decay, gain) = filters(eigenvalues)``."""
    k_train = _check_kernel(k_train, "k_train")
    n, n_out = k_train.shape[0], _n_out_of(k_train)
    layout, y = _Targets.read(y_train, "y_train", n, n_out, k_train)
    _, f0 = _Targets.read(f0_train, "f0_train", n, n_out, k_train)
    if tuple(f0_train.shape) != tuple(y_train.shape):
        raise ValueError(f"`f0_train` must have `y_train`'s shape {tuple(y_train.shape)}, "
                         f"got {tuple(f0_train.shape)}")
    values, vectors = _symmetric_eigh(_flatten(k_train), "k_train", psd=True)
    decay, gain = filters(values)
    residual = vectors.T @ (y - f0)  # (n, C) in the eigenbasis
    train = y - vectors @ (decay[:, None] * residual)
    test = None
    if k_test_train is not None:
        k_test_train = _check_kernel(k_test_train, "k_test_train", cols=n, n_out=n_out)
        _check_like("k_test_train", k_test_train, k_train, "k_train")
        m = k_test_train.shape[0]
        moved = _flatten(k_test_train) @ (vectors @ (gain[:, None] * residual))
        if f0_test is None:
            start = torch.zeros_like(moved)
        else:
            expected = layout.write(moved, m).shape
            if not isinstance(f0_test, torch.Tensor) or tuple(f0_test.shape) != tuple(expected):
                got = (tuple(f0_test.shape) if isinstance(f0_test, torch.Tensor)
                       else type(f0_test).__name__)
                raise ValueError(f"`f0_test` must have shape {tuple(expected)} (the test "
                                 f"predictions), got {got}")
            _, start = _Targets.read(f0_test, "f0_test", m, n_out, k_train)
        test = layout.write(start + moved, m)
    elif f0_test is not None:
        raise ValueError("`f0_test` was given without `k_test_train`; pass the test-train "
                         "kernel too")
    return FlowPrediction(layout.write(train, n), test)


def solve(kernel, y: torch.Tensor, *, ridge: float, tol: float = 1e-6, max_iter: int | None = None,
          callback=None) -> torch.Tensor:
    """``(K + ridge·I)⁻¹ y`` for a kernel in memory or in a :class:`ntk_torch.KernelStore`.

    A tensor is solved densely through its eigendecomposition (with ``ridge = 0``, the
    pseudo-inverse: the minimum-norm solution). A store is never loaded: conjugate gradients
    on all columns of ``y`` at once, one streamed pass over the store per iteration,
    preconditioned by a rank-100 randomized Nyström approximation of ``K`` built from one
    more pass (Frangella, Tropp & Udell, SIAM J. Matrix Anal. Appl. 2023). Its iteration
    count depends on ``λ_100 / ridge`` and barely on ``N``; products accumulate in float64.

    Args:
        kernel: symmetric PSD kernel of one set of inputs with itself: a tensor ``(N, N)``
            or ``(N, N, O, O)``, or a store computed with ``x2=None`` (any mode; a
            diagonal-mode store solves each output's kernel apart).
        y: right-hand sides ``(N,)``/``(N, C)`` for a trace kernel, ``(N, O)`` otherwise.
        ridge: ``≥ 0``, added to the diagonal. For a store keep it above rounding
            (``K`` must be positive definite on the data when 0).
        tol: for a store, the relative residual ``‖y - (K + ridge·I) x‖ / ‖y‖`` each
            column reaches; a ``RuntimeWarning`` says so if ``max_iter`` comes first.
        max_iter: for a store, the most iterations (passes); default
            ``max(100, min(2·N·O, 1000))``.
        callback: for a store, ``callback(iteration, residuals)`` after each iteration
            with the relative residuals ``(C,)``.

    Returns:
        ``x`` shaped like ``y``, in ``y``'s floating dtype (the kernel's for integer ``y``).

    Example:
        >>> import torch, ntk_torch as nt
        >>> nt.solve(torch.tensor([[2.0, 1.0], [1.0, 2.0]]), torch.tensor([3.0, 3.0]), ridge=1.0)
        tensor([0.7500, 0.7500])
    """
    ridge = _check_nonnegative("ridge", ridge)
    if _operators.is_store(kernel):
        op = _operators.StoreOperator(kernel, "kernel")
        layout, rhs = _Targets.read(y, "y", op.n_samples, op.n_out, _like(kernel, float64=True))
        x = _store_solve(op, rhs, ridge, tol, max_iter, callback)
        return layout.write(x, op.n_samples).to(_result_dtype(y, kernel.dtype))
    kernel = _check_kernel(kernel, "kernel")
    n, n_out = kernel.shape[0], _n_out_of(kernel)
    if kernel.shape[1] != n:
        raise ValueError(f"`kernel` must be square in its samples, got shape {tuple(kernel.shape)}")
    layout, rhs = _Targets.read(y, "y", n, n_out, kernel)
    values, vectors = _symmetric_eigh(_flatten(kernel), "kernel", psd=True)
    x = vectors @ (_inverse_filter(values, ridge)[:, None] * (vectors.T @ rhs))
    return layout.write(x, n).to(_result_dtype(y, kernel.dtype))


def _store_solve(op, rhs: torch.Tensor, ridge: float, tol: float, max_iter: int | None,
                 callback) -> torch.Tensor:
    x, _ = _krylov.solve_pcg(op, rhs.double(), ridge=ridge, tol=tol, max_iter=max_iter,
                             callback=callback)
    return x


def _like(store, float64: bool = False) -> torch.Tensor:
    """An empty tensor standing for a store's dtype and device in the layout checks."""
    return torch.empty(0, dtype=torch.float64 if float64 else store.dtype)


def _result_dtype(y: object, fallback: torch.dtype) -> torch.dtype:
    return y.dtype if isinstance(y, torch.Tensor) and y.is_floating_point() else fallback


def kernel_regression(k_train, k_test_train, y_train: torch.Tensor, *, ridge: float = 0.0,
                      tol: float = 1e-6) -> torch.Tensor:
    """Kernel (ridge) regression ``K(X*, X) (K(X, X) + ridge·I)⁻¹ y``.

    With ``ridge = 0`` the inverse is the pseudo-inverse, so this is where gradient flow
    from ``f0 = 0`` ends (:func:`gradient_flow_mse` at ``t = inf``); with ``ridge = σ²`` it
    is the posterior mean of :func:`gp_posterior` with ``noise = σ²``.

    Kernels on disk work too: ``k_train`` a :class:`ntk_torch.KernelStore` of the training
    inputs (solved by :func:`solve`, which needs ``ridge > 0`` in practice) and
    ``k_test_train`` a store computed with ``x1 = X*, x2 = X`` (streamed) or a tensor.

    Args:
        k_train: ``(N, N)`` or ``(N, N, O, O)``, symmetric PSD; or a store.
        k_test_train: ``(M, N)`` or ``(M, N, O, O)``, same layout; or a store.
        y_train: ``(N,)``/``(N, C)`` (trace) or ``(N, O)`` (full).
        ridge: ``≥ 0``, added to the diagonal of ``k_train``.
        tol: relative residual of the solve when ``k_train`` is a store.

    Returns:
        Predictions ``(M,)``, ``(M, C)`` or ``(M, O)``, shaped like ``y_train``.

    Example:
        A linear kernel ``x·x'`` fits the line through the origin (its training block is
        singular, rank one; the pseudo-inverse handles it):

        >>> import torch, ntk_torch as nt
        >>> x, xs = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0]])
        >>> pred = nt.kernel_regression(x @ x.T, xs @ x.T, torch.tensor([2.0, 4.0]))
        >>> torch.allclose(pred, torch.tensor([6.0]))
        True
    """
    ridge = _check_nonnegative("ridge", ridge)
    if _operators.is_store(k_train):
        op = _operators.StoreOperator(k_train, "k_train")
        layout, y = _Targets.read(y_train, "y_train", op.n_samples, op.n_out, _like(k_train, True))
        weights = _store_solve(op, y, ridge, tol, None, None)
        if _operators.is_store(k_test_train):
            _operators.check_store_like(k_test_train, "k_test_train", op.n_out, k_train.mode)
            pred = _operators.store_product(k_test_train, weights, "k_test_train", op.n_samples)
            m = k_test_train.shape[0]
        else:
            k_test_train = _check_kernel(k_test_train, "k_test_train", cols=op.n_samples,
                                         n_out=op.n_out)
            pred = _flatten(k_test_train).double() @ weights
            m = k_test_train.shape[0]
        return layout.write(pred, m).to(_result_dtype(y_train, k_train.dtype))
    k_train = _check_kernel(k_train, "k_train")
    n, n_out = k_train.shape[0], _n_out_of(k_train)
    k_test_train = _check_kernel(k_test_train, "k_test_train", cols=n, n_out=n_out)
    _check_like("k_test_train", k_test_train, k_train, "k_train")
    layout, y = _Targets.read(y_train, "y_train", n, n_out, k_train)
    values, vectors = _symmetric_eigh(_flatten(k_train), "k_train", psd=True)
    inverse = _inverse_filter(values, ridge)
    weights = vectors @ (inverse[:, None] * (vectors.T @ y))
    return layout.write(_flatten(k_test_train) @ weights, k_test_train.shape[0])


def _inverse_filter(values: torch.Tensor, shift: float) -> torch.Tensor:
    """``1/(λ + shift)``; with ``shift = 0`` the pseudo-inverse's ``1/λ`` off the null space."""
    if shift > 0:
        return 1 / (values + shift)
    null = _null_mask(values)
    safe = torch.where(null, torch.ones_like(values), values)
    return torch.where(null, torch.zeros_like(values), 1 / safe)


def gp_posterior(k_train, k_test_train, k_test, y_train: torch.Tensor, *,
                 noise: float = 0.0, tol: float = 1e-6) -> Gaussian:
    """Posterior of a zero-mean Gaussian process with kernel ``K`` given noisy labels.

        mean = K(X*, X) (K + noise·I)⁻¹ y
        cov  = K(X*, X*) - K(X*, X) (K + noise·I)⁻¹ K(X, X*)

    (pseudo-inverse when ``noise = 0``: conditioning a degenerate Gaussian on labels in its
    support). Note the NTK used this way is *not* what trained networks compute; for that
    see :func:`ntk_gp_posterior`.

    ``k_train`` may be a :class:`ntk_torch.KernelStore` (trace or full mode) of the training
    inputs: the solves then run by :func:`solve` on the store, one right-hand side per test
    output for the covariance, and the test blocks (tensors or stores, loaded) must fit in
    memory.

    Args:
        k_train: ``(N, N)`` or ``(N, N, O, O)``, symmetric PSD; or a store.
        k_test_train: ``(M, N)`` or ``(M, N, O, O)``.
        k_test: ``(M, M)`` or ``(M, M, O, O)``, symmetric.
        y_train: ``(N,)``/``(N, C)`` (trace) or ``(N, O)`` (full).
        noise: label-noise variance ``≥ 0`` added to the diagonal of ``k_train``.
        tol: relative residual of the solves when ``k_train`` is a store.

    Returns:
        :class:`Gaussian` ``(mean, covariance)``: mean shaped like the test labels,
        covariance ``(M, M)`` or ``(M, M, O, O)``; ``.variance`` gives its diagonal.

    Example:
        Two perfectly correlated points: observing one pins the other.

        >>> import torch, ntk_torch as nt
        >>> k = torch.ones(2, 2, dtype=torch.float64)
        >>> post = nt.gp_posterior(k[:1, :1], k[1:, :1], k[1:, 1:], torch.tensor([3.0]))
        >>> post.mean, post.variance
        (tensor([3.], dtype=torch.float64), tensor([0.], dtype=torch.float64))
    """
    noise = _check_nonnegative("noise", noise)
    if _operators.is_store(k_train):
        return _store_gp_posterior(k_train, k_test_train, k_test, y_train, noise, tol)
    k_train, k_test_train, k_test = _check_blocks(k_train, k_test_train, k_test, prefix="k")
    n, m, n_out = k_train.shape[0], k_test.shape[0], _n_out_of(k_train)
    layout, y = _Targets.read(y_train, "y_train", n, n_out, k_train)
    values, vectors = _symmetric_eigh(_flatten(k_train), "k_train", psd=True)
    inverse = _inverse_filter(values, noise)
    cross = _flatten(k_test_train) @ vectors  # (m', n') in the eigenbasis
    mean = cross @ (inverse[:, None] * (vectors.T @ y))
    root = cross * inverse.sqrt()
    cov = _symmetrize(_flatten(k_test) - root @ root.T)
    return Gaussian(layout.write(mean, m), _unflatten(cov, m, m, n_out))


def _store_gp_posterior(store, k_test_train, k_test, y_train, noise: float, tol: float) -> Gaussian:
    if store.mode == "diagonal":
        raise ValueError("`k_train` is a diagonal-mode store; the posterior needs the trace or "
                         "the full kernel (mode='trace' or mode='full')")
    op = _operators.StoreOperator(store, "k_train")
    n, n_out = op.n_samples, op.n_out
    k_test_train, k_test = (b.load() if _operators.is_store(b) else b for b in (k_test_train, k_test))
    k_test_train = _check_kernel(k_test_train, "k_test_train", cols=n, n_out=n_out)
    m = k_test_train.shape[0]
    k_test = _check_kernel(k_test, "k_test", rows=m, cols=m, n_out=n_out)
    _check_like("k_test", k_test, k_test_train, "k_test_train")
    _check_symmetric(_flatten(k_test), "k_test")
    layout, y = _Targets.read(y_train, "y_train", n, n_out, _like(store, True))
    cross = _flatten(k_test_train).double()  # (M·O, N·O)
    solved = _store_solve(op, torch.cat([y, cross.T], dim=1), noise, tol, None, None)
    mean = cross @ solved[:, : y.shape[1]]
    cov = _symmetrize(_flatten(k_test).double() - cross @ solved[:, y.shape[1]:])
    dtype = _result_dtype(y_train, store.dtype)
    return Gaussian(layout.write(mean, m).to(dtype), _unflatten(cov, m, m, n_out).to(store.dtype))


def _check_blocks(train: torch.Tensor, test_train: torch.Tensor, test: torch.Tensor, *,
                  prefix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = (f"{prefix}_train", f"{prefix}_test_train", f"{prefix}_test")
    train = _check_kernel(train, names[0])
    n, n_out = train.shape[0], _n_out_of(train)
    test_train = _check_kernel(test_train, names[1], cols=n, n_out=n_out)
    m = test_train.shape[0]
    test = _check_kernel(test, names[2], rows=m, cols=m, n_out=n_out)
    for name, block in zip(names[1:], (test_train, test)):
        _check_like(name, block, train, names[0])
    _check_symmetric(_flatten(test), names[2])
    return train, test_train, test


def _symmetrize(m: torch.Tensor) -> torch.Tensor:
    return (m + m.T) / 2


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
    (:func:`gp_posterior`) unless ``Θ ∝ K``.

    Args:
        nngp_train, nngp_test_train, nngp_test: NNGP blocks ``(N, N)``, ``(M, N)``,
            ``(M, M)``, or all full ``(·, ·, O, O)``.
        ntk_train, ntk_test_train: NTK blocks ``(N, N)``, ``(M, N)`` in the same layout.
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
    nngp_train, nngp_test_train, nngp_test = _check_blocks(nngp_train, nngp_test_train, nngp_test,
                                                           prefix="nngp")
    n, m, n_out = nngp_train.shape[0], nngp_test.shape[0], _n_out_of(nngp_train)
    ntk_train = _check_kernel(ntk_train, "ntk_train", rows=n, cols=n, n_out=n_out)
    ntk_test_train = _check_kernel(ntk_test_train, "ntk_test_train", rows=m, cols=n, n_out=n_out)
    for name, block in (("ntk_train", ntk_train), ("ntk_test_train", ntk_test_train)):
        _check_like(name, block, nngp_train, "nngp_train")
    layout, y = _Targets.read(y_train, "y_train", n, n_out, nngp_train)
    values, vectors = _symmetric_eigh(_flatten(ntk_train), "ntk_train", psd=True)
    # The NNGP training block is a covariance: PSD like the NTK's.
    _symmetric_eigh(_flatten(nngp_train), "nngp_train", psd=True)
    _, gain = _flow_filters(values, lr * time)
    a = (_flatten(ntk_test_train) @ vectors) * gain @ vectors.T  # (m', n')
    k_cross = _flatten(nngp_test_train)
    a_k = a @ k_cross.T  # A K(X, X*)
    cov = _flatten(nngp_test) - a_k - a_k.T + a @ _flatten(nngp_train) @ a.T
    return Gaussian(layout.write(a @ y, m), _unflatten(_symmetrize(cov), m, m, n_out))


def conditional(k: torch.Tensor, observed_idx: object, y_observed: torch.Tensor, *,
                jitter: float = 0.0) -> Gaussian:
    """Which labels a kernel prefers for the unobserved points, given the observed ones.

    Under the prior ``y ~ N(0, K)`` over all ``N`` points, conditioning on ``y_o`` at the
    observed indices gives the unobserved
    ``y_u ~ N(K_uo K_oo⁻¹ y_o, K_uu - K_uo K_oo⁻¹ K_ou)``.
    The mean is the labelling with the highest :func:`ntk_torch.prior_logprob` among all
    completions of ``y_o``: the principled way to ask which test label the kernel prefers,
    rather than scoring a few candidates.

    Args:
        k: symmetric PSD kernel ``(N, N)`` or ``(N, N, O, O)`` over all points.
        observed_idx: the observed sample indices (ints, a 1-D integer tensor, or a boolean
            mask ``(N,)``), without repeats.
        y_observed: labels of the observed points in the order of ``observed_idx``:
            ``(N_o,)``/``(N_o, C)`` (trace) or ``(N_o, O)`` (full).
        jitter: added to the diagonal of ``K_oo`` (label noise); ``0`` uses the
            pseudo-inverse.

    Returns:
        :class:`Gaussian` over the unobserved points in increasing index order: mean
        ``(N_u,)``/``(N_u, C)``/``(N_u, O)``, covariance ``(N_u, N_u)`` or
        ``(N_u, N_u, O, O)``, ``.variance`` the marginal variances.

    Example:
        >>> import torch, ntk_torch as nt
        >>> k = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> post = nt.conditional(k, [0], torch.tensor([2.0]))
        >>> post.mean, post.variance
        (tensor([1.], dtype=torch.float64), tensor([0.7500], dtype=torch.float64))
    """
    k = _check_kernel(k, "k")
    if k.shape[0] != k.shape[1]:
        raise ValueError(f"`k` must be square in its samples, got shape {tuple(k.shape)}")
    n = k.shape[0]
    observed = _indices(observed_idx, n, k.device)
    mask = torch.zeros(n, dtype=torch.bool, device=k.device)
    mask[observed] = True
    unobserved = (~mask).nonzero().flatten()
    return gp_posterior(k[observed][:, observed], k[unobserved][:, observed],
                        k[unobserved][:, unobserved], y_observed, noise=jitter)


def _indices(idx: object, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool:
        if idx.shape != (n,):
            raise ValueError(f"`observed_idx` as a mask must have shape ({n},), "
                             f"got {tuple(idx.shape)}")
        return idx.to(device).nonzero().flatten()
    try:
        index = torch.as_tensor(idx, device=device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"`observed_idx` must be integer indices or a boolean mask, "
                        f"got {idx!r}") from error
    if index.dim() == 0:
        index = index.reshape(1)
    if index.dim() != 1 or (index.numel() and (index.is_floating_point() or index.is_complex())):
        raise TypeError(f"`observed_idx` must be a 1-D sequence of integer indices or a "
                        f"boolean mask, got {idx!r}")
    index = index.long()
    if index.numel() and (index.min() < -n or index.max() >= n):
        raise ValueError(f"`observed_idx` must index the kernel's {n} samples, "
                         f"got {index.tolist()}")
    index = index % n if n else index
    if index.unique().numel() != index.numel():
        raise ValueError(f"`observed_idx` must not repeat an index, got {index.tolist()}")
    return index
