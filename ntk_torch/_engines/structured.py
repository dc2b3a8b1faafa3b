"""``implementation="structured"``: Gram matrices of layer inputs and output cotangents.

For the layers that hold almost all parameters (``nn.Linear``, ``nn.Conv1d/2d``,
``nn.Embedding``, affine parameters of norm layers, their biases), the per-sample
gradient of output ``i`` is ``Σ_t δ_{i,t} ⊗ a_t`` (cotangent at the layer's output times
the layer's input, over positions ``t``), so their kernel block is

    Θ_W[a, b, i, j] = Σ_{t,s} (a_t(x_a) · a_s(x_b)) (δ_{i,t}(x_a) · δ_{j,s}(x_b))

(Novak et al. 2022, structured derivatives). One forward pass, vectorised over samples,
keeps every layer's input; adding a zero tensor to each layer's output (a hook) and taking
the vector-Jacobian product with respect to those zeros, vectorised over the ``O`` output
basis vectors, gives all cotangents in one backward pass without any weight gradient.
Per layer, the Gram route or explicit per-sample gradients of that layer alone are taken,
whichever costs fewer FLOPs (``_structured_rules.strategy_costs``). Parameters that are
not used only through such layers (see ``_structure``) get exact per-sample Jacobians from
the same backward pass, contracted as in ``"jacobian"``.

Cost: one forward and ``O`` input-gradient backward passes per sample, plus per layer
``2·N1·N2·(T²·k_in + O²·k_out)`` FLOPs (dense layers, ``T = 1``); memory: the layer inputs
and ``O`` cotangents per sample, never an ``(N, O, P)`` Jacobian. Uses ``fm.module`` only
through temporary hooks during a ``functional_call``; the module is not modified.

The cotangents come from a batched backward of a batched forward, which equals the
per-sample derivatives because each sample's outputs depend on that sample alone
(the property every kernel needs; ``check_model_state`` refuses batch statistics).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import replace

import torch
from torch.func import vjp, vmap

from ntk_torch._engines import jacobian
from ntk_torch._engines._cost import Cost, Problem
from ntk_torch._engines._structure import Structure, Unit, discover
from ntk_torch._engines._structured_rules import (
    bias_gradients,
    choose_strategy,
    cotangents,
    explicit_kernel,
    features,
    gram_kernel,
    gram_of_inputs,
    input_feature,
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
    for unit in s.units:
        costs = strategy_costs(unit, p.n1, p.n2, p.symmetric, o, p.mode)
        f, w = costs[choose_strategy(unit, p.n1, p.n2, p.symmetric, o, p.mode)]
        flops += f
        contraction_work = max(contraction_work, min(w * p.itemsize, WORK_BYTES))
    per_pair = o * o if p.mode == "full" else o
    fallback += 2.0 * p.n1 * p.n2 * per_pair * s.fallback_params
    nbytes = (kept + work) * p.itemsize + contraction_work + p.output_bytes()
    return flops, fallback, nbytes


def compute(fm, params, x1, x2, mode, groups, *, problem=None, memory_budget=None):
    """``{group: kernel block}``; ``x2=None`` reuses ``x1``'s features and cotangents."""
    structure = getattr(problem, "structure", None)
    if structure is None:
        structure = discover(fm, params, x1[:1])
    n1 = x1.shape[0]
    xs = x1 if x2 is None else torch.cat([x1, x2])
    feats, cots, fb_jac = _capture(fm, params, xs, structure)
    dtype = next(iter(params.values())).dtype
    work = WORK_BYTES if memory_budget is None else max(min(WORK_BYTES, memory_budget / 4), MIN_WORK_BYTES)
    work_elements = work / torch.finfo(dtype).bits * 8

    group_of = {name: g for g, names in groups.items() for name in names}
    out: dict[str, torch.Tensor] = {}

    def add(group: str, k: torch.Tensor) -> None:
        out[group] = k if group not in out else out[group] + k

    modules = dict(fm.module.named_modules())
    for unit in structure.units:
        wanted = [n for n in unit.names if n in group_of]
        if not wanted:
            continue
        a, d = _unit_tensors(unit, structure, modules, feats, cots)
        for part in _split_by_group(unit, wanted, group_of):
            if x2 is None:
                k = _unit_kernel(part, a, d, a, d, mode, True, work_elements)
            else:
                k = _unit_kernel(part, _rows(a, 0, n1), d[:n1], _rows(a, n1, None), d[n1:],
                                 mode, False, work_elements)
            add(group_of[part.names[0]], k)

    for name in structure.fallback:
        if name not in group_of:
            continue
        j = fb_jac[name]
        j = j.reshape(j.shape[0], j.shape[1], -1)
        add(group_of[name], jacobian.contract(j[:n1], j if x2 is None else j[n1:], mode))

    n2 = n1 if x2 is None else x2.shape[0]
    n_out = next(iter(cots.values())).shape[1] if cots else _n_out(fb_jac)
    for group in groups:
        if group not in out:  # parameters that do not affect the outputs here
            shape = {"full": (n1, n2, n_out, n_out), "diagonal": (n1, n2, n_out), "trace": (n1, n2)}[mode]
            out[group] = torch.zeros(shape, dtype=dtype, device=x1.device)
    return {g: k.contiguous() for g, k in out.items()}


