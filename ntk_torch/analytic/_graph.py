"""Infinite-width kernels of any module ``torch.fx`` can trace: one ``Kernel`` map per node.

The model's forward is traced into a graph (layer modules stay whole), run once on two
copies of the first input to learn every node's shape, and each node becomes a map of
the states of its inputs:

- layer modules: :func:`ntk_torch.analytic.read.leaf_layer`;
- elementwise activations called as functions or tensor methods: their dual;
- ``+``/``-`` of two branches, multiplication or division by a constant, ``torch.cat``
  along channels, flatten/view/reshape that only flatten, ``mean`` over all pixels,
  ``F.avg_pool*``/``F.adaptive_avg_pool*``, dropout and no-op methods.

A node's state is a tuple of :class:`Kernel` parts, one per block of channels that a
concatenation joined: activations act on each part with its own variances; linear layers,
which sum over channels, see their channel-weighted mean.

Sums need branches without covariance in the limit. That holds when one branch ends in a
linear layer (followed only by channel-wise linear ops: pooling, scaling, flattening, sums
of such branches) whose weights the other branch never uses: those weights are zero-mean
and independent of everything in the other branch, so ``E[h_a h_b] = 0``, and the
tangent cross terms average to zero over channels. Every node records the linear layers
its value ends in and all the layers it depends on; a sum that fails the test is refused.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ntk_torch import nn as ntk_nn
from ntk_torch.analytic import layers as L
from ntk_torch.analytic._leaves import CHANNELWISE_LINEAR, LINEAR_LAYERS, leaf_layer
from ntk_torch.analytic._limit import Kernel
from ntk_torch.analytic.activations import dual

__all__ = ["read_graph"]

State = tuple[Kernel, ...]

_MONTE_CARLO = ("estimate its kernel with nt.analytic.monte_carlo_kernel(build, x1, x2, "
                "n_samples=...) instead")

# Elementwise functions and the tensor methods of the same name. Those with parameters
# (negative_slope, approximate, alpha, ...) are read with their arguments.
_ACTIVATION_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.elu, F.selu, F.celu, F.leaky_relu, F.gelu, F.silu, F.mish,
    F.softplus, F.hardtanh, F.hardswish, F.hardsigmoid, F.softsign, F.tanhshrink,
    F.logsigmoid, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, torch.erf, torch.special.erf,
    torch.abs, torch.sin, torch.cos,
}
_ACTIVATION_METHODS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
                       "abs": torch.abs, "sin": torch.sin, "cos": torch.cos, "erf": torch.erf}
# Closed forms for functions with arguments, through their modules.
_ACTIVATION_MODULES: dict[Callable, Callable[..., nn.Module]] = {
    F.leaky_relu: lambda negative_slope=0.01: nn.LeakyReLU(negative_slope),
    F.gelu: lambda approximate="none": nn.GELU(approximate),
}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_CAT = {torch.cat, torch.concat}
_FLATTEN = {torch.flatten, torch.reshape, "flatten", "view", "reshape"}
_MEAN = {torch.mean, "mean"}
_IDENTITY = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
             F.feature_alpha_dropout, torch.clone, "clone", "contiguous", "float", "double",
             "to", operator.pos}
_SHAPES = {"size", "dim", getattr, operator.getitem}
_POOLS = {F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d}


class _Tracer(fx.Tracer):
    """Keeps this package's layers whole and records where each node comes from."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (isinstance(m, (ntk_nn.Dense, ntk_nn.Conv2d, ntk_nn.Elementwise))
                or super().is_leaf_module(m, module_qualified_name))


@dataclass(frozen=True)
class _Info:
    """Whether a node's value is features (depends on the input), and its lineage."""

    is_state: bool           # depends on the input
    ends_in: frozenset[str] | None  # linear layers the value is a fresh image of
    uses: frozenset[str]     # every layer with parameters it depends on


@dataclass(frozen=True)
class _Step:
    node: str
    inputs: tuple[str, ...]
    fn: Callable[..., State]
    label: str


_TORCH_DIR = os.path.dirname(torch.__file__)


def _where(node: fx.Node) -> str:
    """``file:line: code`` of the user's source line the node was traced from."""
    frames = [f for f in re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)',
                                    node.stack_trace or "")
              if not f[0].startswith(_TORCH_DIR)]  # the tracer's own frames
    if not frames:
        return ""
    file, line, code = frames[-1]
    return f" at {file}:{line}: `{code.strip()}`"


