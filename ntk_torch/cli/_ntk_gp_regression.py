"""Wide nets of one input against the infinite-width NTK-GP (``ntk-torch intuition``)."""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import ntk_torch as nt

F64 = torch.float64


def mlp(width: int, depth: int, activation: str, weight_std: float, bias_std: float) -> nn.Module:
    """A float64 MLP of one input and one output, NTK parameterization, eval mode."""
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
        net = mlp(args.width, depth, activation, weight_std, bias_std).to(x.device)
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
