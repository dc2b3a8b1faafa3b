"""Infinite-width kernels of modules read through torch.fx, against independent oracles.

- Monte Carlo (``nt.analytic.monte_carlo_kernel``) over wide networks with Gaussian
  weights, for every new map: residual sums, strided and dilated convolutions, 1-d
  convolutions and pooling, average pooling of any size, LayerNorm before ReLU and tanh,
  concatenation, constant factors, functional activations.
- Exactness where the empirical NTK is deterministic (models linear in their parameters).
- Identities: a frozen zero branch is the identity, 1x1 pooling does nothing, LayerNorm's
  NNGP diagonal is 1, a strided convolution is the subsampled stride-1 one, and the
  ``nn.Sequential`` path agrees with the graph path.
- Refusals name the node, the op and the source line, and point to Monte Carlo.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntk_torch as nt
from ntk_torch import analytic
from ntk_torch.analytic import layers as L
from ntk_torch.nn import Conv2d, Dense
from tests.conftest import assert_close, assert_kernels_within_standard_errors

DT = torch.float64


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _assert_same_kernel(a, b, rtol: float = 1e-14) -> None:
    """Both parts of two ``Kernel`` results agree (two ways of writing one model)."""
    assert_close(a.nngp, b.nngp, rtol=rtol)
    assert_close(a.ntk, b.ntk, rtol=rtol)


def gaussian(model: nn.Module) -> nn.Module:
    """PyTorch's layers with Gaussian weights and biases of their default variance.

    The analytic kernel reads nn.Linear/nn.Conv* as weights of variance 1/(3·fan_in);
    their default uniform draw makes the first layer's pre-activations non-Gaussian for a
    small fan-in, which the limit does not describe.
    """
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            std = (3 * m.weight[0].numel()) ** -0.5
            with torch.no_grad():
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.normal_(0.0, std)
    return model


# ------------------------------------------------------------------ models


class ResidualCNN(nn.Module):
    """Strided stem, one pre-activation residual block, average pooling, mean, readout."""

    def __init__(self, width: int, out: int = 8, zero_branch: bool = False) -> None:
        super().__init__()
        self.stem = Conv2d(1, width, 3, padding=1, stride=2, bias_std=0.2)
        self.conv1 = Conv2d(width, width, 3, weight_std=1.4)
        self.conv2 = Conv2d(width, width, 3, weight_std=0.0 if zero_branch else 1.0,
                            bias=not zero_branch)
        if zero_branch:
            self.conv2.weight.requires_grad_(False)
        self.pool = nn.AvgPool2d(2)
        self.head = Dense(width, out)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.conv2(F.relu(self.conv1(F.relu(h))))
        return self.head(self.pool(h).mean((2, 3)))


class StridedCNN(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, width, 3, stride=2, dilation=2, padding="valid")
        self.c2 = nn.Conv2d(width, width, 2, stride=(1, 2), padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d((2, 2))
        self.head = nn.Linear(4 * width, 8)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = F.gelu(self.c2(h))
        return self.head(torch.flatten(self.pool(h), 1))


class Sequence1d(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, width, 3, stride=2, padding=1)
        self.pool = nn.AvgPool1d(2)
        self.c2 = nn.Conv1d(width, width, 3, padding="same")
        self.head = nn.Linear(width * 3, 8)

    def forward(self, x):
        h = self.pool(F.relu(self.c1(x)))
        h = F.leaky_relu(self.c2(h), 0.2)
        return self.head(h.view(h.size(0), -1))


class LayerNormMLP(nn.Module):
    def __init__(self, width: int, activation) -> None:
        super().__init__()
        self.l1, self.ln = nn.Linear(5, width), nn.LayerNorm(width)
        self.l2, self.l3 = nn.Linear(width, width), nn.Linear(width, 8)
        self.activation = activation

    def forward(self, x):
        return self.l3(F.relu(self.l2(self.activation(self.ln(self.l1(x))))))


class PreLNResidual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp, self.ln1 = nn.Linear(4, width), nn.LayerNorm(width)
        self.f1, self.f2 = nn.Linear(width, width), nn.Linear(width, width)
        self.ln2, self.out = nn.LayerNorm(width, eps=0.1), nn.Linear(width, 8)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.f2(F.gelu(self.f1(self.ln1(h)), approximate="tanh"))
        return self.out(self.ln2(h))


class Branches(nn.Module):
    """Two branches concatenated, scaled, negated, a sigmoid and functional pooling."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, width, 3, padding=1)
        self.b = nn.Conv2d(1, 2 * width, 1)
        self.c = nn.Conv2d(3 * width, width, 3, padding=1)
        self.head = nn.Linear(width, 8)

    def forward(self, x):
        h = F.relu(torch.cat([self.a(x), 0.5 * self.b(x)], dim=1))
        h = -self.c(h) / 2
        return self.head(F.adaptive_avg_pool2d(torch.sigmoid(h), 1).flatten(1))