def _op_name(node: fx.Node, model: nn.Module) -> str:
    if node.op == "call_module":
        return f"{type(model.get_submodule(node.target)).__name__} module {node.target!r}"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        module = getattr(node.target, "__module__", None) or ""
        name = getattr(node.target, "__name__", repr(node.target))
        return f"{module.replace('torch.nn.functional', 'F')}.{name}".lstrip(".")
    return node.op


class _Refused(ValueError):
    pass


def _per_part(layer: L.Layer) -> Callable[[State], State]:
    return lambda parts: tuple(layer(p) for p in parts)


def _merged(layer: L.Layer) -> Callable[[State], State]:
    return lambda parts: (layer(L.concatenate(parts)),)


def _add(a: State, b: State) -> State:
    """Sum part by part, splitting both at the union of their channel boundaries."""
    if len(a) == 1 and len(b) == 1:
        return (L.add(a[0], b[0]),)

    def bounds(parts: State) -> list[int]:
        return [0, *itertools.accumulate(p.channels for p in parts)]

    cuts = sorted(set(bounds(a)) | set(bounds(b)))
    if cuts[-1] != bounds(a)[-1] or cuts[-1] != bounds(b)[-1]:
        raise ValueError(f"the sum adds {bounds(a)[-1]} channels to {bounds(b)[-1]}")

    def part_at(parts: State, start: int, size: int) -> Kernel:
        ends = bounds(parts)
        i = max(j for j in range(len(parts)) if ends[j] <= start)
        return parts[i].replace(channels=size)

    return tuple(L.add(part_at(a, lo, hi - lo), part_at(b, lo, hi - lo))
                 for lo, hi in zip(cuts[:-1], cuts[1:]))


def _constant(value: object) -> float | None:
    """A Python number or a one-element tensor that does not depend on the input."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return None


def _has_rule(node: fx.Node, model: nn.Module) -> str | None:
    """Why the node's op has no rule at all, before any shape is known; None if it may."""
    if node.op == "call_module":
        module = model.get_submodule(node.target)
        if isinstance(module, nn.Unflatten):
            return None  # of the input only, which reading checks
        try:
            leaf_layer(node.target, module)
        except ValueError as err:
            return str(err)
        return None
    if node.op in ("call_function", "call_method"):
        known = (_ADD | _SUB | _MUL | _DIV | _CAT | _FLATTEN | _MEAN | _IDENTITY | _POOLS
                 | _ACTIVATION_FUNCTIONS | set(_ACTIVATION_METHODS))
        if node.target in known or node.target is operator.neg or node.target == "neg":
            return None
        # Shapes and other values that are not features are read by other nodes.
        return None if node.target in _SHAPES else "this operation has no infinite-width rule"
    return None


