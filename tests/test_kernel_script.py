"""``ntk-torch kernel``: a quick run and the kernel store, with identities on what it writes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import ntk_torch as nt
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
FACTORY = """
import torch
def build():
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
"""


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_quick_run_writes_consistent_results(tmp_path):
    out = tmp_path / "run"
    assert load_script("kernel").main(["--quick", "--samples", "12", "--out", str(out)]) == 0
    for name in ("kernel.csv", "spectrum.csv", "layers.csv", "kernel.png", "spectrum.png",
                 "config.json"):
        assert (out / name).stat().st_size > 0, name
    config = json.loads((out / "config.json").read_text())
    assert config["samples"] == 12 and config["implementation_used"]

    kernels: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(12, 12, dtype=torch.float64))
    for row in read_csv(out / "kernel.csv"):
        kernels[row["layer"]][int(row["i"]), int(row["j"])] = float(row["value"])
    layers = [k for name, k in kernels.items() if name != "total"]
    assert len(layers) == 3  # two hidden layers and the readout of the default depth 2
    torch.testing.assert_close(sum(layers), kernels["total"], rtol=1e-6, atol=0)
    labels = [int(r["label_i"]) for r in read_csv(out / "kernel.csv") if r["j"] == "0"][:12]
    assert labels == sorted(labels)

    eigenvalues = [float(r["eigenvalue"]) for r in read_csv(out / "spectrum.csv")
                   if r["layer"] == "total"]
    expected = torch.linalg.eigvalsh(kernels["total"]).flip(0).clamp_min(0)
    torch.testing.assert_close(torch.tensor(eigenvalues, dtype=torch.float64), expected,
                               rtol=1e-5, atol=1e-6 * float(expected[0]))
    shares = [float(r["trace_share"]) for r in read_csv(out / "layers.csv")]
    assert sum(shares) == pytest.approx(1.0, rel=1e-6)


def test_bad_implementation_is_a_one_line_error(tmp_path, capsys):
    code = load_script("kernel").main(["--quick", "--implementation", "bogus",
                                       "--out", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.startswith("ntk-torch kernel: error: `implementation` must be")


def _store_args(tmp_path: Path) -> list[str]:
    (tmp_path / "models.py").write_text(FACTORY)
    g = torch.Generator().manual_seed(0)
    torch.save({"x1": torch.randn(30, 5, generator=g), "x2": torch.randn(20, 5, generator=g)},
               tmp_path / "data.pt")
    return ["--model", f"{tmp_path / 'models.py'}:build", "--inputs", str(tmp_path / "data.pt"),
            "--store", str(tmp_path / "store"), "--mode", "full", "--tile", "8", "--seed", "3"]


def _expected(tmp_path: Path) -> torch.Tensor:
    torch.manual_seed(3)
    namespace: dict = {}
    exec(FACTORY, namespace)
    data = torch.load(tmp_path / "data.pt")
    return nt.empirical_ntk(namespace["build"]().eval(), data["x1"], data["x2"], mode="full")


def test_store_mode_computes_resumes_and_refuses_to_overwrite(tmp_path, capsys):
    args = _store_args(tmp_path)
    script = load_script("kernel")
    assert script.main(args) == 0
    assert "shape (30, 20, 3, 3), mode 'full'" in capsys.readouterr().out
    store = nt.KernelStore(tmp_path / "store")
    torch.testing.assert_close(store.load(), _expected(tmp_path), rtol=1e-5, atol=1e-6)
    assert script.main(args) == 2
    assert "already holds a kernel store: pass --resume" in capsys.readouterr().err
    (tmp_path / "store" / "tiles" / "1.1.json").unlink()
    assert script.main([*args, "--resume"]) == 0 and store.complete


def test_store_mode_one_line_errors(tmp_path, capsys):
    script = load_script("kernel")
    assert script.main(["--store", str(tmp_path / "s"), "--model", "nowhere_pkg.mod:build"]) == 2
    assert "cannot import 'nowhere_pkg.mod'" in capsys.readouterr().err
    torch.save("not a tensor", tmp_path / "bad.pt")
    assert script.main(["--store", str(tmp_path / "s"), "--inputs", str(tmp_path / "bad.pt")]) == 2
    assert "must hold a tensor" in capsys.readouterr().err


@pytest.mark.slow
def test_store_mode_under_torchrun(tmp_path):
    args = _store_args(tmp_path)
    torchrun = Path(sys.executable).with_name("torchrun")
    run = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2",
                          "-m", "ntk_torch.cli", "kernel", *args, "--threads", "1",
                          "--device", "cpu"],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("kernel store") == 1  # rank 0 reports
    torch.testing.assert_close(nt.KernelStore(tmp_path / "store").load(), _expected(tmp_path),
                               rtol=1e-5, atol=1e-6)
