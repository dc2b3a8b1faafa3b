"""``nn.MultiheadAttention``'s packed input projection, in self-attention.

``nn.MultiheadAttention`` calls ``F.multi_head_attention_forward`` with its packed
``in_proj_weight (3E, E)`` and with ``out_proj.weight``, so neither projection is a module
call that a forward hook sees. In self-attention (query, key and value one tensor) that
function's first step is ``proj = x Wᵀ + b`` for every token ``x``, then split into q, k
and v: a linear layer with ``k_in = E`` and ``k_out = 3E``.

While the structured engine runs the model, a ``TorchFunctionMode`` takes that function
over (``torch.func`` transforms and autograd see ordinary operations): it computes ``proj``
itself (the layer's call, given to ``on_call``), lets the same function do the rest from
that q, k, v with identity projections (``x @ I`` is exact), and makes the output
projection a call of ``out_proj`` (an ``nn.Linear``, then structured like any other). The
result is the function's own to rounding; the identities cost ``4·E²`` FLOPs per token.
Cross-attention, separate projection weights, unbatched inputs and a user hook on
``out_proj`` leave the function as it is: those parameters take the fallback.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ntk_torch._engines._layers._base import CallsMode, LayerRule, Site, register

_ATTENTION = F.multi_head_attention_forward
_SIGNATURE = inspect.signature(_ATTENTION)


class _PackedProjections(CallsMode):
    """Computes the attention of ``modules`` with their projections done outside (above)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _ATTENTION:
            call = _SIGNATURE.bind(*args, **kwargs).arguments
            weight, x = call["in_proj_weight"], call["query"]
            module = next((m for m in self.modules if m.in_proj_weight is weight), None)
            if (module is not None and not call.get("use_separate_proj_weight", False)
                    and x is call["key"] and x is call["value"] and x.dim() == 3):
                return _self_attention(module, call, self.on_call)
        return func(*args, **kwargs)


class PackedAttentionRule(LayerRule):
    mode = _PackedProjections
    name = "packed attention projection"
    modules = ((nn.MultiheadAttention, ("forward",)),)
    parameters = (("in_proj_weight", "in_proj_bias"),)

    def accepts(self, module: nn.Module) -> bool:
        out = module.out_proj
        return (module._qkv_same_embed_dim and module.in_proj_weight is not None
                and type(out).forward is nn.Linear.forward
                and not (out._forward_hooks or out._forward_pre_hooks))

    def sizes(self, module: nn.Module, site: Site) -> tuple[int, int, int, int]:
        e = module.embed_dim
        return math.prod(site.in_shape) // e, 1, e, 3 * e

    def extra_flops(self, module: nn.Module, site: Site) -> float:
        positions, _, e, _ = self.sizes(module, site)
        return 2.0 * positions * 4 * e * e  # the identity projections



def _self_attention(module: nn.Module, call: dict, on_call: Callable):
    """``F.multi_head_attention_forward(**call)`` with both projections as layer calls."""
    x = call["query"]  # (L, N, E): sequence first inside the function
    e = x.shape[-1]
    tokens = x.transpose(0, 1)  # batch first, as the structured engine's sites are
    proj = F.linear(tokens, call["in_proj_weight"], call["in_proj_bias"])
    q, k, v = on_call(module, (tokens,), proj).transpose(0, 1).unflatten(-1, (3, e)).unbind(-2)
    eye = torch.eye(e, dtype=x.dtype, device=x.device)
    rest = {**call, "query": q, "key": k, "value": v, "in_proj_weight": None,
            "in_proj_bias": None, "use_separate_proj_weight": True, "q_proj_weight": eye,
            "k_proj_weight": eye, "v_proj_weight": eye, "out_proj_weight": eye,
            "out_proj_bias": None}
    attended, weights = _ATTENTION(**rest)  # (L, N, E)
    # Contiguous like the function's own output (a caller may .view it).
    return module.out_proj(attended.transpose(0, 1)).transpose(0, 1).contiguous(), weights


PACKED_ATTENTION = register(PackedAttentionRule())
