"""Kernels bigger than memory: computed tile by tile into an on-disk store.

Stores are resumable, shared by any number of processes, and read back by streaming
solvers.

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

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ntk_torch import _engines, _inputs, _workers
from ntk_torch._checks import (
    MODES,
    check_choice,
    check_int,
    check_memory_budget,
    check_sample_range,
    describe,
)
from ntk_torch._functional import OutputSelection, ParamSelection, functionalize
from ntk_torch._kernel_matrix import transpose_pairs
from ntk_torch._model_checks import check_model_behaviour, check_model_state
from ntk_torch._store_compute import (
    STORABLE_DTYPES,
    InputSource,
    compute_tiles,
    plan,
    resolve_engine,
    verify_done,
)
from ntk_torch._store_files import (
    ARRAY,
    StoreError,
    Tile,
    all_tiles,
    crc,
    done_tiles,
    load_zarr,
    open_or_create,
    read_manifest,
    read_record,
    size_text,
)
from ntk_torch._store_products import stream_product
from ntk_torch._tiling import Span, default_memory_budget

# ---------------------------------------------------------------------------------------
# Reading.


class KernelStore:
    """A kernel on disk, computed by :func:`compute_kernel`.

    It is read in tiles, never whole unless asked.

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
        load_zarr()
        self.path = Path(path)
        self.memory_budget = check_memory_budget(memory_budget)
        self.manifest = read_manifest(self.path)
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
        """Every tile the kernel is made of, row by row.

        Only those on and above the diagonal when symmetric.
        """
        return all_tiles(self.grid, self.symmetric)

    def done(self) -> set[Tile]:
        """Tiles with a record (finished and written)."""
        return done_tiles(self.path)

    @property
    def progress(self) -> tuple[int, int]:
        """``(finished tiles, total tiles)``."""
        return len(self.done() & set(self.tiles())), len(self.tiles())

    @property
    def complete(self) -> bool:
        """Whether every tile is finished."""
        done, total = self.progress
        return done == total

    @property
    def nbytes(self) -> int:
        """Bytes of the whole kernel in memory (mirrored half included)."""
        return math.prod(self.shape) * self.dtype.itemsize

    # -- tiles --------------------------------------------------------------------------

    def span(self, index: int, n: int) -> Span:
        """Samples ``[start, stop)`` of tile ``index`` along an axis of ``n`` samples."""
        return index * self.tile, min((index + 1) * self.tile, n)

    def _zarr(self):
        if self._array is None:
            self._array = load_zarr().open_array(store=str(self.path), path=ARRAY, mode="r")
        return self._array

    def read_tile(self, i: int, j: int) -> torch.Tensor:
        """Tile ``(i, j)`` as stored, checked against its record's CRC-32."""
        record = read_record(self.path, (i, j))
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
            if crc(values) != record["crc32"]:
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
            rows: contiguous range of samples (``slice(a, b)`` or ``range(a, b)``).
            cols: contiguous range of samples, likewise.

        Returns:
            ``(R, C, O, O)``, ``(R, C, O)`` or ``(R, C)`` by mode.
        """
        r0, r1 = check_sample_range("rows", rows, self.shape[0])
        c0, c1 = check_sample_range("cols", cols, self.shape[1])
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
                f"the kernel in {self.path} takes {size_text(self.nbytes)} in memory but the "
                f"memory budget is {size_text(budget)}: read parts with store.block(rows, cols), "
                "or use store.matvec / nt.solve / nt.eigenmodes, which stream it tile by tile "
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
        expected_text = "(" + ", ".join(map(str, expected)) + ")"
        fits = (isinstance(v, torch.Tensor) and v.dim() == len(expected)
                and tuple(v.shape[:-1]) == expected[:-1])
        if not fits:
            raise ValueError(f"`V` must have shape {expected_text} for this "
                             f"{self.mode}-mode kernel of shape {self.shape}, got {describe(v)}")
        dtype = v.dtype if v.is_floating_point() else torch.float64
        return stream_product(self, v.double()).to(dtype)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``K v`` streamed tile by tile; see :meth:`matmul`.

        Trace mode ``(N2,) -> (N1,)`` (or ``(N2, C)``), full and diagonal modes
        ``(N2, O) -> (N1, O)``.
        """
        single = isinstance(v, torch.Tensor) and v.dim() == (1 if self.mode == "trace" else 2)
        if not single:
            return self.matmul(v)
        return self.matmul(v.unsqueeze(-1)).squeeze(-1)

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


