"""What a layer rule is, and the one registry of rules by module type.

A *rule* describes one kind of layer whose weight's per-sample gradient is
``Σ_t D_t ⊗ A_t`` over the layer's positions ``t``: ``A_t`` of ``groups x k_in`` (its
input feature) and ``D_t`` of ``groups x k_out`` (the cotangent at its output). Each rule
gives the sizes of one call, what a hook keeps of the layer's input, the layouts of the
captured inputs and cotangents as ``A (N, T, G, k_in)`` and ``D (N, O, T, G, k_out)``, the
axis of its output channels, and what the cost model needs (elements kept per sample, the
size of a one-hot input). Rules register themselves with the module classes they read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Site:
    """One call of a structured layer.

    Attributes:
        module: qualified name of the layer.
        rule: its rule.
        in_shape, out_shape: shapes of its input and output for one sample (as the layer
            sees them, with the model's batch dimension of size one where it has one).
        out_dtype: dtype of the output (the cotangent's dtype).
    """

    module: str
    rule: LayerRule
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    out_dtype: torch.dtype


class LayerRule:
    """The structured gradient of one kind of layer (subclasses override what differs).

    Attributes:
        name: the kind, for messages and repr.
        modules: ``(class, methods)`` pairs: the module classes the rule reads and the
            methods their standard forward consists of. A subclass overriding any of them
            may compute something else with the same parameters, so it gets no rule.
        factorable: its block may take the factored rule behind a separable head (the
            output has channels ``G·k_out`` on :meth:`channel_axis` and positions).
    """

    name: str = ""
    modules: tuple[tuple[type, tuple[str, ...]], ...] = ()
    factorable: bool = False

    def __repr__(self) -> str:
        return f"<{self.name} rule>"

    def accepts(self, module: nn.Module) -> bool:
        """Whether this instance's settings keep the rule exact (beyond its class)."""
        return True

    def scales(self, module: nn.Module) -> tuple[float, float]:
        """``(m, m_b)``: the weight's and the bias's multipliers in the layer's output."""
        return 1.0, 1.0

    def sizes(self, module: nn.Module, site: Site) -> tuple[int, int, int, int]:
        """``(positions, groups, k_in, k_out)`` of one call, ``k_in`` without a bias column."""
        raise NotImplementedError

    def input_feature(self, module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        """What the weight gradient needs from the layer's input at one call.

        Runs in a hook, inside vmap over samples for the per-sample capture.
        """
        return inp

    def features(self, module: nn.Module, site: Site, feat: torch.Tensor):
        """``A (N, T, G, k_in)`` from the captured ``(N, *in_shape)``."""
        positions, groups, k_in, _ = self.sizes(module, site)
        return feat.reshape(feat.shape[0], positions, groups, k_in)

    def cotangents(self, module: nn.Module, site: Site, cot: torch.Tensor) -> torch.Tensor:
        """``D (N, O, T, G, k_out)`` from the captured ``(N, O, *out_shape)``."""
        positions, groups, _, k_out = self.sizes(module, site)
        return cot.reshape(cot.shape[0], cot.shape[1], positions, groups, k_out)

    def channel_axis(self, site: Site) -> int:
        """Axis of the output channels in the layer's output (last by default)."""
        return len(site.out_shape) - 1

    def readout_width(self, module: nn.Module, site: Site) -> int | None:
        """Input channels when this call reads one vector per sample (a head's readout)."""
        return None

    def feature_elements(self, module: nn.Module, site: Site) -> int:
        """Elements per sample that :meth:`input_feature` keeps, at their unfolded size."""
        positions, groups, k_in, _ = self.sizes(module, site)
        return positions * groups * k_in

    def vocab(self, module: nn.Module) -> int:
        """Size of a one-hot input feature (the rows of an embedding); 0 for dense ones."""
        return 0


class ChannelsFirstRule(LayerRule):
    """Norm layers with one affine entry per channel on dimension 1 of a sample."""

    def sizes(self, module: nn.Module, site: Site) -> tuple[int, int, int, int]:
        channels = site.in_shape[1]
        return math.prod(site.in_shape) // channels, channels, 1, 1

    def features(self, module: nn.Module, site: Site, feat: torch.Tensor) -> torch.Tensor:
        positions, groups, _, _ = self.sizes(module, site)
        return feat.movedim(2, -1).reshape(feat.shape[0], positions, groups, 1)

    def cotangents(self, module: nn.Module, site: Site, cot: torch.Tensor) -> torch.Tensor:
        return super().cotangents(module, site, cot.movedim(3, -1))


_REGISTRY: list[tuple[type, tuple[str, ...], LayerRule]] = []


def register(rule: LayerRule) -> LayerRule:
    """Make ``rule`` apply to its :attr:`LayerRule.modules`; returns it."""
    for cls, methods in rule.modules:
        _REGISTRY.append((cls, methods, rule))
    return rule


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule that applies to ``module``, or None (its parameters take the fallback)."""
    for cls, methods, rule in _REGISTRY:
        if not isinstance(module, cls):
            continue
        if any(getattr(type(module), m) is not getattr(cls, m) for m in methods):
            return None
        if module._forward_hooks or getattr(module, "_forward_hooks_with_kwargs", None):
            return None  # a user hook may change the output the cotangent is taken at
        return rule if rule.accepts(module) else None
    return None
