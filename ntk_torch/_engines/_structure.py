"""Which parameters the structured engine can handle, found by one probed forward pass.

A parameter is *structured* when every use of it is the standard forward of a layer with
a rule (``_layers``: ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d``, ``nn.Embedding``, GPT-2's
``Conv1D``, the packed projections of ``nn.MultiheadAttention`` in self-attention, the two
weight pairs of ``nn.LSTMCell``/``nn.GRUCell``/``nn.RNNCell`` and of every layer and
direction of ``nn.LSTM``/``nn.GRU``/``nn.RNN``, and the affine parameters
of ``nn.LayerNorm``/``nn.GroupNorm``/``nn.BatchNorm*`` in eval mode). Its
per-sample gradient is then ``Σ_t δ_t ⊗ a_t`` over the layer's positions ``t`` (and over
all calls of the layer), with ``a_t`` the layer's input feature and ``δ_t`` the cotangent
of one output at the layer's output. Everything else is *fallback* and goes through the
exact per-sample Jacobian.

The probe runs the model on one sample inside ``functional_call`` with forward hooks on
the candidate layers and a ``TorchFunctionMode`` that sees every operation touching a
parameter tensor: a use outside the owning layer's own call (a raw ``x @ lin.weight``,
``nn.MultiheadAttention``'s projections in cross-attention, a weight tied to a layer of
another kind) sends the parameter to the fallback, so the kernel stays exact for any model.
A rule whose layers are recognised by class name, or whose interception replaces a fused
computation, also checks on the probe that the call computed what it assumes
(``LayerRule.verify``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ntk_torch._engines._layers import LayerRule, Site, layer_calls, rule_for


@dataclass(frozen=True)
class Unit:
    """Structured parameters sharing their calls: one weight and/or one bias.

    The weight's per-sample gradient is ``Σ_t D_t ⊗ A_t`` with ``A_t`` of ``groups x k_in``
    (the layer's input feature) and ``D_t`` of ``groups x k_out`` (the cotangent), over
    ``positions`` positions per sample summed over all ``sites``; the bias's is ``Σ_t D_t``
    (a weight on a constant input 1).

    Attributes:
        rule: rule of the layers (all sites share it).
        weight, bias: selected parameter names (canonical), or None.
        sites: indices into :attr:`Structure.sites`, in call order.
        positions: ``T``, positions per sample over all sites.
        groups, k_in, k_out: block sizes as above (``k_in`` is 0 without a weight).
        vocab: rows of an embedding (its input feature is one-hot of this size), else 0.
        bias_scale: the bias's multiplier ``m_b`` (its gradient is ``m_b Σ_t D_t``).
    """

    rule: LayerRule
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
        n_out: ``O``, flattened outputs per sample.
        heads: ``(site, readout site)`` pairs where the site's output reaches the readout's
            input channel by channel on the probe (``_heads``): the site's unit may take the
            factored rule.
        extra_flops: per sample, FLOPs that the rules' interceptions add to a forward pass
            (``LayerRule.extra_flops``).
        routed: layers whose rule intercepts their calls (not a plain forward hook), that
            ran intercepted in the probe and passed ``verify``, sites or not: every pass
            intercepts them alike.
    """

    sites: tuple[Site, ...]
    units: tuple[Unit, ...]
    fallback: tuple[str, ...]
    fallback_params: int
    feature_elements: int
    cotangent_elements: int
    n_out: int
    heads: tuple[tuple[int, int], ...] = ()
    extra_flops: float = 0.0
    routed: tuple[str, ...] = ()


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
def _call_stack(modules: list[nn.Module], stack: list[nn.Module]) -> Iterator[None]:
    """Keeps ``stack`` holding the modules whose forward is running, innermost last."""
    def enter(module, args) -> None:
        stack.append(module)

    def leave(module, args, output) -> None:  # returns None: the output stays as it is
        stack.pop()

    with ExitStack() as hooks:
        for m in modules:
            hooks.callback(m.register_forward_pre_hook(enter).remove)
            hooks.callback(m.register_forward_hook(leave).remove)
        yield


def discover(fm, params: dict[str, torch.Tensor], sample: torch.Tensor) -> Structure:
    """Probe ``fm`` on ``sample`` (one input, with its batch dimension) and split ``params``.

    Separable heads are found apart, by ``_heads.probe_heads``.
    """
    model = fm.module
    rules = {name: rule for name, m in model.named_modules() if (rule := rule_for(m)) is not None}
    candidates = {name: m for name, m in model.named_modules() if name in rules}
    names_of = {id(m): name for name, m in candidates.items()}
    aliases: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), name)
    # (layer, pair, role) holding each selected parameter, by canonical name; a layer's
    # pairs (``LayerRule.pairs``) meet different inputs, so they count as layers apart.
    holders: dict[str, list[tuple[str, int, str]]] = {}
    for lname, m in candidates.items():
        for pair, attributes in enumerate(rules[lname].pairs(m)):
            for role, attribute in zip(("weight", "bias"), attributes):
                p = m._parameters.get(attribute)
                if p is not None and aliases[id(p)] in params:
                    holders.setdefault(aliases[id(p)], []).append((lname, pair, role))

    owners = {id(params[n]): {id(candidates[layer]) for layer, _, _ in hs}
              for n, hs in holders.items()}
    stack: list[nn.Module] = []
    calls: list[tuple[str, int, tuple[int, ...], tuple[int, ...], torch.dtype]] = []
    unusable: set[str] = set()

    def record(module, args, output, pair=0):
        name = names_of[id(module)]
        inp = args[0] if args else None
        if (isinstance(inp, torch.Tensor) and isinstance(output, torch.Tensor)
                and rules[name].verify(module, args, output, pair)):
            calls.append((name, pair, tuple(inp.shape), tuple(output.shape), output.dtype))
        else:  # called in a way the rules do not cover: keyword input, tuple output
            calls.append((name, pair, (), (), torch.float32))
            unusable.add(name)
        return output

    # Only layers that hold selected parameters are run through their rules, and fused RNN
    # modules whatever they hold: vmap can batch them unrolled, not their fused call. A rule's own
    # interception (attention's projections as layer calls) changes which calls other
    # layers see: the engine's passes intercept the same layers (``routed``).
    holding = {layer for hs in holders.values() for layer, _, _ in hs}
    holding |= {name for name, m in candidates.items() if isinstance(m, nn.RNNBase)}
    by_rule: dict[LayerRule, list[nn.Module]] = {}
    for name, m in candidates.items():
        if name in holding:
            by_rule.setdefault(rules[name], []).append(m)
    uses = _ParameterUses(owners, stack)
    # Entered in this order: a rule's own interception runs above the use check, whose
    # operations it may perform (in the layer's name), and ``record`` runs before the call
    # stack pops the layer, so that what ``verify`` computes is the layer's own use.
    with (torch.no_grad(), uses, layer_calls(by_rule, record),
          _call_stack(list(candidates.values()), stack)):
        out = fm(params, sample)
    # A layer whose call failed ``verify`` is not intercepted again: its parameters fall
    # back, computed by the module itself. (The interceptions that can fail ``verify``, the
    # recurrent ones', leave the calls of other layers as they are.) Nor is a layer whose
    # calls the rule never intercepted (an RNN on packed sequences).
    called = {(name, pair) for name, pair, *_ in calls}
    routed = tuple(name for name in candidates if name in holding and name not in unusable
                   and any(layer == name for layer, _ in called)
                   and rules[name].mode is not None)

    structured: dict[str, list[tuple[str, int, str]]] = {}
    for name, hs in holders.items():
        kinds = {rules[layer] for layer, _, _ in hs}
        roles = {r for _, _, r in hs}
        multipliers = {rules[layer].scales(candidates[layer]) for layer, _, _ in hs}
        if (id(params[name]) in uses.foreign or len(kinds) > 1 or len(roles) > 1
                or len(multipliers) > 1
                or any(layer in unusable for layer, _, _ in hs)
                or not any((layer, pair) in called for layer, pair, _ in hs)):
            continue  # mixed kinds, raw use, or never called: the generic engine is exact
        structured[name] = hs

    # A weight and a bias held by exactly the same (layer, pair)s share their sites: one unit.
    by_layers: dict[tuple[tuple[str, int], ...], dict[str, str]] = {}
    for name, hs in structured.items():
        layers = tuple(sorted((layer, pair) for layer, pair, _ in hs))
        by_layers.setdefault(layers, {})[hs[0][2]] = name
    needed = {layer for layers in by_layers for layer in layers}
    sites = tuple(Site(name, rules[name], i, o, d, pair)
                  for name, pair, i, o, d in calls if (name, pair) in needed)

    units = []
    for layers, roles in by_layers.items():
        idx = tuple(k for k, s in enumerate(sites) if (s.module, s.pair) in layers)
        units.append(_unit(candidates, sites, idx, roles.get("weight"), roles.get("bias")))

    done = {n for u in units for n in u.names}
    fallback = tuple(n for n in params if n not in done)
    features = sum(s.rule.feature_elements(candidates[s.module], s) for s in sites)
    cotangents = sum(math.prod(s.out_shape) for s in sites)
    extra = sum(s.rule.extra_flops(candidates[s.module], s) for s in sites)
    return Structure(sites=sites, units=tuple(units), fallback=fallback,
                     fallback_params=sum(params[n].numel() for n in fallback),
                     feature_elements=features, cotangent_elements=cotangents,
                     n_out=int(out[0].numel()), extra_flops=extra, routed=routed)


def _unit(layers: dict[str, nn.Module], sites: tuple[Site, ...], idx: tuple[int, ...],
          weight: str | None, bias: str | None) -> Unit:
    rule = sites[idx[0]].rule
    module = layers[sites[idx[0]].module]
    positions = 0
    for k in idx:  # tied layers share the parameter's shape, so groups and k agree
        t, groups, k_in, k_out = rule.sizes(layers[sites[k].module], sites[k])
        positions += t
    if weight is None:
        k_in = 0
    return Unit(rule=rule, weight=weight, bias=bias, sites=idx, positions=positions, groups=groups,
                k_in=k_in, k_out=k_out, vocab=rule.vocab(module), bias_scale=rule.scales(module)[1])
