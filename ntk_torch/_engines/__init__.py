"""The kernel engines and the cost model that ``implementation="auto"`` uses.

Every engine module satisfies :class:`Engine`: ``estimate(problem) -> Cost`` (FLOPs, peak
bytes of one block) and ``compute(fm, params, x1, x2, mode, groups, *, problem,
memory_budget)`` returning ``{group: block}`` where ``x2=None`` means ``x2 = x1``. The same
work in two steps, so that a block of samples met in several blocks of a kernel is worked
on once: ``prepare(fm, params, x, mode, groups, *, problem, memory_budget)`` keeps what the
kernel needs from samples ``x`` alone (per-sample Jacobians, layer inputs and cotangents),
and ``contract(pa, pb, fm, params, mode, groups, *, problem, memory_budget)`` gives the
block between two prepared sets (``pb=None``: ``pa`` with itself). Blocks prepared with the
same ``problem`` contract with each other. The :class:`Problem` holds sizes only, shared
by all engines; an engine that analyses the model further does so through
``problem.probe`` (once per probe).

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

Every engine but ``autograd`` batches samples with ``torch.func.vmap``. ``auto`` chooses
among those (:data:`VMAP_ENGINES`) that vmap can run the model with (:func:`vmap_failure`,
once per probe), and takes ``autograd`` (the same per-sample Jacobians, one plain forward
and ``O`` backward passes per sample) where none can: data-dependent control flow,
``.item()``, fused RNN modules without a structured rule (``proj_size``, packed
sequences). The structured engine runs ``nn.LSTM``/``nn.GRU``/``nn.RNN`` unrolled, so it
alone is left where those make vmap fail for the others. Where ``jacobian`` runs, it does
``autograd``'s work batched, so ``auto`` has no reason to compare them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from ntk_torch._engines import autograd, jacobian, ntk_vp, structured
from ntk_torch._engines._cost import Cost, Probe, Problem, profile_forward


@runtime_checkable
class Engine(Protocol):
    """What an engine module provides (see the module docstring).

    It may also define ``predicted_seconds(problem, throughput)`` to price its parts itself.
    """

    EFFICIENCY: float
    OVERHEAD_S: float

    def estimate(self, problem: Problem) -> Cost: ...

    def prepare(self, fm, params: dict[str, torch.Tensor], x: torch.Tensor, mode: str,
                groups: dict[str, tuple[str, ...]], *, problem: Problem | None = None,
                memory_budget: float | None = None) -> Any: ...

    def contract(self, pa: Any, pb: Any | None, fm, params: dict[str, torch.Tensor], mode: str,
                 groups: dict[str, tuple[str, ...]], *, problem: Problem | None = None,
                 memory_budget: float | None = None) -> dict[str, torch.Tensor]: ...

    def compute(self, fm, params: dict[str, torch.Tensor], x1: torch.Tensor,
                x2: torch.Tensor | None, mode: str, groups: dict[str, tuple[str, ...]], *,
                problem: Problem | None = None,
                memory_budget: float | None = None) -> dict[str, torch.Tensor]: ...


ENGINES: dict[str, Engine] = {"jacobian": jacobian, "ntk_vp": ntk_vp, "structured": structured,
                              "autograd": autograd}

# The engines that batch samples (and outputs) with torch.func.vmap.
VMAP_ENGINES = ("jacobian", "ntk_vp", "structured")


def vmap_failure(name: str, problem: Problem) -> str | None:
    """Why engine ``name`` cannot batch ``problem``'s model with vmap; None if it can.

    The structured engine runs the fused RNN modules it has a rule for unrolled, so it is
    tried apart where the others cannot run (``structured.vmap_failure``).
    """
    if name not in VMAP_ENGINES:
        return None
    reason = autograd.vmap_failure(problem)
    if reason is not None and name == "structured":
        return structured.vmap_failure(problem)
    return reason


def candidates(problem: Problem) -> tuple[str, ...]:
    """The engines ``auto`` chooses among: of :data:`VMAP_ENGINES`, those vmap runs with.

    ``ntk_vp`` only where the model has forward-mode derivatives; ``("autograd",)`` where
    none runs.
    """
    runs = tuple(n for n in VMAP_ENGINES if vmap_failure(n, problem) is None
                 and (n != "ntk_vp" or not ntk_vp.forward_ad_failure(problem)))
    return runs or ("autograd",)


def fallback_warning(problem: Problem) -> str | None:
    """The one-line warning for ``auto`` taking ``autograd``; None where a vmap engine runs."""
    if candidates(problem) != ("autograd",):
        return None
    # The structured engine's trial runs the model furthest (fused RNNs it has a rule for
    # unrolled): its reason is the one that remains.
    reason = vmap_failure("structured", problem)
    return f"vmap cannot run this model ({reason}); using implementation='autograd'"


def check_runs(name: str, problem: Problem) -> None:
    """Refuse engine ``name`` where it needs vmap (or ``jvp``) and the model does not allow it.

    Raises:
        RuntimeError: naming the reason (and the module, where found) and the engine to use.
    """
    reason = vmap_failure(name, problem)
    if reason is not None:
        raise RuntimeError(
            f"implementation={name!r} batches samples with torch.func.vmap, which cannot run "
            f"this model: {reason}. Use implementation='autograd' (plain autograd, one sample "
            "at a time) or implementation='auto'."
        )
    reason = ntk_vp.forward_ad_failure(problem) if name == "ntk_vp" else None
    if reason is not None:
        raise RuntimeError(
            f"implementation='ntk_vp' needs forward-mode derivatives (jvp), which this model "
            f"does not have: {reason}. Use implementation='jacobian' or implementation='auto'."
        )


def estimate(name: str, problem: Problem) -> Cost:
    return ENGINES[name].estimate(problem)


# Nominal float32 matmul rate (FLOP/s); only ratios between engines and against the
# fixed overheads matter, so it need not match the machine.
THROUGHPUT = 2e10


def predicted_seconds(name: str, problem: Problem) -> float:
    """Predicted time of one block with engine ``name`` (see the module docstring)."""
    engine = ENGINES[name]
    if hasattr(engine, "predicted_seconds"):  # an engine that prices its parts apart
        return engine.predicted_seconds(problem, THROUGHPUT)
    return estimate(name, problem).flops / (THROUGHPUT * engine.EFFICIENCY) + engine.OVERHEAD_S


def choose(problem: Problem, memory_budget: float | None) -> str | None:
    """Fastest predicted of the :func:`candidates` whose memory fits; None if none fits."""
    fitting = [n for n in candidates(problem)
               if memory_budget is None or estimate(n, problem).bytes <= memory_budget]
    if not fitting:
        return None
    return min(fitting, key=lambda n: predicted_seconds(n, problem))


@dataclass(frozen=True)
class Bound:
    """An engine with everything but the samples fixed: a ``_tiling.Blockwise`` kernel."""

    module: Engine
    fm: object
    params: dict[str, torch.Tensor]
    mode: str
    groups: dict[str, tuple[str, ...]]
    problem: Problem | None = None
    memory_budget: float | None = None

    def _settings(self) -> dict:
        return {"problem": self.problem, "memory_budget": self.memory_budget}

    def prepare(self, x: torch.Tensor):
        return self.module.prepare(self.fm, self.params, x, self.mode, self.groups,
                                   **self._settings())

    def contract(self, pa, pb) -> dict[str, torch.Tensor]:
        return self.module.contract(pa, pb, self.fm, self.params, self.mode, self.groups,
                                    **self._settings())

    def compute(self, xa: torch.Tensor, xb: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return self.module.compute(self.fm, self.params, xa, xb, self.mode, self.groups,
                                   **self._settings())


__all__ = ["ENGINES", "THROUGHPUT", "VMAP_ENGINES", "Bound", "Cost", "Engine", "Probe", "Problem",
           "candidates", "check_runs", "choose", "estimate", "fallback_warning",
           "predicted_seconds", "profile_forward", "vmap_failure"]
