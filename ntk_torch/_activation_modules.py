"""Activations as modules: by name, as given, or wrapping an elementwise function."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

ActivationSpec = str | nn.Module | Callable[[torch.Tensor], torch.Tensor]

__all__ = ["ActivationSpec", "Elementwise", "activation_module"]


class Elementwise(nn.Module):
    """An elementwise function ``φ`` as a module: ``forward(x) = fn(x)``.

    Args:
        fn: maps a tensor to a tensor of the same shape, entry by entry (``torch.erf``,
            ``torch.sin``, ``lambda x: x * torch.sigmoid(x)``, ...).
        name: shown in ``repr``; defaults to ``fn.__name__``.

    Example:
        >>> import torch
        >>> Elementwise(torch.erf)(torch.zeros(2))
        tensor([0., 0.])
    """

    # Its public home, which pickles and store fingerprints (module class paths) record.
    __module__ = "ntk_torch.nn"

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str | None = None) -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(f"`fn` must be a callable tensor -> tensor, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


_NAMED_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "abs": lambda: Elementwise(torch.abs, "abs"),
    "identity": nn.Identity,
    "linear": nn.Identity,
    "erf": lambda: Elementwise(torch.erf, "erf"),
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "mish": nn.Mish,
    "sin": lambda: Elementwise(torch.sin, "sin"),
    "cos": lambda: Elementwise(torch.cos, "cos"),
}


def activation_module(activation: ActivationSpec) -> nn.Module:
    """A fresh module for an activation given by name, module or elementwise callable.

    Names: ``"relu"``, ``"leaky_relu"`` (slope 0.01, PyTorch's default; pass
    ``nn.LeakyReLU(slope)`` for another), ``"abs"``, ``"identity"``/``"linear"``, ``"erf"``,
    ``"gelu"`` (exact), ``"tanh"``, ``"sigmoid"``, ``"silu"``/``"swish"``, ``"softplus"``,
    ``"elu"``, ``"selu"``, ``"mish"``, ``"sin"``, ``"cos"``. A module is deep-copied (each
    layer gets its own); any other callable is wrapped in :class:`Elementwise`.

    Example:
        >>> activation_module("erf")
        Elementwise(erf)
    """
    if isinstance(activation, str):
        key = activation.lower()
        if key not in _NAMED_ACTIVATIONS:
            names = ", ".join(repr(k) for k in _NAMED_ACTIVATIONS)
            raise ValueError(
                f"`activation` must be one of {names}, an nn.Module or an elementwise callable, "
                f"got {activation!r}"
            )
        return _NAMED_ACTIVATIONS[key]()
    if isinstance(activation, nn.Module):
        return copy.deepcopy(activation)
    if callable(activation):
        return Elementwise(activation)
    raise TypeError(
        "`activation` must be a name, an nn.Module or an elementwise callable, "
        f"got {type(activation).__name__}"
    )
