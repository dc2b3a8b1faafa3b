"""Linear algebra that touches a kernel matrix only through products ``K @ V``.

For kernels too large for memory every product streams the whole matrix once, a *pass*,
and a pass with many columns costs about as much as one with a single column. So both
algorithms here advance a block of vectors per pass and count passes as their cost:

* :func:`solve_pcg`: ``(K + ridge·I) X = B`` by conjugate gradients on all columns at
  once, preconditioned by a randomized Nyström approximation of ``K``;
* :func:`top_eigenpairs`: the leading eigenpairs by thick-restarted block Lanczos.

Vectors are ``(n, C)`` float64 on the operator's device; ``n`` is the operator's size.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch

from ntk_torch._checks import _describe
from ntk_torch.kernels import _check_nonnegative, _check_symmetric

# A Krylov direction whose norm falls below this fraction of the product it came from is
# rounding noise, not information: it is replaced by a random direction.
_DEFLATION = 1e-12
# Rows of a non-float64 DenseOperator matrix upcast at once: bounds the float64 copy.
_UPCAST_ELEMENTS = 1 << 22


class SymmetricOperator(Protocol):
    """A symmetric positive semi-definite linear operator ``K`` on ``R^n``.

    Attributes:
        size: ``n``.
        dtype: dtype of the stored kernel; ``K`` is PSD only to its precision.
        device: where vectors live.
    """

    size: int
    dtype: torch.dtype
    device: torch.device

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        """``K @ v`` for ``v`` ``(n, C)`` float64, returned ``(n, C)`` float64, accumulated
        in float64. One call is one pass over ``K``."""
        ...

    def diagonal(self) -> torch.Tensor:
        """The diagonal of ``K``, ``(n,)`` float64; costs no pass."""
        ...

    # Optionally, ``sketch(v)``: ``K @ v`` like ``matmul`` but possibly in the kernel's own,
    # lower precision, for the Nyström sketch (one pass).


class DenseOperator:
    """:class:`SymmetricOperator` of an in-memory symmetric ``(n, n)`` matrix.

    A non-float64 matrix is upcast a block of rows at a time, so the products are exact
    float64 products of the stored values. ``passes`` counts :meth:`matmul` calls.
    """

    def __init__(self, matrix: torch.Tensor, *, name: str = "matrix") -> None:
        if not isinstance(matrix, torch.Tensor) or not matrix.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point tensor of shape (n, n), "
                            f"got {_describe(matrix)}")
        if matrix.dim() != 2:
            raise ValueError(f"`{name}` must have shape (n, n), got {tuple(matrix.shape)}")
        _check_symmetric(matrix, name)
        if not torch.isfinite(matrix).all():
            raise ValueError(f"`{name}` has non-finite entries (NaN/inf)")
        self.matrix = matrix
        self.size = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.passes = 0

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        if self.dtype == torch.float64:
            return self.matrix @ v
        out = v.new_empty(v.shape)
        rows = max(1, _UPCAST_ELEMENTS // max(self.size, 1))
        for start in range(0, self.size, rows):
            out[start:start + rows] = self.matrix[start:start + rows].to(torch.float64) @ v
        return out

    def diagonal(self) -> torch.Tensor:
        return self.matrix.diagonal().to(torch.float64)


class SolveInfo(NamedTuple):
    """How :func:`solve_pcg` went: CG ``iterations``, operator ``passes`` in all (sketch
    and residual checks included), the relative true ``residual`` ``(C,)``
    ``‖B - (K + ridge·I) X‖ / ‖B‖`` per column (0 for a zero column), and whether every
    column reached ``tol``."""

    iterations: int
    passes: int
    residual: torch.Tensor
    converged: bool


class EigInfo(NamedTuple):
    """How :func:`top_eigenpairs` went: operator ``passes``, the ``residual`` ``(k,)``
    ``‖K u - θ u‖ / θ_max`` of each returned pair, and whether all reached ``tol``."""

    passes: int
    residual: torch.Tensor
    converged: bool


# ----------------------------------------------------------------------------- plumbing

def _check_count(name: str, value: object, *, low: int, default: int | None = None) -> int:
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a positive int" if low == 1 else f"an int ≥ {low}"
        raise ValueError(f"`{name}` must be {what}" + (" or None" if default is not None else "")
                         + f", got {value!r}")
    return value


def _random(n: int, c: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    # Drawn on the CPU so that a seed gives the same vectors on every device.
    return torch.randn(n, c, generator=generator, dtype=torch.float64).to(device)


def _product(op: SymmetricOperator, v: torch.Tensor, sketch: bool = False) -> torch.Tensor:
    out = getattr(op, "sketch", op.matmul)(v) if sketch else op.matmul(v)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(v.shape):
        raise ValueError(f"`op.matmul` must return a tensor of shape {tuple(v.shape)}, "
                         f"got {_describe(out)}")
    return out.to(torch.float64)


def _extend_basis(block: torch.Tensor, basis: torch.Tensor, generator: torch.Generator
                  ) -> torch.Tensor:
    """Orthonormal ``(n, c)`` columns orthogonal to ``basis`` ``(n, m)`` spanning the part of
    ``block`` ``(n, c)`` outside it; directions lost to rounding are drawn at random.

    Block Gram–Schmidt twice, then QR; a column whose QR diagonal falls below
    ``_DEFLATION`` of its norm is noise. A third projection and QR restores orthogonality
    to the basis that the normalisation of nearly dependent columns can lose.
    """
    reference = block.norm(dim=0)
    for _ in range(4):
        q = block - basis @ (basis.T @ block)
        q, r = torch.linalg.qr(q - basis @ (basis.T @ q))
        weak = r.diagonal().abs() <= _DEFLATION * reference
        q, r = torch.linalg.qr(q - basis @ (basis.T @ q))
        weak |= r.diagonal().abs() < 0.5
        if not weak.any():
            return q
        block = block.clone()
        block[:, weak] = _random(block.shape[0], int(weak.sum()), generator, block.device)
        reference[weak] = block[:, weak].norm(dim=0)
    raise RuntimeError("could not extend the Krylov basis with independent directions")


def sign_fixed(vectors: torch.Tensor) -> torch.Tensor:
    """Each column's largest-magnitude entry made positive, as in ``ntk_torch.eigenmodes``."""
    peak = vectors.gather(0, vectors.abs().argmax(0, keepdim=True))
    return vectors * torch.where(peak < 0, -1.0, 1.0).to(vectors.dtype)


