"""``implementation="structured"``: Gram matrices of layer inputs and output cotangents.

For the layers that hold almost all parameters (``nn.Linear``, ``nn.Conv1d/2d``,
``nn.Embedding``, GPT-2's ``Conv1D``, ``nn.MultiheadAttention``'s projections, the
recurrent cells' two products per step, the same in every layer and direction of
``nn.LSTM``/``nn.GRU``/``nn.RNN``, affine parameters of norm layers, their biases),
the per-sample gradient of output ``i`` is ``Σ_t δ_{i,t} ⊗ a_t`` (cotangent at the layer's
output times the layer's input, over positions ``t``), so their kernel block is

    Θ_W[a, b, i, j] = Σ_{t,s} (a_t(x_a) · a_s(x_b)) (δ_{i,t}(x_a) · δ_{j,s}(x_b))

(Novak et al. 2022, structured derivatives). One forward pass keeps every layer's input
and adds a zero tensor to each layer's output; differentiating with respect to those zeros,
output by output, gives all cotangents without any weight gradient (``_capture``). Per
layer, the Gram route, explicit per-sample gradients of that layer alone (streamed as the
cotangents come), or — behind a separable head — the factored rule is taken, whichever
costs fewest FLOPs, decided once per kernel before any capture (``_plan``; the
contractions are in ``_contractions``, each layer kind's layouts in its rule, ``_layers``).
Parameters that are not used only through such layers (see ``_structure``) get exact
per-sample Jacobians from a per-sample backward pass, contracted as in ``"jacobian"``.

The probe (``_structure.discover`` and ``_heads.probe_heads``) runs once per
``Problem.probe``, i.e. once per model, parameter selection and sample shape, and only
when this engine is estimated or used.

Cost: one forward and ``O`` input-gradient backward passes per sample, plus per layer
``2·N1·N2·(T²·k_in + O²·k_out)`` FLOPs (dense layers, ``T = 1``); memory: the layer inputs
and ``O`` cotangents per sample, never an ``(N, O, P)`` Jacobian. Uses ``fm.module`` only
through temporary hooks during a ``functional_call``; the module is not modified.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ntk_torch import _inputs
from ntk_torch._engines import autograd, jacobian
from ntk_torch._engines._capture import Captured, capture_batched, capture_per_sample
from ntk_torch._engines._contractions import (
    factored_blocks,
    factored_features,
    unit_kernel,
    unit_tensors,
)
from ntk_torch._engines._cost import Cost, Problem
from ntk_torch._engines._forward import routed_calls
from ntk_torch._engines._heads import probe_heads
from ntk_torch._engines._plan import Plan, make_plan
from ntk_torch._engines._structure import Structure, discover

# Large batched matmuls and channels-last convolutions run fastest of the three engines
# (the reference, 1.0); a probe pass, hooks and a few small products per layer add a
# fixed cost.
EFFICIENCY = 1.0
OVERHEAD_S = 2e-3

# Working memory of one contraction step (at most a quarter of the budget, at least
# MIN_WORK_BYTES); larger layers are done in blocks of samples.
WORK_BYTES = 256 * 2**20
MIN_WORK_BYTES = 2**20


def probe(fm, params: dict[str, torch.Tensor], sample: torch.Tensor) -> Structure:
    """The model's structure on ``sample`` (one input with its batch dimension).

    With the separable heads found on it.
    """
    structure = discover(fm, params, sample)
    return replace(structure, heads=probe_heads(fm, params, sample, structure))


def _structure(problem: Problem | None) -> Structure | None:
    """The structure of ``problem``'s model, probed once per ``problem.probe``."""
    if problem is None or problem.probe is None:
        return None
    return problem.probe.analysis("structured", probe)


def vmap_failure(problem: Problem | None) -> str | None:
    """Why ``torch.func.vmap`` cannot run this engine's passes on the model, or None.

    ``autograd.vmap_failure``'s trial, with the calls of the layers the probe routes
    through their rules intercepted as every pass of this engine intercepts them: fused
    RNN modules then run unrolled, which vmap can batch. Found once per ``problem.probe``.
    """
    structure = _structure(problem)
    if structure is None:
        return None

    def trial(fm, params, sample):
        reason = autograd.fused_rnn(fm.module, structure.routed)
        if reason is not None:
            return reason
        with routed_calls(dict(fm.module.named_modules()), structure.routed):
            return autograd.vmap_run(fm, params, sample)

    return problem.probe.analysis("structured vmap", trial)


def estimate(problem: Problem) -> Cost:
    """FLOPs and peak bytes of one block (see the module docstring)."""
    structured_flops, fallback_flops, nbytes, _ = _cost_parts(problem)
    return Cost(structured_flops + fallback_flops, nbytes)


