"""The leading eigenpairs of a kernel seen only through products.

Thick-restarted block Lanczos, its cost counted in passes over ``K`` (see
:mod:`ntk_torch._krylov`).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from ntk_torch._checks import check_int, check_number
from ntk_torch._krylov import (
    SymmetricOperator,
    extend_basis,
    product,
    random_block,
    sign_fixed,
)

__all__ = ["EigInfo", "top_eigenpairs"]


class EigInfo(NamedTuple):
    """How :func:`top_eigenpairs` went.

    Operator ``passes``, the ``residual`` ``(k,)`` ``‖K u - θ u‖ / θ_max`` of each returned
    pair, and whether all reached ``tol``.
    """

    passes: int
    residual: torch.Tensor
    converged: bool


def top_eigenpairs(op: SymmetricOperator, k: int, *, tol: float = 1e-8,
                   max_passes: int | None = None, oversample: int | None = None,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, EigInfo]:
    """The ``k`` largest eigenpairs of a PSD operator by thick-restarted block Lanczos.

    A random start block of ``b = k + oversample`` vectors grows a block Krylov basis
    ``V``, one pass ``W_j = K V_j`` per block, each new block ``W_j`` orthogonalised against
    all of ``V`` twice (full reorthogonalisation). After every pass, Rayleigh–Ritz on
    ``H = Vᵀ K V = Vᵀ W`` gives Ritz pairs ``(θ, u = V s)`` and their residuals
    ``‖W s - θ V s‖`` from the stored products, at no further pass. Once the basis holds
    ``6b`` columns it restarts from the ``b`` leading Ritz vectors and their products: block
    Lanczos (Golub & Underwood, 1977) with thick restart (Wu & Simon, SIAM J. Matrix Anal.
    Appl. 2000). Directions that rounding cancels (low rank, invariant subspaces) are
    replaced by random ones.

    Args:
        op: the PSD kernel ``K``, size ``n``.
        k: ``1 ≤ k ≤ n``. With ``b ≥ n`` the first pass multiplies a basis of all of
            ``R^n`` and the result is a dense eigendecomposition.
        tol: stop when every wanted pair has ``‖K u - θ u‖ ≤ tol·θ_max``; then each
            ``θ`` is within ``tol·θ_max`` of an eigenvalue. Products must be accurate to
            better than ``tol`` (float64 accumulation).
        max_passes: default 100; a ``RuntimeWarning`` if reached unconverged.
        oversample: extra block columns, default ``max(10, k)``: columns are nearly free
            in a pass and widen the gap the convergence rate depends on.
        seed: seeds the start block.

    Returns:
        ``(values, vectors, info)``: ``values`` ``(k,)`` float64 descending, ``vectors``
        ``(n, k)`` orthonormal with each column's largest-magnitude entry positive (as in
        :func:`ntk_torch.eigenmodes`; within a repeated eigenvalue the basis is
        arbitrary), and :class:`EigInfo`.

    Cost:
        ``passes`` of ``b`` columns each: 7 for ``k = 10`` on the geometric spectrum of the
        tests, more where eigenvalues near ``λ_k`` cluster; memory ``O(n·6b)``.

    Example:
        >>> import torch
        >>> from ntk_torch._krylov import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64)))
        >>> values, vectors, info = top_eigenpairs(op, 2)
        >>> torch.allclose(values, torch.tensor([4.0, 2.0], dtype=torch.float64)), info.passes
        (True, 1)
        >>> e = torch.eye(3, dtype=torch.float64)
        >>> torch.allclose(vectors, e[:, [1, 2]])  # signs fixed: largest entries positive
        True
    """
    n = op.size
    k = check_int("k", k, low=1, high=n)
    tol = check_number("tol", tol, strict=True)
    max_passes = check_int("max_passes", max_passes, low=1, optional=True)
    max_passes = 100 if max_passes is None else max_passes
    oversample = check_int("oversample", oversample, low=0, optional=True)
    oversample = max(10, k) if oversample is None else oversample
    width = min(k + oversample, n)
    capacity = min(6 * width, n)
    generator = torch.Generator().manual_seed(seed)
    basis = torch.zeros(n, capacity, dtype=torch.float64, device=op.device)
    images = torch.zeros_like(basis)  # K @ basis
    gram = torch.zeros(capacity, capacity, dtype=torch.float64, device=op.device)
    size, passes = 0, 0

    def append(block: torch.Tensor) -> None:
        nonlocal size, passes
        image = product(op, block)
        passes += 1
        end = size + block.shape[1]
        basis[:, size:end], images[:, size:end] = block, image
        gram[:end, size:end] = basis[:, :end].T @ image
        gram[size:end, :size] = gram[:size, size:end].T
        size = end

    start, _ = torch.linalg.qr(random_block(n, width, generator, op.device))
    append(start)
    last = images[:, :width]
    while True:
        theta, s = torch.linalg.eigh((gram[:size, :size] + gram[:size, :size].T) / 2)
        theta, s = theta.flip(0), s.flip(1)
        wanted = s[:, :k]
        residual = (images[:, :size] @ wanted - basis[:, :size] @ wanted * theta[:k]).norm(dim=0)
        top = float(theta[0].clamp_min(0))
        converged = bool((residual <= tol * top).all())
        if converged or size == n or passes >= max_passes:
            break
        if size == capacity:
            kept = s[:, :width]
            vectors, products = basis[:, :size] @ kept, images[:, :size] @ kept
            basis[:, :width], images[:, :width] = vectors, products
            gram[:width, :width] = vectors.T @ products
            size, last = width, images[:, :width]
        room = min(width, n - size)
        # Too little room for a Krylov block: complete the basis of R^n at random instead.
        block = last if room == width else random_block(n, room, generator, op.device)
        append(extend_basis(block, basis[:, :size], generator))
        last = images[:, size - room:size]
    vectors = sign_fixed(basis[:, :size] @ wanted)
    relative = residual / top if top > 0 else residual
    if not converged:
        bad = int((residual > tol * top).sum())
        warnings.warn(f"top_eigenpairs stopped after {passes} passes with relative residual "
                      f"up to {float(relative.max()):.3g} > tol = {tol:.3g} in {bad} of the "
                      f"k = {k} pairs; raise `max_passes` or `oversample`, or loosen `tol`",
                      RuntimeWarning, stacklevel=2)
    return theta[:k].clone(), vectors, EigInfo(passes, relative, converged)
