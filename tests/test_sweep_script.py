"""``ntk-torch sweep``: a quick run through the console command, a user model, its conclusions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ntk_torch as nt
from ntk_torch import cli
from ntk_torch.cli import sweep as app
from ntk_torch.cli._sweep_report import conclusions
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_sweep_through_the_console_command(tmp_path):
    out = tmp_path / "sweep"
    argv = ["sweep", "--quick", "--no-progress", "--init-widths", "128", "--out", str(out)]
    assert cli.main(argv) == 0
    for name in ("records.csv", "config.json", "summary.md", "kernel_error.png", "kernel_drift.png",
                 "feature_change.png", "weight_change.png", "accuracy_gap.png"):
        assert (out / name).stat().st_size > 0, name
    records = nt.records.read_csv(out / "records.csv")
    config = json.loads((out / "config.json").read_text())
    assert config["widths"] == [16, 32, 64] and config["seeds"] == 2
    for p in ("ntk", "standard", "mup"):
        for width in (16, 32, 64):
            for seed in (0, 1):
                mine = nt.records.select(records, parameterization=p, width=width, seed=seed)
                metrics = {r["metric"] for r in mine}
                assert {"ntk_error", "kernel_relative_change", "feature_relative_change",
                        "test_accuracy", "accuracy_gap"} <= metrics, (p, width, seed)
    # At the --init-widths only the kernel at initialisation is measured.
    untrained = nt.records.select(records, width=128)
    assert {r["metric"] for r in untrained} >= {"ntk_error", "ntk_fluctuation"}
    assert not {"test_accuracy", "kernel_relative_change"} & {r["metric"] for r in untrained}
    assert {r["seed"] for r in untrained if r["metric"] == "ntk_error"} == {0, 1}
    # The accuracy gap is derived from the recorded accuracies.
    one = nt.records.select(records, parameterization="ntk", width=32, seed=1)
    acc = {r["predictor"]: r["value"] for r in one if r["metric"] == "test_accuracy"}
    gap = [r["value"] for r in one
           if r["metric"] == "accuracy_gap" and r["predictor"] == "linearized"]
    assert gap == [pytest.approx(acc["network"] - acc["linearized"])]
    summary = (out / "summary.md").read_text()
    fit = nt.fit_power_law(nt.records.select(records, parameterization="ntk"), "ntk_error")
    row = f"| ntk | ntk_error |  | {fit.exponent:+.3f} | [{fit.low:+.3f}, {fit.high:+.3f}] |"
    assert row in summary and "## Conclusions" in summary


@pytest.mark.slow
def test_user_factory_from_a_file(tmp_path):
    factory = tmp_path / "models.py"
    factory.write_text(
        "import torch\n"
        "def build(width, seed):\n"
        "    torch.manual_seed(seed)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(width, 10))\n")
    out = tmp_path / "run"
    code = load_script("sweep").main(["--quick", "--no-progress", "--steps", "0", "--model",
                                            f"{factory}:build", "--out", str(out)])
    assert code == 0
    records = nt.records.read_csv(out / "records.csv")
    assert {r["parameterization"] for r in records} == {f"{factory}:build"}
    assert {r["width"] for r in records if r["metric"] == "ntk_error"} == {16, 32, 64}
    assert not [r for r in records if r["metric"] == "test_accuracy"]


@pytest.mark.slow
def test_residual_cnn_against_its_read_limit(tmp_path):
    out = tmp_path / "cnn"
    code = app.main(["--model", "residual-cnn", "--widths", "8", "32", "--seeds", "2",
                     "--probe", "4", "--no-progress", "--out", str(out)])
    assert code == 0
    records = nt.records.read_csv(out / "records.csv")
    assert {r["parameterization"] for r in records} == {"ntk"}
    errors = {w: [r["value"] for r in records if r["metric"] == "ntk_error" and r["width"] == w]
              for w in (8, 32)}
    assert all(len(e) == 2 for e in errors.values())
    # The limit is the CNTK of this very architecture: the error shrinks with width.
    assert max(errors[32]) < min(errors[8])
    assert not [r for r in records if r["metric"] == "test_accuracy"]  # steps 0 by default


def test_the_residual_cnn_run_reproduces_its_documented_run():
    documented = json.loads((ROOT / "docs" / "width_sweep_cnn" / "config.json").read_text())
    args = app.parse_args(["--model", "residual-cnn"])
    for name in ("widths", "seeds", "probe", "steps", "parameterizations", "seed", "model"):
        assert getattr(args, name) == documented[name], name


@pytest.mark.parametrize("spec,message", [
    ("no_such_package.models:build", "cannot import 'no_such_package.models' (ModuleNotFoundError"),
    ("ntk_torch.nn:no_factory", "'ntk_torch.nn' has no callable 'no_factory'"),
    ("just_a_module", "--model must look like package.module:factory"),
    ("missing_file.py:build", "no file 'missing_file.py'"),
])
def test_bad_model_path_is_a_one_line_error(spec, message, tmp_path, capsys):
    assert app.main(["--quick", "--model", spec, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_full_reproduces_the_documented_run():
    documented = json.loads((ROOT / "docs" / "width_sweep" / "config.json").read_text())
    args = app.parse_args(["--full"])
    for name in ("widths", "seeds", "probe", "train", "test", "steps", "depth", "lr_factor",
                 "parameterizations", "seed"):
        assert getattr(args, name) == documented[name], name


def test_options_override_the_preset_sizes():
    args = app.parse_args(["--full", "--seeds", "2", "--widths", "8", "16"])
    assert args.seeds == 2 and args.widths == [8, 16] and args.steps == app.FULL["steps"]
    assert app.parse_args([]).widths == app.DEFAULT["widths"]


def _synthetic(ntk_slope: float, mup_drift_slope: float, gaps: dict[str, tuple[float, float]]):
    """Records with known power laws (seed noise ±2%) and known accuracy gaps."""
    widths, records = (64, 128, 256, 512), []
    for seed, noise in enumerate((0.98, 1.0, 1.02)):
        for w in widths:
            records.append({"width": w, "seed": seed, "parameterization": "ntk",
                            "metric": "ntk_error", "value": noise * w ** ntk_slope})
            for p, slope in (("ntk", -1.0), ("mup", mup_drift_slope)):
                records.append({"width": w, "seed": seed, "parameterization": p, "layer": "total",
                                "metric": "kernel_relative_change", "value": noise * w ** slope})
            for p, (narrow, wide) in gaps.items():
                value = narrow if w == widths[0] else wide if w == widths[-1] else 0.0
                records.append({"width": w, "seed": seed, "parameterization": p,
                                "predictor": "linearized", "metric": "accuracy_gap",
                                "value": value + 0.001 * (seed - 1)})
    return records


def test_conclusions_state_whether_each_claim_holds():
    good = conclusions(_synthetic(-0.5, 0.0, {"ntk": (-0.04, 0.0), "mup": (0.05, 0.001)}))
    assert len(good) == 4 and all(line.endswith("**holds**") for line in good), good
    assert "slope -0.500" in good[0] and "(NTK parameterization: -1.000)" in good[1]
    bad = conclusions(_synthetic(-1.0, -0.5, {"ntk": (0.04, 0.0), "mup": (0.05, 0.08)}))
    assert len(bad) == 4 and all(line.endswith("**does not hold**") for line in bad), bad


def test_the_split_must_fit_in_the_digits():
    assert nt.data.load_digits()[0].shape[0] == nt.data.DIGITS
    with pytest.raises(app.UsageError, match=f"at most {nt.data.DIGITS} digits, got 1892"):
        app.parse_args(["--test", "1700"])
