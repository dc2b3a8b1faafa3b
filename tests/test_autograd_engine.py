"""The engine without vmap on the models vmap cannot run, against the float64 oracle."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ntk_torch as nt
from ntk_torch._engines import VMAP_ENGINES
from tests.cases import CASES
from tests.conftest import assert_close
from tests.oracle import naive_jacobian, naive_ntk, owner_names

MODES = ["full", "diagonal", "trace"]


class RecurrentClassifier(nn.Module):
    """A fused RNN over ``(N, T, D)`` sequences, then a Linear head.

    On the last time step (``pool="last"``) or the mean over time (``pool="mean"``).
    """

    def __init__(self, kind: str, layers: int, bidirectional: bool, batch_first: bool,
                 pool: str, d: int = 3, hidden: int = 4, out: int = 2, **settings) -> None:
        super().__init__()
        self.batch_first, self.pool = batch_first, pool
        self.rnn = getattr(nn, kind)(d, hidden, num_layers=layers, bidirectional=bidirectional,
                                     batch_first=batch_first, **settings)
        width = settings.get("proj_size") or hidden
        self.head = nn.Linear(width * (2 if bidirectional else 1), out)

    def forward(self, x):
        h, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(h[:, -1] if self.pool == "last" else h.mean(1))


class BranchOnData(nn.Module):
    """Python control flow on the values, as transformers' ``if mask.all():`` has.

    Both branches compute the same function (so samples stay independent in a batch),
    by different operations: which one runs depends on the data.
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        if bool((x.sum(-1) > 0).all()):
            return self.head(h)
        return h @ self.head.weight.T + self.head.bias


