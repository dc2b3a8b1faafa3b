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

Convolutions (zero padding, any stride and dilation) keep one entry per pair of pixels
``(p, p')``; a ``kh × kw`` convolution with stride ``s`` sums the state over the patch
offsets ``δ`` along the diagonal, ``Σ_z(p, p') = m² s² n Σ_δ K(s·p+δ, s·p'+δ) + m_b² s_b²``
and likewise for ``Θ`` (CNN-GP of Novak et al. 2019, CNTK of Arora et al. 2019; pixels in
the zero padding contribute 0). Average pooling is a linear map ``g`` of each channel's
pixels, the same for all channels, so it maps both pixels of every pair:
``K(p, p') -> Σ_qq' g(p, q) g(p', q') K(q, q')``. Flattening keeps the pixel diagonal,
since a dense layer after it has separate weights per pixel.

Joins: the sum of two branches whose cross-covariance vanishes (one ends in a linear layer
with weights of its own, zero-mean and independent of the other branch) adds their
states; concatenation along channels averages them weighted by channel counts;
multiplying by a constant ``a`` multiplies both kernels by ``a²``. LayerNorm over the
features of Gaussian pre-activations tends to ``z/√(K(x, x) + ε)``: the channel mean
vanishes and the variance concentrates (Yang 2019, Tensor Programs I).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ntk_torch.analytic._limit import Kernel
from ntk_torch.analytic.activations import Dual, derivative_product

__all__ = ["activation", "adaptive_avg_pool2d", "add", "avg_pool2d", "concatenate", "conv2d",
           "dense", "flatten", "global_average_pool", "identity", "input_kernel", "layer_norm",
           "output", "pixel_linear", "scale", "serial"]

Layer = Callable[[Kernel], Kernel]


def input_kernel(x1: torch.Tensor, x2: torch.Tensor | None = None) -> Kernel:
    """The state of the inputs: ``K = x·x'/d`` for ``(N, d)``, pixel pairs for ``(N, C, H, W)``.

    ``Θ = 0`` (inputs have no parameters); ``channels`` is ``d`` or ``C``. Sequences
    ``(N, C, L)`` are images of height 1, ``(N, C, 1, L)``.

    Example:
        >>> import torch
        >>> input_kernel(torch.ones(2, 4)).nngp
        tensor([[1., 1.],
                [1., 1.]])
    """
    same = x2 is None
    x2 = x1 if same else x2
    if x1.dim() == 3:
        x1, x2 = x1.unsqueeze(2), x2.unsqueeze(2)
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
    raise ValueError("inputs must have shape (N, features), (N, channels, length) or "
                     f"(N, channels, height, width), got {tuple(x1.shape)}")


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


def _conv_size(size: int, pads: int, kernel: int, dilation: int, stride: int) -> int:
    return (size + pads - dilation * (kernel - 1) - 1) // stride + 1


def _patch_sum(t: torch.Tensor, kernel_size: tuple[int, int], padding: tuple[int, int, int, int],
               dilation: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """``Σ_δ t[..., s·p+δ, s·p'+δ]`` over a zero-padded patch, on the last 4 dims (H, W, H, W)."""
    (kh, kw), (top, bottom, left, right), (dh, dw), (sh, sw) = (kernel_size, padding, dilation,
                                                                 stride)
    h, w = t.shape[-4], t.shape[-3]
    ho = _conv_size(h, top + bottom, kh, dh, sh)
    wo = _conv_size(w, left + right, kw, dw, sw)
    if ho < 1 or wo < 1:
        raise ValueError(f"a {kh}x{kw} convolution with padding {padding} and dilation "
                         f"{dilation} does not fit images of size {(h, w)}")
    padded = F.pad(t, (left, right, top, bottom, left, right, top, bottom))
    out = t.new_zeros(*t.shape[:-4], ho, wo, ho, wo)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
            cols = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
            out += padded[..., rows, cols, rows, cols]
    return out


def conv2d(in_channels: int, out_channels: int, kernel_size: tuple[int, int],
           padding: tuple[int, int, int, int], multiplier: float, init_std: float,
           bias_multiplier: float = 0.0, bias_init_std: float = 0.0, *,
           dilation: tuple[int, int] = (1, 1), stride: tuple[int, int] = (1, 1),
           weight_trainable: bool = True, bias_trainable: bool = True) -> Layer:
    """Convolution with zero ``padding = (top, bottom, left, right)``, ``stride`` and ``dilation``.

    ``Σ_z(p, p') = m² s² n Σ_δ K(s·p+δ, s·p'+δ) + m_b² s_b²`` with ``n = in_channels``,
    ``s`` the stride and ``δ`` over the (dilated) ``kh × kw`` patch; ``Θ_z`` as in
    :func:`dense` with the same patch sum. Output size ``⌊(H + pads - d(k-1) - 1)/s⌋ + 1``
    as in ``nn.Conv2d``.

    Example:
        >>> import torch
        >>> x = torch.ones(1, 1, 3, 3)
        >>> k = conv2d(1, 4, (3, 3), (1, 1, 1, 1), 1.0, 1.0)(input_kernel(x))
        >>> float(k.nngp[0, 0, 1, 1, 1, 1]), float(k.nngp[0, 0, 0, 0, 0, 0])  # 9 and 4 pixels
        (9.0, 4.0)
        >>> conv2d(1, 4, (3, 3), (1, 1, 1, 1), 1.0, 1.0, stride=(2, 2))(input_kernel(x)).spatial
        (2, 2)
    """
    def layer(k: Kernel) -> Kernel:
        if k.spatial is None:
            raise ValueError("a convolution needs inputs of shape (N, C, H, W) or (N, C, L), "
                             "but the previous layers give vectors")
        _require_channels(k, in_channels, "this convolution")
        summed = lambda t: _patch_sum(t, kernel_size, padding, dilation, stride)  # noqa: E731
        (h, w), (kh, kw), (dh, dw), (sh, sw) = k.spatial, kernel_size, dilation, stride
        spatial = (_conv_size(h, padding[0] + padding[1], kh, dh, sh),
                   _conv_size(w, padding[2] + padding[3], kw, dw, sw))
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
        ntk = derivative.mul_(k.ntk if k.ntk_product == 0 else k.ntk - k.ntk_product * k.nngp)
        if k.ntk_product != 0:
            if math.isnan(k.ntk_product):
                raise ValueError(f"the activation {dual.name} follows the sum of a LayerNorm "
                                 "with a trainable gain and another branch; each channel's "
                                 "tangent kernel then has a random part that no rule "
                                 "follows through the activation: put a linear layer "
                                 "between them, or estimate the kernel by Monte Carlo")
            # The gain's term g·z_i(x) z_i(x') meets φ'(z_i(x)) φ'(z_i(x')): E[ψ(u) ψ(v)]
            # with ψ(u) = u φ'(u).
            product, _ = derivative_product(dual)(k.nngp, v1, v2, False)
            ntk.add_(product, alpha=k.ntk_product)
        cov1, _ = dual(k.cov1, s1, s2, False)
        if k.cov2 is k.cov1:
            cov2 = cov1
        else:
            if k.spatial is not None:
                s1, s2 = d2[:, :, :, None, None], d2[:, None, None, :, :]
            else:
                s1 = s2 = d2
            cov2, _ = dual(k.cov2, s1, s2, False)
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=False,
                         ntk_product=0.0)

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


def _pixel_pairs(t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``Σ_qq' g(p, q) g(p', q') t[..., q, q']`` for ``g`` given as ``fn`` on ``(B, 1, H, W)``."""
    lead, (h, w) = t.shape[:-4], t.shape[-4:-2]
    once = fn(t.reshape(-1, 1, h, w))                                   # second pixel mapped
    ho, wo = once.shape[-2:]
    once = once.reshape(*lead, h, w, ho, wo).movedim((-4, -3), (-2, -1))
    twice = fn(once.reshape(-1, 1, h, w)).reshape(*lead, ho, wo, ho, wo)  # then the first
    return twice.movedim((-4, -3), (-2, -1))


def pixel_linear(fn: Callable[[torch.Tensor], torch.Tensor], what: str) -> Layer:
    """A linear map ``g`` of each channel's pixels, the same for every channel.

    ``K(p, p') -> Σ_qq' g(p, q) g(p', q') K(q, q')``, likewise ``Θ``, with ``g`` given as
    ``fn``, a map of ``(B, 1, H, W)`` images (e.g. ``F.avg_pool2d``); Gaussian states stay
    Gaussian. ``what`` names it in errors.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> x = torch.arange(4.0).reshape(1, 1, 2, 2)
        >>> k = pixel_linear(lambda t: F.avg_pool2d(t, 2), "pooling")(input_kernel(x))
        >>> float(k.nngp.squeeze())  # (mean x)² = 1.5²
        2.25
    """
    def layer(k: Kernel) -> Kernel:
        if k.spatial is None:
            raise ValueError(f"{what} needs images (N, C, H, W) or sequences (N, C, L), but "
                             "the previous layers give vectors")
        nngp = _pixel_pairs(k.nngp, fn)
        cov1 = _pixel_pairs(k.cov1, fn)
        cov2 = cov1 if k.cov2 is k.cov1 else _pixel_pairs(k.cov2, fn)
        return k.replace(nngp=nngp, ntk=_pixel_pairs(k.ntk, fn), cov1=cov1, cov2=cov2,
                         spatial=tuple(nngp.shape[-2:]))

    return layer


def avg_pool2d(kernel_size: tuple[int, int], stride: tuple[int, int],
               padding: tuple[int, int] = (0, 0), *, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor_override: int | None = None) -> Layer:
    """Average pooling with the arguments and output size of ``F.avg_pool2d``.

    Example:
        >>> import torch
        >>> k = avg_pool2d((2, 2), (2, 2))(input_kernel(torch.ones(1, 3, 4, 4)))
        >>> k.spatial, float(k.nngp[0, 0, 0, 0, 1, 1])
        ((2, 2), 1.0)
    """
    return pixel_linear(functools.partial(
        F.avg_pool2d, kernel_size=kernel_size, stride=stride, padding=padding,
        ceil_mode=ceil_mode, count_include_pad=count_include_pad,
        divisor_override=divisor_override), "average pooling")


def adaptive_avg_pool2d(output_size: tuple[int, int]) -> Layer:
    """Adaptive average pooling to ``output_size``, as ``F.adaptive_avg_pool2d``.

    Example:
        >>> import torch
        >>> adaptive_avg_pool2d((2, 3))(input_kernel(torch.ones(1, 1, 5, 7))).spatial
        (2, 3)
    """
    return pixel_linear(functools.partial(F.adaptive_avg_pool2d, output_size=output_size),
                        "adaptive average pooling")


def scale(factor: float) -> Layer:
    """``h -> a·h`` for a constant ``a``: both kernels times ``a²``.

    Example:
        >>> import torch
        >>> float(scale(-3.0)(input_kernel(torch.ones(1, 2))).nngp)
        9.0
    """
    def layer(k: Kernel) -> Kernel:
        a2 = float(factor) ** 2
        cov1 = k.cov1 * a2
        cov2 = cov1 if k.cov2 is k.cov1 else k.cov2 * a2
        return k.replace(nngp=k.nngp * a2, ntk=k.ntk * a2, cov1=cov1, cov2=cov2)

    return layer


def _same_layout(kernels: Sequence[Kernel], what: str) -> None:
    layouts = {k.spatial for k in kernels}
    if len(layouts) > 1:
        raise ValueError(f"{what} joins states of different layouts: "
                         f"{', '.join(str(k.spatial or 'vectors') for k in kernels)}")


def add(a: Kernel, b: Kernel) -> Kernel:
    """The state of ``h_a + h_b`` for branches with no covariance between them.

    ``K = K_a + K_b``, ``Θ = Θ_a + Θ_b``: the cross terms ``E[h_a h_b]`` and
    ``⟨∂h_a, ∂h_b⟩`` vanish when one branch ends in a linear layer whose zero-mean weights
    nothing in the other branch uses (as neural-tangents' ``FanInSum`` assumes); the
    caller checks that. The sum is Gaussian when both branches are.

    Example:
        >>> import torch
        >>> k = input_kernel(torch.ones(1, 2))
        >>> float(add(k, k).nngp)
        2.0
    """
    _same_layout((a, b), "the sum")
    if a.channels != b.channels:
        raise ValueError(f"the sum adds {a.channels} channels to {b.channels}")
    same = a.cov2 is a.cov1 and b.cov2 is b.cov1
    cov1 = a.cov1 + b.cov1
    product = 0.0 if a.ntk_product == 0 and b.ntk_product == 0 else math.nan
    return Kernel(a.nngp + b.nngp, a.ntk + b.ntk, cov1, cov1 if same else a.cov2 + b.cov2,
                  channels=a.channels, spatial=a.spatial,
                  is_gaussian=a.is_gaussian and b.is_gaussian, ntk_product=product)


def concatenate(parts: Sequence[Kernel]) -> Kernel:
    """The state of channels concatenated: the mean over all channels, weighted by counts.

    ``K = Σ_g n_g K_g / Σ_g n_g`` and likewise ``Θ``: exact for what sums over channels
    (linear layers, the output), not for activations, which need each part's own
    variances (apply them to the parts).

    Example:
        >>> import torch
        >>> a, b = input_kernel(torch.ones(1, 1)), input_kernel(torch.zeros(1, 3))
        >>> k = concatenate([a, b])
        >>> k.channels, float(k.nngp)
        (4, 0.25)
    """
    if len(parts) == 1:
        return parts[0]
    _same_layout(parts, "concatenation")
    n = sum(p.channels for p in parts)
    mix = lambda get: sum(get(p) * (p.channels / n) for p in parts)  # noqa: E731
    cov1 = mix(lambda p: p.cov1)
    same = all(p.cov2 is p.cov1 for p in parts)
    return Kernel(mix(lambda p: p.nngp), mix(lambda p: p.ntk), cov1,
                  cov1 if same else mix(lambda p: p.cov2), channels=n, spatial=parts[0].spatial)


def layer_norm(features: int, eps: float, *, weight_trainable: bool = True,
               bias_trainable: bool = True) -> Layer:
    """``y = γ ⊙ (z - mean_i z)/√(var_i z + ε) + β`` over a vector's features, at its init.

    With ``γ = 1``, ``β = 0`` (``nn.LayerNorm``'s initialisation) and Gaussian zero-mean
    pre-activations ``z``, the channel mean vanishes and the variance tends to
    ``K(x, x)``: ``y = z/s(x)``, ``s(x) = √(K(x, x) + ε)``. So

        Σ_y = K/(s s'),    Θ_y = Θ/(s s') + Σ_y [γ trainable] + 1 [β trainable];

    the gradients of the mean and the variance are ``O(1/n)`` per channel. The gain's
    term is ``y_i(x) y_i(x')`` per channel, recorded in ``ntk_product`` for an activation
    that follows.

    Example:
        >>> import torch
        >>> x = torch.tensor([[3.0, 4.0]])
        >>> k = layer_norm(5, 0.0)(dense(2, 5, 1.0, 1.0)(input_kernel(x)))
        >>> float(k.nngp), float(k.ntk)  # diagonal 1; Θ = 25/25 + 1 + 1
        (1.0, 3.0)
    """
    def layer(k: Kernel) -> Kernel:
        _require_vector(k, "LayerNorm")
        _require_channels(k, features, "this LayerNorm")
        if not k.is_gaussian:
            raise ValueError("LayerNorm needs Gaussian pre-activations (the output of a linear "
                             "layer, or sums of them): the channel mean of other features "
                             "does not vanish and has no rule here")
        s1 = (k.cov1 + eps).sqrt()
        s2 = s1 if k.cov2 is k.cov1 else (k.cov2 + eps).sqrt()
        norms = s1[:, None] * s2[None, :]
        nngp = k.nngp / norms
        ntk = k.ntk / norms
        if weight_trainable:
            ntk = ntk + nngp
        if bias_trainable:
            ntk = ntk + 1.0
        cov1 = k.cov1 / s1.square()
        cov2 = cov1 if k.cov2 is k.cov1 else k.cov2 / s2.square()
        return Kernel(nngp, ntk, cov1, cov2, channels=features, is_gaussian=True,
                      ntk_product=k.ntk_product + float(weight_trainable))

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

