"""Pass-streaming linear algebra against dense float64 oracles (``torch.linalg``).

Matrices are ``Q diag(λ) Qᵀ`` with a random orthogonal ``Q`` and controlled spectra: the
geometric decay of real NTK Gram matrices below one dominant eigenvalue, a low-rank one
and one with a repeated top eigenvalue. Bounds come from perturbation theory, stated
where they are used, not from snapshots of earlier runs.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from ntk_torch import eigenmodes
from ntk_torch._krylov import DenseOperator
from ntk_torch._krylov_eigen import top_eigenpairs
from ntk_torch._krylov_solve import solve_pcg

N = 400


@functools.cache
def _matrix(spectrum: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(N, N)`` symmetric PSD with the named spectrum, rounded to ``dtype``."""
    if spectrum == "geometric":  # 10^0 … 10^-8 below a dominant 100
        values = 10.0 ** -torch.linspace(0, 8, N, dtype=torch.float64)
        values[0] = 100.0
    elif spectrum == "moderate":  # condition number 1e4: ridge = 0 is well posed
        values = 10.0 ** -torch.linspace(0, 4, N, dtype=torch.float64)
    elif spectrum == "low_rank":
        values = torch.zeros(N, dtype=torch.float64)
        values[:5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    elif spectrum == "repeated":  # top eigenvalue 2 three times, then geometric
        values = 10.0 ** -torch.linspace(0, 8, N, dtype=torch.float64)
        values[:3] = 2.0
    else:
        raise KeyError(spectrum)
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=generator, dtype=torch.float64))
    k = (q * values) @ q.T
    return ((k + k.T) / 2).to(dtype)


