"""``implementation="structured"``: Gram matrices of layer inputs and output cotangents.

For the layers that hold almost all parameters (``nn.Linear``, ``nn.Conv1d/2d``,
``nn.Embedding``, affine parameters of norm layers, their biases), the per-sample
gradient of output ``i`` is ``Σ_t δ_{i,t} ⊗ a_t`` (cotangent at the layer's output times
the layer's input, over positions ``t``), so their kernel block is

    Θ_W[a, b, i, j] = Σ_{t,s} (a_t(x_a) · a_s(x_b)) (δ_{i,t}(x_a) · δ_{j,s}(x_b))

(Novak et al. 2022, structured derivatives). One forward pass keeps every layer's input
and adds a zero tensor to each layer's output; differentiating with respect to those zeros,
output by output, gives all cotangents without any weight gradient (``_capture``). Per
layer, the Gram route, explicit per-sample gradients of that layer alone (streamed as the
cotangents come), or — behind a separable head — the factored rule is taken, whichever
costs fewest FLOPs (``_structured_rules``). Parameters that are not used only through such
layers (see ``_structure``) get exact per-sample Jacobians from a per-sample backward pass,
contracted as in ``"jacobian"``.

Cost: one forward and ``O`` input-gradient backward passes per sample, plus per layer
``2·N1·N2·(T²·k_in + O²·k_out)`` FLOPs (dense layers, ``T = 1``); memory: the layer inputs
and ``O`` cotangents per sample, never an ``(N, O, P)`` Jacobian. Uses ``fm.module`` only
through temporary hooks during a ``functional_call``; the module is not modified.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from ntk_torch._engines import jacobian
from ntk_torch._engines._capture import Captured, Plan, capture_batched, capture_per_sample
from ntk_torch._engines._cost import Cost, Problem
from ntk_torch._engines._structure import Structure, Unit, discover
from ntk_torch._engines._structured_rules import (
    bias_gradients,
    choose_strategy,
    cotangents,
    explicit_kernel,
    factored_costs,
    factored_features,
    factored_kernel,
    features,
    gram_kernel,
    gram_of_inputs,
    one_hot,
    strategy_costs,
    weight_gradients,
)

# Large batched matmuls and channels-last convolutions run fastest of the three engines
# (the reference, 1.0); a probe pass, hooks and a few small products per layer add a
# fixed cost.
EFFICIENCY = 1.0
OVERHEAD_S = 2e-3

# Working memory of one contraction step (at most a quarter of the budget, at least
# MIN_WORK_BYTES); larger layers are done in blocks of samples.
WORK_BYTES = 256 * 2**20
MIN_WORK_BYTES = 2**20


def estimate(problem: Problem) -> Cost:
    """FLOPs and peak bytes of one block (see the module docstring)."""
    structured_flops, fallback_flops, nbytes = _cost_parts(problem)
    return Cost(structured_flops + fallback_flops, nbytes)


def predicted_seconds(problem: Problem, throughput: float) -> float:
    """Like the other engines' ``FLOPs / (throughput · EFFICIENCY) + OVERHEAD_S``, with the
    fallback parameters' share priced at the jacobian engine's rate: that is what they
    run as, so a model with nothing structured is never predicted faster than there."""
    structured_flops, fallback_flops, _ = _cost_parts(problem)
    return (structured_flops / EFFICIENCY + fallback_flops / jacobian.EFFICIENCY) / throughput + OVERHEAD_S


def _cost_parts(problem: Problem) -> tuple[float, float, float]:
    """FLOPs of the structured part, FLOPs of the fallback part, peak bytes."""
    p = problem
    s: Structure | None = getattr(p, "structure", None)
    if s is None:  # no probe: every parameter would go through the fallback
        cost = jacobian.estimate(p)
        return 0.0, cost.flops, cost.bytes
    samples = p.n1 if p.symmetric else p.n1 + p.n2
    o = p.n_out
    # Forward, then O backward passes computing input gradients only (about a forward
    # each), plus the fallback parameters' weight gradients (another forward each, in
    # proportion to their share of the parameters).
    fb_share = s.fallback_params / max(p.n_params, 1)
    flops = samples * p.forward_flops * (1 + o)
    fallback = samples * p.forward_flops * o * fb_share
    kept = samples * (s.feature_elements + o * s.cotangent_elements + o * s.fallback_params)
    work = samples * (1 + o) * p.activations
    contraction_work = 0.0
    heads = {site for site, _ in s.heads}
    for unit in s.units:
        factored = unit.sites[0] in heads
        strategy = choose_strategy(unit, p.n1, p.n2, p.symmetric, o, p.mode, factored)
        if strategy == "factored":
            f, w = factored_costs(unit, p.n1, p.n2, p.symmetric, o, p.mode)
        else:
            f, w = strategy_costs(unit, p.n1, p.n2, p.symmetric, o, p.mode)[strategy]
        flops += f
        contraction_work = max(contraction_work, min(w * p.itemsize, WORK_BYTES))
    per_pair = o * o if p.mode == "full" else o
    fallback += 2.0 * p.n1 * p.n2 * per_pair * s.fallback_params
    nbytes = (kept + work) * p.itemsize + contraction_work + p.output_bytes()
    return flops, fallback, nbytes


@dataclass(frozen=True)
class _Context:
    """What every block prepared for one kernel shares: the model's structure and settings."""

    structure: Structure
    modules: dict
    group_of: dict[str, str]
    work_elements: float
    dtype: torch.dtype


