"""Reading a model without disturbing it.

The outputs of named layers, captured by forward hooks, and a context that measures in
eval mode and restores every mode and RNG state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ntk_torch import _inputs

__all__ = ["layer_outputs", "measuring"]


@contextmanager
def measuring(model: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd graph, and the RNG state and per-module modes restored."""
    modes = [(m, m.training) for m in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    cuda_rng = torch.cuda.get_rng_state_all() if cuda else None
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        # Per module, not model.train(flag): the user may keep some submodules in eval.
        for module, training in modes:
            module.training = training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None


def layer_outputs(model: nn.Module, x: _inputs.Inputs, layers: tuple[str, ...],
                  model_kwargs: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Outputs ``(N, D)`` of the named modules on ``x``, by forward hooks removed afterwards.

    ``x`` is a batch as ``_inputs`` normalises it, passed with ``model_kwargs``.
    """
    modules = dict(model.named_modules())
    n = _inputs.batch_size(x)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is None:
                raise TypeError(
                    f"layer {name!r} ({type(module).__name__}) returned no tensor to track")
            if tensor.dim() == 0 or tensor.shape[0] != n:
                raise ValueError(
                    f"layer {name!r} ({type(module).__name__}) returned shape "
                    f"{tuple(tensor.shape)}, expected features (N, ...) with N = {n} "
                    "probe samples; leave it out of `layers`"
                )
            # Clone: a later in-place op (ReLU(inplace=True)) would overwrite the stored output.
            seen[name].append(tensor.detach().reshape(tensor.shape[0], -1).clone())
        return hook

    try:
        for name in layers:
            handles.append(modules[name].register_forward_hook(hook_for(name)))
        args, kwargs = _inputs.arguments(x, model_kwargs or {})
        model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, outs in seen.items() if not outs]
    if missing:
        raise ValueError(f"layers {missing} were not called by the model's forward on `probe_x`; "
                         "leave them out of `layers`")
    return {name: outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
            for name, outs in seen.items()}
