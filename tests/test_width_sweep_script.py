"""The width-sweep program through its script, its console command, and its errors."""

from __future__ import annotations

import json

import pytest

import ntk_torch as nt
from ntk_torch import cli
from ntk_torch._apps import width_sweep as app
from tests.scripts import load_script





@pytest.mark.slow
def test_quick_sweep_through_the_console_command(tmp_path):
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "--quick", "--no-progress", "--out", str(out)]) == 0
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
    # The accuracy gap is derived from the recorded accuracies.
    one = nt.records.select(records, parameterization="ntk", width=32, seed=1)
    acc = {r["predictor"]: r["value"] for r in one if r["metric"] == "test_accuracy"}
    gap = [r["value"] for r in one if r["metric"] == "accuracy_gap" and r["predictor"] == "linearized"]
    assert gap == [pytest.approx(acc["network"] - acc["linearized"])]
    summary = (out / "summary.md").read_text()
    fit = nt.fit_power_law(nt.records.select(records, parameterization="ntk"), "ntk_error")
    assert f"| ntk | ntk_error |  | {fit.exponent:+.3f} | [{fit.low:+.3f}, {fit.high:+.3f}] |" in summary


@pytest.mark.slow
def test_user_factory_from_a_file(tmp_path):
    factory = tmp_path / "models.py"
    factory.write_text(
        "import torch\n"
        "def build(width, seed):\n"
        "    torch.manual_seed(seed)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))\n")
    out = tmp_path / "run"
    code = load_script("width_sweep").main(["--quick", "--no-progress", "--steps", "0", "--model",
                                            f"{factory}:build", "--out", str(out)])
    assert code == 0
    records = nt.records.read_csv(out / "records.csv")
    assert {r["parameterization"] for r in records} == {f"{factory}:build"}
    assert {r["width"] for r in records if r["metric"] == "ntk_error"} == {16, 32, 64}
    assert not [r for r in records if r["metric"] == "test_accuracy"]


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


@pytest.mark.parametrize("argv,message", [
    (["sweep", "--widths", "x"], "ntk-torch sweep: error: argument --widths: invalid int value: 'x'"),
    (["sweep", "--probe", "1"], "--probe must be at least 2"),
    (["sweep", "--device", "cuda:7"] , "CUDA is not available"),
    (["drift", "--widths", "-3"], "ntk-torch drift: error"),
    (["kernel", "--bogus"], "ntk-torch kernel: error: unrecognized arguments: --bogus"),
    (["fly"], "ntk-torch: error: unknown command 'fly'"),
])
def test_cli_bad_arguments(argv, message, capsys):
    if "cuda:7" in argv and __import__("torch").cuda.is_available():
        pytest.skip("CUDA present")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_cli_help_lists_commands_and_examples(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("sweep", "drift", "kernel", "examples:", "ntk-torch sweep --model"):
        assert command in text
    assert cli.main(["sweep", "--help"]) == 0
    assert "--model MODULE:FACTORY" in capsys.readouterr().out


def test_scripts_are_the_console_command_programs():
    for script, command in (("width_sweep", "sweep"), ("kernel_drift", "drift"), ("empirical_ntk", "kernel")):
        app_module = __import__(f"ntk_torch._apps.{cli.COMMANDS[command][0]}", fromlist=["main"])
        assert load_script(script).main is app_module.main
