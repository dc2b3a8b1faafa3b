"""The structured engine's contractions: kernel blocks from layer inputs and cotangents.

Every structured unit (see ``_structure.Unit``) has a per-sample gradient, output ``i``,

    g[a, i] = Σ_t D[a, i, t] ⊗ A[a, t]        A: (N, T, G, k_in), D: (N, O, T, G, k_out)

per group ``G`` (conv groups; channels of a norm layer), with ``A`` the layer's input
feature and ``D`` the cotangent of output ``i`` at the layer's output (their layouts come
from the layer's rule, ``_layers``); a bias is a weight on a constant input 1, so its
gradient is ``Σ_t D[a, i, t]``. The weight's kernel block

    K[a, b, i, j] = Σ_g Σ_{t,s} (A[a,t,g] · A'[b,s,g]) (D[a,i,t,g] · D'[b,j,s,g])

(with ``A · A' + m_b²`` when the bias, of multiplier ``m_b``, is in the same block) is
computed by the strategy the plan gives (``_plan``):

- ``"gram"``: the Gram matrix of inputs ``GA[a,b,g,t,s]``, then cotangent products.
- ``"explicit"``: per-sample gradients ``(O, N, G·k_out·k_in)`` of this unit only, then
  their inner products, in blocks of samples that bound memory (or streamed during the
  capture, :class:`Streamed`).
- ``"factored"``, for a layer whose output reaches a later vector ``h`` channel by channel
  (a separable head, ``_heads``): there ``D[a, i, t, c] = V[a, i, c] U[a, t, c]`` over the
  output channels ``c``, so ``g[a, i, c, :] = V[a, i, c] M[a, c, :]`` with
  ``M[a, c, :] = Σ_t U[a, t, c] A[a, t, g(c)]`` and

      K[a, b, i, j] = Σ_c V[a, i, c] V[b, j, c] (M[a, c] · M[b, c]),

  one ``M`` per sample instead of ``O`` gradients and no ``O²`` factor on the parameters.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from ntk_torch._engines._layers import Site
from ntk_torch._engines._plan import strategy_costs
from ntk_torch._engines._structure import Structure, Unit


def one_hot(indices: torch.Tensor, mask: torch.Tensor, vocab: int,
            dtype: torch.dtype) -> torch.Tensor:
    """``(N, T, 1, V)`` rows an embedding lookup reads; padding positions are zero."""
    return (F.one_hot(indices, vocab).to(dtype) * mask[..., None]).unsqueeze(2)


# ---------------------------------------------------------------------------------------
# Contractions. ``a`` is the weight's feature (N, T, G, k_in), for embeddings a pair of
# (N, T) indices and masks, or None without a weight; ``d`` is (N, O, T, G, k_out).


def gram_of_inputs(unit: Unit, a1, a2, n1: int, n2: int, like: torch.Tensor) -> torch.Tensor:
    """``GA[a, b, g, t, s]`` of shape ``(N1, N2, G, T, T)``, plus 1 for a bias."""
    bias_gram = unit.bias_scale**2
    if unit.weight is None:
        t = unit.positions
        return like.new_full((), bias_gram).expand(n1, n2, unit.groups, t, t)
    if unit.vocab:  # one-hot rows: the inner product is index equality
        (i1, m1), (i2, m2) = a1, a2
        same = ((i1[:, None, :, None] == i2[None, :, None, :])
                & (m1[:, None, :, None] & m2[None, :, None, :]))
        ga = same.unsqueeze(2).to(like.dtype)
    elif a1.shape[1] == 1 and a1.shape[2] == 1:
        ga = (a1[:, 0, 0] @ a2[:, 0, 0].T)[:, :, None, None, None]
    else:
        ga = torch.einsum("atgk,bsgk->abgts", a1, a2)
    return ga + bias_gram if unit.bias is not None else ga


def gram_kernel(ga: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, mode: str) -> torch.Tensor:
    """Kernel from ``GA (N1, N2, G, T, T)`` and cotangents, with no parameter-sized tensor."""
    n1, n_out, t, g, ko = d1.shape
    n2 = d2.shape[0]
    if t == 1 and g == 1:
        ga = ga.reshape(n1, n2)
        if mode == "full":
            gd = (d1.reshape(n1 * n_out, ko) @ d2.reshape(n2 * n_out, ko).T)
            return ga[:, :, None, None] * gd.view(n1, n_out, n2, n_out).permute(0, 2, 1, 3)
        if mode == "diagonal":
            gd = torch.bmm(d1.reshape(n1, n_out, ko).transpose(0, 1),
                           d2.reshape(n2, n_out, ko).permute(1, 2, 0))
            return ga[:, :, None] * gd.permute(1, 2, 0)
        return ga * (d1.reshape(n1, -1) @ d2.reshape(n2, -1).T) / n_out
    if mode == "full":
        m = torch.einsum("abgts,bjsgo->abgtjo", ga, d2)
        return torch.einsum("aitgo,abgtjo->abij", d1, m)
    if mode == "diagonal":
        m = torch.einsum("abgts,bisgo->abgtio", ga, d2)
        return torch.einsum("aitgo,abgtio->abi", d1, m)
    gd = torch.einsum("aitgo,bisgo->abgts", d1, d2)
    return (ga * gd).sum((2, 3, 4)) / n_out


def weight_gradients(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``(O, N, G·k_out·k_in)``: per-sample weight gradients ``Σ_t D[a,i,t] ⊗ A[a,t]``.

    With one group, one batched matrix product per output on strided views of ``d``
    (whatever its memory layout, BLAS reads it transposed or not, without a copy).
    """
    n, n_out, _, g, ko = d.shape
    ki = a.shape[-1]
    if g == 1:
        out = d.new_empty(n_out, n, ko, ki)
        for i in range(n_out):
            torch.bmm(d[:, i, :, 0, :].transpose(1, 2), a[:, :, 0, :], out=out[i])
        return out.view(n_out, n, ko * ki)
    return torch.einsum("aitgo,atgk->iagok", d, a).reshape(n_out, n, g * ko * ki)


