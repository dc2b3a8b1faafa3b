"""``nn.Linear`` and ``ntk_torch.nn.Dense``: ``A_t`` is the input row at position ``t``.

``Dense`` computes ``z = m·W x + m_b·b``: the input is kept scaled by ``m`` and the bias's
constant input 1 becomes ``m_b``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ntk_torch import nn as ntk_nn
from ntk_torch._engines._layers._base import LayerRule, Site, register


class LinearRule(LayerRule):
    name = "linear"
    modules = ((nn.Linear, ("forward",)), (ntk_nn.Dense, ("forward",)))
    factorable = True

    def scales(self, module: nn.Module) -> tuple[float, float]:
        if isinstance(module, ntk_nn.Dense):
            return float(module.multiplier), float(module.bias_multiplier)
        return 1.0, 1.0

    def widths(self, module: nn.Module) -> tuple[int, int]:
        """``(k_in, k_out)``: input and output features."""
        return module.in_features, module.out_features

    def sizes(self, module: nn.Module, site: Site) -> tuple[int, int, int, int]:
        k_in, k_out = self.widths(module)
        return math.prod(site.in_shape) // k_in, 1, k_in, k_out

    def input_feature(self, module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        multiplier = self.scales(module)[0]
        return inp if multiplier == 1.0 else multiplier * inp

    def readout_width(self, module: nn.Module, site: Site) -> int | None:
        return self.widths(module)[0] if self.sizes(module, site)[0] == 1 else None


LINEAR = register(LinearRule())