# ----------------------------------------------------------------------------- solve

def _nystrom(op: SymmetricOperator, rank: int, mu: float, generator: torch.Generator,
             max_rank: int | None = None) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """Inverse randomized Nyström preconditioner and the passes it took (Frangella, Tropp &
    Udell, SIAM J. Matrix Anal. Appl. 2023: Algorithm 2.1 for the sketch, §5 for ``P⁻¹``).

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
    omega, _ = torch.linalg.qr(_random(n, rank, generator, op.device))
    start = time.perf_counter()
    y = _product(op, omega, sketch=True)
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
        extra = _extend_basis(_random(n, grow, generator, op.device), omega, generator)
        omega, y = torch.cat([omega, extra], 1), torch.cat([y, _product(op, extra, sketch=True)], 1)
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


def _nystrom_factors(omega: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``U``, ``Λ̂`` (descending) and the shift ``ν`` of the Nyström approximation from the
    sketch ``Y = K Ω``.

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
        >>> op = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
        >>> x, info = solve_pcg(op, torch.tensor([[3.0], [3.0]]), ridge=1.0)
        >>> x.flatten(), info.converged
        (tensor([0.7500, 0.7500], dtype=torch.float64), True)
    """
    n = op.size
    if not isinstance(rhs, torch.Tensor) or not rhs.is_floating_point():
        raise TypeError(f"`rhs` must be a floating-point tensor of shape (n, C), "
                        f"got {_describe(rhs)}")
    if rhs.dim() != 2 or rhs.shape[0] != n:
        raise ValueError(f"`rhs` must have shape (n, C) with n = {n} to match the operator, "
                         f"got {tuple(rhs.shape)}")
    if rhs.device != op.device:
        raise ValueError(f"`rhs` must be on the operator's device {op.device}, "
                         f"got {rhs.device}")
    if not torch.isfinite(rhs).all():
        raise ValueError("`rhs` has non-finite entries (NaN/inf)")
    mu = _check_nonnegative("ridge", ridge)
    tol = _check_nonnegative("tol", tol, positive=True)
    max_iter = _check_count("max_iter", max_iter, low=1, default=max(100, min(2 * n, 1000)))
    adaptive = rank is None
    rank = min(_check_count("rank", rank, low=0, default=min(n, 100)), n)
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
            q = _product(op, p[:, idx]) + mu * p[:, idx]
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
        r = b - _product(op, x) - mu * x
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


# ----------------------------------------------------------------------------- eigen

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
        >>> op = DenseOperator(torch.diag(torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64)))
        >>> values, vectors, info = top_eigenpairs(op, 2)
        >>> torch.allclose(values, torch.tensor([4.0, 2.0], dtype=torch.float64)), info.passes
        (True, 1)
        >>> e = torch.eye(3, dtype=torch.float64)
        >>> torch.allclose(vectors, e[:, [1, 2]])  # signs fixed: largest entries positive
        True
    """
    n = op.size
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"`k` must be an int with 1 ≤ k ≤ n = {n} (the operator's size), "
                         f"got {k!r}")
    tol = _check_nonnegative("tol", tol, positive=True)
    max_passes = _check_count("max_passes", max_passes, low=1, default=100)
    oversample = _check_count("oversample", oversample, low=0, default=max(10, k))
    width = min(k + oversample, n)
    capacity = min(6 * width, n)
    generator = torch.Generator().manual_seed(seed)
    basis = torch.zeros(n, capacity, dtype=torch.float64, device=op.device)
    images = torch.zeros_like(basis)  # K @ basis
    gram = torch.zeros(capacity, capacity, dtype=torch.float64, device=op.device)
    size, passes = 0, 0

    def append(block: torch.Tensor) -> None:
        nonlocal size, passes
        image = _product(op, block)
        passes += 1
        end = size + block.shape[1]
        basis[:, size:end], images[:, size:end] = block, image
        gram[:end, size:end] = basis[:, :end].T @ image
        gram[size:end, :size] = gram[:size, size:end].T
        size = end

    start, _ = torch.linalg.qr(_random(n, width, generator, op.device))
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
        block = last if room == width else _random(n, room, generator, op.device)
        append(_extend_basis(block, basis[:, :size], generator))
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