class _Reader:
    def __init__(self, model: nn.Module, graph: fx.Graph) -> None:
        self.model, self.graph = model, graph
        self.values: dict[str, object] = {}
        self.info: dict[str, _Info] = {}
        self.steps: list[_Step] = []
        self.called: dict[str, str] = {}  # module with parameters -> first node calling it
        self.input: str | None = None
        self.input_shape: tuple[int, ...] | None = None  # set when the input is reshaped
        self.output: str | None = None

    # -------------------------------------------------------------- reading
    def _refuse(self, node: fx.Node, why: str) -> ValueError:
        return ValueError(f"analytic.kernel has no infinite-width rule for node {node.name!r} "
                          f"({_op_name(node, self.model)}){_where(node)}: {why}; "
                          f"{_MONTE_CARLO}")

    def check_ops(self) -> None:
        """Refuse ops that have no rule whatever their shapes, before running anything."""
        inputs = [n.name for n in self.graph.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise ValueError(f"analytic.kernel reads models of one input tensor, but the "
                             f"forward of {type(self.model).__name__} takes {inputs}")
        for node in self.graph.nodes:
            why = _has_rule(node, self.model)
            if why is not None:
                raise self._refuse(node, why)

    def read(self, values: dict[str, object]) -> None:
        self.values = values
        for node in self.graph.nodes:
            try:
                self._read(node)
            except _Refused as err:
                raise self._refuse(node, str(err)) from None

    def _state_args(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if self.info[a.name].is_state]

    def _read(self, node: fx.Node) -> None:
        value = self.values.get(node.name)
        if node.op == "placeholder":
            self.input = node.name
            self.info[node.name] = _Info(True, None, frozenset())
            return
        if node.op == "output":
            (result,) = node.args
            if not isinstance(result, fx.Node) or not self.info[result.name].is_state \
                    or not isinstance(self.values[result.name], torch.Tensor):
                raise _Refused("the model must return one tensor computed from its input")
            self.output = result.name
            return
        states = self._state_args(node)
        if not states or not isinstance(value, torch.Tensor):
            # Constants (parameters read directly, tensors built in forward) and shapes:
            # no kernel, only values other nodes may read.
            uses = frozenset().union(*(self.info[a.name].uses for a in node.all_input_nodes))
            self.info[node.name] = _Info(False, None, uses)
            return
        self._read_state(node, states)

    def _add_step(self, node: fx.Node, inputs: Sequence[fx.Node], fn: Callable[..., State],
                  ends_in: frozenset[str] | None, own: frozenset[str] = frozenset()) -> None:
        uses = own.union(*(self.info[a.name].uses for a in inputs))
        self.info[node.name] = _Info(True, ends_in, uses)
        self.steps.append(_Step(node.name, tuple(a.name for a in inputs), fn,
                                f"node {node.name!r} ({_op_name(node, self.model)})"
                                f"{_where(node)}"))

    def _reshapes_input(self, node: fx.Node, states: list[fx.Node]) -> bool:
        """A reshape of the input that nothing else reads: the kernel starts from its result.

        A model taking flat vectors may view them as images first (``x.view(-1, 1, 8, 8)``,
        ``nn.Unflatten``); the input kernel is then that of the images.
        """
        placeholder = next(n for n in self.graph.nodes if n.name == self.input)
        unflatten = node.op == "call_module" and isinstance(
            self.model.get_submodule(node.target), nn.Unflatten)
        # Other readers of the input may only take its shape.
        features = [u for u in placeholder.users
                    if u is not node and isinstance(self.values.get(u.name), torch.Tensor)]
        if not (unflatten or node.target in _FLATTEN) or states != [placeholder] or features:
            return False
        before, after = self._shapes(node, placeholder)
        if after[0] != before[0] or len(after) not in (2, 3, 4):
            return False
        self.input, self.input_shape = node.name, after[1:]
        self.info[node.name] = _Info(True, None, frozenset())
        return True

    def _read_state(self, node: fx.Node, states: list[fx.Node]) -> None:
        target = node.target
        if self._reshapes_input(node, states):
            return
        if node.op == "call_module":
            self._read_module(node, states)
            return
        if node.op not in ("call_function", "call_method"):
            raise _Refused(f"{node.op} nodes have no rule")
        joins = target in _ADD or target in _SUB or target in _CAT
        if len(states) > 1 and not joins:
            raise _Refused("it combines several branches (a product of features?) in a way "
                           "that has no rule")
        (first, *_) = states
        if target in _ADD or target in _SUB:
            self._read_sum(node, negate=target in _SUB)
        elif target in _MUL or target in _DIV:
            factor = self._factor(node, first, target in _DIV)
            self._linear_step(node, first, _per_part(L.scale(factor)))
        elif target is operator.neg or target == "neg":
            self._linear_step(node, first, _per_part(L.scale(-1.0)))
        elif target in _IDENTITY:
            self._linear_step(node, first, lambda parts: parts)
        elif target in _CAT:
            self._read_cat(node, states)
        elif target in _FLATTEN:
            self._read_flatten(node, first)
        elif target in _MEAN:
            self._read_mean(node, first)
        elif target in _POOLS:
            self._read_pool(node, first)
        elif target in _ACTIVATION_FUNCTIONS or target in _ACTIVATION_METHODS:
            self._read_activation(node, first)
        else:
            raise _Refused("this operation has no infinite-width rule")

    def _linear_step(self, node: fx.Node, source: fx.Node, fn: Callable[[State], State]) -> None:
        """A step that maps each channel alike and linearly: the branch keeps its ending."""
        self._add_step(node, [source], fn, self.info[source.name].ends_in)

    def _read_module(self, node: fx.Node, states: list[fx.Node]) -> None:
        module = self.model.get_submodule(node.target)
        if len(node.all_input_nodes) != 1 or len(node.args) != 1 or node.kwargs:
            raise _Refused("a layer called with more than one input has no rule")
        (source,) = states
        try:
            layer = leaf_layer(node.target, module)
        except ValueError as err:
            raise _Refused(str(err)) from None
        if any(True for _ in module.parameters()):
            if node.target in self.called:
                raise _Refused(f"the layer is also called at node {self.called[node.target]!r}; "
                               "weights shared between calls have no rule here")
            self.called[node.target] = node.name
        if isinstance(module, LINEAR_LAYERS):
            name = frozenset({node.target})
            self._add_step(node, [source], _merged(layer), name, own=name)
        elif isinstance(module, CHANNELWISE_LINEAR):
            self._linear_step(node, source, _per_part(layer))
        elif isinstance(module, nn.LayerNorm):
            self._add_step(node, [source], self._layer_norm(layer), None,
                           own=frozenset({node.target}))
        else:  # activations
            self._add_step(node, [source], _per_part(layer), None)

    @staticmethod
    def _layer_norm(layer: L.Layer) -> Callable[[State], State]:
        def fn(parts: State) -> State:
            if len(parts) > 1:
                raise ValueError("LayerNorm of concatenated branches has no rule: normalise "
                                 "each branch before joining them")
            return (layer(parts[0]),)

        return fn

    def _read_sum(self, node: fx.Node, negate: bool) -> None:
        a = node.args[0]
        b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        if not all(isinstance(t, fx.Node) and self.info[t.name].is_state for t in (a, b)):
            raise _Refused("adding a constant to features shifts their mean, which the "
                           "kernel does not track")
        alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
        if _constant(alpha) is None:
            raise _Refused("this form of the sum has no rule")
        factor = (-1.0 if negate else 1.0) * float(alpha)
        second = L.scale(factor) if factor != 1.0 else L.identity()
        if a is b:  # h + a·h = (1 + a)·h
            whole = L.scale(1.0 + factor)
            self._linear_step(node, a, _per_part(whole))
            return
        ia, ib = self.info[a.name], self.info[b.name]
        independent = any(ends is not None and not (ends & other.uses)
                          for ends, other in ((ia.ends_in, ib), (ib.ends_in, ia)))
        if not independent:
            raise _Refused(
                "its branches are not independent in the infinite-width limit: neither ends "
                "in a linear layer (nn.Linear, nn.Conv*, followed only by pooling, scaling "
                "or flattening) whose weights the other branch does not use, so their "
                "covariance has no rule here")
        ends_in = None if ia.ends_in is None or ib.ends_in is None else ia.ends_in | ib.ends_in
        self._add_step(node, [a, b], lambda pa, pb: _add(pa, _per_part(second)(pb)), ends_in)

    def _factor(self, node: fx.Node, state: fx.Node, divide: bool) -> float:
        others = [a for a in list(node.args) + list(node.kwargs.values()) if a is not state]
        if len(others) != 1:
            raise _Refused("this form of the product has no rule")
        (other,) = others
        value = self.values[other.name] if isinstance(other, fx.Node) else other
        if isinstance(value, torch.Tensor) and value.requires_grad:
            raise _Refused("a trainable scalar factor adds its own tangent term, which has no "
                           "rule here")
        factor = _constant(value)
        if factor is None:
            raise _Refused("only multiplication by a constant number has a rule; products "
                           "with tensors of several entries or of features have none")
        if divide and node.args[0] is not state:
            raise _Refused("dividing by features has no rule")
        return 1.0 / factor if divide else factor

    def _read_cat(self, node: fx.Node, states: list[fx.Node]) -> None:
        tensors = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        ndim = self.values[node.name].dim()
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) \
                or dim % ndim != 1 or any(not isinstance(t, fx.Node) for t in tensors) \
                or any(not self.info[t.name].is_state for t in tensors):
            raise _Refused("only torch.cat of features along the channel dimension (1) has "
                           "a rule")
        infos = [self.info[t.name] for t in tensors]
        ends = [i.ends_in for i in infos]
        ends_in = None if any(e is None for e in ends) else frozenset().union(*ends)
        self._add_step(node, list(tensors), lambda *parts: tuple(p for ps in parts for p in ps),
                       ends_in)

    def _shapes(self, node: fx.Node, source: fx.Node) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(self.values[source.name].shape), tuple(self.values[node.name].shape)

    def _read_flatten(self, node: fx.Node, source: fx.Node) -> None:
        before, after = self._shapes(node, source)
        if after == before and len(after) == 2:
            self._linear_step(node, source, lambda parts: parts)
        elif after == (before[0], math.prod(before[1:])):
            self._linear_step(node, source, _per_part(L.flatten()))
        else:
            raise _Refused(f"it reshapes {before} to {after}; only flattening each sample, "
                           "(N, ...) to (N, features), has a rule")

    def _read_mean(self, node: fx.Node, source: fx.Node) -> None:
        before, after = self._shapes(node, source)
        args = list(node.args[1:]) + [node.kwargs.get("dim")]
        dims = next((a for a in args if a is not None), None)
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        pixels = set(range(2, len(before)))
        if len(before) < 3 or {d % len(before) for d in dims} != pixels:
            raise _Refused("only the mean over all pixels (global average pooling) has a rule")
        pool = L.global_average_pool()
        if len(after) == 2:
            self._linear_step(node, source, _per_part(L.serial(pool, L.flatten())))
        else:
            self._linear_step(node, source, _per_part(pool))

    def _read_pool(self, node: fx.Node, source: fx.Node) -> None:
        rest = [self.values[a.name] if isinstance(a, fx.Node) else a for a in node.args[1:]]
        pool = _with_arguments(node.target, rest, dict(node.kwargs))
        # Sequences are images of height one.
        fn = functools.partial(_as_2d, pool) if self.values[source.name].dim() == 3 else pool
        self._linear_step(node, source, _per_part(L.pixel_linear(fn, "average pooling")))

    def _read_activation(self, node: fx.Node, source: fx.Node) -> None:
        target = node.target
        fn = _ACTIVATION_METHODS.get(target, target) if isinstance(target, str) else target
        rest = [self.values[a.name] if isinstance(a, fx.Node) else a for a in node.args[1:]]
        # Booleans among these functions' arguments are only their inplace flags.
        rest = [a for a in rest if not isinstance(a, bool)]
        kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
        if isinstance(target, str) and (rest or kwargs):
            raise _Refused("tensor methods with arguments have no rule")
        if fn in _ACTIVATION_MODULES:
            names = ("negative_slope",) if fn is F.leaky_relu else ("approximate",)
            params = dict(zip(names, rest)) | {k: v for k, v in kwargs.items() if k in names}
            activation: object = _ACTIVATION_MODULES[fn](**params)
        elif rest or kwargs:
            activation = _with_arguments(fn, rest, kwargs)
        else:
            activation = fn
        self._add_step(node, [source], _per_part(L.activation(dual(activation))), None)

    # -------------------------------------------------------------- running
    def program(self) -> L.Layer:
        steps, input_name, output_name = tuple(self.steps), self.input, self.output

        def run(k: Kernel) -> Kernel:
            env: dict[str, State] = {input_name: (k,)}
            for step in steps:
                try:
                    env[step.node] = step.fn(*(env[i] for i in step.inputs))
                except ValueError as err:
                    raise ValueError(f"{step.label}: {err}") from None
            return L.concatenate(env[output_name])

        return run