def _rhs(columns: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(N, columns, generator=generator, dtype=torch.float64)


def _dense_solve(k: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    a = k.double() + ridge * torch.eye(k.shape[0], dtype=torch.float64)
    return torch.linalg.solve(a, rhs)


def _condition(k: torch.Tensor, ridge: float) -> float:
    values = torch.linalg.eigvalsh(k.double())
    return float((values[-1] + ridge) / (values[0] + ridge))


# ----------------------------------------------------------------------------- solve

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("columns", [1, 4])
def test_solve_matches_dense_solve(dtype, columns):
    k, ridge, tol = _matrix("geometric", dtype), 1e-3, 1e-10
    rhs = _rhs(columns)
    op = DenseOperator(k)
    x, info = solve_pcg(op, rhs, ridge=ridge, tol=tol)
    assert x.dtype == torch.float64 and x.shape == rhs.shape
    assert info.converged and info.residual.shape == (columns,)
    assert (info.residual <= tol).all()
    assert info.passes == op.passes
    # A = K + ridge·I, r = b - A x: x - x* = -A⁻¹r, so ‖x - x*‖ ≤ ‖A⁻¹‖‖r‖; with
    # ‖b‖ ≤ ‖A‖‖x*‖ this gives ‖x - x*‖/‖x*‖ ≤ κ(A)·‖r‖/‖b‖. The oracle's own error,
    # about κ·eps ≈ 1e-11, is far below κ·tol = 1e-5.
    exact = _dense_solve(k, rhs, ridge)
    error = (x - exact).norm(dim=0) / exact.norm(dim=0)
    bound = _condition(k, ridge) * info.residual
    assert (error <= bound * 1.01 + 1e-12).all(), (error, bound)


def test_solve_without_ridge_on_positive_definite_matrix():
    k, tol = _matrix("moderate"), 1e-10
    rhs = _rhs(2)
    x, info = solve_pcg(DenseOperator(k), rhs, ridge=0.0, tol=tol)
    assert info.converged
    exact = _dense_solve(k, rhs, 0.0)
    error = (x - exact).norm(dim=0) / exact.norm(dim=0)
    assert (error <= _condition(k, 0.0) * info.residual * 1.01).all()  # as above: ≤ 1e-6


def test_solve_without_ridge_on_consistent_singular_system():
    # K is rank 5 and the right-hand side lies in its range: CG stays in the range and
    # converges to a solution although K is singular.
    k = _matrix("low_rank")
    rhs = k @ _rhs(2)
    x, info = solve_pcg(DenseOperator(k), rhs, ridge=0.0, tol=1e-10)
    assert info.converged
    assert ((rhs - k @ x).norm(dim=0) <= 1e-10 * rhs.norm(dim=0)).all()


def test_solve_float32_gram_matrix_indefinite_at_rounding():
    # J Jᵀ of rank 20 rounded to float32 has eigenvalues down to about -eps32·λ_max: the
    # sketch's Cholesky needs more than the float64 shift, and the solve must still work.
    generator = torch.Generator().manual_seed(2)
    j = torch.randn(300, 20, generator=generator)
    k, ridge, tol = j @ j.T, 1e-3, 1e-10
    assert torch.linalg.eigvalsh(k.double())[0] < 0
    rhs = torch.randn(300, 2, generator=generator, dtype=torch.float64)
    x, info = solve_pcg(DenseOperator(k), rhs, ridge=ridge, tol=tol)
    assert info.converged
    exact = _dense_solve(k, rhs, ridge)
    error = (x - exact).norm(dim=0) / exact.norm(dim=0)
    assert (error <= _condition(k, ridge) * info.residual * 1.01).all()


def test_solve_with_rank_covering_whole_space():
    # rank = n: the sketch is K itself and P⁻¹ ∝ (K + ridge·I)⁻¹ up to rounding.
    k = _matrix("geometric")[:50, :50]
    _, info = solve_pcg(DenseOperator(k), _rhs(2)[:50], ridge=1e-6, tol=1e-10)
    assert info.converged and info.iterations <= 2


@pytest.mark.parametrize("ridge", [1e-3, 1e-4])
def test_nystrom_preconditioner_beats_jacobi(ridge):
    # On a fast-decaying spectrum the rank-100 Nyström preconditioner removes every
    # eigenvalue above λ_100 ≈ 1e-2: the preconditioned condition number is about
    # (λ_100 + ridge)/ridge, against ≈ 1e5-1e6 for Jacobi, which cannot see the spectrum.
    k, rhs = _matrix("geometric"), _rhs(3)
    _, nystrom = solve_pcg(DenseOperator(k), rhs, ridge=ridge, rank=100)
    _, jacobi = solve_pcg(DenseOperator(k), rhs, ridge=ridge, rank=0, max_iter=3000)
    print(f"ridge {ridge:g}: Nyström-PCG {nystrom.iterations} iterations "
          f"({nystrom.passes} passes), Jacobi-CG {jacobi.iterations} ({jacobi.passes} passes)")
    assert nystrom.converged and jacobi.converged
    # Measured: 33 vs 550 (ridge 1e-3), 100 vs 1464 (ridge 1e-4); a factor 2 leaves room.
    assert nystrom.iterations <= jacobi.iterations / 2
    # Passes: the sketch, one per iteration and the final residual check.
    assert nystrom.passes == nystrom.iterations + 2
    assert jacobi.passes == jacobi.iterations + 1
    # The adaptive rank (the default) doubles until (λ̂_ℓ + ridge)/ridge ≤ 40: CG then needs
    # about ½·√40·ln(2/tol) ≈ 46 iterations at most, each doubling one more pass.
    _, adaptive = solve_pcg(DenseOperator(k), rhs, ridge=ridge)
    print(f"adaptive: {adaptive.iterations} iterations ({adaptive.passes} passes)")
    assert adaptive.converged and adaptive.iterations <= 46
    assert adaptive.iterations <= nystrom.iterations


def test_solve_warns_when_not_converged():
    k, rhs = _matrix("geometric"), _rhs(2)
    with pytest.warns(RuntimeWarning, match=r"after 3 iterations.*raise `ridge` or `max_iter`"):
        x, info = solve_pcg(DenseOperator(k), rhs, ridge=1e-6, max_iter=3, rank=100)
    assert not info.converged and info.iterations == 3
    assert torch.isfinite(x).all() and (info.residual > 1e-6).any()


def test_solve_zero_columns():
    k, rhs = _matrix("geometric"), _rhs(3)
    rhs[:, 1] = 0
    x, info = solve_pcg(DenseOperator(k), rhs, ridge=1e-3)
    assert info.converged and info.residual[1] == 0
    assert (x[:, 1] == 0).all()
    op = DenseOperator(k)
    x, info = solve_pcg(op, torch.zeros(N, 2, dtype=torch.float64), ridge=1e-3)
    assert info.converged and info.iterations == 0 and (x == 0).all()
    assert info.passes == op.passes == 2  # the sketch and the residual check


def test_solve_callback_sees_every_iteration():
    k, rhs, tol = _matrix("geometric"), _rhs(3), 1e-8
    rhs[:, 0] = k @ (k @ rhs[:, 0])  # mostly along the leading, preconditioned eigenvectors
    seen = []
    _, info = solve_pcg(DenseOperator(k), rhs, ridge=1e-3, tol=tol,
                        callback=lambda i, r: seen.append((i, r)))
    assert [i for i, _ in seen] == list(range(1, info.iterations + 1))
    assert all(r.shape == (3,) for _, r in seen)
    assert (seen[-1][1] <= tol).all() and (seen[0][1] > tol).any()
    # A column that has converged stops changing while the others go on.
    history = torch.stack([r for _, r in seen])
    for column in history.T:
        done = int((column <= tol).nonzero()[0])
        assert (column[done:] == column[done]).all()
    assert len({int((c <= tol).nonzero()[0]) for c in history.T}) > 1


def test_solve_is_deterministic_given_seed():
    k, rhs = _matrix("geometric"), _rhs(2)
    first, _ = solve_pcg(DenseOperator(k), rhs, ridge=1e-3, seed=3)
    second, _ = solve_pcg(DenseOperator(k), rhs, ridge=1e-3, seed=3)
    assert torch.equal(first, second)


# ----------------------------------------------------------------------------- eigen

def _sines(vectors: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Sine of the angle between matching columns, accurate for small angles."""
    cosines = (vectors * exact).sum(0)
    return (vectors - exact * cosines).norm(dim=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("k", [1, 10])
def test_eigenpairs_match_eigh(dtype, k):
    matrix, tol = _matrix("geometric", dtype), 1e-8
    op = DenseOperator(matrix)
    values, vectors, info = top_eigenpairs(op, k, tol=tol)
    exact_values, exact_vectors = eigenmodes(matrix.double())
    print(f"k = {k}, {dtype}: {info.passes} passes, residual ≤ {float(info.residual.max()):.2g}")
    assert info.converged and info.passes == op.passes
    assert values.shape == (k,) and vectors.shape == (N, k) and vectors.dtype == torch.float64
    top = float(exact_values[0])
    # A residual ‖K u - θ u‖ ≤ tol·θ_max puts an eigenvalue within it (Weyl).
    assert (values - exact_values[:k]).abs().max() <= tol * top
    assert (vectors.T @ vectors - torch.eye(k, dtype=torch.float64)).abs().max() <= 1e-12
    # Davis–Kahan: sin ∠(u, v) ≤ ‖K u - θ u‖ / min_{j≠i} |λ_j - θ|.
    others = exact_values[None, :] - values[:, None]
    others[torch.arange(k), torch.arange(k)] = math.inf
    gaps = others.abs().min(1).values
    assert (_sines(vectors, exact_vectors[:, :k]) <= info.residual * top / gaps * 1.01
            + 1e-12).all()
    # Same sign convention as ntk_torch.eigenmodes: matching columns, not just up to sign.
    assert ((vectors * exact_vectors[:, :k]).sum(0) > 0).all()
    peak = vectors.gather(0, vectors.abs().argmax(0, keepdim=True))
    assert (peak > 0).all()
    # Measured 5 passes for k = 1 and 7 for k = 10 (b = 2k columns each, every seed from 0
    # to 9); twice that allows for other BLAS rounding without hiding a regression.
    assert info.passes <= {1: 10, 10: 14}[k]


def test_eigenpairs_repeated_top_eigenvalue():
    matrix, k = _matrix("repeated"), 5
    values, vectors, info = top_eigenpairs(DenseOperator(matrix), k)
    exact_values, exact_vectors = eigenmodes(matrix)
    assert info.converged
    assert (values - exact_values[:k]).abs().max() <= 1e-8 * 2.0
    # Within the triple eigenvalue only the subspace is defined: all principal angles
    # between span(u_1..u_3) and the exact eigenspace vanish.
    cosines = torch.linalg.svdvals(exact_vectors[:, :3].T @ vectors[:, :3])
    assert cosines.min() >= 1 - 1e-12
    assert (vectors.T @ vectors - torch.eye(k, dtype=torch.float64)).abs().max() <= 1e-12


def test_eigenpairs_low_rank():
    # K has rank 5: the start block and its image span range(K), so two passes give the
    # exact nonzero pairs, and the rest of the basis lies in the null space.
    matrix, k = _matrix("low_rank"), 10
    op = DenseOperator(matrix)
    values, vectors, info = top_eigenpairs(op, k)
    assert info.converged and info.passes == op.passes == 2
    assert (values[:5] - torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
            ).abs().max() <= 1e-12
    assert values[5:].abs().max() <= 1e-12
    assert (matrix @ vectors[:, 5:]).norm(dim=0).max() <= 1e-12
    assert (vectors.T @ vectors - torch.eye(k, dtype=torch.float64)).abs().max() <= 1e-12


def test_eigenpairs_of_zero_operator():
    op = DenseOperator(torch.zeros(30, 30, dtype=torch.float64))
    values, vectors, info = top_eigenpairs(op, 3)
    assert info.converged and info.passes == 1 and (values == 0).all()
    assert (vectors.T @ vectors - torch.eye(3, dtype=torch.float64)).abs().max() <= 1e-12


@pytest.mark.parametrize("k", [5, 12])
def test_eigenpairs_when_block_covers_whole_space(k):
    # n = 12 < b = k + oversample: one pass multiplies a basis of R^n, i.e. reads K whole.
    matrix = _matrix("geometric")[:12, :12]
    op = DenseOperator(matrix)
    values, vectors, info = top_eigenpairs(op, k)
    exact_values, exact_vectors = eigenmodes(matrix)
    assert info.converged and info.passes == 1
    assert (values - exact_values[:k]).abs().max() <= 1e-12 * exact_values[0]
    assert (_sines(vectors, exact_vectors[:, :k]) <= 1e-8).all()


def test_eigenpairs_warn_when_not_converged():
    with pytest.warns(RuntimeWarning, match=r"after 2 passes.*raise `max_passes`"):
        _, _, info = top_eigenpairs(DenseOperator(_matrix("geometric")), 10, max_passes=2,
                                    oversample=0)
    assert not info.converged and info.passes == 2


def test_eigenpairs_are_deterministic_given_seed():
    op = DenseOperator(_matrix("geometric"))
    first = top_eigenpairs(op, 3, seed=4)
    second = top_eigenpairs(op, 3, seed=4)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# ----------------------------------------------------------------------------- bad input

def _op() -> DenseOperator:
    return DenseOperator(torch.eye(30, dtype=torch.float64))


@pytest.mark.parametrize(("call", "message"), [
    (lambda: top_eigenpairs(_op(), 0), r"`k` must be an int in \[1, 30\], got 0"),
    (lambda: top_eigenpairs(_op(), 31), r"`k` must be an int in \[1, 30\], got 31"),
    (lambda: top_eigenpairs(_op(), 2, tol=0.0), r"`tol` must be a finite number > 0, got 0.0"),
    (lambda: top_eigenpairs(_op(), 2, max_passes=0),
     r"`max_passes` must be a positive int or None, got 0"),
    (lambda: top_eigenpairs(_op(), 2, oversample=-1),
     r"`oversample` must be an int >= 0 or None, got -1"),
    (lambda: solve_pcg(_op(), torch.ones(30, 1), ridge=-1.0),
     r"`ridge` must be a finite number >= 0, got -1.0"),
    (lambda: solve_pcg(_op(), torch.ones(30, 1), ridge=1.0, tol=-1e-6),
     r"`tol` must be a finite number > 0, got -1e-06"),
    (lambda: solve_pcg(_op(), torch.ones(29, 2), ridge=1.0),
     r"`rhs` must have shape \(n, C\) with n = 30 to match the operator, got \(29, 2\)"),
    (lambda: solve_pcg(_op(), torch.ones(30), ridge=1.0),
     r"`rhs` must have shape \(n, C\) with n = 30 to match the operator, got \(30,\)"),
    (lambda: solve_pcg(_op(), torch.ones(30, 1), ridge=1.0, max_iter=0),
     r"`max_iter` must be a positive int or None, got 0"),
    (lambda: solve_pcg(_op(), torch.ones(30, 1), ridge=1.0, rank=-2),
     r"`rank` must be an int >= 0 or None, got -2"),
    (lambda: DenseOperator(torch.tensor([[1.0, 2.0], [0.0, 1.0]])), r"`matrix` must be symmetric"),
], ids=["k0", "k>n", "eig-tol", "max_passes", "oversample", "ridge", "solve-tol", "rhs-rows",
        "rhs-1d", "max_iter", "rank", "asymmetric"])
def test_bad_input_names_argument_expected_and_received(call, message):
    with pytest.raises(ValueError, match=message):
        call()
