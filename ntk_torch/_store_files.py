"""The files of a kernel store: the manifest, the per-tile records, the zarr array.

See :mod:`ntk_torch.store` for the layout. Every file that marks progress is written
atomically (a temporary file renamed over it), so a process killed at any moment leaves
either the old or the new version, never a mix.
"""

from __future__ import annotations

import errno
import json
import math
import os
import threading
import zlib
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

import numpy as np

from ntk_torch import _fingerprint
from ntk_torch._extras import require

FORMAT = "ntk_torch.KernelStore"
VERSION = 1
MANIFEST = "manifest.json"
ARRAY = "kernel"
TILES = "tiles"
CLAIMS = "claims"
# What a store directory may hold; anything else means it is not ours to write into.
_OWN_NAMES = {MANIFEST, ARRAY, TILES, CLAIMS, "zarr.json"}
Tile = tuple[int, int]


class StoreError(RuntimeError):
    """A kernel store that cannot be used as asked (incomplete, corrupt, or another kernel)."""




def all_tiles(grid: list[int] | tuple[int, int], symmetric: bool) -> list[Tile]:
    """The tiles of a kernel, row by row (on and above the diagonal when symmetric)."""
    rows, cols = grid
    return [(i, j) for i in range(rows) for j in range(i if symmetric else 0, cols)]


def done_tiles(path: Path) -> set[Tile]:
    """Tiles with a record (finished and written)."""
    found = set()
    try:
        names = os.listdir(path / TILES)
    except FileNotFoundError:
        return found
    for name in names:
        parts = name.split(".")
        if len(parts) == 3 and parts[2] == "json" and parts[0].isdigit() and parts[1].isdigit():
            found.add((int(parts[0]), int(parts[1])))
    return found


def read_manifest(path: Path) -> dict:
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


def record_path(path: Path, tile: Tile) -> Path:
    return path / TILES / f"{tile[0]}.{tile[1]}.json"


def read_record(path: Path, tile: Tile) -> dict | None:
    try:
        return json.loads(record_path(path, tile).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # a damaged record: the tile counts as absent
        return None


def write_atomic(file: Path, data: bytes) -> None:
    tmp = file.with_name(f".{file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def crc(values: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(values)).cast("B"))



def open_or_create(path: Path, settings: dict, fingerprint: dict, engine: str, budget: float,
                    symmetric: bool, implementation: str, tile: int) -> dict:
    """The store's manifest: checked against this call's, or created with it."""
    manifest_file = path / MANIFEST
    if manifest_file.exists():
        stored = read_manifest(path)
        check_same(path, stored, settings, fingerprint, implementation, tile)
        return stored
    if path.exists() and not path.is_dir():
        raise StoreError(f"`store` must be a directory, but {path} is a file")
    if path.is_dir():
        foreign = sorted(set(os.listdir(path)) - _OWN_NAMES)
        if foreign:
            raise StoreError(f"{path} is not a kernel store (no {MANIFEST}) and is not empty "
                             f"(it holds {', '.join(foreign[:5])}); choose a new or empty "
                             "directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / TILES).mkdir(exist_ok=True)
        (path / CLAIMS).mkdir(exist_ok=True)
        create_array(path, settings, symmetric, tile)
        manifest = {
            "format": FORMAT, "version": VERSION, **settings, "symmetric": symmetric,
            "grid": [math.ceil(settings["shape"][0] / tile),
                     math.ceil(settings["shape"][1] / tile)],
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
        raise write_error(path, err, "create the kernel store") from err
    stored = read_manifest(path)
    check_same(path, stored, settings, fingerprint, implementation, tile)
    return stored


def load_zarr() -> ModuleType:
    """zarr, which the store's array format needs: imported on first use, named if missing."""
    return require("zarr", "store", "the kernel store")


def create_array(path: Path, settings: dict, symmetric: bool, tile: int) -> None:
    zarr = load_zarr()
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


def check_same(path: Path, stored: dict, settings: dict, fingerprint: dict,
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
            diffs.append(f"shape {tuple(stored.get('shape'))} in the store, "
                         f"{tuple(settings['shape'])} now")
        diffs += _fingerprint.differences(stored["fingerprint"], fingerprint, tile)
    if diffs:
        raise StoreError(
            f"the kernel store {path} holds a different kernel: " + "; ".join(diffs) + ". "
            "Pass the same arguments to resume it, or use another directory (or delete this "
            "one) for a new kernel.")


def write_error(path: Path, err: OSError, what: str) -> OSError:
    reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
              errno.EACCES: "permission denied", errno.EPERM: "permission denied",
              errno.EROFS: "the file system is read-only"}.get(err.errno, err.strerror or str(err))
    done = ""
    if (path / MANIFEST).exists():
        try:
            manifest = read_manifest(path)
            expected = set(all_tiles(manifest["grid"], manifest["symmetric"]))
            finished = len(done_tiles(path) & expected)
            done = (f" The {finished} of {len(expected)} finished tiles are kept: fix this "
                    "and call compute_kernel again with the same arguments to resume.")
        except (OSError, StoreError, KeyError):
            pass
    return type(err)(err.errno, f"could not {what} at {path}: {reason}.{done}")


def size_text(n_bytes: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{n_bytes:.0f} bytes"
