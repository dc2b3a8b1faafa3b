"""``implementation="jacobian"``: per-sample Jacobians, then a contraction.

``J = vmap(jacrev(f))`` gives ``(N, O, P)``; the kernel is ``J1 J2ᵀ`` contracted per
parameter tensor. Cost: ``N·O`` backward passes plus ``2·N1·N2·O²·P`` FLOPs (full) or
``2·N1·N2·O·P`` (diagonal, trace); memory ``(N1 + N2)·O·P`` numbers for the Jacobians
(``N1·O·P`` when ``x2 is None``). Fastest when that fits in memory.
"""

from __future__ import annotations

import torch
from torch.func import jacrev, vmap

from ntk_torch import _inputs
from ntk_torch._engines._cost import Cost, Problem

# Per-sample weight gradients under vmap (grouped convolutions, batched outer products)
# run at about half the structured engine's rate on the benchmark set; the contraction,
# one large matrix product, at about twice it (3.6x the Jacobians' rate measured on the
# transformer rows of benchmarks/bench_empirical.py).
EFFICIENCY = 0.5
CONTRACT_EFFICIENCY = 2.0
OVERHEAD_S = 1e-3


def _flops(p: Problem) -> tuple[float, float]:
    """FLOPs of the per-sample Jacobians and of their contraction."""
    samples = p.n1 if p.symmetric else p.n1 + p.n2
    # Forward once per sample, then O vectorised backward passes (about 2x a forward each).
    jac_flops = samples * p.forward_flops * (1 + 2 * p.n_out)
    per_pair = p.n_out**2 if p.mode == "full" else p.n_out
    return jac_flops, 2.0 * p.n1 * p.n2 * per_pair * p.n_params


def estimate(problem: Problem) -> Cost:
    p = problem
    samples = p.n1 if p.symmetric else p.n1 + p.n2
    jac_bytes = samples * p.n_out * p.n_params * p.itemsize
    # Saved activations plus the O-fold batched cotangents of the backward pass.
    work_bytes = samples * (1 + p.n_out) * p.activations * p.itemsize
    return Cost(sum(_flops(p)), jac_bytes + work_bytes + p.output_bytes())


def predicted_seconds(problem: Problem, throughput: float) -> float:
    """The Jacobians at ``EFFICIENCY``, their contraction at ``CONTRACT_EFFICIENCY``."""
    jac_flops, contract_flops = _flops(problem)
    return (jac_flops / EFFICIENCY + contract_flops / CONTRACT_EFFICIENCY) / throughput + OVERHEAD_S


def per_sample_jacobians(fm, params: dict[str, torch.Tensor],
                         x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: (N, O, *param.shape)}``: Jacobians of each sample's outputs."""
    return vmap(jacrev(fm.single), in_dims=(None, 0), randomness="error")(params, x)


def contract_pair(ja: torch.Tensor, jb: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Kernel block from Jacobians ``ja (N1, O, p)`` and ``jb (N2, O, p)``.

    ``jb=None``: ``ja`` with itself, a Gram matrix of which only the blocks on and above
    the diagonal are multiplied (:func:`gram`).
    """
    n1, n_out, _ = ja.shape
    if mode == "diagonal":
        jb = ja if jb is None else jb
        return torch.bmm(ja.transpose(0, 1), jb.permute(1, 2, 0)).permute(1, 2, 0)
    rows = ja.reshape(n1 * n_out if mode == "full" else n1, -1)
    k = gram(rows) if jb is None else rows @ jb.reshape(-1, rows.shape[1]).T
    if mode == "full":
        n2 = k.shape[1] // n_out
        return k.view(n1, n_out, n2, n_out).permute(0, 2, 1, 3)
    return k / n_out


# Gram matrices of at least this many rows are multiplied in GRAM_BLOCKS x GRAM_BLOCKS
# blocks, the lower ones mirrored: (b + 1) / (2b) of the FLOPs. Two blocks measured
# fastest (smaller products run at a lower rate).
GRAM_MIN_ROWS, GRAM_BLOCKS = 64, 2


def gram(m: torch.Tensor) -> torch.Tensor:
    """``m mᵀ`` of ``m (R, p)``: ``(R, R)``, exactly symmetric (the lower part mirrored)."""
    r = m.shape[0]
    blocks = GRAM_BLOCKS if r >= GRAM_MIN_ROWS else 1
    edges = [r * i // blocks for i in range(blocks + 1)]
    spans = list(zip(edges[:-1], edges[1:]))
    out = m.new_empty(r, r)
    for i, (a0, a1) in enumerate(spans):
        for b0, b1 in spans[i:]:
            block = m[a0:a1] @ m[b0:b1].T
            if b0 == a0:  # exactly symmetric: the upper triangle mirrored
                block = block.triu() + block.triu(1).T
            out[a0:a1, b0:b1] = block
            out[b0:b1, a0:a1] = block.T
    return out


def prepare(fm, params, x, mode, groups, *, problem=None,
            memory_budget=None) -> dict[str, torch.Tensor]:
    """Per-sample Jacobians ``{name: (N, O, *param.shape)}`` of the samples ``x``."""
    return per_sample_jacobians(fm, params, x)


def contract(ja, jb, fm, params, mode, groups, *, problem=None, memory_budget=None):
    """``{group: kernel block}`` from two blocks' Jacobians (``jb=None``: ``ja`` with itself)."""
    out = {}
    for group, names in groups.items():
        total = None
        for name in names:
            k = contract_pair(_flat(ja[name]), None if jb is None else _flat(jb[name]), mode)
            total = k if total is None else total + k
        out[group] = total
    return out


# Jacobians of x1 and x2 up to this size come from one vectorised pass over both: half the
# fixed cost of the passes, most of the time on small models (1.7x on the tiny rows of
# benchmarks/bench_overhead.py). Larger ones ran faster in two passes (1.2-1.6x on the CNN
# and unrolled-LSTMCell rows of bench_empirical.py): the intermediates of one pass outgrow
# the caches.
JOINT_PASS_BYTES = 8 * 2**20


def compute(fm, params, x1, x2, mode, groups, *, problem=None, memory_budget=None):
    """``{group: kernel block}``; ``x2=None`` reuses ``x1``'s Jacobians.

    With ``x2``, small Jacobians of both come from one pass (``JOINT_PASS_BYTES``).
    """
    if x2 is None:
        return contract(per_sample_jacobians(fm, params, x1), None, fm, params, mode, groups)
    p = problem
    if p is None or (p.n1 + p.n2) * p.n_out * p.n_params * p.itemsize > JOINT_PASS_BYTES:
        return contract(per_sample_jacobians(fm, params, x1), per_sample_jacobians(fm, params, x2),
                        fm, params, mode, groups)
    n1 = _inputs.batch_size(x1)
    both = per_sample_jacobians(fm, params, _inputs.concat([x1, x2]))
    jac1 = {name: j[:n1] for name, j in both.items()}
    jac2 = {name: j[n1:] for name, j in both.items()}
    return contract(jac1, jac2, fm, params, mode, groups)


def _flat(jac: torch.Tensor) -> torch.Tensor:
    return jac.reshape(jac.shape[0], jac.shape[1], -1)  # scalar parameters too
