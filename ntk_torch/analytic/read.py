"""Infinite-width kernels of a PyTorch model: its layers read into ``Kernel -> Kernel`` maps.

:func:`kernel` reads the *architecture and its initialisation distribution*, never the
current weights, at the model's actual widths. ``nn.Sequential`` models (nested ones and
:class:`ntk_torch.nn.MLP` included) of supported layers are read layer by layer
(``_leaves``: dense and convolutional layers, activations, pooling, LayerNorm, flatten,
dropout); any other module is traced by ``torch.fx`` and read node by node (``_graph``:
the same layers plus residual sums, concatenation, scaling, functional activations and
pooling). A parameter with ``requires_grad=False`` contributes no NTK term, as in
:func:`ntk_torch.empirical_ntk`.
"""

from __future__ import annotations

import torch
from torch import nn

from ntk_torch._checks import check_dtype, check_inputs, check_module
from ntk_torch.analytic import layers as L
from ntk_torch.analytic._evaluate import evaluate
from ntk_torch.analytic._graph import read_graph
from ntk_torch.analytic._leaves import SUPPORTED, leaf_layer
from ntk_torch.analytic._limit import Kernel

__all__ = ["SUPPORTED", "kernel", "leaf_layer", "read_layers"]

def read_layers(model: nn.Module) -> list[tuple[str, nn.Module, L.Layer]]:
    """``(qualified name, module, Kernel -> Kernel map)`` for each leaf layer, in order.

    Raises:
        ValueError: naming the first layer that has no analytic kernel.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> [name for name, _, _ in read_layers(net)]
        ['0', '1', '2']
    """
    check_module("model", model)
    out: list[tuple[str, nn.Module, L.Layer]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        if isinstance(module, nn.Sequential):
            for child_name, child in module.named_children():
                visit(f"{prefix}.{child_name}" if prefix else child_name, child)
        else:
            out.append((prefix or type(module).__name__, module,
                        leaf_layer(prefix or "model", module)))

    visit("", model)
    return out


def kernel(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, *,
           dtype: torch.dtype = torch.float64, batch_size: int | None = None) -> Kernel:
    """Infinite-width NNGP and NTK of ``model``'s architecture on ``x1`` and ``x2``.

    The per-output kernels: ``nngp[a, b] = E[f_o(x1_a) f_o(x2_b)]`` and ``ntk[a, b]`` the
    limit of ``empirical_ntk(model, x1, x2, mode="trace")`` (the mean over the ``O``
    outputs), both over random initialisations. Layers are read as described in this
    module's docstring: an ``nn.Sequential`` of supported layers layer by layer, any other
    module through ``torch.fx``, which runs it once, without gradients, on two copies of
    the first input to learn its shapes. The model is not changed.

    Args:
        model: an ``nn.Sequential`` (possibly nested) of supported layers, an
            :class:`ntk_torch.nn.MLP`, or any module whose forward ``torch.fx`` traces into
            supported operations (docs: "Any module").
        x1: ``(N1, d)``, ``(N1, C, L)`` or ``(N1, C, H, W)`` inputs (or what the model's
            forward first reshapes into one of these).
        x2: same trailing shape, ``(N2, ...)``; ``None`` means ``x1`` (symmetric result).
        dtype: computation and result dtype; float64 by default.
        batch_size: samples per block of the ``(N1, N2)`` grid (memory bound); ``None``
            picks one that keeps each array of a block near 1 MB
            (362 x 362 pairs of vectors).

    Returns:
        :class:`Kernel` with ``nngp`` and ``ntk`` of shape ``(N1, N2)``, on ``x1``'s device.

    Raises:
        ValueError: for an unsupported layer or operation (named, with its source line),
            branches that are not independent, or inconsistent shapes.

    Example:
        >>> import torch, ntk_torch as nt
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> k = nt.analytic.kernel(torch.nn.Linear(3, 2), x)  # σ_w² = 1/3, σ_b² = 1/9
        >>> torch.allclose(k.nngp, (x @ x.T + 1) / 9), torch.allclose(k.ntk, x @ x.T + 1)
        (True, True)
    """
    check_module("model", model)
    check_dtype(dtype)
    check_inputs(x1, x2)
    try:
        layers = read_layers(model)
    except ValueError:
        example = x1[:1] if len(x1) else (x2[:1] if x2 is not None and len(x2) else None)
        if example is None:
            example = torch.zeros(1, *x1.shape[1:])
        program, input_shape = read_graph(model, example)
        if input_shape is not None:
            x1 = x1.reshape(len(x1), *input_shape)
            x2 = None if x2 is None else x2.reshape(len(x2), *input_shape)
        layers = [("", model, program)]
    return evaluate(layers, x1, x2, dtype, batch_size)
