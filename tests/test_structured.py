"""The structured engine and ``implementation="auto"``.

Oracles: the naive per-sample ``torch.autograd.grad`` Jacobian in float64 (every catalog
case, every mode, tiled or not, ``x2=None`` or not, each contraction strategy forced);
the jacobian engine in float32; and, for what the engine must not do (materialise
``(N, O, P)``, leave hooks on the module), direct inspection.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import ntk_torch as nt
from ntk_torch import _engines
from ntk_torch._engines import Problem, _capture, _contractions, _heads, _plan, structured
from ntk_torch._functional import functionalize
from ntk_torch._tiling import transpose_pairs
from tests.cases import CASES, Case
from tests.conftest import RTOL, assert_close
from tests.oracle import naive_ntk, owner_names

MODES = ("full", "diagonal", "trace")
_ORACLE: dict[tuple, torch.Tensor] = {}


def oracle(case, mode: str, symmetric: bool, names: list[str] | None = None) -> torch.Tensor:
    """Float64 naive kernel of the case on fixed inputs (x1: 5 samples, x2: 3), cached."""
    key = (case.name, symmetric, tuple(names or ()))
    if key not in _ORACLE:
        model = case.build()
        x2 = None if symmetric else case.inputs(3, seed=7)
        _ORACLE[key] = naive_ntk(model, case.inputs(5), x2, "full", names)
    full = _ORACLE[key]
    if mode == "full":
        return full
    diagonal = full.diagonal(dim1=2, dim2=3)
    return diagonal if mode == "diagonal" else diagonal.mean(-1)


def structured_ntk(case, mode, symmetric, batch_size=None, **kwargs):
    model = case.build()
    x2 = None if symmetric else case.inputs(3, seed=7)
    return nt.empirical_ntk(model, case.inputs(5), x2, mode=mode, implementation="structured",
                            batch_size=batch_size, **kwargs)


@pytest.mark.parametrize("symmetric", [False, True], ids=["x2", "x2=None"])
@pytest.mark.parametrize("batch_size", [None, 2], ids=["untiled", "tiled"])
def test_matches_oracle_in_every_mode(case, symmetric, batch_size):
    for mode in MODES:
        k = structured_ntk(case, mode, symmetric, batch_size)
        assert_close(k, oracle(case, mode, symmetric))
        if symmetric:
            assert torch.equal(k, transpose_pairs(k)), "x2=None must give a symmetric kernel"


def _forced(strategy: str):
    """A ``choose_strategy`` that always answers ``strategy`` ("factored" where allowed)."""
    def choose(unit, n1, n2, symmetric, n_out, mode, factored=False):
        return "explicit" if strategy == "factored" and not factored else strategy
    return choose


@pytest.mark.parametrize("strategy", ["gram", "explicit", "factored"])
def test_each_strategy_is_exact_on_every_case(case, strategy, monkeypatch):
    # The FLOP model picks one route per layer; each must be exact everywhere (factored:
    # where a separable head is verified, else the explicit route).
    monkeypatch.setattr(_plan, "choose_strategy", _forced(strategy))
    for mode in MODES:
        for symmetric in (False, True):
            assert_close(structured_ntk(case, mode, symmetric), oracle(case, mode, symmetric))


@pytest.mark.parametrize("name", ["cnn2d", "embedding", "sequence_layernorm", "tied_weights",
                                  "conv_called_twice", "groupnorm", "linear_positions",
                                  "pooled_cnn_head"])
@pytest.mark.parametrize("strategy", ["gram", "explicit", "factored"])
def test_contraction_in_blocks_of_samples_is_exact(name, strategy, monkeypatch):
    # A working-memory cap of a few bytes forces one sample per contraction block.
    monkeypatch.setattr(_plan, "choose_strategy", _forced(strategy))
    monkeypatch.setattr(structured, "WORK_BYTES", 8)
    monkeypatch.setattr(structured, "MIN_WORK_BYTES", 8)
    case = CASES[name]
    for mode in MODES:
        for symmetric in (False, True):
            assert_close(structured_ntk(case, mode, symmetric), oracle(case, mode, symmetric))


def test_layerwise_matches_oracle_per_owner(case):
    model = case.build()
    x1, x2 = case.inputs(5), case.inputs(3, seed=7)
    layers = nt.layerwise_ntk(model, x1, x2, mode="full", implementation="structured")
    groups = owner_names(model)
    assert sorted(layers) == sorted(groups)
    for owner, names in groups.items():
        assert_close(layers[owner], oracle(case, "full", False, names))


def test_weight_and_bias_in_different_groups():
    # Through the engine interface a weight and its bias may be asked for apart: the
    # unit is split and each part is exact on its own.
    case = CASES["cnn2d"]
    model = case.build()
    fm = functionalize(model)
    x1, x2 = case.inputs(5), case.inputs(3, seed=7)
    groups = {"w": ("0.weight", "6.weight"), "b": ("0.bias", "6.bias"), "rest": ("2.weight",)}
    expected = {g: naive_ntk(model, x1, x2, "full", list(names)) for g, names in groups.items()}
    for mode in MODES:
        out = structured.compute(fm, fm.params(), x1, x2, mode, groups)
        for group, full in expected.items():
            diagonal = full.diagonal(dim1=2, dim2=3)
            expected_mode = {"full": full, "diagonal": diagonal, "trace": diagonal.mean(-1)}[mode]
            assert_close(out[group], expected_mode)


def test_bias_only_selection():
    case = CASES["mlp"]
    model, x = case.build(), case.inputs(5)
    names = ["0.bias", "2.bias"]
    k = nt.empirical_ntk(model, x, mode="full", implementation="structured", params=names)
    assert_close(k, naive_ntk(model, x, None, "full", names))


def test_float32_agrees_with_jacobian_engine(case):
    model = case.build(torch.float32)
    x1, x2 = case.inputs(5, torch.float32), case.inputs(3, torch.float32, seed=7)
    expected = nt.empirical_ntk(model, x1, x2, implementation="jacobian")
    assert_close(nt.empirical_ntk(model, x1, x2, implementation="structured"), expected,
                 RTOL[torch.float32])


# ---------------------------------------------------------------------------------------
# What the probe sends where.


def _split(model: nn.Module, x: torch.Tensor) -> tuple[set[str], set[str]]:
    fm = functionalize(model)
    s = structured.probe(fm, fm.params(), x[:1])
    return {n for u in s.units for n in u.names}, set(s.fallback)


def test_standard_layers_are_structured_and_the_rest_falls_back():
    case = CASES["transformer_eval"]
    structured_names, fallback = _split(case.build(), case.inputs(2))
    assert {"encoder.linear1.weight", "encoder.norm2.bias", "head.weight"} <= structured_names
    # nn.MultiheadAttention's packed projections, in self-attention, by their own rule.
    assert {"encoder.self_attn.in_proj_weight", "encoder.self_attn.out_proj.weight"} <= (
        structured_names) and not fallback

    case = CASES["tied_weights"]
    structured_names, fallback = _split(case.build(), case.inputs(2))
    assert fallback == {"embed.weight"}  # tied across an Embedding and a Linear: kinds differ
    assert {"shared.weight", "shared.bias"} <= structured_names

    structured_names, fallback = _split(CASES["raw_use_of_layer_weight"].build(),
                                        CASES["raw_use_of_layer_weight"].inputs(2))
    assert fallback == {"fc.weight"} and "fc.bias" in structured_names

    case = CASES["raw_parameter"]
    structured_names, fallback = _split(case.build(), case.inputs(2))
    assert fallback == {"scale", "shift"}


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


def test_overridden_forward_hooks_and_max_norm_fall_back_exactly():
    torch.manual_seed(0)
    hooked = nn.Linear(3, 4).double()
    hooked.register_forward_hook(lambda m, args, out: out * 3.0)
    model = nn.Sequential(_ScaledLinear(3, 3), nn.Tanh(), hooked, nn.Tanh(), nn.Linear(4, 2))
    model = model.double().eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    structured_names, fallback = _split(model, x)
    assert fallback == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert_close(nt.empirical_ntk(model, x, implementation="structured"),
                 naive_ntk(model, x, None, "full"))

    embed = nn.Sequential(nn.Embedding(6, 3, max_norm=1.0), nn.Flatten(), nn.Linear(6, 2))
    embed = embed.double().eval()
    tokens = torch.tensor([[1, 2], [3, 3], [0, 5]])
    structured_names, fallback = _split(embed, tokens)
    assert fallback == {"0.weight"}


def test_module_is_left_untouched_even_when_the_forward_fails():
    class FailsUnderVmap(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 2:  # profile and probe pass; the capture fails
                raise RuntimeError("boom")
            return self.fc(x)

    model = FailsUnderVmap().double().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        nt.empirical_ntk(model, torch.randn(3, 3, dtype=torch.float64), implementation="structured")
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------
# Separable heads and the batched capture.


def _separable_pairs(case) -> set[tuple[str, str]]:
    """``(layer, readout layer)`` pairs the probe found separable."""
    fm = functionalize(case.build())
    s = structured.probe(fm, fm.params(), case.inputs(1))
    return {(s.sites[a].module, s.sites[b].module) for a, b in s.heads}


def test_separable_heads_are_found_where_channels_stay_apart_only():
    # BatchNorm, ReLU, pooling and a skip added after the layer keep channels apart;
    # a convolution or GroupNorm after it, or a path around the readout, do not.
    assert _separable_pairs(CASES["pooled_cnn_head"]) == {("2", "7")}
    assert _separable_pairs(CASES["residual_conv_head"]) == {("conv_b", "head")}
    assert _separable_pairs(CASES["linear_positions"]) == {("inner", "head")}
    assert _separable_pairs(CASES["grouped_conv1d_head"]) == {("0", "4")}  # GELU, max-pooling
    assert _separable_pairs(CASES["groupnorm"]) == set()
    assert _separable_pairs(CASES["head_bypass"]) == set()


def test_slight_channel_mixing_is_not_mistaken_for_a_separable_head():
    torch.manual_seed(0)
    mix = nn.Conv2d(3, 3, 1, bias=False)
    with torch.no_grad():
        mix.weight.copy_(torch.eye(3)[:, :, None, None] + 1e-6 * torch.randn(3, 3, 1, 1))
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.ReLU(), mix, nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(3, 2)).double().eval()
    case = Case("mixing", lambda: model,
                lambda n, g: torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64))
    assert _separable_pairs(case) == {("2", "6")}  # the 1x1 convolution itself; the first one mixes


@pytest.mark.parametrize("name,layer,shortcut_taken", [
    ("pooled_cnn_head", "2", True), ("residual_conv_head", "conv_b", True),
    ("grouped_conv1d_head", "0", True), ("ntk_torch_pooled_head", "0", True),
    ("linear_positions", "inner", True),
    ("inplace_activation_head", "2", False),  # its output tensor is rewritten: no shortcut
])
def test_factored_rule_and_head_shortcut_are_taken(name, layer, shortcut_taken, monkeypatch):
    used, shortcut = [], []
    features = _contractions.factored_features
    monkeypatch.setattr(structured, "factored_features",
                        lambda *a: used.append(a[0].module) or features(*a))
    reached = _heads.leaves_reached
    monkeypatch.setattr(_capture, "leaves_reached",
                        lambda *a, **k: shortcut.append(1) or reached(*a, **k))
    monkeypatch.setattr(_plan, "choose_strategy", _forced("factored"))
    case = CASES[name]
    for mode in MODES:
        used.clear(), shortcut.clear()
        assert_close(structured_ntk(case, mode, False), oracle(case, mode, False))
        assert set(used) == {layer} and bool(shortcut) == shortcut_taken


class _BatchCentred(nn.Module):
    """Subtracts the batch mean: each sample's outputs depend on the others in the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc(x)
        return self.head(torch.tanh(h - h.mean(0, keepdim=True) + h))


