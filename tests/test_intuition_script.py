"""``ntk-torch intuition``: a quick run, checking what it measures against closed forms."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.scripts import load_script

FIGURES = ("toy_step.png", "toy_kernels.png", "toy_kernel_change.png", "eigenmodes.png",
           "regression.png")


@pytest.mark.slow
def test_quick_run_writes_figures_and_measures_closed_forms(tmp_path):
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    assert load_script("intuition").main(["--quick", "--out", str(out), "--seed", "3"]) == 0
    assert torch.get_num_threads() == threads, "the script must restore the thread count"
    for name in FIGURES + ("config.json", "metrics.json"):
        assert (out / name).stat().st_size > 0, name
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 3 and config["quick"] and config["observation"] == [10.0, 50.0]
    toy = json.loads((out / "metrics.json").read_text())["toy"]

    # Look-up table: k(x, x') = δ(x, x'), so one step moves f(10) alone, by
    # lr·(50 − 31)·k(10, 10) = 0.1·19 (f(i) = 3i + 1 at init).
    table = toy["look-up table"]
    assert table["k_10_10"] == pytest.approx(1.0)
    assert table["f10_before_after_step"] == pytest.approx([31.0, 31.0 + 0.1 * 19])
    # Linear θ1·x + θ2: k(x, 10) = 10x + 1; reparameterized θ1·x + 10·θ2:
    # k(x, 10) = 10x + 100.
    # Both are linear in θ: the step is exact, f(10) moves by 0.1·19·k(10, 10).
    line, reparam = toy["linear θ1·x + θ2"], toy["reparameterized θ1·x + 10·θ2"]
    assert line["k_10_10"] == pytest.approx(101.0)
    assert reparam["k_10_10"] == pytest.approx(200.0)
    assert line["f10_before_after_step"][1] == pytest.approx(31.0 + 0.1 * 19 * 101)
    assert line["min_k_over_k_10_10"] == pytest.approx((10 * -10 + 1) / 101)
    assert reparam["min_k_over_k_10_10"] == pytest.approx(0.0, abs=1e-12)  # 10·(−10) + 100
    for name in ("look-up table", "linear θ1·x + θ2", "reparameterized θ1·x + 10·θ2"):
        # Linear in θ: the finite-step kernel is the NTK for every η, and it never changes.
        assert max(toy[name]["finite_step_error"].values()) < 1e-10, name
        assert toy[name]["kernel_change_15_ascent_steps"] == pytest.approx(0.0, abs=1e-12), name

    # The RBF model is not linear in θ: k̃_η − k = O(η), so the error shrinks tenfold per
    # decade of η (second-order Taylor term), and the kernel moves during the ascent.
    rbf = toy["two-bump RBF"]
    errors = [rbf["finite_step_error"][key] for key in ("1.0", "0.1", "0.01", "0.001")]
    for big, small in zip(errors, errors[1:]):
        assert 8 < big / small < 12.5
    assert rbf["kernel_change_15_ascent_steps"] > 0.1
    assert rbf["argmax_k_x_10"] < 10 and rbf["min_k_over_k_10_10"] < 0

    metrics = json.loads((out / "metrics.json").read_text())
    modes = metrics["eigenmodes"]
    assert all(a >= b for a, b in zip(modes["top_eigenvalues"], modes["top_eigenvalues"][1:]))
    assert len(modes["overlap_with_infinite_width"]) == 4
    for activation in ("relu", "erf"):
        regression = metrics["regression"][activation]
        assert regression["steps"] == config["steps"]
        assert len(regression["ntk_train_relative_error_per_seed"]) == 2
        # lr is half the stability limit of the analytic NTK: exp(-lr·steps·λ_min) in (0, 1).
        assert 0 < regression["residual_left_slowest_mode"] < 1
        assert all(math.isfinite(v) for k, v in regression.items() if k.startswith("rms_"))


def test_bad_arguments_are_refused(capsys):
    script = load_script("intuition")
    assert script.main(["--seeds", "1"]) == 2
    assert "--seeds must be at least 2" in capsys.readouterr().err
    assert script.main(["--device", "gpu"]) == 2
    assert "--device must be auto, cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err
