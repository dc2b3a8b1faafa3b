"""Kernel store benchmarks: what writing to disk, resuming and more processes cost.

Parts (``--parts``, all by default):

- ``overhead``: the full-mode eNTK of all 1,797 digits (the ``ntk-torch kernel`` MLP,
  64-512-512-10, ``O = 10``: 1.3 GB in float32) with ``compute_kernel`` against the same
  tiles in memory (``empirical_ntk(..., batch_size=tile)``), alternated, medians.
- ``solve``: ``nt.solve`` (Nyström-preconditioned CG, streamed) on that store against a
  dense Cholesky solve of the loaded kernel; ridge ``1e-3·mean diagonal``, one-hot targets.
- ``resume``: the same kernel in tiles of 256 in a subprocess, once uninterrupted and once
  SIGKILLed at about 40% of its tiles and resumed; times measured inside the processes
  (without Python's start-up), the tiles in flight at the kill counted apart.
- ``scaling``: the trace-mode eNTK of the convolutional network below on 2,048 inputs
  (tiles of 256) with one process of one thread against ``torchrun`` with two ranks of
  one thread each: the wall time of the calls.
- ``large``: the trace-mode eNTK of the convolutional benchmark network
  (``bench_empirical.py``'s ``cnn_3x32x32``) on ``N = 20,000`` random 3x32x32 inputs in a
  fresh process: seconds, kernel entries per second, peak resident memory, disk size,
  and the time ``N = 60,000`` would take at the same rate.

Usage:
    python benchmarks/bench_store.py --out results/benchmarks/store [--parts ...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402  (sibling helper module of this script)

import ntk_torch as nt  # noqa: E402

PARTS = ("overhead", "solve", "resume", "scaling", "large")
HERE = Path(__file__).resolve()


def digits_job(samples: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    ).eval()
    return model, nt.data.load_digits(samples, seed=0)[0]


def cnn_job(samples: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    ).eval()
    return model, torch.randn(samples, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------
# Subprocess workers (``--worker``): one compute_kernel call, timed inside.


def worker(kind: str, samples: int, store: str, mode: str, tile: int, implementation: str) -> dict:
    model, x = (digits_job if kind == "digits" else cnn_job)(samples)
    Path(store + ".started").write_text(str(time.time()))  # for the parent: when work began
    start = time.perf_counter()
    result = nt.compute_kernel(
        model, x, store=store, mode=mode, tile=tile, implementation=implementation, progress=False
    )
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file())
    return {
        "seconds": seconds,
        "rank": int(os.environ.get("RANK", "0")),
        "peak_rss_bytes": _timing.peak_rss_bytes(),
        "disk_bytes": size,
        "tiles": result.progress[1],
        "implementation": result.manifest["settings"]["implementation"],
    }


def _worker_argv(
    kind: str,
    samples: int,
    store: Path,
    mode: str,
    tile: int,
    implementation: str = "auto",
    threads: int | None = 1,
) -> list[str]:
    return [
        str(HERE),
        "--worker",
        kind,
        str(samples),
        str(store),
        mode,
        str(tile),
        implementation,
        *(["--threads", str(threads)] if threads else []),
    ]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(argv: list[str], env: dict | None = None, timeout: float = 3600) -> None:
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{run.stderr[-2000:]}")


def _results(store: Path) -> list[dict]:
    # One file per rank: ranks of one torchrun share its stdout, where their lines can interleave.
    return [
        json.loads(f.read_text()) for f in sorted(store.parent.glob(store.name + ".rank*.json"))
    ]


# ---------------------------------------------------------------------------------------
# Parts.


def overhead(args, scratch: Path) -> dict:
    samples, tile = (300, 128) if args.quick else (1797, 1024)
    model, x = digits_job(samples)
    store = scratch / "digits_full"

    def in_memory():
        return nt.empirical_ntk(model, x, mode="full", batch_size=tile)

    def on_disk():
        shutil.rmtree(store, ignore_errors=True)
        return nt.compute_kernel(model, x, store=store, mode="full", tile=tile, progress=False)

    samples_ = _timing.alternate(
        {"in_memory": in_memory, "store": on_disk}, repeats=2 if args.quick else 3, budget_s=600
    )
    memory, disk = samples_["in_memory"].median, samples_["store"].median
    kernel = nt.KernelStore(store)
    return {
        "samples": samples,
        "tile": tile,
        "kernel_gb": kernel.nbytes / 1e9,
        "in_memory_s": memory,
        "store_s": disk,
        "ratio": disk / memory,
        "in_memory_runs": samples_["in_memory"].seconds,
        "store_runs": samples_["store"].seconds,
    }


def solve(args, scratch: Path) -> dict:
    store = nt.KernelStore(scratch / "digits_full")
    n = store.shape[0]
    y = nt.data.one_hot(nt.data.load_digits(n, seed=0)[1])
    dense = store.load().double()
    ridge = 1e-3 * float(dense.diagonal(dim1=0, dim2=1).diagonal(dim1=0, dim2=1).mean())
    iterations: list[int] = []
    start = time.perf_counter()
    x = nt.solve(store, y, ridge=ridge, tol=1e-6, callback=lambda i, r: iterations.append(i))
    cg_s = time.perf_counter() - start
    start = time.perf_counter()
    flat = dense.permute(0, 2, 1, 3).reshape(n * 10, n * 10)
    flat.diagonal().add_(ridge)
    factor = torch.linalg.cholesky(flat)
    exact = torch.cholesky_solve(y.double().reshape(-1, 1), factor).reshape(n, 10)
    dense_s = time.perf_counter() - start
    del flat, factor, dense
    return {
        "n_rows": n * 10,
        "ridge": ridge,
        "cg_iterations": len(iterations),
        "cg_passes": len(iterations) + 2,
        "cg_s": cg_s,
        "cholesky_s": dense_s,
        "relative_difference": float((x.double() - exact).norm() / exact.norm()),
    }


def resume(args, scratch: Path) -> dict:
    samples, tile = (300, 64) if args.quick else (1797, 256)
    full = scratch / "resume_full"
    _run([sys.executable, *_worker_argv("digits", samples, full, "full", tile)], _env())
    uninterrupted = _results(full)[0]["seconds"]
    killed = scratch / "resume_killed"
    job = subprocess.Popen(
        [sys.executable, *_worker_argv("digits", samples, killed, "full", tile)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    total = None
    while job.poll() is None:
        if (killed / "manifest.json").exists():
            done, total = nt.KernelStore(killed).progress
            if done >= 0.4 * total:
                break
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    killed_at = time.time()
    job.communicate()
    before = killed_at - float(Path(str(killed) + ".started").read_text())
    in_flight = len(list((killed / "claims").iterdir()))
    done_at_kill = nt.KernelStore(killed).progress[0]
    tile_s = statistics.median(
        json.loads(f.read_text())["seconds"] for f in (full / "tiles").glob("*.json")
    )
    _run([sys.executable, *_worker_argv("digits", samples, killed, "full", tile)], _env())
    after = _results(killed)[0]["seconds"]
    same = torch.equal(nt.KernelStore(killed).load(), nt.KernelStore(full).load())
    allowance = in_flight * tile_s
    return {
        "samples": samples,
        "tile": tile,
        "tiles": total,
        "done_at_kill": done_at_kill,
        "in_flight": in_flight,
        "uninterrupted_s": uninterrupted,
        "before_kill_s": before,
        "resume_s": after,
        "ratio": (before + after) / uninterrupted,
        "ratio_without_in_flight": (before + after - allowance) / uninterrupted,
        "bit_identical": same,
    }


def scaling(args, scratch: Path) -> dict:
    # Minutes of work, so that the start-up of each call (profiling, fingerprints, joining
    # the process group) is small beside it, in enough tiles that two ranks share them
    # evenly: each rank prepares the row blocks of its own tiles, so a coarse grid leaves one
    # rank with a row block more to prepare (a 6 x 6 grid caps the speed-up near 1.75x).
    samples, tile = (128, 32) if args.quick else (2048, 256)
    job = ("cnn", samples)
    _run(
        [sys.executable, *_worker_argv(*job, scratch / "one", "trace", tile, "structured")], _env()
    )
    torchrun = Path(sys.executable).with_name("torchrun")
    _run(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node=2",
            *_worker_argv(*job, scratch / "two", "trace", tile, "structured"),
        ],
        _env(),
    )
    single = _results(scratch / "one")[0]
    ranks = _results(scratch / "two")
    tiles = single["tiles"]
    two_s = max(r["seconds"] for r in ranks)
    return {
        "samples": samples,
        "tile": tile,
        "tiles": tiles,
        "one_rank_s": single["seconds"],
        "two_ranks_s": two_s,
        "speedup": single["seconds"] / two_s,
        "bit_identical": torch.equal(
            nt.KernelStore(scratch / "one").load(), nt.KernelStore(scratch / "two").load()
        ),
    }


def large(args, scratch: Path) -> dict:
    samples, tile = (256, 128) if args.quick else (args.large_n, 512)
    path = scratch / "cnn_trace"
    _run(
        [
            sys.executable,
            *_worker_argv("cnn", samples, path, "trace", tile, "structured", args.threads),
        ],
        timeout=6 * 3600,
    )
    result = _results(path)[0]
    rate = samples**2 / result["seconds"]
    return {
        "samples": samples,
        "tile": tile,
        "implementation": result["implementation"],
        "seconds": result["seconds"],
        "entries_per_s": rate,
        "peak_rss_gb": result["peak_rss_bytes"] / 1e9,
        "disk_gb": result["disk_bytes"] / 1e9,
        "n60000_hours": 60000**2 / rate / 3600,
    }


# ---------------------------------------------------------------------------------------


def report(results: dict) -> list[str]:
    lines = ["| part | measured | target |", "|---|---|---|"]
    if "overhead" in results:
        r = results["overhead"]
        lines.append(
            f"| overhead: {r['samples']} digits, full mode, {r['kernel_gb']:.2f} GB, tile "
            f"{r['tile']} | store {r['store_s']:.1f} s / in memory {r['in_memory_s']:.1f} s "
            f"= **{r['ratio']:.2f}x** | ≤ 1.2x |"
        )
    if "resume" in results:
        r = results["resume"]
        lines.append(
            f"| resume: killed at {r['done_at_kill']}/{r['tiles']} tiles, "
            f"{r['in_flight']} in flight | ({r['before_kill_s']:.1f} + {r['resume_s']:.1f}) s / "
            f"{r['uninterrupted_s']:.1f} s = {r['ratio']:.2f}x; without the tiles in flight "
            f"**{r['ratio_without_in_flight']:.2f}x**; bit-identical: {r['bit_identical']} "
            "| ≤ 1.1x + in flight |"
        )
    if "scaling" in results:
        r = results["scaling"]
        lines.append(
            f"| scaling: CNN, N = {r['samples']:,}, trace, {r['tiles']} tiles, 1 thread per rank "
            f"| 1 rank {r['one_rank_s']:.1f} s, "
            f"2 ranks {r['two_ranks_s']:.1f} s: **{r['speedup']:.2f}x** throughput; "
            f"bit-identical: {r['bit_identical']} | ≥ 1.7x |"
        )
    if "large" in results:
        r = results["large"]
        lines.append(
            f"| large: CNN, N = {r['samples']:,}, trace, tile {r['tile']} | "
            f"{r['seconds'] / 60:.1f} min, {r['entries_per_s']:,.0f} entries/s, "
            f"peak RSS **{r['peak_rss_gb']:.2f} GB**, "
            f"{r['disk_gb']:.2f} GB on disk; N = 60,000: about {r['n60000_hours']:.1f} h | "
            "peak RSS ≤ 2 GB |"
        )
    if "solve" in results:
        r = results["solve"]
        lines.append(
            f"| nt.solve: digits store, {r['n_rows']:,} unknowns x 10 targets | "
            f"{r['cg_iterations']} iterations ({r['cg_passes']} passes) in {r['cg_s']:.1f} s; "
            f"dense Cholesky {r['cholesky_s']:.1f} s; relative difference "
            f"{r['relative_difference']:.1e} | |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/benchmarks/store")
    parser.add_argument("--parts", nargs="*", choices=PARTS, default=list(PARTS))
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--large-n", type=int, default=20000, help="samples of the large part")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--scratch", default=None, help="folder for the stores (default: a temporary one)"
    )
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        kind, samples, store, mode, tile, implementation = args.worker
        result = worker(kind, int(samples), store, mode, int(tile), implementation)
        Path(f"{store}.rank{result['rank']}.json").write_text(json.dumps(result))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench_store_"))
    scratch.mkdir(parents=True, exist_ok=True)
    parts = [p for p in PARTS if p in args.parts]
    if "solve" in parts and "overhead" not in parts:
        parts.insert(0, "overhead")  # it writes the store the solve reads
    results: dict = {}
    try:
        for part in parts:
            print(f"-- {part}", flush=True)
            results[part] = globals()[part](args, scratch)
            print(json.dumps(results[part]), flush=True)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    command = "python benchmarks/bench_store.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    header = [
        f"Command: `{command.strip()}`; {date.today().isoformat()}; "
        f"{_timing.cpu_name()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads in this process.",
        "",
    ]
    table = header + report(results)
    (out / "store.json").write_text(
        json.dumps(
            {
                "command": command,
                "date": date.today().isoformat(),
                "cpu_count": os.cpu_count(),
                "results": results,
            },
            indent=2,
        )
    )
    (out / "store.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
