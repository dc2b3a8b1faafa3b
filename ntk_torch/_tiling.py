"""Block-wise kernels: bounded memory, identical results, symmetric when ``x2 is None``."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

BlockFn = Callable[[torch.Tensor, "torch.Tensor | None"], dict[str, torch.Tensor]]


def spans(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def transpose_pairs(block: torch.Tensor) -> torch.Tensor:
    """``K(x2, x1)`` from ``K(x1, x2)``: swap samples and, in full mode, outputs."""
    block = block.transpose(0, 1)
    return block.transpose(2, 3) if block.dim() == 4 else block


def symmetrize(block: torch.Tensor) -> torch.Tensor:
    # (K + Kᵀ)/2 is exactly symmetric in floating point: addition commutes.
    return (block + transpose_pairs(block)) / 2


def tiled(block_fn: BlockFn, x1: torch.Tensor, x2: torch.Tensor | None, batch_size: int | None,
          progress: bool = False) -> dict[str, torch.Tensor]:
    """Assemble ``{group: (N1, N2, ...)}`` from blocks of at most ``batch_size`` samples.

    With ``x2 is None`` only blocks on and above the diagonal are computed; diagonal
    blocks are symmetrised and the others mirrored, so the result is exactly symmetric.
    """
    symmetric = x2 is None
    n1 = x1.shape[0]
    n2 = n1 if symmetric else x2.shape[0]
    rows = spans(n1, batch_size or max(n1, 1))
    cols = rows if symmetric else spans(n2, batch_size or max(n2, 1))
    pairs = [(r, c) for i, r in enumerate(rows) for j, c in enumerate(cols) if not symmetric or j >= i]
    out: dict[str, torch.Tensor] = {}
    for (r0, r1), (c0, c1) in tqdm(pairs, desc="kernel blocks", disable=not progress or len(pairs) < 2):
        if symmetric and (r0, r1) == (c0, c1):
            blocks = {g: symmetrize(b) for g, b in block_fn(x1[r0:r1], None).items()}
        else:
            blocks = block_fn(x1[r0:r1], (x1 if symmetric else x2)[c0:c1])
        for group, block in blocks.items():
            if group not in out:
                out[group] = block.new_empty((n1, n2, *block.shape[2:]))
            out[group][r0:r1, c0:c1] = block
            if symmetric and (r0, r1) != (c0, c1):
                out[group][c0:c1, r0:r1] = transpose_pairs(block)
    return out


def available_memory(device: torch.device) -> float:
    """Bytes that can still be allocated on ``device`` (host memory for the CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


# Estimates are approximate and the allocator fragments, so keep a wide margin.
DEFAULT_MEMORY_FRACTION = 0.5


def default_memory_budget(device: torch.device) -> float:
    return DEFAULT_MEMORY_FRACTION * available_memory(device)
