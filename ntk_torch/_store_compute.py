"""Computing the tiles of a kernel store.

Inputs read by blocks, the engine for one tile, claims, and a background writer.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ntk_torch import _engines, _fingerprint, _inputs, _workers
from ntk_torch._engines import Problem
from ntk_torch._functional import vmap_errors_explained
from ntk_torch._store_files import (
    ARRAY,
    CLAIMS,
    TILES,
    StoreError,
    Tile,
    crc,
    load_zarr,
    record_path,
    size_text,
    write_atomic,
    write_error,
)
from ntk_torch._tiling import Span, blocks, default_memory_budget, largest_size

# Output tiles alive at once while computing: one being computed, one queued, one being
# written.
TILES_IN_FLIGHT = 3

STORABLE_DTYPES = (torch.float16, torch.float32, torch.float64)


class InputSource:
    """Inputs read one block of samples at a time.

    A batch (a tensor, or a tuple or dict of tensors: ``_inputs``), or a sized Dataset whose
    items are one sample's inputs (a tensor, a dict of tensors) or ``(inputs, target, ...)``
    tuples.
    """

    def __init__(self, name: str, x: Any) -> None:
        self.name = name
        if isinstance(x, torch.utils.data.Dataset) and hasattr(x, "__len__"):
            self.batch, self.dataset = None, x
        else:
            alternative = ", or a sized torch.utils.data.Dataset of samples"
            self.batch = _inputs.normalize(name, x, alternative=alternative)
            self.dataset = None
        if len(self) == 0:
            raise ValueError(f"`{name}` must hold at least one sample for a kernel store, got none")
        self.first = self.load((0, 1))

    def __len__(self) -> int:
        return _inputs.batch_size(self.batch) if self.dataset is None else len(self.dataset)

    def load(self, span: Span) -> _inputs.Inputs:
        start, stop = span
        if self.dataset is None:
            return _inputs.take(self.batch, start, stop)
        items = [self._item(i) for i in range(start, stop)]
        return _inputs.stack(self.name, items, first_index=start)

    def _item(self, index: int) -> Any:
        item = self.dataset[index]
        # (inputs, target) pairs; positional inputs come nested: ((x, mask), target).
        return item[0] if isinstance(item, (tuple, list)) else item

    def check_like(self, other: InputSource) -> None:
        _inputs.check_same_layout(self.name, self.first, other.name, other.first)

    def digest(self, size: int, inputs_id: str | None) -> dict:
        return _fingerprint.inputs_digest(
            len(self), _inputs.describe_layout(self.first),
            lambda a, b: _inputs.digest(self.load((a, b))), size,
            inputs_id if self.dataset is not None else None)


@dataclass(frozen=True)
class Job:
    """What a kernel store's tiles are.

    Shapes, the engine's view of one tile, the settings and fingerprint the manifest
    records.
    """

    problem: Problem
    symmetric: bool
    n1: int
    n2: int
    settings: dict
    fingerprint: dict


def plan(fm, values: dict[str, torch.Tensor], sample: _inputs.Inputs, inputs1: InputSource,
         inputs2: InputSource | None, mode: str, tile: int, inputs_id: str | None) -> Job:
    """Profile the model on one sample and fingerprint everything that defines the kernel."""
    like = next(iter(values.values()))
    with torch.no_grad():
        flops, activations, n_out, probe = _engines.profile_forward(fm, values, sample)
        first_outputs = fm(values, sample)
    n1 = len(inputs1)
    n2 = n1 if inputs2 is None else len(inputs2)
    symmetric = inputs2 is None
    shape = {"full": (n1, n2, n_out, n_out), "diagonal": (n1, n2, n_out), "trace": (n1, n2)}[mode]
    b1, b2 = min(tile, n1), min(tile, n2)
    # As empirical_ntk(batch_size=tile) plans its blocks: the same tiles, bit for bit.
    problem = Problem(n1=b1, n2=b2, symmetric=symmetric and b1 >= n1, mode=mode, n_out=n_out,
                      n_params=sum(values[n].numel() for n in fm.names), n_groups=1,
                      forward_flops=flops, activations=activations,
                      itemsize=like.element_size(), probe=probe)
    settings = {"mode": mode, "dtype": str(like.dtype).removeprefix("torch."), "tile": tile,
                "shape": list(shape)}
    fingerprint = {
        **_fingerprint.model_digests(fm.module),
        "selection": list(fm.names),
        "outputs": first_outputs.double().cpu().reshape(-1).tolist(),
        "x1": inputs1.digest(tile, inputs_id),
        "x2": None if inputs2 is None else inputs2.digest(tile, inputs_id),
    }
    return Job(problem, symmetric, n1, n2, settings, fingerprint)


def resolve_engine(implementation: str, job: Job, budget: float | None,
                   device: torch.device) -> tuple[str, float]:
    """The engine for one tile and the memory it may use.

    That is the budget less the output tiles in flight.
    """
    problem, tile = job.problem, job.settings["tile"]
    total = budget or default_memory_budget(device)
    spare = total - (TILES_IN_FLIGHT - 1) * problem.output_bytes()
    if implementation == "auto":
        names = _engines.candidates(problem)
    else:
        _engines.check_runs(implementation, problem)
        names = (implementation,)
    fitting = [n for n in names if _engines.estimate(n, problem).bytes <= spare]
    if fitting:
        if implementation == "auto" and (message := _engines.fallback_warning(problem)):
            warnings.warn(message, UserWarning, stacklevel=3)
        return min(fitting, key=lambda n: _engines.predicted_seconds(n, problem)), spare
    smaller = largest_tile(problem, total, implementation, max(job.n1, job.n2))
    hint = (f"; tile={smaller} fits" if smaller and smaller < tile else
            "; not even one sample per tile fits: select fewer parameters with `params=` or "
            "raise `memory_budget`")
    raise MemoryError(f"one {problem.n1}x{problem.n2} tile (mode={problem.mode!r}, "
                      f"implementation={implementation!r}) needs more than the memory budget of "
                      f"{size_text(total)}{hint}")


def largest_tile(problem: Problem, budget: float, implementation: str, n: int) -> int:
    """The largest tile side that fits ``budget``; 0 if none.

    Its computation and ``TILES_IN_FLIGHT`` output tiles must fit, with the given (or, for
    ``"auto"``, any) engine.
    """
    names = _engines.candidates(problem) if implementation == "auto" else [implementation]

    def fits(size: int) -> bool:
        p = replace(problem, n1=size, n2=size, symmetric=False)
        out = (TILES_IN_FLIGHT - 1) * p.output_bytes()
        return any(_engines.estimate(e, p).bytes + out <= budget for e in names)

    return largest_size(fits, n)



def verify_done(store, w: _workers.Worker) -> None:
    """Check every finished tile (this rank's share of them) against its checksum.

    The records of those that fail are dropped, so that they are computed again.
    """
    done = sorted(store.done() & set(store.tiles()))
    for tile in done[w.rank::w.world] if w.group else done:
        try:
            store.read_tile(*tile)
        except StoreError:
            warnings.warn(f"tile {tile} of the kernel store {store.path} failed its checksum and "
                          "will be computed again", RuntimeWarning, stacklevel=3)
            record_path(store.path, tile).unlink(missing_ok=True)


class _Writer:
    """Writes finished tiles on a background thread (chunk, then its record).

    Disk I/O overlaps the next tile's computation; errors come back on the next ``put``.
    """

    def __init__(self, store, claims: _workers.Claims, on_done) -> None:
        self.store, self.claims, self.on_done = store, claims, on_done
        self.array = load_zarr().open_array(store=str(store.path), path=ARRAY, mode="r+")
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="ntk-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self._write(*item)
                except BaseException as err:  # handed to the computing thread
                    self.error = err

    def _write(self, tile: Tile, values: torch.Tensor, seconds: float) -> None:
        store = self.store
        (r0, r1) = store.span(tile[0], store.shape[0])
        (c0, c1) = store.span(tile[1], store.shape[1])
        array = np.ascontiguousarray(values.detach().cpu().numpy())
        self.array[r0:r1, c0:c1] = array
        record = {"crc32": crc(array), "shape": list(array.shape), "seconds": round(seconds, 3),
                  "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_atomic(record_path(store.path, tile), json.dumps(record).encode())
        self.claims.release(_key(tile))
        self.on_done()

    def put(self, tile: Tile, values: torch.Tensor, seconds: float) -> None:
        self._raise()
        self.queue.put((tile, values, seconds))

    def _raise(self) -> None:
        if self.error is not None:
            err = self.error
            if isinstance(err, OSError):
                raise write_error(self.store.path, err, "write a tile of the kernel store") from err
            raise err

    def close(self, raise_error: bool = True) -> None:
        """Write what is queued, stop, and raise the first error (if any)."""
        self.queue.put(None)
        self.thread.join()
        if raise_error:
            self._raise()


def _key(tile: Tile) -> str:
    return f"{tile[0]}.{tile[1]}"


def compute_tiles(store, bound: _engines.Bound, inputs1: InputSource,
                  inputs2: InputSource | None, device: torch.device, w: _workers.Worker,
                  progress: bool, shared_rows: bool) -> None:
    """Claim and compute the missing tiles, row by row from this worker's starting point."""
    _check_writable(store.path)
    pending = [t for t in store.tiles() if t not in store.done()]
    start = w.start(len(pending))
    order = pending[start:] + pending[:start]
    claims = _workers.Claims(store.path / CLAIMS)
    total = len(store.tiles())
    bar = tqdm(total=total, initial=total - len(pending), desc="kernel tiles", unit="tile",
               disable=not progress or (w.group and w.rank != 0), dynamic_ncols=True)

    def refresh() -> None:  # tiles done by every worker, not just this one
        bar.update(store.progress[0] - bar.n)

    def claimed() -> Iterator[tuple[Span, Span]]:
        for tile in order:
            if record_path(store.path, tile).exists() or not claims.take(_key(tile)):
                continue
            yield store.span(tile[0], store.shape[0]), store.span(tile[1], store.shape[1])

    def loader(inputs: InputSource):
        return lambda span: _inputs.to_device(inputs.load(span), device)

    writer = _Writer(store, claims, refresh)
    engine = store.manifest["settings"]["implementation"]
    try:
        # no_grad: unselected parameters must not record a graph.
        with torch.no_grad(), vmap_errors_explained(engine):
            started = time.perf_counter()
            for (rows, cols), result in blocks(bound, loader(inputs1),
                                               None if inputs2 is None else loader(inputs2),
                                               claimed(), shared_rows=shared_rows):
                tile = (rows[0] // store.tile, cols[0] // store.tile)
                writer.put(tile, result[""], time.perf_counter() - started)
                started = time.perf_counter()
    except BaseException:
        writer.close(raise_error=False)  # the tile already queued is still written
        raise
    else:
        writer.close()
    finally:
        claims.close()
        bar.close()


def _check_writable(path: Path) -> None:
    probe = path / TILES / f".write-test.{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise write_error(path, err, "write to the kernel store") from err
