"""Analytic infinite-width kernel speed: a depth-10 MLP's NNGP and NTK on N x N inputs.

Cases (``--n`` inputs of dimension ``--dim``, ``--depth`` hidden layers, NTK
parameterization, ``β = 0.1``):

- ``relu``: ``x2 = None`` (symmetric: only blocks on and above the diagonal are computed);
- ``relu x1,x2``: two different input sets of ``--n`` each (the whole grid);
- ``erf``: the erf closed form (``arcsin`` instead of ``arccos``);
- ``relu float32``: ``dtype=torch.float32``;
- ``relu one block``: ``batch_size = n``, the whole grid as one block, for a smaller
  ``n`` (``--n-unblocked``): why :func:`ntk_torch.analytic.kernel` works in blocks.

Method: each case runs ``--repeats`` times after an untimed warm-up call (which counts as
the first sample when it took over 2 s); the table gives the median wall time and the
pairs per second. Correctness checks, printed: results are
finite, symmetric when ``x2 = None``, and the top-left ``200 x 200`` corner equals the
kernel computed on those 200 points alone (different blocking, same maths); float32 is
compared with float64.

Usage:
    python benchmarks/bench_analytic.py --out results/bench_analytic [--quick] [--threads 2]
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
from ntk_torch import analytic
from ntk_torch import records as rec


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/bench_analytic"))
    parser.add_argument("--n", type=int, default=5000, help="inputs per side (N1 = N2)")
    parser.add_argument("--n-unblocked", type=int, default=2000,
                        help="inputs for the single-block comparison")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu",
                        help="the device timed: cpu, cuda, cuda:1, ... (named, never guessed)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.n_unblocked, args.repeats = min(args.n, 200), min(args.n_unblocked, 100), 1
    for name in ("n", "n_unblocked", "dim", "depth", "repeats", "threads"):
        if getattr(args, name) < 1:
            flag = name.replace("_", "-")
            parser.error(f"--{flag} must be at least 1, got {getattr(args, name)}")
    return args


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, repeats: int, device: str) -> tuple[float, analytic.Kernel]:
    start = time.perf_counter()
    result = fn()
    _sync(device)
    first = time.perf_counter() - start
    # A first call of seconds has negligible warm-up effects (allocator, thread pool):
    # it counts as a sample; shorter ones are repeated untimed first.
    seconds = [first] if first > 2.0 else []
    for _ in range(repeats - len(seconds)):
        start = time.perf_counter()
        result = fn()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    x1 = torch.randn(args.n, args.dim, generator=g, dtype=torch.float64).to(args.device)
    x2 = torch.randn(args.n, args.dim, generator=g, dtype=torch.float64).to(args.device)
    small = x1[:args.n_unblocked]
    common = {"depth": args.depth, "bias_std": 0.1}
    cases = [
        ("relu", args.n, lambda: analytic.mlp_kernel(x1, **common)),
        ("relu x1,x2", args.n, lambda: analytic.mlp_kernel(x1, x2, **common)),
        ("erf", args.n, lambda: analytic.mlp_kernel(x1, activation="erf", **common)),
        ("relu float32", args.n, lambda: analytic.mlp_kernel(x1, dtype=torch.float32, **common)),
        ("relu blocks", small.shape[0], lambda: analytic.mlp_kernel(small, **common)),
        ("relu one block", small.shape[0],
         lambda: analytic.mlp_kernel(small, batch_size=small.shape[0], **common)),
    ]

    rows: list[rec.Record] = []
    results: dict[str, analytic.Kernel] = {}
    print(f"Analytic depth-{args.depth} ReLU/erf MLP kernels (NNGP and NTK), inputs of dimension "
          f"{args.dim}, {torch.get_num_threads()} threads, {args.device}, median of {args.repeats}")
    print(f"{'case':>16}{'N1 x N2':>14}{'seconds':>10}{'Mpairs/s':>10}")
    for name, n, fn in cases:
        seconds, k = _timed(fn, args.repeats, args.device)
        results[name] = k
        pairs = n * n
        rows.append({"case": name, "n1": n, "n2": n, "depth": args.depth, "dim": args.dim,
                     "threads": torch.get_num_threads(), "device": args.device,
                     "seconds": seconds, "pairs_per_second": pairs / seconds})
        print(f"{name:>16}{f'{n} x {n}':>14}{seconds:>10.2f}{pairs / seconds / 1e6:>10.1f}")

    corner = min(200, args.n)
    alone = analytic.mlp_kernel(x1[:corner], **common)
    relu = results["relu"]
    checks = {
        "finite": all(bool(torch.isfinite(k.ntk).all() and torch.isfinite(k.nngp).all())
                      for k in results.values()),
        "symmetric": bool(torch.equal(relu.ntk, relu.ntk.T)),
        "corner_max_rel_diff": float((relu.ntk[:corner, :corner] - alone.ntk).abs().max()
                                     / alone.ntk.abs().max()),
        "float32_max_rel_diff": float((results["relu float32"].ntk.double() - relu.ntk).abs().max()
                                      / relu.ntk.abs().max()),
        "one_block_max_rel_diff": float((results["relu one block"].ntk - results["relu blocks"].ntk)
                                        .abs().max() / results["relu blocks"].ntk.abs().max()),
    }
    print("checks: " + ", ".join(f"{k}={v:.2g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in checks.items()))

    args.out.mkdir(parents=True, exist_ok=True)
    rec.to_csv(rows, args.out / "results.csv")
    config = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "threads_used": torch.get_num_threads(), "torch": torch.__version__,
              "ntk_torch": nt.__version__, "checks": checks}
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    print(f"results in {args.out}/")
    ok = (checks["finite"] and checks["symmetric"] and checks["corner_max_rel_diff"] < 1e-12
          and checks["float32_max_rel_diff"] < 1e-4 and checks["one_block_max_rel_diff"] < 1e-12)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
