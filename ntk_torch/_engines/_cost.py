"""What the engines' cost estimates are made of: one profiled forward pass.

A single-sample forward is run once under a FLOP counter and an allocation counter.
Engines turn these per-sample numbers into FLOPs and peak bytes for a given block
(see each engine's ``estimate``); ``auto`` compares those, and the memory guard
refuses blocks that would not fit. An engine that needs more than these numbers (the
structured engine's layer probe) analyses the model on the profiled sample itself, once
per :class:`Probe`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from ntk_torch import _inputs


@dataclass(frozen=True)
class Problem:
    """Sizes of one kernel block.

    Attributes:
        n1, n2: samples in the block (``n2 == n1`` when ``symmetric``).
        symmetric: the block is ``K(x, x)``, so per-sample work on ``x2`` is shared.
        mode: ``"full"``, ``"diagonal"`` or ``"trace"``.
        n_out: ``O``, flattened outputs per sample.
        n_params: ``P``, selected parameters (tied ones once).
        n_groups: kernels returned (1, or the number of layers for ``layerwise_ntk``).
        forward_flops: FLOPs of a one-sample forward pass.
        activations: elements allocated by a one-sample forward pass.
        itemsize: bytes per element of the parameters' dtype.
        probe: the model and the profiled sample, for engines that analyse the model
            further (not part of the sizes: equality and hashing ignore it).
    """

    n1: int
    n2: int
    symmetric: bool
    mode: str
    n_out: int
    n_params: int
    n_groups: int
    forward_flops: float
    activations: float
    itemsize: int
    probe: Probe | None = field(default=None, compare=False, repr=False)

    def output_bytes(self) -> float:
        per_pair = {"full": self.n_out**2, "diagonal": self.n_out, "trace": 1}[self.mode]
        return float(self.n1 * self.n2 * per_pair * self.n_groups * self.itemsize)


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float


class _ForwardCounter(TorchDispatchMode):
    """FLOPs and new elements of the operators run under it.

    FLOPs of the operators torch's FLOP counter knows (matmuls, convolutions, attention)
    and elements of every new tensor an operator returns (an upper bound on activations).

    Views (``weight.t()`` inside ``linear``, reshapes) share their input's storage and
    allocate nothing; counting them would charge a parameter-sized tensor per layer.
    (``FlopCounterMode`` counts the same FLOPs but imports ``torch._dynamo`` on entry,
    seconds on a first call.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **(kwargs or {}), out_val=out)
        inputs, _ = tree_flatten((args, kwargs or {}))
        shared = {_storage(t) for t in inputs if isinstance(t, torch.Tensor)}
        leaves, _ = tree_flatten(out)
        self.elements += sum(t.numel() for t in leaves
                             if isinstance(t, torch.Tensor) and _storage(t) not in shared)
        return out


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. sparse)
        return id(t)


T = TypeVar("T")


class Probe:
    """The model, its parameters and one sample, as profiled for a :class:`Problem`.

    Made once per model, parameter selection and sample shape (by the callers that
    profile), so an engine's analysis of the model (``analysis``) runs once for every
    block, tile and estimate of that kernel, and only when the engine is considered.
    """

    def __init__(self, fm, params: dict[str, torch.Tensor], sample: torch.Tensor,
                 found: dict[str, Any] | None = None) -> None:
        self.fm, self.params, self.sample = fm, dict(params), sample
        # Analyses of the same model and sample shape made by an earlier probe; shared,
        # so that what this probe adds is kept there too.
        self._found: dict[str, Any] = {} if found is None else found

    def analysis(self, key: Hashable,
                 analyse: Callable[[Any, dict[str, torch.Tensor], torch.Tensor], T]) -> T:
        """``analyse(fm, params, sample)``, computed on the first call for ``key``."""
        if key not in self._found:
            self._found[key] = analyse(self.fm, self.params, self.sample)
        return self._found[key]


def profile_forward(fm, params: dict[str, torch.Tensor],
                    x: torch.Tensor) -> tuple[float, float, int, Probe]:
    """FLOPs, allocated elements, output size ``O`` and :class:`Probe` of ``x[:1]``."""
    sample = _inputs.take(x, 0, 1)
    with torch.no_grad():
        counter = _ForwardCounter()
        with counter:
            out = fm(params, sample)
    flops, elements = float(max(counter.flops, 1)), float(counter.elements)
    return flops, elements, int(out.shape[1]), Probe(fm, params, sample)
