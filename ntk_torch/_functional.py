"""From an ``nn.Module`` to a pure function ``fn(params, x) -> (N, O)``.

This is the only place that looks at the module's parameters; everything downstream
works on the returned :class:`FunctionalModel`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn
from torch.func import functional_call

from ntk_torch._checks import check_module

ParamSelection = Union[None, Iterable[str], Callable[[str, torch.Tensor], bool]]


@dataclass(frozen=True)
class FunctionalModel:
    """A module seen as a pure function of the selected parameters.

    Attributes:
        module: the user's module (never modified).
        names: selected parameter names, in ``named_parameters()`` order. Tied parameters
            appear once, under the first name PyTorch reports.
        owners: parameter name -> qualified name of the module that owns it (``""`` for
            parameters registered on the root module).
    """

    module: nn.Module
    names: tuple[str, ...]
    owners: dict[str, str]

    def params(self) -> dict[str, torch.Tensor]:
        """Current values of the selected parameters, detached from the user's graph."""
        named = dict(self.module.named_parameters())
        return {name: named[name].detach() for name in self.names}

    def __call__(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Outputs ``(N, O)`` of the module at ``params`` (other parameters as they are)."""
        with _no_fused_attention():
            out = functional_call(self.module, params, (x,), tie_weights=True, strict=False)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"`model` must return a Tensor of shape (N, ...), got {type(out).__name__}; "
                "wrap it so that it returns one tensor"
            )
        if out.dim() == 0 or out.shape[0] != x.shape[0]:
            raise ValueError(
                f"`model` must return outputs of shape (N, ...) with N = {x.shape[0]} inputs, "
                f"got {tuple(out.shape)}"
            )
        return out.reshape(out.shape[0], math.prod(out.shape[1:]))

    def single(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Outputs ``(O,)`` for one input ``x`` without its batch dimension (for vmap)."""
        return self(params, x.unsqueeze(0)).squeeze(0)

    def groups(self, by_layer: bool) -> dict[str, tuple[str, ...]]:
        """Partition of the selected names: one group per owning module, or one in total."""
        if not by_layer:
            return {"": self.names}
        grouped: dict[str, list[str]] = {}
        for name in self.names:
            grouped.setdefault(self.owners[name], []).append(name)
        return {owner: tuple(names) for owner, names in grouped.items()}


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


def functionalize(model: nn.Module, params: ParamSelection = None) -> FunctionalModel:
    """Select parameters of ``model`` and wrap it as a :class:`FunctionalModel`.

    Args:
        model: any ``nn.Module`` mapping a batch ``(N, ...)`` to outputs ``(N, *out)``.
        params: ``None`` for every parameter with ``requires_grad=True``; an iterable of
            parameter names; or a predicate ``(name, param) -> bool``. Unselected parameters
            and buffers are used as they are.
    """
    check_module("model", model)
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
    return FunctionalModel(module=model, names=tuple(names), owners=owners)


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """Map every name of a tied parameter to the one name ``named_parameters`` keeps."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases[name] = first.setdefault(id(p), name)
    return aliases
