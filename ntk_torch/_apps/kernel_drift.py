"""Kernel drift and per-layer feature change of MLPs trained on digits, across widths.

Trains ``ntk_torch.nn.MLP`` (ReLU, ``--depth`` hidden layers) on scikit-learn's bundled
digits (``ntk_torch.data.load_digits``: centred pixels, each image scaled to norm √64),
with MSE on one-hot targets and plain mini-batch SGD, at every width in ``--widths`` and
in every parameterization in ``--parameterizations`` (``ntk``, ``standard``, ``mup``: the
abc-parameterizations of ``ntk_torch.nn``, μP with one global SGD learning rate). A
``KernelTracker`` watches a fixed probe batch of held-out digits every ``--every`` steps.

Each parameterization has one learning rate for all widths (``--lr-ntk``,
``--lr-standard``, ``--lr-mup``), as a practitioner would keep it: under NTK
parameterization the kernel should freeze as the width grows (lazy training), under μP
the hidden features should keep moving, and under standard parameterization the fixed
rate is effectively larger at larger widths (its NTK grows with the width).

Writes, under ``--out``: ``records.csv`` / ``records.json`` (long format: width, seed,
parameterization, step, layer, metric, value; training loss and test accuracy appear as
``layer="total"`` metrics ``train_loss`` / ``test_accuracy`` at the last step),
``summary.csv``, ``drift_<parameterization>.png`` (``ntk_torch.plotting.plot_drift``),
``width_scaling.png`` (final kernel and hidden-feature change against width) and
``config.json``.

    python scripts/kernel_drift.py --out results/kernel_drift
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import ntk_torch as nt
from ntk_torch._apps._args import ArgumentParser, add_common_options, apply_threads
from ntk_torch import records as rec
from ntk_torch.plotting import plot_drift
from ntk_torch.tracking import TOTAL

PARAMETERIZATIONS = ("ntk", "standard", "mup")


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/kernel_drift"))
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--parameterizations", nargs="+", default=list(PARAMETERIZATIONS),
                        choices=PARAMETERIZATIONS)
    parser.add_argument("--depth", type=int, default=2, help="hidden layers (>= 1)")
    parser.add_argument("--steps", type=int, default=300, help="SGD steps")
    parser.add_argument("--batch", type=int, default=128, help="mini-batch size")
    parser.add_argument("--every", type=int, default=25,
                        help="the tracker records every this many steps")
    parser.add_argument("--probe", type=int, default=64, help="held-out digits in the probe batch")
    parser.add_argument("--train", type=int, default=1200,
                        help="training digits (the rest are test)")
    parser.add_argument("--lr-ntk", type=float, default=1.0)
    parser.add_argument("--lr-standard", type=float, default=0.05)
    parser.add_argument("--lr-mup", type=float, default=0.5)
    add_common_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.widths = [w for w in args.widths if w <= 64] or [16, 64]
        if len(args.widths) < 2:
            args.widths = [16, 64]
        args.steps, args.every = min(args.steps, 20), min(args.every, 5)
        args.probe = min(args.probe, 16)
        args.train, args.batch = min(args.train, 200), min(args.batch, 64)
    for name in ("depth", "steps", "batch", "every", "train"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.probe < 2:
        parser.error(f"--probe must be at least 2, got {args.probe}")
    if min(args.widths) < 1:
        parser.error(f"--widths must be positive, got {args.widths}")
    if args.train + args.probe > 1797:
        parser.error(f"--train + --probe must not exceed the 1797 digits, "
                     f"got {args.train} + {args.probe}")
    return args


def run_one(args: argparse.Namespace, parameterization: str, width: int, x_train: torch.Tensor,
            t_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
            probe: torch.Tensor, probe_y: torch.Tensor) -> list[rec.Record]:
    """Train one MLP with the tracker; records tagged with width/seed/parameterization."""
    torch.manual_seed(args.seed)
    model = nt.nn.MLP(64, width, args.depth, 10, parameterization=parameterization).to(args.device)
    lr = {"ntk": args.lr_ntk, "standard": args.lr_standard, "mup": args.lr_mup}[parameterization]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = nt.KernelTracker(model, probe, probe_y, every=args.every,
                               implementation=args.implementation)
    order = torch.Generator().manual_seed(args.seed)
    n = x_train.shape[0]
    batches: list[torch.Tensor] = []
    for step in range(args.steps + 1):
        tracker.update(step, force=step == args.steps)
        if step == args.steps:
            break
        if not batches:
            batches = list(torch.randperm(n, generator=order).split(args.batch))
        idx = batches.pop().to(args.device)
        optimizer.zero_grad()
        loss = (model(x_train[idx]) - t_train[idx]).square().sum(1).mean()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        train_loss = float((model(x_train) - t_train).square().sum(1).mean())
        accuracy = float((model(x_test).argmax(1) == y_test).double().mean())
    extra = [{"step": args.steps, "layer": TOTAL, "metric": "train_loss", "value": train_loss},
             {"step": args.steps, "layer": TOTAL, "metric": "test_accuracy", "value": accuracy}]
    tag = {"width": width, "seed": args.seed, "parameterization": parameterization}
    return [{**tag, **r} for r in tracker.records + extra]


def summarize(records: list[rec.Record], steps: int) -> list[rec.Record]:
    """One row per (parameterization, width): final values of the headline metrics."""
    rows = []
    for parameterization in rec.unique(records, "parameterization"):
        for width in rec.unique(rec.select(records, parameterization=parameterization), "width"):
            run = rec.select(records, parameterization=parameterization, width=width, step=steps)
            final = {(r["layer"], r["metric"]): r["value"] for r in run}
            hidden = sorted(layer for layer, metric in final if metric == "feature_relative_change"
                            and layer.startswith("hidden"))
            rows.append({
                "parameterization": parameterization, "width": width,
                "train_loss": final[TOTAL, "train_loss"],
                "test_accuracy": final[TOTAL, "test_accuracy"],
                "kernel_distance": final[TOTAL, "kernel_distance"],
                "kernel_relative_change": final[TOTAL, "kernel_relative_change"],
                # the last hidden layer: in μP its fan-in and fan-out both grow with the width
                "hidden_feature_change": final[hidden[-1], "feature_relative_change"],
                "weight_relative_change": final[TOTAL, "weight_relative_change"],
            })
    return rows


def plot_width_scaling(path: Path, summary: list[rec.Record]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    # Lazy-regime slopes (NTK parameterization): first-order changes ∝ width^-1/2; the
    # distance 1 − cos only sees the change orthogonal to K_0, squared: ∝ width^-1.
    panels = [("kernel_relative_change", "kernel relative change ‖K_T − K_0‖/‖K_0‖", -0.5),
              ("hidden_feature_change", "last hidden layer's feature change", -0.5),
              ("kernel_distance", "kernel distance 1 − cos(K_T, K_0)", -1.0)]
    widths = sorted(rec.unique(summary, "width"))
    for ax, (key, heading, slope) in zip(fig.subplots(1, 3), panels):
        for parameterization in rec.unique(summary, "parameterization"):
            rows = sorted(rec.select(summary, parameterization=parameterization),
                          key=lambda r: r["width"])
            ax.loglog([r["width"] for r in rows], [r[key] for r in rows], "o-",
                      label=parameterization)
        ntk = sorted(rec.select(summary, parameterization="ntk"), key=lambda r: r["width"])
        if ntk:
            w0, v0 = ntk[0]["width"], ntk[0][key]
            ax.loglog(widths, [v0 * (w / w0) ** slope for w in widths], ":", color="grey",
                      label=f"∝ width^{slope:g}")
        ax.set_xticks(widths, labels=[str(w) for w in widths])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("width")
        ax.set_title(heading, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("change over training against width; dotted: the lazy-regime slope through "
                 "the narrowest NTK-parameterized net")
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    apply_threads(args.threads)
    x, y = nt.data.load_digits(seed=args.seed)
    x, y = x.to(args.device), y.to(args.device)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(args.seed))
    perm = perm.to(args.device)
    # The probe is the first --probe test digits: held out of training, part of the test set.
    train, test = perm[:args.train], perm[args.train:]
    probe_idx = test[:args.probe]
    x_train, t_train = x[train], nt.data.one_hot(y[train]).to(args.device)
    probe, probe_y = x[probe_idx], y[probe_idx]
    x_test, y_test = x[test], y[test]

    start = time.perf_counter()
    records: list[rec.Record] = []
    timings = {}
    for parameterization in args.parameterizations:
        for width in args.widths:
            t0 = time.perf_counter()
            try:
                records += run_one(args, parameterization, width, x_train, t_train, x_test, y_test,
                                   probe, probe_y)
            except (ValueError, MemoryError) as error:
                print(f"error: {parameterization} width {width}: {error}", file=sys.stderr)
                return 2
            timings[f"{parameterization}/{width}"] = round(time.perf_counter() - t0, 3)
    seconds = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    rec.to_csv(records, args.out / "records.csv")
    rec.to_json(records, args.out / "records.json")
    summary = summarize(records, args.steps)
    rec.to_csv(summary, args.out / "summary.csv")
    for parameterization in args.parameterizations:
        plot_drift(rec.select(records, parameterization=parameterization),
                   args.out / f"drift_{parameterization}.png",
                   title=f"{parameterization} parameterization, depth {args.depth}, digits, "
                         f"probe of {args.probe} held-out images")
    plot_width_scaling(args.out / "width_scaling.png", summary)
    config = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "seconds": round(seconds, 3), "seconds_per_run": timings,
              "torch": torch.__version__, "ntk_torch": nt.__version__}
    (args.out / "config.json").write_text(json.dumps(config, indent=2))

    print(f"kernel drift of depth-{args.depth} ReLU MLPs on digits: {args.steps} SGD steps, "
          f"batch {args.batch}, probe {args.probe}, {seconds:.1f} s")
    header = ["param", "width", "train loss", "test acc", "K dist", "K rel chg", "hidden chg",
              "W rel chg"]
    print("".join(f"{h:>11}" for h in header))
    for r in summary:
        print(f"{r['parameterization']:>11}{r['width']:>11}{r['train_loss']:>11.4f}"
              f"{r['test_accuracy']:>11.3f}"
              f"{r['kernel_distance']:>11.2e}{r['kernel_relative_change']:>11.2e}"
              f"{r['hidden_feature_change']:>11.2e}{r['weight_relative_change']:>11.2e}")
    print(f"results in {args.out}/")
    return 0

