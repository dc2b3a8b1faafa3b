"""The structured engine's rules for the layers transformers and recurrent nets are made of.

GPT-2's ``Conv1D`` (a look-alike of the ``transformers`` class, recognised by its name),
the packed projections of ``nn.MultiheadAttention`` in self-attention, the two weight
pairs of ``nn.LSTMCell``/``nn.GRUCell``/``nn.RNNCell`` unrolled over time, and those of
every layer and direction of ``nn.LSTM``/``nn.GRU``/``nn.RNN``. Oracle: the
naive per-sample ``torch.autograd.grad`` Jacobian in float64, in every mode, with ``x2``
given and ``None``, tiled, layer by layer, with frozen parts and with each contraction
strategy forced; what the probe sends to the fallback is inspected directly.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import ntk_torch as nt
from ntk_torch._engines import _plan, structured
from ntk_torch._engines._layers import _recurrence
from ntk_torch._functional import functionalize
from tests.cases import Case
from tests.conftest import RTOL, assert_close
from tests.oracle import naive_ntk, owner_names

MODES = ("full", "diagonal", "trace")


class Conv1D(nn.Module):
    """``transformers``' ``Conv1D``: ``y = x @ W + b`` with ``W (nx, nf)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class GPT2Like(nn.Module):
    """Token and position embeddings, one GPT-2 block (causal attention), a score head."""

    def __init__(self, vocab: int = 11, context: int = 5, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = Conv1D(3 * d, d), Conv1D(d, d)
        self.c_fc, self.mlp_proj = Conv1D(2 * d, d), Conv1D(d, 2 * d)
        self.score = nn.Linear(d, 3)

    def forward(self, ids):
        n, t = ids.shape
        x = self.wte(ids) + self.wpe(torch.arange(t).unsqueeze(0))
        q, k, v = self.c_attn(self.ln_1(x)).split(x.shape[-1], dim=2)
        q, k, v = (z.view(n, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        x = x + self.c_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(n, t, -1))
        x = x + self.mlp_proj(torch.tanh(self.c_fc(self.ln_2(x))))
        return self.score(x[:, -1])


class SequenceFirstAttention(nn.Module):
    """Self-attention, sequence first, causal mask, the averaged weights also read out."""

    def __init__(self, d: int = 6, tokens: int = 4) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2)
        self.head = nn.Linear(d + tokens, 3)

    def forward(self, x):
        h = x.transpose(0, 1)
        mask = torch.ones(h.shape[0], h.shape[0], dtype=torch.bool).triu(1)
        attended, weights = self.attn(h, h, h, attn_mask=mask, need_weights=True)
        return self.head(torch.cat([attended.mean(0), weights[:, -1]], dim=-1))


class BiasKVAttention(nn.Module):
    """Batch first, no projection biases, learned key/value biases (those fall back)."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 3, bias=False, add_bias_kv=True, batch_first=True)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.attn(x, x, x, need_weights=False)[0]).mean(1))


class CrossAttention(nn.Module):
    """Keys and values from another tensor: the packed projection is split, no rule applies."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        return self.head(self.attn(x, torch.tanh(x), torch.tanh(x))[0].mean(1))


class UnrolledCell(nn.Module):
    """A recurrent cell over ``(N, T, 3)`` sequences from a zero state given explicitly.

    The last ``h`` is read out by a Linear.
    """

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell, self.head = cell, nn.Linear(cell.hidden_size, 2)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        state = (h, torch.zeros_like(h)) if isinstance(self.cell, nn.LSTMCell) else h
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0] if isinstance(state, tuple) else state)


