"""``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``: the recurrent cells' two products, unrolled.

The module hands its input, its state and all its weights to one fused function
(``torch.lstm``, ``gru``, ``rnn_tanh``, ``rnn_relu``) that runs every step of every layer
and direction, so none of the products is a tensor a hook sees.

While the structured engine runs the model, a ``TorchFunctionMode`` computes such a call
itself when its weights are exactly a module's own: over layers, directions and steps,
with the gates of the recurrent cells (``_recurrence``). Layer ``l`` in direction ``d``
(``k = l·directions + d``) has two (weight, bias) pairs: ``2k`` (``weight_ih_l{l}``,
``bias_ih_l{l}``, with ``_reverse`` for ``d = 1``) meets the layer's input sequence, in
one call with a position per step (that product does not depend on the recurrence), and
``2k + 1`` (``weight_hh_l{l}``, ``bias_hh_l{l}``) meets the hidden state, in one call per
step.

On the probe, the first call of each fused call (pair 0) also recomputes the whole call
both ways in float64 and checks that they agree (:meth:`RecurrentRule.verify`); where they
do not, the module's parameters take the fallback and it computes as it is. Calls on a
``PackedSequence`` (the fused functions' other signature), with dropout applied between
layers (train mode), and modules with ``proj_size > 0`` are left to the module too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._pytree import tree_map

from ntk_torch._engines._layers._base import CallsMode, LayerRule, Site, register
from ntk_torch._engines._layers._recurrence import GATES, tensors

# The kind of step (``_recurrence.GATES``) of each fused function.
_KIND: dict[Callable, str] = {torch.lstm: "lstm", torch.gru: "gru", torch.rnn_tanh: "rnn_tanh",
                              torch.rnn_relu: "rnn_relu"}

# In float64 the fused and the unrolled call differ by rounding, about 1e-16 of the values
# per operation, grown along the steps of the recurrence; a different formula or layout
# changes the outputs by their own order. sqrt(eps) leaves 1e8 between the two.
_RTOL = torch.finfo(torch.float64).eps ** 0.5


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.LSTM):
        return "lstm"
    if isinstance(module, nn.GRU):
        return "gru"
    return f"rnn_{module.nonlinearity}"


def _unrolled(kind: str, args: tuple, linear: Callable) -> tuple[torch.Tensor, ...]:
    """The fused function's result on ``args``, step by step.

    ``args`` as the module passes them: ``(input, hx, weights, has_biases, num_layers,
    dropout, train, bidirectional, batch_first)`` (dropout not applied: the caller checks
    that there is none). ``linear(pair, input, weight, bias)`` computes each product.
    """
    x, hx, weights, has_biases, num_layers, _, _, bidirectional, batch_first = args
    directions = 2 if bidirectional else 1
    per_direction = 4 if has_biases else 2  # w_ih, w_hh[, b_ih, b_hh]
    seq = x if batch_first else x.transpose(0, 1)  # (B, T, features), batch first
    states = tensors(hx)  # each (layers · directions, B, H)
    steps = seq.shape[1]
    finals = []
    for layer in range(num_layers):
        outputs = []
        for d in range(directions):
            k = layer * directions + d
            w_ih, w_hh, *biases = weights[per_direction * k: per_direction * (k + 1)]
            b_ih, b_hh = biases or (None, None)
            gi = linear(2 * k, seq, w_ih, b_ih)
            state = tuple(s[k] for s in states)
            ys: list = [None] * steps
            for t in (range(steps) if d == 0 else range(steps - 1, -1, -1)):
                gh = linear(2 * k + 1, state[0], w_hh, b_hh)
                state = tensors(GATES[kind](gi[:, t], gh, state if kind == "lstm" else state[0]))
                ys[t] = state[0]
            finals.append(state)
            outputs.append(torch.stack(ys, 1))
        seq = torch.cat(outputs, -1) if directions > 1 else outputs[0]
    return (seq if batch_first else seq.transpose(0, 1),
            *(torch.stack(parts) for parts in zip(*finals)))


class _UnrolledCalls(CallsMode):
    """Computes the fused calls of ``modules`` unrolled, their products as layer calls."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = _KIND.get(func)
        # The unpacked signature, without dropout applied (args[5] the rate, args[6] train).
        if (kind is not None and not kwargs and len(args) == 9
                and isinstance(args[2], (list, tuple)) and (args[5] == 0 or not args[6])):
            module = next((m for m in self.modules if _kind(m) == kind and _own(m, args[2])),
                          None)
            if module is not None:
                def linear(pair, x, weight, bias):
                    inputs = (x, (func, args)) if pair == 0 else (x,)
                    return self.on_call(module, inputs, F.linear(x, weight, bias), pair)

                return _unrolled(kind, args, linear)
        return func(*args, **(kwargs or {}))


class RecurrentRule(LayerRule):
    mode = _UnrolledCalls
    name = "recurrent"
    modules = ((nn.LSTM, ("forward",)), (nn.GRU, ("forward",)), (nn.RNN, ("forward",)))

    def accepts(self, module: nn.Module) -> bool:
        return module.proj_size == 0  # the projected state is a third product per step

    def pairs(self, module: nn.Module) -> tuple[tuple[str, str], ...]:
        suffixes = ("", "_reverse") if module.bidirectional else ("",)
        return tuple((f"weight_{p}_l{layer}{s}", f"bias_{p}_l{layer}{s}")
                     for layer in range(module.num_layers) for s in suffixes
                     for p in ("ih", "hh"))

    def sizes(self, module: nn.Module, site: Site) -> tuple[int, int, int, int]:
        k_in = site.in_shape[-1]
        return math.prod(site.in_shape) // k_in, 1, k_in, site.out_shape[-1]

    def verify(self, module: nn.Module, args: tuple, output: torch.Tensor, pair: int = 0) -> bool:
        """Whether torch's fused call and the unrolled one agree on this call, in float64.

        Checked at the call's first product, whose ``args`` also carry the fused call
        ``(function, arguments)``; the other products are part of the same call.
        """
        if len(args) < 2:
            return True
        func, call = args[1]
        call = tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) else t, call)
        expected = func(*call)
        unrolled = _unrolled(_KIND[func], call, lambda _, x, w, b: F.linear(x, w, b))
        tol = _RTOL * (1.0 + max(float(e.abs().max()) for e in expected))
        return all(a.shape == b.shape and bool(((a - b).abs() <= tol).all())
                   for a, b in zip(unrolled, expected, strict=True))



def _own(module: nn.Module, weights) -> bool:
    """Whether ``weights`` are exactly the module's flat weights (as functional_call set them)."""
    names = module._flat_weights_names
    return len(weights) == len(names) and all(w is getattr(module, n)
                                              for w, n in zip(weights, names))


RECURRENT = register(RecurrentRule())