@dataclass
class Prepared:
    """One block of samples as the contraction needs it (see :func:`prepare`).

    Attributes:
        ctx: the shared context.
        x: the samples ``(N, ...)`` (to recompute a pair whose plans came out differently).
        cap: captured layer inputs, cotangents, fallback Jacobians and separable heads.
        streams: per-sample gradients of the streamed units, by site.
    """

    ctx: _Context
    x: torch.Tensor
    cap: Captured
    streams: dict[int, _Gradients]

    @property
    def n(self) -> int:
        return self.x.shape[0]

    def representation(self) -> tuple:
        """Which layers were factored or streamed: blocks contract directly when equal."""
        return (frozenset(self.cap.heads), frozenset(self.streams), frozenset(self.cap.fallback))

    def rows(self, start: int, stop: int | None) -> Prepared:
        """The same for samples ``start:stop`` (views, no copy)."""
        cap = self.cap
        sliced = Captured(
            cap.n_out,
            {k: t[start:stop] for k, t in cap.feats.items()},
            {k: t[start:stop] for k, t in cap.cots.items()},
            {k: t[start:stop] for k, t in cap.fallback.items()},
            {k: (u[start:stop], v[start:stop]) for k, (u, v) in cap.heads.items()},
        )
        streams = {k: s.rows(start, stop) for k, s in self.streams.items()}
        return Prepared(self.ctx, self.x[start:stop], sliced, streams)


def prepare(fm, params, x, mode, groups, *, problem=None, memory_budget=None) -> Prepared:
    """Everything the kernel needs from the samples ``x (N, ...)``: layer inputs, cotangents
    (or streamed per-sample gradients and separable-head factors) and fallback Jacobians.

    Each layer's representation is planned for blocks of ``problem.n1`` by ``problem.n2``
    samples, so the features of any two blocks planned with the same ``problem`` contract
    directly (:func:`contract`).
    """
    structure = getattr(problem, "structure", None)
    if structure is None:
        structure = discover(fm, params, x[:1])
    n1, n2 = (problem.n1, problem.n2) if problem is not None else (x.shape[0], x.shape[0])
    symmetric = problem.symmetric if problem is not None else True
    dtype = next(iter(params.values())).dtype
    work = WORK_BYTES if memory_budget is None else max(min(WORK_BYTES, memory_budget / 4), MIN_WORK_BYTES)
    ctx = _Context(structure=structure, modules=dict(fm.module.named_modules()),
                   group_of={name: g for g, names in groups.items() for name in names},
                   work_elements=work / torch.finfo(dtype).bits * 8, dtype=dtype)
    # Units alone at their one site may stream or factor (no other unit needs its cotangents).
    sharing = Counter(k for u in structure.units for k in u.sites)
    single = {u.sites[0]: u for u in structure.units
              if len(u.sites) == 1 and sharing[u.sites[0]] == 1 and any(n in ctx.group_of for n in u.names)}
    heads = {site for site, _ in structure.heads}
    streams: dict[int, _Streamed] = {}

    def strategies(n_out: int) -> dict[int, str]:
        return {site: choose_strategy(unit, n1, n2, symmetric, n_out, mode, site in heads)
                for site, unit in single.items()}

    def plan(n_out: int, feats: dict[int, torch.Tensor]) -> Plan:
        factor = set()
        for site, strategy in strategies(n_out).items():
            unit = single[site]
            if strategy == "factored":
                factor.add(site)
            elif (strategy == "explicit" and not unit.vocab
                  and strategy_costs(unit, n1, n2, symmetric, n_out, mode)["explicit"][1] <= ctx.work_elements):
                s = structure.sites[site]
                streams[site] = _Streamed(unit, s, ctx.modules[s.module], feats[site], n_out)
        return Plan(factor, streams)

    # The batched passes pay off where a layer streams or factors; for Gram-only models (dense
    # nets) the per-sample vectorised pass measured ~10% faster.
    batched = problem is None or any(s != "gram" for s in strategies(problem.n_out).values())
    cap = capture_batched(fm, params, x, structure, plan) if batched else None
    if cap is None:
        streams.clear()
        cap = capture_per_sample(fm, params, x, structure)
    for site in streams:  # their gradients are all the contraction needs
        cap.feats.pop(site, None)
    return Prepared(ctx, x, cap, {site: _Gradients(s.w, s.b) for site, s in streams.items()})


