"""Whether a model's per-sample NTK is defined, and whether the inputs fit the model.

The kernel ``Θ(x_a, x_b) = J(x_a) J(x_b)ᵀ`` needs each sample's outputs to be a
deterministic function of that sample alone. :func:`check_model_state` refuses the module
kinds known to break that (BatchNorm in train mode, Dropout in train mode) without running
anything; :func:`check_model_behaviour` runs the model on two samples and refuses any
other model that breaks it: random draws in the forward (``F.dropout``, drop-path,
``torch.randn_like``), samples that see each other (statistics or attention over the
batch), and inputs the model's first layer reads as something else than a batch
(one unbatched sample, integer pixels for a float model). Every refusal names the module
responsible where it can be found and says what to do.
"""

from __future__ import annotations

import math
from contextlib import ExitStack

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ntk_torch import _inputs

# Modules whose per-sample output depends on random draws when training.
_DROPOUT_TYPES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

# Batched and one-sample forwards of a per-sample model agree only to rounding: matmul
# kernels block and order their sums by the batch size. Relative to the outputs' scale
# that is a few eps per layer; samples that see each other change outputs by far more.
_ROUNDING_EPS = 512
# Half precision: eps is 1e-3 (float16) or 8e-3 (bfloat16), and the bound above would
# accept any change. A mixing model changes outputs by more than this fraction.
_MAX_ROUNDING = 1e-2


def label(name: str, module: nn.Module) -> str:
    """``"body.0 (Linear)"``; the root module is ``"the model (Net)"``."""
    return f"{name or 'the model'} ({type(module).__name__})"


