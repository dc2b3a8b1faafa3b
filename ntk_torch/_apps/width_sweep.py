"""Width sweep of ReLU MLPs on digits: eNTK vs its infinite-width limit, and what training moves.

For every parameterization (ntk, standard, mup) and width (64 … 4096 by default) and seed,
``ntk_torch.width_sweep`` measures on a 64-digit probe batch the trace-mode empirical NTK
at initialisation against ``ntk_torch.analytic.kernel`` of the same architecture, then
trains the network by full-batch gradient descent on MSE to one-hot targets
(``ntk_torch.training.GradientDescent``) and records the kernel drift, per-layer feature
and weight change, and train/test loss and accuracy of the trained network, of its
linearization trained the same way, and of the same descent under the infinite-width NTK
from the same initial outputs.

Writes, under ``--out``: ``records.csv`` (long format), ``config.json``, ``summary.md``
(fitted power laws with 95% intervals, accuracies) and PNGs: ``kernel_error.png``,
``kernel_drift.png``, ``feature_change.png``, ``weight_change.png`` and ``accuracy_gap.png``.

    python scripts/width_sweep.py --out results/width_sweep
    python scripts/width_sweep.py --model mypackage.models:build --widths 64 256 1024
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import ntk_torch as nt
from ntk_torch import records as rec
from ntk_torch._apps._args import ArgumentParser, UsageError, add_common_options, apply_threads, load_factory
from ntk_torch.plotting import plot_kernel_error, plot_vs_width
from ntk_torch.sweeps import fit_power_law, width_sweep
from ntk_torch.training import GradientDescent

PARAMETERIZATIONS = ("ntk", "standard", "mup")
DEFAULT_WIDTHS = [64, 128, 256, 512, 1024, 2048, 4096]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0],
        epilog="examples:\n  %(prog)s --quick --out results/sweep_quick\n"
               "  %(prog)s --parameterizations ntk mup --widths 128 512 2048 --seeds 3\n"
               "  %(prog)s --model mypackage.models:build   # build(width, seed) -> nn.Module, 64 -> 10")
    parser.add_argument("--out", type=Path, default=Path("results/width_sweep"))
    parser.add_argument("--widths", type=int, nargs="+", default=DEFAULT_WIDTHS)
    parser.add_argument("--seeds", type=int, default=5, help="initialisations per width")
    parser.add_argument("--parameterizations", nargs="+", default=list(PARAMETERIZATIONS),
                        choices=PARAMETERIZATIONS)
    parser.add_argument("--depth", type=int, default=2, help="hidden layers of the MLP")
    parser.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                        help="sweep your own build(width, seed) -> nn.Module (64 inputs, 10 outputs) "
                             "from an importable module or a .py file, instead of the MLPs")
    parser.add_argument("--probe", type=int, default=64, help="digits in the probe batch")
    parser.add_argument("--train", type=int, default=128, help="training digits")
    parser.add_argument("--test", type=int, default=512, help="test digits")
    parser.add_argument("--steps", type=int, default=100, help="full-batch gradient steps (0: no training)")
    parser.add_argument("--lr-factor", type=float, default=0.5,
                        help="step size as a fraction of N/λ_max of the initial NTK (stable below 2)")
    add_common_options(parser, seed_help="seed of the data split; seeds 0..S-1 initialise")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    args = build_parser(prog).parse_args(argv)
    if args.quick:  # small enough for a smoke test, still three widths to fit a slope
        args.widths = [16, 32, 64]
        args.seeds, args.probe, args.train, args.test = (min(args.seeds, 2), min(args.probe, 12),
                                                         min(args.train, 24), min(args.test, 24))
        args.steps = min(args.steps, 5)
    for name in ("seeds", "probe", "train", "test", "depth"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.probe < 2:
        raise UsageError(f"--probe must be at least 2, got {args.probe}")
    if args.steps < 0:
        raise UsageError(f"--steps must be >= 0, got {args.steps}")
    if any(w < 1 for w in args.widths):
        raise UsageError(f"--widths must be positive, got {args.widths}")
    if args.probe + args.train + args.test > 1797:
        raise UsageError(f"--probe + --train + --test must be at most 1797 digits, got "
                         f"{args.probe + args.train + args.test}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
    return args


def mlp_builder(parameterization: str, depth: int, device: str) -> Callable[[int, int], nn.Module]:
    def build(width: int, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nt.nn.MLP(64, width, depth, 10, parameterization=parameterization).to(device)
    return build


def gaps(records: list[rec.Record]) -> list[rec.Record]:
    """Per seed: test accuracy of the trained network minus the linearized one's / the kernel's."""
    out = []
    accuracy = {}
    for r in rec.select(records, metric="test_accuracy"):
        accuracy[(r.get("parameterization"), r["width"], r["seed"], r["predictor"])] = r["value"]
    for (p, w, s, predictor), value in accuracy.items():
        if predictor != "network":
            out.append({"width": w, "seed": s, "parameterization": p, "predictor": predictor,
                        "metric": "accuracy_gap", "value": accuracy[(p, w, s, "network")] - value})
    return out


def summarize(records: list[rec.Record], args: argparse.Namespace) -> str:
    lines = ["# Width sweep summary", "",
             f"Command: `{' '.join(['python scripts/width_sweep.py', *args.argv])}`", "",
             "## Power laws `metric ∝ width^slope` (95% interval: seed bootstrap, or t-interval "
             "for per-width metrics)", "",
             "| parameterization | metric | layer | slope | 95% interval | widths |", "|---|---|---|---|---|---|"]
    groups = rec.unique(records, "parameterization")
    wanted = [("ntk_error", None), ("ntk_fluctuation", None), ("ntk_bias", None),
              ("kernel_relative_change", "total"), ("weight_relative_change", "total")]
    layers = [layer for layer in rec.unique(rec.select(records, metric="feature_relative_change"), "layer")]
    wanted += [("feature_relative_change", layer) for layer in layers]
    for p in groups:
        for metric, layer in wanted:
            where = {"parameterization": p} | ({"layer": layer} if layer is not None else {})
            chosen = [r for r in rec.select(records, metric=metric, **where) if r["value"] > 0]
            if len({r["width"] for r in chosen}) < 3:
                continue
            fit = fit_power_law(chosen, metric)
            lines.append(f"| {p} | {metric} | {layer or ''} | {fit.exponent:+.3f} | "
                         f"[{fit.low:+.3f}, {fit.high:+.3f}] | {min(fit.widths)}–{max(fit.widths)} |")
    accuracies = rec.select(records, metric="test_accuracy")
    if accuracies:
        lines += ["", "## Test accuracy after training (mean over seeds)", "",
                  "| parameterization | width | network | linearized | infinite-width NTK |", "|---|---|---|---|---|"]
        for p in groups:
            for w in sorted(rec.unique(rec.select(accuracies, parameterization=p), "width")):
                cells = []
                for predictor in ("network", "linearized", "kernel"):
                    values = [r["value"] for r in rec.select(accuracies, parameterization=p, width=w,
                                                             predictor=predictor)]
                    cells.append(f"{np.mean(values):.3f}" if values else "–")
                lines.append(f"| {p} | {w} | " + " | ".join(cells) + " |")
    gap_rows = rec.select(records, metric="accuracy_gap")
    if gap_rows:
        lines += ["", "## Feature-learning effect: test accuracy of the network minus the linearized "
                  "network's (mean ± std over seeds)", "",
                  "| parameterization | " + " | ".join(str(w) for w in sorted(rec.unique(gap_rows, "width"))) + " |",
                  "|---|" + "---|" * len(rec.unique(gap_rows, "width"))]
        for p in groups:
            cells = []
            for w in sorted(rec.unique(gap_rows, "width")):
                v = [r["value"] for r in rec.select(gap_rows, parameterization=p, width=w, predictor="linearized")]
                cells.append(f"{np.mean(v):+.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_all(records: list[rec.Record], out: Path) -> list[Path]:
    paths = []
    if rec.select(records, metric="ntk_error"):
        paths.append(plot_kernel_error(records, out / "kernel_error.png"))
    if rec.select(records, metric="kernel_relative_change"):
        paths.append(plot_vs_width(records, out / "kernel_drift.png", "kernel_relative_change",
                                   where={"layer": "total"}, ylabel="‖K_T − K_0‖ / ‖K_0‖",
                                   title="kernel drift over training (probe batch)"))
        paths.append(plot_vs_width(records, out / "feature_change.png", "feature_relative_change",
                                   panels="parameterization", lines="layer", ylabel="‖h_T − h_0‖ / ‖h_0‖",
                                   title="per-layer feature change over training"))
        paths.append(plot_vs_width(records, out / "weight_change.png", "weight_relative_change",
                                   panels="parameterization", lines="layer", ylabel="‖θ_T − θ_0‖ / ‖θ_0‖",
                                   title="per-layer weight change over training"))
    if rec.select(records, metric="accuracy_gap"):
        paths.append(plot_vs_width(records, out / "accuracy_gap.png", "accuracy_gap", panels="predictor",
                                   log=False, ylabel="test accuracy: network − predictor",
                                   title="feature-learning effect: trained network vs kernel predictors"))
    return paths


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv, prog)
        args.argv = argv
        factory = load_factory(args.model) if args.model else None
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    apply_threads(args.threads)
    device = torch.device(args.device)
    x, y = nt.data.load_digits(args.probe + args.train + args.test, seed=args.seed)
    x, targets = x.to(device), nt.data.one_hot(y).to(device)
    probe, probe_y = x[: args.probe], y[: args.probe].to(device)
    train_slice = slice(args.probe, args.probe + args.train)
    test_slice = slice(args.probe + args.train, None)
    trainer = None
    if args.steps > 0:
        trainer = GradientDescent(x[train_slice], targets[train_slice], x[test_slice], targets[test_slice],
                                  steps=args.steps, lr_factor=args.lr_factor, implementation=args.implementation)
    runs = [(args.model, factory)] if factory else [(p, mlp_builder(p, args.depth, args.device))
                                                    for p in args.parameterizations]
    start = time.perf_counter()
    records: list[rec.Record] = []
    for name, build in runs:
        try:
            records += width_sweep(build, args.widths, probe, seeds=range(args.seeds), train=trainer,
                                   probe_y=probe_y, implementation=args.implementation,
                                   tags={"parameterization": name}, progress=not args.no_progress)
        except (TypeError, ValueError) as error:
            print(f"error: {name}: {error}", file=sys.stderr)
            return 1
    records += gaps(records)
    seconds = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    rec.to_csv(records, args.out / "records.csv")
    summary = summarize(records, args)
    (args.out / "summary.md").write_text(summary)
    plots = plot_all(records, args.out)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(seconds=round(seconds, 1), torch=torch.__version__, ntk_torch=nt.__version__,
                  threads=torch.get_num_threads())
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(summary)
    print(f"{len(records)} records, {len(plots)} plots in {args.out}/ ({seconds:.0f} s)")
    return 0
