"""Forward passes with hooks on the structured layers' calls.

At the ``k``-th call of a structured layer (``_structure.Site`` ``k``) a hook keeps the
layer's input feature (its rule's ``input_feature``) and adds a tensor to its output: a
zero leaf whose gradient is the cotangent at that output. ``batched_forward`` runs the
whole batch this way (:class:`Run`); the per-sample capture uses :func:`site_hooks` under
``vmap``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch

from ntk_torch import _inputs
from ntk_torch._engines._layers import layer_calls, rule_for
from ntk_torch._engines._structure import Structure


class _NotBatched(Exception):
    """A layer call without the model's batch as its first dimension."""


@contextmanager
def site_hooks(modules, structure: Structure, perturb, feats, inputs=None, outputs=None):
    """Hooks that keep the k-th call's input feature and return ``output + perturb(k, output)``.

    ``inputs``/``outputs`` get that input and returned tensor with their version counters.
    The ``structure.routed`` layers without sites are intercepted as in the probe, their
    outputs left as they are.
    """
    sites = structure.sites
    calls = iter(range(len(sites)))
    site_layers = {id(modules[s.module]) for s in sites}
    site_pairs = {(id(modules[s.module]), s.pair) for s in sites}

    def hook(module, args, output, pair=0):
        if (id(module), pair) not in site_pairs:
            return output
        k = next(calls)
        site = sites[k]
        if modules[site.module] is not module or site.pair != pair:
            raise RuntimeError(
                f"the structured engine saw layer calls in a different order than when it probed "
                f"the model (expected {site.module!r}); the model's control flow depends on its "
                "inputs: use implementation='jacobian'"
            )
        with torch.no_grad():
            feats[k] = site.rule.input_feature(module, args[0].detach())
        result = output + perturb(k, output)
        if inputs is not None:
            # With the versions at this point: an in-place operation later (LeakyReLU(inplace=True)
            # on the layer's output) changes what the tensor holds and its autograd node.
            inputs[k], outputs[k] = (args[0], args[0]._version), (result, result._version)
        return result

    by_rule: dict = {}
    for s in sites:
        layers = by_rule.setdefault(s.rule, [])
        if all(m is not modules[s.module] for m in layers):
            layers.append(modules[s.module])
    for name in structure.routed:
        if id(modules[name]) not in site_layers:
            by_rule.setdefault(rule_for(modules[name]), []).append(modules[name])
    with layer_calls(by_rule, hook):
        yield


def routed_calls(modules: dict, names) -> AbstractContextManager:
    """The routed layers ``names``' calls intercepted as in every pass, outputs left as is."""
    by_rule: dict = {}
    for name in names:
        by_rule.setdefault(rule_for(modules[name]), []).append(modules[name])
    return layer_calls(by_rule, lambda module, args, output, pair=0: output)


def fast_layout(t: torch.Tensor) -> torch.Tensor:
    """Same values; 2-d convolution weights in channels-last layout.

    oneDNN then runs the convolutions and, above all, the transposed convolutions of the
    backward pass in channels-last, several times faster on CPU for the cotangents.
    """
    if t.dim() == 4 and t.device.type == "cpu":
        return t.contiguous(memory_format=torch.channels_last)
    return t


@dataclass
class Run:
    """A batched forward with zero leaves ``eps`` added to the sites' outputs."""

    out: torch.Tensor
    eps: list[torch.Tensor]
    feats: list[torch.Tensor]
    inputs: list[tuple[torch.Tensor, int]]
    outputs: list[tuple[torch.Tensor, int]]
    modules: dict

    def input(self, k: int) -> torch.Tensor | None:
        """Site ``k``'s input, None if an in-place operation changed it after the call."""
        t, version = self.inputs[k]
        return t if t._version == version else None

    def output(self, k: int) -> torch.Tensor | None:
        """Site ``k``'s output, None if an in-place operation changed it after the call."""
        t, version = self.outputs[k]
        return t if t._version == version else None


def batched_forward(fm, params, x, structure: Structure) -> Run | None:
    """The hooked forward of the batch ``x``, or None where it cannot be batched.

    None where a fallback parameter or a layer call without the batch as its first
    dimension rules out a batched capture.
    """
    sites = structure.sites
    if structure.fallback or any(s.out_shape[:1] != (1,) or s.in_shape[:1] != (1,) for s in sites):
        return None
    modules = dict(fm.module.named_modules())
    n = _inputs.batch_size(x)
    eps: list = [None] * len(sites)
    feats: list = [None] * len(sites)
    inputs: list = [None] * len(sites)
    outputs: list = [None] * len(sites)

    def leaf(k: int, output: torch.Tensor) -> torch.Tensor:
        if output.shape != (n, *sites[k].out_shape[1:]):
            raise _NotBatched
        eps[k] = torch.zeros_like(output).requires_grad_()
        return eps[k]

    try:
        with torch.enable_grad(), site_hooks(modules, structure, leaf, feats, inputs, outputs):
            out = fm(params, x)
    except _NotBatched:
        return None
    return Run(out, eps, feats, inputs, outputs, modules)
