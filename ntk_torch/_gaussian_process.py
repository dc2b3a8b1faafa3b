"""Gaussian-process predictions with a fixed kernel: solves, kernel regression, posteriors.

Layouts and label shapes as in :mod:`ntk_torch.predict`. Kernels in memory are solved through
the eigendecomposition of the (symmetric, PSD-checked) training kernel, with the
pseudo-inverse where it is singular; kernels in a :class:`ntk_torch.KernelStore` by
preconditioned conjugate gradients that stream the store.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ntk_torch import _krylov_solve, _operators
from ntk_torch._checks import check_kernel, check_like, check_number
from ntk_torch._kernel_matrix import (
    Targets,
    as_matrix,
    check_symmetric,
    from_matrix,
    inverse_filter,
    n_out_of,
    symmetric_eigh,
    symmetrize,
)

__all__ = ["Gaussian", "conditional", "gp_posterior", "kernel_regression", "solve"]


class Gaussian(NamedTuple):
    """A Gaussian over ``M`` test points.

    ``mean`` is shaped like the labels (``(M,)``, ``(M, C)`` or ``(M, O)``), ``covariance``
    is ``(M, M)`` for a trace kernel (shared by every output column) or ``(M, M, O, O)`` for
    a full one.
    """

    __module__ = "ntk_torch.predict"  # its public home, which pickles record

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
    ridge = check_number("ridge", ridge)
    if _operators.is_store(kernel):
        op = _operators.StoreOperator(kernel, "kernel")
        layout, rhs = Targets.read("y", y, op.n_samples, op.n_out, _store_solve_like())
        x = _store_solve(op, rhs, ridge, tol, max_iter, callback)
        return layout.write(x, op.n_samples).to(_result_dtype(y, kernel.dtype))
    kernel = check_kernel("kernel", kernel, square=True)
    n, n_out = kernel.shape[0], n_out_of(kernel)
    layout, rhs = Targets.read("y", y, n, n_out, kernel)
    values, vectors = symmetric_eigh("kernel", as_matrix(kernel), psd=True)
    x = vectors @ (inverse_filter(values, ridge)[:, None] * (vectors.T @ rhs))
    return layout.write(x, n).to(_result_dtype(y, kernel.dtype))


def _store_solve(op, rhs: torch.Tensor, ridge: float, tol: float, max_iter: int | None,
                 callback) -> torch.Tensor:
    x, _ = _krylov_solve.solve_pcg(op, rhs.double(), ridge=ridge, tol=tol, max_iter=max_iter,
                                   callback=callback)
    return x


def _store_solve_like() -> torch.Tensor:
    """An empty float64 CPU tensor: a store's solve runs there, whatever the store holds."""
    return torch.empty(0, dtype=torch.float64)


def _result_dtype(y: object, fallback: torch.dtype) -> torch.dtype:
    return y.dtype if isinstance(y, torch.Tensor) and y.is_floating_point() else fallback


