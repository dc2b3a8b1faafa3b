"""``ntk-torch sweep``: width sweep of ReLU networks on digits, the eNTK and what training moves.

For every parameterization (ntk, standard, mup), width and seed, ``ntk_torch.width_sweep``
measures on a probe batch of digits the trace-mode empirical NTK at initialisation against
``ntk_torch.analytic.kernel`` of the same architecture, then trains the network by
full-batch gradient descent on MSE to one-hot targets (``ntk_torch.training.GradientDescent``)
and records the kernel drift, per-layer feature and weight change, and train/test loss and
accuracy of the trained network, of its linearization trained the same way, and of the
same descent under the infinite-width NTK from the same initial outputs.

The default run takes minutes and prints its conclusions: the eNTK error of the NTK
parameterization falls as width^(-1/2), μP's kernel drift is flat in width, and the
accuracy gap between trained and linearized networks closes with width. It trains up to
width 1024; at widths 2048 and 4096 (``--init-widths``) it measures the kernel at
initialisation only, which costs seconds where training costs minutes. ``--full`` is the
run documented in docs/width_sweep (every width trained, ~9 minutes on 2 cores).

Writes, under ``--out``: ``records.csv`` (long format), ``config.json``, ``summary.md``
(conclusions, fitted power laws with 95% intervals, accuracies) and PNGs:
``kernel_error.png``, ``kernel_drift.png``, ``feature_change.png``, ``weight_change.png``
and ``accuracy_gap.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

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
    load_factory,
    resolve_device,
    run_program,
)
from ntk_torch.cli._sweep_report import accuracy_gaps, summarize
from ntk_torch.plotting import plot_kernel_error, plot_vs_width
from ntk_torch.sweeps import width_sweep
from ntk_torch.training import GradientDescent

COMMAND = "sweep"
# Sizes of a run; options given on the command line take precedence.
FULL = {"widths": [64, 128, 256, 512, 1024, 2048, 4096], "init_widths": [], "seeds": 5,
        "probe": 64, "train": 128, "test": 512, "steps": 100,
        "parameterizations": list(nt.nn.PARAMETERIZATIONS)}
# Minutes: training stops at 1024, where its cost takes over; the kernel at initialisation,
# all the eNTK error needs, is still measured at every width of the full run, so its slope
# is the full run's (with 5 seeds over 64-1024 alone its interval only just reaches -1/2).
DEFAULT = {**FULL, "widths": FULL["widths"][:5], "init_widths": FULL["widths"][5:]}
# The residual CNN's run (--model residual-cnn): widths 16-256 at initialisation, where
# its eNTK costs seconds per seed; the eNTK error against the CNTK is what it shows.
CNN = {"widths": [16, 32, 64, 128, 256], "init_widths": [], "seeds": 8, "probe": 32,
       "train": 128, "test": 512, "steps": 0, "parameterizations": ["ntk"]}
# Models by name for --model; any other value is MODULE:FACTORY.
BUILT_IN = ("mlp", "residual-cnn")
# Seconds: three widths to fit a slope, two seeds for an interval.
QUICK = {"widths": [16, 32, 64], "init_widths": [], "seeds": 2, "probe": 12, "train": 24,
         "test": 24, "steps": 5, "parameterizations": list(nt.nn.PARAMETERIZATIONS)}


def build_parser() -> ArgumentParser:
    """The options of ``ntk-torch sweep``."""
    parser = ArgumentParser(
        COMMAND, description="\n\n".join(__doc__.split("\n\n")[i] for i in (0, 2)),
        epilog="examples:\n  %(prog)s                     # the main job, minutes\n"
               "  %(prog)s --full --out docs/width_sweep\n"
               "  %(prog)s --parameterizations ntk mup --widths 128 512 2048 --seeds 3\n"
               "  %(prog)s --model mypackage.models:build   # build(width, seed) -> nn.Module, "
               "64 -> 10")
    parser.add_argument("--out", type=Path, default=Path("results/sweep"))
    parser.add_argument("--full", action="store_true",
                      help=f"the documented run: widths {FULL['widths'][0]}..{FULL['widths'][-1]}")
    parser.add_argument("--widths", type=int, nargs="+",
                        help=f"hidden widths, measured and trained ({DEFAULT['widths']})")
    parser.add_argument("--init-widths", type=int, nargs="*", metavar="WIDTH",
                        help="further widths where only the kernel at initialisation is "
                             f"measured, not trained ({DEFAULT['init_widths']}; none with "
                             "--full)")
    parser.add_argument("--seeds", type=int, help=f"initialisations per width ({DEFAULT['seeds']})")
    parser.add_argument("--parameterizations", nargs="+", choices=nt.nn.PARAMETERIZATIONS,
                        help="ntk standard mup (ntk only with --model residual-cnn)")
    parser.add_argument("--depth", type=int, default=2, help="hidden layers of the MLP")
    parser.add_argument("--model", default="mlp", metavar="MODEL",
                        help="mlp (default: nt.nn.MLP of --depth hidden layers), residual-cnn "
                             "(nt.nn.ResidualCNN on the digits as 8x8 images, one block; "
                             "widths 16-256 at initialisation by default), or MODULE:FACTORY: "
                             "your own build(width, seed) -> nn.Module (64 inputs, 10 outputs) "
                             "from an importable module or a .py file")
    parser.add_argument("--probe", type=int, help=f"digits in the probe batch ({DEFAULT['probe']})")
    parser.add_argument("--train", type=int, help=f"training digits ({DEFAULT['train']})")
    parser.add_argument("--test", type=int, help=f"test digits ({DEFAULT['test']})")
    parser.add_argument("--steps", type=int,
                        help=f"full-batch gradient steps, 0: no training ({DEFAULT['steps']})")
    parser.add_argument("--lr-factor", type=float, default=0.5,
                        help="step size as a fraction of N/λ_max of the initial NTK "
                             "(stable below 2)")
    add_common_options(parser, seed_help="seed of the data split; seeds 0..S-1 initialise")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options, with the sizes of ``--quick``, ``--full`` or the default run filled in."""
    args = build_parser().parse_args(argv)
    if args.quick and args.full:
        raise UsageError("--quick and --full exclude each other")
    fill_preset(args, QUICK if args.quick else FULL if args.full else
                CNN if args.model == "residual-cnn" else DEFAULT)
    check_at_least(args, 1, "seeds", "train", "test", "depth")
    check_at_least(args, 2, "probe")
    check_at_least(args, 0, "steps")
    if min(args.widths + args.init_widths) < 1:
        raise UsageError(f"--widths and --init-widths must be positive, got {args.widths} and "
                         f"{args.init_widths}")
    if set(args.widths) & set(args.init_widths):
        raise UsageError(f"--init-widths {args.init_widths} must not repeat --widths "
                         f"{args.widths}")
    if args.probe + args.train + args.test > nt.data.DIGITS:
        raise UsageError(f"--probe + --train + --test must be at most {nt.data.DIGITS} digits, got "
                         f"{args.probe + args.train + args.test}")
    args.device = resolve_device(args.device)
    return args