class UnbatchedCell(nn.Module):
    """An ``nn.RNNCell`` (ReLU) run on each sequence alone, with one-dimensional inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.cell, self.head = nn.RNNCell(3, 4, nonlinearity="relu"), nn.Linear(4, 2)

    def forward(self, x):
        outs = []
        for sequence in x:
            h = sequence.new_zeros(4)
            for step in sequence:
                h = self.cell(step, h)
            outs.append(h)
        return self.head(torch.stack(outs))


class FusedRecurrent(nn.Module):
    """A fused RNN module over ``(N, T, 3)`` sequences (moved to time first if it is).

    ``read="last"``: a Linear on the last step's output; ``"all"``: every step's output,
    flattened. ``state``: None (the module's zeros), ``"constant"`` (buffers) or
    ``"learned"`` (parameters), expanded to the batch.
    """

    def __init__(self, rnn: nn.RNNBase, read: str = "last", state: str | None = None) -> None:
        super().__init__()
        self.rnn, self.read, self.state = rnn, read, state
        directions = 2 if rnn.bidirectional else 1
        width = directions * (rnn.proj_size or rnn.hidden_size)
        self.head = nn.Linear(width, 2) if read == "last" else None
        shape = (rnn.num_layers * directions, 1, rnn.hidden_size)
        for name in ("h0", "c0") if isinstance(rnn, nn.LSTM) else ("h0",):
            if state == "constant":
                self.register_buffer(name, 0.5 * torch.randn(shape))
            elif state == "learned":
                setattr(self, name, nn.Parameter(0.5 * torch.randn(shape)))

    def forward(self, x):
        hx = None
        if self.state is not None:
            states = [s.expand(-1, x.shape[0], -1) for s in (self.h0, getattr(self, "c0", None))
                      if s is not None]
            hx = tuple(states) if isinstance(self.rnn, nn.LSTM) else states[0]
        h, _ = self.rnn(x if self.rnn.batch_first else x.transpose(0, 1), hx)
        h = h if self.rnn.batch_first else h.transpose(0, 1)
        return self.head(h[:, -1]) if self.read == "last" else h.flatten(1)


def _normal(*shape: int):
    return lambda n, g: torch.randn(n, *shape, generator=g, dtype=torch.float64)


RULE_CASES = {c.name: c for c in [
    Case("gpt2_like", GPT2Like, lambda n, g: torch.randint(0, 11, (n, 5), generator=g)),
    Case("attention_sequence_first", SequenceFirstAttention, _normal(4, 6)),
    Case("attention_bias_kv", BiasKVAttention, _normal(3, 6)),
    Case("cross_attention", CrossAttention, _normal(3, 6)),
    Case("lstm_cell", lambda: UnrolledCell(nn.LSTMCell(3, 4)), _normal(5, 3)),
    Case("gru_cell", lambda: UnrolledCell(nn.GRUCell(3, 4)), _normal(3, 3)),
    Case("rnn_cell_without_bias", lambda: UnrolledCell(nn.RNNCell(3, 4, bias=False)),
         _normal(3, 3)),
    Case("rnn_cell_unbatched", UnbatchedCell, _normal(3, 3)),
    Case("lstm", lambda: FusedRecurrent(nn.LSTM(3, 4, batch_first=True)), _normal(4, 3)),
    Case("lstm_2layers_bidirectional_timefirst",
         lambda: FusedRecurrent(nn.LSTM(3, 3, num_layers=2, bidirectional=True)), _normal(3, 3)),
    Case("lstm_all_steps_constant_state",
         lambda: FusedRecurrent(nn.LSTM(3, 2, batch_first=True), "all", "constant"),
         _normal(3, 3)),
    Case("gru_2layers_learned_state",
         lambda: FusedRecurrent(nn.GRU(3, 4, num_layers=2, batch_first=True), state="learned"),
         _normal(3, 3)),
    Case("rnn_tanh_bidirectional_timefirst",
         lambda: FusedRecurrent(nn.RNN(3, 4, bidirectional=True)), _normal(4, 3)),
    Case("rnn_relu_without_bias",
         lambda: FusedRecurrent(nn.RNN(3, 4, nonlinearity="relu", bias=False, batch_first=True)),
         _normal(4, 3)),
]}
_ORACLE: dict[tuple, torch.Tensor] = {}


def _oracle(case: Case, mode: str, symmetric: bool, frozen: bool = False) -> torch.Tensor:
    """Float64 naive kernel on x1 of 4 samples and x2 of 3 (or None), cached."""
    key = (case.name, symmetric, frozen)
    if key not in _ORACLE:
        model = _build(case, frozen)
        x2 = None if symmetric else case.inputs(3, seed=7)
        _ORACLE[key] = naive_ntk(model, case.inputs(4), x2, "full")
    full = _ORACLE[key]
    diagonal = full.diagonal(dim1=2, dim2=3)
    return {"full": full, "diagonal": diagonal, "trace": diagonal.mean(-1)}[mode]


def _build(case: Case, frozen: bool = False) -> nn.Module:
    """The case's model; ``frozen``: every other parameter tensor fixed."""
    model = case.build()
    if frozen:
        for p in list(model.parameters())[::2]:
            p.requires_grad_(False)
    return model


def _ntk(case: Case, mode: str, symmetric: bool, frozen: bool = False, **kwargs):
    x2 = None if symmetric else case.inputs(3, seed=7)
    return nt.empirical_ntk(_build(case, frozen), case.inputs(4), x2, mode=mode,
                            implementation="structured", **kwargs)


@pytest.fixture(params=sorted(RULE_CASES), ids=sorted(RULE_CASES))
def rule_case(request):
    return RULE_CASES[request.param]


@pytest.mark.parametrize("symmetric", [False, True], ids=["x2", "x2=None"])
@pytest.mark.parametrize("frozen", [False, True], ids=["all", "frozen"])
def test_matches_oracle_in_every_mode(rule_case, symmetric, frozen):
    for mode in MODES:
        for batch_size in (None, 2):
            k = _ntk(rule_case, mode, symmetric, frozen, batch_size=batch_size)
            assert_close(k, _oracle(rule_case, mode, symmetric, frozen))


@pytest.mark.parametrize("strategy", ["gram", "explicit"])
def test_each_strategy_is_exact(rule_case, strategy, monkeypatch):
    # "explicit" also makes the capture batched (plain autograd, no vmap) where it can be.
    monkeypatch.setattr(_plan, "choose_strategy", lambda *args, **kwargs: strategy)
    for mode in MODES:
        for symmetric in (False, True):
            assert_close(_ntk(rule_case, mode, symmetric), _oracle(rule_case, mode, symmetric))


def test_layerwise_matches_oracle_per_owner(rule_case):
    model = rule_case.build()
    x1, x2 = rule_case.inputs(4), rule_case.inputs(3, seed=7)
    layers = nt.layerwise_ntk(model, x1, x2, mode="full", implementation="structured")
    groups = owner_names(model)
    assert sorted(layers) == sorted(groups)
    for owner, names in groups.items():
        assert_close(layers[owner], naive_ntk(model, x1, x2, "full", names))


def test_float32_agrees_with_a_per_sample_jacobian_engine(rule_case):
    model = rule_case.build(torch.float32)
    x1, x2 = rule_case.inputs(4, torch.float32), rule_case.inputs(3, torch.float32, seed=7)
    # The jacobian engine's vmap cannot run a fused RNN module: the same Jacobians unbatched.
    fused = any(isinstance(m, nn.RNNBase) for m in model.modules())
    expected = nt.empirical_ntk(model, x1, x2, implementation="autograd" if fused else "jacobian")
    assert_close(nt.empirical_ntk(model, x1, x2, implementation="structured"), expected,
                 RTOL[torch.float32])


def _split(model: nn.Module, x: torch.Tensor) -> tuple[set[str], set[str]]:
    fm = functionalize(model)
    s = structured.probe(fm, fm.params(), x[:1])
    return {n for u in s.units for n in u.names}, set(s.fallback)


@pytest.mark.parametrize("name,fallback", [
    ("gpt2_like", set()),
    ("attention_sequence_first", set()),
    ("attention_bias_kv", {"attn.bias_k", "attn.bias_v"}),
    ("cross_attention", {"attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                         "attn.out_proj.bias"}),
    ("lstm_cell", set()),
    ("gru_cell", set()),
    ("rnn_cell_without_bias", set()),
    ("rnn_cell_unbatched", set()),
    ("lstm", set()),
    ("lstm_2layers_bidirectional_timefirst", set()),
    ("lstm_all_steps_constant_state", set()),
    ("gru_2layers_learned_state", {"h0"}),  # used outside any layer's call
    ("rnn_tanh_bidirectional_timefirst", set()),
    ("rnn_relu_without_bias", set()),
])
def test_what_falls_back(name, fallback):
    case = RULE_CASES[name]
    model = case.build()
    structured_names, falls = _split(model, case.inputs(2))
    assert falls == fallback
    assert structured_names == {n for n, _ in model.named_parameters()} - fallback


# Named like the layer it imitates (so the rule recognises it) but computing 2·(x @ W + b).
DoubledConv1D = type("Conv1D", (Conv1D,),
                     {"forward": lambda self, x: 2.0 * Conv1D.forward(self, x)})


def test_a_conv1d_that_computes_something_else_falls_back_exactly():
    # Recognised by its class name, a Conv1D must still compute x @ W + b on the probe.
    torch.manual_seed(0)
    doubled = DoubledConv1D(4, 3)
    model = nn.Sequential(doubled, nn.Tanh(), Conv1D(2, 4)).double().eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    structured_names, fallback = _split(model, x)
    assert fallback == {"0.weight", "0.bias"} and structured_names == {"2.weight", "2.bias"}
    assert_close(nt.empirical_ntk(model, x, implementation="structured"),
                 naive_ntk(model, x, None, "full"))


@pytest.mark.parametrize("case, names", [
    # One weight alone, the biases of both pairs (two units, with equal gradients in an
    # LSTM), and parts of two layers.
    ("lstm_cell", ["cell.weight_hh"]), ("lstm_cell", ["cell.bias_ih", "cell.bias_hh"]),
    ("lstm_cell", ["cell.bias_hh", "head.weight"]),
    # One recurrent weight of the second layer, an input weight of the reverse direction,
    # and parts of two layers.
    ("lstm_2layers_bidirectional_timefirst", ["rnn.weight_hh_l1"]),
    ("lstm_2layers_bidirectional_timefirst", ["rnn.weight_ih_l1_reverse"]),
    ("lstm_2layers_bidirectional_timefirst", ["rnn.bias_hh_l0_reverse", "head.weight"]),
])
def test_recurrent_parameter_selections(case, names):
    # Each selection exact, in total and per layer.
    case = RULE_CASES[case]
    model = case.build()
    x1, x2 = case.inputs(4), case.inputs(3, seed=7)
    full = naive_ntk(model, x1, x2, "full", names)
    diagonal = full.diagonal(dim1=2, dim2=3)
    for mode, expected in (("full", full), ("diagonal", diagonal), ("trace", diagonal.mean(-1))):
        assert_close(nt.empirical_ntk(model, x1, x2, mode=mode, implementation="structured",
                                      params=names), expected)
    layers = nt.layerwise_ntk(model, x1, x2, mode="full", implementation="structured",
                              params=names)
    owners = {n.rpartition(".")[0] for n in names}
    assert sorted(layers) == sorted(owners)
    for owner in owners:
        assert_close(layers[owner], naive_ntk(model, x1, x2, "full",
                                              [n for n in names if n.startswith(owner + ".")]))


class FromNoState(UnrolledCell):
    """The cell's first step without a state: the cell makes the zeros itself."""

    def forward(self, x):
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0] if isinstance(state, tuple) else state)


@pytest.mark.parametrize("cell", [nn.LSTMCell, nn.GRUCell])
@pytest.mark.parametrize("strategy", ["gram", "explicit"])  # explicit also captures batched
def test_recurrent_cell_without_a_state_is_exact(cell, strategy, monkeypatch):
    # torch.func.vmap cannot run the cell's own fused first step (a batched product added
    # in place to one of the unbatched zeros), so the other engines refuse such a model;
    # the structured engine runs the unfused step instead, and auto takes it.
    monkeypatch.setattr(_plan, "choose_strategy", lambda *args, **kwargs: strategy)
    torch.manual_seed(0)
    model = FromNoState(cell(3, 4)).double().eval()
    fm = functionalize(model)
    x1 = torch.randn(4, 3, 3, dtype=torch.float64)
    x2 = torch.randn(3, 3, 3, dtype=torch.float64)
    assert not structured.probe(fm, fm.params(), x1[:1]).fallback
    ntk = nt.empirical_ntk_fn(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the autograd engine
        assert_close(ntk(x1, x2), naive_ntk(model, x1, x2, "full"))
    assert ntk.last_implementation == "structured"


def _swapped_lstm(gi, gh, hx):
    """LSTM gates with the input and forget gates swapped: not what torch computes."""
    i, f, g, o = (gh + gi).chunk(4, -1)
    c = torch.sigmoid(i) * hx[1] + torch.sigmoid(f) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def test_a_cell_whose_fused_step_differs_falls_back_exactly(monkeypatch):
    # The probe compares torch's fused step with the unfused gates; with wrong gates it
    # must refuse the rule and leave the cell computing as it is.
    monkeypatch.setitem(_recurrence.GATES, "lstm", _swapped_lstm)
    case = RULE_CASES["lstm_cell"]
    model, x = case.build(), case.inputs(4)
    structured_names, fallback = _split(model, x)
    assert fallback == {"cell.weight_ih", "cell.weight_hh", "cell.bias_ih", "cell.bias_hh"}
    assert structured_names == {"head.weight", "head.bias"}
    assert_close(nt.empirical_ntk(model, x, implementation="structured"),
                 naive_ntk(model, x, None, "full"))


def test_an_lstm_whose_fused_call_differs_falls_back_exactly(monkeypatch):
    # The same check for the whole fused call of an nn.LSTM, on the probe.
    monkeypatch.setitem(_recurrence.GATES, "lstm", _swapped_lstm)
    case = RULE_CASES["lstm"]
    model, x = case.build(), case.inputs(4)
    structured_names, fallback = _split(model, x)
    assert fallback == {n for n, _ in model.rnn.named_parameters(prefix="rnn")}
    assert structured_names == {"head.weight", "head.bias"}
    # Every vmap engine then meets the fused module: the autograd engine computes it.
    assert_close(nt.empirical_ntk(model, x, implementation="autograd"),
                 naive_ntk(model, x, None, "full"))
    with pytest.raises(RuntimeError, match=r"rnn \(LSTM\) is a fused RNN module"):
        nt.empirical_ntk(model, x, implementation="structured")


class Packed(nn.Module):
    """An ``nn.GRU`` on packed sequences of two lengths, its last valid step read out."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        lengths = torch.full((x.shape[0],), x.shape[1])
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
        return self.head(self.rnn(packed)[1][-1])


@pytest.mark.parametrize("model", [Packed, lambda: FusedRecurrent(nn.LSTM(3, 4, proj_size=2))],
                         ids=["packed", "projected"])
def test_fused_rnns_without_the_rule_are_left_to_the_module(model):
    # A packed input (the fused functions' other signature) and a projected LSTM are not
    # unrolled: their parameters take the fallback, and auto the autograd engine.
    torch.manual_seed(0)
    model = model().double().eval()
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    _, fallback = _split(model, x)
    assert fallback == {n for n, _ in model.rnn.named_parameters(prefix="rnn")}
    ntk = nt.empirical_ntk_fn(model, mode="trace")
    with pytest.warns(UserWarning, match=r"rnn \((GRU|LSTM)\) is a fused RNN module"):
        k = ntk(x)
    assert ntk.last_implementation == "autograd"
    assert_close(k, naive_ntk(model, x, None, "trace"))
