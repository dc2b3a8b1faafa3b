"""``ntk-torch drift``: kernel drift and per-layer feature change of MLPs trained on digits.

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
``width_scaling.png`` (``ntk_torch.plotting.plot_width_scaling``: final kernel and
hidden-feature change against width) and ``config.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import ntk_torch as nt
from ntk_torch import records as rec
from ntk_torch.cli._program import (
    ArgumentParser,
    UsageError,
    add_common_options,
    bad_input,
    check_at_least,
    config_of,
    fill_preset,
    resolve_device,
    run_program,
)
from ntk_torch.plotting import plot_drift, plot_width_scaling
from ntk_torch.tracking import TOTAL

COMMAND = "drift"
DEFAULT = {"widths": [32, 128, 512], "steps": 300, "batch": 128, "every": 25, "probe": 64,
           "train": 1200}
QUICK = {"widths": [16, 64], "steps": 20, "batch": 64, "every": 5, "probe": 16, "train": 200}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options, with the sizes of ``--quick`` or the default run filled in."""
    parser = ArgumentParser(COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/drift"))
    parser.add_argument("--widths", type=int, nargs="+",
                        help=f"hidden widths ({DEFAULT['widths']})")
    parser.add_argument("--parameterizations", nargs="+", default=list(nt.nn.PARAMETERIZATIONS),
                        choices=nt.nn.PARAMETERIZATIONS)
    parser.add_argument("--depth", type=int, default=2, help="hidden layers (>= 1)")
    parser.add_argument("--steps", type=int, help=f"SGD steps ({DEFAULT['steps']})")
    parser.add_argument("--batch", type=int, help=f"mini-batch size ({DEFAULT['batch']})")
    parser.add_argument("--every", type=int,
                        help=f"the tracker records every this many steps ({DEFAULT['every']})")
    parser.add_argument("--probe", type=int,
                        help=f"held-out digits in the probe batch ({DEFAULT['probe']})")
    parser.add_argument("--train", type=int,
                        help=f"training digits, the rest are test ({DEFAULT['train']})")
    parser.add_argument("--lr-ntk", type=float, default=1.0)
    parser.add_argument("--lr-standard", type=float, default=0.05)
    parser.add_argument("--lr-mup", type=float, default=0.5)
    add_common_options(parser)
    args = parser.parse_args(argv)
    fill_preset(args, QUICK if args.quick else DEFAULT)
    check_at_least(args, 1, "depth", "steps", "batch", "every", "train")
    check_at_least(args, 2, "probe")
    if min(args.widths) < 1:
        raise UsageError(f"--widths must be positive, got {args.widths}")
    if args.train + args.probe > nt.data.DIGITS:
        raise UsageError(f"--train + --probe must not exceed the {nt.data.DIGITS} digits, "
                         f"got {args.train} + {args.probe}")
    args.device = resolve_device(args.device)
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


def run(args: argparse.Namespace) -> int:
    """Train every (parameterization, width) with the tracker; write and print the results."""
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
            with bad_input(f"{parameterization} width {width}: "):
                records += run_one(args, parameterization, width, x_train, t_train, x_test, y_test,
                                   probe, probe_y)
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
    plot_width_scaling(summary, args.out / "width_scaling.png")
    config = config_of(args, seconds=round(seconds, 3), seconds_per_run=timings,
                       torch=torch.__version__, ntk_torch=nt.__version__)
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



def main(argv: list[str] | None = None) -> int:
    """Run ``ntk-torch drift`` with ``argv`` (default: the command line); the exit status."""
    return run_program(COMMAND, parse_args, run, argv)