def factored_features(site: Site, module: nn.Module, feat: torch.Tensor | None, u: torch.Tensor,
                      bias_scale: float | None) -> torch.Tensor:
    """``(N, C, K)`` per-channel moments of the factored rule.

    Per output channel ``c``, ``M = Σ_t U[:, c, t] A[:, t, g(c)]`` (none without a weight),
    then ``m_b Σ_t U[:, c, t]`` for a bias (``bias_scale`` not None).

    ``feat`` is the captured input ``(N, 1, *in)`` and ``u`` the head's cotangent
    ``(N, *out)`` at the layer's output: ``M`` is the layer's weight gradient for the
    cotangent ``U``, per sample.
    """
    n = u.shape[0]
    d = site.rule.cotangents(module, site, u[:, None, None])[:, 0]  # (N, T, G, k_out)
    g, channels = d.shape[2], d.shape[2] * d.shape[3]
    parts = []
    if feat is not None:
        a = site.rule.features(module, site, feat)  # (N, T, G, k_in)
        if g == 1:
            parts.append(torch.bmm(d[:, :, 0, :].transpose(1, 2), a[:, :, 0, :]))
        else:
            parts.append(torch.einsum("atgo,atgk->agok", d, a).reshape(n, channels, -1))
    if bias_scale is not None:
        parts.append(bias_scale * d.sum(1).reshape(n, channels, 1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def factored_kernel(f1: torch.Tensor, v1: torch.Tensor, f2: torch.Tensor, v2: torch.Tensor,
                    mode: str) -> torch.Tensor:
    """Kernel from per-channel features ``F (N, C, K)`` and head cotangents ``V (N, O, C)``."""
    g = torch.bmm(f1.transpose(0, 1), f2.permute(1, 2, 0)).permute(1, 2, 0)  # (N1, N2, C)
    if mode == "full":
        return torch.einsum("abc,aic,bjc->abij", g, v1, v2)
    if mode == "diagonal":
        return torch.einsum("abc,aic,bic->abi", g, v1, v2)
    return torch.einsum("abc,aic,bic->ab", g, v1, v2) / v1.shape[1]


def bias_gradients(d: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``(O, N, G·k_out)``: per-sample bias gradients ``m_b Σ_t D[a,i,t]``."""
    n, n_out = d.shape[:2]
    g = d.sum(2).transpose(0, 1).reshape(n_out, n, -1)
    return g if scale == 1.0 else scale * g


def explicit_kernel(ja: torch.Tensor, jb: torch.Tensor, mode: str) -> torch.Tensor:
    """Kernel from outputs-first per-sample gradients ``ja (O, N1, p)``, ``jb (O, N2, p)``."""
    n_out, n1, _ = ja.shape
    n2 = jb.shape[1]
    if mode == "full":
        k = ja.reshape(n_out * n1, -1) @ jb.reshape(n_out * n2, -1).T
        return k.view(n_out, n1, n_out, n2).permute(1, 3, 0, 2)
    k = torch.bmm(ja, jb.transpose(1, 2))  # (O, N1, N2)
    return k.permute(1, 2, 0) if mode == "diagonal" else k.sum(0) / n_out


# ---------------------------------------------------------------------------------------
# One unit.


def unit_tensors(unit: Unit, structure: Structure, modules, feats, cots):
    """Weight features ``A`` and cotangents ``D``, concatenated over the unit's sites.

    ``A`` is a pair of indices and masks for an embedding, None without a weight.
    """
    a_parts, d_parts = [], []
    for k in unit.sites:
        site = structure.sites[k]
        module = modules[site.module]
        d_parts.append(site.rule.cotangents(module, site, cots[k]))
        if unit.weight is not None:
            a_parts.append(site.rule.features(module, site, feats[k]))
    d = torch.cat(d_parts, dim=2) if len(d_parts) > 1 else d_parts[0]
    if not a_parts:
        return None, d
    if unit.vocab:
        return (_cat([p[0] for p in a_parts]), _cat([p[1] for p in a_parts])), d
    return _cat(a_parts), d


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _rows(a, start: int, stop: int | None):
    if a is None:
        return None
    if isinstance(a, tuple):
        return tuple(t[start:stop] for t in a)
    return a[start:stop]


def unit_kernel(unit: Unit, strategy: str, a1, d1, a2, d2, mode: str, symmetric: bool,
                work_elements: float) -> torch.Tensor:
    """Block of ``unit`` by ``strategy`` (``"gram"`` or ``"explicit"``).

    From the unit's tensors (:func:`unit_tensors`), in blocks of samples whose working set
    fits ``work_elements``.
    """
    n_out, n1, n2 = d1.shape[1], d1.shape[0], d2.shape[0]
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


def factored_blocks(f1: torch.Tensor, v1: torch.Tensor, f2: torch.Tensor, v2: torch.Tensor,
                    mode: str, work_elements: float) -> torch.Tensor:
    """The factored rule (a separable head), in blocks of rows of x1 that fit the budget.

    From per-channel features ``f (N, C, K)`` and head cotangents ``v (N, O, C)``.
    """
    n1, n2, n_out, c = f1.shape[0], f2.shape[0], v1.shape[1], v1.shape[2]
    step = max(1, int(work_elements // (n2 * c * (n_out + 1))))
    blocks = [factored_kernel(f1[r : r + step], v1[r : r + step], f2, v2, mode)
              for r in range(0, n1, step)]
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
            bb = ba if rb is None else bias_gradients(d2[rb], unit.bias_scale)
            kb = explicit_kernel(ba, bb, mode)
            k = kb if k is None else k + kb
        return k

    if work <= work_elements:
        return kernel(slice(None), None if symmetric else slice(None))
    per_sample = work / (n1 + (0 if symmetric else n2))
    step = max(1, int(work_elements // (2 * per_sample)))
    return torch.cat([
        torch.cat([kernel(slice(r, r + step), slice(c, c + step)) for c in range(0, n2, step)],
                  dim=1)
        for r in range(0, n1, step)
    ])


def _weight_grads(unit: Unit, a, d, rows: slice) -> torch.Tensor:
    if unit.vocab:
        idx, mask = a
        dense = one_hot(idx[rows], mask[rows], unit.vocab, d.dtype)
    else:
        dense = a[rows]
    return weight_gradients(dense, d[rows])


# ---------------------------------------------------------------------------------------
# Streamed per-sample gradients.


class Streamed:
    """Per-sample gradients ``(O, N, ·)`` of one explicit unit, filled output by output.

    They are made from the cotangents as the batched capture produces them, which are
    then never kept whole.

    The weight's entries are in (k_in, k_out) order here, a layout of their own: only
    inner products between these gradients are taken.
    """

    def __init__(self, unit: Unit, site: Site, module: nn.Module, feat: torch.Tensor,
                 n_out: int) -> None:
        self.unit, self.site, self.module = unit, site, module
        n = feat.shape[0]
        a = site.rule.features(module, site, feat) if unit.weight is not None else None
        # One group: (N, k_in, T) @ (N, T, k_out) per output, BLAS's favourite layout.
        self.a = a if a is None or unit.groups > 1 else a[:, :, 0, :].transpose(1, 2).contiguous()
        width = unit.groups * unit.k_out
        self.w = feat.new_empty(n_out, n, width * unit.k_in) if a is not None else None
        self.b = feat.new_empty(n_out, n, width) if unit.bias is not None else None

    def add(self, i: int, g: torch.Tensor) -> None:
        """Output ``i``'s gradients from its cotangents ``g (N, 1, 1, *out)``."""
        d = self.site.rule.cotangents(self.module, self.site, g)  # (N, 1, T, G, k_out)
        if self.w is not None and self.unit.groups == 1:
            torch.bmm(self.a, d[:, 0, :, 0, :], out=self.w[i].view(d.shape[0], self.unit.k_in, -1))
        elif self.w is not None:
            self.w[i] = weight_gradients(self.a, d)[0]
        if self.b is not None:
            self.b[i] = bias_gradients(d, self.unit.bias_scale)[0]

    def gradients(self) -> Gradients:
        return Gradients(self.w, self.b)


class Gradients(NamedTuple):
    """Per-sample gradients ``(O, N, ·)`` of one streamed unit's weight and bias (or None)."""

    w: torch.Tensor | None
    b: torch.Tensor | None

    def rows(self, start: int, stop: int | None) -> Gradients:
        return Gradients(*(None if j is None else j[:, start:stop] for j in self))

    def kernel(self, part: Unit, other: Gradients, mode: str) -> torch.Tensor:
        """Block of ``part`` (the unit, or its weight or bias alone) against ``other``'s samples."""
        k = 0
        for name, ja, jb in ((part.weight, self.w, other.w), (part.bias, self.b, other.b)):
            if name is not None:
                k = k + explicit_kernel(ja, jb, mode)
        return k
