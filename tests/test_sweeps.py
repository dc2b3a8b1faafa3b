"""width_sweep, fit_power_law and the built-in trainer, against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ntk_torch as nt
from ntk_torch.sweeps import fit_power_law, width_sweep
from ntk_torch.training import GradientDescent, linearized_descent
from tests.conftest import assert_close


def build_mlp(parameterization="ntk", depth=1, out=3):
    def build(width, seed):
        torch.manual_seed(seed)
        return nt.nn.MLP(4, width, depth, out, parameterization=parameterization).double()
    return build


def data(n=12, m=6, out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + m, 4, generator=g, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(0, out, (n + m,), generator=g), out).double()
    return x[:n], y[:n], x[n:], y[n:]


def test_sweep_records_are_complete_and_correct():
    x_train, y_train, x_test, y_test = data()
    probe = x_train[:5]
    trainer = GradientDescent(x_train, y_train, x_test, y_test, steps=5)
    build = build_mlp()
    records = width_sweep(build, [8, 16], probe, seeds=[0, 3], train=trainer, progress=False,
                          tags={"parameterization": "ntk"})
    assert all(r["parameterization"] == "ntk" for r in records)
    for width in (8, 16):
        for seed in (0, 3):
            mine = nt.records.select(records, width=width, seed=seed)
            names = {(r.get("predictor"), r.get("layer"), r["metric"]) for r in mine}
            for predictor in ("network", "linearized", "kernel"):
                for metric in ("train_loss", "test_loss", "train_accuracy", "test_accuracy"):
                    assert (predictor, None, metric) in names
            for layer in ("hidden0", "readout"):
                for metric in ("feature_relative_change", "weight_relative_change",
                               "kernel_relative_change"):
                    assert (None, layer, metric) in names
            assert (None, "total", "kernel_distance") in names
            # The error is recomputed here from scratch: eNTK of a fresh model vs the analytic NTK.
            model = build(width, seed)
            k = nt.empirical_ntk(model, probe, mode="trace")
            limit = nt.analytic.kernel(model, probe).ntk
            (error,) = [r["value"] for r in mine if r["metric"] == "ntk_error"]
            assert error == pytest.approx(float((k - limit).norm() / limit.norm()), rel=1e-9)
        per_width = {r["metric"] for r in records if r["width"] == width and "seed" not in r}
        assert per_width == {"ntk_error_of_mean", "ntk_fluctuation", "ntk_bias"}


def test_error_split_is_consistent():
    # ‖K̄ − K∞‖² = bias² + σ²/S whenever the bias estimate is not clamped at zero.
    probe = data()[0][:6]
    records = width_sweep(build_mlp(), [4, 8, 64], probe, seeds=range(4), progress=False)
    for width in (4, 8, 64):
        values = {r["metric"]: r["value"] for r in records
                  if r["width"] == width and "seed" not in r}
        if values["ntk_bias"] > 0:
            assert values["ntk_error_of_mean"] ** 2 == pytest.approx(
                values["ntk_bias"] ** 2 + values["ntk_fluctuation"] ** 2 / 4, rel=1e-9)
        seeds = [r["value"] for r in records if r["width"] == width and r["metric"] == "ntk_error"]
        # E‖K_s − K∞‖² = bias² + σ², with the sample means on both sides (exact identity).
        assert np.mean(np.square(seeds)) == pytest.approx(
            values["ntk_error_of_mean"] ** 2 + values["ntk_fluctuation"] ** 2 * 3 / 4, rel=1e-9)


def test_sweep_with_user_analytic_and_trainer():
    probe = data()[0][:4]
    calls = []

    def train(model):
        calls.append(model)
        return {"custom": 1.5}

    records = width_sweep(build_mlp(), [8], probe, seeds=[0], train=train, progress=False,
                          analytic=lambda model, x: 2 * nt.analytic.kernel(model, x).ntk)
    assert len(calls) == 1
    assert [r["value"] for r in records if r["metric"] == "custom"] == [1.5]
    assert {r["step"] for r in records if "step" in r} == {1}


def test_sweep_without_analytic_support_warns_and_measures_the_rest():
    def build(width, seed):
        return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Softplus(beta=2),
                                   torch.nn.LayerNorm(width), torch.nn.Linear(width, 1))

    with pytest.warns(RuntimeWarning, match="no analytic kernel"):
        records = width_sweep(build, [8], torch.randn(3, 4), seeds=[0], progress=False)
    assert records == []


@pytest.mark.parametrize("bad,match", [
    ({"widths": []}, "`widths` must be a non-empty sequence of ints"),
    ({"x": torch.randn(1, 4)}, "`x` must be a tensor of at least 2 probe inputs"),
    ({"analytic": "exact"}, "`analytic` must be 'auto', None or a callable"),
])
def test_sweep_bad_arguments(bad, match):
    args = {"widths": [8], "x": torch.randn(3, 4, dtype=torch.float64), **bad}
    with pytest.raises(ValueError, match=match):
        width_sweep(build_mlp(), args.pop("widths"), args.pop("x"), progress=False, **args)


def test_sweep_seeds_must_be_ints():
    with pytest.raises(TypeError,
                       match=r"`seeds` must be a non-empty sequence of ints, got \[1.5\]"):
        width_sweep(build_mlp(), [8], torch.randn(3, 4), seeds=[1.5], progress=False)


def test_sweep_build_must_return_a_module():
    with pytest.raises(TypeError, match=r"`build\(8, 0\)` must return an nn.Module, got str"):
        width_sweep(lambda w, s: "mlp", [8], torch.randn(3, 4), seeds=[0], progress=False)


def synthetic(exponent, seeds, rng, noise=0.2, widths=(64, 128, 256, 512, 1024)):
    return [{"width": w, "seed": s, "metric": "e",
             "value": 2.0 * w ** exponent * math.exp(noise * rng.standard_normal())}
            for w in widths for s in range(seeds)]


@pytest.mark.parametrize("exponent", [-1.0, -0.5, 0.25])
def test_power_law_recovers_noise_free_exponents(exponent):
    fit = fit_power_law(synthetic(exponent, 3, np.random.default_rng(0), noise=0.0), "e")
    assert fit.exponent == pytest.approx(exponent, abs=1e-12)
    assert fit.prefactor == pytest.approx(2.0, rel=1e-12)
    assert fit.low == pytest.approx(exponent, abs=1e-12)
    assert fit.high == pytest.approx(exponent, abs=1e-12)


def test_power_law_bootstrap_interval_covers_the_truth_at_its_level():
    # 300 synthetic sweeps with 10 seeds: coverage of a 95% interval is binomial with
    # standard deviation sqrt(.95·.05/300) ≈ 0.013; accept 3 of them on either side.
    rng = np.random.default_rng(1)
    covered = 0
    for i in range(300):
        fit = fit_power_law(synthetic(-0.5, 10, rng), "e", seed=i)
        covered += fit.low <= -0.5 <= fit.high
    assert 0.95 - 0.04 <= covered / 300 <= 0.95 + 0.04


def test_power_law_without_seeds_uses_the_t_interval():
    rng = np.random.default_rng(2)
    covered = 0
    for i in range(300):
        rs = [{"width": w, "metric": "e",
               "value": w ** -1.0 * math.exp(0.1 * rng.standard_normal())}
              for w in (32, 64, 128, 256, 512)]
        fit = fit_power_law(rs, "e")
        assert fit.method == "least-squares t-interval"
        covered += fit.low <= -1.0 <= fit.high
    assert 0.91 <= covered / 300 <= 0.99


def test_power_law_filters_and_errors():
    rs = synthetic(-0.5, 2, np.random.default_rng(3), noise=0.0)
    rs += [{**r, "parameterization": "mup", "value": 1.0} for r in rs]
    for r in rs[: len(rs) // 2]:
        r["parameterization"] = "ntk"
    assert fit_power_law(rs, "e", parameterization="ntk").exponent == pytest.approx(-0.5)
    assert fit_power_law(rs, "e", parameterization="mup").exponent == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="no records with metric='missing'"):
        fit_power_law(rs, "missing")
    with pytest.raises(ValueError, match="must be positive and finite"):
        fit_power_law([{**rs[0], "value": 0.0}, rs[5]], "e")
    with pytest.raises(ValueError, match="at least 2 widths"):
        fit_power_law(rs[:2], "e")


def test_linearized_descent_equals_training_the_linearized_model():
    x_train, y_train, x_test, _ = data(n=8, m=4, out=2)
    model = build_mlp(out=2)(16, 0)
    lin = nt.linearize(model)
    lr, steps, n = 0.7, 9, 8
    x_all = torch.cat([x_train, x_test])
    theta = nt.empirical_ntk(model, x_all, x_train, mode="full")
    with torch.no_grad():
        f0 = model(x_all)
    predicted = linearized_descent(theta, f0, y_train, lr=lr, steps=steps)
    params = [p for p in lin.parameters() if p.requires_grad]
    for _ in range(steps):
        loss = (lin(x_train) - y_train).square().sum() / (2 * n)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
    with torch.no_grad():
        assert_close(predicted, lin(x_all))


def test_gradient_descent_records_match_the_trained_model():
    x_train, y_train, x_test, y_test = data()
    model = build_mlp()(32, 1)
    trainer = GradientDescent(x_train, y_train, x_test, y_test, steps=7, lr=0.3,
                              kernel_predictor=None)
    records = trainer(model)
    assert {r.get("predictor") for r in records} == {None, "network", "linearized"}
    with torch.no_grad():
        f = model(x_test)
    network = [r for r in records if r.get("predictor") == "network"]
    (test_loss,) = [r["value"] for r in network if r["metric"] == "test_loss"]
    assert test_loss == pytest.approx(float((f - y_test).square().sum(1).mean() / 2), rel=1e-12)
    (accuracy,) = [r["value"] for r in network if r["metric"] == "test_accuracy"]
    assert accuracy == pytest.approx(float((f.argmax(1) == y_test.argmax(1)).double().mean()))
    assert [r["value"] for r in records if r["metric"] == "lr"] == [0.3]


@pytest.mark.slow
def test_wide_network_trains_like_its_linearization_and_the_kernel():
    # Lee et al. 2019: as width grows, the trained network, its linearization and the
    # infinite-width NTK flow agree; the gap shrinks roughly like width^(-1/2).
    x_train, y_train, x_test, y_test = data(n=10, m=5, out=2, seed=4)
    gaps = {}
    for width in (64, 4096):
        model = build_mlp(out=2)(width, 0)
        records = GradientDescent(x_train, y_train, x_test, y_test, steps=20)(model)
        loss = {r["predictor"]: r["value"] for r in records if r["metric"] == "test_loss"}
        gaps[width] = (abs(loss["network"] - loss["linearized"]),
                       abs(loss["network"] - loss["kernel"]))
    assert gaps[4096][0] < 0.25 * gaps[64][0]
    assert gaps[4096][0] < 1e-2 * loss["network"] + 1e-3


def test_gradient_descent_auto_lr_is_stable_for_the_standard_parameterization():
    # The standard parameterization's NTK grows with width; lr="auto" scales η by 1/λ_max.
    x_train, y_train, _, _ = data()
    model = build_mlp("standard")(1024, 0)
    trainer = GradientDescent(x_train, y_train, steps=10, lr_factor=0.5, kernel_predictor=None)
    records = trainer(model)
    x_all = x_train
    theta = nt.empirical_ntk(build_mlp("standard")(1024, 0), x_all, mode="full")
    top = torch.linalg.eigvalsh(theta.permute(0, 2, 1, 3).reshape(36, 36)).max()
    (lr,) = [r["value"] for r in records if r["metric"] == "lr"]
    assert lr == pytest.approx(0.5 * 12 / float(top), rel=1e-8)
    losses = {r["predictor"]: r["value"] for r in records if r["metric"] == "train_loss"}
    with torch.no_grad():
        outputs = build_mlp("standard")(1024, 0)(x_train)
        initial = float((outputs - y_train).square().sum(1).mean() / 2)
    assert losses["network"] < initial and losses["linearized"] < initial


@pytest.mark.parametrize("kwargs,match", [
    ({"y_train": torch.zeros(5, 3)}, r"`y_train` must have shape \(N, O\) with N = 12"),
    ({"steps": 0}, "`steps` must be a positive int"),
    ({"lr": -1.0}, "`lr` must be a finite number > 0 or 'auto'"),
    ({"x_test": torch.zeros(3, 4)}, "`x_test` and `y_test` must be given together"),
    ({"kernel_predictor": "empirical"}, "`kernel_predictor` must be one of 'analytic', None"),
])
def test_gradient_descent_bad_arguments(kwargs, match):
    x_train, y_train, _, _ = data()
    args = {"x_train": x_train, "y_train": y_train, **kwargs}
    with pytest.raises(ValueError, match=match):
        GradientDescent(args.pop("x_train"), args.pop("y_train"), **args)
