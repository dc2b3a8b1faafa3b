"""Timing and memory helpers for the benchmarks: medians, peak RSS of a fresh process, the CPU."""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Samples:
    """Wall-clock seconds of the timed calls of one method."""

    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(methods: dict[str, Callable[[], object]], repeats: int, budget_s: float,
              warmup_limit_s: float = 5.0) -> dict[str, Samples]:
    """Median-ready samples, calling the methods in turn (A B C A B C ...).

    Each method is called once untimed to warm up (allocator, oneDNN kernel choice) unless
    that first call took longer than ``warmup_limit_s``, in which case warm-up effects are
    negligible and the call counts as a sample. A method stops being repeated once its
    timed calls add up to ``budget_s`` (at least one sample each).
    """
    samples = {name: Samples() for name in methods}
    for name, fn in methods.items():
        first = timed(fn)
        if first > warmup_limit_s:
            samples[name].seconds.append(first)
    for _ in range(repeats):
        for name, fn in methods.items():
            s = samples[name]
            if len(s.seconds) >= repeats or (s.seconds and sum(s.seconds) >= budget_s):
                continue
            s.seconds.append(timed(fn))
    return samples


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matmul throughput of this machine (GFLOP/s), best of ``repeats``."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory.

    Linux: ``VmHWM`` of ``/proc/self/status``, which belongs to this address space.
    (``getrusage``'s ``ru_maxrss`` also counts what a forked child inherited from a large
    parent before ``exec``, so a benchmark's workers would all start at its peak.)
    """
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, bytes on macOS


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> int:
    """Reset the high-water mark to the current resident size (Linux); returns the baseline.

    After a warm-up call this excludes one-off costs (libraries' lazy initialisation)
    from the next call's measured peak. Elsewhere the baseline is the peak so far.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        current = _status_bytes("VmRSS")
        if current is not None:
            return current
    except OSError:
        pass
    return peak_rss_bytes()


def run_worker(argv: list[str], timeout_s: float) -> dict:
    """Run ``python <argv>`` in a fresh process and parse the JSON it prints last."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
