"""From an ``nn.Module`` to a pure function ``fn(params, x) -> (N, O)``.

This is the only place that looks at the module's parameters and calls the module;
everything downstream works on the returned :class:`FunctionalModel`. The batch ``x`` is a
tensor, a tuple or a dict of tensors (``_inputs``); ``model_kwargs`` are passed on every
call and ``output`` picks the tensor from what the module returns (a Hugging Face
``ModelOutput``, a tuple, a dict).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn
from torch.func import functional_call, jvp

from ntk_torch import _inputs
from ntk_torch._checks import check_module, describe

ParamSelection = Union[None, Iterable[str], Callable[[str, torch.Tensor], bool]]
OutputSelection = Union[None, Callable[[Any], torch.Tensor]]


@dataclass(frozen=True)
class FunctionalModel:
    """A module seen as a pure function of the selected parameters.

    Attributes:
        module: the user's module (never modified).
        names: selected parameter names, in ``named_parameters()`` order. Tied parameters
            appear once, under the first name PyTorch reports.
        owners: parameter name -> qualified name of the module that owns it (``""`` for
            parameters registered on the root module).
        output: ``None`` (the module returns the tensor ``(N, ...)``) or a callable taking
            what the module returns to that tensor.
        model_kwargs: keyword arguments passed on every call, not batched.
    """

    module: nn.Module
    names: tuple[str, ...]
    owners: dict[str, str]
    output: OutputSelection = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def params(self) -> dict[str, torch.Tensor]:
        """Current values of the selected parameters, detached from the user's graph."""
        named = dict(self.module.named_parameters())
        return {name: named[name].detach() for name in self.names}

    def __call__(self, params: dict[str, torch.Tensor], x: _inputs.Inputs) -> torch.Tensor:
        """Outputs ``(N, O)`` of the module at ``params`` (other parameters as they are)."""
        return forward(self.module, x, params=params, output=self.output,
                       model_kwargs=self.model_kwargs)

    def single(self, params: dict[str, torch.Tensor], x: _inputs.Inputs) -> torch.Tensor:
        """Outputs ``(O,)`` for one input ``x`` without its batch dimension (for vmap)."""
        return self(params, _inputs.with_batch_dim(x)).squeeze(0)

    def groups(self, by_layer: bool) -> dict[str, tuple[str, ...]]:
        """Partition of the selected names: one group per owning module, or one in total."""
        if not by_layer:
            return {"": self.names}
        grouped: dict[str, list[str]] = {}
        for name in self.names:
            grouped.setdefault(self.owners[name], []).append(name)
        return {owner: tuple(names) for owner, names in grouped.items()}


def forward(module: nn.Module, x: _inputs.Inputs, *, params: dict[str, torch.Tensor] | None = None,
            output: OutputSelection = None,
            model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    """Outputs ``(N, O)`` of ``module`` on the batch ``x`` (flattened per sample).

    ``params`` replaces some of the module's parameters (``functional_call``; None: the
    module as it is); ``output`` and ``model_kwargs`` as in :class:`FunctionalModel`.
    """
    args, kwargs = _inputs.arguments(x, model_kwargs or {})
    n = _inputs.batch_size(x)
    with _no_fused_attention():
        if params is None:
            out = module(*args, **kwargs)
        else:
            out = functional_call(module, params, args, kwargs, tie_weights=True, strict=False)
    if output is not None:
        out = output(out)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"`output` must return a Tensor of shape (N, ...), got "
                            f"{_returned(out, n)}")
    elif not isinstance(out, torch.Tensor):
        raise TypeError(f"`model` must return a Tensor of shape (N, ...), got "
                        f"{_returned(out, n)}; pass `output=` to select it, e.g. "
                        f"{_suggestion(out)}")
    if out.dim() == 0 or out.shape[0] != n:
        source = "`output`" if output is not None else "`model`"
        raise ValueError(f"{source} must return outputs of shape (N, ...) with N = {n} inputs, "
                         f"got {tuple(out.shape)}")
    return out.reshape(out.shape[0], math.prod(out.shape[1:]))


def _returned(value: Any, n: int) -> str:
    """What a model returned on ``n`` samples: its type and, for containers, the shapes inside.

    A leading dimension of ``n`` is written ``N``: the call may be on part of the batch.
    """
    def short(v: Any) -> str:
        if not isinstance(v, torch.Tensor):
            return type(v).__name__
        if v.dim() and v.shape[0] == n:
            return "Tensor (" + ", ".join(["N", *map(str, v.shape[1:])]) + ")"
        return f"Tensor {tuple(v.shape)}"

    if isinstance(value, Mapping):  # dicts and Hugging Face ModelOutputs
        inside = ", ".join(f"{k!r}: {short(v)}" for k, v in list(value.items())[:6])
        return f"{type(value).__name__} {{{inside}}}"
    if isinstance(value, (tuple, list)):
        inside = ", ".join(short(v) for v in value[:6])
        return f"{type(value).__name__} ({inside})"
    return describe(value)


def _suggestion(value: Any) -> str:
    """An ``output=`` that picks the first tensor of ``value``."""
    if isinstance(value, Mapping):
        key = next((k for k, v in value.items() if isinstance(v, torch.Tensor)), None)
        if key is not None:
            attribute = isinstance(key, str) and key.isidentifier() and hasattr(value, key)
            return f"output=lambda o: o.{key}" if attribute else f"output=lambda o: o[{key!r}]"
    if isinstance(value, (tuple, list)):
        index = next((i for i, v in enumerate(value) if isinstance(v, torch.Tensor)), None)
        if index is not None:
            return f"output=lambda o: o[{index}]"
    return "output=lambda o: o.logits"


