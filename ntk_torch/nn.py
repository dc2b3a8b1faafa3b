"""Layers with an explicit parameterization, so that their infinite-width limit is known.

Every layer stores its raw weights ``W`` and bias ``b`` together with four numbers,

    z = m · W x + m_b · b,      W ~ N(0, s²),   b ~ N(0, s_b²),

a weight multiplier ``m`` (:attr:`Dense.multiplier`), an init std ``s``
(:attr:`Dense.init_std`), and the same pair ``m_b, s_b`` for the bias. Gradient descent
acts on ``W`` and ``b``, so the multipliers fix the tangent kernel while ``m·s`` fixes the
forward pass. :mod:`ntk_torch.analytic` reads these four numbers and treats every
parameterization the same way. With fan-in ``d`` (``in_features``, or
``in_channels · kh · kw`` for a convolution), weight std ``σ_w`` and bias std ``β``:

    parameterization  role (mup only)          m            s       m·s (forward std)
    ----------------  -----------------------  -----------  ------  -----------------
    "ntk"             any                      σ_w/√d       1       σ_w/√d
    "standard"        any                      1            σ_w/√d  σ_w/√d
    "mup"             "input", n=out_features  σ_w·√(n/d)   1/√n    σ_w/√d
    "mup"             "hidden", n=d            σ_w          1/√n    σ_w/√n
    "mup"             "readout", n=d           σ_w/√n       1/√n    σ_w/n

Biases: ``"ntk"`` has ``m_b = β, s_b = 1``; ``"standard"`` has ``m_b = 1, s_b = β`` (so
with ``β = 0`` the bias starts at zero but still trains and adds 1 to the NTK);
``"mup"`` treats the biases of input and hidden layers like input weights, ``m_b = β·√n,
s_b = 1/√n`` with ``n = out_features``, and the readout's bias, whose dimensions are all
finite, like a scalar: ``m_b = β, s_b = 1``. In every case the bias adds ``β²`` to the
forward variance.

The ``"mup"`` rows are the abc-parameterization of Yang & Hu (2021), "Tensor Programs IV:
Feature Learning in Infinite-Width Neural Networks", Table 3, for SGD with a global
learning rate that does not depend on the width (``c = 0``): with ``m = n^{-a}``,
``s ∝ n^{-b}``, input weights and input/hidden biases have ``(a, b) = (-1/2, 1/2)``,
hidden weights ``(0, 1/2)``, readout weights ``(1/2, 1/2)``. The readout's effective std
is ``σ_w/n``, so the network's output vanishes at initialisation as ``n`` grows, while
every layer's features move by ``Θ(1)`` per SGD step. ``role`` is ignored by the other
parameterizations.

Example:
    >>> import torch, ntk_torch as nt
    >>> _ = torch.manual_seed(0)
    >>> net = nt.nn.MLP(3, 64, 2, 1, activation="relu")
    >>> [name for name, _ in net.named_children()]
    ['hidden0', 'act0', 'hidden1', 'act1', 'readout']
    >>> net(torch.randn(5, 3)).shape
    torch.Size([5, 1])
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ntk_torch._activation_modules import ActivationSpec, Elementwise, activation_module
from ntk_torch._checks import check_choice, check_int, check_int_pair, check_number

Parameterization = Literal["ntk", "standard", "mup"]
Role = Literal["input", "hidden", "readout"]
PARAMETERIZATIONS = ("ntk", "standard", "mup")
ROLES = ("input", "hidden", "readout")

__all__ = ["Conv2d", "Dense", "Elementwise", "MLP", "ResidualCNN", "activation_module"]


def scales(parameterization: str, role: str, fan_in: int, fan_out: int, weight_std: float,
           bias_std: float) -> tuple[float, float, float, float]:
    """``(m, s, m_b, s_b)`` of a layer; see the table in this module's docstring."""
    w, b = weight_std, bias_std
    if parameterization == "ntk":
        return w / math.sqrt(fan_in), 1.0, b, 1.0
    if parameterization == "standard":
        return 1.0, w / math.sqrt(fan_in), 1.0, b
    if role == "input":
        m, s = w * math.sqrt(fan_out / fan_in), 1 / math.sqrt(fan_out)
    elif role == "hidden":
        m, s = w, 1 / math.sqrt(fan_in)
    else:
        m, s = w / math.sqrt(fan_in), 1 / math.sqrt(fan_in)
    if role == "readout":
        return m, s, b, 1.0
    return m, s, b * math.sqrt(fan_out), 1 / math.sqrt(fan_out)


