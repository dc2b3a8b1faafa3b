"""Intuition for the NTK on 1-D examples: toy models, eigenmodes, the NTK-GP of trained nets.

Writes, under ``--out``:

- ``toy_step.png``: four 1-D models on the integers -10..20 (look-up table, linear, the
  same line reparameterized, a two-bump RBF model) and how one gradient step on the
  observation (10, 50) at learning rate 0.1 moves every f(x);
- ``toy_kernels.png``: the finite-step kernel [f(x; θ + η ∇f(10)) - f(x; θ)] / η against
  its η -> 0 limit k(x, 10), the empirical NTK;
- ``toy_kernel_change.png``: the RBF model's k(x, 10) over 15 gradient-ascent steps on f(10);
- ``eigenmodes.png``: leading eigenmodes of a 2-layer ReLU network's NTK on [-3, 3];
- ``regression.png``: 5-point regression by 3-layer ReLU nets over several seeds and their
  linearizations against the NTK-GP posterior mean ± 2 std at the same training time;
- ``metrics.json`` (the numbers quoted in the README) and ``config.json``.

    python scripts/ntk_intuition.py --out docs/intuition
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import ntk_torch as nt
from ntk_torch.plotting import plot_eigenmodes

F64 = torch.float64
OBSERVATION = (10.0, 50.0)
STEP_LR = 0.1
# The issue/seed print (θ1..θ5) = (4, -10, 25, 10, 50) for
# θ1·e^{-(x-θ2)²/30} + θ3·e^{-(x-θ4)²/30} + θ5. Read literally, the bump at 10 is centred on
# the observation (∂f(10)/∂θ4 = 0) and the other is 20 units away, so the kernel hardly moves
# (metrics.json: rbf_literal). The seed's
# description (a valley near 4, the kernel peaking left of 10 with a negative lobe, a kernel
# that changes in training) holds with amplitudes (-10, 10) and centres (4, 25): we draw that.
RBF_INIT = (-10.0, 4.0, 10.0, 25.0, 50.0)
RBF_LITERAL_INIT = (4.0, -10.0, 25.0, 10.0, 50.0)


# ----------------------------------------------------------------------------- toy models

class LookupTable(nn.Module):
    """f(i) = θ_i for the integers lo..hi: every input has its own parameter."""

    def __init__(self, lo: int, values: torch.Tensor) -> None:
        super().__init__()
        self.lo = lo
        self.theta = nn.Parameter(values.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No range check here: data-dependent branches break vmap inside empirical_ntk;
        # out-of-range inputs fail in the indexing itself.
        return self.theta[x.round().long() - self.lo]


class Linear1d(nn.Module):
    """f(x) = θ1·x + scale·θ2; scale = 10 is the reparameterized line."""

    def __init__(self, theta: tuple[float, float], scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.theta = nn.Parameter(torch.tensor(theta, dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta[0] * x + self.scale * self.theta[1]


class TwoBumps(nn.Module):
    """f(x) = θ1·exp(-(x-θ2)²/30) + θ3·exp(-(x-θ4)²/30) + θ5."""

    def __init__(self, theta: tuple[float, ...]) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.theta
        bumps = t[0] * torch.exp(-(x - t[1]) ** 2 / 30) + t[2] * torch.exp(-(x - t[3]) ** 2 / 30)
        return bumps + t[4]


def toy_models(grid: torch.Tensor) -> dict[str, nn.Module]:
    return {
        "look-up table": LookupTable(int(grid[0]), 3 * grid + 1),
        "linear θ1·x + θ2": Linear1d((3.0, 1.0)),
        "reparameterized θ1·x + 10·θ2": Linear1d((3.0, 0.1), scale=10.0),
        "two-bump RBF": TwoBumps(RBF_INIT),
    }


def _grad_at(model: nn.Module, x0: float) -> torch.Tensor:
    """∇θ f(x0) for a model with one parameter vector ``theta``."""
    out = model(torch.tensor([x0], dtype=F64))[0]
    return torch.autograd.grad(out, model.theta)[0]


def _shifted(model: nn.Module, direction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        model.theta.add_(direction)
        try:
            return model(x).clone()
        finally:
            model.theta.sub_(direction)


def gradient_step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f before and after one GD step on ½(f(10) - 50)² at lr 0.1."""
    x0, y0 = OBSERVATION
    with torch.no_grad():
        before = model(x)
        residual = float(model(torch.tensor([x0], dtype=F64))[0]) - y0
    step = -STEP_LR * residual * _grad_at(model, x0)
    return before, _shifted(model, step, x)


