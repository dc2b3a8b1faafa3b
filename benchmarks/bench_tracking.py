"""KernelTracker overhead: cost per record and slowdown of a digits training run.

The run: ``ntk_torch.nn.MLP`` (NTK parameterization, ReLU, ``--depth`` hidden layers) on
scikit-learn's digits, mini-batch SGD with MSE on one-hot targets for ``--steps`` steps;
the tracked run adds ``tracker.update(step)`` with ``every=--every`` (10) on a probe of
``--probe`` (64) held-out digits, in trace mode with ``implementation=--implementation``.

Method. For each width, untracked and tracked runs alternate (A B A B ...) from the same
seed, ``--repeats`` times each, after one untimed warm-up of each; the table gives
medians. ``slowdown`` = tracked / untracked wall time of the whole run, both measured in
this process minutes apart. ``per record`` is the median wall time of an ``update`` call
that recorded (the reference record excluded); ``skip call`` the median of one that did
not. ``kernel`` is the median time of the layerwise probe kernel alone
(``empirical_ntk_fn(..., layerwise=True)(probe)``), so ``kernel / per record`` is the
share of a record spent on the NTK; the rest is the feature forward, the metrics and
the eigenvalues. The tracked and untracked runs must end with bit-identical parameters;
the table says whether they did.

Needs the ``data`` extra (scikit-learn's digits): ``pip install 'ntk_torch[data]'``.

Usage:
    python benchmarks/bench_tracking.py --out results/bench_tracking [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import ntk_torch as nt
from ntk_torch import records as rec


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/bench_tracking"))
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--probe", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--implementation", default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu",
                        help="the device timed: cpu, cuda, cuda:1, ... (named, never guessed)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.widths, args.steps, args.repeats = [min(args.widths[0], 32)], min(args.steps, 40), 1
    for name in ("depth", "steps", "batch", "every", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.probe < 2:
        parser.error(f"--probe must be at least 2, got {args.probe}")
    return args


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train(args: argparse.Namespace, width: int, data: dict[str, torch.Tensor],
          tracked: bool) -> dict:
    """One training run; wall time, per-call tracker times and the final parameters."""
    torch.manual_seed(args.seed)
    model = nt.nn.MLP(64, width, args.depth, 10, parameterization="ntk").to(args.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    tracker = (nt.KernelTracker(model, data["probe"], data["probe_y"], every=args.every,
                                implementation=args.implementation) if tracked else None)
    order = torch.Generator().manual_seed(args.seed)
    x, t = data["x"], data["t"]
    batches: list[torch.Tensor] = []
    record_s, skip_s = [], []
    _sync(args.device)
    start = time.perf_counter()
    for step in range(args.steps):
        if tracker is not None:
            t0 = time.perf_counter()
            recorded = tracker.update(step)
            _sync(args.device)
            (record_s if recorded else skip_s).append(time.perf_counter() - t0)
        if not batches:
            batches = list(torch.randperm(x.shape[0], generator=order).split(args.batch))
        idx = batches.pop().to(args.device)
        optimizer.zero_grad()
        (model(x[idx]) - t[idx]).square().sum(1).mean().backward()
        optimizer.step()
    _sync(args.device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "record_s": record_s[1:], "skip_s": skip_s,
            "params": [p.detach().clone() for p in model.parameters()],
            "records": 0 if tracker is None else len({r["step"] for r in tracker.records})}


def kernel_seconds(args: argparse.Namespace, width: int, probe: torch.Tensor) -> float:
    torch.manual_seed(args.seed)
    model = nt.nn.MLP(64, width, args.depth, 10, parameterization="ntk").to(args.device).eval()
    ntk = nt.empirical_ntk_fn(model, mode="trace", implementation=args.implementation,
                              layerwise=True)
    ntk(probe)  # warm-up
    times = []
    for _ in range(max(3, args.repeats)):
        t0 = time.perf_counter()
        ntk(probe)
        _sync(args.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    x, y = nt.data.load_digits(seed=args.seed)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(args.seed))
    probe_idx, train_idx = perm[:args.probe], perm[args.probe:]
    data = {"x": x[train_idx].to(args.device), "t": nt.data.one_hot(y[train_idx]).to(args.device),
            "probe": x[probe_idx].to(args.device), "probe_y": y[probe_idx].to(args.device)}

    rows: list[rec.Record] = []
    summary = []
    for width in args.widths:
        try:
            train(args, width, data, False)  # warm-ups: allocator, kernel selection
            train(args, width, data, True)
        except (ValueError, MemoryError) as error:
            print(f"bench_tracking: error: width {width}: {error}", file=sys.stderr)
            return 2
        plain, tracked = [], []
        for _ in range(args.repeats):
            plain.append(train(args, width, data, False))
            tracked.append(train(args, width, data, True))
        identical = all(torch.equal(a, b) for run_a, run_b in zip(plain, tracked)
                        for a, b in zip(run_a["params"], run_b["params"]))
        base = statistics.median(r["seconds"] for r in plain)
        with_tracker = statistics.median(r["seconds"] for r in tracked)
        per_record = [s for r in tracked for s in r["record_s"]]
        skips = [s for r in tracked for s in r["skip_s"]]
        kernel = kernel_seconds(args, width, data["probe"])
        result = {
            "width": width,
            "untracked_s": base,
            "tracked_s": with_tracker,
            "slowdown": with_tracker / base,
            "records_per_run": tracked[0]["records"],
            "per_record_s": statistics.median(per_record) if per_record else float("nan"),
            "skip_call_s": statistics.median(skips) if skips else float("nan"),
            "kernel_s": kernel,
            "untracked_step_s": base / args.steps,
            "identical_parameters": identical,
        }
        summary.append(result)
        rows += [{"width": width, "metric": k, "value": float(v)}
                 for k, v in result.items() if k != "width"]

    args.out.mkdir(parents=True, exist_ok=True)
    rec.to_csv(rows, args.out / "results.csv")
    config = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "threads_used": torch.get_num_threads(), "torch": torch.__version__,
              "ntk_torch": nt.__version__}
    (args.out / "config.json").write_text(json.dumps(config, indent=2))

    print(f"KernelTracker overhead: depth-{args.depth} NTK MLP on digits, {args.steps} SGD steps "
          f"(batch {args.batch}), every={args.every}, probe {args.probe}, "
          f"{torch.get_num_threads()} threads, medians of {args.repeats}")
    header = ["width", "untracked s", "tracked s", "slowdown", "records", "per record s",
              "kernel s", "skip call s", "step s", "identical"]
    print("".join(f"{h:>13}" for h in header))
    for r in summary:
        print(f"{r['width']:>13}{r['untracked_s']:>13.3f}{r['tracked_s']:>13.3f}"
              f"{r['slowdown']:>12.1f}x"
              f"{r['records_per_run']:>13}{r['per_record_s']:>13.4f}{r['kernel_s']:>13.4f}"
              f"{r['skip_call_s']:>13.2e}{r['untracked_step_s']:>13.2e}"
              f"{str(r['identical_parameters']):>13}")
    print(f"results in {args.out}/")
    return 0 if all(r["identical_parameters"] for r in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
