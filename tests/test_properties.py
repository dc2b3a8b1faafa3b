"""Properties of the empirical NTK on random small models, drawn by hypothesis.

Models are MLPs and 1-d/2-d CNNs of a few layers (widths 1-6, outputs 1-3, various
activations, optional biases, frozen layers), in float64, with ``N1, N2`` in 1-4 samples,
every mode, every engine and random ``params=`` selections. Checked: agreement with the
naive float64 Jacobian oracle, symmetry and positive semi-definiteness of ``K(x, x)``,
per-layer kernels summing to the total, tiling, ``x2=None`` against ``x2=x1``, and the
modes as views of each other.

Tolerances come from Cauchy-Schwarz: an entry ``Θ[a, b, i, j] = Σ_p J1[a,i,p] J2[b,j,p]``
computed in floating point errs by at most about ``P·u`` (unit roundoff ``u = 1.1e-16``,
plus the Jacobians' own rounding) times ``Σ_p |J1[a,i,p] J2[b,j,p]| <= |J1[a,i]| |J2[b,j]|``.
Entries are compared within ``RTOL · |J1[a,i]| |J2[b,j]|`` (row norms of the oracle's
Jacobians; ``RTOL = 1e-10`` covers ``P`` in the hundreds here), however small the entry
itself is after cancellation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import ntk_torch as nt
from ntk_torch._engines import ENGINES
from tests.conftest import RTOL
from tests.oracle import naive_jacobian

IMPLEMENTATIONS = sorted(ENGINES) + ["auto"]
MODES = ("full", "diagonal", "trace")
TOL = RTOL[torch.float64]

ACTIVATIONS = {
    "tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus, "elu": nn.ELU, "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "identity": nn.Identity,
}


def examples(n: int) -> settings:
    """``n`` reproducible examples: derandomized, no example database written to disk."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------
# Models as plain descriptions, so that a failing example prints what to rebuild.


@dataclass(frozen=True)
class Layer:
    """A hidden layer: a Linear (``kernel == 0``) or a convolution, then an activation."""

    width: int
    activation: str
    bias: bool
    frozen: bool
    kernel: int = 0
    stride: int = 1
    padding: int = 0


