"""Per-layer rules of the structured engine: features, cotangents, and their contraction.

Every structured unit (see ``_structure.Unit``) has a per-sample gradient, output ``i``,

    g[a, i] = Σ_t D[a, i, t] ⊗ A[a, t]        A: (N, T, G, k_in), D: (N, O, T, G, k_out)

per group ``G`` (conv groups; channels of a norm layer), with ``A`` the layer's input
feature and ``D`` the cotangent of output ``i`` at the layer's output; a bias is a weight
on a constant input 1, so its gradient is ``Σ_t D[a, i, t]``. The weight's kernel block

    K[a, b, i, j] = Σ_g Σ_{t,s} (A[a,t,g] · A'[b,s,g]) (D[a,i,t,g] · D'[b,j,s,g])

(with ``A · A' + m_b²`` when the bias, of multiplier ``m_b``, is in the same block) is computed one of two ways,
whichever has fewer FLOPs (Novak et al. 2022, "Fast Finite Width Neural Tangent Kernel",
structured derivatives):

- ``"gram"``: the Gram matrix of inputs ``GA[a,b,g,t,s]``, then cotangent products; never
  forms a parameter-sized tensor. Cheapest for few positions (dense layers, ``T = 1``).
- ``"explicit"``: per-sample gradients ``(O, N, G·k_out·k_in)`` of this layer only, then
  their inner products. Cheapest when ``T²`` exceeds the layer's parameter count
  (convolutions on large images), and done in blocks of samples to bound memory.
- ``"factored"``, for a layer whose output reaches a later vector ``h`` channel by channel
  (a separable head, ``_capture.separable_heads``): there ``D[a, i, t, c] = V[a, i, c]
  U[a, t, c]`` over the output channels ``c``, so ``g[a, i, c, :] = V[a, i, c] M[a, c, :]``
  with ``M[a, c, :] = Σ_t U[a, t, c] A[a, t, g(c)]`` and

      K[a, b, i, j] = Σ_c V[a, i, c] V[b, j, c] (M[a, c] · M[b, c]),

  one ``M`` per sample instead of ``O`` gradients and no ``O²`` factor on the parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ntk_torch._engines._structure import Site, Unit, layer_sizes, scales

# ---------------------------------------------------------------------------------------
# Capture: what a hook keeps of a layer's input (runs inside vmap over samples).


def input_feature(kind: str, module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    """What the weight gradient needs from the layer's input at one call."""
    if kind == "layernorm":
        return F.layer_norm(inp, module.normalized_shape, None, None, module.eps)
    if kind == "groupnorm":
        return F.group_norm(inp, module.num_groups, None, None, module.eps)
    if kind == "batchnorm":
        shape = (1, -1) + (1,) * (inp.dim() - 2)
        mean = module.running_mean.view(shape)
        var = module.running_var.view(shape)
        return (inp - mean) / torch.sqrt(var + module.eps)
    if kind in ("linear", "conv"):  # unfolded later (conv), outside vmap
        multiplier = scales(module)[0]
        return inp if multiplier == 1.0 else multiplier * inp
    return inp  # embedding: the indices


# ---------------------------------------------------------------------------------------
# Layouts: captured tensors -> A (N, T, G, k) and D (N, O, T, G, k_out).


def features(site: Site, module: nn.Module, feat: torch.Tensor) -> torch.Tensor:
    """``(N, T, G, k_in)`` from the captured ``(N, *in_shape)`` (indices ``(N, T)`` for embeddings)."""
    n = feat.shape[0]
    positions, groups, k_in, _ = layer_sizes(module, site)
    if site.kind == "linear":
        return feat.reshape(n, positions, 1, k_in)
    if site.kind == "conv":
        return _patches(module, feat).reshape(n, positions, groups, k_in)
    if site.kind == "embedding":
        return feat.reshape(n, positions)
    if site.kind == "layernorm":
        return feat.reshape(n, positions, groups, 1)
    return feat.movedim(2, -1).reshape(n, positions, groups, 1)  # channels on dim 1 of a sample


