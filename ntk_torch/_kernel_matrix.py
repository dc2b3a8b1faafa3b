"""A kernel as one matrix: layouts, symmetry and the PSD eigendecomposition.

Kernels come in :func:`ntk_torch.empirical_ntk`'s three layouts and are read as one matrix
over (sample, output) pairs, row ``a·O + i`` for sample ``a`` and output ``i``:

- trace ``(N1, N2)``: the matrix itself, one kernel shared by every output;
- full ``(N1, N2, O, O)``: the ``(N1·O, N2·O)`` matrix ``M[a·O + i, b·O + j] = K[a, b, i, j]``;
- diagonal ``(N1, N2, O)``: the same matrix with its cross-output entries (``i ≠ j``) zero.

Labels follow the matrix: ``(N,)`` or ``(N, C)`` for a trace kernel (each column an
independent right-hand side) and ``(N, O)`` for a full one (``(N,)`` when ``O = 1``).

Eigendecompositions of a kernel ``K = V diag(λ) Vᵀ`` treat asymmetry beyond rounding and
clearly negative eigenvalues as errors and clip the eigenvalues that rounding pushes
slightly below zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ntk_torch._checks import describe


def n_out_of(k: torch.Tensor) -> int | None:
    """``O`` of a full or diagonal kernel, ``None`` for a trace kernel."""
    return None if k.dim() == 2 else k.shape[2]


def as_matrix(k: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(R, C)`` as it is; ``(R, C, O)`` and ``(R, C, O, O)`` as ``(R·O, C·O)``.

    With ``out``, a flat tensor of at least ``k.numel()`` elements, a trace or full
    kernel's matrix is copied into (and viewed from) its first elements, in its dtype: a
    buffer reused across the tiles of a stream.
    """
    if k.dim() == 3:
        k = torch.diag_embed(k)  # zero cross-output entries
    if k.dim() == 2:
        view, shape = k, tuple(k.shape)
    else:
        r, c, o, _ = k.shape
        view, shape = k.permute(0, 2, 1, 3), (r * o, c * o)
    if out is None:
        return view.reshape(shape)
    matrix = out[:view.numel()].view(view.shape)
    matrix.copy_(view)
    return matrix.view(shape)


def per_output_blocks(k: torch.Tensor) -> torch.Tensor:
    """A diagonal kernel ``(R, C, O)`` as its ``O`` per-output matrices ``(O, R, C)``.

    The nonzero blocks of :func:`as_matrix`'s view, kept apart so that products and
    spectra cost ``O`` times ``R·C`` rather than ``(R·O)·(C·O)``.
    """
    return k.permute(2, 0, 1)


def from_matrix(m: torch.Tensor, rows: int, cols: int, n_out: int | None) -> torch.Tensor:
    """The inverse of :func:`as_matrix` for the trace (``n_out=None``) and full layouts."""
    if n_out is None:
        return m
    return m.reshape(rows, n_out, cols, n_out).permute(0, 2, 1, 3)


def transpose_pairs(k: torch.Tensor) -> torch.Tensor:
    """``K(x2, x1)`` from ``K(x1, x2)``: samples swapped and, in full mode, outputs.

    This is the transpose of :func:`as_matrix`'s view in every layout.
    """
    k = k.transpose(0, 1)
    return k.transpose(2, 3) if k.dim() == 4 else k


def symmetrize(k: torch.Tensor) -> torch.Tensor:
    """``(K + Kᵀ)/2`` in ``k``'s layout (a matrix is its own trace layout)."""
    # Exactly symmetric in floating point: addition commutes.
    return (k + transpose_pairs(k)) / 2


def tolerances(dtype: torch.dtype, n: int) -> tuple[float, float]:
    """``(rel_sym, rel_rank)`` for an ``(n, n)`` kernel matrix in ``dtype``.

    ``rel_sym = √eps`` is the relative asymmetry or negative eigenvalue accepted as
    rounding (kernels computed as ``J Jᵀ`` in float32 carry errors of order ``eps·√P``);
    ``rel_rank = n·eps`` the relative eigenvalue below which a direction counts as null,
    the cutoff ``torch.linalg.pinv`` uses.
    """
    eps = torch.finfo(dtype).eps
    return math.sqrt(eps), max(n, 1) * eps


def check_symmetric(name: str, m: torch.Tensor) -> None:
    """A kernel matrix ``(n, n)`` equals its transpose up to ``√eps`` relative."""
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"`{name}` must be square, got shape {tuple(m.shape)} after "
                         "flattening outputs")
    if m.numel() == 0:
        return
    rel_sym, _ = tolerances(m.dtype, m.shape[0])
    asym, scale = (m - m.T).abs().max(), m.abs().max()
    if asym > rel_sym * scale:
        raise ValueError(f"`{name}` must be symmetric: max |K - Kᵀ| = {float(asym):.3g} "
                         f"against max |K| = {float(scale):.3g}; a kernel of one set of "
                         "inputs with itself is")