def test_samples_that_interact_in_the_batch_are_never_captured_batched():
    torch.manual_seed(0)
    model = _BatchCentred().double().eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    fm = functionalize(model)
    structure = structured.probe(fm, fm.params(), x[:1])
    assert _capture.capture_batched(fm, fm.params(), x, structure) is None
    # The kernel functions refuse such a model before any engine runs (tests/test_coupling.py).
    with pytest.raises(ValueError, match="depend on the rest of the batch"):
        nt.empirical_ntk(model, x, implementation="structured")


# ---------------------------------------------------------------------------------------
# Memory.


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves, _ = tree_flatten(out)
        sizes = [t.numel() for t in leaves if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


def test_never_materialises_per_sample_jacobians_of_dense_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 5)).eval()
    x = torch.randn(16, 30)
    fm = functionalize(model)
    params = fm.params()
    layer_jacobian = 16 * 5 * 64 * 64  # (N, O, P) of the middle layer alone
    counter = _LargestTensor()
    with counter:
        structured.compute(fm, params, x, None, "full", fm.groups(False))
    assert counter.largest < layer_jacobian / 10


def test_estimate_is_far_below_the_jacobian_for_a_wide_mlp():
    # 784-2048-2048-10, N=128: the Jacobian is ~30 GB in float32.
    model = nn.Sequential(nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                          nn.Linear(2048, 10)).eval()
    problem = _problem(model, torch.randn(128, 784), "full", symmetric=True)
    jacobian_bytes = 128 * 10 * problem.n_params * 4
    assert _engines.estimate("jacobian", problem).bytes >= jacobian_bytes
    assert _engines.estimate("structured", problem).bytes < jacobian_bytes / 50


