"""Linear systems ``(K + ridge·I) X = B`` with a kernel seen only through products.

Conjugate gradients on all columns at once, preconditioned by a randomized Nyström
approximation of ``K`` whose rank adapts; the cost is counted in passes over ``K`` (see
:mod:`ntk_torch._krylov`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from ntk_torch._checks import check_int, check_number, describe
from ntk_torch._krylov import SymmetricOperator, extend_basis, product, random_block

__all__ = ["SolveInfo", "solve_pcg"]


class SolveInfo(NamedTuple):
    """How :func:`solve_pcg` went.

    CG ``iterations``, operator ``passes`` in all (sketch and residual checks included),
    the relative true ``residual`` ``(C,)`` ``‖B - (K + ridge·I) X‖ / ‖B‖`` per column (0
    for a zero column), and whether every column reached ``tol``.
    """

    iterations: int
    passes: int
    residual: torch.Tensor
    converged: bool


def _nystrom(op: SymmetricOperator, rank: int, mu: float, generator: torch.Generator,
             max_rank: int | None = None) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """Inverse randomized Nyström preconditioner and the passes it took.

    After Frangella, Tropp & Udell, SIAM J. Matrix Anal. Appl. 2023: Algorithm 2.1 for the
    sketch, §5 for ``P⁻¹``.

    Sketch ``Y = K Ω`` with orthonormal ``Ω`` ``(n, ℓ)``; shift ``ν = √n·eps·‖Y‖₂``,
    ``C = chol(Ωᵀ(Y + νΩ))``, ``U Σ Vᵀ = svd((Y + νΩ) C⁻ᵀ)``, ``Λ̂ = max(0, Σ² - ν)``; then

        P⁻¹ = (λ̂_ℓ + μ) U (Λ̂ + μI)⁻¹ Uᵀ + (I - UUᵀ).

    With ``max_rank`` the rank adapts (after the paper's §5.4.2): while the preconditioned
    condition number ``(λ̂_ℓ + μ)/μ`` exceeds ``TARGET_CONDITION``, ``ℓ`` doubles, each
    doubling one pass with the new columns only, up to ``max_rank`` and as long as the CG
    iterations it is predicted to save (from the eigenvalue decay seen so far) take longer
    than the doubling itself (predicted from the time of the last one).

    The sketch resolves ``K`` only to about ``ν``: float64 rounding, or the indefiniteness
    of a kernel stored in low precision that the Cholesky retry measured. When ``μ`` is
    below that (``ridge = 0``), columns of ``U`` with ``λ̂ + μ ≤ 10ν`` are dropped and
    ``λ̂_ℓ`` is the smallest kept: otherwise ``P⁻¹`` would amplify the unresolved, noisy
    directions by up to ``λ̂_1/μ`` against the resolved ones. With ``μ ≥ 10ν`` this is the
    paper's preconditioner.
    """
    n = op.size
    omega, _ = torch.linalg.qr(random_block(n, rank, generator, op.device))
    start = time.perf_counter()
    y = product(op, omega, sketch=True)
    first_pass_s = time.perf_counter() - start
    passes = 1
    while True:
        u, lam, nu = _nystrom_factors(omega, y)
        round_s = time.perf_counter() - start
        grow = 0 if max_rank is None or mu == 0 else min(omega.shape[1], max_rank - omega.shape[1])
        if grow <= 0 or lam.numel() < 2 or lam[-1] + mu <= TARGET_CONDITION * mu:
            break
        # Worth another doubling? It saves the CG iterations (passes like the first one)
        # between the present condition number and the one the decay seen so far,
        # λ̂_ℓ / λ̂_{ℓ/2}, predicts at 2ℓ; it costs its pass, its orthogonalisation and the
        # factorisation, O(ℓ) to O(ℓ²): about three times the last round.
        low, half = float(lam[-1]), float(lam[lam.numel() // 2 - 1])
        decay = min(low / half, 1.0) if half > 0 else 0.0
        saved = _cg_iterations((low + mu) / mu) - _cg_iterations((low * decay + mu) / mu)
        if saved * first_pass_s < 3 * round_s:
            break
        start = time.perf_counter()
        extra = extend_basis(random_block(n, grow, generator, op.device), omega, generator)
        omega, y = torch.cat([omega, extra], 1), torch.cat([y, product(op, extra, sketch=True)], 1)
        passes += 1
    keep = lam + mu > 10 * nu
    if not keep.any():
        return (lambda r: r), passes
    u, lam = u[:, keep], lam[keep]
    factor = (lam[-1] + mu) / (lam + mu) - 1

    def apply(r: torch.Tensor) -> torch.Tensor:
        return r + u @ (factor[:, None] * (u.T @ r))

    return apply, passes


def _cg_iterations(condition: float, tol: float = 1e-6) -> float:
    """The conjugate-gradient bound ``½·√κ·ln(2/tol)`` on iterations."""
    return 0.5 * math.sqrt(condition) * math.log(2 / tol)


# The adaptive Nyström rank grows until the preconditioned condition number is about this:
# conjugate gradients then need about ½·√40·ln(2/tol) ≈ 45 iterations for tol = 1e-6.
TARGET_CONDITION = 40.0
# Most memory the adaptive sketch may hold (Ω and KΩ, float64).
SKETCH_BYTES = 2**30


def _nystrom_factors(omega: torch.Tensor, y: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``U``, ``Λ̂`` (descending) and the shift ``ν`` of the Nyström approximation.

    From the sketch ``Y = K Ω``.

    Costs ``O(n·ℓ²)`` in matrix products: ``‖Y‖₂`` is bounded by the Frobenius norm (a
    slightly larger shift), and the SVD of ``B = (Y + νΩ) C⁻ᵀ`` comes from the
    eigendecomposition of the ``ℓ x ℓ`` matrix ``BᵀB`` (its small singular values lose
    accuracy, but only below ``√ν``, where ``Λ̂`` is clipped to zero anyway).
    """
    n = omega.shape[0]
    nu = math.sqrt(n) * torch.finfo(torch.float64).eps * float(torch.linalg.matrix_norm(y))
    nu = max(nu, torch.finfo(torch.float64).tiny)
    for _ in range(4):
        y_nu = y + nu * omega
        core = omega.T @ y_nu
        chol, info = torch.linalg.cholesky_ex((core + core.T) / 2)
        if info == 0:
            break
        # A kernel stored in low precision is PSD only to that precision, so Ωᵀ K Ω can be
        # indefinite beyond the float64 shift: shift past its lowest eigenvalue.
        nu += nu - float(torch.linalg.eigvalsh((core + core.T) / 2)[0])
    else:
        raise RuntimeError("the Nyström sketch is not positive semi-definite; is `op` PSD?")
    b = torch.linalg.solve_triangular(chol.T, y_nu, upper=True, left=False)
    squares, v = torch.linalg.eigh(b.T @ b)
    squares, v = squares.flip(0).clamp_min(0), v.flip(1)
    sigma = squares.sqrt()
    u = (b @ v) / torch.where(sigma > 0, sigma, 1.0)
    return u, (squares - nu).clamp_min(0), nu


def _jacobi(op: SymmetricOperator, mu: float) -> Callable[[torch.Tensor], torch.Tensor]:
    d = op.diagonal().to(torch.float64) + mu
    fill = 1 / float(d.max()) if d.numel() and d.max() > 0 else 1.0
    inverse = torch.where(d > 0, 1 / d.clamp_min(torch.finfo(d.dtype).tiny), fill)
    return lambda r: inverse[:, None] * r


def solve_pcg(op: SymmetricOperator, rhs: torch.Tensor, *, ridge: float, tol: float = 1e-6,
              max_iter: int | None = None, rank: int | None = None, seed: int = 0,
              callback: Callable[[int, torch.Tensor], None] | None = None
              ) -> tuple[torch.Tensor, SolveInfo]:
    """Solve ``(K + ridge·I) X = B`` by preconditioned conjugate gradients.

    All ``C`` columns advance together, one pass per iteration, each with its own CG
    scalars; a column stops once ``‖r‖ / ‖b‖ ≤ tol`` for its recursively updated residual
    ``r``. Then one more pass computes the true residuals; columns that the recursion's
    rounding left above ``tol`` restart from there (at most three times).

    The preconditioner is the randomized Nyström preconditioner of rank ``ℓ`` (Frangella,
    Tropp & Udell, "Randomized Nyström preconditioning", SIAM J. Matrix Anal. Appl. 2023):
    once ``ℓ`` is a small multiple of the effective dimension ``tr(K (K + ridge·I)⁻¹)``
    the preconditioned condition number is a small constant in expectation, however ill
    conditioned ``K + ridge·I`` is. With fewer columns than that, the eigenvalues between
    ``ridge`` and ``λ_ℓ`` cost of the order of ``½·√(λ_ℓ / ridge)·ln(2 / tol)`` iterations,
    the CG bound for condition number ``λ_ℓ / ridge``. So by default ``ℓ`` adapts: it
    starts at 100 and doubles (one pass with the new columns each time) until
    ``(λ̂_ℓ + ridge)/ridge ≤ TARGET_CONDITION`` or the sketch would exceed ``SKETCH_BYTES``.
    In the tests (geometric spectrum, fixed ``ℓ = 100``, ``λ_ℓ ≈ 1e-2``): 33 and 100
    iterations for ``ridge = 1e-3`` and ``1e-4``, against 550 and 1460 for
    Jacobi-preconditioned CG.

    Args:
        op: the PSD kernel ``K``, size ``n``.
        rhs: ``B`` ``(n, C)``; used in float64.
        ridge: ``≥ 0``. With 0, ``K`` must be positive definite or the system consistent.
        tol: relative residual per column, ``> 0``.
        max_iter: CG iterations in all; default ``max(100, min(2n, 1000))``: ``n`` suffice
            in exact arithmetic, rounding can cost more, and each is a pass.
        rank: Nyström rank ``ℓ``, capped at ``n``; default adaptive from ``min(n, 100)``
            (see above); ``0`` gives plain CG with the Jacobi (diagonal) preconditioner and
            no sketch pass.
        seed: seeds the sketch.
        callback: ``callback(iteration, residual)`` after every iteration, with the
            recursive relative residuals ``(C,)``.

    Returns:
        ``(X, info)``: ``X`` ``(n, C)`` float64 (the last iterate if not converged, with a
        ``RuntimeWarning``) and :class:`SolveInfo`.

    Cost:
        ``iterations + 1`` passes, plus the sketch's (1 with a fixed ``rank > 0``, one
        more per doubling), ``+ 1`` per restart; memory ``O(n·(ℓ + C))``.

    Example:
        >>> import torch
        >>> from ntk_torch._krylov import DenseOperator
        >>> op = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
        >>> x, info = solve_pcg(op, torch.tensor([[3.0], [3.0]]), ridge=1.0)
        >>> x.flatten(), info.converged
        (tensor([0.7500, 0.7500], dtype=torch.float64), True)
    """
    n = op.size
    if not isinstance(rhs, torch.Tensor) or not rhs.is_floating_point():
        raise TypeError(f"`rhs` must be a floating-point tensor of shape (n, C), "
                        f"got {describe(rhs)}")
    if rhs.dim() != 2 or rhs.shape[0] != n:
        raise ValueError(f"`rhs` must have shape (n, C) with n = {n} to match the operator, "
                         f"got {tuple(rhs.shape)}")
    if rhs.device != op.device:
        raise ValueError(f"`rhs` must be on the operator's device {op.device}, "
                         f"got {rhs.device}")
    if not torch.isfinite(rhs).all():
        raise ValueError("`rhs` has non-finite entries (NaN/inf)")
    mu = check_number("ridge", ridge)
    tol = check_number("tol", tol, strict=True)
    max_iter = check_int("max_iter", max_iter, low=1, optional=True)
    max_iter = max(100, min(2 * n, 1000)) if max_iter is None else max_iter
    adaptive = rank is None
    rank = check_int("rank", rank, low=0, optional=True)
    rank = min(min(n, 100) if rank is None else rank, n)
    max_rank = min(n, max(rank, SKETCH_BYTES // (16 * max(n, 1)))) if adaptive else None

    b = rhs.to(torch.float64)
    scale = b.norm(dim=0)
    scale = torch.where(scale > 0, scale, 1.0)  # a zero column has x = 0, r = 0
    x = torch.zeros_like(b)
    r = b.clone()
    generator = torch.Generator().manual_seed(seed)
    if rank:
        precondition, passes = _nystrom(op, rank, mu, generator, max_rank)
    else:
        precondition, passes = _jacobi(op, mu), 0
    iterations, indefinite = 0, False
    for _restart in range(4):
        active = r.norm(dim=0) > tol * scale
        z = precondition(r)
        p, rz = z.clone(), (r * z).sum(0)
        while active.any() and iterations < max_iter:
            idx = active.nonzero().squeeze(1)
            q = product(op, p[:, idx]) + mu * p[:, idx]
            passes, iterations = passes + 1, iterations + 1
            pq = (p[:, idx] * q).sum(0)
            alpha = torch.where(pq > 0, rz[idx] / pq.clamp_min(torch.finfo(pq.dtype).tiny), 0)
            x[:, idx] += alpha * p[:, idx]
            r[:, idx] -= alpha * q
            relative = r.norm(dim=0) / scale
            if callback is not None:
                callback(iterations, relative.clone())
            # A non-positive curvature pᵀ(K + ridge·I)p means K is not PD on the data:
            # the column stops and shows up in the true residual.
            active[idx] = (relative[idx] > tol) & (pq > 0)
            indefinite |= bool((pq <= 0).any())
            z = precondition(r[:, idx])
            rz_new = (r[:, idx] * z).sum(0)
            p[:, idx] = z + (rz_new / rz[idx].clamp_min(torch.finfo(rz.dtype).tiny)) * p[:, idx]
            rz[idx] = rz_new
        r = b - product(op, x) - mu * x
        passes += 1
        residual = r.norm(dim=0) / scale
        converged = bool((residual <= tol).all())
        if converged or iterations >= max_iter:
            break
    if not converged:
        worst = int(residual.argmax())
        cause = ("K + ridge·I is not positive definite to working precision: raise `ridge`"
                 if indefinite else "the system may be too ill conditioned: raise `ridge` "
                 "or `max_iter`")
        warnings.warn(f"solve_pcg stopped after {iterations} iterations with relative residual "
                      f"{float(residual[worst]):.3g} > tol = {tol:.3g} (column {worst}); "
                      + cause, RuntimeWarning, stacklevel=2)
    return x, SolveInfo(iterations, passes, residual, converged)
