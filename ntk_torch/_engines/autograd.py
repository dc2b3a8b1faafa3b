"""``implementation="autograd"``: per-sample Jacobians by plain autograd, without vmap.

For each sample ``a``, one forward pass of that sample alone (a batch of one), then the
``O`` backward passes ``torch.autograd.grad(f_i(x_a), θ)`` (vectorised over ``i`` with
``is_grads_batched`` where the backward allows it, else one by one) give the rows
``J[a, i] (P,)`` of the per-sample Jacobian ``(N, O, P)``; the kernel is the same
contraction ``J1 J2ᵀ`` as ``"jacobian"``'s, per group of parameters. The forward pass is
never vectorised, so it runs every model whose forward and backward run in plain
PyTorch, including what ``torch.func.vmap`` (every other engine) cannot batch: control
flow that depends on the data, ``.item()``, fused ``nn.LSTM``/``nn.GRU``/``nn.RNN`` (which
the structured engine runs unrolled where it has their rule). ``auto`` takes it exactly
where no other engine runs (``_engines.vmap_failure``).

Cost: ``N`` one-sample forward passes and ``N·O`` one-sample backward passes (the FLOPs of
``"jacobian"``'s Jacobians, run one small pass at a time), plus ``2·N1·N2·O²·P`` FLOPs
(full) or ``2·N1·N2·O·P`` (diagonal, trace) for the contraction; memory ``(N1 + N2)·O·P``
numbers for the Jacobians (``N1·O·P`` when ``x2 is None``), one sample's autograd graph
and its ``O``-fold batched backward.

A forward pass that draws random numbers (Dropout inside a custom module, ``nn.LSTM``'s
dropout between layers in train mode) would make the kernel random: it is refused.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from contextlib import nullcontext

import torch
from torch import nn
from torch.func import jacrev, vmap

from ntk_torch import _inputs
from ntk_torch._engines import jacobian
from ntk_torch._engines._cost import Cost, Problem
from ntk_torch._model_checks import label

# One small pass at a time: per-pass overheads and unbatched kernels, measured at about a
# quarter of the structured engine's rate (benchmarks/bench_autograd.py).
EFFICIENCY = 0.25
OVERHEAD_S = 1e-3


def estimate(problem: Problem) -> Cost:
    """FLOPs and peak bytes of one block (see the module docstring)."""
    p = problem
    samples = p.n1 if p.symmetric else p.n1 + p.n2
    jac_flops = samples * p.forward_flops * (1 + 2 * p.n_out)
    per_pair = p.n_out**2 if p.mode == "full" else p.n_out
    contract_flops = 2.0 * p.n1 * p.n2 * per_pair * p.n_params
    jac_bytes = samples * p.n_out * p.n_params * p.itemsize
    # One sample's saved activations, and its O-fold batched backward: cotangents and
    # gradients before their copy.
    work_bytes = (1 + p.n_out) * (p.activations + p.n_params) * p.itemsize
    return Cost(jac_flops + contract_flops, jac_bytes + work_bytes + p.output_bytes())


def _layout(params: dict[str, torch.Tensor],
            groups: dict[str, tuple[str, ...]]) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """Parameter names in Jacobian column order, and each group's span of columns.

    Groups are laid out one after the other, so each group's block is one slice.
    """
    names, spans, start = [], {}, 0
    for group, members in groups.items():
        names += members
        stop = start + sum(params[n].numel() for n in members)
        spans[group] = (start, stop)
        start = stop
    return names, spans


def per_sample_jacobians(fm, params: dict[str, torch.Tensor], x: _inputs.Inputs,
                         names: list[str]) -> torch.Tensor:
    """``(N, O, P)``: Jacobians of each sample's outputs w.r.t. ``params[names]``, flattened.

    Columns follow ``names``; the other entries of ``params`` are held fixed. Row ``a`` is
    one forward of sample ``a`` alone, then its ``O`` backward passes: all at once
    (``is_grads_batched``: the backward graph vectorised over the ``O`` one-hot
    cotangents, which runs even where the forward could not be vectorised), or one after
    the other where that fails.
    """
    leaves = [params[n].detach().requires_grad_() for n in names]
    values = {**params, **dict(zip(names, leaves))}
    n = _inputs.batch_size(x)
    n_params = sum(t.numel() for t in leaves)
    jac = None
    batched = True
    rng = _rng_state(leaves[0].device)
    with torch.enable_grad(), _rnn_backward(fm.module, leaves[0].device):
        for a in range(n):
            out = fm(values, _inputs.take(x, a, a + 1))[0]  # (O,)
            if jac is None:
                jac = leaves[0].new_empty(n, out.shape[0], n_params)
            if not out.requires_grad:  # no selected parameter reaches this sample's outputs
                jac[a].zero_()
                continue
            batched = batched and _batched_rows(out, leaves, jac[a])
            if not batched:
                _rows_one_by_one(out, leaves, jac[a])
    if not _same_state(rng, _rng_state(leaves[0].device)):
        raise RuntimeError(
            "`model` draws random numbers in its forward pass (Dropout in a custom module, or "
            "dropout between the layers of an nn.LSTM/nn.GRU/nn.RNN in train mode), so the NTK "
            "is undefined. Call model.eval() first, or remove the random operation."
        )
    return jac


def _batched_rows(out: torch.Tensor, leaves: list[torch.Tensor], rows: torch.Tensor) -> bool:
    """``rows (O, P)`` from one backward vectorised over outputs; False if it cannot run."""
    basis = torch.eye(out.shape[0], dtype=out.dtype, device=out.device)
    try:
        with warnings.catch_warnings():  # torch's note on ops it batches slowly: not ours
            warnings.filterwarnings("ignore", message="There is a performance drop")
            grads = torch.autograd.grad(out, leaves, basis, retain_graph=True,
                                        is_grads_batched=True, allow_unused=True)
    except RuntimeError:  # a backward rule vmap cannot batch: one output at a time
        return False
    o = out.shape[0]
    # Parameters this sample's outputs do not reach (a branch not taken) have no gradient.
    torch.cat([out.new_zeros(o, t.numel()) if g is None else g.reshape(o, -1)
               for g, t in zip(grads, leaves)], dim=1, out=rows)
    return True


def _rows_one_by_one(out: torch.Tensor, leaves: list[torch.Tensor], rows: torch.Tensor) -> None:
    """``rows (O, P)`` from ``O`` backward passes, one per output."""
    last = out.shape[0] - 1
    for i in range(out.shape[0]):
        grads = torch.autograd.grad(out[i], leaves, retain_graph=i < last, allow_unused=True,
                                    materialize_grads=True)
        torch.cat([g.reshape(-1) for g in grads], out=rows[i])


def _rng_state(device: torch.device) -> list[torch.Tensor]:
    """The random generators' states that a forward pass on ``device`` may advance."""
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _same_state(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(s, t) for s, t in zip(a, b))


