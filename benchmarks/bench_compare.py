"""The engines' speed at two revisions of ntk_torch, measured in one run.

For each configuration and mode of ``bench_empirical.py`` the engines are timed in fresh
processes whose ``PYTHONPATH`` points at one tree or the other: this working tree
("new") and the package of a git revision extracted to a temporary folder ("old").
The processes alternate (old, new, new, old, old, new, ...) so that drift in the
machine's load falls on both sides; each makes one untimed warm-up call per engine and
then times ``--calls`` calls inside the process (imports and start-up excluded). The
table gives the median of each side's calls and their ratio. Engines whose estimated
memory or time is out of reach (the cost model of ``auto``, identical on both sides for
this purpose) are left out, as in ``bench_empirical.py``.

Usage:
    python benchmarks/bench_compare.py --ref e8ca805 [--quick] [--threads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENGINES = ("jacobian", "ntk_vp", "structured", "auto")


def _worker(config_name: str, mode: str, methods: list[str], calls: int,
            threads: int | None) -> dict:
    """Seconds of ``calls`` timed calls per method, after one warm-up call, in this process."""
    import _timing
    import bench_empirical
    import torch

    import ntk_torch

    if threads:
        torch.set_num_threads(threads)
    net, x1, x2 = bench_empirical.build(bench_empirical.CONFIGS[config_name])
    out: dict = {"ntk_torch": ntk_torch.__file__}
    for method in methods:
        fn = bench_empirical.method_fn(method, net, x1, x2, mode)
        try:
            fn()
        except MemoryError as err:
            out[method] = {"error": str(err).splitlines()[0][:200]}
            continue
        out[method] = {"seconds": [_timing.timed(fn) for _ in range(calls)]}
    return out


def extract(ref: str, into: Path) -> Path:
    """The ``ntk_torch`` package of revision ``ref``, written under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "ntk_torch"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def run_side(tree: Path, config: str, mode: str, methods: list[str], calls: int,
             threads: int | None, timeout_s: float) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", config, mode, *methods,
            "--calls", str(calls)]
    if threads:
        argv += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"worker for {tree} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["ntk_torch"].startswith(str(tree)):
        raise RuntimeError(f"the worker imported {result['ntk_torch']}, not the package in {tree}")
    return result


def runnable_methods(config, mode: str, methods: list[str], max_seconds: float) -> dict[str, str]:
    """``{method: ""}`` for those to time, ``{method: reason}`` for those left out."""
    import _timing
    import bench_empirical
    import torch

    from ntk_torch._tiling import available_memory

    net, x1, x2 = bench_empirical.build(config)
    problem = bench_empirical.library_problem(net, x1, x2, mode)
    gflops = _timing.matmul_gflops()
    memory = available_memory(torch.device("cpu"))
    status = {}
    for method in methods:
        flops, nbytes = bench_empirical.estimates(method, problem)
        if nbytes > 0.7 * memory:
            status[method] = f"needs {nbytes / 2**30:.1f} GiB"
        elif flops / (0.25 * gflops * 1e9) > max_seconds:
            status[method] = "skipped: estimated slower than --max-seconds"
        else:
            status[method] = ""
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default="HEAD", help="git revision to compare this tree with")
    parser.add_argument("--configs", nargs="*", help="default: bench_empirical's default set")
    parser.add_argument("--methods", nargs="*", default=list(ENGINES), help="engines to time")
    parser.add_argument("--rounds", type=int, default=None, help="processes per side and row")
    parser.add_argument("--calls", type=int, default=2, help="timed calls per process")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="skip methods estimated slower")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 20 s estimated at most")
    parser.add_argument("--out", default=None, help="folder for bench_compare.csv and config.json")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.worker:
        config, mode, *methods = args.worker
        print(json.dumps(_worker(config, mode, methods, args.calls, args.threads)))
        return 0
    import bench_empirical

    rounds = args.rounds or (2 if args.quick else 3)
    max_seconds = args.max_seconds or (20.0 if args.quick else 60.0)
    configs = args.configs or bench_empirical.DEFAULT_CONFIGS
    rows = []
    with tempfile.TemporaryDirectory(prefix="ntk-bench-ref-") as tmp:
        trees = {"old": extract(args.ref, Path(tmp)), "new": ROOT}
        for name in configs:
            config = bench_empirical.CONFIGS[name]
            for mode in config.modes:
                status = runnable_methods(config, mode, args.methods, max_seconds)
                methods = [m for m, why in status.items() if not why]
                seconds: dict[str, dict[str, list[float]]] = {side: {m: [] for m in methods}
                                                              for side in trees}
                errors: dict[str, str] = {}
                order = ["old", "new"]
                for _ in range(rounds if methods else 0):
                    for side in order:
                        result = run_side(trees[side], name, mode, methods, args.calls,
                                          args.threads, timeout_s=1800)
                        for m in methods:
                            if "error" in result[m]:
                                errors[m] = f"{side}: {result[m]['error']}"
                            else:
                                seconds[side][m] += result[m]["seconds"]
                    order.reverse()
                for m in args.methods:
                    row = {"config": name, "mode": mode, "method": m,
                           "status": status[m] or errors.get(m, "")}
                    if seconds["old"].get(m) and seconds["new"].get(m):
                        old, new = (statistics.median(seconds[s][m]) for s in ("old", "new"))
                        row.update(old_s=old, new_s=new, ratio=new / old,
                                   samples=len(seconds["new"][m]))
                    rows.append(row)
                    print(_line(row), flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "bench_compare.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["config", "mode", "method", "old_s", "new_s",
                                                   "ratio", "samples", "status"])
            writer.writeheader()
            writer.writerows(rows)
        meta = {"ref": args.ref, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": platform.platform(), "cpu_count": os.cpu_count(), "rounds": rounds,
                "calls": args.calls, "threads": args.threads, "configs": configs}
        (out / "config.json").write_text(json.dumps(meta, indent=2))
    return 0


def _line(row: dict) -> str:
    if "ratio" not in row:
        return f"{row['config']:<26} {row['mode']:<8} {row['method']:<11} {row['status']}"
    return (f"{row['config']:<26} {row['mode']:<8} {row['method']:<11} old {row['old_s']:8.4f} s  "
            f"new {row['new_s']:8.4f} s  new/old {row['ratio']:.3f}  ({row['samples']} calls each)")


if __name__ == "__main__":
    raise SystemExit(main())