def test_runs_under_a_budget_too_small_for_the_jacobian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 100), nn.Tanh(), nn.Linear(100, 2)).double().eval()
    x = torch.randn(4, 50, dtype=torch.float64)
    budget = 4 * 2 * sum(p.numel() for p in model.parameters()) * 8 / 2  # half of J (N, O, P)
    with pytest.raises(MemoryError):
        nt.empirical_ntk(model, x, implementation="jacobian", memory_budget=budget)
    k = nt.empirical_ntk(model, x, implementation="structured", memory_budget=budget)
    assert_close(k, naive_ntk(model, x, None, "full"))


# ---------------------------------------------------------------------------------------
# implementation="auto".


def _problem(model: nn.Module, x: torch.Tensor, mode: str, symmetric: bool = False) -> Problem:
    fm = functionalize(model)
    values = fm.params()
    flops, activations, n_out, probe = _engines.profile_forward(fm, values, x)
    return Problem(n1=x.shape[0], n2=x.shape[0], symmetric=symmetric, mode=mode, n_out=n_out,
                   n_params=sum(v.numel() for v in values.values()), n_groups=1,
                   forward_flops=flops, activations=activations, itemsize=x.element_size(),
                   probe=probe)


class _RawMLP(nn.Module):
    """Weights used as raw parameters: nothing for the structured rules to use."""

    def __init__(self, d: int = 6, width: int = 40, out: int = 3) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(d, width) / d**0.5)
        self.w2 = nn.Parameter(torch.randn(width, out) / width**0.5)

    def forward(self, x):
        return torch.tanh(x @ self.w1) @ self.w2