@dataclass(frozen=True)
class ModelSpec:
    """Input shape per sample, hidden layers, a Linear head with ``out`` outputs.

    A CNN's feature maps reach the dense layers through a global average pool (``pool``)
    or flattened. ``squeeze`` makes a one-output model return ``(N,)``.
    """

    input_shape: tuple[int, ...]
    hidden: tuple[Layer, ...]
    out: int
    head_bias: bool
    head_frozen: bool
    pool: bool
    squeeze: bool
    seed: int

    def build(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            modules, shape = [], self.input_shape
            for layer in self.hidden:
                if layer.kernel:
                    conv = nn.Conv1d if len(shape) == 2 else nn.Conv2d
                    module = conv(shape[0], layer.width, layer.kernel, stride=layer.stride,
                                  padding=layer.padding, bias=layer.bias)
                    shape = (layer.width, *conv_sizes(shape[1:], layer))
                else:
                    modules, shape = self._to_vector(modules, shape)
                    module = nn.Linear(shape[0], layer.width, bias=layer.bias)
                    shape = (layer.width,)
                module.requires_grad_(not layer.frozen)
                modules += [module, ACTIVATIONS[layer.activation]()]
            modules, shape = self._to_vector(modules, shape)
            head = nn.Linear(shape[0], self.out, bias=self.head_bias)
            modules.append(head.requires_grad_(not self.head_frozen))
            if self.squeeze:
                modules.append(nn.Flatten(0))
            return nn.Sequential(*modules).double().eval()

    def _to_vector(self, modules: list[nn.Module], shape: tuple[int, ...]):
        if len(shape) == 1:
            return modules, shape
        if self.pool:
            pool = nn.AdaptiveAvgPool1d(1) if len(shape) == 2 else nn.AdaptiveAvgPool2d(1)
            return [*modules, pool, nn.Flatten()], (shape[0],)
        return [*modules, nn.Flatten()], (int(torch.Size(shape).numel()),)


def conv_sizes(sizes: tuple[int, ...], layer: Layer) -> tuple[int, ...]:
    return tuple((s + 2 * layer.padding - layer.kernel) // layer.stride + 1 for s in sizes)


def hidden_layers(draw, count: int, shape: tuple[int, ...] | None = None) -> tuple[Layer, ...]:
    """``count`` hidden layers: convolutions over ``shape`` (channels, *sizes) if given."""
    drawn = []
    for _ in range(count):
        common = dict(width=draw(st.integers(1, 6)),
                      activation=draw(st.sampled_from(sorted(ACTIVATIONS))),
                      bias=draw(st.booleans()), frozen=draw(st.booleans()))
        if shape is None:
            drawn.append(Layer(**common))
            continue
        kernel = draw(st.integers(1, min(3, *shape[1:])))
        # Padding below half the kernel: every output position sees some of the input.
        layer = Layer(**common, kernel=kernel, stride=draw(st.integers(1, 2)),
                      padding=draw(st.integers(0, (kernel - 1) // 2)))
        shape = (layer.width, *conv_sizes(shape[1:], layer))
        drawn.append(layer)
    return tuple(drawn)


@st.composite
def model_specs(draw) -> ModelSpec:
    kind = draw(st.sampled_from(["mlp", "cnn1d", "cnn2d"]))
    if kind == "mlp":
        input_shape = (draw(st.integers(1, 4)),)
        hidden = hidden_layers(draw, draw(st.integers(1, 3)))
    else:
        sizes = st.integers(3, 5)
        spatial = (draw(sizes),) if kind == "cnn1d" else (draw(sizes), draw(sizes))
        input_shape = (draw(st.integers(1, 3)), *spatial)
        convs = hidden_layers(draw, draw(st.integers(1, 2)), input_shape)
        dense = hidden_layers(draw, draw(st.integers(0, 1)))
        hidden = convs + dense
    out = draw(st.integers(1, 3))
    return ModelSpec(input_shape=input_shape, hidden=hidden, out=out,
                     head_bias=draw(st.booleans()), head_frozen=draw(st.booleans()),
                     pool=draw(st.booleans()), squeeze=out == 1 and draw(st.booleans()),
                     seed=draw(st.integers(0, 2**16)))


@dataclass(frozen=True)
class Problem:
    """A model, a parameter selection, inputs ``x1 (n1, ...)`` and ``x2 (n2, ...)``
    (``n2=None``: ``x2=None``), a mode, an engine and a ``batch_size``."""

    spec: ModelSpec
    params: tuple[str, ...] | None
    n1: int
    n2: int | None
    data_seed: int
    mode: str
    implementation: str
    batch_size: int | None

    def model(self) -> nn.Module:
        return self.spec.build()

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        g = torch.Generator().manual_seed(self.data_seed)
        shape = self.spec.input_shape
        x1 = torch.randn(self.n1, *shape, generator=g, dtype=torch.float64)
        x2 = None if self.n2 is None else torch.randn(self.n2, *shape, generator=g,
                                                      dtype=torch.float64)
        return x1, x2

    def selected(self, model: nn.Module) -> list[str]:
        """The parameter names the kernel differentiates, in ``named_parameters`` order."""
        if self.params is None:
            return [n for n, p in model.named_parameters() if p.requires_grad]
        return [n for n, _ in model.named_parameters() if n in self.params]

    def kwargs(self, **overrides) -> dict:
        return dict(dict(mode=self.mode, implementation=self.implementation,
                         params=self.params, batch_size=self.batch_size), **overrides)


@st.composite
def problems(draw, symmetric: bool | None = None, tiled: bool | None = None) -> Problem:
    """``symmetric``: force ``x2=None`` (True) or a given ``x2`` (False); ``tiled``: force a
    ``batch_size`` below the number of samples (True) or none (False)."""
    spec = draw(model_specs())
    model = spec.build()
    names = [n for n, _ in model.named_parameters()]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    subsets = st.lists(st.sampled_from(names), min_size=1, unique=True).map(tuple)
    params = draw(st.one_of(st.none(), subsets) if trainable else subsets)
    low = 2 if tiled else 1
    n1 = draw(st.integers(low, 4))
    symmetric = draw(st.booleans()) if symmetric is None else symmetric
    n2 = None if symmetric else draw(st.integers(low, 4))
    largest = max(n1, n2 or n1)
    if tiled is None:
        batch_size = draw(st.one_of(st.none(), st.integers(1, largest)))
    else:
        batch_size = draw(st.integers(1, largest - 1)) if tiled else None
    return Problem(spec=spec, params=params, n1=n1, n2=n2,
                   data_seed=draw(st.integers(0, 2**16)), mode=draw(st.sampled_from(MODES)),
                   implementation=draw(st.sampled_from(IMPLEMENTATIONS)), batch_size=batch_size)


# ---------------------------------------------------------------------------------------
# The oracle and the Cauchy-Schwarz bound.


def jacobian(model: nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """``(N, O, P)`` by the naive oracle, on a copy whose ``requires_grad`` marks ``names``
    (a selection may name frozen parameters)."""
    model = copy.deepcopy(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    return naive_jacobian(model, x, names)


def in_mode(full: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "full":
        return full
    diagonal = full.diagonal(dim1=2, dim2=3)
    return diagonal if mode == "diagonal" else diagonal.mean(-1)


@dataclass(frozen=True)
class Oracle:
    """The kernel from explicit Jacobians and the bound on each entry's rounding error."""

    full: torch.Tensor   # (N1, N2, O, O)
    scale: torch.Tensor  # (N1, N2, O, O): |J1[a,i]| |J2[b,j]|

    @classmethod
    def of(cls, model, x1, x2, names) -> Oracle:
        j1 = jacobian(model, x1, names)
        j2 = j1 if x2 is None else jacobian(model, x2, names)
        r1, r2 = j1.norm(dim=-1), j2.norm(dim=-1)
        return cls(torch.einsum("aip,bjp->abij", j1, j2),
                   r1[:, None, :, None] * r2[None, :, None, :])

    def kernel(self, mode: str) -> torch.Tensor:
        return in_mode(self.full, mode)

    def bound(self, mode: str) -> torch.Tensor:
        return TOL * in_mode(self.scale, mode)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor,
                  what: str) -> None:
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    excess = (actual - expected).abs() - bound
    if (excess > 0).any():
        worst = torch.unravel_index(excess.argmax(), excess.shape)
        index = tuple(int(i) for i in worst)
        raise AssertionError(
            f"{what}: at {index} got {actual[index].item():.17g}, expected "
            f"{expected[index].item():.17g}, allowed error {bound[index].item():.3g}; "
            f"{int((excess > 0).sum())} entries out of bounds")


def as_matrix(full: torch.Tensor) -> torch.Tensor:
    """``(N, N, O, O)`` -> ``(N·O, N·O)`` with rows ``(a, i)``."""
    n, _, o, _ = full.shape
    return full.permute(0, 2, 1, 3).reshape(n * o, n * o)


# ---------------------------------------------------------------------------------------
# Properties.


# Every engine gets its own examples (drawn, an engine could go almost unvisited).
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@given(problem=problems())
@examples(100)
def test_every_engine_matches_the_oracle(implementation, problem):
    model = problem.model()
    x1, x2 = problem.inputs()
    oracle = Oracle.of(model, x1, x2, problem.selected(model))
    k = nt.empirical_ntk(model, x1, x2, **problem.kwargs(implementation=implementation))
    assert_within(k, oracle.kernel(problem.mode), oracle.bound(problem.mode), "kernel")


@given(problems(symmetric=True))
@examples(60)
def test_kernel_of_x_with_itself_is_symmetric_and_psd(problem):
    model = problem.model()
    x, _ = problem.inputs()
    oracle = Oracle.of(model, x, None, problem.selected(model))
    k = nt.empirical_ntk(model, x, **problem.kwargs(mode="full"))
    assert torch.equal(k, k.permute(1, 0, 3, 2)), "x2=None must give an exactly symmetric kernel"
    given_twice = nt.empirical_ntk(model, x, x, **problem.kwargs(mode="full"))
    assert_within(given_twice, given_twice.permute(1, 0, 3, 2), 2 * oracle.bound("full"),
                  "K(x, x) against its transpose")
    matrix = as_matrix(k)
    # Weyl: rounding errors E move eigenvalues by at most |E|_2 <= |E|_F <= TOL · trace(K).
    smallest = torch.linalg.eigvalsh(matrix).min()
    assert smallest >= -TOL * matrix.trace(), f"eigenvalue {smallest.item():.3g} of K(x, x)"


@given(problems())
@examples(60)
def test_layer_kernels_sum_to_the_total(problem):
    model = problem.model()
    x1, x2 = problem.inputs()
    names = problem.selected(model)
    oracle = Oracle.of(model, x1, x2, names)
    layers = nt.layerwise_ntk(model, x1, x2, **problem.kwargs())
    assert sorted(layers) == sorted({n.rpartition(".")[0] for n in names})
    total = nt.empirical_ntk(model, x1, x2, **problem.kwargs())
    assert_within(sum(layers.values()), total, 2 * oracle.bound(problem.mode), "sum of layers")


@given(problems(tiled=True))
@examples(60)
def test_tiling_equals_untiled(problem):
    model = problem.model()
    x1, x2 = problem.inputs()
    oracle = Oracle.of(model, x1, x2, problem.selected(model))
    tiled = nt.empirical_ntk(model, x1, x2, **problem.kwargs())
    whole = nt.empirical_ntk(model, x1, x2, **problem.kwargs(batch_size=None))
    assert_within(tiled, whole, 2 * oracle.bound(problem.mode),
                  f"batch_size={problem.batch_size} against untiled")


@given(problems(symmetric=True))
@examples(60)
def test_x2_none_equals_x2_given_as_x1(problem):
    model = problem.model()
    x, _ = problem.inputs()
    oracle = Oracle.of(model, x, None, problem.selected(model))
    alone = nt.empirical_ntk(model, x, **problem.kwargs())
    twice = nt.empirical_ntk(model, x, x, **problem.kwargs())
    assert_within(alone, twice, 2 * oracle.bound(problem.mode), "x2=None against x2=x1")


@given(problems())
@examples(60)
def test_modes_are_views_of_the_full_kernel(problem):
    model = problem.model()
    x1, x2 = problem.inputs()
    oracle = Oracle.of(model, x1, x2, problem.selected(model))
    full, diagonal, trace = (nt.empirical_ntk(model, x1, x2, **problem.kwargs(mode=mode))
                             for mode in MODES)
    assert_within(diagonal, full.diagonal(dim1=2, dim2=3), 2 * oracle.bound("diagonal"),
                  "diagonal mode against the diagonal of full")
    assert_within(trace, diagonal.mean(-1), 2 * oracle.bound("trace"),
                  "trace mode against the mean of the diagonal")


def test_bound_is_tight_enough_to_catch_a_wrong_kernel():
    # The Cauchy-Schwarz bound must not hide errors: a kernel off by one part in 10^8
    # (from float32 rounding of one Jacobian, say) fails it.
    spec = ModelSpec(input_shape=(3,), hidden=(Layer(4, "tanh", True, False),), out=2,
                     head_bias=True, head_frozen=False, pool=False, squeeze=False, seed=0)
    model = spec.build()
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    oracle = Oracle.of(model, x, None, [n for n, _ in model.named_parameters()])
    k = nt.empirical_ntk(model, x)
    assert_within(k, oracle.kernel("full"), oracle.bound("full"), "kernel")
    with pytest.raises(AssertionError, match="out of bounds"):
        assert_within(k * (1 + 1e-8), oracle.kernel("full"), oracle.bound("full"), "kernel")