def contract(fa: Prepared, fb: Prepared | None, fm, params, mode, groups, *, problem=None,
             memory_budget=None) -> dict[str, torch.Tensor]:
    """``{group: kernel block}`` between the samples of ``fa`` and ``fb`` (``None``: ``fa``
    with itself). Blocks whose plans came out differently (a head separable on one batch
    only) are recomputed together."""
    if fb is not None and fb.representation() != fa.representation():
        return compute(fm, params, fa.x, fb.x, mode, groups, problem=problem, memory_budget=memory_budget)
    ctx, structure = fa.ctx, fa.ctx.structure
    group_of, work_elements = ctx.group_of, ctx.work_elements
    symmetric = fb is None
    fb = fa if fb is None else fb
    n1, n2 = fa.n, fb.n
    out: dict[str, torch.Tensor] = {}

    def add(group: str, k: torch.Tensor) -> None:
        out[group] = k if group not in out else out[group] + k

    for unit in structure.units:
        wanted = [n for n in unit.names if n in group_of]
        if not wanted:
            continue
        site_index = unit.sites[0]
        if site_index in fa.cap.heads:
            site = structure.sites[site_index]
            module = ctx.modules[site.module]
            for part in _split_by_group(unit, wanted, group_of):
                def moments(f: Prepared) -> torch.Tensor:
                    return factored_features(site, module,
                                             f.cap.feats[site_index] if part.weight is not None else None,
                                             f.cap.heads[site_index][0],
                                             part.bias_scale if part.bias is not None else None)

                f1 = moments(fa)
                f2 = f1 if symmetric else moments(fb)
                add(group_of[part.names[0]], _factored(f1, fa.cap.heads[site_index][1], f2,
                                                       fb.cap.heads[site_index][1], mode, work_elements))
            continue
        if site_index in fa.streams:
            sa, sb = fa.streams[site_index], fb.streams[site_index]
            for part in _split_by_group(unit, wanted, group_of):
                add(group_of[part.names[0]], sa.kernel(part, sb, mode))
            continue
        a1, d1 = _unit_tensors(unit, structure, ctx.modules, fa.cap.feats, fa.cap.cots)
        a2, d2 = (a1, d1) if symmetric else _unit_tensors(unit, structure, ctx.modules, fb.cap.feats, fb.cap.cots)
        for part in _split_by_group(unit, wanted, group_of):
            add(group_of[part.names[0]], _unit_kernel(part, a1, d1, a2, d2, mode, symmetric, work_elements))

    for name in structure.fallback:
        if name not in group_of:
            continue
        j1 = _flat(fa.cap.fallback[name])
        add(group_of[name], jacobian.contract_pair(j1, j1 if symmetric else _flat(fb.cap.fallback[name]), mode))

    n_out = fa.cap.n_out
    for group in groups:
        if group not in out:  # parameters that do not affect the outputs here
            shape = {"full": (n1, n2, n_out, n_out), "diagonal": (n1, n2, n_out), "trace": (n1, n2)}[mode]
            out[group] = torch.zeros(shape, dtype=ctx.dtype, device=fa.x.device)
    return {g: k.contiguous() for g, k in out.items()}


