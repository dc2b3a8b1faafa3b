"""Separable heads: layers whose cotangents factor through a later vector.

A layer whose output ``y`` reaches a later vector ``h`` channel by channel — ReLU or
BatchNorm, global average pooling and flattening before a classifier that reads ``h`` —
has cotangents ``δ_i[c, t] = V_i[c] U[c, t]`` with ``V_i`` the cotangent of output ``i``
at ``h`` and ``U`` one vector-Jacobian product of ``Σ h`` at ``y``. Its kernel block then
needs ``U`` and ``V`` only (the factored rule, ``_contractions.factored_features``).

Candidates come from the structure (:func:`head_candidates`); whether one is separable is
checked numerically on a hooked forward (:func:`separable_heads`): once on the probe
sample (:func:`probe_heads`, recorded in ``Structure.heads``) and again on every batch
that uses the factored rule.
"""

from __future__ import annotations

from collections import Counter

import torch

from ntk_torch._engines._forward import Run, batched_forward, fast_layout
from ntk_torch._engines._structure import Structure

# Through a separable head the cotangent equals V[c]·U[c, t] up to the rounding of a few
# products per element; mixing across channels or a path around h breaks it by O(1).
SEPARABLE_RTOL_ULPS = 64


def head_candidates(modules: dict, structure: Structure) -> list[tuple[int, int]]:
    """``(site, readout site)`` pairs that may form a separable head.

    A site of a factorable rule (convolution, Linear) over several positions, called once
    and holding the only unit at that call, and the first later call reading one vector
    whose width is the site's number of channels.
    """
    sites = structure.sites
    sharing = Counter(k for u in structure.units for k in u.sites)
    pairs = []
    for unit in structure.units:
        if (len(unit.sites) != 1 or sharing[unit.sites[0]] > 1 or not unit.rule.factorable
                or unit.positions == 1):
            continue
        s = unit.sites[0]
        channels = unit.groups * unit.k_out
        for r in range(s + 1, len(sites)):
            if sites[r].rule.readout_width(modules[sites[r].module], sites[r]) == channels:
                pairs.append((s, r))
                break
    return pairs


def probe_heads(fm, params, sample, structure: Structure) -> tuple[tuple[int, int], ...]:
    """The candidate ``(site, readout site)`` pairs whose head is separable on ``sample``."""
    pairs = head_candidates(dict(fm.module.named_modules()), structure)
    if not pairs:
        return ()
    run = batched_forward(fm, {n: fast_layout(t) for n, t in params.items()}, sample, structure)
    if run is None:
        return ()
    heads = separable_heads(structure, run, pairs)
    return tuple((s, r) for s, (r, _) in heads.items())


def separable_heads(structure: Structure, run: Run, pairs) -> dict[int, tuple[int, torch.Tensor]]:
    """``{site s: (readout site r, U (N, *out))}`` for the separable heads among ``pairs``.

    Those ``(s, r)`` whose cotangents factor through the readout's input ``h`` (N, C) in
    ``run``.

    ``U`` is the vector-Jacobian product of ``Σ h`` at the site's output ``y``. The claim
    ``δ_i[c, t] = V_i[c] U[c, t]`` for every output ``i`` (``V_i`` the cotangent at ``h``)
    is checked for one random combination ``ρ`` of outputs per sample: the cotangent of
    ``Σ ρ·f`` at ``y`` must equal ``V_ρ[c] U[c, t]`` up to rounding. By linearity in ``ρ``
    that holds for every output, for all but a measure-zero set of ``ρ``, exactly when
    ``h_c`` depends on ``y`` through channel ``c`` alone (ReLU, BatchNorm, pooling over
    positions) and ``f`` depends on ``y`` only through ``h``; channel mixing (a convolution,
    LayerNorm, GroupNorm) or a path around ``h`` breaks it by far more than rounding.
    """
    found: dict[int, tuple[int, torch.Tensor]] = {}
    out = run.out
    gen = torch.Generator(device=out.device).manual_seed(0)
    rho = torch.randn(out.shape, generator=gen, dtype=out.dtype, device=out.device)
    for s, r in pairs:
        h, e = run.input(r), run.eps[s]
        if h is None or e is None or not h.requires_grad:
            continue
        site = structure.sites[s]
        with torch.enable_grad():
            u, _ = torch.autograd.grad(h, (e, h), torch.ones_like(h), retain_graph=True,
                                       allow_unused=True)
            d_rho, v_rho = torch.autograd.grad(out, (e, h), rho, retain_graph=True,
                                               allow_unused=True)
        if u is None or d_rho is None or v_rho is None:
            continue
        module = run.modules[site.module]
        u_raw = u
        u = site.rule.cotangents(module, site, u[:, None, None])[:, 0]  # (N, T, G, k_out)
        d_rho = site.rule.cotangents(module, site, d_rho[:, None, None])[:, 0]
        n, t = u.shape[:2]
        u_c, d_c, v_c = u.reshape(n, t, -1), d_rho.reshape(n, t, -1), v_rho.reshape(n, 1, -1)
        if u_c.shape[-1] != v_c.shape[-1]:
            continue
        err = (d_c - v_c * u_c).abs().amax(1)
        tol = SEPARABLE_RTOL_ULPS * torch.finfo(u.dtype).eps * v_c[:, 0].abs() * u_c.abs().amax(1)
        if bool((err <= tol).all()):
            found[s] = (r, u_raw)
    return found


def leaves_reached(root, stop) -> set[int]:
    """``id``s of the leaf tensors that ``root``'s backward reaches without ``stop``.

    ``stop`` is an autograd node; paths through it are not followed.
    """
    seen: set[int] = set()
    leaves: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or node is stop or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.add(id(variable))
        stack.extend(f for f, _ in node.next_functions)
    return leaves