class ScaleByItem(nn.Module):
    """Hidden units divided by their largest magnitude, read with ``.item()`` (a constant)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.body(x)
        return self.head(torch.tanh(h / h.abs().max().item()))


RECURRENT = {
    f"{kind}-{name}": (lambda kind=kind, config=config: RecurrentClassifier(kind, *config))
    for kind in ("LSTM", "GRU", "RNN")
    for name, config in {"2layers-bidirectional-batchfirst-last": (2, True, True, "last"),
                         "1layer-timefirst-mean": (1, False, False, "mean")}.items()
}
# The structured engine runs the modules above unrolled; not a projected LSTM.
PROJECTED = "LSTM-projected"
NO_VMAP = {**RECURRENT, "branch": BranchOnData, "item": ScaleByItem,
           PROJECTED: lambda: RecurrentClassifier("LSTM", 1, False, True, "last", proj_size=2)}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return NO_VMAP[name]().double().eval()


def inputs(name: str, n: int, seed: int) -> torch.Tensor:
    """``(n, 3)`` for the feed-forward models, ``(n, T=4, 3)`` sequences for the others."""
    shape = (3,) if name in ("branch", "item") else (4, 3)
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


@pytest.mark.parametrize("second", [True, False], ids=["x2", "x2=None"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(NO_VMAP))
def test_matches_oracle(name, mode, second):
    model = build(name)
    x1, x2 = inputs(name, 5, seed=1), (inputs(name, 3, seed=2) if second else None)
    k = nt.empirical_ntk(model, x1, x2, mode=mode, implementation="autograd")
    assert_close(k, naive_ntk(model, x1, x2, mode))


def test_branches_of_the_control_flow_both_occur():
    signs = [bool(x.sum() > 0) for x in inputs("branch", 5, seed=1)]
    assert any(signs) and not all(signs), signs  # else the test above checks one branch only


@pytest.mark.parametrize("name", ["LSTM-2layers-bidirectional-batchfirst-last",
                                  "GRU-1layer-timefirst-mean", "branch"])
def test_layerwise_per_owner_and_tiled(name):
    model = build(name)
    x1, x2 = inputs(name, 5, seed=1), inputs(name, 3, seed=2)
    layers = nt.layerwise_ntk(model, x1, x2, mode="full", implementation="autograd", batch_size=2)
    expected = owner_names(model)
    assert sorted(layers) == sorted(expected)
    for owner, names in expected.items():
        assert_close(layers[owner], naive_ntk(model, x1, x2, "full", names))


@pytest.mark.parametrize("mode", MODES)
def test_parameter_selection(mode):
    model = build("LSTM-2layers-bidirectional-batchfirst-last")
    names = ["rnn.weight_hh_l1_reverse", "rnn.bias_ih_l0", "head.weight"]
    x = inputs("LSTM", 4, seed=1)
    k = nt.empirical_ntk(model, x, mode=mode, implementation="autograd", params=names)
    assert_close(k, naive_ntk(model, x, None, mode, names))


@pytest.mark.parametrize("name", [PROJECTED, "branch", "item"])
def test_auto_takes_autograd_with_one_warning(name):
    model = build(name)
    x1, x2 = inputs(name, 4, seed=1), inputs(name, 2, seed=2)
    ntk = nt.empirical_ntk_fn(model, mode="trace")
    with pytest.warns(UserWarning, match=r"^vmap cannot run this model \(.+\); using "
                                         r"implementation='autograd'$") as caught:
        first = ntk(x1, x2)
        second = ntk(x1)
    messages = [str(w.message) for w in caught]
    assert len([m for m in messages if "vmap" in m]) == 1, messages
    assert ntk.last_implementation == "autograd"
    assert_close(first, naive_ntk(model, x1, x2, "trace"))
    assert_close(second, naive_ntk(model, x1, None, "trace"))


def test_the_warning_names_the_fused_rnn_module():
    with pytest.warns(UserWarning, match=r"rnn \(LSTM\) is a fused RNN module"):
        nt.empirical_ntk(build(PROJECTED), inputs(PROJECTED, 2, seed=1))


@pytest.mark.parametrize("name", sorted(RECURRENT))
def test_auto_runs_fused_rnns_structured_without_a_warning(name):
    # The structured engine runs them unrolled, which vmap can batch: no fallback.
    model = build(name)
    x1, x2 = inputs(name, 4, seed=1), inputs(name, 2, seed=2)
    ntk = nt.empirical_ntk_fn(model, mode="trace")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k = ntk(x1, x2)
    assert ntk.last_implementation == "structured"
    assert_close(k, naive_ntk(model, x1, x2, "trace"))


@pytest.mark.parametrize("selection", ["frozen", "head", "head-and-one-rnn-weight"])
@pytest.mark.parametrize("name", ["LSTM-2layers-bidirectional-batchfirst-last",
                                  "GRU-1layer-timefirst-mean"])
def test_fused_rnns_holding_no_selected_parameter_run_structured(name, selection):
    # A frozen encoder under a trained head: the RNN is still run unrolled, so vmap can batch
    # the passes for the head's kernel.
    model = build(name)
    names = {"frozen": None, "head": ["head.weight", "head.bias"],
             "head-and-one-rnn-weight": ["head.weight", "rnn.weight_hh_l0"]}[selection]
    if selection == "frozen":
        model.rnn.requires_grad_(False)
    x1, x2 = inputs(name, 4, seed=1), inputs(name, 3, seed=2)
    ntk = nt.empirical_ntk_fn(model, mode="full", params=names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k = ntk(x1, x2)
    assert ntk.last_implementation == "structured"
    assert_close(k, naive_ntk(model, x1, x2, "full", names or ["head.weight", "head.bias"]))


@pytest.mark.parametrize("implementation", VMAP_ENGINES)
def test_a_vmap_engine_named_on_an_lstm_is_a_clear_error(implementation):
    # The other engines cannot run any fused LSTM; the structured engine a projected one.
    name = PROJECTED if implementation == "structured" else "LSTM-1layer-timefirst-mean"
    message = (rf"implementation='{implementation}' batches samples with torch.func.vmap, which "
               r"cannot run this model: rnn \(LSTM\) is a fused RNN module. Use "
               r"implementation='autograd'")
    with pytest.raises(RuntimeError, match=message):
        nt.empirical_ntk(build(name), inputs(name, 3, seed=1), implementation=implementation)


@pytest.mark.parametrize("name", ["branch", "item"])
def test_a_vmap_engine_named_on_data_dependent_code_is_a_clear_error(name):
    with pytest.raises(RuntimeError, match=r"^implementation='jacobian' batches samples with "
                                           r"torch.func.vmap, which cannot run this model: .+"
                                           r"implementation='autograd'"):
        nt.empirical_ntk(build(name), inputs(name, 3, seed=1), implementation="jacobian")


@pytest.mark.parametrize("name", ["mlp", "tied_weights", "cnn2d"])
def test_ordinary_models_equal_the_oracle_and_auto_keeps_vmap(name):
    case = CASES[name]
    model = case.build()
    x1, x2 = case.inputs(4), case.inputs(3, seed=7)
    k = nt.empirical_ntk(model, x1, x2, mode="full", implementation="autograd")
    assert_close(k, naive_ntk(model, x1, x2, "full"))
    ntk = nt.empirical_ntk_fn(model, mode="trace")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning where vmap runs the model
        ntk(x1, x2)
    assert ntk.last_implementation in VMAP_ENGINES


def test_random_draws_in_the_forward_are_refused():
    model = nn.LSTM(3, 4, num_layers=2, dropout=0.5, batch_first=True).double().train()
    model = nn.Sequential(model, Last(), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match=r"0 \(LSTM\) in train mode with dropout=0.5.*eval"):
        nt.empirical_ntk(model, inputs("LSTM", 3, seed=1), implementation="autograd")


class NoisyOnLargeInputs(nn.Module):
    """Adds noise only to samples of large norm: random draws a small probe never sees."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 2)

    def forward(self, x):
        h = self.body(x)
        return h + torch.randn_like(h) if x.norm() > 10 else h


