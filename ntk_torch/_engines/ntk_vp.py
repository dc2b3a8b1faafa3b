"""``implementation="ntk_vp"``: NTK-vector products with ``vjp`` and ``jvp``.

For each sample ``b`` of ``x2`` and output ``j``, ``v = J(x2_b)ᵀ e_j`` (one backward
pass) and ``J(x1) v`` (one forward-mode pass over the whole of ``x1``) give the
column ``K[:, b, :, j]``. Cost: about ``N2·O·(2 + 3·N1)`` forward passes, so it is
slower than ``"jacobian"`` but holds only ``c·O·P`` numbers for a chunk of ``c``
samples of ``x2`` (chosen to fit the memory budget). Per-layer kernels take one
pass per layer.
"""

from __future__ import annotations

import torch
from torch.func import jvp, vjp, vmap

from ntk_torch._engines._cost import Cost, Problem
from ntk_torch._functional import load_forward_mode_rules

# Batched vjp/jvp passes: about 0.7 of the structured engine's rate on the benchmark set.
# Its fixed cost per block (vjp and jvp transforms, chunking) measured about 1 ms above
# the jacobian engine's on tiny models (benchmarks/bench_overhead.py).
EFFICIENCY = 0.7
OVERHEAD_S = 2e-3


def _chunk_bytes(p: Problem, chunk: int) -> float:
    # c·O parameter-space vectors, and c·O forward-mode passes over n1 samples.
    return chunk * p.n_out * (p.n_params + 2 * p.n1 * p.activations) * p.itemsize


def estimate(problem: Problem, chunk: int = 1) -> Cost:
    p = problem
    flops = p.n_groups * p.n2 * p.forward_flops * (1 + 2 * p.n_out + 3 * p.n_out * p.n1)
    # The (N1, N2, O, O) block is produced before diagonal/trace are taken from it.
    full_block = p.n1 * p.n2 * p.n_out**2 * p.itemsize
    return Cost(flops, _chunk_bytes(p, chunk) + full_block + p.output_bytes())


def largest_chunk(problem: Problem, memory_budget: float | None) -> int:
    """Most samples of ``x2`` processed at once within ``memory_budget`` (at least 1)."""
    if memory_budget is None:
        return problem.n2
    spare = memory_budget - estimate(problem, 0).bytes
    per_sample = _chunk_bytes(problem, 1)
    return int(max(1, min(problem.n2, spare // max(per_sample, 1.0))))


def prepare(fm, params, x, mode, groups, *, problem=None, memory_budget=None) -> torch.Tensor:
    """The samples themselves.

    Every NTK-vector product involves both blocks, so nothing of one block alone can be
    reused.
    """
    return x


def contract(xa, xb, fm, params, mode, groups, *, problem=None, memory_budget=None):
    """:func:`compute` of two prepared blocks."""
    return compute(fm, params, xa, xb, mode, groups, problem=problem, memory_budget=memory_budget)


def forward_ad_failure(problem: Problem | None) -> str | None:
    """Why forward-mode AD (``jvp``) cannot run ``problem``'s model, or None if it can.

    Some operators have no forward-mode derivative in torch (``nn.EmbeddingBag``, a few
    fused kernels); one ``jvp`` of the probe's sample finds out, once per probe. Without a
    probe, None.
    """
    if problem is None or problem.probe is None:
        return None
    return problem.probe.analysis("forward_ad", _jvp_trial)


def _jvp_trial(fm, params: dict[str, torch.Tensor], sample) -> str | None:
    load_forward_mode_rules()
    tangents = {k: torch.zeros_like(v) for k, v in params.items()}
    try:
        jvp(lambda p: fm(p, sample), (params,), (tangents,))
    except (NotImplementedError, RuntimeError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, RuntimeError) and "forward" not in text.lower():
            return None  # not forward mode's limit: the engine's own error is clearer
        text = text.rstrip(".")
        return text if len(text) <= 120 else text[:117] + "..."
    return None


def compute(fm, params, x1, x2, mode, groups, *, problem=None, memory_budget=None):
    """``{group: kernel block}``, processing ``x2`` in chunks that fit ``memory_budget``."""
    load_forward_mode_rules()
    x2_ = x1 if x2 is None else x2
    chunk = None if problem is None else largest_chunk(problem, memory_budget)
    out = {}
    for group, names in groups.items():
        selected = {n: params[n] for n in names}
        fixed = {n: t for n, t in params.items() if n not in selected}

        def f1(p):
            return fm({**fixed, **p}, x1)

        def columns(xb):
            # J(xb)ᵀ e_j for every output j, then J(x1) of each: K[:, b, :, j].
            out_b, vjp_fn = vjp(lambda p: fm.single({**fixed, **p}, xb), selected)
            basis = torch.eye(out_b.numel(), dtype=out_b.dtype, device=out_b.device)

            def column(e):
                (tangent,) = vjp_fn(e)
                return jvp(f1, (selected,), (tangent,))[1]

            return vmap(column)(basis)  # (O_j, N1, O_i)

        k = vmap(columns, chunk_size=chunk, randomness="error")(x2_)  # (N2, O_j, N1, O_i)
        k = k.permute(2, 0, 3, 1)
        if mode == "diagonal":
            k = k.diagonal(dim1=2, dim2=3)
        elif mode == "trace":
            k = k.diagonal(dim1=2, dim2=3).mean(-1)
        out[group] = k.contiguous()
    return out