class _Parameterized(nn.Module):
    """Shared state of :class:`Dense` and :class:`Conv2d`: raw parameters and their scales."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _set_scales(self, fan_in: int, fan_out: int, parameterization: str, role: str,
                    weight_std: float, bias_std: float) -> None:
        self.parameterization = check_choice("parameterization", parameterization,
                                              PARAMETERIZATIONS)
        self.role = check_choice("role", role, ROLES)
        self.weight_std = check_number("weight_std", weight_std)
        self.bias_std = check_number("bias_std", bias_std)
        self.multiplier, self.init_std, self.bias_multiplier, self.bias_init_std = scales(
            parameterization, role, fan_in, fan_out, self.weight_std, self.bias_std)

    def reset_parameters(self) -> None:
        """Redraw ``W ~ N(0, s²)`` and ``b ~ N(0, s_b²)`` from PyTorch's global generator."""
        with torch.no_grad():
            self.weight.normal_(0.0, self.init_std)
            if self.bias is not None:
                self.bias.normal_(0.0, self.bias_init_std)

    def extra_repr(self) -> str:
        role = f", role={self.role!r}" if self.parameterization == "mup" else ""
        return (f"parameterization={self.parameterization!r}{role}, "
                f"weight_std={self.weight_std:g}, "
                f"bias_std={self.bias_std:g}, bias={self.bias is not None}")


def _scaled(layer: _Parameterized, out: torch.Tensor, trailing: int) -> torch.Tensor:
    """``m · out + m_b · b`` with ``b`` along the channel dimension (``trailing`` from the end).

    The multiplier scales the layer's output rather than its weight: a weight-sized
    temporary in every forward would cost memory and time as the width grows.
    """
    if layer.multiplier != 1.0:
        out = out * layer.multiplier
    if layer.bias is not None:
        out = out + (layer.bias_multiplier * layer.bias).view(-1, *(1,) * (trailing - 1))
    return out