MONTE_CARLO_CASES = {
    "residual_cnn": (lambda: ResidualCNN(128), (3, 1, 8, 8)),
    "strided_dilated_cnn": (lambda: StridedCNN(128), (3, 2, 9, 9)),
    "conv1d_avg_pool1d": (lambda: Sequence1d(256), (3, 3, 12)),
    "layer_norm_tanh": (lambda: LayerNormMLP(512, torch.tanh), (3, 5)),
    "layer_norm_relu": (lambda: LayerNormMLP(512, F.relu), (3, 5)),
    # The gain's term through tanh, E[u φ'(u) v φ'(v)], right before the readout: leaving
    # it out (or taking T'·K for it) puts the mean 80 standard errors off.
    "layer_norm_tanh_readout": (lambda: nn.Sequential(Dense(5, 512), nn.LayerNorm(512),
                                                      nn.Tanh(), Dense(512, 8)), (3, 5)),
    "pre_layer_norm_residual": (lambda: PreLNResidual(512), (3, 4)),
    "concatenated_branches": (lambda: Branches(128), (3, 1, 6, 6)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MONTE_CARLO_CASES))
def test_monte_carlo(name):
    build, shape = MONTE_CARLO_CASES[name]
    x = _x(*shape, seed=1)
    expected = analytic.kernel(build(), x)
    mc = analytic.monte_carlo_kernel(lambda seed: gaussian(build()), x, n_samples=32,
                                     progress=False)
    assert_kernels_within_standard_errors(mc, expected)


# ------------------------------------------------------------------ exact cases


class OneLayerConv(nn.Module):
    """Linear in its parameters: the empirical NTK is the same for every draw."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, (3, 2), stride=2, dilation=(2, 1), padding=(1, 2))
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True,
                                 count_include_pad=False)

    def forward(self, x):
        return self.pool(self.conv(x)).flatten(1)


class OneLayerConv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2)

    def forward(self, x):
        return F.avg_pool1d(self.conv(x), 2, 1).flatten(1)


class TwoBranchesLinear(nn.Module):
    """Two independent linear layers on one input, summed, concatenated, scaled."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(4, 2)

    def forward(self, x):
        return torch.cat([self.a(x) - 2 * self.b(x), self.c(x) / 3], dim=1)


@pytest.mark.parametrize("model, shape", [
    (OneLayerConv, (3, 2, 9, 8)), (OneLayerConv1d, (3, 2, 11)), (TwoBranchesLinear, (3, 4)),
])
def test_models_linear_in_their_parameters_are_exact(model, shape):
    torch.manual_seed(0)
    net = model().double()
    x1, x2 = _x(*shape, seed=1), _x(2, *shape[1:], seed=2)
    expected = nt.empirical_ntk(net, x1, x2, mode="trace")
    assert_close(analytic.kernel(net, x1, x2).ntk, expected, rtol=1e-12)


# ------------------------------------------------------------------ identities


class Residual(nn.Module):
    def __init__(self, body: nn.Module, branch: nn.Module) -> None:
        super().__init__()
        self.body, self.branch = body, branch

    def forward(self, x):
        h = self.body(x)
        return h + self.branch(h)


def test_a_frozen_zero_branch_is_the_identity():
    x = _x(4, 1, 6, 6)
    with_block = analytic.kernel(ResidualCNN(4, zero_branch=True), x)

    class Plain(ResidualCNN):
        def forward(self, x):
            return self.head(self.pool(self.stem(x)).mean((2, 3)))

    without = analytic.kernel(Plain(4), x)
    _assert_same_kernel(with_block, without, rtol=1e-13)


