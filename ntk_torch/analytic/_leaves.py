"""One layer module's ``Kernel -> Kernel`` map, read from its type and settings.

Plain ``nn.Linear`` and ``nn.Conv1d``/``nn.Conv2d`` are taken with PyTorch's default
initialisation (uniform with variance ``1/(3·fan_in)`` for weights and biases:
``σ_w² = 1/3``, ``σ_b² = 1/(3·fan_in)``) in the standard parameterization;
:mod:`ntk_torch.nn` layers carry their multipliers and init stds; ``nn.LayerNorm`` starts
at gain 1 and bias 0. A 1-d layer is read as the 2-d one of height 1. A parameter with
``requires_grad=False`` contributes no NTK term.
"""

from __future__ import annotations

import math

from torch import nn

from ntk_torch import nn as ntk_nn
from ntk_torch.analytic import layers as L
from ntk_torch.analytic.activations import ACTIVATION_TYPES, dual

__all__ = ["CHANNELWISE_LINEAR", "LINEAR_LAYERS", "SUPPORTED", "leaf_layer"]

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)

SUPPORTED = ("ntk_torch.nn.Dense/Conv2d/MLP, nn.Linear, nn.Conv1d/Conv2d (any stride, dilation "
             "and zero padding, groups 1), elementwise activations (nn.ReLU, nn.GELU, nn.Tanh, "
             "..., ntk_torch.nn.Elementwise), nn.AvgPool1d/2d, nn.AdaptiveAvgPool1d/2d, "
             "nn.LayerNorm over features, nn.Flatten, nn.Identity, dropout")

# Layers that are a linear map with weights of their own: the independence of summed
# branches rests on them (see ntk_torch.analytic._graph).
LINEAR_LAYERS = (ntk_nn.Dense, nn.Linear, ntk_nn.Conv2d, nn.Conv1d, nn.Conv2d)
# Layers that act on each channel alike and linearly: a branch through them keeps the
# linear layer it ends in.
CHANNELWISE_LINEAR = (nn.Identity, *_DROPOUT, nn.Flatten, nn.AvgPool1d, nn.AvgPool2d,
                      nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)

Pads = tuple[int, int, int, int]
Pair = tuple[int, int]


def _same_padding(kernel_size: Pair, dilation: Pair) -> Pads:
    # PyTorch's padding="same": total d·(k-1) per dim, the extra pixel at the end.
    pads = []
    for k, d in zip(kernel_size, dilation):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return pads[0], pads[1], pads[2], pads[3]


def _pair(module: nn.Module, value: object, height: int = 1) -> Pair:
    """A 1-d layer's size as the 2-d one of height 1 that it is read as.

    ``height`` is the size along the added dimension: 1 for kernels and strides, 0 for
    padding.
    """
    if isinstance(value, int):
        one_d = (nn.Conv1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d)
        value = (value,) * (1 if isinstance(module, one_d) else 2)
    value = tuple(value)  # type: ignore[arg-type]
    return (height, value[0]) if len(value) == 1 else (value[0], value[1])


def _padding(module: nn.Module, kernel_size: Pair, dilation: Pair) -> Pads:
    padding = module.padding
    if padding == "same":
        return _same_padding(kernel_size, dilation)
    if padding == "valid":
        return 0, 0, 0, 0
    ph, pw = _pair(module, padding, height=0)
    return ph, ph, pw, pw


def _refuse(name: str, module: nn.Module, why: str) -> ValueError:
    return ValueError(f"analytic.kernel cannot read layer {name!r} ({module!r}): {why}")


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
    problems = []
    if module.groups != 1:
        problems.append(f"groups={module.groups}")
    if module.padding_mode != "zeros":
        problems.append(f"padding_mode={module.padding_mode!r}")
    if problems:
        raise _refuse(name, module, "only groups 1 and zero padding are supported, got "
                      + ", ".join(problems))
    kernel_size, dilation, stride = (_pair(module, module.kernel_size),
                                     _pair(module, module.dilation), _pair(module, module.stride))
    if isinstance(module, ntk_nn.Conv2d):
        m, s = module.multiplier, module.init_std
        mb, sb = module.bias_multiplier, module.bias_init_std
    else:
        fan_in = module.in_channels * kernel_size[0] * kernel_size[1]
        m, s = 1.0, math.sqrt(1 / (3 * fan_in))
        mb, sb = 1.0, math.sqrt(1 / (3 * fan_in))
    has_bias = module.bias is not None
    return L.conv2d(module.in_channels, module.out_channels, kernel_size,
                    _padding(module, kernel_size, dilation), m, s,
                    mb if has_bias else 0.0, sb if has_bias else 0.0, dilation=dilation,
                    stride=stride, weight_trainable=module.weight.requires_grad,
                    bias_trainable=has_bias and module.bias.requires_grad)


def _pool_layer(module: nn.Module) -> L.Layer:
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        size = _pair(module, module.output_size)
        return L.global_average_pool() if size == (1, 1) else L.adaptive_avg_pool2d(size)
    kernel_size = _pair(module, module.kernel_size)
    stride = _pair(module, module.stride) if module.stride else kernel_size
    padding = _pair(module, module.padding, height=0)
    return L.avg_pool2d(kernel_size, stride, padding, ceil_mode=module.ceil_mode,
                        count_include_pad=module.count_include_pad,
                        divisor_override=getattr(module, "divisor_override", None))


def _layer_norm(name: str, module: nn.LayerNorm) -> L.Layer:
    if len(module.normalized_shape) != 1:
        raise _refuse(name, module, "only LayerNorm over the last dimension of vectors "
                      "(N, features) is supported")
    weight, bias = module.weight, module.bias
    return L.layer_norm(module.normalized_shape[0], module.eps,
                        weight_trainable=weight is not None and weight.requires_grad,
                        bias_trainable=bias is not None and bias.requires_grad)


def leaf_layer(name: str, module: nn.Module) -> L.Layer:
    """The ``Kernel -> Kernel`` map of one layer module, read from its type and settings.

    Raises:
        ValueError: naming the layer when it has no analytic kernel.
    """
    if isinstance(module, (ntk_nn.Dense, nn.Linear)):
        return _dense_layer(module)
    if isinstance(module, (ntk_nn.Conv2d, nn.Conv1d, nn.Conv2d)):
        return _conv_layer(name, module)
    if isinstance(module, (nn.Identity, *_DROPOUT)):
        return L.identity()
    if isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise _refuse(name, module, "only nn.Flatten(start_dim=1, end_dim=-1) is supported")
        return L.flatten()
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                           nn.AdaptiveAvgPool2d)):
        return _pool_layer(module)
    if isinstance(module, nn.LayerNorm):
        return _layer_norm(name, module)
    if isinstance(module, (*ACTIVATION_TYPES, ntk_nn.Elementwise, nn.PReLU)):
        try:
            return L.activation(dual(module))
        except TypeError as err:
            raise ValueError(f"analytic.kernel cannot read layer {name!r}: {err}") from None
    raise ValueError(f"analytic.kernel cannot read layer {name!r} ({type(module).__name__}); "
                     f"supported layers: {SUPPORTED}")
