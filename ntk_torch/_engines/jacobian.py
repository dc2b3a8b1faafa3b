"""``implementation="jacobian"``: per-sample Jacobians, then a contraction.

``J = vmap(jacrev(f))`` gives ``(N, O, P)``; the kernel is ``J1 J2ᵀ`` contracted per
parameter tensor. Cost: ``N·O`` backward passes plus ``2·N1·N2·O²·P`` FLOPs (full) or
``2·N1·N2·O·P`` (diagonal, trace); memory ``(N1 + N2)·O·P`` numbers for the Jacobians
(``N1·O·P`` when ``x2 is None``). Fastest when that fits in memory.
"""

from __future__ import annotations

import torch
from torch.func import jacrev, vmap

from ntk_torch._engines._cost import Cost, Problem

# Per-sample weight gradients under vmap (grouped convolutions, batched outer products)
# run at about half the structured engine's rate on the benchmark set.
EFFICIENCY = 0.5
OVERHEAD_S = 1e-3


def estimate(problem: Problem) -> Cost:
    p = problem
    samples = p.n1 if p.symmetric else p.n1 + p.n2
    # Forward once per sample, then O vectorised backward passes (about 2x a forward each).
    jac_flops = samples * p.forward_flops * (1 + 2 * p.n_out)
    per_pair = p.n_out**2 if p.mode == "full" else p.n_out
    contract_flops = 2.0 * p.n1 * p.n2 * per_pair * p.n_params
    jac_bytes = samples * p.n_out * p.n_params * p.itemsize
    # Saved activations plus the O-fold batched cotangents of the backward pass.
    work_bytes = samples * (1 + p.n_out) * p.activations * p.itemsize
    return Cost(jac_flops + contract_flops, jac_bytes + work_bytes + p.output_bytes())


def per_sample_jacobians(fm, params: dict[str, torch.Tensor],
                         x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: (N, O, *param.shape)}``: Jacobians of each sample's outputs."""
    return vmap(jacrev(fm.single), in_dims=(None, 0), randomness="error")(params, x)


def contract_pair(ja: torch.Tensor, jb: torch.Tensor, mode: str) -> torch.Tensor:
    """Kernel block from Jacobians ``ja (N1, O, p)`` and ``jb (N2, O, p)``."""
    n1, n_out, _ = ja.shape
    n2 = jb.shape[0]
    if mode == "full":
        k = ja.reshape(n1 * n_out, -1) @ jb.reshape(n2 * n_out, -1).T
        return k.view(n1, n_out, n2, n_out).permute(0, 2, 1, 3)
    if mode == "diagonal":
        return torch.bmm(ja.transpose(0, 1), jb.permute(1, 2, 0)).permute(1, 2, 0)
    return (ja.reshape(n1, -1) @ jb.reshape(n2, -1).T) / n_out


def prepare(fm, params, x, mode, groups, *, problem=None,
            memory_budget=None) -> dict[str, torch.Tensor]:
    """Per-sample Jacobians ``{name: (N, O, *param.shape)}`` of the samples ``x``."""
    return per_sample_jacobians(fm, params, x)


def contract(ja, jb, fm, params, mode, groups, *, problem=None, memory_budget=None):
    """``{group: kernel block}`` from two blocks' Jacobians (``jb=None``: ``ja`` with itself)."""
    jb = ja if jb is None else jb
    out = {}
    for group, names in groups.items():
        total = None
        for name in names:
            k = contract_pair(_flat(ja[name]), _flat(jb[name]), mode)
            total = k if total is None else total + k
        out[group] = total
    return out


def compute(fm, params, x1, x2, mode, groups, *, problem=None, memory_budget=None):
    """``{group: kernel block}``; ``x2=None`` reuses ``x1``'s Jacobians."""
    jac1 = per_sample_jacobians(fm, params, x1)
    jac2 = None if x2 is None else per_sample_jacobians(fm, params, x2)
    return contract(jac1, jac2, fm, params, mode, groups)


def _flat(jac: torch.Tensor) -> torch.Tensor:
    return jac.reshape(jac.shape[0], jac.shape[1], -1)  # scalar parameters too