def kernel_regression(k_train, k_test_train, y_train: torch.Tensor, *, ridge: float = 0.0,
                      tol: float = 1e-6) -> torch.Tensor:
    """Kernel (ridge) regression ``K(X*, X) (K(X, X) + ridge·I)⁻¹ y``.

    With ``ridge = 0`` the inverse is the pseudo-inverse, so this is where gradient flow
    from ``f0 = 0`` ends (:func:`ntk_torch.gradient_flow_mse` at ``t = inf``); with
    ``ridge = σ²`` it is the posterior mean of :func:`gp_posterior` with ``noise = σ²``.

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
    ridge = check_number("ridge", ridge)
    if _operators.is_store(k_train):
        op = _operators.StoreOperator(k_train, "k_train")
        layout, y = Targets.read("y_train", y_train, op.n_samples, op.n_out, _store_solve_like())
        weights = _store_solve(op, y, ridge, tol, None, None)
        if _operators.is_store(k_test_train):
            _operators.check_store_like(k_test_train, "k_test_train", op.n_out, k_train.mode)
            pred = _operators.store_product(k_test_train, weights, "k_test_train", op.n_samples)
            m = k_test_train.shape[0]
        else:
            k_test_train = check_kernel("k_test_train", k_test_train, cols=op.n_samples,
                                         n_out=op.n_out)
            pred = as_matrix(k_test_train).double() @ weights
            m = k_test_train.shape[0]
        return layout.write(pred, m).to(_result_dtype(y_train, k_train.dtype))
    k_train = check_kernel("k_train", k_train)
    n, n_out = k_train.shape[0], n_out_of(k_train)
    k_test_train = check_kernel("k_test_train", k_test_train, cols=n, n_out=n_out)
    check_like("k_test_train", k_test_train, "k_train", k_train)
    layout, y = Targets.read("y_train", y_train, n, n_out, k_train)
    values, vectors = symmetric_eigh("k_train", as_matrix(k_train), psd=True)
    inverse = inverse_filter(values, ridge)
    weights = vectors @ (inverse[:, None] * (vectors.T @ y))
    return layout.write(as_matrix(k_test_train) @ weights, k_test_train.shape[0])


def gp_posterior(k_train, k_test_train, k_test, y_train: torch.Tensor, *,
                 noise: float = 0.0, tol: float = 1e-6) -> Gaussian:
    """Posterior of a zero-mean Gaussian process with kernel ``K`` given noisy labels.

        mean = K(X*, X) (K + noise·I)⁻¹ y
        cov  = K(X*, X*) - K(X*, X) (K + noise·I)⁻¹ K(X, X*)

    (pseudo-inverse when ``noise = 0``: conditioning a degenerate Gaussian on labels in its
    support). Note the NTK used this way is *not* what trained networks compute; for that
    see :func:`ntk_torch.ntk_gp_posterior`.

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
    noise = check_number("noise", noise)
    if _operators.is_store(k_train):
        return _store_gp_posterior(k_train, k_test_train, k_test, y_train, noise, tol)
    k_train, k_test_train, k_test = check_blocks(k_train, k_test_train, k_test, prefix="k")
    n, m, n_out = k_train.shape[0], k_test.shape[0], n_out_of(k_train)
    layout, y = Targets.read("y_train", y_train, n, n_out, k_train)
    values, vectors = symmetric_eigh("k_train", as_matrix(k_train), psd=True)
    inverse = inverse_filter(values, noise)
    cross = as_matrix(k_test_train) @ vectors  # (m', n') in the eigenbasis
    mean = cross @ (inverse[:, None] * (vectors.T @ y))
    root = cross * inverse.sqrt()
    cov = symmetrize(as_matrix(k_test) - root @ root.T)
    return Gaussian(layout.write(mean, m), from_matrix(cov, m, m, n_out))


def _store_gp_posterior(store, k_test_train, k_test, y_train, noise: float, tol: float) -> Gaussian:
    if store.mode == "diagonal":
        raise ValueError("`k_train` is a diagonal-mode store; the posterior needs the trace or "
                         "the full kernel (mode='trace' or mode='full')")
    op = _operators.StoreOperator(store, "k_train")
    n, n_out = op.n_samples, op.n_out
    k_test_train, k_test = (b.load() if _operators.is_store(b) else b
                            for b in (k_test_train, k_test))
    k_test_train = check_kernel("k_test_train", k_test_train, cols=n, n_out=n_out)
    m = k_test_train.shape[0]
    k_test = check_kernel("k_test", k_test, rows=m, cols=m, n_out=n_out)
    check_like("k_test", k_test, "k_test_train", k_test_train)
    check_symmetric("k_test", as_matrix(k_test))
    layout, y = Targets.read("y_train", y_train, n, n_out, _store_solve_like())
    cross = as_matrix(k_test_train).double()  # (M·O, N·O)
    solved = _store_solve(op, torch.cat([y, cross.T], dim=1), noise, tol, None, None)
    mean = cross @ solved[:, : y.shape[1]]
    cov = symmetrize(as_matrix(k_test).double() - cross @ solved[:, y.shape[1]:])
    dtype = _result_dtype(y_train, store.dtype)
    return Gaussian(layout.write(mean, m).to(dtype), from_matrix(cov, m, m, n_out).to(store.dtype))


def check_blocks(train: torch.Tensor, test_train: torch.Tensor, test: torch.Tensor, *,
                  prefix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = (f"{prefix}_train", f"{prefix}_test_train", f"{prefix}_test")
    train = check_kernel(names[0], train)
    n, n_out = train.shape[0], n_out_of(train)
    test_train = check_kernel(names[1], test_train, cols=n, n_out=n_out)
    m = test_train.shape[0]
    test = check_kernel(names[2], test, rows=m, cols=m, n_out=n_out)
    for name, block in zip(names[1:], (test_train, test)):
        check_like(name, block, names[0], train)
    check_symmetric(names[2], as_matrix(test))
    return train, test_train, test


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
    k = check_kernel("k", k, square=True)
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
