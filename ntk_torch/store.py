"""Kernels bigger than memory: computed tile by tile into an on-disk store, resumable,
shared by any number of processes, and read back by streaming solvers.

Layout of a store directory (a zarr v3 group, readable from any language with zarr):

- ``kernel/``: the array, ``(N1, N2, O, O)``, ``(N1, N2, O)`` or ``(N1, N2)`` by mode, one
  chunk per tile of ``tile x tile`` samples (each chunk its own file, so concurrent writers
  never touch the same bytes). For the kernel of one set of inputs with itself only the
  tiles on and above the diagonal are stored; reads mirror them.
- ``manifest.json``: format version, mode, dtype, shapes, tile grid, the settings the tiles
  were computed with, and the fingerprint of everything that defines the kernel (hashes of
  the model's architecture and parameter values, the parameter selection, the inputs).
- ``tiles/<i>.<j>.json``: one record per finished tile with the CRC-32 of its values. A
  tile exists exactly when its record does: the record is written (atomically) after the
  chunk, so a tile interrupted at any moment is absent, never half-written.
- ``claims/<i>.<j>``: which worker is computing which tile (see ``_workers``).

Example:
    >>> import tempfile, torch, ntk_torch as nt
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> x = torch.randn(10, 3)
    >>> store = nt.compute_kernel(net, x, store=tempfile.mkdtemp(), tile=4, progress=False)
    >>> store.shape, store.progress
    ((10, 10), (6, 6))
    >>> torch.allclose(store.load(), nt.empirical_ntk(net, x, mode="trace"), atol=1e-6)
    True
"""

from __future__ import annotations

import errno
import json
import math
import os
import queue
import threading
import time
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ntk_torch import _engines, _fingerprint, _workers
from ntk_torch._checks import (
    MODES,
    _describe,
    check_choice,
    check_inputs_match_params,
    check_memory_budget,
    check_model_state,
)
from ntk_torch._engines import Problem
from ntk_torch._functional import ParamSelection, functionalize
from ntk_torch._tiling import Span, blocks, block_pairs, default_memory_budget, spans, transpose_pairs

FORMAT = "ntk_torch.KernelStore"
VERSION = 1
MANIFEST = "manifest.json"
ARRAY = "kernel"
TILES = "tiles"
CLAIMS = "claims"
# What a store directory may hold; anything else means it is not ours to write into.
_OWN_NAMES = {MANIFEST, ARRAY, TILES, CLAIMS, "zarr.json"}
# Output tiles alive at once while computing: one being computed, one queued, one being
# written.
TILES_IN_FLIGHT = 3

Tile = tuple[int, int]


class StoreError(RuntimeError):
    """A kernel store that cannot be used as asked (incomplete, corrupt, or another kernel)."""


# ---------------------------------------------------------------------------------------
# Reading.


