"""``ntk-torch intuition``: the NTK on 1-D examples, eigenmodes, trained nets vs the NTK-GP.

Writes, under ``--out``:

- ``toy_step.png``: four 1-D models on the integers -10..20 (look-up table, linear, the
  same line reparameterized, a two-bump RBF model) and how one gradient step on the
  observation (10, 50) at learning rate 0.1 moves every f(x);
- ``toy_kernels.png``: the finite-step kernel [f(x; θ + η ∇f(10)) - f(x; θ)] / η against
  its η -> 0 limit k(x, 10), the empirical NTK;
- ``toy_kernel_change.png``: the RBF model's k(x, 10) over 15 gradient-ascent steps on f(10);
- ``eigenmodes.png``: leading eigenmodes of a 2-layer ReLU network's NTK on [-3, 3];
- ``regression.png``: 5-point regression by 3-layer ReLU and erf nets over several seeds
  and their linearizations against the NTK-GP posterior mean ± 2 std at the same training
  time;
- ``metrics.json`` (the numbers quoted in the README) and ``config.json``.

    ntk-torch intuition --out docs/intuition
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import ntk_torch as nt
from ntk_torch.cli._ntk_gp_regression import infinite_width_kernels, mlp, regression
from ntk_torch.cli._program import (
    ArgumentParser,
    UsageError,
    add_common_options,
    check_at_least,
    config_of,
    fill_preset,
    resolve_device,
    run_program,
)
from ntk_torch.cli._toy_kernels import (
    F64,
    OBSERVATION,
    RBF_INIT,
    RBF_LITERAL_INIT,
    STEP_LR,
    TwoBumps,
    ascent_kernels,
    finite_step_kernel,
    gradient_step,
    ntk_column,
    relative_change,
    toy_models,
)
from ntk_torch.plotting import (
    plot_eigenmodes,
    plot_ensembles_vs_gp,
    plot_function_steps,
    plot_kernel_evolution,
    plot_tangent_kernels,
)

COMMAND = "intuition"
DEFAULT = {"eigen_width": 4096, "eigen_points": 61, "width": 512, "seeds": 8, "steps": 1000}
QUICK = {"eigen_width": 128, "eigen_points": 21, "width": 64, "seeds": 2, "steps": 50}
ETAS = (1.0, 0.1, 0.01, 0.001)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options, with the sizes of ``--quick`` or the default run filled in."""
    parser = ArgumentParser(COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/intuition"))
    parser.add_argument("--ascent-steps", type=int, default=15)
    parser.add_argument("--ascent-lr", type=float, default=1.0)
    parser.add_argument("--eigen-width", type=int,
                        help=f"width of the 2-layer ReLU net ({DEFAULT['eigen_width']})")
    parser.add_argument("--eigen-points", type=int,
                        help=f"grid points on [-3, 3] ({DEFAULT['eigen_points']})")
    parser.add_argument("--width", type=int,
                        help=f"width of the 3-layer nets ({DEFAULT['width']})")
    parser.add_argument("--seeds", type=int,
                        help=f"trained nets per ensemble, at least 2 ({DEFAULT['seeds']})")
    parser.add_argument("--steps", type=int, help=f"gradient-descent steps ({DEFAULT['steps']})")
    add_common_options(parser, implementation=False, threads=1)
    args = parser.parse_args(argv)
    fill_preset(args, QUICK if args.quick else DEFAULT)
    check_at_least(args, 1, "ascent_steps", "eigen_width", "eigen_points", "width", "steps")
    if args.seeds < 2:
        raise UsageError(f"--seeds must be at least 2 for an ensemble spread, got {args.seeds}")
    args.device = resolve_device(args.device)
    return args


def toy_figures(args: argparse.Namespace, out: Path) -> dict[str, object]:
    """Toy models on the integers -10..20: one step, tangent kernels, a kernel that moves."""
    grid = torch.arange(-10, 21, dtype=F64, device=args.device)
    models = toy_models(grid)
    steps = {name: gradient_step(m, grid) for name, m in models.items()}
    plot_function_steps(grid, steps, out / "toy_step.png", observation=OBSERVATION, lr=STEP_LR)
    limit = {name: ntk_column(m, grid) for name, m in models.items()}
    finite = {name: {eta: finite_step_kernel(m, grid, eta) for eta in ETAS}
              for name, m in models.items()}
    plot_tangent_kernels(grid, limit, {name: {eta: finite[name][eta] for eta in (1.0, 0.1)}
                                       for name in models},
                         out / "toy_kernels.png", x0=OBSERVATION[0])
    i10 = int((grid == OBSERVATION[0]).nonzero())
    metrics: dict[str, object] = {}
    metrics["toy"] = {
        name: {
            "f10_before_after_step": [float(steps[name][0][i10]), float(steps[name][1][i10])],
            "k_10_10": float(limit[name][i10]),
            "argmax_k_x_10": float(grid[limit[name].argmax()]),
            "min_k_over_k_10_10": float(limit[name].min() / limit[name][i10]),
            # max_x |k̃_η(x, 10) - k(x, 10)| / k(10, 10): zero for models linear in θ, O(η)
            # otherwise
            "finite_step_error": {str(eta): float((finite[name][eta] - limit[name]).abs().max()
                                                  / limit[name][i10]) for eta in ETAS},
            "kernel_change_15_ascent_steps": relative_change(
                ascent_kernels(m, grid, args.ascent_steps, args.ascent_lr)[0]),
        }
        for name, m in models.items()
    }
    kernels, functions = ascent_kernels(models["two-bump RBF"], grid, args.ascent_steps,
                                        args.ascent_lr)
    plot_kernel_evolution(grid, kernels, functions, out / "toy_kernel_change.png",
                          x0=OBSERVATION[0],
                          title=f"two-bump RBF model: {args.ascent_steps} gradient-ascent steps "
                                f"on f(10), lr {args.ascent_lr:g}")
    literal = TwoBumps(RBF_LITERAL_INIT).to(args.device)
    metrics["rbf_literal"] = {
        "init": list(RBF_LITERAL_INIT),
        "kernel_change_15_ascent_steps": relative_change(
            ascent_kernels(literal, grid, args.ascent_steps, args.ascent_lr)[0]),
        "argmax_k_x_10": float(grid[ntk_column(literal, grid).argmax()]),
    }
    return metrics


def eigenmode_figure(args: argparse.Namespace, out: Path) -> dict[str, object]:
    """Eigenmodes of a 2-layer (one hidden layer) ReLU network's NTK on [-3, 3]."""
    x = torch.linspace(-3, 3, args.eigen_points, dtype=F64, device=args.device)[:, None]
    torch.manual_seed(args.seed)
    net = mlp(args.eigen_width, 1, "relu", 1.0, 1.0).to(args.device)
    modes = nt.eigenmodes(nt.empirical_ntk(net, x, mode="trace"))
    plot_eigenmodes(x, modes, out / "eigenmodes.png", n_modes=4,
                    title=f"NTK of one 2-layer ReLU net (width {args.eigen_width}, NTK "
                          "parameterization, σ_w = σ_b = 1) on a grid over [-3, 3]")
    limit_modes = nt.eigenmodes(infinite_width_kernels(x, 1, "relu", 1.0, 1.0)[1])
    return {
        "top_eigenvalues": [float(v) for v in modes.values[:6]],
        "infinite_width_top_eigenvalues": [float(v) for v in limit_modes.values[:6]],
        # |cos| between the network's and the limit's j-th eigenvector
        "overlap_with_infinite_width": [
            float((modes.vectors[:, j] @ limit_modes.vectors[:, j]).abs()) for j in range(4)],
    }


def run(args: argparse.Namespace) -> int:
    """Draw the figures, then write metrics.json and config.json."""
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    metrics = toy_figures(args, args.out)
    metrics["eigenmodes"] = eigenmode_figure(args, args.out)

    # Five-point regression by 3-layer nets, ReLU and the smooth erf for contrast.
    x = torch.tensor([-2.4, -1.3, -0.2, 0.9, 2.1], dtype=F64, device=args.device)[:, None]
    y = torch.sin(1.6 * x[:, 0]) + 0.3 * x[:, 0]
    xs = torch.linspace(-3, 3, 121 if not args.quick else 31, dtype=F64,
                        device=args.device)[:, None]
    runs = {activation: regression(args, activation, x, y, xs) for activation in ("relu", "erf")}
    metrics["regression"] = {activation: run["metrics"] for activation, run in runs.items()}
    plot_ensembles_vs_gp(x, y, xs, {f"{activation} (lr {run['metrics']['lr']:.3g})": run
                                    for activation, run in runs.items()},
                         args.out / "regression.png",
                         title=f"3-layer nets (width {args.width}, {args.seeds} seeds) after "
                               f"{args.steps} GD steps against the infinite-width NTK-GP at the "
                               "same time")

    seconds = time.perf_counter() - start
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    config = config_of(args, observation=list(OBSERVATION), step_lr=STEP_LR,
                       rbf_init=list(RBF_INIT), finite_step_etas=list(ETAS),
                       regression={"x": x[:, 0].tolist(), "y": y.tolist()},
                       torch=torch.__version__, seconds=round(seconds, 2))
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {args.out} in {seconds:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``ntk-torch intuition`` with ``argv`` (default: the command line); the exit status."""
    return run_program(COMMAND, parse_args, run, argv)