def builder(model: str, parameterization: str, depth: int, device: torch.device
            ) -> Callable[[int, int], nn.Module]:
    """``(width, seed) -> nt.nn.MLP`` or ``nt.nn.ResidualCNN`` on the digits (64 -> 10)."""
    def build(width: int, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        if model == "residual-cnn":
            net = nt.nn.ResidualCNN((1, 8, 8), width, 1, 10, parameterization=parameterization)
        else:
            net = nt.nn.MLP(64, width, depth, 10, parameterization=parameterization)
        return net.to(device)
    return build


def sweep(args: argparse.Namespace) -> list[rec.Record]:
    """Every run's records, then the accuracy gaps derived from them."""
    factory = None if args.model in BUILT_IN else load_factory(args.model)
    x, y = nt.data.load_digits(args.probe + args.train + args.test, seed=args.seed)
    x, targets = x.to(args.device), nt.data.one_hot(y).to(args.device)
    probe, probe_y = x[: args.probe], y[: args.probe].to(args.device)
    train, test = slice(args.probe, args.probe + args.train), slice(args.probe + args.train, None)
    trainer = None
    if args.steps > 0:
        trainer = GradientDescent(x[train], targets[train], x[test], targets[test],
                                  steps=args.steps, lr_factor=args.lr_factor,
                                  implementation=args.implementation)
    runs = ([(args.model, factory)] if factory else
            [(p, builder(args.model, p, args.depth, args.device))
             for p in args.parameterizations])
    records: list[rec.Record] = []
    for name, build in runs:
        for widths, train in ((args.widths, trainer), (args.init_widths, None)):
            if not widths:
                continue
            with bad_input(f"{name}: "):
                records += width_sweep(build, widths, probe, seeds=range(args.seeds),
                                       train=train, probe_y=probe_y,
                                       implementation=args.implementation,
                                       tags={"parameterization": name},
                                       progress=not args.no_progress)
    return records + accuracy_gaps(records)


def plot_all(records: list[rec.Record], out: Path) -> list[Path]:
    """The figures the records allow: kernel error, drift, feature/weight change, gaps."""
    paths = []
    if rec.select(records, metric="ntk_error"):
        paths.append(plot_kernel_error(records, out / "kernel_error.png"))
    if rec.select(records, metric="kernel_relative_change"):
        paths.append(plot_vs_width(records, out / "kernel_drift.png", "kernel_relative_change",
                                   where={"layer": "total"}, ylabel="‖K_T − K_0‖ / ‖K_0‖",
                                   title="kernel drift over training (probe batch)"))
        for name, metric, what in (("feature_change", "feature_relative_change", "h"),
                                   ("weight_change", "weight_relative_change", "θ")):
            paths.append(plot_vs_width(records, out / f"{name}.png", metric,
                                       panels="parameterization", lines="layer",
                                       ylabel=f"‖{what}_T − {what}_0‖ / ‖{what}_0‖",
                                       title=f"per-layer {name.replace('_', ' ')} over training"))
    if rec.select(records, metric="accuracy_gap"):
        paths.append(plot_vs_width(records, out / "accuracy_gap.png", "accuracy_gap",
                                   panels="predictor", log=False,
                                   ylabel="test accuracy: network − predictor",
                                   title="feature-learning effect: trained network vs kernel "
                                         "predictors"))
    return paths


def run(args: argparse.Namespace) -> int:
    """Sweep, then write records, summary, figures and config; print the summary."""
    start = time.perf_counter()
    records = sweep(args)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    rec.to_csv(records, args.out / "records.csv")
    summary = summarize(records, command=" ".join(["ntk-torch", COMMAND, *args.argv]))
    (args.out / "summary.md").write_text(summary)
    plots = plot_all(records, args.out)
    config = config_of(args, seconds=round(seconds, 1), torch=torch.__version__,
                       ntk_torch=nt.__version__, threads=torch.get_num_threads())
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(summary)
    print(f"{len(records)} records, {len(plots)} plots in {args.out}/ ({seconds:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``ntk-torch sweep`` with ``argv`` (default: the command line); the exit status."""
    return run_program(COMMAND, parse_args, run, argv)
