"""ntk_torch.nn: multipliers and init stds follow the documented table; forward passes
match the formula ``z = m W x + m_b b``; MLP structure, names and errors; muP's point."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntk_torch as nt
from ntk_torch.nn import MLP, Conv2d, Dense, Elementwise, activation_module
from tests.conftest import assert_close

SW, SB = 1.7, 0.4  # σ_w and β, away from 1 so that every power shows


def expected_scales(parameterization: str, role: str, fan_in: int, fan_out: int):
    """The module docstring's table, written out independently of ``ntk_torch.nn.scales``."""
    d = fan_in
    if parameterization == "ntk":
        return SW / math.sqrt(d), 1.0, SB, 1.0
    if parameterization == "standard":
        return 1.0, SW / math.sqrt(d), 1.0, SB
    n = fan_out if role == "input" else d
    weights = {"input": (SW * math.sqrt(n / d), 1 / math.sqrt(n)),
               "hidden": (SW, 1 / math.sqrt(n)),
               "readout": (SW / math.sqrt(n), 1 / math.sqrt(n))}[role]
    bias = (SB, 1.0) if role == "readout" else (SB * math.sqrt(fan_out), 1 / math.sqrt(fan_out))
    return (*weights, *bias)


@pytest.mark.parametrize("parameterization", ["ntk", "standard", "mup"])
@pytest.mark.parametrize("role", ["input", "hidden", "readout"])
def test_dense_scales_follow_the_table(parameterization, role):
    layer = Dense(30, 50, parameterization=parameterization, weight_std=SW, bias_std=SB, role=role)
    got = (layer.multiplier, layer.init_std, layer.bias_multiplier, layer.bias_init_std)
    assert got == pytest.approx(expected_scales(parameterization, role, 30, 50), rel=1e-14)
    # The forward std m·s and the bias std m_b·s_b are what every parameterization shares,
    # except muP's readout, whose weights shrink like 1/n.
    effective = layer.multiplier * layer.init_std
    if parameterization == "mup" and role == "readout":
        assert effective == pytest.approx(SW / 30)
    else:
        assert effective == pytest.approx(SW / math.sqrt(30))
    assert layer.bias_multiplier * layer.bias_init_std == pytest.approx(SB)


@pytest.mark.parametrize("parameterization", ["ntk", "standard", "mup"])
@pytest.mark.parametrize("role", ["input", "hidden", "readout"])
def test_conv_scales_use_the_patch_fan_in(parameterization, role):
    layer = Conv2d(3, 8, (2, 3), parameterization=parameterization, weight_std=SW, bias_std=SB,
                   role=role)
    got = (layer.multiplier, layer.init_std, layer.bias_multiplier, layer.bias_init_std)
    assert got == pytest.approx(expected_scales(parameterization, role, 3 * 2 * 3, 8), rel=1e-14)


@pytest.mark.parametrize("parameterization", ["ntk", "standard", "mup"])
def test_raw_parameters_are_drawn_with_the_init_std(parameterization):
    torch.manual_seed(0)
    layer = Dense(400, 500, parameterization=parameterization, weight_std=SW, bias_std=SB)
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    # Sample std of k normals has relative standard error 1/√(2k): allow 5 of them.
    for sample, std in ((w, layer.init_std), (b, layer.bias_init_std)):
        k = sample.numel()
        assert float(sample.std()) == pytest.approx(std, rel=5 / math.sqrt(2 * k))
        assert abs(float(sample.mean())) < 5 * std / math.sqrt(k)


@pytest.mark.parametrize("parameterization", ["ntk", "standard", "mup"])
def test_dense_forward_is_the_formula(parameterization):
    torch.manual_seed(1)
    layer = Dense(4, 3, parameterization=parameterization, weight_std=SW, bias_std=SB).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    expected = layer.multiplier * x @ layer.weight.T + layer.bias_multiplier * layer.bias
    assert_close(layer(x).detach(), expected.detach())


