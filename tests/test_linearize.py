"""linearize: f(x; θ0) + J(x; θ0)(θ - θ0), checked against the naive float64 Jacobian."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import ntk_torch as nt
from tests.conftest import assert_close
from tests.oracle import naive_jacobian, naive_ntk


def _selected(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _perturb(lin: nt.LinearizedModel, seed: int, scale: float = 0.3) -> torch.Tensor:
    """Move every linearized parameter by a random δ; return δ flattened in name order."""
    g = torch.Generator().manual_seed(seed)
    params = dict(lin.named_parameters())
    deltas = []
    with torch.no_grad():
        for name in lin.names:
            p = params["model." + name]
            d = scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.add_(d)
            deltas.append(d.reshape(-1))
    return torch.cat(deltas)


def test_equals_model_and_its_jacobian_at_theta0_then_is_affine(case):
    model = case.build()
    x = case.inputs(3)
    names = _selected(model)
    lin = nt.linearize(model)
    assert lin.names == tuple(names)

    # At θ0: same outputs, same Jacobian (through the jvp, by reverse mode).
    assert_close(lin(x).detach(), model(x).detach())
    jac = naive_jacobian(model, x, names)
    assert_close(naive_jacobian(lin, x, ["model." + n for n in names]), jac)

    # Anywhere: exactly the first-order expansion around θ0.
    delta = _perturb(lin, seed=2)
    expected = model(x).reshape(3, -1) + jac @ delta
    assert_close(lin(x).reshape(3, -1).detach(), expected.detach())
    # ... and the Jacobian does not move with θ.
    assert_close(naive_jacobian(lin, x, ["model." + n for n in names]), jac)


def test_training_moves_only_the_copy():
    # At θ0 the gradients of f_lin and f agree, so one SGD step on each lands on the same θ;
    # the user's model and θ0 stay put.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = copy.deepcopy(model)
    lin = nt.linearize(model)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    for net in (lin, twin):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        (0.5 * (net(x) - y).pow(2).sum()).backward()
        opt.step()
    stepped = dict(twin.named_parameters())
    for name, p in lin.model.named_parameters():
        assert_close(p.detach(), stepped[name].detach())
        assert not torch.equal(p, before[name])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"the user's model changed: {k}"
    for name, theta0 in lin.initial_params().items():
        assert torch.equal(theta0, before[name])
        assert not theta0.requires_grad


def test_linear_in_parameters_model_is_its_own_linearization():
    # f(x; W, b) = W x + b is linear in θ, so f_lin = f at every θ.
    torch.manual_seed(1)
    model = nn.Linear(4, 3).double()
    lin = nt.linearize(model)
    _perturb(lin, seed=3, scale=2.0)
    x = torch.randn(5, 4, dtype=torch.float64)
    moved = {n: p for n, p in lin.model.named_parameters()}
    assert_close(lin(x).detach(), functional_call(model, moved, (x,)).detach())


def test_ntk_of_the_linearized_model_is_frozen_at_theta0():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(4, 2, dtype=torch.float64)
    lin = nt.linearize(model)
    _perturb(lin, seed=4, scale=1.0)
    assert_close(nt.empirical_ntk(lin, x), naive_ntk(model, x, None, "full"))


def test_params_selection_and_frozen_parameters():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[0].bias.requires_grad_(False)
    lin = nt.linearize(model, params=["2.weight"])
    assert lin.names == ("2.weight",)
    trainable = [n for n, p in lin.named_parameters() if p.requires_grad]
    assert trainable == ["model.2.weight"]
    assert model[0].weight.requires_grad, "the user's requires_grad flags must not change"
    x = torch.randn(5, 3, dtype=torch.float64)
    delta = _perturb(lin, seed=5)
    jac = naive_jacobian(model, x, ["2.weight"])
    assert_close(lin(x).detach(), (model(x) + (jac @ delta)).detach())


def test_call_signature_and_nested_outputs():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(3, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x, *, scale: float = 1.0):
            h = torch.tanh(self.body(x)) * scale
            return h, {"out": self.head(h)}

    torch.manual_seed(4)
    model = TwoHeads().double()
    lin = nt.linearize(model)
    x = torch.randn(3, 3, dtype=torch.float64)
    h, rest = lin(x, scale=2.0)
    h_ref, rest_ref = model(x, scale=2.0)
    assert_close(h.detach(), h_ref.detach())
    assert_close(rest["out"].detach(), rest_ref["out"].detach())


def test_dtype_conversion_and_state_dict_round_trip():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    lin = nt.linearize(model).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    assert_close(lin(x).detach(), model.double()(x).detach())
    _perturb(lin, seed=6)
    other = nt.linearize(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).double())
    other.load_state_dict(lin.state_dict())
    assert_close(other(x).detach(), lin(x).detach())


def test_batchnorm_in_train_mode_is_refused_at_call():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).eval()
    lin = nt.linearize(model)
    x = torch.randn(5, 3)
    lin(x)  # eval mode: fine
    lin.train()
    with pytest.raises(ValueError, match=r"BatchNorm1d.*train mode.*eval\(\)"):
        lin(x)


def test_dropout_in_train_mode_is_refused():
    lin = nt.linearize(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1)))
    with pytest.raises(ValueError, match=r"Dropout.*train mode"):
        lin(torch.randn(2, 3))


def test_bad_arguments():
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        nt.linearize(lambda x: x)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        nt.linearize(frozen)
    with pytest.raises(ValueError, match="unknown parameter 'nope'"):
        nt.linearize(nn.Linear(2, 2), params=["nope"])


def test_tied_padded_embedding_warns_that_forward_and_reverse_mode_disagree():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 3, padding_idx=0)
            self.out = nn.Linear(3, 5, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, tokens):
            return self.out(self.embed(tokens).mean(1))

    with pytest.warns(UserWarning, match="ties the weight of padded embedding 'embed'"):
        nt.linearize(Tied())
