"""Layers as pure ``Kernel -> Kernel`` maps of the infinite-width NNGP and NTK.

State convention: between layers a :class:`Kernel` holds, for the current
representation ``h`` with ``n = channels`` channels, the mean over channels
``K = (1/n) Σ_i h_i(x) h_i(x')`` (``nngp``) and the per-channel tangent kernel
``Θ = ⟨∂h_i(x)/∂θ, ∂h_i(x')/∂θ⟩`` (``ntk``, the same for every channel in the limit).
A layer ``z = m · W h + m_b · b`` with raw ``W ~ N(0, s²)``, ``b ~ N(0, s_b²)`` (see
:mod:`ntk_torch.nn`) then maps, by the law of large numbers over its ``n`` inputs,

    Σ_z = m² s² n K + m_b² s_b²,
    Θ_z = m² n K  +  m_b²  +  m² s² n Θ,

where the first two NTK terms are the gradients with respect to ``W`` and ``b`` and the
last is the back-propagated kernel of the earlier layers (Jacot et al. 2018; Lee et al.
2019). With the NTK parameterization (``m = σ_w/√n``, ``s = 1``) this is the familiar
``Σ = σ_w² K + σ_b²``, ``Θ = Σ + σ_w² Θ_prev``; with the standard one (``m = 1``,
``s = σ_w/√n``) the ``n K`` term grows with the width, so these maps take the actual ``n``.
An activation ``φ`` maps Gaussian pre-activations by its dual (``activations.py``):
``K = T(Σ)``, ``Θ = T'(Σ) · Θ_z``.

Convolutions (stride 1, zero padding) keep one entry per pair of pixels ``(p, p')``; a
``kh × kw`` convolution sums the state over the patch offsets ``δ`` along the diagonal,
``Σ_z(p, p') = m² s² n Σ_δ K(p+δ, p'+δ) + m_b² s_b²`` and likewise for ``Θ`` (CNN-GP of
Novak et al. 2019, CNTK of Arora et al. 2019; pixels in the zero padding contribute 0).
Global average pooling averages over all pixel pairs; flattening keeps the pixel
diagonal, since a dense layer after it has separate weights per pixel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ntk_torch.analytic._limit import Kernel
from ntk_torch.analytic.activations import Dual

__all__ = ["activation", "conv2d", "dense", "flatten", "global_average_pool", "identity",
           "input_kernel", "output", "serial"]

Layer = Callable[[Kernel], Kernel]


def input_kernel(x1: torch.Tensor, x2: torch.Tensor | None = None) -> Kernel:
    """The state of the inputs: ``K = x·x'/d`` for ``(N, d)``, pixel pairs for ``(N, C, H, W)``.

    ``Θ = 0`` (inputs have no parameters); ``channels`` is ``d`` or ``C``.

    Example:
        >>> import torch
        >>> input_kernel(torch.ones(2, 4)).nngp
        tensor([[1., 1.],
                [1., 1.]])
    """
    same = x2 is None
    x2 = x1 if same else x2
    if x1.dim() == 2:
        d = x1.shape[1]
        nngp = x1 @ x2.T / d
        cov1 = (x1 * x1).sum(1) / d
        cov2 = cov1 if same else (x2 * x2).sum(1) / d
        return Kernel(nngp, torch.zeros_like(nngp), cov1, cov2, channels=d)
    if x1.dim() == 4:
        c, h, w = x1.shape[1:]
        nngp = torch.einsum("achw,bcij->abhwij", x1, x2) / c
        cov1 = torch.einsum("achw,acij->ahwij", x1, x1) / c
        cov2 = cov1 if same else torch.einsum("achw,acij->ahwij", x2, x2) / c
        return Kernel(nngp, torch.zeros_like(nngp), cov1, cov2, channels=c, spatial=(h, w))
    raise ValueError("inputs must have shape (N, features) or (N, channels, height, width), "
                     f"got {tuple(x1.shape)}")


def _require_vector(k: Kernel, what: str) -> None:
    if k.spatial is not None:
        raise ValueError(f"{what} needs vector inputs, but the previous layers give images of "
                         f"{k.channels} channels and size {k.spatial}; put nn.Flatten() or "
                         "global average pooling before it")


def _require_channels(k: Kernel, expected: int, what: str) -> None:
    if k.channels != expected:
        raise ValueError(f"{what} expects {expected} input features, but the previous layers "
                         f"give {k.channels}")


def _affine(k: Kernel, summed: Callable[[torch.Tensor], torch.Tensor], n: int, out: int,
            multiplier: float, init_std: float, bias_multiplier: float, bias_init_std: float,
            weight_trainable: bool, bias_trainable: bool,
            spatial: tuple[int, int] | None) -> Kernel:
    forward = multiplier ** 2 * init_std ** 2 * n
    bias_var = bias_multiplier ** 2 * bias_init_std ** 2
    # In place on fresh tensors: on large grids new full-size tensors cost more than flops.
    k_sum = summed(k.nngp)
    nngp = torch.mul(k_sum, forward).add_(bias_var)
    ntk = torch.mul(summed(k.ntk), forward)
    if weight_trainable:
        ntk.add_(k_sum, alpha=multiplier ** 2 * n)
    if bias_trainable:
        ntk.add_(bias_multiplier ** 2)
    cov1 = torch.mul(summed(k.cov1), forward).add_(bias_var)
    cov2 = cov1 if k.cov2 is k.cov1 else torch.mul(summed(k.cov2), forward).add_(bias_var)
    return Kernel(nngp, ntk, cov1, cov2, channels=out, spatial=spatial, is_gaussian=True)


def dense(in_features: int, out_features: int, multiplier: float, init_std: float,
          bias_multiplier: float = 0.0, bias_init_std: float = 0.0, *,
          weight_trainable: bool = True, bias_trainable: bool = True) -> Layer:
    """``z = m · W h + m_b · b``, ``W ~ N(0, s²)``, ``b ~ N(0, s_b²)`` on vectors.

    ``Σ_z = m² s² n K + m_b² s_b²``, ``Θ_z = m² n K + m_b² + m² s² n Θ`` with
    ``n = in_features``; a frozen weight or bias (``*_trainable=False``) drops its NTK
    term; no bias is ``bias_multiplier = 0``.

    Example:
        >>> import torch
        >>> k = dense(2, 5, 1.0, 1.0)(input_kernel(torch.tensor([[1.0, 1.0]])))
        >>> float(k.nngp), float(k.ntk)  # m² s² x·x' = 2 and m² x·x' = 2
        (2.0, 2.0)
    """
    def layer(k: Kernel) -> Kernel:
        _require_vector(k, "a dense layer")
        _require_channels(k, in_features, "this dense layer")
        return _affine(k, lambda t: t, in_features, out_features, multiplier, init_std,
                       bias_multiplier, bias_init_std, weight_trainable, bias_trainable, None)

    return layer


def _patch_sum(t: torch.Tensor, kernel_size: tuple[int, int], padding: tuple[int, int, int, int],
               dilation: tuple[int, int]) -> torch.Tensor:
    """``Σ_δ t[..., p+δ, p'+δ]`` over a zero-padded patch, on the last four dims (H, W, H, W)."""
    (kh, kw), (top, bottom, left, right), (dh, dw) = kernel_size, padding, dilation
    h, w = t.shape[-4], t.shape[-3]
    ho, wo = h + top + bottom - dh * (kh - 1), w + left + right - dw * (kw - 1)
    if ho < 1 or wo < 1:
        raise ValueError(f"a {kh}x{kw} convolution with padding {padding} does not fit images "
                         f"of size {(h, w)}")
    padded = F.pad(t, (left, right, top, bottom, left, right, top, bottom))
    out = t.new_zeros(*t.shape[:-4], ho, wo, ho, wo)
    for i in range(kh):
        for j in range(kw):
            a, b = i * dh, j * dw
            out += padded[..., a:a + ho, b:b + wo, a:a + ho, b:b + wo]
    return out


def conv2d(in_channels: int, out_channels: int, kernel_size: tuple[int, int],
           padding: tuple[int, int, int, int], multiplier: float, init_std: float,
           bias_multiplier: float = 0.0, bias_init_std: float = 0.0, *,
           dilation: tuple[int, int] = (1, 1), weight_trainable: bool = True,
           bias_trainable: bool = True) -> Layer:
    """Stride-1 convolution with zero ``padding = (top, bottom, left, right)``.

    ``Σ_z(p, p') = m² s² n Σ_δ K(p+δ, p'+δ) + m_b² s_b²`` with ``n = in_channels`` and
    ``δ`` over the ``kh × kw`` patch; ``Θ_z`` as in :func:`dense` with the same patch sum.

    Example:
        >>> import torch
        >>> x = torch.ones(1, 1, 3, 3)
        >>> k = conv2d(1, 4, (3, 3), (1, 1, 1, 1), 1.0, 1.0)(input_kernel(x))
        >>> float(k.nngp[0, 0, 1, 1, 1, 1]), float(k.nngp[0, 0, 0, 0, 0, 0])  # 9 and 4 pixels
        (9.0, 4.0)
    """
    def layer(k: Kernel) -> Kernel:
        if k.spatial is None:
            raise ValueError("a 2-d convolution needs inputs of shape (N, C, H, W), but the "
                             "previous layers give vectors")
        _require_channels(k, in_channels, "this convolution")
        summed = lambda t: _patch_sum(t, kernel_size, padding, dilation)  # noqa: E731
        h, w = k.spatial
        (kh, kw), (dh, dw) = kernel_size, dilation
        spatial = (h + padding[0] + padding[1] - dh * (kh - 1),
                   w + padding[2] + padding[3] - dw * (kw - 1))
        return _affine(k, summed, in_channels, out_channels, multiplier, init_std,
                       bias_multiplier, bias_init_std, weight_trainable, bias_trainable, spatial)

    return layer


def _pixel_diagonal(t: torch.Tensor, spatial: tuple[int, int], batch_dims: int) -> torch.Tensor:
    """``t[..., p, p]`` of a ``(*batch, H, W, H, W)`` tensor as ``(*batch, H, W)``."""
    h, w = spatial
    flat = t.reshape(*t.shape[:batch_dims], h * w, h * w)
    return flat.diagonal(dim1=-2, dim2=-1).reshape(*t.shape[:batch_dims], h, w)


def activation(dual: Dual) -> Layer:
    """``h = φ(z)`` elementwise: ``K = T(Σ_z)``, ``Θ = T'(Σ_z) Θ_z`` (see ``activations.py``).

    Example:
        >>> import torch
        >>> from ntk_torch.analytic.activations import relu
        >>> k = activation(relu)(dense(1, 3, 1.0, 1.0)(input_kernel(torch.tensor([[2.0]]))))
        >>> float(k.nngp), float(k.ntk)  # E[relu(u)²] = 4/2, P(u > 0) · 4 = 2
        (2.0, 2.0)
    """
    def layer(k: Kernel) -> Kernel:
        if not k.is_gaussian:
            raise ValueError(f"the activation {dual.name} needs Gaussian pre-activations: put "
                             "it right after a dense or convolutional layer (or global "
                             "average pooling of one), not after another activation, a "
                             "flatten of images or the raw inputs")
        if k.spatial is None:
            d1, d2 = k.cov1, k.cov2
            v1, v2 = d1[:, None], d2[None, :]
            s1 = s2 = d1
        else:
            d1 = _pixel_diagonal(k.cov1, k.spatial, 1)
            d2 = d1 if k.cov2 is k.cov1 else _pixel_diagonal(k.cov2, k.spatial, 1)
            v1, v2 = d1[:, None, :, :, None, None], d2[None, :, None, None, :, :]
            s1, s2 = d1[:, :, :, None, None], d1[:, None, None, :, :]
        nngp, derivative = dual(k.nngp, v1, v2, True)
        cov1, _ = dual(k.cov1, s1, s2, False)
        if k.cov2 is k.cov1:
            cov2 = cov1
        else:
            if k.spatial is not None:
                s1, s2 = d2[:, :, :, None, None], d2[:, None, None, :, :]
            else:
                s1 = s2 = d2
            cov2, _ = dual(k.cov2, s1, s2, False)
        return k.replace(nngp=nngp, ntk=derivative.mul_(k.ntk), cov1=cov1, cov2=cov2,
                         is_gaussian=False)

    return layer


def flatten() -> Layer:
    """``(N, C, H, W) -> (N, C·H·W)``: keeps the pixel diagonal ``K(p, p)``, averaged.

    A dense layer after it has separate weights per pixel, so only ``p = p'`` pairs
    survive: ``K_flat = (1/(HW)) Σ_p K(p, p)`` over ``C·H·W`` channels. On vectors it is
    the identity.

    Example:
        >>> import torch
        >>> k = flatten()(input_kernel(torch.ones(1, 2, 3, 3)))
        >>> k.channels, k.nngp.shape
        (18, torch.Size([1, 1]))
    """
    def layer(k: Kernel) -> Kernel:
        if k.spatial is None:
            return k
        hw = k.spatial[0] * k.spatial[1]
        diag = lambda t, b: _pixel_diagonal(t, k.spatial, b).flatten(b).mean(-1)  # noqa: E731
        cov1 = diag(k.cov1, 1)
        cov2 = cov1 if k.cov2 is k.cov1 else diag(k.cov2, 1)
        # A single pixel stays one Gaussian; several pixels have different variances.
        return Kernel(diag(k.nngp, 2), diag(k.ntk, 2), cov1, cov2, channels=k.channels * hw,
                      spatial=None, is_gaussian=k.is_gaussian and hw == 1)

    return layer


def global_average_pool() -> Layer:
    """``h_c = mean_p h_c(p)``: averages the state over all pixel pairs, to a 1x1 image.

    Example:
        >>> import torch
        >>> x = torch.arange(4.0).reshape(1, 1, 2, 2)
        >>> float(global_average_pool()(input_kernel(x)).nngp.squeeze())  # (mean x)² = 1.5²
        2.25
    """
    def layer(k: Kernel) -> Kernel:
        if k.spatial is None:
            raise ValueError("global average pooling needs images (N, C, H, W), but the "
                             "previous layers give vectors")
        pool = lambda t: t.mean(dim=(-4, -3, -2, -1), keepdim=True)  # noqa: E731
        cov1 = pool(k.cov1)
        cov2 = cov1 if k.cov2 is k.cov1 else pool(k.cov2)
        return k.replace(nngp=pool(k.nngp), ntk=pool(k.ntk), cov1=cov1, cov2=cov2, spatial=(1, 1))

    return layer


def identity() -> Layer:
    """The identity map (``nn.Identity``, dropout at inference or in the limit)."""
    return lambda k: k


def serial(*layers: Layer) -> Layer:
    """Composition, applied left to right."""
    def layer(k: Kernel) -> Kernel:
        for f in layers:
            k = f(k)
        return k

    return layer


def output(k: Kernel) -> Kernel:
    """The per-output result ``(N1, N2)``: image outputs average their pixel diagonal.

    A model returning ``(N, C, H, W)`` has ``O = C·H·W`` outputs; the mean over them of
    ``f_o(x) f_o(x')`` is the flattened state, matching ``mode="trace"``.
    """
    k = flatten()(k)
    return Kernel(k.nngp, k.ntk)

