"""Every registered engine and mode against the naive float64 Jacobian oracle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ntk_torch as nt
from ntk_torch._engines import ENGINES
from tests.cases import CASES
from tests.conftest import RTOL, assert_close
from tests.oracle import naive_ntk, owner_names

MODES = ["full", "diagonal", "trace"]
IMPLEMENTATIONS = sorted(ENGINES) + ["auto"]

_ORACLE: dict[tuple, torch.Tensor] = {}


def oracle(case, mode, symmetric, names=None):
    """Naive kernel of the case's float64 model on fixed inputs, cached per case."""
    key = (case.name, symmetric, tuple(names or ()))
    if key not in _ORACLE:
        model = case.build()
        x1, x2 = case.inputs(5), case.inputs(3, seed=7)
        _ORACLE[key] = naive_ntk(model, x1, None if symmetric else x2, "full", names)
    full = _ORACLE[key]
    if mode == "full":
        return full
    diagonal = full.diagonal(dim1=2, dim2=3)
    return diagonal if mode == "diagonal" else diagonal.mean(-1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_matches_oracle(case, implementation, mode):
    model = case.build()
    k = nt.empirical_ntk(model, case.inputs(5), case.inputs(3, seed=7), mode=mode,
                         implementation=implementation)
    assert_close(k, oracle(case, mode, symmetric=False))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_symmetric_tiled_matches_oracle_and_is_psd(case, implementation):
    model = case.build()
    x = case.inputs(5)
    k = nt.empirical_ntk(model, x, mode="full", implementation=implementation, batch_size=2)
    assert_close(k, oracle(case, "full", symmetric=True))
    assert torch.equal(k, k.permute(1, 0, 3, 2)), "x2=None must give an exactly symmetric kernel"
    matrix = k.permute(0, 2, 1, 3).reshape(k.shape[0] * k.shape[2], -1)
    eigenvalues = torch.linalg.eigvalsh(matrix)
    assert eigenvalues.min() >= -RTOL[torch.float64] * eigenvalues.abs().max()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_tiling_equals_untiled(implementation, mode):
    case = CASES["cnn2d"]
    model = case.build()
    x1, x2 = case.inputs(7), case.inputs(5, seed=3)
    whole = nt.empirical_ntk(model, x1, x2, mode=mode, implementation=implementation)
    for batch_size in (1, 3, 100):
        tiled = nt.empirical_ntk(model, x1, x2, mode=mode, implementation=implementation,
                                 batch_size=batch_size)
        assert_close(tiled, whole, rtol=1e-13)
    sym_whole = nt.empirical_ntk(model, x1, mode=mode, implementation=implementation)
    sym_tiled = nt.empirical_ntk(model, x1, mode=mode, implementation=implementation, batch_size=3)
    assert_close(sym_tiled, sym_whole, rtol=1e-13)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_layerwise_per_owner_and_sum(case, implementation):
    model = case.build()
    x1, x2 = case.inputs(5), case.inputs(3, seed=7)
    layers = nt.layerwise_ntk(model, x1, x2, mode="full", implementation=implementation)
    groups = owner_names(model)
    assert sorted(layers) == sorted(groups)
    for owner, names in groups.items():
        assert_close(layers[owner], naive_ntk(model, x1, x2, "full", names))
    assert_close(sum(layers.values()), oracle(case, "full", symmetric=False))


def test_modes_are_views_of_full():
    case = CASES["mlp_matrix_output"]
    model, x = case.build(), case.inputs(4)
    full = nt.empirical_ntk(model, x, mode="full")
    diagonal = nt.empirical_ntk(model, x, mode="diagonal")
    trace = nt.empirical_ntk(model, x, mode="trace")
    assert full.shape == (4, 4, 6, 6) and diagonal.shape == (4, 4, 6) and trace.shape == (4, 4)
    assert_close(diagonal, full.diagonal(dim1=2, dim2=3))
    # trace is the MEAN over outputs (neural-tangents' convention), not the sum
    assert_close(trace, full.diagonal(dim1=2, dim2=3).sum(-1) / 6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_linear_closed_form(implementation):
    # f(x) = w·x + b  =>  Θ(x, x') = x·x' + 1, whatever w and b are.
    model = nn.Linear(4, 1).double()
    x1 = torch.randn(6, 4, dtype=torch.float64)
    x2 = torch.randn(3, 4, dtype=torch.float64)
    k = nt.empirical_ntk(model, x1, x2, mode="trace", implementation=implementation)
    assert_close(k, x1 @ x2.T + 1)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_float32_agrees_with_float64_oracle(case, implementation):
    model = case.build(dtype=torch.float32)
    k = nt.empirical_ntk(model, case.inputs(5, dtype=torch.float32),
                         case.inputs(3, dtype=torch.float32, seed=7), mode="full",
                         implementation=implementation)
    assert k.dtype == torch.float32
    assert_close(k, oracle(case, "full", symmetric=False).float(), rtol=RTOL[torch.float32])


def test_parameter_selection_by_names_and_predicate():
    case = CASES["mlp"]
    model, x = case.build(), case.inputs(4)
    by_name = nt.empirical_ntk(model, x, params=["2.weight"], mode="full")
    by_predicate = nt.empirical_ntk(model, x, params=lambda n, p: n == "2.weight", mode="full")
    expected = naive_ntk(model, x, None, "full", ["2.weight"])
    assert_close(by_name, expected)
    assert_close(by_predicate, expected)
    assert not by_name.requires_grad, "the kernel must not hold a graph to unselected parameters"


def test_tied_parameter_counts_once_under_any_of_its_names():
    case = CASES["tied_weights"]
    model, x = case.build(), case.inputs(4)
    first = nt.empirical_ntk(model, x, params=["embed.weight"], mode="trace")
    alias = nt.empirical_ntk(model, x, params=["out.weight"], mode="trace")
    assert_close(alias, first)
    assert_close(first, naive_ntk(model, x, None, "trace", ["embed.weight"]))


def test_frozen_parameters_are_excluded_by_default():
    case = CASES["frozen"]
    model, x = case.build(), case.inputs(4)
    layers = nt.layerwise_ntk(model, x, mode="trace")
    assert "0" not in layers
    assert_close(sum(layers.values()), naive_ntk(model, x, None, "trace"))


def test_kernel_fn_follows_parameter_updates_and_overrides():
    case = CASES["mlp"]
    model, x = case.build(), case.inputs(4)
    fn = nt.empirical_ntk_fn(model, mode="trace")
    before = fn(x)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    after = fn(x)
    assert_close(after, naive_ntk(model, x, None, "trace"))
    assert not torch.allclose(before, after)
    assert_close(fn(x, params=snapshot), before)


def test_kernel_fn_profiles_once_and_again_when_the_model_changes(monkeypatch):
    from ntk_torch import _engines

    calls = []
    profile = _engines.profile_forward
    monkeypatch.setattr(_engines, "profile_forward", lambda *a: calls.append(1) or profile(*a))
    case = CASES["mlp"]
    model, x = case.build(), case.inputs(4)
    fn = nt.empirical_ntk_fn(model, implementation="structured")
    fn(x), fn(x + 1.0)
    assert len(calls) == 1
    # A hook that changes a layer's output: the layer must leave the structured rule.
    handle = model[2].register_forward_hook(lambda m, args, out: 3.0 * out)
    assert_close(fn(x), naive_ntk(model, x, None, "full"))
    handle.remove()
    fn(2.0 * x), fn(case.inputs(3))
    assert len(calls) == 3  # hook added, hook removed; same input shape otherwise


def test_output_shape_and_dtype_follow_inputs():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 6), nn.Unflatten(1, (2, 3)))
    k = nt.empirical_ntk(model, torch.randn(5, 3), torch.randn(2, 3))
    assert k.shape == (5, 2, 6, 6) and k.dtype == torch.float32