def test_a_zero_branch_that_trains_adds_only_its_last_weights_term():
    # h + W·g(h) with W = 0 trainable (standard parameterization: multiplier 1, std 0):
    # Σ unchanged, Θ gains the weight term n·K_g, K_g the mean over the n = 16 channels
    # of g(h) g(h'), passed on by the readout (m² s² n = 1 in the NTK parameterization).
    x = _x(4, 3)
    body = nn.Sequential(Dense(3, 16), nn.Tanh())
    last = Dense(16, 16, parameterization="standard", weight_std=0.0, bias=False)
    model = nn.Sequential(Residual(Dense(3, 16), nn.Sequential(nn.Tanh(), last)),
                          Dense(16, 2))
    plain = nn.Sequential(Dense(3, 16), Dense(16, 2))
    k, k0 = analytic.kernel(model, x), analytic.kernel(plain, x)
    assert_close(k.nngp, k0.nngp, rtol=1e-13)
    branch_input = analytic.kernel(body, x)  # K_g
    assert_close(k.ntk - k0.ntk, 16 * branch_input.nngp, rtol=1e-12)


@pytest.mark.parametrize("pool", [nn.AvgPool2d(1), nn.AdaptiveAvgPool2d((5, 5))])
def test_one_by_one_pooling_does_nothing(pool):
    x = _x(3, 2, 5, 5)
    body = [nn.Conv2d(2, 8, 3, padding=1), nn.ReLU()]
    head = [nn.Flatten(), nn.Linear(200, 1)]
    a = analytic.kernel(nn.Sequential(*body, pool, *head), x)
    b = analytic.kernel(nn.Sequential(*body, *head), x)
    _assert_same_kernel(a, b)


def test_layer_norm_nngp_diagonal_is_one():
    x = _x(5, 3) * torch.tensor([1.0, 10.0, 0.1], dtype=DT)
    model = nn.Sequential(Dense(3, 7), nn.LayerNorm(7, eps=0.0, elementwise_affine=False),
                          Dense(7, 2, bias=False))
    k = analytic.kernel(model, x)
    assert_close(k.nngp.diagonal(), torch.ones(5, dtype=DT), rtol=1e-14)
    # With eps the diagonal is K/(K + eps), K = |x|²/3 (NTK parameterization, no bias).
    model[1].eps = 0.5
    sq = (x * x).sum(1) / 3
    assert_close(analytic.kernel(model, x).nngp.diagonal(), sq / (sq + 0.5), rtol=1e-14)


@pytest.mark.parametrize("padding, dilation", [((0, 0, 0, 0), (1, 1)), ((1, 1, 1, 1), (1, 1)),
                                               ((2, 2, 1, 1), (2, 1))])
def test_strided_convolution_is_the_subsampled_stride_one_convolution(padding, dilation):
    state = L.input_kernel(_x(2, 3, 9, 8), _x(3, 3, 9, 8, seed=1))
    args = (3, 5, (3, 3), padding, 1.0, 0.7, 1.0, 0.3)
    strided = L.conv2d(*args, dilation=dilation, stride=(2, 3))(state)
    dense = L.conv2d(*args, dilation=dilation)(state)
    rows, cols = slice(None, None, 2), slice(None, None, 3)
    sub = (..., rows, cols, rows, cols)
    for field in ("nngp", "ntk", "cov1", "cov2"):
        assert_close(getattr(strided, field), getattr(dense, field)[sub], rtol=1e-14)


