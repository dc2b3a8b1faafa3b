"""Infinite-width kernels of a PyTorch model: its layers read into ``Kernel -> Kernel`` maps.

:func:`kernel` reads ``nn.Sequential`` models (nested ones and :class:`ntk_torch.nn.MLP`
included) made of :class:`ntk_torch.nn.Dense`/:class:`ntk_torch.nn.Conv2d`,
``nn.Linear``, ``nn.Conv2d`` (stride 1, zero padding), elementwise activations,
``nn.Flatten``, ``nn.Identity``, dropout and ``nn.AdaptiveAvgPool2d(1)``. It reads the
*architecture and its initialisation distribution*, never the current weights:
``ntk_torch.nn`` layers carry their multipliers and init stds, plain ``nn.Linear`` and
``nn.Conv2d`` are taken with PyTorch's default initialisation (uniform with variance
``1/(3·fan_in)`` for weights and biases: ``σ_w² = 1/3``, ``σ_b² = 1/(3·fan_in)``) in the
standard parameterization, at the model's actual widths. A parameter with
``requires_grad=False`` contributes no NTK term, as in :func:`ntk_torch.empirical_ntk`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ntk_torch import nn as ntk_nn
from ntk_torch._checks import check_dtype, check_module
from ntk_torch.analytic import layers as L
from ntk_torch.analytic._evaluate import evaluate
from ntk_torch.analytic._limit import Kernel
from ntk_torch.analytic.activations import ACTIVATION_TYPES, dual

__all__ = ["SUPPORTED", "kernel", "read_layers"]

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)

SUPPORTED = ("nn.Sequential, ntk_torch.nn.Dense/Conv2d/MLP, nn.Linear, nn.Conv2d (stride 1, "
             "groups 1, zero padding), elementwise activations (nn.ReLU, nn.GELU, nn.Tanh, ..., "
             "ntk_torch.nn.Elementwise), nn.Flatten, nn.Identity, dropout, "
             "nn.AdaptiveAvgPool2d(1)")


Pads = tuple[int, int, int, int]


def _same_padding(kernel_size: tuple[int, int], dilation: tuple[int, int]) -> Pads:
    # PyTorch's padding="same": total d·(k-1) per dim, the extra pixel at the end.
    pads = []
    for k, d in zip(kernel_size, dilation):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return pads[0], pads[1], pads[2], pads[3]


def _padding(padding: object, kernel_size: tuple[int, int], dilation: tuple[int, int]) -> Pads:
    if padding == "same":
        return _same_padding(kernel_size, dilation)
    if padding == "valid":
        return 0, 0, 0, 0
    ph, pw = padding  # type: ignore[misc]
    return ph, ph, pw, pw


def _dense_layer(module: nn.Module) -> L.Layer:
    if isinstance(module, ntk_nn.Dense):
        m, s = module.multiplier, module.init_std
        mb, sb = module.bias_multiplier, module.bias_init_std
        fan_in, out = module.in_features, module.out_features
    else:
        fan_in, out = module.in_features, module.out_features
        m, s = 1.0, math.sqrt(1 / (3 * fan_in))
        mb, sb = 1.0, math.sqrt(1 / (3 * fan_in))
    has_bias = module.bias is not None
    return L.dense(fan_in, out, m, s, mb if has_bias else 0.0, sb if has_bias else 0.0,
                   weight_trainable=module.weight.requires_grad,
                   bias_trainable=has_bias and module.bias.requires_grad)


def _conv_layer(name: str, module: nn.Module) -> L.Layer:
    if isinstance(module, ntk_nn.Conv2d):
        m, s = module.multiplier, module.init_std
        mb, sb = module.bias_multiplier, module.bias_init_std
        dilation = (1, 1)
    else:
        problems = []
        if tuple(module.stride) != (1, 1):
            problems.append(f"stride {tuple(module.stride)}")
        if module.groups != 1:
            problems.append(f"groups={module.groups}")
        if module.padding_mode != "zeros":
            problems.append(f"padding_mode={module.padding_mode!r}")
        if problems:
            raise ValueError(f"analytic.kernel cannot read layer {name!r} ({module!r}): only "
                             f"stride 1, groups 1 and zero padding are supported, got "
                             f"{', '.join(problems)}")
        dilation = tuple(module.dilation)
        fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        m, s = 1.0, math.sqrt(1 / (3 * fan_in))
        mb, sb = 1.0, math.sqrt(1 / (3 * fan_in))
    kernel_size = tuple(module.kernel_size)
    has_bias = module.bias is not None
    return L.conv2d(module.in_channels, module.out_channels, kernel_size,
                    _padding(module.padding, kernel_size, dilation), m, s,
                    mb if has_bias else 0.0, sb if has_bias else 0.0, dilation=dilation,
                    weight_trainable=module.weight.requires_grad,
                    bias_trainable=has_bias and module.bias.requires_grad)


def _leaf(name: str, module: nn.Module) -> L.Layer:
    if isinstance(module, (ntk_nn.Dense, nn.Linear)):
        return _dense_layer(module)
    if isinstance(module, (ntk_nn.Conv2d, nn.Conv2d)):
        return _conv_layer(name, module)
    if isinstance(module, (nn.Identity, *_DROPOUT)):
        return L.identity()
    if isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise ValueError(f"analytic.kernel cannot read layer {name!r} ({module!r}): only "
                             "nn.Flatten(start_dim=1, end_dim=-1) is supported")
        return L.flatten()
    if isinstance(module, nn.AdaptiveAvgPool2d):
        size = module.output_size
        if size not in (1, (1, 1)):
            raise ValueError(f"analytic.kernel cannot read layer {name!r} ({module!r}): only "
                             "global average pooling, nn.AdaptiveAvgPool2d(1), is supported")
        return L.global_average_pool()
    if isinstance(module, (*ACTIVATION_TYPES, ntk_nn.Elementwise, nn.PReLU)):
        try:
            return L.activation(dual(module))
        except TypeError as err:
            raise ValueError(f"analytic.kernel cannot read layer {name!r}: {err}") from None
    raise ValueError(f"analytic.kernel cannot read layer {name!r} ({type(module).__name__}); "
                     f"supported layers: {SUPPORTED}")


def read_layers(model: nn.Module) -> list[tuple[str, nn.Module, L.Layer]]:
    """``(qualified name, module, Kernel -> Kernel map)`` for each leaf layer, in order.

    Raises:
        ValueError: naming the first layer that has no analytic kernel.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> [name for name, _, _ in read_layers(net)]
        ['0', '1', '2']
    """
    check_module("model", model)
    out: list[tuple[str, nn.Module, L.Layer]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        if isinstance(module, nn.Sequential):
            for child_name, child in module.named_children():
                visit(f"{prefix}.{child_name}" if prefix else child_name, child)
        else:
            out.append((prefix or type(module).__name__, module, _leaf(prefix or "model", module)))

    visit("", model)
    return out


def kernel(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, *,
           dtype: torch.dtype = torch.float64, batch_size: int | None = None) -> Kernel:
    """Infinite-width NNGP and NTK of ``model``'s architecture on ``x1`` and ``x2``.

    The per-output kernels: ``nngp[a, b] = E[f_o(x1_a) f_o(x2_b)]`` and ``ntk[a, b]`` the
    limit of ``empirical_ntk(model, x1, x2, mode="trace")`` (the mean over the ``O``
    outputs), both over random initialisations. Layers are read as described in this
    module's docstring; the model is neither run nor changed.

    Args:
        model: an ``nn.Sequential`` (possibly nested) of supported layers, or an
            :class:`ntk_torch.nn.MLP`.
        x1: ``(N1, d)`` or ``(N1, C, H, W)`` inputs.
        x2: same trailing shape, ``(N2, ...)``; ``None`` means ``x1`` (symmetric result).
        dtype: computation and result dtype; float64 by default.
        batch_size: samples per block of the ``(N1, N2)`` grid (memory bound); ``None``
            picks one that keeps each array of a block near 1 MB
            (362 x 362 pairs of vectors).

    Returns:
        :class:`Kernel` with ``nngp`` and ``ntk`` of shape ``(N1, N2)``, on ``x1``'s device.

    Raises:
        ValueError: for an unsupported layer (named) or inconsistent shapes.

    Example:
        >>> import torch, ntk_torch as nt
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> k = nt.analytic.kernel(torch.nn.Linear(3, 2), x)  # σ_w² = 1/3, σ_b² = 1/9
        >>> torch.allclose(k.nngp, (x @ x.T + 1) / 9), torch.allclose(k.ntk, x @ x.T + 1)
        (True, True)
    """
    check_module("model", model)
    check_dtype(dtype)
    return evaluate(read_layers(model), x1, x2, dtype, batch_size)