def _rnn_backward(module: nn.Module, device: torch.device):
    """Turn cuDNN off while running a model that has an RNN module in eval mode on CUDA.

    cuDNN's RNN backward refuses to run in eval mode; PyTorch's own RNN kernels compute
    the same function and differentiate in any mode.
    """
    if device.type == "cuda" and any(isinstance(m, nn.RNNBase) and not m.training
                                     for m in module.modules()):
        return torch.backends.cudnn.flags(enabled=False)
    return nullcontext()


def prepare(fm, params, x, mode, groups, *, problem=None, memory_budget=None) -> torch.Tensor:
    """Per-sample Jacobians ``(N, O, P)`` of the samples ``x``, group by group in columns."""
    names, _ = _layout(params, groups)
    return per_sample_jacobians(fm, params, x, names)


def contract(ja, jb, fm, params, mode, groups, *, problem=None, memory_budget=None):
    """``{group: kernel block}`` from two blocks' Jacobians (``jb=None``: ``ja`` with itself)."""
    _, spans = _layout(params, groups)
    return {group: jacobian.contract_pair(ja[:, :, start:stop],
                                          None if jb is None else jb[:, :, start:stop], mode)
            for group, (start, stop) in spans.items()}


def compute(fm, params, x1, x2, mode, groups, *, problem=None, memory_budget=None):
    """``{group: kernel block}``; ``x2=None`` reuses ``x1``'s Jacobians."""
    ja = prepare(fm, params, x1, mode, groups)
    jb = None if x2 is None else prepare(fm, params, x2, mode, groups)
    return contract(ja, jb, fm, params, mode, groups)


def vmap_failure(problem: Problem | None) -> str | None:
    """Why ``torch.func.vmap`` cannot run ``problem``'s model, or None if it can.

    Found once per ``problem.probe``: a fused RNN module is known to fail (the batched
    cotangents of its backward); otherwise per-sample Jacobians of two outputs are taken
    under ``vmap`` on the profiled sample, as the other engines would. Random draws are not
    a reason (the other engines refuse them with their own message). Without a probe,
    None.
    """
    if problem is None or problem.probe is None:
        return None
    return problem.probe.analysis("vmap", _vmap_trial)


def _vmap_trial(fm, params: dict[str, torch.Tensor], sample: torch.Tensor) -> str | None:
    return fused_rnn(fm.module) or vmap_run(fm, params, sample)


def fused_rnn(model: nn.Module, unrolled: Collection[str] = ()) -> str | None:
    """The reason naming ``model``'s first fused RNN module not in ``unrolled``, or None."""
    for name, m in model.named_modules():
        if isinstance(m, nn.RNNBase) and name not in unrolled:
            return f"{label(name, m)} is a fused RNN module"
    return None


def vmap_run(fm, params: dict[str, torch.Tensor], sample: torch.Tensor) -> str | None:
    """Why per-sample Jacobians of two outputs fail under vmap on ``sample``, or None."""
    running: list[tuple[str, nn.Module]] = []  # modules entered and not yet left

    def enter(name: str, m: nn.Module):
        return lambda *_: running.append((name, m))

    def leave(*_):
        running.pop()

    def two_outputs(p, s):
        return fm.single(p, s)[:2]

    handles = []
    for name, m in fm.module.named_modules():
        handles += [m.register_forward_pre_hook(enter(name, m)), m.register_forward_hook(leave)]
    try:
        with warnings.catch_warnings():  # torch's note on ops it batches slowly: not ours
            warnings.filterwarnings("ignore", message="There is a performance drop")
            vmap(jacrev(two_outputs), in_dims=(None, 0), randomness="error")(params, sample)
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as err:  # the same forward ran without vmap: vmap's limit
        text = (str(err).strip() or type(err).__name__).splitlines()[0]
        if "random" in text:
            return None
        text = text if len(text) <= 100 else text[:97] + "..."
        return text + (f" in {label(*running[-1])}" if running and running[-1][0] else "")
    finally:
        for h in handles:
            h.remove()
    return None


__all__ = ["compute", "contract", "estimate", "fused_rnn", "per_sample_jacobians", "prepare",
           "vmap_failure", "vmap_run"]
