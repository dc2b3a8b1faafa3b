"""The :class:`Kernel` that analytic layers map to one another."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

__all__ = ["Kernel"]


@dataclass(frozen=True)
class Kernel:
    """Infinite-width NNGP and NTK of a network on inputs ``x1`` (``N1``) and ``x2`` (``N2``).

    The public result of :func:`ntk_torch.analytic.kernel` and
    :func:`ntk_torch.analytic.mlp_kernel` has ``nngp`` and ``ntk`` of shape ``(N1, N2)``:
    the per-output kernels, i.e. what the mean over outputs of the empirical kernels
    (``mode="trace"``) converges to. The other fields describe the state between layers.

    Attributes:
        nngp: ``Σ(x1_a, x2_b)``, the covariance of one output (or, between layers, the mean
            over channels of the features' inner products): ``(N1, N2)``; between spatial
            layers ``(N1, N2, H, W, H, W)``, one entry per pair of pixels.
        ntk: ``Θ(x1_a, x2_b)``, same shape as ``nngp``.
        cov1: ``Σ(x1_a, x1_a)``: ``(N1,)`` or ``(N1, H, W, H, W)``; ``None`` in results.
        cov2: ``Σ(x2_b, x2_b)``: ``(N2,)`` or ``(N2, H, W, H, W)``; ``None`` in results.
        channels: number of channels (features) the state describes, the fan-in of the next
            layer; the standard and muP parameterizations need it at the model's widths.
        spatial: ``(H, W)`` between convolutional layers, ``None`` for vectors.
        is_gaussian: whether the entries are jointly Gaussian pre-activations (after a dense
            or convolutional layer), which activations require.
        ntk_product: ``g`` when each channel's tangent kernel is ``Θ₀ + g · z_i(x) z_i(x')``
            with ``z`` the state itself (a trainable LayerNorm gain adds ``g = 1``): the
            channel mean ``ntk = Θ₀ + g · nngp`` is all a linear layer needs, but an
            activation weighs the product term by its own derivative. NaN when the term
            is not of that form (after adding such a state to another branch).

    Example:
        >>> import torch
        >>> k = Kernel(nngp=torch.eye(2), ntk=2 * torch.eye(2))
        >>> k.ntk.shape
        torch.Size([2, 2])
    """

    __module__ = "ntk_torch.analytic"  # its public home, which pickles record

    nngp: torch.Tensor
    ntk: torch.Tensor
    cov1: torch.Tensor | None = None
    cov2: torch.Tensor | None = None
    channels: int | None = None
    spatial: tuple[int, int] | None = None
    is_gaussian: bool = False
    ntk_product: float = 0.0

    def replace(self, **changes: object) -> Kernel:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def shape(self) -> tuple[int, int]:
        """``(N1, N2)``."""
        return tuple(self.nngp.shape[:2])  # type: ignore[return-value]