def symmetric_eigh(name: str, m: torch.Tensor, *, psd: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ``(n,)`` ascending and eigenvectors ``(n, n)`` of a symmetric matrix.

    With ``psd=True`` eigenvalues below ``-√eps·λ_max`` are an error and the rest are
    clipped at zero.
    """
    check_symmetric(name, m)
    n = m.shape[0]
    rel_sym, _ = tolerances(m.dtype, n)
    values, vectors = torch.linalg.eigh(symmetrize(m))
    if psd and n:
        top = values[-1].clamp_min(0)
        if values[0] < -rel_sym * top or (top == 0 and values[0] < 0):
            raise ValueError(f"`{name}` must be positive semi-definite: its smallest eigenvalue "
                             f"is {float(values[0]):.3g} against the largest "
                             f"{float(values[-1]):.3g}; a kernel matrix J Jᵀ has none below "
                             "rounding")
        values = values.clamp_min(0)
    return values, vectors


def eigenvalues(k: torch.Tensor) -> torch.Tensor:
    """All eigenvalues of a kernel's symmetrised matrix view, descending (no checks)."""
    if k.dim() == 3:
        # The union of the O per-output spectra, at O·N³ not (O·N)³.
        values = torch.linalg.eigvalsh(per_output_blocks(symmetrize(k))).reshape(-1)
    else:
        values = torch.linalg.eigvalsh(symmetrize(as_matrix(k)))
    return values.sort(descending=True).values


def null_mask(values: torch.Tensor) -> torch.Tensor:
    """Eigenvalues that count as zero: at most ``n·eps·λ_max``."""
    if values.numel() == 0:
        return values.bool()
    _, rel_rank = tolerances(values.dtype, values.numel())
    return values <= rel_rank * values.max().clamp_min(0)


def inverse_filter(values: torch.Tensor, shift: float) -> torch.Tensor:
    """``1/(λ + shift)``; with ``shift = 0`` the pseudo-inverse's ``1/λ`` off the null space."""
    if shift > 0:
        return 1 / (values + shift)
    null = null_mask(values)
    safe = torch.where(null, torch.ones_like(values), values)
    return torch.where(null, torch.zeros_like(values), 1 / safe)


@dataclass(frozen=True)
class Targets:
    """Labels as the right-hand side ``(R, C)`` of a kernel's matrix, and back."""

    n_out: int | None
    vector: bool  # labels were given as (N,)

    @staticmethod
    def read(name: str, y: object, n: int, n_out: int | None,
             like: torch.Tensor) -> tuple[Targets, torch.Tensor]:
        """The layout of ``y`` and ``y`` as ``(N, C)`` or ``(N·O, 1)`` in ``like``'s dtype."""
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"`{name}` must be a tensor of shape (N,) or (N, O), "
                            f"got {describe(y)}")
        if n_out is None:
            expected = "(N,) or (N, C)"
        else:
            expected = f"(N, {n_out})" + (" or (N,)" if n_out == 1 else "")
        if y.dim() not in (1, 2) or y.shape[0] != n:
            raise ValueError(f"`{name}` must have shape {expected} with N = {n} to match the "
                             f"kernel, got {tuple(y.shape)}")
        fits_full = (y.dim() == 2 and y.shape[1] == n_out) or (y.dim() == 1 and n_out == 1)
        if n_out is not None and not fits_full:
            raise ValueError(f"`{name}` must have shape {expected} for a full kernel with "
                             f"O = {n_out}, got {tuple(y.shape)}")
        if y.device != like.device:
            raise ValueError(f"`{name}` must be on the kernel's device {like.device}, "
                             f"got {y.device}")
        y = y.to(like.dtype)
        if not torch.isfinite(y).all():
            raise ValueError(f"`{name}` has non-finite entries (NaN/inf)")
        layout = Targets(n_out=n_out, vector=y.dim() == 1)
        rhs = y.reshape(-1, 1) if (n_out is not None or y.dim() == 1) else y
        return layout, rhs

    def write(self, m: torch.Tensor, rows: int) -> torch.Tensor:
        """A right-hand side ``(R·O, C)`` back in the labels' layout, ``rows = R``."""
        if self.vector:
            return m.reshape(rows)
        if self.n_out is not None:
            return m.reshape(rows, self.n_out)
        return m
