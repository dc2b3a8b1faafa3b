"""Products ``K V`` streamed over a kernel store.

Every tile is read once, the next one in the background, and converted a block of rows at
a time into one reused buffer.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator

import torch

from ntk_torch._kernel_matrix import as_matrix, per_output_blocks
from ntk_torch._store_files import StoreError, Tile

__all__ = ["stream", "stream_product"]


def stream_product(store, v: torch.Tensor) -> torch.Tensor:
    """``K v`` for ``v`` ``(N2, [O,] C)``, computed and returned in ``v``'s dtype.

    Each tile is read once and converted to that dtype a block of rows at a time into one
    reused buffer (a matrix in the flattened layout: row ``a·O + i``), which serves the
    tile and, below the diagonal of a symmetric store, its mirror image.
    """
    mode, n1 = store.mode, store.shape[0]
    per = store.shape[2] if mode == "full" else 1
    if mode == "diagonal":  # O independent kernels: batched over outputs
        vv, out = v.transpose(0, 1).contiguous(), v.new_zeros((v.shape[1], n1, v.shape[2]))
    else:
        vv, out = v.reshape(-1, v.shape[-1]), v.new_zeros((n1 * per, v.shape[-1]))
    row_bytes = 8 * min(store.tile, store.shape[1]) * math.prod(store.shape[2:])
    step = max(1, _PRODUCT_BLOCK_BYTES // row_bytes)
    buffer = v.new_empty(0)
    for (i, j), tile in stream(store):
        (r0, _), (c0, c1) = store.span(i, n1), store.span(j, store.shape[1])
        for a0 in range(0, tile.shape[0], step):
            rows = tile[a0:a0 + step]
            a, b = r0 + a0, r0 + a0 + rows.shape[0]
            m, buffer = _matrix(rows, mode, buffer)
            if mode == "diagonal":
                out[:, a:b] += m @ vv[:, c0:c1]
                if store.symmetric and i != j:
                    out[:, c0:c1] += m.transpose(1, 2) @ vv[:, a:b]
            else:
                out[a * per:b * per] += m @ vv[c0 * per:c1 * per]
                if store.symmetric and i != j:
                    out[c0 * per:c1 * per] += m.T @ vv[a * per:b * per]
    if mode == "diagonal":
        return out.transpose(0, 1)
    return out.reshape(n1, *v.shape[1:])


def stream(store) -> Iterator[tuple[Tile, torch.Tensor]]:
    """Every stored tile of ``store`` once, the next one read in the background meanwhile."""
    tiles = store.tiles()
    missing = len(set(tiles) - store.done())
    if missing:
        raise StoreError(f"the kernel store {store.path} is incomplete ({missing} of "
                         f"{len(tiles)} tiles missing); run compute_kernel with the same "
                         "arguments to finish it")
    with _Prefetch(store.read_tile, tiles) as tiles_read:
        yield from tiles_read


# Bytes (of float64) that a streamed product converts at once (and keeps as its buffer).
_PRODUCT_BLOCK_BYTES = 128 * 2**20


def _matrix(rows: torch.Tensor, mode: str,
            buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` of a tile as a matrix in ``buffer`` (its dtype; grown as needed).

    ``(R, C)`` (trace), ``(R·O, C·O)`` with row ``a·O + i`` (full), or ``(O, R, C)``
    (diagonal).
    """
    if buffer.numel() < rows.numel():
        buffer = buffer.new_empty(rows.numel())
    if mode == "diagonal":
        blocks = per_output_blocks(rows)
        matrix = buffer[:rows.numel()].view(blocks.shape)
        return matrix.copy_(blocks), buffer
    return as_matrix(rows, out=buffer), buffer


class _Prefetch:
    """Reads ``read(i, j)`` for each tile in order on a background thread, one ahead."""

    def __init__(self, read, tiles: list[Tile]) -> None:
        self.read, self.tiles = read, tiles
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ntk-prefetch", daemon=True)

    def _run(self) -> None:
        for tile in self.tiles:
            if self.stop.is_set():
                return
            try:
                item = (tile, self.read(*tile), None)
            except BaseException as err:  # handed to the reader, raised there
                item = (tile, None, err)
            while not self.stop.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def __enter__(self) -> Iterator[tuple[Tile, torch.Tensor]]:
        self.thread.start()

        def items():
            for _ in self.tiles:
                tile, values, err = self.queue.get()
                if err is not None:
                    raise err
                yield tile, values

        return items()

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
