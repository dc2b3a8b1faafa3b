"""The core needs torch, numpy and tqdm only: optional dependencies load with the feature
that needs them, and a missing one is named with the extra that installs it."""

import subprocess
import sys
import tempfile

import pytest
import torch

import ntk_torch as nt

OPTIONAL = ("zarr", "scipy", "matplotlib", "sklearn")

_REPORT_LOADED = """
import sys
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
print("loaded:" + ",".join(loaded))
""" % (OPTIONAL,)


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + _REPORT_LOADED], capture_output=True,
                         text=True, timeout=300, check=True).stdout.strip().splitlines()[-1]
    assert out.startswith("loaded:"), out
    return set(filter(None, out.removeprefix("loaded:").split(",")))


def test_import_loads_no_optional_dependency():
    assert _loaded_after("import ntk_torch") == set()


def test_kernels_tracking_and_predictions_load_no_optional_dependency():
    work = """
import torch, ntk_torch as nt
torch.manual_seed(0)
net = nt.nn.MLP(3, 16, 1, 1)
x = torch.randn(6, 3, dtype=torch.float64)
net = net.double()
k = nt.empirical_ntk(net, x, mode="trace")
limit = nt.analytic.kernel(net, x)
tracker = nt.KernelTracker(net, x, torch.randn(6, 1, dtype=torch.float64))
tracker.update(0)
y = torch.randn(6, dtype=torch.float64)
nt.gradient_flow_mse(k, y, torch.zeros(6, dtype=torch.float64), 1.0)
nt.kernel_regression(limit.ntk, limit.ntk, y, ridge=1e-3)
nt.eigenmodes(k, k=2)
"""
    assert _loaded_after(work) == set()


def _block_import(monkeypatch, *modules: str) -> None:
    # A None entry in sys.modules makes `import name` raise ImportError, as if not installed.
    for name in list(sys.modules):
        if name.split(".")[0] in modules:
            monkeypatch.delitem(sys.modules, name)
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_kernel_store_without_zarr_names_the_store_extra(monkeypatch):
    _block_import(monkeypatch, "zarr")
    net, x = torch.nn.Linear(2, 1), torch.eye(2)
    with pytest.raises(ImportError, match=r"the kernel store needs .*'zarr'.*ntk_torch\[store\]"):
        nt.compute_kernel(net, x, store=tempfile.mkdtemp(), progress=False)
    with pytest.raises(ImportError, match=r"ntk_torch\[store\]"):
        nt.KernelStore(tempfile.mkdtemp())


def test_power_law_interval_without_scipy_names_the_stats_extra(monkeypatch):
    _block_import(monkeypatch, "scipy")
    records = [{"width": w, "metric": "e", "value": w ** -0.5} for w in (8, 16, 32)]
    with pytest.raises(ImportError, match=r"'scipy'.*ntk_torch\[stats\]"):
        nt.fit_power_law(records, "e")
    # The bootstrap over seeds needs no scipy.
    seeded = [{**r, "seed": s, "value": r["value"] * (1 + 0.01 * s)} for r in records
              for s in range(3)]
    assert nt.fit_power_law(seeded, "e").exponent == pytest.approx(-0.5, abs=1e-2)