# ---------------------------------------------------------------------------------------
# Computing.


def compute_kernel(model: nn.Module, x1: _inputs.Batch | torch.utils.data.Dataset,
                   x2: _inputs.Batch | torch.utils.data.Dataset | None = None, *,
                   store: str | os.PathLike, mode: str = "trace", tile: int = 1024,
                   implementation: str = "auto", params: ParamSelection = None,
                   progress: bool = True, inputs_id: str | None = None,
                   memory_budget: float | None = None, output: OutputSelection = None,
                   model_kwargs: dict[str, Any] | None = None) -> KernelStore:
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
        x1: inputs ``(N1, ...)`` as in :func:`ntk_torch.empirical_ntk` (a tensor, a tuple or
            a dict of tensors), or a ``torch.utils.data.Dataset`` whose items are one
            sample's inputs (a tensor, a dict of tensors) or ``(inputs, target)`` pairs
            (read one tile block at a time). The fingerprint hashes every tensor.
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
        output: as in :func:`ntk_torch.empirical_ntk`. A resumed store checks it, and
            ``model_kwargs``, through the model's outputs on the first input.
        model_kwargs: as in :func:`ntk_torch.empirical_ntk`.

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
    load_zarr()  # before any work: the store cannot be written without it
    check_choice("mode", mode, MODES)
    check_choice("implementation", implementation, ("auto", *_engines.ENGINES))
    check_int("tile", tile, low=1)
    if not isinstance(store, (str, os.PathLike)):
        raise TypeError("`store` must be a directory path (str or os.PathLike), "
                        f"got {describe(store)}")
    if inputs_id is not None and not isinstance(inputs_id, str):
        raise TypeError(f"`inputs_id` must be a str or None, got {describe(inputs_id)}")
    budget_arg = check_memory_budget(memory_budget)
    path = Path(store)
    fm = functionalize(model, params, output=output, model_kwargs=model_kwargs)
    check_model_state(fm.module)
    values = fm.params()
    like = next(iter(values.values()))
    if like.dtype not in STORABLE_DTYPES:
        raise ValueError(f"the model's parameters have dtype {like.dtype}, which a kernel store "
                         f"cannot hold; use one of {', '.join(map(str, STORABLE_DTYPES))}")
    inputs1 = InputSource("x1", x1)
    inputs2 = None if x2 is None else InputSource("x2", x2)
    if inputs2 is not None:
        inputs2.check_like(inputs1)
    sample = _inputs.to_device(inputs1.first, like.device)
    _inputs.check_against_params("x1", sample, values)
    check_model_behaviour(
        fm, values, _inputs.to_device(inputs1.load((0, min(2, len(inputs1)))), like.device),
        None if inputs2 is None else _inputs.to_device(inputs2.first, like.device))

    job = plan(fm, values, sample, inputs1, inputs2, mode, tile, inputs_id)

    with _workers.worker(like.device) as w:
        # One process checks or creates the store; the others learn the outcome (or the error).
        outcome = None
        if w.rank == 0 or not w.group:
            try:
                engine, budget = resolve_engine(implementation, job, budget_arg, like.device)
                manifest = open_or_create(path, job.settings, job.fingerprint, engine, budget,
                                          job.symmetric, implementation, tile)
                outcome = ("ok", manifest)
            except Exception as err:  # re-raised on every rank below
                outcome = ("error", err)
        outcome = _workers.broadcast(outcome, w)
        if outcome[0] == "error":
            raise outcome[1]
        manifest = outcome[1]
        kernel_store = KernelStore(path)
        verify_done(kernel_store, w)
        _workers.barrier(w)

        settings = manifest["settings"]
        bound = _engines.Bound(_engines.ENGINES[settings["implementation"]], fm, values, mode,
                               {"": fm.names}, job.problem, settings["memory_budget"])
        compute_tiles(kernel_store, bound, inputs1, inputs2, like.device, w, progress,
                      shared_rows=job.symmetric or len(inputs2) > tile)
        _workers.barrier(w)
    return KernelStore(path)


__all__ = ["KernelStore", "StoreError", "compute_kernel"]
