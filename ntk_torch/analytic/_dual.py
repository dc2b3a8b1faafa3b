"""The dual of an activation ``φ`` and the clamped correlation every dual starts from.

A dual gives the Gaussian expectations of ``φ(u)φ(v)`` and ``φ'(u)φ'(v)`` (definitions in
:mod:`ntk_torch.analytic.activations`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor

__all__ = ["Dual", "correlation"]


@dataclass(frozen=True)
class Dual:
    """``(c, v1, v2) -> (E[φ(u)φ(v)], E[φ'(u)φ'(v)])`` for one activation ``φ``.

    The results are fresh tensors of the broadcast shape, which callers may modify in place.

    Attributes:
        name: what it is, for messages and ``repr``.
        fn: ``(c, v1, v2, need_derivative) -> (T, T' or None)`` on broadcastable tensors.
        phi: the activation itself, an elementwise tensor function, where known.
        homogeneous: whether ``φ(a u) = a φ(u)`` for ``a > 0`` (ReLU-like), so that
            ``u φ'(u) = φ(u)``.
    """

    name: str
    fn: Callable[[Tensor, Tensor, Tensor, bool], tuple[Tensor, Tensor | None]] = field(repr=False)
    phi: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)
    homogeneous: bool = field(default=False, repr=False)

    def __call__(self, c: Tensor, v1: Tensor, v2: Tensor,
                 need_derivative: bool = True) -> tuple[Tensor, Tensor | None]:
        """Expectations over ``(u, v) ~ N(0, [[v1, c], [c, v2]])``, broadcast shapes.

        Example:
            >>> import torch
            >>> from ntk_torch.analytic.activations import relu
            >>> t, dt = relu(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0))
            >>> float(t), float(dt)  # E[relu(u)²] = 1/2, P(u > 0) = 1/2
            (0.5, 0.5)
        """
        return self.fn(c, v1, v2, need_derivative)


def correlation(c: Tensor, v1: Tensor, v2: Tensor) -> tuple[Tensor, Tensor]:
    """``√(v1 v2)`` and ``ρ = c/√(v1 v2)`` clamped into ``[-1, 1]``, ``0/0 -> 0``; fresh tensors.

    The clamped covariance is ``ρ·√(v1 v2)``. The closed forms below work in place on
    these to avoid full-size temporaries: on a large grid every fresh tensor costs page
    faults, which dominate the few flops per entry.
    """
    # √v1 · √v2: square roots of the (small) variance tensors, one full-size product.
    norms = torch.mul(v1.sqrt(), v2.sqrt())
    rho = torch.div(c, norms)
    if norms.shape != rho.shape:  # c broadcasts further than the variances
        norms = norms.expand_as(rho).clone()
    if not (bool((v1 > 0).all()) and bool((v2 > 0).all())):  # zero-norm inputs: 0/0
        rho.nan_to_num_(nan=0.0)
    rho.clamp_(-1.0, 1.0)
    # An input paired with itself (or its negative) has ρ = ±1 up to rounding (c and v are
    # summed in different orders), and arccos turns 1 - ε into θ ≈ √(2ε) ≈ 2e-8: T' of
    # ReLU-like activations would be off by 1e-9 there and depend on the blocking. Snap to
    # exactly ±1 within 16 ulps, which moves near-parallel pairs by no more than rounding.
    edge = rho.abs() > 1 - 16 * torch.finfo(rho.dtype).eps
    if bool(edge.any()):
        rho[edge] = rho[edge].sign()
    return norms, rho
