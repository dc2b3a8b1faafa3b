"""A model's profile on an input shape, kept per model from one kernel call to the next.

What an empirical-NTK call learns about the model before any kernel work (the checks that
need a forward, ``profile_forward``'s FLOPs and sizes, the engines' analyses of the model
on the probe) depends on the module tree and on the shapes, dtypes and devices of the
inputs and parameters, not on their values. It is kept here, keyed weakly by the model,
so that repeated calls (a one-shot ``empirical_ntk`` per step of a training loop, a
tracker's probe) pay for it once. Nothing kept refers to the model: it is released with
the model.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ntk_torch import _engines, _inputs
from ntk_torch._engines import Probe
from ntk_torch._model_checks import check_model_behaviour


@dataclass
class _Profile:
    """``profile_forward``'s results for one key, without the model.

    ``sample`` is a copy of the first sample (a view would keep the caller's whole batch
    alive); ``analyses`` are the engines' analyses made on it; ``independence_checked``
    says whether two samples were compared (a first call with one sample could not).
    """

    key: tuple
    flops: float
    activations: float
    n_out: int
    sample: torch.Tensor
    analyses: dict[str, Any]
    independence_checked: bool


# model -> {selected parameter names: the profile of the latest key}. One key per
# selection, as a changed model (a hook added, a layer swapped) rarely changes back.
_PROFILES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, ...], _Profile]] = (
    weakref.WeakKeyDictionary())


def profiled(fm, values: dict[str, torch.Tensor], x1: _inputs.Inputs,
             x2: _inputs.Inputs | None) -> tuple[float, float, int, Probe]:
    """FLOPs, allocated elements and ``O`` of a one-sample forward, and the :class:`Probe`.

    On a new key the model is first checked (``check_model_behaviour``: per-sample,
    deterministic, inputs read as a batch), then profiled.
    """
    key = _key(fm.module, values, x1)
    slots = _PROFILES.setdefault(fm.module, {})
    found = slots.get(fm.names)
    if found is None or found.key != key:
        checked = check_model_behaviour(fm, values, x1, x2)
        flops, activations, n_out, _ = _engines.profile_forward(fm, values, x1)
        first = _inputs.map_leaves(torch.clone, _inputs.take(x1, 0, 1))
        found = _Profile(key, flops, activations, n_out, first, {}, checked)
        slots[fm.names] = found
    elif not found.independence_checked and (_inputs.batch_size(x1) > 1 or x2 is not None):
        found.independence_checked = check_model_behaviour(fm, values, x1, x2)
    probe = Probe(fm, values, found.sample, found.analyses)
    return found.flops, found.activations, found.n_out, probe


def _key(module: nn.Module, values: dict[str, torch.Tensor], x1: _inputs.Inputs) -> tuple:
    """What a profile depends on (not the values of inputs and parameters).

    The inputs' structure and per-tensor trailing shape, dtype and device, the parameters'
    shapes, and the module tree: modules, their hooks, modes and parameter tensors.
    """
    return (_inputs.layout(x1),
            tuple((n, v.shape, v.dtype, v.device) for n, v in values.items()),
            tuple((name, id(m), m.training, tuple(m._forward_hooks), tuple(m._forward_pre_hooks),
                   tuple((k, id(p)) for k, p in m._parameters.items()))
                  for name, m in module.named_modules()))
