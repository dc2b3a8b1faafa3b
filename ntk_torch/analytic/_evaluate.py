"""Layer maps run on inputs.

The ``Kernel -> Kernel`` maps of a network applied block by block to the pairs of inputs,
in bounded memory.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ntk_torch._checks import check_batch_size, check_inputs
from ntk_torch._tiling import tiled
from ntk_torch.analytic import layers as L
from ntk_torch.analytic._limit import Kernel

__all__ = ["NamedLayer", "evaluate"]

NamedLayer = tuple[str, nn.Module | None, L.Layer]
"""A layer map with the name and module it was read from (``None`` when described by
hyper-parameters), for error messages; an empty name for a map that names its own parts."""

# Elements of one block's state per array: 2^17 doubles, 1 MB, a 362 x 362 block of a dense
# kernel. Blocks this small stay in cache through the dozens of elementwise passes of a
# deep recursion and are reused by the allocator; larger ones are slower (page faults).
_BLOCK_ELEMENTS = 1 << 17


def _default_batch(x: torch.Tensor) -> int:
    pixels = math.prod(x.shape[2:])
    return max(1, math.isqrt(_BLOCK_ELEMENTS // (pixels * pixels)))


def evaluate(layers: list[NamedLayer], x1: torch.Tensor,
         x2: torch.Tensor | None, dtype: torch.dtype, batch_size: int | None) -> Kernel:
    check_inputs(x1, x2)
    batch_size = check_batch_size(batch_size)
    x1 = x1.to(dtype)
    x2 = None if x2 is None else x2.to(dtype)

    def block(xa: torch.Tensor, xb: torch.Tensor | None) -> dict[str, torch.Tensor]:
        k = L.input_kernel(xa, xb)
        for name, module, layer in layers:
            try:
                k = layer(k)
            except ValueError as err:
                if not name:  # a whole graph, whose messages name their nodes
                    raise
                label = name if module is None else f"{name!r} ({type(module).__name__})"
                raise ValueError(f"layer {label}: {err}") from None
        k = L.output(k)
        return {"nngp": k.nngp, "ntk": k.ntk}

    if x1.shape[0] == 0 or (x2 is not None and x2.shape[0] == 0):
        result = block(x1, x2)
    else:
        with torch.no_grad():
            result = tiled(block, x1, x2, batch_size or _default_batch(x1))
    return Kernel(result["nngp"], result["ntk"])