def compute(fm, params, x1, x2, mode, groups, *, problem=None, memory_budget=None):
    """``{group: kernel block}``; ``x2=None`` reuses ``x1``'s features and cotangents.

    The features of ``x1`` and ``x2`` come from one capture of both batches together."""
    xs = x1 if x2 is None else torch.cat([x1, x2])
    f = prepare(fm, params, xs, mode, groups, problem=problem, memory_budget=memory_budget)
    kw = {"problem": problem, "memory_budget": memory_budget}
    if x2 is None:
        return contract(f, None, fm, params, mode, groups, **kw)
    n1 = x1.shape[0]
    return contract(f.rows(0, n1), f.rows(n1, None), fm, params, mode, groups, **kw)


def _flat(jac: torch.Tensor) -> torch.Tensor:
    return jac.reshape(jac.shape[0], jac.shape[1], -1)


# ---------------------------------------------------------------------------------------
# Assembling and contracting one unit.


def _unit_tensors(unit: Unit, structure: Structure, modules, feats, cots):
    """Weight features ``A`` (embedding indices and masks; None without a weight) and
    cotangents ``D``, concatenated over the unit's sites."""
    a_parts, d_parts = [], []
    for k in unit.sites:
        site = structure.sites[k]
        module = modules[site.module]
        d_parts.append(cotangents(site, module, cots[k]))
        if unit.weight is None:
            continue
        a = features(site, module, feats[k])
        if unit.vocab:
            pad = module.padding_idx
            a = (a, a != pad if pad is not None else torch.ones_like(a, dtype=torch.bool))
        a_parts.append(a)
    d = torch.cat(d_parts, dim=2) if len(d_parts) > 1 else d_parts[0]
    if not a_parts:
        return None, d
    if unit.vocab:
        return (_cat([p[0] for p in a_parts]), _cat([p[1] for p in a_parts])), d
    return _cat(a_parts), d


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _split_by_group(unit: Unit, wanted: list[str], group_of: dict[str, str]):
    """The unit itself, or its weight and bias apart when they belong to different groups."""
    if len({group_of[n] for n in wanted}) == 1 and len(wanted) == len(unit.names):
        return [unit]
    return [replace(unit, weight=n, bias=None) if n == unit.weight
            else replace(unit, weight=None, bias=n, k_in=0) for n in wanted]


def _rows(a, start: int, stop: int | None):
    if a is None:
        return None
    if isinstance(a, tuple):
        return tuple(t[start:stop] for t in a)
    return a[start:stop]