def check_model_state(model: nn.Module) -> None:
    """Refuse modules whose per-sample output is not a function of that sample alone.

    A kernel of such a model is not defined per pair of inputs; computing one anyway
    would silently mix samples (BatchNorm batch statistics) or random draws (Dropout).
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training:
                raise ValueError(
                    f"`model` has {label(name, module)} in train mode: its output depends on the "
                    "whole batch's statistics, so the per-sample NTK is undefined. "
                    "Call model.eval() first."
                )
            if module.running_mean is None:
                raise ValueError(
                    f"`model` has {label(name, module)} with track_running_stats=False, which "
                    "normalises with batch statistics even in eval mode; the per-sample NTK is "
                    "undefined."
                )
        if isinstance(module, _DROPOUT_TYPES) and module.training and module.p > 0:
            raise ValueError(
                f"`model` has {label(name, module)} in train mode with p={module.p}: its output "
                "is random, so the NTK is undefined. Call model.eval() first."
            )
        # Dropout inside attention, and between the layers of a stacked RNN.
        inner_dropout = (isinstance(module, nn.MultiheadAttention)
                         or (isinstance(module, nn.RNNBase) and module.num_layers > 1))
        if inner_dropout and module.training and module.dropout > 0:
            raise ValueError(
                f"`model` has {label(name, module)} in train mode with dropout={module.dropout}: "
                "its output is random, so the NTK is undefined. Call model.eval() first."
            )


def rounding_tolerance(outputs: torch.Tensor) -> float:
    """Largest difference that rounding explains between two computations of ``outputs``."""
    if not outputs.is_floating_point():
        return 0.0
    finite = outputs[torch.isfinite(outputs)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    return min(_ROUNDING_EPS * torch.finfo(outputs.dtype).eps, _MAX_ROUNDING) * scale


def difference(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> float | None:
    """The largest ``|a - b|`` if above ``tolerance`` (or finite in one only), else None."""
    if not (a.is_floating_point() or a.is_complex()):
        return None if torch.equal(a, b) else math.inf
    diff = (a - b).abs()
    if bool((torch.isfinite(a) != torch.isfinite(b)).any()):
        return math.inf
    worst = diff.nan_to_num(0.0).max().item() if diff.numel() else 0.0
    return worst if worst > tolerance else None


def check_model_behaviour(fm, params: dict[str, torch.Tensor], x1: torch.Tensor,
                          x2: torch.Tensor | None = None) -> bool:
    """Run the model on (up to) two samples and refuse it where the NTK is not per-sample.

    One forward of the first two samples of ``x1`` (of ``x1`` and ``x2`` if ``x1`` has
    one) with hooks on every module and a dispatch mode that sees random operators, and
    one forward of the first sample alone.

    Raises:
        ValueError: the first layer reads the inputs as unbatched or of the wrong dtype;
            the forward draws random numbers; or the first sample's outputs differ (beyond
            rounding) alone and in the batch. The message names the module responsible.

    Returns:
        Whether samples' independence was checked (False with one sample in all).
    """
    pair = _inputs.take(x1, 0, 2)
    if _inputs.batch_size(pair) < 2 and x2 is not None and _inputs.batch_size(x2):
        pair = _inputs.concat([pair, _inputs.take(x2, 0, 1)])
    if _inputs.batch_size(pair) == 0:
        return False
    watch = _Watch(fm.module, pair, x1)
    try:
        out = watch.forward(fm, params)
    except _Refused:
        raise ValueError(watch.refusal) from None
    if watch.random is not None:
        raise ValueError(watch.random_message())
    if _inputs.batch_size(pair) < 2:
        return False
    with torch.no_grad():
        alone = fm(params, _inputs.take(pair, 0, 1))
    tolerance = rounding_tolerance(out)
    diff = difference(alone[0], out[0], tolerance)
    if diff is not None:
        where = _first_mixing_module(fm, params, pair)
        raise ValueError(
            f"`model`'s outputs for a sample depend on the rest of the batch: sample 0 alone and "
            f"in a batch of two differ by {diff:.3g} (rounding explains {tolerance:.2g}), so the "
            f"per-sample NTK is undefined. The mixing happens in {where}. Make every sample's "
            "output a function of that sample alone: no statistics, attention or other "
            "reductions over the batch dimension (normalise per sample, or with running "
            "statistics in eval mode)."
        )
    return True


class _Refused(Exception):
    """Stops the forward at a layer that will misread the inputs; the message is kept apart."""


class _RandomOps(TorchDispatchMode):
    """Records the first operator that draws random numbers, and the module running it."""

    def __init__(self, stack: list[nn.Module]) -> None:
        super().__init__()
        self.stack = stack
        self.found: tuple[str, nn.Module | None] | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.found is None and _draws(func):
            self.found = (func.name(), self.stack[-1] if self.stack else None)
        return func(*args, **(kwargs or {}))


# Kernels that torch tags as seeded because they *may* apply dropout (fused attention and
# its backend choice, fused RNNs): random only with a dropout probability, which
# check_model_state covers for the modules that call them.
_MAY_DROP_OUT = ("attention", "_sdp_", "rnn", "lstm", "gru", "dropout_state")


def _draws(func) -> bool:
    """Whether the operator draws random numbers."""
    if torch.Tag.nondeterministic_seeded not in func.tags:
        return False
    name = func.name()
    return not any(part in name for part in _MAY_DROP_OUT)


# Layers whose first call tells how the model reads its inputs.
_FIRST_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.RNNBase, nn.RNNCellBase, nn.Embedding,
                 nn.EmbeddingBag)


class _Watch:
    """One forward of ``pair`` with hooks on every module and a random-operator mode.

    The first layer of ``_FIRST_LAYERS`` to run is checked against the inputs (the rank
    where it receives them directly, the dtype); ``random`` is the first random draw and
    the module drawing it.
    """

    def __init__(self, model: nn.Module, pair: _inputs.Inputs, x1: _inputs.Inputs) -> None:
        self.model, self.pair = model, pair
        # (label, the pair's leaf, the whole batch's leaf) of every input tensor.
        self.leaves = [(label, t, whole) for (label, t), (_, whole)
                       in zip(_inputs.labelled_leaves("x1", pair),
                              _inputs.labelled_leaves("x1", x1))]
        self.names = {id(m): name for name, m in model.named_modules()}
        self.stack: list[nn.Module] = []
        self.first_layer_seen = False
        self.refusal = ""
        self.random: tuple[str, nn.Module | None] | None = None

    def forward(self, fm, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``fm(params, pair)``; raises :class:`_Refused` at a layer that misreads it."""
        mode = _RandomOps(self.stack)
        with ExitStack() as hooks, torch.no_grad():
            for m in self.model.modules():
                hooks.callback(m.register_forward_pre_hook(self._pre).remove)
                hooks.callback(m.register_forward_hook(self._post).remove)
            with mode:
                out = fm(params, self.pair)
        self.random = mode.found
        return out

    def _pre(self, module, args):
        self.stack.append(module)
        if not self.first_layer_seen and isinstance(module, _FIRST_LAYERS) and args:
            self.first_layer_seen = True
            received = args[0]
            # The input tensor the layer receives as it is, or the model's one input tensor.
            given = next(((name, t, whole) for name, t, whole in self.leaves if t is received),
                         self.leaves[0] if len(self.leaves) == 1 else None)
            refusal = given and _misread_inputs(label(self.names[id(module)], module), module,
                                                received, *given)
            if refusal:
                self.refusal = refusal
                raise _Refused

    def _post(self, module, args, output):
        self.stack.pop()

    def random_message(self) -> str:
        op, module = self.random
        if module is None:
            return _random_message("the model", op, self.model.training)
        return _random_message(label(self.names[id(module)], module), op, module.training)


