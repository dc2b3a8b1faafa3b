"""Block-wise kernels: bounded memory, identical results, symmetric when ``x2 is None``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from ntk_torch import _inputs
from ntk_torch._kernel_matrix import symmetrize, transpose_pairs

BlockFn = Callable[[Any, Any], dict[str, torch.Tensor]]  # (xa, xb or None) -> {group: block}
Span = tuple[int, int]


class Blockwise(Protocol):
    """A kernel computed block by block, with per-sample work that blocks can share.

    ``prepare(x)`` does the work that depends on samples ``x`` alone; ``contract(pa, pb)``
    gives ``{group: block}`` between two prepared sets (``pb=None``: ``pa`` with itself);
    ``compute(xa, xb)`` is both steps at once, for a pair that shares nothing with others.
    """

    def prepare(self, x: _inputs.Inputs) -> Any: ...

    def contract(self, pa: Any, pb: Any | None) -> dict[str, torch.Tensor]: ...

    def compute(self, xa: _inputs.Inputs,
                xb: _inputs.Inputs | None) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class Pairwise:
    """A :class:`Blockwise` kernel with nothing to share: ``block_fn(xa, xb)`` per block."""

    block_fn: BlockFn

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def contract(self, pa: torch.Tensor, pb: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return self.block_fn(pa, pb)

    def compute(self, xa: torch.Tensor, xb: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return self.block_fn(xa, xb)


def spans(n: int, size: int) -> list[Span]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def block_pairs(n1: int, n2: int | None, size: int) -> list[tuple[Span, Span]]:
    """Blocks of at most ``size`` samples in row-major order.

    With ``n2=None`` (a kernel of ``x1`` with itself) only those on and above the diagonal.
    """
    rows = spans(n1, size)
    if n2 is None:
        return [(r, c) for i, r in enumerate(rows) for c in rows[i:]]
    return [(r, c) for r in rows for c in spans(n2, size)]


def blocks(kernel: Blockwise, rows: Callable[[Span], Any], cols: Callable[[Span], Any] | None,
           pairs: Iterable[tuple[Span, Span]], shared_rows: bool = True,
           ) -> Iterator[tuple[tuple[Span, Span], dict[str, torch.Tensor]]]:
    """``((row span, column span), {group: block})`` for each pair, in the given order.

    ``rows(span)``/``cols(span)`` load the samples of a span; ``cols=None`` means the kernel
    of the rows' samples with themselves: a pair on the diagonal is contracted with itself
    and symmetrised. The prepared row block is kept while consecutive pairs share it, so a
    row of blocks prepares its rows once and each column block once; with
    ``shared_rows=False`` (rows of one block) each pair is computed at once instead.
    ``pairs`` is consumed lazily: it may decide the next pair as the previous one is done.
    """
    load_cols = rows if cols is None else cols
    row_span, row = None, None
    for r, c in pairs:
        if not shared_rows and not (cols is None and r == c):
            yield (r, c), kernel.compute(rows(r), load_cols(c))
            continue
        if row_span != r:
            row = None  # free the previous row's work before preparing the next
            row, row_span = kernel.prepare(rows(r)), r
        if cols is None and r == c:
            result = {g: symmetrize(b) for g, b in kernel.contract(row, None).items()}
        else:
            result = kernel.contract(row, kernel.prepare(load_cols(c)))
        yield (r, c), result


def largest_size(fits: Callable[[int], bool], n: int) -> int:
    """The largest block size in ``1..n`` for which ``fits`` holds (monotone), or 0."""
    if not fits(1):
        return 0
    lo, hi = 1, max(n, 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def tiled(kernel: Blockwise | BlockFn, x1: _inputs.Inputs, x2: _inputs.Inputs | None,
          batch_size: int | None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Assemble ``{group: (N1, N2, ...)}`` from blocks of at most ``batch_size`` samples.

    ``x1``, ``x2``: batches as ``_inputs`` normalises them (tensors, tuples or dicts).

    With ``x2 is None`` only blocks on and above the diagonal are computed; diagonal
    blocks are symmetrised and the others mirrored, so the result is exactly symmetric.
    Each row block's per-sample work is done once for its whole row (:func:`blocks`).
    """
    if not hasattr(kernel, "prepare"):
        kernel = Pairwise(kernel)
    symmetric = x2 is None
    n1 = _inputs.batch_size(x1)
    n2 = n1 if symmetric else _inputs.batch_size(x2)
    size = batch_size or max(n1, n2, 1)
    pairs = block_pairs(n1, None if symmetric else n2, size)
    out: dict[str, torch.Tensor] = {}

    def rows(span: Span) -> _inputs.Inputs:
        return _inputs.take(x1, *span)

    def cols(span: Span) -> _inputs.Inputs:
        return _inputs.take(x2, *span)

    done = blocks(kernel, rows, None if symmetric else cols, pairs,
                  shared_rows=symmetric or n2 > size)
    for ((r0, r1), (c0, c1)), result in tqdm(done, total=len(pairs), desc="kernel blocks",
                                             disable=not progress or len(pairs) < 2):
        for group, block in result.items():
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