def _n_out(fb_jac: dict[str, torch.Tensor]) -> int:
    return next(iter(fb_jac.values())).shape[1]


# ---------------------------------------------------------------------------------------
# One forward and one vectorised backward for all samples and outputs.


@contextmanager
def _capture_hooks(modules, sites, eps, feats):
    """Keep each call's input feature and add ``eps[k]`` to its output (the k-th call)."""
    calls = iter(range(len(sites)))

    def hook(module, args, output):
        k = next(calls)
        site = sites[k]
        if modules[site.module] is not module:
            raise RuntimeError(
                f"the structured engine saw layer calls in a different order than when it probed "
                f"the model (expected {site.module!r}); the model's control flow depends on its "
                "inputs: use implementation='jacobian'"
            )
        feats[k] = input_feature(site.kind, module, args[0])
        return output + eps[k]

    with ExitStack() as stack:
        for m in {id(modules[s.module]): modules[s.module] for s in sites}.values():
            stack.callback(m.register_forward_hook(hook).remove)
        yield


def _capture(fm, params, x, structure: Structure):
    """Input features ``{site: (N, *in)}``, cotangents ``{site: (N, O, *out)}`` and fallback
    Jacobians ``{name: (N, O, *shape)}``, from one forward and one backward pass."""
    modules = dict(fm.module.named_modules())
    sites = structure.sites
    fallback = {n: params[n] for n in structure.fallback}
    fixed = {n: _fast_layout(t) for n, t in params.items() if n not in fallback}
    ref = next(iter(params.values()))

    def per_sample(xs):
        zeros = tuple(torch.zeros(s.out_shape, dtype=s.out_dtype, device=ref.device) for s in sites)

        def f(eps, fb):
            feats = [None] * len(sites)
            with _capture_hooks(modules, sites, eps, feats):
                out = fm.single({**fixed, **fb}, xs)
            return out, tuple(feats)

        out, vjp_fn, feats = vjp(f, zeros, fallback, has_aux=True)
        basis = torch.eye(out.numel(), dtype=out.dtype, device=out.device)
        d_eps, d_fb = vmap(vjp_fn)(basis)
        return feats, d_eps, d_fb

    # torch.func ignores an outer no_grad; it only stops unselected parameters that
    # require grad from recording a graph nobody will use.
    with torch.no_grad():
        feats, d_eps, d_fb = vmap(per_sample, randomness="error")(x)
    return dict(enumerate(feats)), dict(enumerate(d_eps)), d_fb


def _fast_layout(t: torch.Tensor) -> torch.Tensor:
    """Same values; 2-d convolution weights in channels-last layout.

    oneDNN then runs the convolutions and, above all, the transposed convolutions of the
    backward pass in channels-last, several times faster on CPU for the O·N cotangents.
    """
    if t.dim() == 4 and t.device.type == "cpu":
        return t.contiguous(memory_format=torch.channels_last)
    return t


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


__all__ = ["compute", "estimate", "predicted_seconds"]
