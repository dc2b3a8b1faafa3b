"""The ``ntk-torch`` programs as one layer: names, shims, one error style, devices, extras."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ntk_torch import cli
from ntk_torch.cli._program import UsageError, resolve_device
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


def test_every_program_has_one_name():
    assert set(cli.COMMANDS) == {"sweep", "drift", "kernel", "intuition"}
    scripts = {path.stem for path in (ROOT / "scripts").glob("*.py")}
    assert scripts == set(cli.COMMANDS)
    for command in cli.COMMANDS:
        program = importlib.import_module(f"ntk_torch.cli.{command}")
        assert load_script(command).main is program.main
        assert program.COMMAND == command


@pytest.mark.parametrize("argv,message", [
    (["sweep", "--widths", "x"], "ntk-torch sweep: error: argument --widths: invalid int value"),
    (["sweep", "--probe", "1"], "ntk-torch sweep: error: --probe must be at least 2, got 1"),
    (["sweep", "--quick", "--full"], "ntk-torch sweep: error: --quick and --full exclude each"),
    (["sweep", "--device", "cuda:7"], "ntk-torch sweep: error: --device cuda:7: "),
    (["sweep", "--device", "gpu"], "ntk-torch sweep: error: --device must be auto, cpu, cuda"),
    (["drift", "--widths", "-3"], "ntk-torch drift: error: --widths must be positive, got [-3]"),
    (["drift", "--threads", "0"], "ntk-torch drift: error: --threads must be at least 1, got 0"),
    (["kernel", "--bogus"], "ntk-torch kernel: error: unrecognized arguments: --bogus"),
    (["kernel", "--samples", "1"], "ntk-torch kernel: error: --samples must be at least 2"),
    (["intuition", "--seeds", "1"], "ntk-torch intuition: error: --seeds must be at least 2"),
    (["intuition", "--implementation", "jacobian"], "ntk-torch intuition: error: unrecognized"),
    (["fly"], "ntk-torch: error: unknown command 'fly'"),
])
def test_usage_errors_are_one_line_with_status_2(argv, message, capsys):
    if "cuda:7" in argv and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err
    assert captured.out == ""


def test_help_lists_commands_and_examples(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in (*cli.COMMANDS, "examples:", "ntk-torch sweep --model", "-m ntk_torch.cli"):
        assert command in text
    for command in cli.COMMANDS:
        assert cli.main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: ntk-torch {command}") and "--device DEVICE" in text
    sweep_help = (cli.main(["sweep", "--help"]), capsys.readouterr().out)[1]
    assert "--model MODEL" in sweep_help and "residual-cnn" in sweep_help


def test_device_auto_is_cuda_when_available():
    assert resolve_device("auto") == torch.device("cuda" if HAS_CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not HAS_CUDA:
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_device("cuda")


def test_scripts_run_as_files(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel.py"), "--samples", "1"],
                         capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert run.returncode == 2
    assert run.stderr == "ntk-torch kernel: error: --samples must be at least 2, got 1\n"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=120)


def test_the_core_imports_without_the_extras():
    run = _python("import sys, ntk_torch, ntk_torch.plotting, ntk_torch.cli\n"
                  "print(sorted(m for m in ('matplotlib', 'sklearn') if m in sys.modules))")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


@pytest.mark.parametrize("blocked,call,extra", [
    ("matplotlib", "ntk_torch.plotting.plot_spectra({'a': [1.0]}, 'x.png')", "plot"),
    ("sklearn", "ntk_torch.data.load_digits(4)", "data"),
])
def test_a_missing_extra_is_named(blocked, call, extra):
    # A None entry in sys.modules makes the import fail as if the package were absent.
    run = _python(f"import sys; sys.modules[{blocked!r}] = None\n"
                  f"import ntk_torch, ntk_torch.plotting\n"
                  f"try:\n    {call}\n"
                  f"except ImportError as error:\n    print(error)")
    assert run.returncode == 0, run.stderr
    assert f"pip install 'ntk_torch[{extra}]'" in run.stdout and repr(blocked) in run.stdout


def test_a_program_names_the_missing_extra_in_one_line(tmp_path):
    run = _python("import sys; sys.modules['sklearn'] = None\n"
                  "from ntk_torch.cli import main\n"
                  f"sys.exit(main(['kernel', '--quick', '--out', {str(tmp_path)!r}]))")
    assert run.returncode == 1
    assert run.stderr.startswith("ntk-torch kernel: error: the digits data set needs the "
                                 "optional dependency 'sklearn'") and run.stderr.count("\n") == 1
