"""``nn.LayerNorm``'s affine parameters.

Per entry of ``normalized_shape`` a scale (input feature: the normalised input) and a
shift.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ntk_torch._engines._layers._base import LayerRule, Site, register


class LayerNormRule(LayerRule):
    name = "layernorm"
    modules = ((nn.LayerNorm, ("forward",)),)

    def sizes(self, module: nn.Module, site: Site) -> tuple[int, int, int, int]:
        entries = math.prod(module.normalized_shape)
        return math.prod(site.in_shape) // entries, entries, 1, 1

    def input_feature(self, module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(inp, module.normalized_shape, None, None, module.eps)


LAYERNORM = register(LayerNormRule())
