"""What to do when an empirical NTK does not fit the memory budget: the advice of its error.

Every suggestion is checked against the same cost model that ``implementation="auto"``
uses (``ntk_torch._engines``): a batch size per engine that fits, a cheaper mode, or, when
the result itself cannot fit, a kernel store on disk with a tile size that fits.
"""

from __future__ import annotations

import math
from dataclasses import replace

from ntk_torch import _engines
from ntk_torch._checks import MODES
from ntk_torch._engines import Problem
from ntk_torch._store_compute import largest_tile
from ntk_torch._store_files import size_text
from ntk_torch._tiling import largest_size


def result_bytes(problem: Problem, n1: int, n2: int) -> float:
    """Bytes of the whole ``N1 x N2`` result in ``problem``'s mode and dtype."""
    return replace(problem, n1=n1, n2=n2).output_bytes()


# Suggestions predicted to take more than this many times the fastest one are left out.
_SLOWER_THAN_BEST = 10.0


def memory_message(implementation: str, problem: Problem, budget: float, n1: int, n2: int) -> str:
    """A block of ``problem``'s size does not fit ``budget``: what would, engine by engine."""
    engines = _engines.candidates(problem) if implementation == "auto" else [implementation]
    need = min(_engines.estimate(e, problem).bytes for e in engines)
    lines = [
        f"the empirical NTK (implementation={implementation!r}, mode={problem.mode!r}, "
        f"blocks of {problem.n1}x{problem.n2} samples, O={problem.n_out}, P={problem.n_params}) "
        f"needs about {size_text(need)} but the memory budget is {size_text(budget)} "
        f"(pass memory_budget=<bytes> to change it). What would fit:"
    ]
    spare = budget - result_bytes(problem, n1, n2)
    lines += _batch_suggestions(problem, spare, n1, n2, implementation)
    lines += _mode_suggestions(problem, budget, n1, n2)
    if len(lines) == 1:
        lines.append("  nothing: even one sample per block exceeds the budget; select fewer "
                     "parameters with `params=` or raise `memory_budget`")
    return "\n".join(lines)


def result_message(implementation: str, problem: Problem, budget: float, n1: int, n2: int) -> str:
    """The result itself exceeds the budget: on disk with compute_kernel, or a cheaper mode."""
    shape = {"full": (n1, n2, problem.n_out, problem.n_out), "diagonal": (n1, n2, problem.n_out),
             "trace": (n1, n2)}[problem.mode]
    what = "per-layer results" if problem.n_groups > 1 else "result"
    lines = [f"the empirical NTK's {what}, {shape} x {problem.itemsize} bytes, needs about "
             f"{size_text(result_bytes(problem, n1, n2))} but the memory budget is "
             f"{size_text(budget)} (pass memory_budget=<bytes> to change it). What would fit:"]
    tile = min(largest_tile(replace(problem, n_groups=1), budget, implementation, max(n1, n2)),
               1024)
    if tile:
        lines.append("  on disk, tile by tile: nt.compute_kernel(model, x1, x2, store=<directory>, "
                     f"mode={problem.mode!r}, tile={tile}), then store.matvec / nt.solve / "
                     "nt.eigenmodes on it")
    lines += _mode_suggestions(problem, budget, n1, n2)
    return "\n".join(lines)


def _batch_suggestions(problem: Problem, budget: float, n1: int, n2: int,
                       implementation: str) -> list[str]:
    """``batch_size`` per engine that fits ``budget``, fastest predicted first.

    Those far slower than the fastest (tiny blocks of a memory-hungry engine) are left
    out, except the engine asked for.
    """
    options = []
    engines = _engines.candidates(problem)
    if implementation != "auto" and implementation not in engines:
        engines = (*engines, implementation)
    for engine in engines:
        size = _largest_fitting_batch(engine, problem, budget, max(n1, n2))
        if size:
            blocks = math.ceil(n1 / size) * math.ceil(n2 / size)
            block = replace(problem, n1=min(size, n1), n2=min(size, n2), symmetric=False)
            seconds = blocks * _engines.predicted_seconds(engine, block)
            options.append((seconds, engine, size, blocks))
    if not options:
        return []
    best = min(seconds for seconds, *_ in options)
    return [f"  implementation={engine!r} with batch_size={size} ({blocks:,} blocks)"
            for seconds, engine, size, blocks in sorted(options)
            if seconds <= _SLOWER_THAN_BEST * best or engine == implementation]


def _mode_suggestions(problem: Problem, budget: float, n1: int, n2: int) -> list[str]:
    lines = []
    for mode in MODES:
        if mode != problem.mode:
            cheaper = replace(problem, mode=mode)
            spare = budget - result_bytes(cheaper, n1, n2)
            fitting = (_largest_fitting_batch(e, cheaper, spare, max(n1, n2))
                       for e in _engines.candidates(problem))
            if any(fitting):
                lines.append(f"  mode={mode!r}")
    return lines


def _largest_fitting_batch(engine: str, problem: Problem, budget: float, n: int) -> int:
    def fits(size: int) -> bool:
        sub = replace(problem, n1=size, n2=size, symmetric=False)
        return _engines.estimate(engine, sub).bytes <= budget

    return largest_size(fits, n) if budget > 0 else 0
