"""``nn.Conv1d``/``nn.Conv2d`` and ``ntk_torch.nn.Conv2d``.

``A_t`` is the receptive field (unfolded patch) of output position ``t``, per group of
channels.

``ntk_torch.nn.Conv2d`` computes ``z = m·(W ⋆ x) + m_b·b``: the input is kept scaled by
``m`` and the bias's constant input 1 becomes ``m_b``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ntk_torch import nn as ntk_nn
from ntk_torch._engines._layers._base import LayerRule, Site, register


class ConvRule(LayerRule):
    name = "conv"
    modules = ((nn.Conv1d, ("forward", "_conv_forward")), (nn.Conv2d, ("forward", "_conv_forward")),
               (ntk_nn.Conv2d, ("forward",)))
    factorable = True

    def scales(self, module: nn.Module) -> tuple[float, float]:
        if isinstance(module, ntk_nn.Conv2d):
            return float(module.multiplier), float(module.bias_multiplier)
        return 1.0, 1.0

    def sizes(self, module: nn.Module, site: Site) -> tuple[int, int, int, int]:
        nd = len(module.kernel_size)
        lead = math.prod(site.in_shape[: len(site.in_shape) - nd - 1])
        positions = lead * math.prod(site.out_shape[-nd:])
        g = module.groups
        k_in = module.in_channels // g * math.prod(module.kernel_size)
        return positions, g, k_in, module.out_channels // g

    def input_feature(self, module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        # Unfolded later (features), outside vmap.
        multiplier = self.scales(module)[0]
        return inp if multiplier == 1.0 else multiplier * inp

    def features(self, module: nn.Module, site: Site, feat: torch.Tensor) -> torch.Tensor:
        positions, groups, k_in, _ = self.sizes(module, site)
        return _patches(module, feat).reshape(feat.shape[0], positions, groups, k_in)

    def cotangents(self, module: nn.Module, site: Site, cot: torch.Tensor) -> torch.Tensor:
        n, n_out = cot.shape[:2]
        positions, groups, _, k_out = self.sizes(module, site)
        nd = len(module.kernel_size)
        spatial = math.prod(site.out_shape[-nd:])
        cot = cot.reshape(n, n_out, -1, module.out_channels, spatial).transpose(-1, -2)
        return cot.reshape(n, n_out, positions, groups, k_out)

    def channel_axis(self, site: Site) -> int:
        return 1


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(N, T, C·prod(kernel))`` receptive fields of every output position, in its order."""
    n = x.shape[0]
    nd = len(module.kernel_size)
    x = x.reshape(-1, *x.shape[-nd - 1:])  # (N·lead, C, *spatial)
    # The module pads like this (string padding included: _reversed_padding_repeated_twice
    # holds the asymmetric 'same' amounts); unfold pads symmetric zeros itself, without a copy.
    pads = _reversed_padding(module)  # last dimension first
    padding = tuple(pads[2 * i] for i in reversed(range(nd)))
    if module.padding_mode != "zeros" or pads[0::2] != pads[1::2]:
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pads, mode=mode)
        padding = (0,) * nd
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if nd == 1:
        x = x.unsqueeze(-2)
        kernel, dilation = (1, *kernel), (1, *dilation)
        stride, padding = (1, *stride), (0, *padding)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N·lead, Ck, L)
    k = cols.shape[1]
    return cols.reshape(n, -1, k, cols.shape[2]).transpose(-1, -2).reshape(n, -1, k)


def _reversed_padding(module: nn.Module) -> list[int]:
    """Amounts ``[left, right]`` per spatial dimension, last dimension first, as torch pads."""
    if hasattr(module, "_reversed_padding_repeated_twice"):
        return list(module._reversed_padding_repeated_twice)
    # ntk_torch.nn.Conv2d: dilation 1; "same" (stride 1) pads k - 1 in all, the extra one
    # on the right (torch's convention), "valid" nothing.
    pads: list[int] = []
    for i in reversed(range(len(module.kernel_size))):
        k = module.kernel_size[i]
        if module.padding == "same":
            pads += [(k - 1) // 2, k - 1 - (k - 1) // 2]
        elif module.padding == "valid":
            pads += [0, 0]
        else:
            pads += [module.padding[i], module.padding[i]]
    return pads


CONV = register(ConvRule())
