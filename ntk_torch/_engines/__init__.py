"""The kernel engines and the cost model that ``implementation="auto"`` uses.

Each engine module provides ``estimate(problem) -> Cost`` (FLOPs, peak bytes of one
block) and ``compute(fm, params, x1, x2, mode, groups, *, problem, memory_budget)``
returning ``{group: block}`` where ``x2=None`` means ``x2 = x1``.

Cost model of ``auto``: among the engines whose estimated peak memory fits the budget,
the one with the smallest predicted time

    seconds = FLOPs / (THROUGHPUT · EFFICIENCY) + OVERHEAD_S

where FLOPs come from one profiled forward pass (torch's FLOP formulas) and the
engine's formula (its docstring), ``THROUGHPUT`` is a nominal matmul rate, and each
engine module states its ``EFFICIENCY`` (fraction of that rate its work runs at) and
``OVERHEAD_S`` (fixed seconds per call), measured on the benchmark set
(``benchmarks/bench_empirical.py``: achieved GFLOP/s of each engine relative to the
structured engine's). An engine may instead price its parts itself with
``predicted_seconds(problem, throughput)``. Ties go to the earlier engine in ``ENGINES``.
"""

from __future__ import annotations

from types import ModuleType

from ntk_torch._engines import jacobian, ntk_vp, structured
from ntk_torch._engines._cost import Cost, Problem, profile_forward

ENGINES: dict[str, ModuleType] = {"jacobian": jacobian, "ntk_vp": ntk_vp, "structured": structured}


def estimate(name: str, problem: Problem) -> Cost:
    return ENGINES[name].estimate(problem)


# Nominal float32 matmul rate (FLOP/s); only ratios between engines and against the
# fixed overheads matter, so it need not match the machine.
THROUGHPUT = 2e10


def predicted_seconds(name: str, problem: Problem) -> float:
    """Predicted time of one block with engine ``name`` (see the module docstring)."""
    module = ENGINES[name]
    if hasattr(module, "predicted_seconds"):  # an engine that prices its parts apart
        return module.predicted_seconds(problem, THROUGHPUT)
    efficiency = getattr(module, "EFFICIENCY", 1.0)
    overhead = getattr(module, "OVERHEAD_S", 1e-3)
    return estimate(name, problem).flops / (THROUGHPUT * efficiency) + overhead


def choose(problem: Problem, memory_budget: float | None) -> str | None:
    """Fastest predicted engine among those whose memory fits; None if none fits."""
    fitting = [n for n in ENGINES
               if memory_budget is None or estimate(n, problem).bytes <= memory_budget]
    if not fitting:
        return None
    return min(fitting, key=lambda n: predicted_seconds(n, problem))


__all__ = ["ENGINES", "THROUGHPUT", "Cost", "Problem", "choose", "estimate", "predicted_seconds",
           "profile_forward"]
