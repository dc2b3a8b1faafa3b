"""The kernel engines and the cost model that ``implementation="auto"`` uses.

Each engine module provides ``estimate(problem) -> Cost`` (FLOPs, peak bytes of one
block) and ``compute(fm, params, x1, x2, mode, groups, *, problem, memory_budget)``
returning ``{group: block}`` where ``x2=None`` means ``x2 = x1``.

``auto`` takes, among the engines whose estimated peak memory fits the budget, the one
with the fewest estimated FLOPs; FLOPs are counted from one profiled forward pass
(``torch.utils.flop_counter``) and the engines' formulas in their docstrings.
"""

from __future__ import annotations

from types import ModuleType

from ntk_torch._engines import jacobian, ntk_vp, structured
from ntk_torch._engines._cost import Cost, Problem, profile_forward

ENGINES: dict[str, ModuleType] = {"jacobian": jacobian, "ntk_vp": ntk_vp, "structured": structured}


def register(name: str, module: ModuleType) -> None:
    ENGINES[name] = module


def estimate(name: str, problem: Problem) -> Cost:
    return ENGINES[name].estimate(problem)


def choose(problem: Problem, memory_budget: float | None) -> str | None:
    """Cheapest engine by estimated FLOPs among those that fit; None if none fits."""
    costs = {name: estimate(name, problem) for name in ENGINES}
    fitting = [n for n, c in costs.items() if memory_budget is None or c.bytes <= memory_budget]
    if not fitting:
        return None
    return min(fitting, key=lambda n: costs[n].flops)


__all__ = ["ENGINES", "Cost", "Problem", "choose", "estimate", "profile_forward", "register"]