@pytest.mark.parametrize("padding", ["same", "valid", 1, (0, 2)])
@pytest.mark.parametrize("kernel_size", [3, (2, 3)])
def test_conv_forward_is_the_formula(padding, kernel_size):
    torch.manual_seed(2)
    layer = Conv2d(2, 4, kernel_size, parameterization="standard", weight_std=SW, bias_std=SB,
                   padding=padding).double()
    x = torch.randn(3, 2, 6, 5, dtype=torch.float64)
    expected = F.conv2d(x, layer.multiplier * layer.weight, layer.bias_multiplier * layer.bias,
                        padding=padding)
    out = layer(x).detach()
    assert_close(out, expected.detach())
    if padding == "same":
        assert out.shape[-2:] == x.shape[-2:]


def test_no_bias():
    layer = Dense(3, 2, bias=False)
    assert layer.bias is None and [n for n, _ in layer.named_parameters()] == ["weight"]
    x = torch.randn(4, 3)
    assert_close(layer(x).detach(), (layer.multiplier * x @ layer.weight.T).detach())


def test_mlp_structure_and_names():
    torch.manual_seed(0)
    net = MLP(3, 16, 2, 4, activation="tanh", parameterization="mup", weight_std=SW, bias_std=SB)
    assert [n for n, _ in net.named_children()] == ["hidden0", "act0", "hidden1", "act1", "readout"]
    assert net[0] is net.hidden0 and net[-1] is net.readout
    assert [layer.role for layer in net.dense_layers] == ["input", "hidden", "readout"]
    shapes = [(d.in_features, d.out_features) for d in net.dense_layers]
    assert shapes == [(3, 16), (16, 16), (16, 4)]
    assert isinstance(net.act0, nn.Tanh) and net.act0 is not net.act1
    x = torch.randn(5, 3)
    assert net(x).shape == (5, 4)
    # A slice is a plain Sequential computing the same hidden features.
    head = net[:2]
    assert type(head) is nn.Sequential
    assert_close(head(x).detach(), torch.tanh(net.hidden0(x)).detach())
    # layerwise_ntk keys are these names.
    kernels = nt.layerwise_ntk(net, x[:2], mode="trace")
    assert sorted(kernels) == ["hidden0", "hidden1", "readout"]


def test_mlp_depth_zero_is_one_dense_layer():
    net = MLP(3, 16, 0, 2, parameterization="standard")
    assert [n for n, _ in net.named_children()] == ["readout"]
    assert (net.readout.in_features, net.readout.out_features) == (3, 2)


def test_mlp_is_reproducible_from_the_global_seed():
    torch.manual_seed(7)
    a = MLP(3, 8, 2, 1)
    torch.manual_seed(7)
    b = MLP(3, 8, 2, 1)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("spec, kind", [
    ("relu", nn.ReLU), ("leaky_relu", nn.LeakyReLU), ("gelu", nn.GELU), ("identity", nn.Identity),
    ("tanh", nn.Tanh), ("erf", Elementwise), ("abs", Elementwise), (torch.sin, Elementwise),
    (nn.LeakyReLU(0.2), nn.LeakyReLU),
])
def test_activation_specs(spec, kind):
    module = activation_module(spec)
    assert isinstance(module, kind)
    x = torch.linspace(-2, 2, 9)
    reference = {"erf": torch.erf, "abs": torch.abs}.get(spec, spec if callable(spec) else None)
    if reference is not None:
        assert_close(module(x), reference(x))


def test_activation_module_instances_are_copied():
    act = nn.LeakyReLU(0.3)
    net = MLP(2, 4, 2, 1, activation=act)
    assert net.act0 is not act and net.act0 is not net.act1
    assert net.act1.negative_slope == 0.3


