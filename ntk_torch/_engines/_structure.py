"""Which parameters the structured engine can handle, found by one probed forward pass.

A parameter is *structured* when every use of it is the standard forward of a supported
layer (``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d``, ``nn.Embedding``, and the affine
parameters of ``nn.LayerNorm``/``nn.GroupNorm``/``nn.BatchNorm*`` in eval mode). Its
per-sample gradient is then ``Σ_t δ_t ⊗ a_t`` over the layer's positions ``t`` (and over
all calls of the layer), with ``a_t`` the layer's input feature and ``δ_t`` the cotangent
of one output at the layer's output. Everything else is *fallback* and goes through the
exact per-sample Jacobian.

The probe runs the model on one sample inside ``functional_call`` with forward hooks on
the candidate layers and a ``TorchFunctionMode`` that sees every operation touching a
parameter tensor: a use outside the owning layer's own call (a raw ``x @ lin.weight``,
``nn.MultiheadAttention``'s packed projections, a weight tied to a layer of another kind)
sends the parameter to the fallback, so the kernel stays exact for any model.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ntk_torch import nn as ntk_nn

_BATCHNORM = nn.modules.batchnorm._BatchNorm

# (class, kind, methods its standard forward consists of): a subclass that overrides any
# of them may compute something else with the same parameters, so it is not structured.
_SUPPORTED: tuple[tuple[type, str, tuple[str, ...]], ...] = (
    (nn.Linear, "linear", ("forward",)),
    (nn.Conv1d, "conv", ("forward", "_conv_forward")),
    (nn.Conv2d, "conv", ("forward", "_conv_forward")),
    (nn.Embedding, "embedding", ("forward",)),
    (nn.LayerNorm, "layernorm", ("forward",)),
    (nn.GroupNorm, "groupnorm", ("forward",)),
    (_BATCHNORM, "batchnorm", ("forward",)),
    # z = m·W x + m_b·b: the linear/conv rules with the input scaled by m and the bias's
    # constant input 1 replaced by m_b (see `scales`).
    (ntk_nn.Dense, "linear", ("forward",)),
    (ntk_nn.Conv2d, "conv", ("forward",)),
)


def scales(module: nn.Module) -> tuple[float, float]:
    """``(m, m_b)``: the weight's and the bias's multipliers in the layer's output."""
    if isinstance(module, (ntk_nn.Dense, ntk_nn.Conv2d)):
        return float(module.multiplier), float(module.bias_multiplier)
    return 1.0, 1.0


def layer_kind(module: nn.Module) -> str | None:
    """The structured rule that applies to ``module``, or None."""
    for cls, kind, methods in _SUPPORTED:
        if not isinstance(module, cls):
            continue
        if any(getattr(type(module), m) is not getattr(cls, m) for m in methods):
            return None
        if module._forward_hooks or getattr(module, "_forward_hooks_with_kwargs", None):
            return None  # a user hook may change the output the cotangent is taken at
        if kind == "embedding" and (module.max_norm is not None or module.scale_grad_by_freq):
            return None  # renormalises weights in place / rescales the gradient per batch
        if kind == "batchnorm" and (module.training or module.running_mean is None):
            return None  # batch statistics: not a per-sample layer
        return kind
    return None


@dataclass(frozen=True)
class Site:
    """One call of a structured layer.

    Attributes:
        module: qualified name of the layer.
        kind: its rule (``"linear"``, ``"conv"``, ``"embedding"``, ``"layernorm"``, ...).
        in_shape, out_shape: shapes of its input and output for one sample (as the layer
            sees them, with the model's batch dimension of size one where it has one).
        out_dtype: dtype of the output (the cotangent's dtype).
    """

    module: str
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    out_dtype: torch.dtype


@dataclass(frozen=True)
class Unit:
    """Structured parameters sharing their calls: one weight and/or one bias.

    The weight's per-sample gradient is ``Σ_t D_t ⊗ A_t`` with ``A_t`` of ``groups x k_in``
    (the layer's input feature) and ``D_t`` of ``groups x k_out`` (the cotangent), over
    ``positions`` positions per sample summed over all ``sites``; the bias's is ``Σ_t D_t``
    (a weight on a constant input 1).

    Attributes:
        kind: rule of the layers (all sites share it).
        weight, bias: selected parameter names (canonical), or None.
        sites: indices into :attr:`Structure.sites`, in call order.
        positions: ``T``, positions per sample over all sites.
        groups, k_in, k_out: block sizes as above (``k_in`` is 0 without a weight).
        vocab: rows of an embedding (its input feature is one-hot of this size), else 0.
        bias_scale: the bias's multiplier ``m_b`` (its gradient is ``m_b Σ_t D_t``).
    """

    kind: str
    weight: str | None
    bias: str | None
    sites: tuple[int, ...]
    positions: int
    groups: int
    k_in: int
    k_out: int
    vocab: int = 0
    bias_scale: float = 1.0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.weight, self.bias) if n is not None)

    @property
    def n_params(self) -> int:
        return self.groups * self.k_out * (self.k_in + (self.bias is not None))