def _unit_kernel(unit: Unit, a1, d1, a2, d2, mode: str, symmetric: bool,
                 work_elements: float) -> torch.Tensor:
    n_out, n1, n2 = d1.shape[1], d1.shape[0], d2.shape[0]
    strategy = choose_strategy(unit, n1, n2, symmetric, n_out, mode)
    _, work = strategy_costs(unit, n1, n2, symmetric, n_out, mode)[strategy]
    if strategy == "explicit":
        return _explicit(unit, a1, d1, a2, d2, mode, symmetric, work, work_elements)
    # Gram: the working set scales with the rows of x1 taken at once.
    step = max(1, int(n1 * work_elements // max(work, 1.0)))
    blocks = []
    for r in range(0, n1, step):
        rows = d1[r : r + step]
        ga = gram_of_inputs(unit, _rows(a1, r, r + step), a2, rows.shape[0], n2, d1)
        blocks.append(gram_kernel(ga, rows, d2, mode))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


class _Streamed:
    """Per-sample gradients ``(O, N, ·)`` of one explicit unit, filled output by output
    from the cotangents as the batched capture produces them (never kept whole).

    The weight's entries are in (k_in, k_out) order here, a layout of their own: only
    inner products between these gradients are taken.
    """

    def __init__(self, unit: Unit, site, module, feat: torch.Tensor, n_out: int) -> None:
        self.unit, self.site, self.module = unit, site, module
        n = feat.shape[0]
        a = features(site, module, feat) if unit.weight is not None else None
        # One group: (N, k_in, T) @ (N, T, k_out) per output, BLAS's favourite layout.
        self.a = a if a is None or unit.groups > 1 else a[:, :, 0, :].transpose(1, 2).contiguous()
        width = unit.groups * unit.k_out
        self.w = feat.new_empty(n_out, n, width * unit.k_in) if a is not None else None
        self.b = feat.new_empty(n_out, n, width) if unit.bias is not None else None

    def __call__(self, i: int, g: torch.Tensor) -> None:
        d = cotangents(self.site, self.module, g)  # (N, 1, T, G, k_out)
        if self.w is not None and self.unit.groups == 1:
            torch.bmm(self.a, d[:, 0, :, 0, :], out=self.w[i].view(d.shape[0], self.unit.k_in, -1))
        elif self.w is not None:
            self.w[i] = weight_gradients(self.a, d)[0]
        if self.b is not None:
            self.b[i] = bias_gradients(d, self.unit.bias_scale)[0]



class _Gradients(NamedTuple):
    """Per-sample gradients ``(O, N, ·)`` of one streamed unit's weight and bias (or None)."""

    w: torch.Tensor | None
    b: torch.Tensor | None

    def rows(self, start: int, stop: int | None) -> _Gradients:
        return _Gradients(*(None if j is None else j[:, start:stop] for j in self))

    def kernel(self, part: Unit, other: _Gradients, mode: str) -> torch.Tensor:
        """Block of ``part`` (the unit, or its weight or bias alone) against ``other``'s samples."""
        k = 0
        for name, ja, jb in ((part.weight, self.w, other.w), (part.bias, self.b, other.b)):
            if name is not None:
                k = k + explicit_kernel(ja, jb, mode)
        return k


def _factored(f1: torch.Tensor, v1: torch.Tensor, f2: torch.Tensor, v2: torch.Tensor, mode: str,
              work_elements: float) -> torch.Tensor:
    """The factored rule (a separable head) from per-channel features ``f (N, C, K)`` and
    head cotangents ``v (N, O, C)``, in blocks of rows of x1 that fit the budget."""
    n1, n2, n_out, c = f1.shape[0], f2.shape[0], v1.shape[1], v1.shape[2]
    step = max(1, int(work_elements // (n2 * c * (n_out + 1))))
    blocks = [factored_kernel(f1[r : r + step], v1[r : r + step], f2, v2, mode) for r in range(0, n1, step)]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def _explicit(unit, a1, d1, a2, d2, mode, symmetric, work, work_elements):
    """Per-sample gradients of this unit only, in blocks of samples that fit the budget."""
    n1, n2 = d1.shape[0], d2.shape[0]

    def kernel(ra: slice, rb: slice | None) -> torch.Tensor:
        k = None
        if unit.weight is not None:
            ja = _weight_grads(unit, a1, d1, ra)
            jb = ja if rb is None else _weight_grads(unit, a2, d2, rb)
            k = explicit_kernel(ja, jb, mode)
        if unit.bias is not None:
            ba = bias_gradients(d1[ra], unit.bias_scale)
            kb = explicit_kernel(ba, ba if rb is None else bias_gradients(d2[rb], unit.bias_scale), mode)
            k = kb if k is None else k + kb
        return k

    if work <= work_elements:
        return kernel(slice(None), None if symmetric else slice(None))
    per_sample = work / (n1 + (0 if symmetric else n2))
    step = max(1, int(work_elements // (2 * per_sample)))
    return torch.cat([
        torch.cat([kernel(slice(r, r + step), slice(c, c + step)) for c in range(0, n2, step)], dim=1)
        for r in range(0, n1, step)
    ])


def _weight_grads(unit: Unit, a, d, rows: slice) -> torch.Tensor:
    if unit.vocab:
        idx, mask = a
        dense = one_hot(idx[rows], mask[rows], unit.vocab, d.dtype)
    else:
        dense = a[rows]
    return weight_gradients(dense, d[rows])


__all__ = ["Prepared", "compute", "contract", "estimate", "predicted_seconds", "prepare"]