def test_auto_picks_structured_for_dense_networks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 256), nn.Tanh(), nn.Linear(256, 10)).eval()
    x = torch.randn(16, 100)
    problem = _problem(model, x, "full", symmetric=True)
    flops = {e: _engines.estimate(e, problem).flops for e in _engines.ENGINES}
    assert flops["structured"] < flops["jacobian"] / 10  # Gram matrices instead of (N, O, P)
    ntk = nt.empirical_ntk_fn(model, implementation="auto")
    ntk(x)
    assert ntk.last_implementation == "structured"


def test_auto_picks_jacobian_when_nothing_is_structured():
    torch.manual_seed(0)
    model = _RawMLP().eval()
    x = torch.randn(8, 6)
    problem = _problem(model, x, "trace")
    seconds = {e: _engines.predicted_seconds(e, problem) for e in _engines.ENGINES}
    # Everything would take the structured engine's fallback: the same work plus a probe.
    flops = {e: _engines.estimate(e, problem).flops for e in ("jacobian", "structured")}
    assert flops["jacobian"] <= flops["structured"]
    assert min(seconds, key=seconds.get) == "jacobian"
    ntk = nt.empirical_ntk_fn(model, implementation="auto", mode="trace")
    k = ntk(x)
    assert ntk.last_implementation == "jacobian"
    assert_close(k, nt.empirical_ntk(model, x, implementation="jacobian", mode="trace"),
                 RTOL[torch.float32])


def test_auto_picks_ntk_vp_when_only_it_fits_the_budget():
    torch.manual_seed(0)
    model = _RawMLP(d=100, width=200).eval()  # P far above N·activations: vjp/jvp holds least
    x = torch.randn(6, 100)
    problem = _problem(model, x, "full", symmetric=True)
    costs = {e: _engines.estimate(e, problem) for e in _engines.ENGINES}
    budget = (costs["ntk_vp"].bytes + min(costs["jacobian"].bytes, costs["structured"].bytes)) / 2
    assert costs["ntk_vp"].bytes < budget < min(costs["jacobian"].bytes, costs["structured"].bytes)
    ntk = nt.empirical_ntk_fn(model, implementation="auto", memory_budget=budget)
    k = ntk(x)
    assert ntk.last_implementation == "ntk_vp"
    assert_close(k, nt.empirical_ntk(model, x, implementation="jacobian"), RTOL[torch.float32])


def test_blocks_prepared_differently_are_computed_together(monkeypatch):
    # Two blocks whose plans disagree (a head separable on one batch only) cannot contract
    # their prepared state; the pair is then computed from the samples, exactly.
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    model = model.double().eval()
    x1 = torch.randn(5, 2, 7, 7, dtype=torch.float64)
    x2 = torch.randn(4, 2, 7, 7, dtype=torch.float64)
    fm = functionalize(model)
    params, groups = fm.params(), {"": fm.names}
    flops, activations, n_out, probe = _engines.profile_forward(fm, params, x1)
    problem = Problem(5, 4, False, "full", n_out, 100, 1, flops, activations, 8, probe)
    pa = structured.prepare(fm, params, x1, "full", groups, problem=problem)
    pb = structured.prepare(fm, params, x2, "full", groups, problem=problem)
    assert pa.representation() == pb.representation() and pa.cap.heads and pa.cap.streams
    direct = structured.contract(pa, pb, fm, params, "full", groups, problem=problem)[""]
    monkeypatch.setattr(pb, "representation", lambda: ())
    together = structured.contract(pa, pb, fm, params, "full", groups, problem=problem)[""]
    assert_close(direct, naive_ntk(model, x1, x2, mode="full"))
    assert_close(together, naive_ntk(model, x1, x2, mode="full"))
