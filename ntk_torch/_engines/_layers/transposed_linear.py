"""A linear layer that stores its weight as ``(in, out)``: ``y = x @ W + b``.

The ``Conv1D`` of Hugging Face ``transformers`` (every projection of GPT-2: ``c_attn``,
``c_proj``, ``c_fc``) is such a layer; it is recognised by its class name and its ``nf``
attribute (``transformers`` need not be installed), and the probe checks that the call
computes ``x @ W + b``. Its gradient is that of ``nn.Linear`` with ``W`` transposed;
kernels only take inner products of gradients, so the layouts are the linear rule's.
"""

from __future__ import annotations

import torch
from torch import nn

from ntk_torch._engines._layers._base import register
from ntk_torch._engines._layers.linear import LinearRule

# The recomputed product may round differently from the layer's own kernel (another
# BLAS path); a different function differs by far more.
_RTOL_ULPS = 64


class TransposedLinearRule(LinearRule):
    name = "transposed linear"
    modules = ()
    class_names = ("Conv1D",)

    def accepts(self, module: nn.Module) -> bool:
        weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
        nf = getattr(module, "nf", None)
        return (isinstance(nf, int) and weight is not None and weight.dim() == 2
                and weight.shape[1] == nf and (bias is None or tuple(bias.shape) == (nf,)))

    def widths(self, module: nn.Module) -> tuple[int, int]:
        return module.weight.shape[0], module.nf

    def verify(self, module: nn.Module, args: tuple, output: torch.Tensor, pair: int = 0) -> bool:
        inp = args[0]
        if (not isinstance(output, torch.Tensor) or inp.shape[-1] != module.weight.shape[0]
                or output.shape != (*inp.shape[:-1], module.nf)):
            return False
        expected = (inp.reshape(-1, inp.shape[-1]) @ module.weight).reshape(output.shape)
        if module.bias is not None:
            expected = expected + module.bias
        scale = inp.abs().amax() * module.weight.abs().amax() * inp.shape[-1]
        if module.bias is not None:
            scale = scale + module.bias.abs().amax()
        tol = _RTOL_ULPS * torch.finfo(output.dtype).eps * scale
        return bool(((output - expected).abs() <= tol).all())


TRANSPOSED_LINEAR = register(TransposedLinearRule())
