"""The first-order Taylor expansion of a model in its parameters, as a trainable module.

For parameters ``θ`` and a snapshot ``θ0``, the linearized model is

    f_lin(x; θ) = f(x; θ0) + J(x; θ0) (θ − θ0),       J = ∂f/∂θ at θ0,

linear in ``θ`` and as nonlinear in ``x`` as the network. Gradient descent on it is kernel
gradient descent with the fixed empirical NTK ``Θ = J Jᵀ`` at ``θ0`` (Lee et al. 2019,
"Wide neural networks of any depth evolve as linear models under gradient descent"), so
training it alongside the real network separates what the kernel explains from what
feature learning adds.

The product ``J (θ − θ0)`` is one forward-mode pass (``torch.func.jvp``): it never builds
``J``, and costs about two to three forward passes.

Inputs are whatever the model takes (positional and keyword tensors, token ids); only the
parameters are expanded, never the inputs, so ``f_lin`` is exact in ``x``. Every tensor the
model returns is expanded; ``output=`` expands only the tensor it selects.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.utils._pytree import tree_flatten, tree_map

from ntk_torch._checks import describe
from ntk_torch._functional import (
    OutputSelection,
    ParamSelection,
    _no_fused_attention,
    functionalize,
    load_forward_mode_rules,
)
from ntk_torch._model_checks import check_model_state


class LinearizedModel(nn.Module):
    """``f(x; θ0) + J(x; θ0)(θ − θ0)`` of a copy of a model; see :func:`linearize`.

    Attributes:
        model: the private copy. Its linearized parameters hold ``θ`` (trainable, initialised
            at ``θ0``); the others are frozen (``requires_grad=False``) and, with its buffers,
            enter as the constants they were at :func:`linearize` time.
        names: the linearized parameter names, in ``named_parameters()`` order.
        output: None, or what selects the tensor to expand from the model's return value.
        model_kwargs: keyword arguments added to every call (the call's own win).
    """

    def __init__(self, model: nn.Module, params: ParamSelection = None, *,
                 output: OutputSelection = None,
                 model_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        fm = functionalize(model, params, output=output, model_kwargs=model_kwargs)
        selected, self.output, self.model_kwargs = fm.names, fm.output, fm.model_kwargs
        try:
            clone = copy.deepcopy(model)
        except Exception as error:  # noqa: BLE001 - re-raised with the user's context
            raise TypeError(
                f"linearize needs a private copy of `model` ({type(model).__name__}) so that "
                f"training never touches the original, but copy.deepcopy failed: {error}"
            ) from error
        named = dict(clone.named_parameters())
        for name in selected:
            if not named[name].is_floating_point():
                raise TypeError(f"parameter {name!r} has dtype {named[name].dtype}; only floating "
                                "parameters can be linearized, deselect it with `params=`")
        for name, p in named.items():
            # A parameter left out of the linearization is a constant of f_lin; freezing it
            # keeps optimizers over `.parameters()` from moving it through f(x; θ0).
            if name not in selected:
                p.requires_grad_(False)
            else:
                p.requires_grad_(True)
        self.model = clone
        self.names: tuple[str, ...] = selected
        self._padding_rows = _padding_rows(clone, selected)
        # θ0 as persistent buffers: they follow .to()/.double() and state_dict with the copy.
        self.theta0 = nn.Module()
        for i, name in enumerate(selected):
            self.theta0.register_buffer(str(i), named[name].detach().clone())

    def initial_params(self) -> dict[str, torch.Tensor]:
        """``θ0``: parameter name -> the snapshot the expansion is taken at."""
        return {name: getattr(self.theta0, str(i)) for i, name in enumerate(self.names)}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's call signature, each output ``f(x; θ0) + J(x; θ0)(θ − θ0)``.

        Returns what the model returns (tensors, or tuples, lists, dicts and other
        containers of them), or the tensor ``output`` selects from it.
        """
        kwargs = {**self.model_kwargs, **kwargs}  # a call's own keywords take precedence
        check_model_state(self.model)
        theta0 = self.initial_params()
        current = dict(self.model.named_parameters())
        # The tangent carries θ's autograd graph, so a backward pass reaches θ through the
        # (linear) jvp output; θ0 is a buffer and receives no gradient.
        tangent = {name: current[name] - theta0[name] for name in self.names}
        for name, row in self._padding_rows:
            # Reverse mode gives an embedding's padding row zero derivative, forward mode does
            # not; follow reverse mode, the convention of the Jacobian and of the package's NTK.
            index = torch.tensor([row], device=tangent[name].device)
            tangent[name] = tangent[name].index_fill(0, index, 0.0)

        def at(params: dict[str, torch.Tensor]) -> Any:
            out = functional_call(self.model, params, args, kwargs, tie_weights=True, strict=False)
            out = out if self.output is None else self.output(out)
            leaves = tree_flatten(out)[0]
            if not all(isinstance(t, torch.Tensor) for t in leaves):
                other = next(t for t in leaves if not isinstance(t, torch.Tensor))
                raise TypeError(
                    f"`model` returned {describe(other)} among its outputs; linearize expands "
                    "tensors only: pass `output=` to select the tensor to expand, e.g. "
                    "output=lambda o: o.logits")
            return out

        with _no_fused_attention():
            load_forward_mode_rules()
            value, derivative = jvp(at, (theta0,), (tangent,))
        return tree_map(torch.add, value, derivative)

    def extra_repr(self) -> str:
        """How many parameters the expansion is in."""
        return f"linearized parameters: {len(self.names)}"


def _padding_rows(model: nn.Module, selected: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """``(parameter name, padding_idx)`` of the selected weights of padded embeddings."""
    uses: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        uses.setdefault(id(p), []).append(name)
    canonical = {id(p): name for name, p in model.named_parameters()}
    rows = []
    for module_name, module in model.named_modules():
        if not isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or module.padding_idx is None:
            continue
        name = canonical.get(id(module.weight))
        if name not in selected:
            continue
        if len(uses[id(module.weight)]) > 1:
            others = sorted(set(uses[id(module.weight)]) - {name})
            warnings.warn(
                f"`model` ties the weight of padded embedding {module_name!r} to "
                f"{others}; its padding row gets zero derivative "
                "through the embedding but not through the other uses, which one linearization "
                "cannot follow: the padding row's tangent is kept, as forward mode computes it",
                UserWarning, stacklevel=3)
            continue
        rows.append((name, int(module.padding_idx)))
    return tuple(rows)


def linearize(model: nn.Module, *, params: ParamSelection = None, output: OutputSelection = None,
              model_kwargs: dict[str, Any] | None = None) -> LinearizedModel:
    """A trainable module computing the model's first-order Taylor expansion.

    The expansion is taken at the model's current parameters.

    ``f_lin(x; θ) = f(x; θ0) + J(x; θ0)(θ − θ0)`` with ``θ0`` the current parameter values
    and ``J`` the ``(N, O, P)`` Jacobian of the outputs. The result owns a deep copy of
    ``model``: its parameters are ``θ`` (initialised at ``θ0``) and are what any
    ``torch.optim`` optimizer trains; ``θ0`` is kept in buffers. ``model`` itself is never
    modified. At ``θ = θ0`` the outputs and their Jacobian equal the model's; the empirical
    NTK of ``f_lin`` is the model's NTK at ``θ0`` for every ``θ``. The padding row of an
    ``nn.Embedding``/``nn.EmbeddingBag`` with ``padding_idx`` has zero derivative, as in
    autograd (forward mode alone would let it move ``f_lin``).

    Args:
        model: any ``nn.Module``. Its train/eval mode is respected: BatchNorm or Dropout in
            train mode is an error (the expansion of a batch-dependent or random function
            is not defined); call ``model.eval()`` first.
        params: which parameters to linearize: ``None`` (every parameter with
            ``requires_grad``), parameter names, or a predicate ``(name, param) -> bool``.
            The others, and all buffers, are constants: frozen in the copy.
        output: None to expand every tensor the model returns, or a callable selecting the
            one to expand (e.g. ``lambda o: o.logits``), which the result then returns; needed
            when the model also returns non-tensors (a Hugging Face cache).
        model_kwargs: keyword arguments added to every call (e.g. ``{"use_cache": False}``).

    Returns:
        A :class:`LinearizedModel` called exactly like ``model`` (positional and keyword
        arguments, so ``lin(*x)`` or ``lin(**x)`` for a tuple or dict batch ``x``),
        returning outputs of the model's shapes. Its empirical NTK on ``x`` (with the same
        ``output=``) is the model's at ``θ0``.

    Example:
        A network and its linearization agree at ``θ0``; after a step only ``f_lin`` stays
        linear in ``θ``:

        >>> import torch, ntk_torch as nt
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> lin = nt.linearize(net)
        >>> x = torch.randn(5, 2)
        >>> torch.allclose(lin(x), net(x))
        True
        >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        >>> lin(x).pow(2).sum().backward(); opt.step()
        >>> sorted(lin.state_dict())[:2]
        ['model.0.bias', 'model.0.weight']
    """
    return LinearizedModel(model, params, output=output, model_kwargs=model_kwargs)