class KernelStore:
    """A kernel on disk, computed by :func:`compute_kernel`; read in tiles, never whole
    unless asked.

    Shapes as in :func:`ntk_torch.empirical_ntk`: :attr:`shape` is ``(N1, N2, O, O)``
    (``mode="full"``), ``(N1, N2, O)`` (``"diagonal"``) or ``(N1, N2)`` (``"trace"``).

    Args:
        path: the store directory.
        memory_budget: bytes :meth:`load` may allocate; default half of the available memory.

    Example:
        >>> import tempfile, torch, ntk_torch as nt
        >>> path = tempfile.mkdtemp()
        >>> _ = nt.compute_kernel(torch.nn.Linear(2, 1), torch.eye(2), store=path, progress=False)
        >>> store = nt.KernelStore(path)
        >>> store.mode, store.load()          # x·x' + 1 for nn.Linear(2, 1)
        ('trace', tensor([[2., 1.],
                [1., 2.]]))
    """

    def __init__(self, path: str | os.PathLike, *, memory_budget: float | None = None) -> None:
        self.path = Path(path)
        self.memory_budget = check_memory_budget(memory_budget)
        self.manifest = _read_manifest(self.path)
        m = self.manifest
        self.shape: tuple[int, ...] = tuple(m["shape"])
        self.mode: str = m["mode"]
        self.dtype: torch.dtype = getattr(torch, m["dtype"])
        self.tile: int = m["tile"]
        self.symmetric: bool = m["symmetric"]
        self._array = None
        self._verified: set[Tile] = set()

    def __repr__(self) -> str:
        done, total = self.progress
        return (f"KernelStore({str(self.path)!r}, shape={self.shape}, mode={self.mode!r}, "
                f"dtype={self.dtype}, tiles {done}/{total})")

    @property
    def n_out(self) -> int | None:
        """``O`` for full and diagonal kernels, None for trace kernels."""
        return None if self.mode == "trace" else self.shape[2]

    @property
    def grid(self) -> tuple[int, int]:
        """Tiles along the rows and the columns."""
        return math.ceil(self.shape[0] / self.tile), math.ceil(self.shape[1] / self.tile)

    def tiles(self) -> list[Tile]:
        """Every tile the kernel is made of (only those on and above the diagonal when
        symmetric), row by row."""
        rows, cols = self.grid
        return [(i, j) for i in range(rows) for j in range(i if self.symmetric else 0, cols)]

    def done(self) -> set[Tile]:
        """Tiles with a record (finished and written)."""
        found = set()
        try:
            names = os.listdir(self.path / TILES)
        except FileNotFoundError:
            return found
        for name in names:
            parts = name.split(".")
            if len(parts) == 3 and parts[2] == "json" and parts[0].isdigit() and parts[1].isdigit():
                found.add((int(parts[0]), int(parts[1])))
        return found

    @property
    def progress(self) -> tuple[int, int]:
        """``(finished tiles, total tiles)``."""
        return len(self.done() & set(self.tiles())), len(self.tiles())

    @property
    def complete(self) -> bool:
        done, total = self.progress
        return done == total

    @property
    def nbytes(self) -> int:
        """Bytes of the whole kernel in memory (mirrored half included)."""
        return math.prod(self.shape) * self.dtype.itemsize

    # -- tiles --------------------------------------------------------------------------

    def span(self, index: int, n: int) -> Span:
        return index * self.tile, min((index + 1) * self.tile, n)

    def _zarr(self):
        if self._array is None:
            import zarr

            self._array = zarr.open_array(store=str(self.path), path=ARRAY, mode="r")
        return self._array

    def read_tile(self, i: int, j: int) -> torch.Tensor:
        """Tile ``(i, j)`` as stored, checked against its record's CRC-32."""
        record = _read_record(self.path, (i, j))
        if record is None:
            done, total = self.progress
            raise StoreError(
                f"tile ({i}, {j}) of the kernel store {self.path} has not been computed "
                f"({done} of {total} tiles are done); run compute_kernel with the same "
                "arguments to finish it")
        (r0, r1), (c0, c1) = self.span(i, self.shape[0]), self.span(j, self.shape[1])
        try:
            values = np.ascontiguousarray(self._zarr()[r0:r1, c0:c1])
        except Exception as err:  # unreadable chunk file: zarr's own decoding error
            raise StoreError(f"tile ({i}, {j}) of the kernel store {self.path} cannot be read "
                             f"({err}); run compute_kernel with the same arguments to recompute "
                             "it") from err
        if (i, j) not in self._verified:
            if _crc(values) != record["crc32"]:
                raise StoreError(
                    f"tile ({i}, {j}) of the kernel store {self.path} fails its checksum (the "
                    "file was changed or damaged); run compute_kernel with the same arguments "
                    "to recompute it")
            self._verified.add((i, j))
        return torch.from_numpy(values)

    def _tile_at(self, i: int, j: int) -> torch.Tensor:
        """Tile ``(i, j)`` of the whole kernel, mirrored from ``(j, i)`` below the diagonal."""
        if self.symmetric and i > j:
            return transpose_pairs(self.read_tile(j, i))
        return self.read_tile(i, j)

    # -- dense reads --------------------------------------------------------------------

    def block(self, rows: slice | range, cols: slice | range) -> torch.Tensor:
        """``K[rows, cols]`` as a tensor, from the tiles it overlaps.

        Args:
            rows, cols: contiguous ranges of samples (``slice(a, b)`` or ``range(a, b)``).

        Returns:
            ``(R, C, O, O)``, ``(R, C, O)`` or ``(R, C)`` by mode.
        """
        r0, r1 = _contiguous("rows", rows, self.shape[0])
        c0, c1 = _contiguous("cols", cols, self.shape[1])
        out = torch.empty((r1 - r0, c1 - c0, *self.shape[2:]), dtype=self.dtype)
        for i in range(r0 // self.tile, math.ceil(r1 / self.tile)):
            ti0, ti1 = self.span(i, self.shape[0])
            for j in range(c0 // self.tile, math.ceil(c1 / self.tile)):
                tj0, tj1 = self.span(j, self.shape[1])
                a0, a1, b0, b1 = max(r0, ti0), min(r1, ti1), max(c0, tj0), min(c1, tj1)
                tile = self._tile_at(i, j)
                out[a0 - r0:a1 - r0, b0 - c0:b1 - c0] = tile[a0 - ti0:a1 - ti0, b0 - tj0:b1 - tj0]
        return out

    def load(self) -> torch.Tensor:
        """The whole kernel as one tensor; refused when it would exceed the memory budget."""
        budget = self.memory_budget or default_memory_budget(torch.device("cpu"))
        if self.nbytes > budget:
            raise MemoryError(
                f"the kernel in {self.path} takes {_size(self.nbytes)} in memory but the memory "
                f"budget is {_size(budget)}: read parts with store.block(rows, cols), or use "
                "store.matvec / nt.solve / nt.eigenmodes, which stream it tile by tile "
                "(KernelStore(path, memory_budget=<bytes>) raises the budget)")
        return self.block(slice(0, self.shape[0]), slice(0, self.shape[1]))

    # -- streamed products --------------------------------------------------------------

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        """``K V`` streamed tile by tile, accumulated in float64.

        Layouts: trace mode ``(N2, C) -> (N1, C)``; full mode ``(N2, O, C) -> (N1, O, C)``
        with ``out[a, i] = Σ_{b, j} K[a, b, i, j] V[b, j]``; diagonal mode the same with
        ``out[a, i] = Σ_b K[a, b, i] V[b, i]``. Returned in ``V``'s dtype.
        """
        expected = (self.shape[1], *self.shape[2:3], "C")
        if not isinstance(v, torch.Tensor) or v.dim() != len(expected) or tuple(v.shape[:-1]) != expected[:-1]:
            raise ValueError(f"`V` must have shape {_shape_text(expected)} for this "
                             f"{self.mode}-mode kernel of shape {self.shape}, got {_describe(v)}")
        return self._product(v.double()).to(v.dtype if v.is_floating_point() else torch.float64)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``K v`` streamed tile by tile: trace mode ``(N2,) -> (N1,)`` (or ``(N2, C)``),
        full and diagonal modes ``(N2, O) -> (N1, O)``; see :meth:`matmul`."""
        single = v.dim() == (1 if self.mode == "trace" else 2) if isinstance(v, torch.Tensor) else False
        if not single:
            return self.matmul(v)
        return self.matmul(v.unsqueeze(-1)).squeeze(-1)

    def _product(self, v: torch.Tensor) -> torch.Tensor:
        """``K v`` for ``v`` ``(N2, [O,] C)``, computed and returned in ``v``'s dtype.

        Each tile is read once and converted to that dtype a block of rows at a time into one
        reused buffer (a matrix in the flattened layout: row ``a·O + i``), which serves the
        tile and, below the diagonal of a symmetric store, its mirror image."""
        mode, n1 = self.mode, self.shape[0]
        per = self.shape[2] if mode == "full" else 1
        if mode == "diagonal":  # O independent kernels: batched over outputs
            vv, out = v.transpose(0, 1).contiguous(), v.new_zeros((v.shape[1], n1, v.shape[2]))
        else:
            vv, out = v.reshape(-1, v.shape[-1]), v.new_zeros((n1 * per, v.shape[-1]))
        row_bytes = 8 * min(self.tile, self.shape[1]) * math.prod(self.shape[2:])
        step = max(1, _PRODUCT_BLOCK_BYTES // row_bytes)
        buffer = v.new_empty(0)
        for (i, j), tile in self._stream():
            (r0, _), (c0, c1) = self.span(i, n1), self.span(j, self.shape[1])
            for a0 in range(0, tile.shape[0], step):
                rows = tile[a0:a0 + step]
                a, b = r0 + a0, r0 + a0 + rows.shape[0]
                m, buffer = _matrix(rows, mode, buffer)
                if mode == "diagonal":
                    out[:, a:b] += m @ vv[:, c0:c1]
                    if self.symmetric and i != j:
                        out[:, c0:c1] += m.transpose(1, 2) @ vv[:, a:b]
                else:
                    out[a * per:b * per] += m @ vv[c0 * per:c1 * per]
                    if self.symmetric and i != j:
                        out[c0 * per:c1 * per] += m.T @ vv[a * per:b * per]
        if mode == "diagonal":
            return out.transpose(0, 1)
        return out.reshape(n1, *v.shape[1:])

    def _stream(self) -> Iterator[tuple[Tile, torch.Tensor]]:
        """Every stored tile once, the next one read in the background meanwhile."""
        tiles = self.tiles()
        missing = len(set(tiles) - self.done())
        if missing:
            raise StoreError(f"the kernel store {self.path} is incomplete ({missing} of "
                             f"{len(tiles)} tiles missing); run compute_kernel with the same "
                             "arguments to finish it")
        with _Prefetch(self.read_tile, tiles) as tiles_read:
            yield from tiles_read

    def diagonal(self) -> torch.Tensor:
        """``K[a, a]``: ``(N, O, O)``, ``(N, O)`` or ``(N,)`` by mode, from the diagonal tiles."""
        n = min(self.shape[0], self.shape[1])
        parts = []
        for i in range(math.ceil(n / self.tile)):
            tile = self._tile_at(i, i)
            m = min(tile.shape[0], tile.shape[1])
            idx = torch.arange(m)
            parts.append(tile[idx, idx])
        return torch.cat(parts)[:n]


# Bytes (of float64) that a streamed product converts at once (and keeps as its buffer).
_PRODUCT_BLOCK_BYTES = 128 * 2**20


def _matrix(rows: torch.Tensor, mode: str, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` of a tile as a matrix in ``buffer`` (its dtype; grown as needed): ``(R, C)``
    (trace), ``(R·O, C·O)`` with row ``a·O + i`` (full), or ``(O, R, C)`` (diagonal)."""
    if mode == "full":
        view = rows.permute(0, 2, 1, 3)
        shape = (rows.shape[0] * rows.shape[2], rows.shape[1] * rows.shape[3])
    elif mode == "diagonal":
        view = rows.permute(2, 0, 1)
        shape = tuple(view.shape)
    else:
        view, shape = rows, tuple(rows.shape)
    if buffer.numel() < rows.numel():
        buffer = buffer.new_empty(rows.numel())
    matrix = buffer[:rows.numel()].view(view.shape)
    matrix.copy_(view)
    return matrix.view(shape), buffer


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


# ---------------------------------------------------------------------------------------
# The manifest and the tile records.


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"there is no kernel store at {path} (the directory does not "
                                "exist); create one with nt.compute_kernel(model, x, store=path)")
    if not file.exists():
        raise FileNotFoundError(f"{path} is not a kernel store (it has no {MANIFEST}); create "
                                "one with nt.compute_kernel(model, x, store=path)")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise StoreError(f"the manifest of the kernel store {path} cannot be read: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{file} is not the manifest of an ntk_torch kernel store")
    version = manifest.get("version")
    if version != VERSION:
        newer = isinstance(version, int) and version > VERSION
        raise StoreError(
            f"the kernel store {path} has format version {version!r}, but this ntk_torch reads "
            f"version {VERSION}" + ("; upgrade ntk_torch to read it" if newer else ""))
    return manifest


def _record_path(path: Path, tile: Tile) -> Path:
    return path / TILES / f"{tile[0]}.{tile[1]}.json"


def _read_record(path: Path, tile: Tile) -> dict | None:
    try:
        return json.loads(_record_path(path, tile).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # a damaged record: the tile counts as absent
        return None


def _write_atomic(file: Path, data: bytes) -> None:
    tmp = file.with_name(f".{file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def _crc(values: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(values)).cast("B"))


# ---------------------------------------------------------------------------------------
# Computing.


def compute_kernel(model: nn.Module, x1: torch.Tensor | torch.utils.data.Dataset,
                   x2: torch.Tensor | torch.utils.data.Dataset | None = None, *,
                   store: str | os.PathLike, mode: str = "trace", tile: int = 1024,
                   implementation: str = "auto", params: ParamSelection = None,
                   progress: bool = True, inputs_id: str | None = None,
                   memory_budget: float | None = None) -> KernelStore:
    """Compute the empirical NTK tile by tile into the directory ``store``.

    ``K[a, b, i, j] = Σ_p ∂f_i(x1_a)/∂θ_p ∂f_j(x2_b)/∂θ_p`` as in
    :func:`ntk_torch.empirical_ntk`, in tiles of ``tile x tile`` samples, each computed by
    the engines of ``empirical_ntk`` and written as one chunk of a zarr array (see this
    module's docstring for the layout). Memory holds a few tiles and the inputs of two
    tile blocks, whatever ``N``.

    **Resuming.** Calling again with the same arguments computes only the tiles that are
    missing, or whose checksum fails, and gives bit for bit the kernel an uninterrupted
    run gives (on the same hardware and thread settings). A store holding another kernel
    (different model, parameter values, selection, inputs, mode, dtype, tile or engine) is
    an error that names what differs; kernels are never mixed.

    **Many processes.** Under ``torchrun --nproc-per-node=K`` (and ``--nnodes``) the same
    call splits the tiles over the ranks (gloo on CPU, nccl on CUDA; put each rank's model
    on ``cuda:LOCAL_RANK``) and returns on every rank once all tiles are done. Processes
    started without torch.distributed (a SLURM array, several shells) on the same store
    share the work through atomic per-tile claims; each returns when no tile is left to
    claim. The number of processes may change between runs.

    **Cost.** Each row of tiles prepares its rows' per-sample work (Jacobians, or layer
    inputs and cotangents) once and each tile its columns' (``ntk_vp`` shares nothing), so
    the per-sample work is ``N1 + N2·(rows of tiles)`` samples' worth instead of
    ``2·N1·N2/tile``; the pairwise contraction is the same as in memory. Writing overlaps
    the next tile's computation.

    Args:
        model: as in :func:`ntk_torch.empirical_ntk`.
        x1: inputs ``(N1, ...)``, or a ``torch.utils.data.Dataset`` whose items are inputs
            or ``(input, target)`` pairs (read one tile block at a time).
        x2: inputs ``(N2, ...)`` likewise; ``None`` for the kernel of ``x1`` with itself
            (only tiles on and above the diagonal are computed and stored).
        store: directory of the store; created (with its parents) if missing.
        mode: ``"trace"`` ``(N1, N2)``, ``"diagonal"`` ``(N1, N2, O)`` or ``"full"``
            ``(N1, N2, O, O)``.
        tile: samples per tile side.
        implementation: engine, as in :func:`ntk_torch.empirical_ntk`; ``"auto"`` picks the
            fastest for one tile and the store records the choice.
        params: parameter selection, as in :func:`ntk_torch.empirical_ntk`.
        progress: show a progress bar of the tiles done by all workers, with an ETA.
        inputs_id: for Dataset inputs, a name of their contents to fingerprint them by
            (with their length) instead of hashing every sample.
        memory_budget: bytes one tile's computation may use; default half the available
            memory of the parameters' device.

    Returns:
        The :class:`KernelStore`, complete unless other independent workers are still
        computing tiles they claimed.

    Raises:
        StoreError: the directory holds another kernel, or is not a kernel store.
        OSError: the store cannot be written (read-only, disk full); the finished tiles
            are kept and a later call resumes.
        MemoryError: not even one tile fits the memory budget; the message gives a tile
            size that does.
    """
    check_choice("mode", mode, MODES)
    check_choice("implementation", implementation, ("auto", *_engines.ENGINES))
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"`tile` must be a positive int (samples per tile side), got {tile!r}")
    if not isinstance(store, (str, os.PathLike)):
        raise TypeError(f"`store` must be a directory path (str or os.PathLike), got {_describe(store)}")
    if inputs_id is not None and not isinstance(inputs_id, str):
        raise TypeError(f"`inputs_id` must be a str or None, got {_describe(inputs_id)}")
    budget_arg = check_memory_budget(memory_budget)
    path = Path(store)
    fm = functionalize(model, params)
    check_model_state(fm.module)
    values = fm.params()
    like = next(iter(values.values()))
    if like.dtype not in _NUMPY_DTYPES:
        raise ValueError(f"the model's parameters have dtype {like.dtype}, which a kernel store "
                         f"cannot hold; use one of {', '.join(map(str, _NUMPY_DTYPES))}")
    inputs1 = _Inputs("x1", x1)
    inputs2 = None if x2 is None else _Inputs("x2", x2)
    if inputs2 is not None:
        inputs2.check_like(inputs1)
    sample = inputs1.first.to(like.device)
    check_inputs_match_params(sample, values)

    with torch.no_grad():
        flops, activations, n_out, structure = _engines.profile_forward(fm, values, sample)
        first_outputs = fm(values, sample)
    n1 = len(inputs1)
    n2 = n1 if inputs2 is None else len(inputs2)
    symmetric = inputs2 is None
    shape = {"full": (n1, n2, n_out, n_out), "diagonal": (n1, n2, n_out), "trace": (n1, n2)}[mode]
    b1, b2 = min(tile, n1), min(tile, n2)
    problem = Problem(n1=b1, n2=b2, symmetric=symmetric and b1 >= n1, mode=mode, n_out=n_out,
                      n_params=sum(values[n].numel() for n in fm.names), n_groups=1,
                      forward_flops=flops, activations=activations, itemsize=like.element_size(),
                      structure=structure)
    tile_bytes = problem.output_bytes()
    settings_requested = {"mode": mode, "dtype": str(like.dtype).removeprefix("torch."),
                          "tile": tile, "shape": list(shape)}
    fingerprint = {
        **_fingerprint.model_digests(fm.module),
        "selection": list(fm.names),
        "outputs": first_outputs.double().cpu().reshape(-1).tolist(),
        "x1": inputs1.digest(tile, inputs_id),
        "x2": None if inputs2 is None else inputs2.digest(tile, inputs_id),
    }

    with _workers.worker(like.device) as w:
        # One process checks or creates the store; the others learn the outcome (or the error).
        outcome = None
        if w.rank == 0 or not w.group:
            try:
                engine, budget = _resolve_engine(implementation, problem, budget_arg, like.device,
                                                 tile_bytes, n1, n2, tile)
                manifest = _open_or_create(path, settings_requested, fingerprint, engine, budget,
                                           symmetric, implementation, tile)
                outcome = ("ok", manifest)
            except Exception as err:  # re-raised on every rank below
                outcome = ("error", err)
        outcome = _workers.broadcast(outcome, w)
        if outcome[0] == "error":
            raise outcome[1]
        manifest = outcome[1]
        kernel_store = KernelStore(path)
        _verify_done(kernel_store, w)
        _workers.barrier(w)

        settings = manifest["settings"]
        bound = _engines.Bound(_engines.ENGINES[settings["implementation"]], fm, values, mode, {"": fm.names},
                               problem, settings["memory_budget"])
        _compute_tiles(kernel_store, bound, inputs1, inputs2, like.device, w, progress,
                       shared_rows=symmetric or n2 > tile)
        _workers.barrier(w)
    return KernelStore(path)


_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)


class _Inputs:
    """A tensor or a Dataset of inputs, read one block of samples at a time."""

    def __init__(self, name: str, x: Any) -> None:
        self.name = name
        if isinstance(x, torch.Tensor):
            if x.dim() == 0:
                raise ValueError(f"`{name}` must have a batch dimension, shape (N, ...), got a 0-d tensor")
            self.tensor, self.dataset = x, None
        elif isinstance(x, torch.utils.data.Dataset) and hasattr(x, "__len__"):
            self.tensor, self.dataset = None, x
        else:
            raise TypeError(f"`{name}` must be a torch.Tensor of shape (N, ...) or a sized "
                            f"torch.utils.data.Dataset, got {_describe(x)}")
        if len(self) == 0:
            raise ValueError(f"`{name}` must hold at least one sample for a kernel store, got none")
        self.first = self.load((0, 1))

    def __len__(self) -> int:
        return self.tensor.shape[0] if self.tensor is not None else len(self.dataset)

    def load(self, span: Span) -> torch.Tensor:
        start, stop = span
        if self.tensor is not None:
            return self.tensor[start:stop]
        items = [self._item(i) for i in range(start, stop)]
        shapes = {tuple(t.shape) for t in items}
        if len(shapes) > 1:
            raise ValueError(f"`{self.name}`'s items must share one shape, got {sorted(shapes)} "
                             f"among samples {start}-{stop - 1}")
        return torch.stack(items)

    def _item(self, index: int) -> torch.Tensor:
        item = self.dataset[index]
        if isinstance(item, (tuple, list)):
            item = item[0]
        if not isinstance(item, torch.Tensor):
            try:
                item = torch.as_tensor(item)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"`{self.name}`[{index}] must be a tensor or an (input, target) "
                                f"pair, got {_describe(item)}") from None
        return item

    def check_like(self, other: _Inputs) -> None:
        if self.first.shape[1:] != other.first.shape[1:]:
            raise ValueError(f"`{self.name}` must share `{other.name}`'s sample shape "
                             f"{tuple(other.first.shape[1:])}, got {tuple(self.first.shape[1:])}")
        if self.first.dtype != other.first.dtype:
            raise ValueError(f"`{self.name}` must have `{other.name}`'s dtype {other.first.dtype}, "
                             f"got {self.first.dtype}")

    def digest(self, size: int, inputs_id: str | None) -> dict:
        return _fingerprint.inputs_digest(
            len(self), tuple(self.first.shape[1:]), self.first.dtype,
            lambda a, b: self.load((a, b)), size, inputs_id if self.dataset is not None else None)