@pytest.mark.parametrize("layers", [
    lambda: [nn.Linear(3, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 2)],
    lambda: [nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Tanh(), nn.AvgPool2d(2, 1),
             nn.Conv2d(8, 8, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
             nn.Linear(8, 2)],
    lambda: [nn.Conv1d(3, 8, 3), nn.ReLU(), nn.AvgPool1d(2), nn.Flatten(),
             nn.Linear(8 * 4, 2)],
])
def test_sequential_and_graph_paths_agree(layers):
    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(layers())

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    chain = Chain()
    x = _x(3, 3, 6, 6) if isinstance(chain.layers[0], nn.Conv2d) else (
        _x(3, 3, 10) if isinstance(chain.layers[0], nn.Conv1d) else _x(3, 3))
    a = analytic.kernel(nn.Sequential(*chain.layers), x)
    b = analytic.kernel(chain, x)
    _assert_same_kernel(a, b)


def test_sum_of_a_branch_with_itself_is_twice_it():
    class Twice(nn.Module):
        def __init__(self, how: str) -> None:
            super().__init__()
            self.a, self.b, self.how = nn.Linear(3, 8), nn.Linear(8, 1), how

        def forward(self, x):
            h = self.a(x)
            return self.b(F.relu(h + h if self.how == "sum" else 2 * h))

    x = _x(4, 3)
    a, b = analytic.kernel(Twice("sum"), x), analytic.kernel(Twice("scale"), x)
    _assert_same_kernel(a, b)


def test_global_pooling_three_ways_agree():
    class Pool(nn.Module):
        def __init__(self, how: str) -> None:
            super().__init__()
            self.conv, self.head, self.how = nn.Conv2d(2, 6, 3), nn.Linear(6, 2), how

        def forward(self, x):
            h = torch.relu(self.conv(x))
            if self.how == "mean":
                h = h.mean(dim=(-1, -2))
            elif self.how == "adaptive":
                h = F.adaptive_avg_pool2d(h, (1, 1)).flatten(1)
            else:
                h = F.avg_pool2d(h, h.shape[-1]).view(h.size(0), -1)
            return self.head(h)

    x = _x(3, 2, 5, 5)
    ks = [analytic.kernel(Pool(how), x) for how in ("mean", "adaptive", "avg")]
    for k in ks[1:]:
        _assert_same_kernel(k, ks[0])


def test_conv2d_of_this_package_takes_a_stride():
    conv = Conv2d(2, 4, 3, padding=1, stride=2)
    assert conv(torch.randn(1, 2, 7, 7)).shape == (1, 4, 4, 4)
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        Conv2d(2, 4, 3, stride=2)


# ------------------------------------------------------------------ refusals


class _Forward(nn.Module):
    """A module whose forward is given, with two linear layers and a convolution."""

    def __init__(self, forward) -> None:
        super().__init__()
        self.lin, self.lin2 = nn.Linear(4, 4), nn.Linear(4, 4)
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.fn = forward

    def forward(self, x):
        return self.fn(self, x)


def _line_of(fn) -> int:
    return inspect.getsourcelines(fn)[1]


REFUSED = [
    (lambda s, x: s.lin(x) * s.lin2(x), "products of features", "mul"),
    (lambda s, x: s.lin(x) + 1.0, "adding a constant", "add"),
    (lambda s, x: s.lin(x) + F.relu(s.lin(x)), "also called", "lin_1"),
    (lambda s, x: (lambda h: h + F.relu(h))(s.lin(x)), "not independent", "add"),
    (lambda s, x: F.softmax(s.lin(x), dim=1), "no infinite-width rule", "softmax"),
    (lambda s, x: s.lin(x).detach(), "no infinite-width rule", "detach"),
    (lambda s, x: torch.cat([s.lin(x), s.lin2(x)], dim=0), "along the channel", "cat"),
    (lambda s, x: F.max_pool2d(s.conv(x), 1).flatten(1), "no infinite-width rule",
     "max_pool2d"),
    (lambda s, x: s.bn(s.conv(x)).flatten(1), "BatchNorm2d", "bn"),
    (lambda s, x: s.conv(x).view(x.size(0), 4, 4), "only flattening", "view"),
    (lambda s, x: s.lin(x) * s.lin2.bias[0], "trainable scalar", "mul"),
]


@pytest.mark.parametrize("forward, why, node", REFUSED)
def test_refusals_name_the_node_op_and_line(forward, why, node):
    images = any(name in inspect.getsource(forward) for name in ("conv", "bn"))
    with pytest.raises(ValueError) as info:
        analytic.kernel(_Forward(forward), _x(3, 4, 2, 2) if images else _x(3, 4))
    message = str(info.value)
    assert why in message
    assert f"node '{node}" in message
    assert f"{__file__}:{_line_of(forward)}" in message
    assert "monte_carlo_kernel" in message


def test_models_torch_fx_cannot_trace_are_refused_with_the_reason():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(x) if x.sum() > 0 else -self.lin(x)

    with pytest.raises(ValueError, match="torch.fx, which cannot trace Branchy.*"
                                         "monte_carlo_kernel"):
        analytic.kernel(Branchy(), _x(2, 3))


def test_two_inputs_and_layer_norm_of_images_are_refused():
    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(ValueError, match="models of one input tensor.*takes \\[.x., .y.\\]"):
        analytic.kernel(TwoInputs(), _x(2, 3))
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.LayerNorm([2, 3, 3]))
    with pytest.raises(ValueError, match="only LayerNorm over the last dimension"):
        analytic.kernel(model, _x(2, 1, 3, 3))


