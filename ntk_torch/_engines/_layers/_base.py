"""What a layer rule is, and the one registry of rules by module type.

A *rule* describes one kind of layer whose weight's per-sample gradient is
``Σ_t D_t ⊗ A_t`` over the layer's positions ``t``: ``A_t`` of ``groups x k_in`` (its
input feature) and ``D_t`` of ``groups x k_out`` (the cotangent at its output). Each rule
gives the sizes of one call, what a hook keeps of the layer's input, the layouts of the
captured inputs and cotangents as ``A (N, T, G, k_in)`` and ``D (N, O, T, G, k_out)``, the
axis of its output channels, and what the cost model needs (elements kept per sample, the
size of a one-hot input). Rules register themselves with the module classes they read
(or, for classes of libraries that need not be installed, with a class name).

A layer's *call* is where its weight meets its input: by default the module's own forward
(a forward hook sees it), but a rule may find it inside another computation
(:meth:`LayerRule.calls`, e.g. the packed projection inside ``nn.MultiheadAttention``).
A layer may hold several (weight, bias) *pairs*, each meeting its own input (a recurrent
cell's on the step's input and on the hidden state): each call then says which pair it is
of, and the pairs are structured apart, like separate layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


@dataclass(frozen=True)
class Site:
    """One call of a structured layer.

    Attributes:
        module: qualified name of the layer.
        rule: its rule.
        in_shape, out_shape: shapes of its input and output for one sample (as the layer
            sees them, with the model's batch dimension of size one where it has one).
        out_dtype: dtype of the output (the cotangent's dtype).
        pair: index of the (weight, bias) pair of the call (:meth:`LayerRule.pairs`).
    """

    module: str
    rule: LayerRule
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    out_dtype: torch.dtype
    pair: int = 0


class CallsMode(TorchFunctionMode):
    """Finds the calls of a rule's ``modules`` inside another computation as the model runs.

    Each call goes to ``on_call`` as :meth:`LayerRule.calls` describes.
    """

    def __init__(self, modules: list[nn.Module], on_call: Callable) -> None:
        super().__init__()
        self.modules, self.on_call = modules, on_call


class LayerRule:
    """The structured gradient of one kind of layer (subclasses override what differs).

    Attributes:
        name: the kind, for messages and repr.
        modules: ``(class, methods)`` pairs: the module classes the rule reads and the
            methods their standard forward consists of. A subclass overriding any of them
            may compute something else with the same parameters, so it gets no rule.
        class_names: names of classes (``type(module).__name__``, subclasses excluded) the
            rule reads where the class cannot be imported; :meth:`accepts` and
            :meth:`verify` then check the instance.
        parameters: attribute names of the weight and the bias on the module, one pair for
            each input a weight meets (most layers have one); :meth:`pairs` gives them per
            instance where their number depends on the module's settings.
        factorable: its block may take the factored rule behind a separable head (the
            output has channels ``G·k_out`` on :meth:`channel_axis` and positions).
        mode: for a rule whose calls sit inside another computation, the
            :class:`CallsMode` that finds them while the model runs; ``None``: forward hooks.
    """

    name: str = ""
    modules: tuple[tuple[type, tuple[str, ...]], ...] = ()
    class_names: tuple[str, ...] = ()
    parameters: tuple[tuple[str, str], ...] = (("weight", "bias"),)
    factorable: bool = False
    mode: type[CallsMode] | None = None

    def __repr__(self) -> str:
        return f"<{self.name} rule>"

    def accepts(self, module: nn.Module) -> bool:
        """Whether this instance's settings keep the rule exact (beyond its class)."""
        return True

    def pairs(self, module: nn.Module) -> tuple[tuple[str, str], ...]:
        """The module's (weight, bias) attribute pairs, indexed by a call's ``pair``."""
        return self.parameters

    def verify(self, module: nn.Module, args: tuple, output: torch.Tensor, pair: int = 0) -> bool:
        """Whether the probed call computed what the rule assumes (checked on the probe).

        ``args``, ``output`` and ``pair`` as :meth:`calls` gives them to ``on_call``.
        """
        return True

    @contextmanager
    def calls(self, modules: list[nn.Module], on_call: Callable) -> Iterator[None]:
        """Run ``on_call(module, args, output, pair=0) -> output`` at every call of ``modules``.

        ``args[0]`` is the input the weight of pair ``pair`` (:attr:`parameters`)
        multiplies and ``output`` what that weight and bias produce from it; what
        ``on_call`` returns replaces it. By default a forward hook on each module (which
        passes no pair: the first); with a :attr:`mode`, that mode while the model runs.
        """
        if self.mode is not None:
            with self.mode(modules, on_call):
                yield
            return
        with ExitStack() as stack:
            for m in modules:
                stack.callback(m.register_forward_hook(on_call).remove)
            yield

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

    def extra_flops(self, module: nn.Module, site: Site) -> float:
        """FLOPs per sample that :meth:`calls` adds to one forward call (and to each backward)."""
        return 0.0

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
_BY_CLASS_NAME: dict[str, LayerRule] = {}


def register(rule: LayerRule) -> LayerRule:
    """Make ``rule`` apply to its :attr:`LayerRule.modules` and class names; returns it."""
    for cls, methods in rule.modules:
        _REGISTRY.append((cls, methods, rule))
    for name in rule.class_names:
        _BY_CLASS_NAME[name] = rule
    return rule


@contextmanager
def layer_calls(rules: dict[LayerRule, list[nn.Module]], on_call: Callable) -> Iterator[None]:
    """:meth:`LayerRule.calls` of every rule over its modules, all at once."""
    with ExitStack() as stack:
        for rule, modules in rules.items():
            stack.enter_context(rule.calls(modules, on_call))
        yield


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule that applies to ``module``, or None (its parameters take the fallback)."""
    found = _BY_CLASS_NAME.get(type(module).__name__)
    for cls, methods, rule in _REGISTRY:
        if not isinstance(module, cls):
            continue
        if any(getattr(type(module), m) is not getattr(cls, m) for m in methods):
            return None
        found = rule
        break
    if found is None:
        return None
    if module._forward_hooks or getattr(module, "_forward_hooks_with_kwargs", None):
        return None  # a user hook may change the output the cotangent is taken at
    return found if found.accepts(module) else None