def test_the_engine_refuses_random_draws_it_meets_itself():
    from ntk_torch._engines import autograd
    from ntk_torch._functional import functionalize

    fm = functionalize(NoisyOnLargeInputs().double(), None)
    params = dict(fm.module.named_parameters())
    x = torch.ones(3, 3, dtype=torch.float64)
    x[2] *= 100.0
    with pytest.raises(RuntimeError, match="draws random numbers in its forward pass"):
        autograd.per_sample_jacobians(fm, params, x, list(fm.names))
    assert autograd.per_sample_jacobians(fm, params, x[:2], list(fm.names)).shape == (2, 2, 8)


class Last(nn.Module):
    """The last time step's output of an RNN's ``(output, state)``."""

    def forward(self, output_and_state):
        return output_and_state[0][:, -1]


def test_memory_budget_suggests_autograd_blocks():
    model = build(PROJECTED)
    x = inputs(PROJECTED, 5, seed=1)
    # 18 kB: a block of two samples (their Jacobians, 2·O·P·8 = 4 kB, beside one sample's
    # O-fold backward) fits, five do not.
    budget = 18_000
    with pytest.raises(MemoryError, match=r"implementation='autograd' with batch_size=\d") as err:
        nt.empirical_ntk(model, x, memory_budget=budget)
    assert "jacobian" not in str(err.value)
    k = nt.empirical_ntk(model, x, memory_budget=budget * 4, batch_size=2,
                         implementation="autograd")
    assert_close(k, naive_ntk(model, x, None, "full"))


def test_kernel_store_takes_autograd_and_refuses_a_named_vmap_engine(tmp_path):
    pytest.importorskip("zarr")
    model = build(PROJECTED)
    x = inputs(PROJECTED, 5, seed=1)
    with pytest.warns(UserWarning, match="using implementation='autograd'"):
        store = nt.compute_kernel(model, x, store=tmp_path / "k", mode="trace", tile=2,
                                  progress=False)
    assert_close(store.load(), naive_ntk(model, x, None, "trace"))
    with pytest.raises(RuntimeError, match="implementation='autograd'"):
        nt.compute_kernel(model, x, store=tmp_path / "j", implementation="jacobian",
                          progress=False)


@pytest.mark.parametrize("name", ["LSTM-2layers-bidirectional-batchfirst-last", "branch"])
def test_backward_one_output_at_a_time_where_it_cannot_be_batched(name, monkeypatch):
    from ntk_torch._engines import autograd

    monkeypatch.setattr(autograd, "_batched_rows", lambda *args: False)
    model = build(name)
    x = inputs(name, 4, seed=3)
    assert_close(nt.empirical_ntk(model, x, implementation="autograd"),
                 naive_ntk(model, x, None, "full"))


class TwoHeads(nn.Module):
    """A head chosen by the sign of the input's sum: per sample, one head is never reached."""

    def __init__(self) -> None:
        super().__init__()
        self.plus, self.minus = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        return self.plus(x) if x.sum() > 0 else 2.0 * self.minus(x)


@pytest.mark.parametrize("batched", [True, False], ids=["batched backward", "one by one"])
def test_parameters_a_sample_does_not_reach_get_zero_rows(batched, monkeypatch):
    from ntk_torch._engines import autograd
    from ntk_torch._functional import functionalize

    if not batched:
        monkeypatch.setattr(autograd, "_batched_rows", lambda *args: False)
    model = TwoHeads().double()
    fm = functionalize(model, None)
    x = inputs("branch", 5, seed=1)  # sums of both signs
    jac = autograd.per_sample_jacobians(fm, dict(model.named_parameters()), x, list(fm.names))
    expected = torch.stack([naive_jacobian(model, x[a:a + 1], list(fm.names))[0]
                            for a in range(5)])
    assert_close(jac, expected)
