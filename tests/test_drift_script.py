"""``ntk-torch drift``: a quick run, with identities on what it writes."""

from __future__ import annotations

import json

import pytest
import torch

import ntk_torch as nt
from ntk_torch import records as rec
from tests.scripts import load_script


@pytest.mark.slow
def test_quick_run_writes_consistent_results(tmp_path, capsys):
    out = tmp_path / "run"
    assert load_script("drift").main(["--quick", "--out", str(out), "--seed", "3"]) == 0
    for name in ("records.csv", "records.json", "summary.csv", "config.json", "width_scaling.png",
                 "drift_ntk.png", "drift_standard.png", "drift_mup.png"):
        assert (out / name).stat().st_size > 0, name
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 3 and config["widths"] == [16, 64] and config["steps"] == 20

    records = rec.read_csv(out / "records.csv")
    assert records == rec.read_json(out / "records.json")
    runs = {(r["parameterization"], r["width"]) for r in records}
    assert runs == {(p, w) for p in ("ntk", "standard", "mup") for w in (16, 64)}
    for p, w in runs:
        mine = rec.select(records, parameterization=p, width=w, seed=3)
        assert {r["step"] for r in mine} == {0, 5, 10, 15, 20}
        at_start = {(r["layer"], r["metric"]): r["value"] for r in mine if r["step"] == 0}
        # The reference record compares the kernel and features with themselves.
        for (layer, metric), value in at_start.items():
            if metric in ("kernel_distance", "kernel_relative_change", "feature_relative_change",
                          "weight_relative_change"):
                assert value == 0.0, (p, w, layer, metric)
            if metric == "feature_cka":
                assert value == pytest.approx(1.0, abs=1e-5)
        assert {layer for layer, _ in at_start} == {"total", "hidden0", "hidden1", "readout"}
        assert 0 <= at_start["total", "kernel_alignment"] <= 1

    # The step-0 kernel is that of a freshly seeded model on the documented probe split.
    torch.manual_seed(3)
    model = nt.nn.MLP(64, 16, 2, 10, parameterization="mup")
    x, _ = nt.data.load_digits(seed=3)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(3))
    probe = x[perm[200:216]]
    eig = torch.linalg.eigvalsh(nt.empirical_ntk(model, probe, mode="trace").double()).flip(0)
    got = {r["metric"]: r["value"] for r in
           rec.select(records, parameterization="mup", width=16, step=0, layer="total")}
    for i in range(5):
        assert got[f"eigenvalue_{i + 1}"] == pytest.approx(float(eig[i]), rel=1e-4)

    summary = rec.read_csv(out / "summary.csv")
    for row in summary:
        run = rec.select(records, parameterization=row["parameterization"], width=row["width"],
                         step=20)
        final = {(r["layer"], r["metric"]): r["value"] for r in run}
        assert row["kernel_distance"] == final["total", "kernel_distance"]
        assert row["hidden_feature_change"] == final["hidden1", "feature_relative_change"]
        assert 0 <= row["test_accuracy"] <= 1
    # Lazy training: under NTK parameterization the 4x wider net drifts less.
    ntk = {r["width"]: r["kernel_distance"] for r in summary if r["parameterization"] == "ntk"}
    assert ntk[64] < ntk[16]
    printed = capsys.readouterr().out
    assert "K dist" in printed and printed.count("\n") >= 8


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    script = load_script("drift")
    assert script.main(["--quick", "--implementation", "bogus", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ntk-torch drift: error: ntk width 16: `implementation` must be one of")
    assert script.main(["--quick", "--probe", "1", "--out", str(tmp_path)]) == 2
    assert "--probe must be at least 2" in capsys.readouterr().err
