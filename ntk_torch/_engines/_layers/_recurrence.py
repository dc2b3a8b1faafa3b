"""The gates of torch's recurrent steps, from their two products, for the recurrent rules.

A step of every recurrent kind computes ``gi = W_ih x + b_ih`` from its input and
``gh = W_hh h + b_hh`` from the hidden state, then the gates from them as torch's fused
functions define them. The cells (``recurrent_cell``) and the multi-step modules
(``recurrent``) compute the same gates, from these functions.
"""

from __future__ import annotations

import torch


def _lstm(gi: torch.Tensor, gh: torch.Tensor, hx) -> tuple[torch.Tensor, torch.Tensor]:
    i, f, g, o = (gh + gi).chunk(4, -1)
    c = torch.sigmoid(f) * hx[1] + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    i_r, i_z, i_n = gi.chunk(3, -1)
    h_r, h_z, h_n = gh.chunk(3, -1)
    z = torch.sigmoid(h_z + i_z)
    n = torch.tanh(i_n + torch.sigmoid(h_r + i_r) * h_n)
    return (h - n) * z + n


# ``gates(gi, gh, state) -> state`` by kind; the LSTM's state is ``(h, c)``, the others' ``h``.
GATES = {
    "lstm": _lstm,
    "gru": _gru,
    "rnn_tanh": lambda gi, gh, h: torch.tanh(gh + gi),
    "rnn_relu": lambda gi, gh, h: torch.relu(gh + gi),
}


def tensors(t) -> tuple[torch.Tensor, ...]:
    """A state or a step's result as a tuple: the LSTM's is ``(h, c)``, the others' ``h``."""
    return tuple(t) if isinstance(t, (tuple, list)) else (t,)