def _resolve_engine(implementation: str, problem: Problem, budget: float | None,
                    device: torch.device, tile_bytes: float, n1: int, n2: int,
                    tile: int) -> tuple[str, float]:
    """The engine for one tile and the memory it may use (the budget less the output tiles
    in flight)."""
    total = budget or default_memory_budget(device)
    spare = total - (TILES_IN_FLIGHT - 1) * tile_bytes
    names = list(_engines.ENGINES) if implementation == "auto" else [implementation]
    fitting = [n for n in names if _engines.estimate(n, problem).bytes <= spare]
    if fitting:
        return min(fitting, key=lambda n: _engines.predicted_seconds(n, problem)), spare
    smaller = largest_tile(problem, total, implementation, max(n1, n2))
    hint = (f"; tile={smaller} fits" if smaller else
            "; not even one sample per tile fits: select fewer parameters with `params=` or "
            "raise `memory_budget`")
    raise MemoryError(f"one {problem.n1}x{problem.n2} tile (mode={problem.mode!r}, "
                      f"implementation={implementation!r}) needs more than the memory budget of "
                      f"{_size(total)}{hint}")


def largest_tile(problem: Problem, budget: float, implementation: str, n: int) -> int:
    """The largest tile side whose computation and ``TILES_IN_FLIGHT`` output tiles fit
    ``budget`` with the given (or, for ``"auto"``, any) engine; 0 if none."""
    names = list(_engines.ENGINES) if implementation == "auto" else [implementation]

    def fits(size: int) -> bool:
        p = replace(problem, n1=size, n2=size, symmetric=False)
        out = (TILES_IN_FLIGHT - 1) * p.output_bytes()
        return any(_engines.estimate(e, p).bytes + out <= budget for e in names)

    if not fits(1):
        return 0
    lo, hi = 1, max(n, 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _open_or_create(path: Path, settings: dict, fingerprint: dict, engine: str, budget: float,
                    symmetric: bool, implementation: str, tile: int) -> dict:
    """The store's manifest: checked against this call's, or created with it."""
    manifest_file = path / MANIFEST
    if manifest_file.exists():
        stored = _read_manifest(path)
        _check_same(path, stored, settings, fingerprint, implementation, tile)
        return stored
    if path.exists() and not path.is_dir():
        raise StoreError(f"`store` must be a directory, but {path} is a file")
    if path.is_dir():
        foreign = sorted(set(os.listdir(path)) - _OWN_NAMES)
        if foreign:
            raise StoreError(f"{path} is not a kernel store (no {MANIFEST}) and is not empty "
                             f"(it holds {', '.join(foreign[:5])}); choose a new or empty directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / TILES).mkdir(exist_ok=True)
        (path / CLAIMS).mkdir(exist_ok=True)
        _create_array(path, settings, symmetric, tile)
        manifest = {
            "format": FORMAT, "version": VERSION, **settings, "symmetric": symmetric,
            "grid": [math.ceil(settings["shape"][0] / tile), math.ceil(settings["shape"][1] / tile)],
            "settings": {"implementation": engine, "memory_budget": budget},
            "fingerprint": fingerprint,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        tmp = path / f".{MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        try:
            os.link(tmp, manifest_file)  # fails if another worker created it first
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as err:
        raise _write_error(path, err, "create the kernel store") from err
    stored = _read_manifest(path)
    _check_same(path, stored, settings, fingerprint, implementation, tile)
    return stored


def _create_array(path: Path, settings: dict, symmetric: bool, tile: int) -> None:
    import zarr

    shape = settings["shape"]
    try:
        zarr.create_array(store=str(path), name=ARRAY, shape=shape,
                          chunks=(tile, tile, *shape[2:]), dtype=settings["dtype"],
                          compressors=None, filters=None, fill_value=0, zarr_format=3,
                          attributes={"mode": settings["mode"], "symmetric": symmetric,
                                      "stored": "tiles on and above the diagonal" if symmetric
                                      else "every tile"})
    except zarr.errors.ContainsArrayError:
        pass  # created by an earlier, interrupted call or a concurrent worker


def _check_same(path: Path, stored: dict, settings: dict, fingerprint: dict,
                implementation: str, tile: int) -> None:
    diffs = []
    for key in ("mode", "dtype", "tile"):
        if stored.get(key) != settings[key]:
            diffs.append(f"{key} {stored.get(key)!r} in the store, {settings[key]!r} now")
    engine = stored["settings"]["implementation"]
    if implementation not in ("auto", engine):
        diffs.append(f"implementation {engine!r} in the store, {implementation!r} now "
                     "(pass implementation='auto' to use the store's)")
    if not diffs:
        if stored.get("shape") != settings["shape"]:
            diffs.append(f"shape {tuple(stored.get('shape'))} in the store, {tuple(settings['shape'])} now")
        diffs += _fingerprint.differences(stored["fingerprint"], fingerprint, tile)
    if diffs:
        raise StoreError(
            f"the kernel store {path} holds a different kernel: " + "; ".join(diffs) + ". "
            "Pass the same arguments to resume it, or use another directory (or delete this "
            "one) for a new kernel.")


def _write_error(path: Path, err: OSError, what: str) -> OSError:
    reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
              errno.EACCES: "permission denied", errno.EPERM: "permission denied",
              errno.EROFS: "the file system is read-only"}.get(err.errno, err.strerror or str(err))
    done = ""
    if (path / MANIFEST).exists():
        try:
            finished, total = KernelStore(path).progress
            done = (f" The {finished} of {total} finished tiles are kept: fix this and call "
                    "compute_kernel again with the same arguments to resume.")
        except Exception:
            pass
    return type(err)(err.errno, f"could not {what} at {path}: {reason}.{done}")


def _verify_done(store: KernelStore, w: _workers.Worker) -> None:
    """Check every finished tile (this rank's share of them) against its checksum and drop
    the records of those that fail, so that they are computed again."""
    done = sorted(store.done() & set(store.tiles()))
    for tile in done[w.rank::w.world] if w.group else done:
        try:
            store.read_tile(*tile)
        except StoreError:
            warnings.warn(f"tile {tile} of the kernel store {store.path} failed its checksum and "
                          "will be computed again", RuntimeWarning, stacklevel=3)
            _record_path(store.path, tile).unlink(missing_ok=True)


class _Writer:
    """Writes finished tiles on a background thread (chunk, then its record), so that disk
    I/O overlaps the next tile's computation; errors come back on the next ``put``."""

    def __init__(self, store: KernelStore, claims: _workers.Claims, on_done) -> None:
        import zarr

        self.store, self.claims, self.on_done = store, claims, on_done
        self.array = zarr.open_array(store=str(store.path), path=ARRAY, mode="r+")
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
        (r0, r1), (c0, c1) = store.span(tile[0], store.shape[0]), store.span(tile[1], store.shape[1])
        array = np.ascontiguousarray(values.detach().cpu().numpy())
        self.array[r0:r1, c0:c1] = array
        record = {"crc32": _crc(array), "shape": list(array.shape), "seconds": round(seconds, 3),
                  "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        _write_atomic(_record_path(store.path, tile), json.dumps(record).encode())
        self.claims.release(_key(tile))
        self.on_done()

    def put(self, tile: Tile, values: torch.Tensor, seconds: float) -> None:
        self._raise()
        self.queue.put((tile, values, seconds))

    def _raise(self) -> None:
        if self.error is not None:
            err = self.error
            if isinstance(err, OSError):
                raise _write_error(self.store.path, err, "write a tile of the kernel store") from err
            raise err

    def close(self, raise_error: bool = True) -> None:
        """Write what is queued, stop, and raise the first error (if any)."""
        self.queue.put(None)
        self.thread.join()
        if raise_error:
            self._raise()


def _key(tile: Tile) -> str:
    return f"{tile[0]}.{tile[1]}"


def _compute_tiles(store: KernelStore, bound: _engines.Bound, inputs1: _Inputs, inputs2: _Inputs | None,
                   device: torch.device, w: _workers.Worker, progress: bool, shared_rows: bool) -> None:
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
            if _record_path(store.path, tile).exists() or not claims.take(_key(tile)):
                continue
            yield store.span(tile[0], store.shape[0]), store.span(tile[1], store.shape[1])

    def loader(inputs: _Inputs):
        return lambda span: inputs.load(span).to(device)

    writer = _Writer(store, claims, refresh)
    try:
        with torch.no_grad():  # unselected parameters must not record a graph
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
        raise _write_error(path, err, "write to the kernel store") from err


def _contiguous(name: str, index: Any, n: int) -> Span:
    if isinstance(index, range):
        if index.step != 1:
            raise ValueError(f"`{name}` must be a contiguous range (step 1), got {index!r}")
        start, stop = index.start, index.stop
    elif isinstance(index, slice):
        if index.step not in (None, 1):
            raise ValueError(f"`{name}` must be a contiguous slice (step 1), got {index!r}")
        start, stop, _ = index.indices(n)
    else:
        raise TypeError(f"`{name}` must be a slice or range of samples, got {_describe(index)}")
    if not 0 <= start <= stop <= n:
        raise ValueError(f"`{name}` must lie within the {n} samples, got {start}:{stop}")
    return start, stop


def _shape_text(shape: tuple) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _size(n_bytes: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{n_bytes:.0f} bytes"


__all__ = ["KernelStore", "StoreError", "compute_kernel"]