def finite_step_kernel(model: nn.Module, x: torch.Tensor, eta: float) -> torch.Tensor:
    """k̃_η(x, 10) = [f(x; θ + η ∇f(10)) - f(x; θ)] / η."""
    with torch.no_grad():
        base = model(x)
    return (_shifted(model, eta * _grad_at(model, OBSERVATION[0]), x) - base) / eta


def ntk_column(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """k(x, 10) from the package's empirical NTK (the η -> 0 limit)."""
    return nt.empirical_ntk(model, x, torch.tensor([OBSERVATION[0]], dtype=F64), mode="trace")[:, 0]


def ascent_kernels(model: nn.Module, x: torch.Tensor, steps: int, lr: float):
    """k(x, 10) and f(x) along ``steps`` gradient-ascent steps θ += lr ∇f(10)."""
    kernels, functions = [ntk_column(model, x)], [model(x).detach()]
    saved = model.theta.detach().clone()
    try:
        for _ in range(steps):
            direction = _grad_at(model, OBSERVATION[0])
            with torch.no_grad():
                model.theta.add_(lr * direction)
            kernels.append(ntk_column(model, x))
            functions.append(model(x).detach())
    finally:
        with torch.no_grad():
            model.theta.copy_(saved)
    return torch.stack(kernels), torch.stack(functions)


def _relative_change(kernels: torch.Tensor) -> float:
    return float((kernels[-1] - kernels[0]).norm() / kernels[0].norm())


# ----------------------------------------------------------------------------- wide nets

def mlp(width: int, depth: int, activation: str, weight_std: float, bias_std: float) -> nn.Module:
    return nt.nn.MLP(1, width, depth, 1, activation=activation, parameterization="ntk",
                     weight_std=weight_std, bias_std=bias_std).double().eval()


def infinite_width_kernels(x: torch.Tensor, depth: int, activation: str, weight_std: float,
                           bias_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(NNGP, NTK) ``(N, N)`` on ``x`` of the infinitely wide MLP built by :func:`mlp`."""
    k = nt.analytic.mlp_kernel(x, None, depth=depth, activation=activation, weight_std=weight_std,
                               bias_std=bias_std, parameterization="ntk")
    return k.nngp.to(F64), k.ntk.to(F64)


def regression(args: argparse.Namespace, activation: str, x: torch.Tensor, y: torch.Tensor,
               xs: torch.Tensor) -> dict[str, object]:
    """Ensembles of trained and linearized 3-layer nets against the NTK-GP at the same time."""
    depth, weight_std, bias_std = 2, 1.0, 0.2
    nngp, ntk = infinite_width_kernels(torch.cat([x, xs]), depth, activation, weight_std, bias_std)
    n = len(x)
    lam = torch.linalg.eigvalsh(ntk[:n, :n])
    lr = 1.0 / float(lam[-1])  # half the stability limit 2/λ_max
    posterior = nt.ntk_gp_posterior(nngp[:n, :n], nngp[n:, :n], nngp[n:, n:], ntk[:n, :n],
                                    ntk[n:, :n], y, args.steps, lr=lr)
    trained, linearized, kernel_errors, spectra = [], [], [], []
    for s in range(args.seeds):
        torch.manual_seed(args.seed + s)
        net = mlp(args.width, depth, activation, weight_std, bias_std)
        lin = nt.linearize(net)
        # How far this finite net's NTK is from the infinite-width one the NTK-GP uses.
        kernel_errors.append(float((nt.empirical_ntk(net, x, mode="trace") - ntk[:n, :n]).norm()
                                   / ntk[:n, :n].norm()))
        before = torch.linalg.eigvalsh(nt.empirical_ntk(net, x, mode="trace"))
        trained.append(train(net, x, y, xs, lr, args.steps))
        linearized.append(train(lin, x, y, xs, lr, args.steps))
        # The linearized net keeps its kernel by construction; the trained one may not.
        spectra.append((before, torch.linalg.eigvalsh(nt.empirical_ntk(net, x, mode="trace"))))
    trained_t, linearized_t = torch.stack(trained), torch.stack(linearized)
    scale = float(y.abs().max())

    def rms(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).pow(2).mean().sqrt()) / scale

    return {
        "posterior": posterior, "trained": trained_t, "linearized": linearized_t,
        "metrics": {
            "weight_std": weight_std, "bias_std": bias_std, "depth": depth, "lr": lr,
            "steps": args.steps,
            "ntk_train_relative_error_per_seed": kernel_errors,
            "residual_left_slowest_mode": math.exp(-lr * args.steps * float(lam[0])),
            # eigenvalues of the trained nets' empirical NTK on the 5 training points, ascending,
            # averaged over seeds, at initialisation and after training
            "ntk_eigenvalues_init": torch.stack([b for b, _ in spectra]).mean(0).tolist(),
            "ntk_eigenvalues_trained": torch.stack([a for _, a in spectra]).mean(0).tolist(),
            # root-mean-square over the test grid, relative to max |y|
            "rms_trained_mean_vs_gp_mean": rms(trained_t.mean(0), posterior.mean),
            "rms_linearized_mean_vs_gp_mean": rms(linearized_t.mean(0), posterior.mean),
            "rms_trained_vs_linearized_per_seed": rms(trained_t, linearized_t),
            "mean_gp_std": float(posterior.variance.clamp_min(0).sqrt().mean()),
            "mean_trained_ensemble_std": float(trained_t.std(0).mean()),
            "mean_linearized_ensemble_std": float(linearized_t.std(0).mean()),
        },
    }


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, xs: torch.Tensor, lr: float,
          steps: int) -> torch.Tensor:
    """Full-batch GD on ½Σ(f - y)²; returns the outputs on ``xs`` after ``steps`` steps."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (net(x)[:, 0] - y).pow(2).sum()).backward()
        opt.step()
    with torch.no_grad():
        return net(xs)[:, 0]


# ----------------------------------------------------------------------------- figures

def _figure(rows: int, cols: int, size: tuple[float, float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    return fig, np.atleast_1d(fig.subplots(rows, cols)).ravel()


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)


def draw_steps(path: Path, grid: torch.Tensor,
               steps: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    fig, axes = _figure(2, 2, (11, 7.5))
    xs = grid.numpy()
    for ax, (name, (before, after)) in zip(axes, steps.items()):
        b, a = before.numpy(), after.numpy()
        ax.plot(xs, b, "k.", label="f before")
        moved = np.abs(a - b) > 1e-9 * np.maximum(1.0, np.abs(b))
        ax.quiver(xs[moved], b[moved], np.zeros(moved.sum()), (a - b)[moved], angles="xy",
                  scale_units="xy", scale=1.0, color="C3", width=0.004, label="one gradient step")
        ax.plot(xs, a, ".", color="C3", alpha=0.5, label="f after the step")
        ax.plot(*OBSERVATION, "x", color="C0", markersize=10, mew=2, label="observation (10, 50)")
        i10 = int(np.argmin(np.abs(xs - OBSERVATION[0])))
        ax.set_title(f"{name}: f(10) {b[i10]:.3g} → {a[i10]:.3g}", fontsize=10)
        ax.set_xlabel("x")
        ax.legend(fontsize=7)
    fig.suptitle(f"one gradient step on ½(f(10) − 50)², lr {STEP_LR}")
    _save(fig, path)


def draw_kernels(path: Path, grid: torch.Tensor, limit: dict[str, torch.Tensor],
                 finite: dict[str, dict[float, torch.Tensor]]) -> None:
    fig, axes = _figure(2, 2, (11, 7.5))
    xs = grid.numpy()
    i10 = int(np.argmin(np.abs(xs - OBSERVATION[0])))
    for ax, name in zip(axes, limit):
        scale = float(limit[name][i10])
        ax.plot(xs, limit[name].numpy() / scale, "k-", label="k(x, 10), η → 0 (empirical NTK)")
        for j, (eta, k) in enumerate(finite[name].items()):
            ax.plot(xs, k.numpy() / scale, "o", markersize=4 - j, alpha=0.8,
                    label=f"finite step η = {eta:g}")
        ax.axhline(0.0, color="0.8", lw=0.8)
        ax.set_title(f"{name}  (k(10, 10) = {scale:.3g})", fontsize=10)
        ax.set_xlabel("x")
        ax.set_ylabel("k(x, 10) / k(10, 10)")
        ax.legend(fontsize=7)
    fig.suptitle("how much f(x) moves when a step raises f(10): the tangent kernel")
    _save(fig, path)


def draw_kernel_change(path: Path, grid: torch.Tensor, kernels: torch.Tensor,
                       functions: torch.Tensor, lr: float) -> None:
    from matplotlib import colormaps

    fig, (left, right) = _figure(1, 2, (11, 4.2))
    xs = grid.numpy()
    cmap = colormaps["plasma"]
    steps = kernels.shape[0] - 1
    i10 = int(np.argmin(np.abs(xs - OBSERVATION[0])))
    for s in range(steps + 1):
        colour = cmap(0.85 * s / max(steps, 1))
        label = "step 0" if s == 0 else (f"step {steps}" if s == steps else None)
        left.plot(xs, kernels[s].numpy() / float(kernels[s, i10]), color=colour, lw=1.2,
                  label=label)
        right.plot(xs, functions[s].numpy(), color=colour, lw=1.2, label=label)
    left.set_title("k(x, 10) / k(10, 10) along the ascent", fontsize=10)
    right.set_title("f(x) along the ascent", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("x")
        ax.axvline(OBSERVATION[0], color="0.8", lw=0.8)
        ax.legend(fontsize=8)
    fig.suptitle(f"two-bump RBF model: {steps} gradient-ascent steps on f(10), lr {lr:g}")
    _save(fig, path)


def draw_regression(path: Path, x: torch.Tensor, y: torch.Tensor, xs: torch.Tensor,
                    runs: dict[str, dict[str, object]], title: str) -> None:
    fig, axes = _figure(len(runs), 2, (12, 4.2 * len(runs)))
    grid = xs[:, 0].numpy()
    panels = [(activation, kind, run) for activation, run in runs.items()
              for kind in ("trained", "linearized")]
    for ax, (activation, kind, run) in zip(axes, panels):
        posterior = run["posterior"]
        mean = posterior.mean.numpy()
        std = posterior.variance.clamp_min(0).sqrt().numpy()
        ax.fill_between(grid, mean - 2 * std, mean + 2 * std, color="C1", alpha=0.2,
                        label="NTK-GP mean ± 2 std")
        ax.plot(grid, mean, color="C1", lw=2)
        colour = "C0" if kind == "trained" else "C2"
        for i, curve in enumerate(run[kind].numpy()):
            ax.plot(grid, curve, color=colour, lw=0.8, alpha=0.6,
                    label=f"{kind} nets, one per seed" if i == 0 else None)
        ens_mean, ens_std = run[kind].mean(0).numpy(), run[kind].std(0).numpy()
        ax.plot(grid, ens_mean, "--", color="k", lw=1.2, label="ensemble mean")
        ax.plot(grid, ens_mean + 2 * ens_std, ":", color="k", lw=1.0, label="ensemble ± 2 std")
        ax.plot(grid, ens_mean - 2 * ens_std, ":", color="k", lw=1.0)
        ax.plot(x[:, 0].numpy(), y.numpy(), "x", color="C3", markersize=9, mew=2,
                label="training points")
        lr = run["metrics"]["lr"]
        ax.set_title(f"{activation}: {kind} nets (lr {lr:.3g})", fontsize=10)
        ax.set_xlabel("x")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/ntk_intuition"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu",
                        help="only cpu is used: every model here is tiny")
    parser.add_argument("--ascent-steps", type=int, default=15)
    parser.add_argument("--ascent-lr", type=float, default=1.0)
    parser.add_argument("--eigen-width", type=int, default=4096,
                        help="width of the 2-layer ReLU net")
    parser.add_argument("--eigen-points", type=int, default=61, help="grid points on [-3, 3]")
    parser.add_argument("--width", type=int, default=512, help="width of the 3-layer ReLU nets")
    parser.add_argument("--seeds", type=int, default=8, help="trained nets per ensemble")
    parser.add_argument("--steps", type=int, default=1000, help="gradient-descent steps")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; tiny models run fastest on one")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.eigen_width, args.eigen_points = min(args.eigen_width, 128), min(args.eigen_points, 21)
        args.width, args.seeds = min(args.width, 64), min(args.seeds, 2)
        args.steps = min(args.steps, 50)
    for name in ("threads", "ascent_steps", "eigen_width", "eigen_points", "width", "seeds",
                 "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.seeds < 2:
        parser.error(f"--seeds must be at least 2 for an ensemble spread, got {args.seeds}")
    if args.device != "cpu":
        parser.error(f"--device: these 1-D examples run on cpu only, got {args.device!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    metrics: dict[str, object] = {}

    # 1. Toy models on the integers -10..20.
    grid = torch.arange(-10, 21, dtype=F64)
    models = toy_models(grid)
    steps = {name: gradient_step(m, grid) for name, m in models.items()}
    draw_steps(args.out / "toy_step.png", grid, steps)
    limit = {name: ntk_column(m, grid) for name, m in models.items()}
    etas = (1.0, 0.1, 0.01, 0.001)
    finite = {name: {eta: finite_step_kernel(m, grid, eta) for eta in etas}
              for name, m in models.items()}
    draw_kernels(args.out / "toy_kernels.png", grid, limit,
                 {name: {eta: finite[name][eta] for eta in (1.0, 0.1)} for name in models})
    i10 = int((grid == OBSERVATION[0]).nonzero())
    metrics["toy"] = {
        name: {
            "f10_before_after_step": [float(steps[name][0][i10]), float(steps[name][1][i10])],
            "k_10_10": float(limit[name][i10]),
            "argmax_k_x_10": float(grid[limit[name].argmax()]),
            "min_k_over_k_10_10": float(limit[name].min() / limit[name][i10]),
            # max_x |k̃_η(x, 10) - k(x, 10)| / k(10, 10): zero for models linear in θ, O(η)
            # otherwise
            "finite_step_error": {str(eta): float((finite[name][eta] - limit[name]).abs().max()
                                                  / limit[name][i10]) for eta in etas},
            "kernel_change_15_ascent_steps": _relative_change(
                ascent_kernels(m, grid, args.ascent_steps, args.ascent_lr)[0]),
        }
        for name, m in models.items()
    }
    kernels, functions = ascent_kernels(models["two-bump RBF"], grid, args.ascent_steps,
                                        args.ascent_lr)
    draw_kernel_change(args.out / "toy_kernel_change.png", grid, kernels, functions, args.ascent_lr)
    literal = TwoBumps(RBF_LITERAL_INIT)
    metrics["rbf_literal"] = {
        "init": list(RBF_LITERAL_INIT),
        "kernel_change_15_ascent_steps": _relative_change(
            ascent_kernels(literal, grid, args.ascent_steps, args.ascent_lr)[0]),
        "argmax_k_x_10": float(grid[ntk_column(literal, grid).argmax()]),
    }

    # 2. Eigenmodes of a 2-layer (one hidden layer) ReLU network's NTK on [-3, 3].
    eig_x = torch.linspace(-3, 3, args.eigen_points, dtype=F64)[:, None]
    torch.manual_seed(args.seed)
    net = mlp(args.eigen_width, 1, "relu", 1.0, 1.0)
    modes = nt.eigenmodes(nt.empirical_ntk(net, eig_x, mode="trace"))
    plot_eigenmodes(eig_x, modes, args.out / "eigenmodes.png", n_modes=4,
                    title=f"NTK of one 2-layer ReLU net (width {args.eigen_width}, NTK "
                          "parameterization, σ_w = σ_b = 1) on a grid over [-3, 3]")
    _, ntk_inf = infinite_width_kernels(eig_x, 1, "relu", 1.0, 1.0)
    limit_modes = nt.eigenmodes(ntk_inf)
    metrics["eigenmodes"] = {
        "top_eigenvalues": [float(v) for v in modes.values[:6]],
        "infinite_width_top_eigenvalues": [float(v) for v in limit_modes.values[:6]],
        # |cos| between the network's and the limit's j-th eigenvector
        "overlap_with_infinite_width": [
            float((modes.vectors[:, j] @ limit_modes.vectors[:, j]).abs()) for j in range(4)],
    }

    # 3. Five-point regression: trained 3-layer nets and their linearizations vs the NTK-GP,
    # ReLU as in the seed and erf, a smooth activation, for contrast.
    x = torch.tensor([-2.4, -1.3, -0.2, 0.9, 2.1], dtype=F64)[:, None]
    y = torch.sin(1.6 * x[:, 0]) + 0.3 * x[:, 0]
    xs = torch.linspace(-3, 3, 121 if not args.quick else 31, dtype=F64)[:, None]
    runs = {activation: regression(args, activation, x, y, xs) for activation in ("relu", "erf")}
    metrics["regression"] = {activation: run["metrics"] for activation, run in runs.items()}
    draw_regression(args.out / "regression.png", x, y, xs, runs,
                    f"3-layer nets (width {args.width}, {args.seeds} seeds) after {args.steps} "
                    "GD steps against the infinite-width NTK-GP at the same time")

    seconds = time.perf_counter() - start
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    config = {key: (str(value) if isinstance(value, Path) else value)
              for key, value in vars(args).items()}
    config.update(observation=list(OBSERVATION), step_lr=STEP_LR, rbf_init=list(RBF_INIT),
                  finite_step_etas=list(etas), regression={"x": x[:, 0].tolist(), "y": y.tolist()},
                  torch=torch.__version__, seconds=round(seconds, 2))
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {args.out} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