class Dense(_Parameterized):
    """Fully connected layer ``z = m · x Wᵀ + m_b · b`` with an explicit parameterization.

    Args:
        in_features: fan-in ``d``.
        out_features: number of outputs.
        parameterization: ``"ntk"``, ``"standard"`` or ``"mup"``; the multipliers ``m, m_b``
            and init stds ``s, s_b`` are in this module's table.
        weight_std: ``σ_w``.
        bias_std: ``β``.
        bias: whether the layer has a bias.
        role: ``"input"``, ``"hidden"`` or ``"readout"``; only ``"mup"`` uses it.

    Shapes: ``(N, *, in_features) -> (N, *, out_features)``.

    Example:
        >>> import torch
        >>> layer = Dense(4, 3, parameterization="ntk", weight_std=2.0)
        >>> layer.multiplier, layer.init_std
        (1.0, 1.0)
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(layer(x), x @ layer.weight.T + 0.0 * layer.bias)
        True
    """

    def __init__(self, in_features: int, out_features: int, *,
                 parameterization: Parameterization = "ntk", weight_std: float = 1.0,
                 bias_std: float = 0.0, bias: bool = True, role: Role = "hidden") -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, low=1)
        self.out_features = check_int("out_features", out_features, low=1)
        self._set_scales(in_features, out_features, parameterization, role, weight_std, bias_std)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``m · x Wᵀ + m_b · b``: ``(N, *, in_features) -> (N, *, out_features)``."""
        return _scaled(self, F.linear(x, self.weight), 1)

    def extra_repr(self) -> str:
        """Sizes, parameterization and stds."""
        return f"{self.in_features}, {self.out_features}, " + super().extra_repr()


class Conv2d(_Parameterized):
    """2-d convolution with zero padding and a stride, with an explicit parameterization.

    ``z = m · (W ⋆ x) + m_b · b``, fan-in ``d = in_channels · kh · kw``; multipliers and
    init stds as in this module's table (for ``"mup"``, ``n = out_channels`` for the input
    role and ``n = d`` otherwise).

    Args:
        in_channels, out_channels: channel counts.
        kernel_size: ``k`` or ``(kh, kw)``.
        parameterization, weight_std, bias_std, bias, role: as in :class:`Dense`.
        padding: ``"same"`` (default), ``"valid"``, an int or ``(ph, pw)``; zeros.
            ``"same"`` needs ``stride`` 1.
        stride: ``s`` or ``(sh, sw)``.

    Shapes: ``(N, in_channels, H, W) -> (N, out_channels, H', W')``.

    Example:
        >>> import torch
        >>> conv = Conv2d(2, 4, 3, parameterization="standard")
        >>> conv(torch.randn(1, 2, 5, 5)).shape
        torch.Size([1, 4, 5, 5])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], *,
                 parameterization: Parameterization = "ntk", weight_std: float = 1.0,
                 bias_std: float = 0.0, bias: bool = True, role: Role = "hidden",
                 padding: str | int | tuple[int, int] = "same",
                 stride: int | tuple[int, int] = 1) -> None:
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, low=1)
        self.out_channels = check_int("out_channels", out_channels, low=1)
        ks = check_int_pair("kernel_size", kernel_size, low=1)
        self.kernel_size: tuple[int, int] = ks
        if isinstance(padding, str):
            check_choice("padding", padding, ("same", "valid"))
        else:
            padding = check_int_pair("padding", padding, low=0)  # type: ignore[assignment]
        self.padding = padding
        self.stride = check_int_pair("stride", stride, low=1)
        if padding == "same" and self.stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1, got stride={stride!r}; give the "
                             "padding as numbers")
        # Geometry in nn.Conv2d's terms, so code that reads convolutions can read this one.
        self.dilation, self.groups, self.padding_mode = (1, 1), 1, "zeros"
        fan_in = in_channels * ks[0] * ks[1]
        self._set_scales(fan_in, out_channels, parameterization, role, weight_std, bias_std)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *ks))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``m · (W ⋆ x) + m_b · b``: ``(N, in_channels, H, W) -> (N, out_channels, H', W')``."""
        return _scaled(self, F.conv2d(x, self.weight, stride=self.stride, padding=self.padding), 3)

    def extra_repr(self) -> str:
        """Sizes, padding, parameterization and stds."""
        stride = "" if self.stride == (1, 1) else f"stride={self.stride}, "
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"padding={self.padding!r}, {stride}" + super().extra_repr())


class MLP(nn.Sequential):
    """``depth`` hidden (dense + activation) layers followed by a dense readout.

    Children, in order and by name: ``hidden0, act0, hidden1, act1, ..., readout``, so
    ``model.hidden0`` (``model[0]``) is the first :class:`Dense`, ``model.readout``
    (``model[-1]``) the last, and :func:`ntk_torch.layerwise_ntk` keys are ``"hidden0"``,
    ..., ``"readout"``. With ``"mup"``, ``hidden0`` has role ``"input"``, the other hidden
    layers ``"hidden"`` and the last one ``"readout"``. Parameters are drawn from PyTorch's
    global generator, so ``torch.manual_seed`` makes them reproducible.

    Args:
        in_features: input dimension ``d``.
        width: width ``n`` of every hidden layer.
        depth: number of hidden layers, ``>= 0`` (``0`` is a single dense layer; ``"mup"``
            needs ``depth >= 1``, since a width is what it scales).
        out_features: number of outputs ``O``.
        activation: name, module or elementwise callable (see :func:`activation_module`).
        parameterization: ``"ntk"``, ``"standard"`` or ``"mup"``.
        weight_std: ``σ_w`` of every layer.
        bias_std: ``β`` of every layer.
        bias: whether the dense layers have biases.

    Shapes: ``(N, in_features) -> (N, out_features)``.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> net = MLP(2, 8, 1, 3, parameterization="mup")
        >>> net.hidden0.role, net.readout.role, net(torch.randn(4, 2)).shape
        ('input', 'readout', torch.Size([4, 3]))
    """

    def __init__(self, in_features: int, width: int, depth: int, out_features: int, *,
                 activation: ActivationSpec = "relu", parameterization: Parameterization = "ntk",
                 weight_std: float = 1.0, bias_std: float = 0.0, bias: bool = True) -> None:
        check_int("in_features", in_features, low=1)
        check_int("width", width, low=1)
        check_int("depth", depth, low=0)
        check_int("out_features", out_features, low=1)
        check_choice("parameterization", parameterization, PARAMETERIZATIONS)
        if parameterization == "mup" and depth == 0:
            raise ValueError("`depth` must be >= 1 with parameterization='mup': a single dense "
                             "layer has no width to scale, got depth=0")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        fan_in = in_features
        for i in range(depth):
            layers[f"hidden{i}"] = Dense(fan_in, width, parameterization=parameterization,
                                         weight_std=weight_std, bias_std=bias_std, bias=bias,
                                         role="input" if i == 0 else "hidden")
            layers[f"act{i}"] = activation_module(activation)
            fan_in = width
        layers["readout"] = Dense(fan_in, out_features, parameterization=parameterization,
                                  weight_std=weight_std, bias_std=bias_std, bias=bias,
                                  role="readout")
        super().__init__(layers)
        self.in_features, self.width, self.depth, self.out_features = (
            in_features, width, depth, out_features)
        self.parameterization = parameterization

    def __getitem__(self, idx: int | slice) -> nn.Module:
        # nn.Sequential slices by calling type(self)(OrderedDict), which MLP's signature
        # does not accept; a slice of an MLP is a plain Sequential with the same names.
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)

    @property
    def dense_layers(self) -> list[Dense]:
        """The dense layers in order: ``[hidden0, ..., readout]`` (``depth + 1`` of them)."""
        return [m for m in self if isinstance(m, Dense)]


class ResidualCNN(nn.Module):
    """A small residual CNN whose infinite-width limit :func:`ntk_torch.analytic.kernel` reads.

    A stem convolution, ``blocks`` pre-activation residual blocks
    ``h + conv2(φ(conv1(φ(h))))``, then ``φ``, 2x2 average pooling, the mean over pixels
    and a dense readout; every convolution 3x3 with ``"same"`` padding and ``width``
    channels. The forward views its input as images of ``image_shape``, so flat vectors
    (e.g. the 8x8 digits as 64 features) work as they are. Roles for ``"mup"``: the stem
    ``"input"``, the blocks ``"hidden"``, the readout ``"readout"``. Child names: ``stem``,
    ``convs.0``, ``convs.1`` (block 0), ..., ``readout``.

    Args:
        image_shape: ``(C, H, W)`` of one input.
        width: channels of every convolution.
        blocks: number of residual blocks, ``>= 0``.
        out_features: number of outputs ``O``.
        activation, parameterization, weight_std, bias_std: as in :class:`MLP`.

    Shapes: ``(N, C, H, W)`` or ``(N, C·H·W) -> (N, out_features)``.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> net = ResidualCNN((1, 8, 8), 16, 1, 10)
        >>> net(torch.randn(5, 64)).shape
        torch.Size([5, 10])
    """

    def __init__(self, image_shape: tuple[int, int, int], width: int, blocks: int,
                 out_features: int, *, activation: ActivationSpec = "relu",
                 parameterization: Parameterization = "ntk", weight_std: float = 1.0,
                 bias_std: float = 0.0) -> None:
        super().__init__()
        if (not isinstance(image_shape, (tuple, list)) or len(image_shape) != 3
                or any(not isinstance(v, int) or v < 1 for v in image_shape)):
            raise ValueError(f"`image_shape` must be (channels, height, width) of positive "
                             f"ints, got {image_shape!r}")
        check_int("width", width, low=1)
        check_int("blocks", blocks, low=0)
        check_int("out_features", out_features, low=1)
        self.image_shape = tuple(image_shape)
        common = {"parameterization": parameterization, "weight_std": weight_std,
                  "bias_std": bias_std}
        self.stem = Conv2d(image_shape[0], width, 3, role="input", **common)
        self.convs = nn.ModuleList(Conv2d(width, width, 3, **common) for _ in range(2 * blocks))
        self.activation = activation_module(activation)
        self.pool = nn.AvgPool2d(2)
        self.readout = Dense(width, out_features, role="readout", **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` or ``(N, C·H·W) -> (N, out_features)``."""
        h = self.stem(x.reshape(x.shape[0], *self.image_shape))
        for conv1, conv2 in zip(self.convs[0::2], self.convs[1::2]):
            h = h + conv2(self.activation(conv1(self.activation(h))))
        h = self.pool(self.activation(h))
        return self.readout(h.mean((2, 3)))
