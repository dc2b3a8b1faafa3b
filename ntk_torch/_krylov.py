"""Linear algebra that touches a kernel matrix only through products ``K @ V``.

For kernels too large for memory every product streams the whole matrix once, a *pass*,
and a pass with many columns costs about as much as one with a single column. So both
algorithms here advance a block of vectors per pass and count passes as their cost:

* ``_krylov_solve.solve_pcg``: ``(K + ridge·I) X = B`` by conjugate gradients on all
  columns at once, preconditioned by a randomized Nyström approximation of ``K``;
* ``_krylov_eigen.top_eigenpairs``: the leading eigenpairs by thick-restarted block Lanczos.

This module holds what both share: the operator protocol, a dense operator, and the
orthonormal blocks they grow.

Vectors are ``(n, C)`` float64 on the operator's device; ``n`` is the operator's size.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ntk_torch._checks import describe
from ntk_torch._kernel_matrix import check_symmetric

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
        """``K @ v`` for ``v`` ``(n, C)`` float64, returned ``(n, C)`` float64.

        Accumulated in float64; one call is one pass over ``K``.
        """
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
                            f"got {describe(matrix)}")
        if matrix.dim() != 2:
            raise ValueError(f"`{name}` must have shape (n, n), got {tuple(matrix.shape)}")
        check_symmetric(name, matrix)
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


def random_block(n: int, c: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``(n, c)`` standard normal float64 entries from ``generator``, on ``device``."""
    # Drawn on the CPU so that a seed gives the same vectors on every device.
    return torch.randn(n, c, generator=generator, dtype=torch.float64).to(device)


def product(op: SymmetricOperator, v: torch.Tensor, sketch: bool = False) -> torch.Tensor:
    """``K @ v`` in float64 (``op.sketch`` if ``sketch`` and it has one), shape checked."""
    out = getattr(op, "sketch", op.matmul)(v) if sketch else op.matmul(v)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(v.shape):
        raise ValueError(f"`op.matmul` must return a tensor of shape {tuple(v.shape)}, "
                         f"got {describe(out)}")
    return out.to(torch.float64)


def extend_basis(block: torch.Tensor, basis: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
    """Orthonormal ``(n, c)`` columns orthogonal to ``basis`` ``(n, m)``.

    They span the part of ``block`` ``(n, c)`` outside the basis; directions lost to
    rounding are drawn at random.

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
        block[:, weak] = random_block(block.shape[0], int(weak.sum()), generator, block.device)
        reference[weak] = block[:, weak].norm(dim=0)
    raise RuntimeError("could not extend the Krylov basis with independent directions")


def sign_fixed(vectors: torch.Tensor) -> torch.Tensor:
    """Each column's largest-magnitude entry made positive, as in ``ntk_torch.eigenmodes``."""
    peak = vectors.gather(0, vectors.abs().argmax(0, keepdim=True))
    return vectors * torch.where(peak < 0, -1.0, 1.0).to(vectors.dtype)