@dataclass(frozen=True)
class Structure:
    """Result of the probe: structured units, fallback parameters and captured sizes.

    Attributes:
        sites: calls of layers that hold structured parameters, in call order.
        units: the structured parameter blocks.
        fallback: selected parameters handled by the exact per-sample Jacobian.
        fallback_params: their total number of entries.
        feature_elements: per sample, elements of the layer inputs kept (unfolded
            convolution patches counted at their unfolded size).
        cotangent_elements: per sample and output, elements of the layer-output cotangents.
        heads: ``(site, readout site)`` pairs where the site's output reaches the readout's
            input channel by channel on the probe (``_capture.separable_heads``): the
            site's unit may take the factored rule.
    """

    sites: tuple[Site, ...]
    units: tuple[Unit, ...]
    fallback: tuple[str, ...]
    fallback_params: int
    feature_elements: int
    cotangent_elements: int
    heads: tuple[tuple[int, int], ...] = ()


class _ParameterUses(TorchFunctionMode):
    """Records parameters used by an operation outside their owning layer's call."""

    def __init__(self, owners: dict[int, set[int]], stack: list[nn.Module]) -> None:
        super().__init__()
        self.owners = owners  # id(tensor) -> ids of the candidate layers holding it
        self.stack = stack
        self.foreign: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results, _ = tree_flatten(out)
        if any(isinstance(r, torch.Tensor) for r in results):  # .shape, .dim() are not uses
            inputs, _ = tree_flatten((args, kwargs or {}))
            current = id(self.stack[-1]) if self.stack else None
            for t in inputs:
                holders = self.owners.get(id(t)) if isinstance(t, torch.Tensor) else None
                if holders is not None and current not in holders:
                    self.foreign.add(id(t))
        return out


@contextmanager
def _hooks(modules: list[nn.Module], pre, post) -> Iterator[None]:
    with ExitStack() as stack:
        for m in modules:
            if pre is not None:
                stack.callback(m.register_forward_pre_hook(pre).remove)
            stack.callback(m.register_forward_hook(post).remove)
        yield


def discover(fm, params: dict[str, torch.Tensor], sample: torch.Tensor) -> Structure:
    """Probe ``fm`` on ``sample`` (one input, with its batch dimension) and split ``params``."""
    model = fm.module
    candidates = {name: m for name, m in model.named_modules() if layer_kind(m) is not None}
    names_of = {id(m): name for name, m in candidates.items()}
    aliases: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), name)
    # (layer, role) pairs holding each selected parameter, by canonical name.
    holders: dict[str, list[tuple[str, str]]] = {}
    for lname, m in candidates.items():
        for role in ("weight", "bias"):
            p = m._parameters.get(role)
            if p is not None and aliases[id(p)] in params:
                holders.setdefault(aliases[id(p)], []).append((lname, role))

    owners = {id(params[n]): {id(candidates[l]) for l, _ in hs} for n, hs in holders.items()}
    stack: list[nn.Module] = []
    calls: list[tuple[str, tuple[int, ...], tuple[int, ...], torch.dtype]] = []
    unusable: set[str] = set()

    def pre(module, args):
        stack.append(module)

    def post(module, args, output):
        stack.pop()
        inp = args[0] if args else None
        if isinstance(inp, torch.Tensor) and isinstance(output, torch.Tensor):
            calls.append((names_of[id(module)], tuple(inp.shape), tuple(output.shape), output.dtype))
        else:  # called in a way the rules do not cover: keyword input, tuple output
            calls.append((names_of[id(module)], (), (), torch.float32))
            unusable.add(names_of[id(module)])

    uses = _ParameterUses(owners, stack)
    with torch.no_grad(), _hooks(list(candidates.values()), pre, post), uses:
        fm(params, sample)

    structured: dict[str, list[tuple[str, str]]] = {}
    for name, hs in holders.items():
        kinds = {layer_kind(candidates[l]) for l, _ in hs}
        roles = {r for _, r in hs}
        multipliers = {scales(candidates[l]) for l, _ in hs}
        if (id(params[name]) in uses.foreign or len(kinds) > 1 or len(roles) > 1 or len(multipliers) > 1
                or any(l in unusable for l, _ in hs)
                or not any(c[0] == l for c in calls for l, _ in hs)):
            continue  # mixed kinds, raw use, or never called: the generic engine is exact
        structured[name] = hs

    # A weight and a bias held by exactly the same layers share their sites: one unit.
    by_layers: dict[tuple[str, ...], dict[str, str]] = {}
    for name, hs in structured.items():
        layers = tuple(sorted(l for l, _ in hs))
        by_layers.setdefault(layers, {})[hs[0][1]] = name
    needed = {l for layers in by_layers for l in layers}
    site_calls = [c for c in calls if c[0] in needed]
    sites = tuple(Site(l, layer_kind(candidates[l]), i, o, d) for l, i, o, d in site_calls)

    units = []
    for layers, roles in by_layers.items():
        idx = tuple(k for k, s in enumerate(sites) if s.module in layers)
        units.append(_unit(candidates, sites, idx, roles.get("weight"), roles.get("bias")))

    done = {n for u in units for n in u.names}
    fallback = tuple(n for n in params if n not in done)
    features = sum(_feature_elements(candidates[s.module], s) for s in sites)
    cotangents = sum(math.prod(s.out_shape) for s in sites)
    structure = Structure(sites=sites, units=tuple(units), fallback=fallback,
                          fallback_params=sum(params[n].numel() for n in fallback),
                          feature_elements=features, cotangent_elements=cotangents)
    pairs = _head_candidates(candidates, structure)
    if not pairs:
        return structure
    from ntk_torch._engines._capture import probe_heads  # it builds on this module

    return replace(structure, heads=probe_heads(fm, params, sample, structure, pairs))


