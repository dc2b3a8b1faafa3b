"""Input validation shared by the public functions.

Every message names the argument, what was expected and what arrived, so that a
user can fix the call without reading our source.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

MODES = ("full", "diagonal", "trace")

# Modules whose per-sample output depends on random draws when training.
_DROPOUT_TYPES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor of shape {tuple(value.shape)} and dtype {value.dtype} on {value.device}"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {options}, got {value!r}")
    return value


def check_module(name: str, model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`{name}` must be a torch.nn.Module, got {_describe(model)}")
    return model


def check_inputs(x1: Any, x2: Any | None) -> None:
    """`x1`/`x2` are tensors with a batch dimension and matching trailing shapes."""
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None and name == "x2":
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor of shape (N, ...), got {_describe(x)}")
        if x.dim() == 0:
            raise ValueError(f"`{name}` must have a batch dimension, shape (N, ...), got a 0-d tensor")
    if x2 is not None:
        if tuple(x1.shape[1:]) != tuple(x2.shape[1:]):
            raise ValueError(
                f"`x2` must share `x1`'s trailing shape {tuple(x1.shape[1:])}, "
                f"got {tuple(x2.shape[1:])}"
            )
        if x1.dtype != x2.dtype:
            raise ValueError(f"`x2` must have `x1`'s dtype {x1.dtype}, got {x2.dtype}")
        if x1.device != x2.device:
            raise ValueError(f"`x2` must be on `x1`'s device {x1.device}, got {x2.device}")


def check_inputs_match_params(x: torch.Tensor, params: dict[str, torch.Tensor]) -> None:
    """Inputs live on the parameters' device and, if floating, share their dtype."""
    if not params:
        return
    name, p = next(iter(params.items()))
    if x.device != p.device:
        raise ValueError(
            f"`x1` is on {x.device} but the model's parameter {name!r} is on {p.device}; "
            f"move the inputs with x.to({str(p.device)!r}) or the model with model.to(...)"
        )
    if x.is_floating_point() and x.dtype != p.dtype:
        raise ValueError(
            f"`x1` has dtype {x.dtype} but the model's parameter {name!r} has dtype {p.dtype}; "
            f"convert one of them (e.g. x.to({p.dtype}) or model.to({p.dtype}))"
        )
    devices = {t.device for t in params.values()}
    dtypes = {t.dtype for t in params.values()}
    if len(devices) > 1:
        raise ValueError(f"the selected parameters must live on one device, got {sorted(map(str, devices))}")
    if len(dtypes) > 1:
        raise ValueError(f"the selected parameters must share one dtype, got {sorted(map(str, dtypes))}")


def check_model_state(model: nn.Module) -> None:
    """Refuse modules whose per-sample output is not a function of that sample alone.

    A kernel of such a model is not defined per pair of inputs; computing one anyway
    would silently mix samples (BatchNorm batch statistics) or random draws (Dropout).
    """
    for name, module in model.named_modules():
        label = f"{name or 'the model'} ({type(module).__name__})"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training:
                raise ValueError(
                    f"`model` has {label} in train mode: its output depends on the whole batch's "
                    "statistics, so the per-sample NTK is undefined. Call model.eval() first."
                )
            if module.running_mean is None:
                raise ValueError(
                    f"`model` has {label} with track_running_stats=False, which normalises with "
                    "batch statistics even in eval mode; the per-sample NTK is undefined."
                )
        if isinstance(module, _DROPOUT_TYPES) and module.training and module.p > 0:
            raise ValueError(
                f"`model` has {label} in train mode with p={module.p}: its output is random, "
                "so the NTK is undefined. Call model.eval() first."
            )
        if isinstance(module, nn.MultiheadAttention) and module.training and module.dropout > 0:
            raise ValueError(
                f"`model` has {label} in train mode with dropout={module.dropout}: its output is "
                "random, so the NTK is undefined. Call model.eval() first."
            )


def check_batch_size(batch_size: Any) -> int | None:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int or None, got {batch_size!r}")
    return batch_size


def check_memory_budget(memory_budget: Any) -> float | None:
    if memory_budget is None:
        return None
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or memory_budget <= 0:
        raise ValueError(
            f"`memory_budget` must be a positive number of bytes (or float('inf')), got {memory_budget!r}"
        )
    return float(memory_budget)
