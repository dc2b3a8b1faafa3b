"""Toy models of one input and what one gradient step does to them (``ntk-torch intuition``).

Every model has one parameter vector ``theta``, float64, on the device of its inputs.
"""

from __future__ import annotations

import torch
from torch import nn

import ntk_torch as nt

F64 = torch.float64
OBSERVATION = (10.0, 50.0)
STEP_LR = 0.1
# θ1·e^{-(x-θ2)²/30} + θ3·e^{-(x-θ4)²/30} + θ5. With amplitudes (-10, 10) and centres (4, 25)
# the model has a valley near 4, its kernel k(x, 10) peaks left of 10 with a negative lobe,
# and the kernel changes in training: the figures use these values. With (θ1..θ5) =
# (4, -10, 25, 10, 50) instead, one bump sits on the observation (∂f(10)/∂θ4 = 0) and the
# other 20 units away, so the kernel hardly moves (metrics.json: rbf_literal).
RBF_INIT = (-10.0, 4.0, 10.0, 25.0, 50.0)
RBF_LITERAL_INIT = (4.0, -10.0, 25.0, 10.0, 50.0)


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
    """The four models of the figures, on ``grid``'s device.

    At initialisation the table and both lines are f(i) = 3i + 1.
    """
    models = {
        "look-up table": LookupTable(int(grid[0]), 3 * grid.cpu() + 1),
        "linear θ1·x + θ2": Linear1d((3.0, 1.0)),
        "reparameterized θ1·x + 10·θ2": Linear1d((3.0, 0.1), scale=10.0),
        "two-bump RBF": TwoBumps(RBF_INIT),
    }
    return {name: model.to(grid.device) for name, model in models.items()}


def _point(model: nn.Module, x0: float) -> torch.Tensor:
    return torch.tensor([x0], dtype=F64, device=model.theta.device)


def _grad_at(model: nn.Module, x0: float) -> torch.Tensor:
    """∇θ f(x0) for a model with one parameter vector ``theta``."""
    out = model(_point(model, x0))[0]
    return torch.autograd.grad(out, model.theta)[0]


def _shifted(model: nn.Module, direction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        model.theta.add_(direction)
        try:
            return model(x).clone()
        finally:
            model.theta.sub_(direction)


def gradient_step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """F before and after one GD step on ½(f(10) - 50)² at lr 0.1."""
    x0, y0 = OBSERVATION
    with torch.no_grad():
        before = model(x)
        residual = float(model(_point(model, x0))[0]) - y0
    step = -STEP_LR * residual * _grad_at(model, x0)
    return before, _shifted(model, step, x)


def finite_step_kernel(model: nn.Module, x: torch.Tensor, eta: float) -> torch.Tensor:
    """k̃_η(x, 10) = [f(x; θ + η ∇f(10)) - f(x; θ)] / η."""
    with torch.no_grad():
        base = model(x)
    return (_shifted(model, eta * _grad_at(model, OBSERVATION[0]), x) - base) / eta


def ntk_column(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """k(x, 10) from the package's empirical NTK (the η -> 0 limit)."""
    return nt.empirical_ntk(model, x, _point(model, OBSERVATION[0]), mode="trace")[:, 0]


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


def relative_change(kernels: torch.Tensor) -> float:
    """``‖k_T − k_0‖ / ‖k_0‖`` of ``(T + 1, N)`` kernel columns."""
    return float((kernels[-1] - kernels[0]).norm() / kernels[0].norm())
