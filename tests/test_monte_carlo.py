"""nt.analytic.monte_carlo_kernel: empirical kernels averaged over seeds, with standard errors.

- The means against the closed forms of ``nt.analytic.kernel``, within a few of their own
  standard errors.
- The moments are those of the draws ``torch.manual_seed(s); build(s)``, exactly; the
  standard errors shrink as 1/√n_samples; a seed gives one result and leaves the caller's
  random state alone.
- A linear model's NTK does not depend on the weights: zero spread, the closed form.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ntk_torch as nt
from ntk_torch.analytic import monte_carlo_kernel
from tests.conftest import assert_close, assert_within_standard_errors

DT = torch.float64


def _x(n: int, d: int, seed: int, dtype: torch.dtype = DT) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# The mean kernel of a finite network differs from the limit by O(1/width) relatively, by
# nothing for one hidden layer of Gaussian weights; PyTorch's uniform weights (the
# Sequential case) give Gaussian pre-activations only through the central limit theorem
# over the fan-in, O(1/d) off, hence d = 32. The standard error of the NTK is
# O(1/√(width·S)): with S = 32, bias over SE is about √(S/width) ≤ 0.35 times a constant of
# order one, and the NNGP's SE is O(1/√S), larger still. Measured with S = 512,
# SEs four times smaller: no entry of either case beyond 2.2 of those SEs, so any bias is
# within 0.6 SE at S = 32.
CLOSED_FORM_CASES = {
    "mlp_depth_2": (lambda seed: nt.nn.MLP(4, 256, 2, 8, activation="relu", bias_std=0.2),
                    _x(4, 4, seed=1), None),
    # Built in train mode: dropout is the identity in eval mode, as the limit reads it.
    "sequential_with_dropout": (
        lambda seed: nn.Sequential(nn.Linear(32, 512), nn.ReLU(), nn.Dropout(0.5),
                                   nn.Linear(512, 8)),
        _x(4, 32, seed=2), _x(3, 32, seed=3)),
}


@pytest.mark.parametrize("name", sorted(CLOSED_FORM_CASES))
def test_means_match_the_closed_forms(name):
    build, x1, x2 = CLOSED_FORM_CASES[name]
    mc = monte_carlo_kernel(build, x1, x2, n_samples=32, progress=False)
    limit = nt.analytic.kernel(build(0), x1, x2)
    assert mc.ntk.shape == mc.ntk_stderr.shape == limit.ntk.shape
    assert_within_standard_errors(mc.ntk, mc.ntk_stderr, limit.ntk)
    assert_within_standard_errors(mc.nngp, mc.nngp_stderr, limit.nngp)


def _small_mlp(seed: int) -> nn.Module:
    return nt.nn.MLP(3, 64, 1, 8, activation="tanh", bias_std=0.5)


def test_moments_are_those_of_the_seeded_draws():
    x = _x(4, 3, seed=4)
    mc = monte_carlo_kernel(_small_mlp, x, n_samples=5, seed=7, progress=False)
    ntks, nngps = [], []
    for seed in range(7, 12):
        torch.manual_seed(seed)
        model = _small_mlp(seed).to(DT)
        ntks.append(nt.empirical_ntk(model, x, mode="trace"))
        nngps.append(nt.empirical_nngp(model, x, mode="trace"))
    assert mc.n_samples == 5
    for mean, stderr, draws in ((mc.ntk, mc.ntk_stderr, ntks), (mc.nngp, mc.nngp_stderr, nngps)):
        draws = torch.stack(draws)
        assert mean.dtype == DT
        assert_close(mean, draws.mean(0), rtol=1e-13)
        assert_close(stderr, draws.std(0) / math.sqrt(5), rtol=1e-12)


def test_same_seed_same_result_and_the_callers_random_state_is_kept():
    x = _x(3, 3, seed=5)
    state = torch.get_rng_state()
    a = monte_carlo_kernel(_small_mlp, x, n_samples=3, seed=2, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    b = monte_carlo_kernel(_small_mlp, x, n_samples=3, seed=2, progress=False)
    c = monte_carlo_kernel(_small_mlp, x, n_samples=3, seed=3, progress=False)
    for field in ("nngp", "ntk", "nngp_stderr", "ntk_stderr"):
        assert torch.equal(getattr(a, field), getattr(b, field))
        assert not torch.equal(getattr(a, field), getattr(c, field))


def test_standard_errors_shrink_as_one_over_root_n():
    # Nested runs (seeds 0..31 and 0..127): with kurtosis κ of the draws, log(s) has variance
    # about (κ - 1)/(4S), and the difference of the two runs' log(s) about
    # (κ - 1)/4 · (1/32 - 1/128). Over all entries (a sum of variances, no noisier than one
    # entry) that is an SD of 0.11 for Gaussian draws (the NTK) and 0.14 for χ²₈/8-like ones
    # (the NNGP with 8 outputs, κ = 4.5): the factor 1.8 = e^0.59 is 4 SDs of the latter.
    # It separates 1/√n (ratio 1/2) from no shrinking (1) and from 1/n (1/4).
    x = _x(4, 3, seed=8)
    few, many = (monte_carlo_kernel(_small_mlp, x, n_samples=n, implementation="jacobian",
                                    progress=False) for n in (32, 128))
    for field in ("ntk_stderr", "nngp_stderr"):
        ratio = float(getattr(many, field).norm() / getattr(few, field).norm())
        assert 0.5 / 1.8 < ratio < 0.5 * 1.8, (field, ratio)


def test_linear_model_has_a_deterministic_ntk():
    # f = W x + b: the Jacobian is (x, 1) whatever the weights, so every draw gives the same
    # NTK, x·x' + 1. PyTorch's init has Var W = Var b = 1/(3d), so E[f_o f_o'] = (x·x' + 1)/(3d).
    d = 5
    x1, x2 = _x(4, d, seed=9, dtype=torch.float32), _x(3, d, seed=10, dtype=torch.float32)
    mc = monte_carlo_kernel(lambda seed: nn.Linear(d, 8), x1, x2, n_samples=32,
                            progress=False)
    closed_form = x1.to(DT) @ x2.to(DT).T + 1
    assert torch.equal(mc.ntk_stderr, torch.zeros(4, 3, dtype=DT))
    assert_close(mc.ntk, closed_form, rtol=1e-13)
    assert_within_standard_errors(mc.nngp, mc.nngp_stderr, closed_form / (3 * d))


def test_x2_none_is_x1():
    x = _x(4, 3, seed=11)
    alone = monte_carlo_kernel(_small_mlp, x, n_samples=2, progress=False)
    paired = monte_carlo_kernel(_small_mlp, x, x, n_samples=2, progress=False)
    for field in ("nngp", "ntk", "nngp_stderr", "ntk_stderr"):
        k = getattr(alone, field)
        assert torch.equal(k, k.T)
        assert_close(k, getattr(paired, field), rtol=1e-12)


def test_bad_arguments():
    x = _x(2, 3, seed=0)
    with pytest.raises(ValueError, match="`n_samples` must be an int >= 2, got 1"):
        monte_carlo_kernel(_small_mlp, x, n_samples=1)
    with pytest.raises(TypeError, match="`n_samples` must be an int >= 2, got float 2.0"):
        monte_carlo_kernel(_small_mlp, x, n_samples=2.0)
    for not_a_builder, got in (("mlp", "str 'mlp'"), (nn.Linear(3, 1), "Linear")):
        with pytest.raises(TypeError, match=f"`build` must be a function seed -> nn.Module "
                                            f"that builds a new network, .*got {got}"):
            monte_carlo_kernel(not_a_builder, x, n_samples=2)
    with pytest.raises(TypeError, match="`build` must return a torch.nn.Module, got NoneType "
                                        "None from build\\(0\\)"):
        monte_carlo_kernel(lambda seed: None, x, n_samples=2, progress=False)
    with pytest.raises(ValueError, match="`implementation` must be one of"):
        monte_carlo_kernel(_small_mlp, x, n_samples=2, implementation="fast")