def cotangents(site: Site, module: nn.Module, cot: torch.Tensor) -> torch.Tensor:
    """``(N, O, T, G, k_out)`` from the captured ``(N, O, *out_shape)``."""
    n, n_out = cot.shape[:2]
    positions, groups, _, k_out = layer_sizes(module, site)
    if site.kind == "conv":
        nd = len(module.kernel_size)
        c_out = module.out_channels
        cot = cot.reshape(n, n_out, -1, c_out, math.prod(site.out_shape[-nd:])).transpose(-1, -2)
        return cot.reshape(n, n_out, positions, groups, k_out)
    if site.kind in ("groupnorm", "batchnorm"):
        cot = cot.movedim(3, -1)
    return cot.reshape(n, n_out, positions, groups, k_out)


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(N, T, C·prod(kernel))`` receptive fields of every output position, in its order."""
    n = x.shape[0]
    nd = len(module.kernel_size)
    x = x.reshape(-1, *x.shape[-nd - 1:])  # (N·lead, C, *spatial)
    # The module pads like this (string padding included: _reversed_padding_repeated_twice
    # holds the asymmetric 'same' amounts); unfold pads symmetric zeros itself, without a copy.
    pads = _reversed_padding(module)  # last dimension first
    padding = tuple(pads[2 * i] for i in reversed(range(nd)))
    if module.padding_mode != "zeros" or pads[0::2] != pads[1::2]:
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pads, mode=mode)
        padding = (0,) * nd
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if nd == 1:
        x = x.unsqueeze(-2)
        kernel, dilation, stride, padding = (1, *kernel), (1, *dilation), (1, *stride), (0, *padding)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N·lead, Ck, L)
    return cols.reshape(n, -1, cols.shape[1], cols.shape[2]).transpose(-1, -2).reshape(n, -1, cols.shape[1])


def _reversed_padding(module: nn.Module) -> list[int]:
    """Amounts ``[left, right]`` per spatial dimension, last dimension first, as torch pads."""
    if hasattr(module, "_reversed_padding_repeated_twice"):
        return list(module._reversed_padding_repeated_twice)
    # ntk_torch.nn.Conv2d: stride and dilation 1; "same" pads k - 1 in all, the extra one
    # on the right (torch's convention), "valid" nothing.
    pads: list[int] = []
    for i in reversed(range(len(module.kernel_size))):
        k = module.kernel_size[i]
        if module.padding == "same":
            pads += [(k - 1) // 2, k - 1 - (k - 1) // 2]
        elif module.padding == "valid":
            pads += [0, 0]
        else:
            pads += [module.padding[i], module.padding[i]]
    return pads


def one_hot(indices: torch.Tensor, mask: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """``(N, T, 1, V)`` rows an embedding lookup reads; padding positions are zero."""
    return (F.one_hot(indices, vocab).to(dtype) * mask[..., None]).unsqueeze(2)


# ---------------------------------------------------------------------------------------
# Costs: FLOPs and working elements of each strategy for one block.


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
    return 2.0 * sides * unit.positions * c * k + 2.0 * pairs * c * (k + per_pair), pairs * c * (n_out + 1)


def choose_strategy(unit: Unit, n1: int, n2: int, symmetric: bool, n_out: int, mode: str,
                    factored: bool = False) -> str:
    """The cheapest strategy; ``"factored"`` competes where the unit has a separable head."""
    costs = strategy_costs(unit, n1, n2, symmetric, n_out, mode)
    if factored:
        costs["factored"] = factored_costs(unit, n1, n2, symmetric, n_out, mode)
    return min(costs, key=lambda s: costs[s][0])


# ---------------------------------------------------------------------------------------
# Contractions. ``a`` is the weight's feature (N, T, G, k_in), for embeddings a pair of
# (N, T) indices and masks, or None without a weight; ``d`` is (N, O, T, G, k_out).


def gram_of_inputs(unit: Unit, a1, a2, n1: int, n2: int, like: torch.Tensor) -> torch.Tensor:
    """``GA[a, b, g, t, s]`` of shape ``(N1, N2, G, T, T)``, plus 1 for a bias."""
    bias_gram = unit.bias_scale**2
    if unit.weight is None:
        return like.new_full((), bias_gram).expand(n1, n2, unit.groups, unit.positions, unit.positions)
    if unit.vocab:  # one-hot rows: the inner product is index equality
        (i1, m1), (i2, m2) = a1, a2
        same = (i1[:, None, :, None] == i2[None, :, None, :]) & (m1[:, None, :, None] & m2[None, :, None, :])
        ga = same.unsqueeze(2).to(like.dtype)
    elif a1.shape[1] == 1 and a1.shape[2] == 1:
        ga = (a1[:, 0, 0] @ a2[:, 0, 0].T)[:, :, None, None, None]
    else:
        ga = torch.einsum("atgk,bsgk->abgts", a1, a2)
    return ga + bias_gram if unit.bias is not None else ga


def gram_kernel(ga: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, mode: str) -> torch.Tensor:
    """Kernel from ``GA (N1, N2, G, T, T)`` and cotangents, never forming parameter-sized tensors."""
    n1, n_out, t, g, ko = d1.shape
    n2 = d2.shape[0]
    if t == 1 and g == 1:
        ga = ga.reshape(n1, n2)
        if mode == "full":
            gd = (d1.reshape(n1 * n_out, ko) @ d2.reshape(n2 * n_out, ko).T)
            return ga[:, :, None, None] * gd.view(n1, n_out, n2, n_out).permute(0, 2, 1, 3)
        if mode == "diagonal":
            gd = torch.bmm(d1.reshape(n1, n_out, ko).transpose(0, 1), d2.reshape(n2, n_out, ko).permute(1, 2, 0))
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
    """``(N, C, K)``: per output channel ``c``, ``M = Σ_t U[:, c, t] A[:, t, g(c)]`` (none
    without a weight), then ``m_b Σ_t U[:, c, t]`` for a bias (``bias_scale`` not None).

    ``feat`` is the captured input ``(N, 1, *in)`` and ``u`` the head's cotangent
    ``(N, *out)`` at the layer's output: ``M`` is the layer's weight gradient for the
    cotangent ``U``, per sample.
    """
    n = u.shape[0]
    d = cotangents(site, module, u[:, None, None])[:, 0]  # (N, T, G, k_out)
    g, channels = d.shape[2], d.shape[2] * d.shape[3]
    parts = []
    if feat is not None:
        a = features(site, module, feat)  # (N, T, G, k_in)
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
