"""``nn.GroupNorm``'s affine parameters.

Per channel a scale (input feature: the input normalised over its group) and a shift.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ntk_torch._engines._layers._base import ChannelsFirstRule, register


class GroupNormRule(ChannelsFirstRule):
    name = "groupnorm"
    modules = ((nn.GroupNorm, ("forward",)),)

    def input_feature(self, module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        return F.group_norm(inp, module.num_groups, None, None, module.eps)


GROUPNORM = register(GroupNormRule())