def _with_arguments(fn: Callable, args: Sequence[object], kwargs: dict[str, object]) -> Callable:
    """``t -> fn(t, *args, **kwargs)``: the node's function with its other arguments."""
    def call(t: torch.Tensor) -> torch.Tensor:
        return fn(t, *args, **kwargs)

    call.__name__ = getattr(fn, "__name__", "function")
    return call


def _as_2d(fn: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """A 1-d map of ``(B, 1, L)`` on the height-one images ``(B, 1, 1, L)`` of the state."""
    return fn(t.squeeze(-2)).unsqueeze(-2)


class _Recorder(fx.Interpreter):
    """Runs the graph once and keeps every node's value."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.values: dict[str, object] = {}

    def run_node(self, n: fx.Node) -> object:
        result = super().run_node(n)
        self.values[n.name] = result
        return result


def read_graph(model: nn.Module, example: torch.Tensor
               ) -> tuple[L.Layer, tuple[int, ...] | None]:
    """The ``Kernel -> Kernel`` map of ``model``'s whole forward, read through ``torch.fx``.

    ``example`` is one input sample with its batch dimension, ``(1, ...)``; the graph runs
    on two copies of it, without gradients, to learn the shapes. Also returns the shape
    of one sample after the forward reshapes its input first (``None`` if it does not):
    the input kernel is that of the reshaped inputs.

    Raises:
        ValueError: when tracing fails, or naming the first node without a rule (its op and
            source line), suggesting the Monte Carlo estimate.
    """
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: no graph to read
        raise ValueError(f"analytic.kernel reads models through torch.fx, which cannot trace "
                         f"{type(model).__name__}: {type(err).__name__}: {err}; "
                         f"{_MONTE_CARLO}") from None
    reader = _Reader(model, graph)
    reader.check_ops()
    module = fx.GraphModule(model, graph)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    recorder = _Recorder(module)
    try:
        with torch.no_grad():
            recorder.run(torch.cat([example, example]).to(dtype))
    except Exception as err:  # noqa: BLE001 - the model's own error, named as such
        raise ValueError(f"analytic.kernel runs {type(model).__name__} once on two copies of the "
                         f"first input {tuple(example.shape[1:])} to learn its shapes, and it "
                         f"failed: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    reader.read(recorder.values)
    return reader.program(), reader.input_shape