def predicted_seconds(problem: Problem, throughput: float) -> float:
    """Like the other engines' ``FLOPs / (throughput · EFFICIENCY) + OVERHEAD_S``.

    The fallback parameters' share is priced at the jacobian engine's rate: that is what
    they run as, so a model with nothing structured is never predicted faster than there.
    """
    structured_flops, fallback_flops, _, work_seconds = _cost_parts(problem)
    flops_at_reference_rate = structured_flops / EFFICIENCY + fallback_flops / jacobian.EFFICIENCY
    return flops_at_reference_rate / throughput + work_seconds + OVERHEAD_S


# Seconds per working element of the contractions (written and read a few times, with
# little arithmetic each): what makes the Gram route of token layers in full mode
# (``N1·N2·T·(T + O·k_out)`` elements) slower than its FLOPs say. Explicit per-sample
# gradients are written once by a batched product and read once by the contraction, at
# about 2.5x less per element. Both fitted on the transformer rows of
# benchmarks/bench_empirical.py, where the two engines are within 1.5x of each other.
WORK_SECONDS = 5e-9
EXPLICIT_WORK_SECONDS = 2e-9


def _cost_parts(problem: Problem) -> tuple[float, float, float, float]:
    """Structured FLOPs, fallback FLOPs, peak bytes, seconds of the contractions' working elements.

    Kept with the probe per block size: ``auto`` asks for them on every call.
    """
    if problem.probe is None:
        return _priced_parts(problem)
    key = ("structured cost", replace(problem, probe=None))
    return problem.probe.analysis(key, lambda *_: _priced_parts(problem))


def _priced_parts(problem: Problem) -> tuple[float, float, float, float]:
    p = problem
    s = _structure(p)
    if s is None:  # no probe: every parameter would go through the fallback
        cost = jacobian.estimate(p)
        return 0.0, cost.flops, cost.bytes, 0.0
    samples = p.n1 if p.symmetric else p.n1 + p.n2
    o = p.n_out
    # Forward, then O backward passes computing input gradients only (about a forward
    # each), plus the fallback parameters' weight gradients (another forward each, in
    # proportion to their share of the parameters).
    fb_share = s.fallback_params / max(p.n_params, 1)
    flops = samples * (p.forward_flops + s.extra_flops) * (1 + o)
    fallback = samples * p.forward_flops * o * fb_share
    kept = samples * (s.feature_elements + o * s.cotangent_elements + o * s.fallback_params)
    work = samples * (1 + o) * p.activations
    plan = make_plan(s, p.n1, p.n2, p.symmetric, o, p.mode, None, WORK_BYTES / p.itemsize)
    flops += sum(route.flops for route in plan.routes)
    contraction_work = max((min(route.work * p.itemsize, WORK_BYTES) for route in plan.routes),
                           default=0.0)
    per_pair = o * o if p.mode == "full" else o
    fallback += 2.0 * p.n1 * p.n2 * per_pair * s.fallback_params
    nbytes = (kept + work) * p.itemsize + contraction_work + p.output_bytes()
    work_seconds = sum(route.work * (EXPLICIT_WORK_SECONDS if route.strategy == "explicit"
                                     else WORK_SECONDS) for route in plan.routes)
    return flops, fallback, nbytes, float(work_seconds)


@dataclass(frozen=True)
class _Context:
    """What every block prepared for one kernel shares: the structure, the plan, settings."""

    structure: Structure
    plan: Plan
    modules: dict
    work_elements: float
    dtype: torch.dtype


@dataclass
class Prepared:
    """One block of samples as the contraction needs it (see :func:`prepare`).

    Attributes:
        ctx: the shared context.
        x: the samples ``(N, ...)``, a tensor or a tuple or dict of them (to recompute a pair
            whose captures came out differently).
        cap: captured layer inputs, cotangents, fallback Jacobians, separable heads and
            streamed per-sample gradients.
    """

    ctx: _Context
    x: _inputs.Inputs
    cap: Captured

    @property
    def n(self) -> int:
        return _inputs.batch_size(self.x)

    def representation(self) -> tuple:
        """Which layers were factored or streamed: blocks contract directly when equal."""
        cap = self.cap
        return frozenset(cap.heads), frozenset(cap.streams), frozenset(cap.fallback)

    def rows(self, start: int, stop: int | None) -> Prepared:
        """The same for samples ``start:stop`` (views, no copy)."""
        return Prepared(self.ctx, _inputs.take(self.x, start, stop), self.cap.rows(start, stop))


