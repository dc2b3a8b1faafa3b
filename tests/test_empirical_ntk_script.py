"""Smoke test of scripts/empirical_ntk.py with identities on what it writes."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from tests.scripts import load_script





def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_quick_run_writes_consistent_results(tmp_path):
    out = tmp_path / "run"
    assert load_script("empirical_ntk").main(["--quick", "--samples", "12", "--out", str(out)]) == 0
    for name in ("kernel.csv", "spectrum.csv", "layers.csv", "kernel.png", "spectrum.png", "config.json"):
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

    eigenvalues = [float(r["eigenvalue"]) for r in read_csv(out / "spectrum.csv") if r["layer"] == "total"]
    expected = torch.linalg.eigvalsh(kernels["total"]).flip(0).clamp_min(0)
    torch.testing.assert_close(torch.tensor(eigenvalues, dtype=torch.float64), expected,
                               rtol=1e-5, atol=1e-6 * float(expected[0]))
    shares = [float(r["trace_share"]) for r in read_csv(out / "layers.csv")]
    assert sum(shares) == pytest.approx(1.0, rel=1e-6)


def test_bad_implementation_is_a_one_line_error(tmp_path, capsys):
    code = load_script("empirical_ntk").main(["--quick", "--implementation", "bogus", "--out", str(tmp_path)])
    assert code == 2
    assert "`implementation` must be one of" in capsys.readouterr().err
