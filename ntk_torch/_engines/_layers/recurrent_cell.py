"""``nn.LSTMCell``, ``nn.GRUCell`` and ``nn.RNNCell``: two linear maps per step.

A step computes ``gi = W_ih x + b_ih`` from its input and ``gh = W_hh h + b_hh`` from the
hidden state (``k_out`` = 4, 3 or 1 times the hidden size: the gates' pre-activations),
then the cell's gates from them. The module hands its four tensors to one fused function
(``torch.lstm_cell``, ``gru_cell``, ``rnn_tanh_cell``, ``rnn_relu_cell``), so neither
product is a tensor a hook sees.

While the structured engine runs the model, a ``TorchFunctionMode`` computes such a call
itself when its tensors are exactly a cell's own: ``gi`` and ``gh`` as two layer calls,
pair 0 (``weight_ih``, ``bias_ih``) on ``x`` and pair 1 (``weight_hh``, ``bias_hh``) on
``h``, then the gates as the fused function defines them. Each pair is then a linear layer
with one position per step: a cell unrolled over ``T`` steps has ``T`` calls of each,
summed like the calls of any layer called several times. The two pairs' cotangents are
kept apart because they differ in the GRU, whose new gate reads ``r ⊙ gh_n``.

On the probe, every step also runs the fused function on the same input and state and
must agree with the unfused gates to rounding (:meth:`RecurrentCellRule.verify`); where
it does not, the cell's parameters take the fallback and the module computes as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ntk_torch._engines._layers._base import CallsMode, LayerRule, Site, register
from ntk_torch._engines._layers._recurrence import GATES, tensors

# The fused functions' parameter arguments, in their order (after the input and the state).
_ARGUMENTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")

# The fused function and the unfused one differ by the rounding of a few operations per
# element; a different formula differs by far more.
_RTOL_ULPS = 64


# The kind of step (``_recurrence.GATES``) of each fused function.
_KIND: dict[Callable, str] = {torch.lstm_cell: "lstm", torch.gru_cell: "gru",
                              torch.rnn_tanh_cell: "rnn_tanh", torch.rnn_relu_cell: "rnn_relu"}


def _fused(module: nn.Module) -> Callable:
    """The fused function the module's own forward calls."""
    if isinstance(module, nn.LSTMCell):
        return torch.lstm_cell
    if isinstance(module, nn.GRUCell):
        return torch.gru_cell
    return torch.rnn_tanh_cell if module.nonlinearity == "tanh" else torch.rnn_relu_cell


class _UnfusedSteps(CallsMode):
    """Computes the fused steps of ``modules`` with their two products as layer calls."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _KIND and not kwargs and len(args) == 6:
            x, hx, w_ih, w_hh, b_ih, b_hh = args
            # Found by all four tensors (as functional_call has set them at this call), so
            # that each product is attributed to the parameters it is made of.
            module = next((m for m in self.modules if _fused(m) is func
                           and all(t is getattr(m, a) for t, a in zip(args[2:], _ARGUMENTS))),
                          None)
            if module is not None:
                h = tensors(hx)[0]
                gi = self.on_call(module, (x, hx), F.linear(x, w_ih, b_ih), 0)
                gh = self.on_call(module, (h,), F.linear(h, w_hh, b_hh), 1)
                return GATES[_KIND[func]](gi, gh, hx)
        return func(*args, **(kwargs or {}))


class RecurrentCellRule(LayerRule):
    mode = _UnfusedSteps
    name = "recurrent cell"
    modules = ((nn.LSTMCell, ("forward",)), (nn.GRUCell, ("forward",)),
               (nn.RNNCell, ("forward",)))
    parameters = (("weight_ih", "bias_ih"), ("weight_hh", "bias_hh"))

    def sizes(self, module: nn.Module, site: Site) -> tuple[int, int, int, int]:
        k_in = module.input_size if site.pair == 0 else module.hidden_size
        return math.prod(site.in_shape) // k_in, 1, k_in, module.weight_ih.shape[0]

    def verify(self, module: nn.Module, args: tuple, output: torch.Tensor, pair: int = 0) -> bool:
        """Whether torch's fused step gives the unfused gates on this step's input and state.

        Checked at pair 0's call, which carries the step's ``(x, state)``; pair 1's call is
        part of the same step.
        """
        if pair == 1:
            return True
        x, hx = args
        w_ih, w_hh, b_ih, b_hh = (getattr(module, a) for a in _ARGUMENTS)
        fused = _fused(module)
        h = tensors(hx)[0]
        unfused = GATES[_KIND[fused]](F.linear(x, w_ih, b_ih), F.linear(h, w_hh, b_hh), hx)
        expected = fused(x, hx, w_ih, w_hh, b_ih, b_hh)
        # Pre-activations are rounded to about eps times this bound; the gates have slope
        # at most 1 and multiply one another, a pre-activation (the GRU's r ⊙ gh_n) or the
        # state (the LSTM's f ⊙ c), so the error stays below a few eps·scale.
        bound = x.abs().amax() * w_ih.abs().amax() * x.shape[-1]
        bound = bound + h.abs().amax() * w_hh.abs().amax() * h.shape[-1]
        for b in (b_ih, b_hh):
            bound = bound + (b.abs().amax() if b is not None else 0.0)
        state = max(s.abs().amax() for s in tensors(hx))
        scale = (1.0 + bound) * (1.0 + bound + state)
        tol = _RTOL_ULPS * torch.finfo(x.dtype).eps * scale
        return all(a.shape == b.shape and bool(((a - b).abs() <= tol).all())
                   for a, b in zip(tensors(unfused), tensors(expected), strict=True))



RECURRENT_CELL = register(RecurrentCellRule())