def prepare(fm, params, x, mode, groups, *, problem=None, memory_budget=None) -> Prepared:
    """Everything the kernel needs from the samples ``x (N, ...)``.

    Layer inputs, cotangents (or streamed per-sample gradients and separable-head
    factors) and fallback Jacobians.

    What each unit keeps follows one plan (``_plan``) for blocks of ``problem.n1`` by
    ``problem.n2`` samples (without a problem: ``x`` with itself), so the features of any
    two blocks prepared with the same ``problem`` contract directly (:func:`contract`).
    """
    structure = _structure(problem) or probe(fm, params, _inputs.take(x, 0, 1))
    if problem is not None:
        n1, n2, symmetric, n_out = problem.n1, problem.n2, problem.symmetric, problem.n_out
    else:
        n = _inputs.batch_size(x)
        n1, n2, symmetric, n_out = n, n, True, structure.n_out
    dtype = next(iter(params.values())).dtype
    work = WORK_BYTES
    if memory_budget is not None:
        work = max(min(WORK_BYTES, memory_budget / 4), MIN_WORK_BYTES)
    work_elements = work / torch.finfo(dtype).bits * 8
    group_of = {name: g for g, names in groups.items() for name in names}
    plan = make_plan(structure, n1, n2, symmetric, n_out, mode, group_of, work_elements)
    ctx = _Context(structure, plan, dict(fm.module.named_modules()), work_elements, dtype)
    cap = None
    if plan.batched:
        cap = capture_batched(fm, params, x, structure, plan.factor, plan.stream)
    if cap is None:
        cap = capture_per_sample(fm, params, x, structure)
    return Prepared(ctx, x, cap)


def contract(fa: Prepared, fb: Prepared | None, fm, params, mode, groups, *, problem=None,
             memory_budget=None) -> dict[str, torch.Tensor]:
    """``{group: kernel block}`` between the samples of ``fa`` and ``fb``.

    ``fb=None``: ``fa`` with itself. Blocks whose captures came out differently (a head
    separable on one batch only) are recomputed together.
    """
    if fb is not None and fb.representation() != fa.representation():
        return compute(fm, params, fa.x, fb.x, mode, groups, problem=problem,
                       memory_budget=memory_budget)
    ctx, structure = fa.ctx, fa.ctx.structure
    symmetric = fb is None
    fb = fa if fb is None else fb
    out: dict[str, torch.Tensor] = {}

    def add(group: str, k: torch.Tensor) -> None:
        out[group] = k if group not in out else out[group] + k

    for route in ctx.plan.routes:
        unit, s = route.unit, route.site
        if s in fa.cap.heads:
            site = structure.sites[s]
            module = ctx.modules[site.module]
            for group, part, _ in route.parts:
                bias_scale = part.bias_scale if part.bias is not None else None

                def moments(f: Prepared) -> torch.Tensor:
                    feat = f.cap.feats[s] if part.weight is not None else None
                    return factored_features(site, module, feat, f.cap.heads[s][0], bias_scale)

                f1 = moments(fa)
                f2 = f1 if symmetric else moments(fb)
                add(group, factored_blocks(f1, fa.cap.heads[s][1], f2, fb.cap.heads[s][1], mode,
                                           ctx.work_elements))
        elif s in fa.cap.streams:
            for group, part, _ in route.parts:
                add(group, fa.cap.streams[s].kernel(part, fb.cap.streams[s], mode))
        else:
            a1, d1 = unit_tensors(unit, structure, ctx.modules, fa.cap.feats, fa.cap.cots)
            a2, d2 = (a1, d1) if symmetric else unit_tensors(unit, structure, ctx.modules,
                                                             fb.cap.feats, fb.cap.cots)
            for group, part, strategy in route.parts:
                add(group, unit_kernel(part, strategy, a1, d1, a2, d2, mode, symmetric,
                                       ctx.work_elements))

    group_of = {name: g for g, names in groups.items() for name in names}
    for name in structure.fallback:
        if name not in group_of:
            continue
        j1 = _flat(fa.cap.fallback[name])
        j2 = None if symmetric else _flat(fb.cap.fallback[name])
        add(group_of[name], jacobian.contract_pair(j1, j2, mode))

    n1, n2, n_out = fa.n, fb.n, fa.cap.n_out
    for group in groups:
        if group not in out:  # parameters that do not affect the outputs here
            shape = {"full": (n1, n2, n_out, n_out), "diagonal": (n1, n2, n_out),
                     "trace": (n1, n2)}[mode]
            out[group] = torch.zeros(shape, dtype=ctx.dtype,
                                     device=next(iter(params.values())).device)
    return {g: k.contiguous() for g, k in out.items()}


def compute(fm, params, x1, x2, mode, groups, *, problem=None, memory_budget=None):
    """``{group: kernel block}``; ``x2=None`` reuses ``x1``'s features and cotangents.

    The features of ``x1`` and ``x2`` come from one capture of both batches together.
    """
    xs = x1 if x2 is None else _inputs.concat([x1, x2])
    f = prepare(fm, params, xs, mode, groups, problem=problem, memory_budget=memory_budget)
    kw = {"problem": problem, "memory_budget": memory_budget}
    if x2 is None:
        return contract(f, None, fm, params, mode, groups, **kw)
    n1 = _inputs.batch_size(x1)
    return contract(f.rows(0, n1), f.rows(n1, None), fm, params, mode, groups, **kw)


def _flat(jac: torch.Tensor) -> torch.Tensor:
    return jac.reshape(jac.shape[0], jac.shape[1], -1)


__all__ = ["Prepared", "compute", "contract", "estimate", "predicted_seconds", "prepare", "probe"]