def test_activation_after_a_sum_with_a_layer_norm_gain_is_refused():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.ln = nn.Linear(3, 8), nn.Linear(3, 8), nn.LayerNorm(8)
            self.out = nn.Linear(8, 1)

        def forward(self, x):
            return self.out(torch.tanh(self.ln(self.a(x)) + self.b(x)))

    with pytest.raises(ValueError, match="node 'tanh'.*LayerNorm with a trainable gain"):
        analytic.kernel(Mixed(), _x(2, 3))


@pytest.mark.parametrize("reshape", [
    lambda x: x.view(-1, 2, 3, 3), lambda x: x.reshape(x.shape[0], 2, 3, 3),
    nn.Unflatten(1, (2, 3, 3)),
])
def test_a_model_that_views_flat_inputs_as_images_reads_the_images(reshape):
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.reshape = reshape
            self.conv, self.head = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4, 1)

        def forward(self, x):
            h = torch.relu(self.conv(self.reshape(x)))
            return self.head(h.mean((2, 3)))

    class Images(Flat):
        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).mean((2, 3)))

    x = _x(3, 18)
    a, b = analytic.kernel(Flat(), x), analytic.kernel(Images(), x.view(3, 2, 3, 3))
    _assert_same_kernel(a, b)


# ------------------------------------------------------------------ neural-tangents


def _stax_models() -> dict[str, nn.Module]:
    """The architectures of tests/data/make_stax_references.py, as PyTorch modules."""
    ntk = {"weight_std": 1.5, "bias_std": 0.2}

    class StridedCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = Conv2d(2, 8, 3, stride=2, padding="valid", **ntk)
            self.c2 = Conv2d(8, 8, 2, padding="valid", **ntk)
            self.pool, self.out = nn.AvgPool2d(2, stride=1), Dense(8, 1, **ntk)

        def forward(self, x):
            h = torch.erf(self.c2(self.pool(F.relu(self.c1(x)))))
            return self.out(h.mean((2, 3)))

    class Concatenation(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = Conv2d(2, 8, 3, **ntk), Conv2d(2, 8, 1, **ntk)
            self.c, self.out = Conv2d(16, 8, 3, padding="valid", **ntk), Dense(8 * 9, 1, **ntk)

        def forward(self, x):
            h = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
            return self.out(self.c(h).flatten(1))

    class ResidualLayerNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = Dense(5, 16, **ntk)
            self.f1, self.f2 = Dense(16, 16, **ntk), Dense(16, 16, **ntk)
            self.ln = nn.LayerNorm(16, eps=1e-12, elementwise_affine=False)
            self.d, self.out = Dense(16, 16, **ntk), Dense(16, 1, **ntk)

        def forward(self, x):
            h = self.stem(x)
            h = h + self.f2(torch.erf(self.f1(F.relu(h))))
            return self.out(torch.erf(self.d(self.ln(h))))

    return {"strided_cnn": StridedCNN(), "concatenation": Concatenation(),
            "residual_layer_norm": ResidualLayerNorm()}


@pytest.mark.parametrize("name", ["strided_cnn", "concatenation", "residual_layer_norm"])
def test_agreement_with_neural_tangents(name):
    # stax's kernels of the same architectures (NTK parameterization, σ_w = 1.5, β = 0.2),
    # computed by tests/data/make_stax_references.py: an independent implementation.
    reference = json.loads((Path(__file__).parent / "data" / "stax_references.json")
                           .read_text())[name]
    x = torch.tensor(reference["x"], dtype=DT)
    if x.dim() == 4:
        x = x.permute(0, 3, 1, 2)  # stax's images are (N, H, W, C)
    k = analytic.kernel(_stax_models()[name], x)
    for field in ("nngp", "ntk"):
        expected = torch.tensor(reference[field], dtype=DT)
        diff = (getattr(k, field) - expected).abs() / expected.abs().max()
        # Off the diagonal: rounding. On it (correlation 1), stax's arccos(1 - ε) carries
        # its rounding into ReLU's derivative kernel as √(2ε) ≈ 2e-8, which this package
        # snaps away.
        assert float(diff.diagonal().max()) < 1e-7, field
        assert float(diff.fill_diagonal_(0).max()) < 1e-12, field