def _head_candidates(layers: dict[str, nn.Module], structure: Structure) -> list[tuple[int, int]]:
    """``(site, readout site)`` pairs that may form a separable head: a convolution or a
    Linear over positions, called once and holding the only unit at that call, and the first
    later Linear call on one position whose input size is the site's number of channels."""
    sites = structure.sites
    sharing = Counter(k for u in structure.units for k in u.sites)
    pairs = []
    for unit in structure.units:
        if (len(unit.sites) != 1 or sharing[unit.sites[0]] > 1 or unit.kind not in ("linear", "conv")
                or unit.positions == 1):
            continue
        s = unit.sites[0]
        channels = unit.groups * unit.k_out
        for r in range(s + 1, len(sites)):
            module = layers[sites[r].module]
            if (sites[r].kind == "linear" and layer_sizes(module, sites[r])[0] == 1
                    and module.in_features == channels):
                pairs.append((s, r))
                break
    return pairs


def layer_sizes(module: nn.Module, site: Site) -> tuple[int, int, int, int]:
    """``(positions, groups, k_in, k_out)`` of one call, ``k_in`` without a bias column."""
    kind = site.kind
    numel = math.prod(site.in_shape)
    if kind == "linear":
        return numel // module.in_features, 1, module.in_features, module.out_features
    if kind == "conv":
        nd = len(module.kernel_size)
        lead = math.prod(site.in_shape[: len(site.in_shape) - nd - 1])
        positions = lead * math.prod(site.out_shape[-nd:])
        g = module.groups
        return positions, g, module.in_channels // g * math.prod(module.kernel_size), module.out_channels // g
    if kind == "embedding":
        return numel, 1, module.num_embeddings, module.embedding_dim
    if kind == "layernorm":
        c = math.prod(module.normalized_shape)
    else:  # groupnorm, batchnorm: channels on dimension 1
        c = site.in_shape[1]
    return numel // c, c, 1, 1


def _feature_elements(module: nn.Module, site: Site) -> int:
    positions, groups, k_in, _ = layer_sizes(module, site)
    if site.kind == "embedding":
        return positions  # the indices
    return positions * groups * k_in


def _unit(layers: dict[str, nn.Module], sites: tuple[Site, ...], idx: tuple[int, ...],
          weight: str | None, bias: str | None) -> Unit:
    kind = sites[idx[0]].kind
    module = layers[sites[idx[0]].module]
    positions = 0
    for k in idx:  # tied layers share the parameter's shape, so groups and k agree
        t, groups, k_in, k_out = layer_sizes(layers[sites[k].module], sites[k])
        positions += t
    if weight is None:
        k_in = 0
    vocab = module.num_embeddings if kind == "embedding" else 0
    return Unit(kind=kind, weight=weight, bias=bias, sites=idx, positions=positions,
                groups=groups, k_in=k_in, k_out=k_out, vocab=vocab, bias_scale=scales(module)[1])