def _random_message(where: str, op: str, training: bool) -> str:
    fix = ("Call model.eval() first (random layers such as dropout and drop-path should draw "
           "only in train mode)." if training else
           "It does so in eval mode too: draw the noise outside the model, or only when "
           "`self.training` is set, and call model.eval().")
    return (f"`model`'s output is random: {where} draws random numbers ({op}) in its forward, "
            f"so the NTK is undefined. {fix}")


def random_draws_error(err: RuntimeError, model: nn.Module) -> ValueError | None:
    """The error of :func:`check_model_behaviour` for vmap's refusal of a random draw, or None.

    For draws on a path that the check's two samples did not take.
    """
    if "randomness" not in str(err):
        return None
    return ValueError(_random_message("the model", "under vmap", model.training))


def _layout(layer: nn.Module) -> tuple[int, int, int, str] | None:
    """How ``layer`` reads a batch: its rank, features, their axis in a sample, in words."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        d = len(layer.kernel_size)
        spatial = ", ".join(("L",) if d == 1 else ("D", "H", "W")[3 - d:])
        return d + 2, layer.in_channels, 0, f"(N, {layer.in_channels}, {spatial})"
    if isinstance(layer, nn.RNNBase) and layer.batch_first:
        return 3, layer.input_size, -1, f"(N, L, {layer.input_size})"
    if isinstance(layer, nn.RNNCellBase):
        return 2, layer.input_size, -1, f"(N, {layer.input_size})"
    if isinstance(layer, nn.Linear):
        return 2, layer.in_features, -1, f"(N, ..., {layer.in_features})"
    return None


def _misread_inputs(what: str, layer: nn.Module, received, name: str, leaf: torch.Tensor,
                    whole: torch.Tensor) -> str:
    """Why the model's first layer ``what`` will misread the input ``name``; "" if it reads it.

    ``received`` is what the layer was called with, ``leaf`` the input tensor (two samples)
    the model was called with, ``whole`` that input's whole batch.
    """
    dtype = next((p.dtype for p in layer.parameters(recurse=False)), None)
    if not isinstance(received, torch.Tensor) or dtype is None:
        return ""
    embedding = isinstance(layer, (nn.Embedding, nn.EmbeddingBag))
    if embedding and received.is_floating_point() and received is leaf:
        return (f"`{name}` has dtype {whole.dtype} but the model's first layer {what} looks up "
                f"integer token ids: pass {name}.long()")
    integers = not (whole.is_floating_point() or whole.is_complex())
    if not embedding and dtype.is_floating_point and integers and not (
            received.is_floating_point() or received.is_complex()):
        return (f"`{name}` has dtype {whole.dtype} but the model's first layer {what} computes "
                f"in {dtype}: convert the inputs with {name}.float() or {name}.to({dtype}) (and "
                "scale them if they are 0-255 pixel values)")
    layout = _layout(layer)
    # Transformed by the model first, the inputs' layout is the model's own business.
    if layout is None or received is not leaf or leaf.dim() != layout[0] - 1:
        return ""
    _, features, axis, expected = layout
    shape = tuple(whole.shape)
    takes = f"the model's first layer {what} takes inputs {expected}"
    if axis == -1 and features == 1 and len(shape) == 1 and shape[0] != 1:
        return (f"`{name}` of shape {shape} has no feature dimension: {takes}. Pass "
                f"{name}.unsqueeze(1) for {shape[0]} samples of one feature each.")
    if shape[axis] == features:
        return (f"`{name}` of shape {shape} looks like a single sample without its batch "
                f"dimension: {takes}. Pass {name}.unsqueeze(0) for one sample.")
    return f"`{name}` has shape {shape}, but {takes}"


def _first_mixing_module(fm, params: dict[str, torch.Tensor], pair: _inputs.Inputs) -> str:
    """Where sample 0's values first differ between ``pair[:1]`` alone and ``pair``.

    Each module's input and output are compared in call order: the first output that
    differs names that module; an input that differs (its module's output too, then)
    names the code that produced it, the enclosing module's own forward.
    """
    runs = [_record(fm, params, _inputs.take(pair, 0, 1)), _record(fm, params, pair)]
    for (kind, module, parent, a), (_, _, _, b) in zip(*runs):
        sample_a, sample_b = _first_sample(a, b)
        if sample_a is None:
            continue
        if difference(sample_a, sample_b, rounding_tolerance(sample_b)) is not None:
            if kind == "output":
                return module
            return f"the forward of {parent}, before it calls {module}"
    return "the model's own forward code"


def _record(fm, params, x) -> list[tuple[str, str, str, torch.Tensor | None]]:
    """``(kind, module, enclosing module, tensor)`` per module input and output, in order."""
    model = fm.module
    names = {id(m): label(name, m) for name, m in model.named_modules()}
    stack: list[str] = ["the model's forward"]
    events = []

    def first_tensor(value):
        if isinstance(value, (tuple, list)):
            value = value[0] if value else None
        return value if isinstance(value, torch.Tensor) else None

    def pre(module, args):
        events.append(("input", names[id(module)], stack[-1], first_tensor(args)))
        stack.append(names[id(module)])

    def post(module, args, output):
        stack.pop()
        events.append(("output", names[id(module)], stack[-1], first_tensor(output)))

    with ExitStack() as hooks, torch.no_grad():
        for m in model.modules():
            hooks.callback(m.register_forward_pre_hook(pre).remove)
            hooks.callback(m.register_forward_hook(post).remove)
        fm(params, x)
    return events


def _first_sample(alone: torch.Tensor | None, batch: torch.Tensor | None):
    """Sample 0 of both: along the one axis of size 1 in ``alone`` and 2 in ``batch``."""
    if alone is None or batch is None or alone.dim() != batch.dim():
        return None, None
    axes = [d for d in range(alone.dim()) if alone.shape[d] == 1 and batch.shape[d] == 2
            and alone.shape[:d] + alone.shape[d + 1:] == batch.shape[:d] + batch.shape[d + 1:]]
    if not axes:
        return None, None
    return alone.select(axes[0], 0), batch.select(axes[0], 0)