@pytest.mark.parametrize("mode,shape", [("full", (0, 3, 2, 2)), ("diagonal", (0, 3, 2)),
                                         ("trace", (0, 3))])
def test_empty_batch_gives_empty_kernel(mode, shape):
    model = nn.Linear(4, 2)
    k = nt.empirical_ntk(model, torch.randn(0, 4), torch.randn(3, 4), mode=mode)
    assert k.shape == shape
    assert nt.empirical_ntk(model, torch.randn(0, 4), mode=mode).shape == (0, 0, *shape[2:])


@pytest.mark.parametrize("mode", MODES)
def test_empirical_nngp_is_output_inner_product(mode):
    case = CASES["mlp_matrix_output"]
    model = case.build()
    x1, x2 = case.inputs(4), case.inputs(3, seed=2)
    with torch.no_grad():
        f1, f2 = model(x1).reshape(4, -1), model(x2).reshape(3, -1)
    full = torch.einsum("ai,bj->abij", f1, f2)
    expected = {"full": full, "diagonal": full.diagonal(dim1=2, dim2=3),
                "trace": full.diagonal(dim1=2, dim2=3).mean(-1)}[mode]
    assert_close(nt.empirical_nngp(model, x1, x2, mode=mode), expected)
    symmetric = nt.empirical_nngp(model, x1, mode=mode, batch_size=3)
    assert_close(symmetric, nt.empirical_nngp(model, x1, x1, mode=mode))


def test_model_is_not_modified():
    case = CASES["batchnorm_eval"]
    model = case.build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    nt.layerwise_ntk(model, case.inputs(3), mode="trace")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_cuda_matches_cpu(implementation):
    case = CASES["cnn2d"]
    model, x = case.build(), case.inputs(4)
    cpu = nt.empirical_ntk(model, x, mode="full", implementation=implementation)
    gpu = nt.empirical_ntk(model.cuda(), x.cuda(), mode="full", implementation=implementation)
    assert gpu.device.type == "cuda"
    assert_close(gpu.cpu(), cpu)
