"""How several processes share the tiles of one kernel.

A torch.distributed group when the job runs under ``torchrun``, and atomic per-tile claim
files in every case.

A claim is a file written aside and hard-linked into place (``os.link`` creates it only if
absent, atomically on local and NFS file systems), so it is never seen half written:
whoever creates it computes the tile. A worker refreshes the modification time
of the claims it holds every ``HEARTBEAT_S`` seconds; a claim is stale (its worker died)
when its process is gone from this host, or when it has not been refreshed for
``STALE_AFTER_S`` seconds. Stale claims are taken over. Two workers that both take over
the same stale claim compute the same tile twice, which is wasteful but harmless: tiles
are deterministic and written atomically.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


@dataclass(frozen=True)
class Worker:
    """This process's place among the workers: ``rank`` of ``world``.

    ``group`` is True when a torch.distributed process group connects them (then every rank
    runs the same call).
    """

    rank: int
    world: int
    group: bool

    def start(self, n: int) -> int:
        """Where this worker starts in a list of ``n`` pending tiles.

        Evenly spaced, so that workers begin on different rows and each keeps its row
        blocks for long.
        """
        return n * self.rank // max(self.world, 1)


@contextmanager
def worker(device: torch.device) -> Iterator[Worker]:
    """The running worker.

    Under ``torchrun`` (``WORLD_SIZE > 1``) it joins the process group, initialising it
    (gloo on CPU, nccl on CUDA) when the caller has not, and leaves it as it was found.
    """
    if dist.is_available() and dist.is_initialized():
        yield Worker(dist.get_rank(), dist.get_world_size(), True)
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and "MASTER_ADDR" in os.environ:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
        try:
            yield Worker(dist.get_rank(), dist.get_world_size(), True)
        finally:
            dist.destroy_process_group()
        return
    # Independent workers (a SLURM array, several shells): claims alone share the work.
    index = os.environ.get("SLURM_ARRAY_TASK_ID")
    count = os.environ.get("SLURM_ARRAY_TASK_COUNT")
    if index is not None and count is not None and index.isdigit() and count.isdigit():
        yield Worker(int(index) % int(count), int(count), False)
    else:
        yield Worker(0, 1, False)


def broadcast(value: object, w: Worker) -> object:
    """Rank 0's ``value`` on every rank of the group (the value itself without one)."""
    if not w.group:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(w: Worker) -> None:
    if w.group:
        dist.barrier()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Claims:
    """Claim files ``<directory>/<key>`` held by this process, kept fresh by a heartbeat."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.host = socket.gethostname()
        self.held: set[Path] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _identity(self) -> bytes:
        return json.dumps({"host": self.host, "pid": os.getpid(), "time": time.time()}).encode()

    def take(self, key: str) -> bool:
        """Claim ``key``; False if a live worker holds it."""
        path = self.directory / key
        # The claim appears whole or not at all: written aside, then linked into place (an
        # atomic create-if-absent). A worker killed between creating the file and writing
        # it would otherwise leave an empty claim that no one could tell from a live one.
        tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
        tmp.write_bytes(self._identity())
        try:
            os.link(tmp, path)
        except FileExistsError:
            if not self._stale(path):
                tmp.unlink()
                return False
            os.replace(tmp, path)
            try:  # another worker may have taken it over at the same moment
                if json.loads(path.read_bytes()).get("pid") != os.getpid():
                    return False
            except (OSError, ValueError):
                return False
        else:
            tmp.unlink()
        with self._lock:
            self.held.add(path)
        self._start_heartbeat()
        return True

    def release(self, key: str) -> None:
        path = self.directory / key
        with self._lock:
            self.held.discard(path)
        try:
            path.unlink()
        except FileNotFoundError:
            pass

    def _stale(self, path: Path) -> bool:
        try:
            info = json.loads(path.read_bytes())
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        except (OSError, ValueError):  # being written right now, or garbage
            try:
                return time.time() - path.stat().st_mtime > STALE_AFTER_S
            except OSError:
                return True
        if info.get("host") == self.host:
            pid = int(info.get("pid", -1))
            if pid == os.getpid():  # ours, unless an earlier call of this process left it
                return path not in self.held
            return not _alive(pid)
        return age > STALE_AFTER_S

    def _start_heartbeat(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="ntk-claims", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                held = list(self.held)
            for path in held:
                try:
                    os.utime(path)
                except OSError:
                    pass

    def close(self) -> None:
        """Release every claim still held and stop the heartbeat."""
        self._stop.set()
        for path in list(self.held):
            self.release(path.name)
        if self._thread is not None:
            self._thread.join()