@pytest.mark.parametrize("kwargs, error, match", [
    ({"depth": -1}, ValueError, "`depth` must be an int >= 0"),
    ({"width": 0}, ValueError, "`width` must be a positive int, got 0"),
    ({"in_features": 2.5}, TypeError, "`in_features` must be a positive int, got float 2.5"),
    ({"parameterization": "ntp"}, ValueError,
     "`parameterization` must be one of 'ntk', 'standard', 'mup'"),
    ({"parameterization": "mup", "depth": 0}, ValueError,
     "`depth` must be >= 1 with parameterization='mup'"),
    ({"weight_std": -1.0}, ValueError, "`weight_std` must be a finite number >= 0"),
    ({"bias_std": float("nan")}, ValueError, "`bias_std` must be a finite number >= 0"),
    ({"bias_std": "0.1"}, TypeError, "`bias_std` must be a finite number >= 0, got str"),
    ({"activation": "relu6x"}, ValueError, "`activation` must be one of 'relu'"),
])
def test_mlp_bad_arguments(kwargs, error, match):
    args = {"in_features": 3, "width": 8, "depth": 2, "out_features": 1, **kwargs}
    with pytest.raises(error, match=match):
        MLP(args.pop("in_features"), args.pop("width"), args.pop("depth"), args.pop("out_features"),
            **args)


def test_layer_bad_arguments():
    with pytest.raises(ValueError,
                       match="`role` must be one of 'input', 'hidden', 'readout', got 'output'"):
        Dense(3, 2, role="output")
    with pytest.raises(ValueError, match="`padding` must be one of 'same', 'valid'"):
        Conv2d(1, 1, 3, padding="full")
    with pytest.raises(ValueError, match="`kernel_size` must be a positive int, got 0"):
        Conv2d(1, 1, 0)
    with pytest.raises(ValueError,
                       match=r"`kernel_size` must be an int or a pair of ints, got \(1, 2, 3\)"):
        Conv2d(1, 1, (1, 2, 3))
    with pytest.raises(ValueError, match="`padding` must be an int >= 0, got -1"):
        Conv2d(1, 1, 3, padding=(1, -1))
    with pytest.raises(TypeError, match="`activation` must be a name, an nn.Module"):
        activation_module(3)


def _relative_feature_change(parameterization: str, width: int, seeds: int = 4) -> float:
    """RMS change of the second hidden layer's features after one SGD step, relative.

    The loss is linear in the outputs, ``mean(f(x)·y)``, so its gradient does not depend
    on the random outputs at initialisation and the step's size reflects only the
    parameterization (a squared loss makes it fluctuate by factors of 2 between seeds).
    """
    g = torch.Generator().manual_seed(1234)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g)
    changes = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        net = MLP(8, width, 2, 1, parameterization=parameterization, bias_std=0.5)
        before = net[:3](x).detach()
        grads = torch.autograd.grad((net(x) * y).mean(), list(net.parameters()))
        with torch.no_grad():
            for p, grad in zip(net.parameters(), grads):
                p -= 0.5 * grad
        after = net[:3](x).detach()
        changes.append(float((after - before).pow(2).mean().sqrt() / before.pow(2).mean().sqrt()))
    return sum(changes) / len(changes)


@pytest.mark.slow
def test_mup_features_move_independently_of_width_under_a_fixed_learning_rate():
    """The abc table's purpose (Yang & Hu 2021): with one global learning rate, hidden
    features move by Θ(1) at every width under muP, and by Θ(1/√n) under the NTK
    parameterization. From width 128 to 2048 the NTK ratio is 1/√16 = 0.25; muP's is 1.
    Five disjoint seed sets gave 0.92-1.15 and 0.23-0.29, inside the bounds below."""
    mup = _relative_feature_change("mup", 2048) / _relative_feature_change("mup", 128)
    ntk = _relative_feature_change("ntk", 2048) / _relative_feature_change("ntk", 128)
    assert 0.75 < mup < 1.35, mup
    assert 0.18 < ntk < 0.35, ntk
