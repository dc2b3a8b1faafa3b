"""How each structured unit's kernel block is computed.

One plan per kernel, made before any capture from the structure, the block sizes, ``O``
and the mode.

Per unit (``_structure.Unit``) the cheapest of (Novak et al. 2022, "Fast Finite Width
Neural Tangent Kernel", structured derivatives):

- ``"gram"``: the Gram matrix of inputs, then cotangent products; never forms a
  parameter-sized tensor. Cheapest for few positions (dense layers, ``T = 1``).
- ``"explicit"``: per-sample gradients ``(O, N, G·k_out·k_in)`` of this unit only, then
  their inner products. Cheapest when ``T²`` exceeds the layer's parameter count
  (convolutions on large images). A unit alone at its site whose gradients fit the
  working memory has them *streamed*: made output by output while the batched capture
  produces its cotangents, which are then never kept.
- ``"factored"``, for a unit with a separable head (``_heads``): one per-channel moment
  per sample instead of ``O`` gradients. The head is checked again on each captured
  batch; where it does not hold, the unit takes its cheapest other strategy.

Only units alone at their one site may stream or factor: no other unit needs their
cotangents. A weight and a bias asked for in different groups are contracted apart, each
with its own cheapest strategy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

from ntk_torch._engines._structure import Structure, Unit


@dataclass(frozen=True)
class Route:
    """The plan of one unit.

    Attributes:
        unit: the unit.
        parts: what the contraction returns apart: ``(group, unit or its weight or bias
            alone, "gram" or "explicit")``, the strategy being the part's cheapest one
            outside the factored rule.
        strategy: the cheapest strategy of the whole unit, ``"factored"`` included where it
            has a candidate head.
        flops, work: FLOPs and working elements of :attr:`strategy` for one block.
        alone: the only unit at its one site.
        stream: its per-sample gradients are made during the batched capture.
    """

    unit: Unit
    parts: tuple[tuple[str, Unit, str], ...]
    strategy: str
    flops: float
    work: float
    alone: bool
    stream: bool

    @property
    def site(self) -> int:
        return self.unit.sites[0]

    @property
    def factor(self) -> bool:
        return self.strategy == "factored"


@dataclass(frozen=True)
class Plan:
    """Routes of the units holding wanted parameters, for blocks of ``n1 x n2`` samples.

    Attributes:
        routes: one per unit with a parameter in some group, in structure order.
        batched: whether the capture should run batched (some unit streams, factors or
            takes explicit gradients at its own site); for Gram-only models (dense nets) the
            per-sample vectorised capture measured ~10% faster.
    """

    routes: tuple[Route, ...]
    batched: bool

    @property
    def factor(self) -> set[int]:
        """Sites whose unit takes the factored rule where its head is separable."""
        return {r.site for r in self.routes if r.factor}

    @property
    def stream(self) -> dict[int, Unit]:
        """``{site: unit}`` of the streamed units."""
        return {r.site: r.unit for r in self.routes if r.stream}


def make_plan(structure: Structure, n1: int, n2: int, symmetric: bool, n_out: int, mode: str,
              group_of: dict[str, str] | None, work_elements: float) -> Plan:
    """The plan for blocks of ``n1 x n2`` samples.

    ``group_of`` maps each wanted parameter to its group (None: every parameter, one group).
    """
    sharing = Counter(k for u in structure.units for k in u.sites)
    heads = {site for site, _ in structure.heads}
    routes = []
    for unit in structure.units:
        wanted = [n for n in unit.names if group_of is None or n in group_of]
        if not wanted:
            continue
        factorable = unit.sites[0] in heads  # candidates are alone at their site
        costs = strategy_costs(unit, n1, n2, symmetric, n_out, mode)
        if factorable:
            costs["factored"] = factored_costs(unit, n1, n2, symmetric, n_out, mode)
        strategy = choose_strategy(unit, n1, n2, symmetric, n_out, mode, factorable)
        flops, work = costs[strategy]
        alone = len(unit.sites) == 1 and sharing[unit.sites[0]] == 1
        stream = alone and strategy == "explicit" and not unit.vocab and work <= work_elements
        parts = tuple((group, part, choose_strategy(part, n1, n2, symmetric, n_out, mode))
                      for group, part in _split_by_group(unit, wanted, group_of))
        routes.append(Route(unit, parts, strategy, flops, work, alone, stream))
    batched = any(r.alone and r.strategy != "gram" for r in routes)
    return Plan(tuple(routes), batched)


def _split_by_group(unit: Unit, wanted: list[str], group_of: dict[str, str] | None):
    """``(group, unit)``, or its weight and bias apart when they belong to different groups."""
    if group_of is None:
        return [("", unit)]
    if len({group_of[n] for n in wanted}) == 1 and len(wanted) == len(unit.names):
        return [(group_of[wanted[0]], unit)]
    return [(group_of[n], replace(unit, weight=n, bias=None) if n == unit.weight
             else replace(unit, weight=None, bias=n, k_in=0)) for n in wanted]


def choose_strategy(unit: Unit, n1: int, n2: int, symmetric: bool, n_out: int, mode: str,
                    factored: bool = False) -> str:
    """The cheapest strategy; ``"factored"`` competes where the unit has a separable head."""
    costs = strategy_costs(unit, n1, n2, symmetric, n_out, mode)
    if factored:
        costs["factored"] = factored_costs(unit, n1, n2, symmetric, n_out, mode)
    return min(costs, key=lambda s: costs[s][0])


def strategy_costs(unit: Unit, n1: int, n2: int, symmetric: bool, n_out: int,
                   mode: str) -> dict[str, tuple[float, float]]:
    """``{strategy: (flops, working elements)}`` for one unit and one kernel block."""
    t, g, ki, ko, o = unit.positions, unit.groups, unit.k_in, unit.k_out, n_out
    pairs = float(n1) * n2
    sides = n1 if symmetric else n1 + n2
    gram_inputs = pairs * g * t * t * (1 if unit.vocab else 2 * ki + 1)
    if mode == "full":
        if t == 1 and g == 1:
            gram = gram_inputs + pairs * o * o * (2 * ko + 1)
            work = pairs * (1 + o * o)
        else:
            gram = gram_inputs + 2 * pairs * g * t * o * ko * (t + o)
            work = pairs * g * t * (t + o * ko)
    elif mode == "diagonal":
        gram = gram_inputs + 2 * pairs * g * t * o * ko * (t + 1)
        work = pairs * g * t * (t + o * ko) if t > 1 or g > 1 else pairs * (1 + o)
    else:
        gram = gram_inputs + pairs * g * t * t * (2 * o * ko + 1)
        work = 2 * pairs * g * t * t
    p = unit.n_params
    make = 2.0 * sides * o * t * g * ko * (ki + (unit.bias is not None))
    contract = 2.0 * pairs * (o * o if mode == "full" else o) * p
    explicit_work = sides * (o * p + t * unit.vocab)
    return {"gram": (gram, work), "explicit": (make + contract, explicit_work)}


def factored_costs(unit: Unit, n1: int, n2: int, symmetric: bool, n_out: int,
                   mode: str) -> tuple[float, float]:
    """``(flops, working elements)`` of the factored rule for one block."""
    c, k = unit.groups * unit.k_out, unit.k_in + (unit.bias is not None)
    pairs = float(n1) * n2
    sides = n1 if symmetric else n1 + n2
    per_pair = n_out * (n_out + 1) if mode == "full" else 2 * n_out
    flops = 2.0 * sides * unit.positions * c * k + 2.0 * pairs * c * (k + per_pair)
    return flops, pairs * c * (n_out + 1)