# What torch.func.vmap says when the model converts a batched tensor to a Python value.
_VMAP_CONTROL_FLOW = "data-dependent control flow"


@contextmanager
def vmap_errors_explained(implementation: str):
    """Re-raise vmap's refusal of value-dependent control flow with what to do about it.

    The vmap engines run the model one sample at a time under ``torch.func.vmap``; a
    forward that branches on its inputs' values (``if mask.all():``) cannot be batched that
    way. The probe of ``implementation="auto"`` finds such models first and takes the
    autograd engine; this is the guard for a branch the probe's sample did not reach.
    """
    try:
        yield
    except RuntimeError as error:
        if _VMAP_CONTROL_FLOW not in str(error):
            raise
        raise RuntimeError(
            f"implementation={implementation!r} runs the model one sample at a time under "
            "torch.func.vmap, and the model's forward branches on the values of its inputs "
            "(Python control flow on a tensor, such as `if mask.all():`), which vmap cannot "
            "batch. Use implementation='autograd' (plain autograd, one sample at a time), or "
            "write the branch with torch.where. Hugging Face models branch so when they "
            "prepare a 2-D attention mask; a 4-D float mask (N, 1, 1, L), 0 where attended and "
            "the dtype's minimum elsewhere, is used as it is and runs on every engine."
        ) from error


@functools.cache
def load_forward_mode_rules() -> None:
    """Have torch load its forward-mode decompositions now, without a deprecation warning.

    torch loads them on the process's first forward-mode pass and compiles them with
    ``torch.jit.script``, which warns that TorchScript is deprecated: a warning about
    torch's own internals that users can do nothing about. A tiny ``jvp`` here does that
    load with exactly that warning silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is (deprecated|not "
                                "supported)", category=DeprecationWarning)
        jvp(torch.sin, (torch.zeros(()),), (torch.ones(()),))


@contextmanager
def _no_fused_attention():
    """Run attention through its unfused, composite implementation.

    In eval mode PyTorch routes ``nn.MultiheadAttention``/Transformer layers and
    ``scaled_dot_product_attention`` through fused kernels that have no forward-mode
    derivative (``jvp`` fails) and no vmap rule; the composite path computes the same
    function from differentiable primitives.
    """
    with ExitStack() as stack:
        mha = getattr(torch.backends, "mha", None)
        if mha is not None and hasattr(mha, "set_fastpath_enabled"):
            previous = mha.get_fastpath_enabled()
            mha.set_fastpath_enabled(False)
            stack.callback(mha.set_fastpath_enabled, previous)
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:  # torch < 2.3 has no backend selection; nothing to switch
            pass
        else:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


def functionalize(model: nn.Module, params: ParamSelection = None, *,
                  output: OutputSelection = None,
                  model_kwargs: dict[str, Any] | None = None) -> FunctionalModel:
    """Select parameters of ``model`` and wrap it as a :class:`FunctionalModel`.

    Args:
        model: any ``nn.Module`` mapping a batch ``(N, ...)`` to outputs ``(N, *out)``.
        params: ``None`` for every parameter with ``requires_grad=True``; an iterable of
            parameter names; or a predicate ``(name, param) -> bool``. Unselected parameters
            and buffers are used as they are.
        output: ``None`` or a callable from what ``model`` returns to a tensor ``(N, ...)``.
        model_kwargs: keyword arguments passed on every call (not batched).
    """
    check_module("model", model)
    output = check_output(output)
    model_kwargs = _inputs.check_model_kwargs(model_kwargs)
    named = list(model.named_parameters())  # deduplicates tied parameters
    if params is None:
        names = [n for n, p in named if p.requires_grad]
        if not names:
            raise ValueError(
                "`model` has no trainable parameters (every parameter has requires_grad=False); "
                "pass `params=` to choose the parameters to differentiate"
            )
    elif callable(params):
        names = [n for n, p in named if params(n, p)]
        if not names:
            raise ValueError("`params` predicate selected no parameters of `model`")
    else:
        if isinstance(params, str):
            raise TypeError(
                f"`params` must be None, an iterable of names or a predicate, got the string "
                f"{params!r}; use [{params!r}]"
            )
        wanted = list(params)
        known = {n for n, _ in named}
        aliases = _tied_aliases(model)
        resolved = []
        for n in wanted:
            if not isinstance(n, str):
                raise TypeError(f"`params` must contain parameter names (str), got {n!r}")
            n = aliases.get(n, n)
            if n not in known:
                close = ", ".join(sorted(known)[:8])
                raise ValueError(f"`params` names unknown parameter {n!r}; the model has: {close}")
            resolved.append(n)
        if not resolved:
            raise ValueError("`params` selected no parameters of `model`")
        names = [n for n, _ in named if n in set(resolved)]
    owners = {n: n.rpartition(".")[0] for n in names}
    return FunctionalModel(module=model, names=tuple(names), owners=owners, output=output,
                           model_kwargs=model_kwargs)


def check_output(output: Any) -> OutputSelection:
    """``output`` is None or a callable."""
    if output is not None and not callable(output):
        raise TypeError("`output` must be None or a callable from what the model returns to a "
                        f"Tensor (N, ...), e.g. lambda o: o.logits; got {describe(output)}")
    return output


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """Map every name of a tied parameter to the one name ``named_parameters`` keeps."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases[name] = first.setdefault(id(p), name)
    return aliases
