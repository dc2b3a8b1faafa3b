"""``nn.BatchNorm1d/2d/3d`` in eval mode.

Per channel a scale (input feature: the input normalised by the running statistics) and
a shift. In train mode the statistics come from the batch, so the layer is not
per-sample and gets no rule.
"""

from __future__ import annotations

import torch
from torch import nn

from ntk_torch._engines._layers._base import ChannelsFirstRule, register


class BatchNormRule(ChannelsFirstRule):
    name = "batchnorm"
    modules = ((nn.modules.batchnorm._BatchNorm, ("forward",)),)

    def accepts(self, module: nn.Module) -> bool:
        return not module.training and module.running_mean is not None

    def input_feature(self, module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (inp.dim() - 2)
        mean = module.running_mean.view(shape)
        var = module.running_var.view(shape)
        return (inp - mean) / torch.sqrt(var + module.eps)


BATCHNORM = register(BatchNormRule())
