"""How the engines are organised: one rule per layer kind, one engine interface, no
import cycles; and the benchmark scripts run (seconds-long configurations, not timings).
"""

from __future__ import annotations

import ast
import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ntk_torch as nt
from ntk_torch import _engines
from ntk_torch._engines._layers import rule_for
from tests.conftest import assert_close


class _OverriddenForward(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


class _OverriddenCell(nn.GRUCell):
    def forward(self, x, hx=None):
        return 2.0 * super().forward(x, hx)


class _OverriddenLSTM(nn.LSTM):
    def forward(self, x, hx=None):
        output, state = super().forward(x, hx)
        return 2.0 * output, state


def test_every_supported_layer_has_its_rule_and_the_rest_none():
    ntk_dense, ntk_conv = nt.nn.Dense(3, 2), nt.nn.Conv2d(2, 3, 3)
    kinds = {nn.Linear(3, 2): "linear", ntk_dense: "linear", nn.Conv1d(2, 3, 3): "conv",
             nn.Conv2d(2, 3, 3): "conv", ntk_conv: "conv", nn.Embedding(5, 2): "embedding",
             nn.LayerNorm(4): "layernorm", nn.GroupNorm(2, 4): "groupnorm",
             nn.BatchNorm1d(4).eval(): "batchnorm", nn.BatchNorm2d(4).eval(): "batchnorm",
             nn.LSTMCell(3, 2): "recurrent cell", nn.GRUCell(3, 2): "recurrent cell",
             nn.RNNCell(3, 2, nonlinearity="relu"): "recurrent cell", nn.LSTM(3, 2): "recurrent",
             nn.GRU(3, 2, num_layers=2): "recurrent",
             nn.RNN(3, 2, nonlinearity="relu", bidirectional=True): "recurrent"}
    for module, kind in kinds.items():
        assert rule_for(module).name == kind, module
    multipliers = (ntk_dense.multiplier, ntk_dense.bias_multiplier)
    assert rule_for(ntk_dense).scales(ntk_dense) == multipliers
    # Batch statistics, renormalised rows, a projected state, an overridden forward, other
    # layers: no rule.
    for module in (nn.BatchNorm2d(4).train(), nn.Embedding(5, 2, max_norm=1.0),
                   nn.LSTM(3, 2, proj_size=1), _OverriddenForward(3, 2), _OverriddenCell(3, 2),
                   _OverriddenLSTM(3, 2), nn.Bilinear(2, 2, 2), nn.Conv3d(2, 3, 3)):
        assert rule_for(module) is None, module


def test_engines_share_one_interface():
    for name, engine in _engines.ENGINES.items():
        assert isinstance(engine, _engines.Engine), name


def _imports(path: Path, module: str, modules: set[str], lazy: bool) -> set[str]:
    """The ``ntk_torch`` modules that ``module`` (file ``path``) imports; function-level
    imports too when ``lazy``."""
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if lazy else tree.body
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names = (f"{base}.{a.name}" for a in node.names)
            found |= {name if name in modules else base for name in names}
    return (found & modules) - {module}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_import_cycles():
    # Module-level imports across the package; inside the engines, imports in functions too
    # (a deferred import that closes a cycle is a cycle all the same).
    root = Path(nt.__file__).parent
    files = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in root.rglob("*.py")}
    modules = set(files)
    for scope, lazy in (("ntk_torch", False), ("ntk_torch._engines", True)):
        graph = {m: {d for d in _imports(p, m, modules, lazy) if d.startswith(scope)}
                 for m, p in files.items() if m.startswith(scope)}
        cycle = _cycle(graph)
        assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def _public(module: str) -> bool:
    return not any(part.startswith("_") for part in module.split("."))


def test_no_public_module_imports_another_ones_private_names():
    root = Path(nt.__file__).parent
    files = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in root.rglob("*.py")}
    found = []
    for module, path in files.items():
        if not _public(module):
            continue
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            parts = package.split(".")
            base = parts[: len(parts) - node.level + 1] if node.level else []
            source = ".".join([*base, node.module] if node.module else base)
            if source == module or not source.startswith("ntk_torch") or not _public(source):
                continue
            found += [f"{module} imports {source}.{alias.name}" for alias in node.names
                      if alias.name.startswith("_") and not alias.name.endswith("__")
                      and f"{source}.{alias.name}" not in files]
    assert not found, found


@pytest.mark.slow
def test_benchmark_script_runs_and_reports_consistent_kernels(tmp_path, monkeypatch):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_empirical.py"
    spec = importlib.util.spec_from_file_location("bench_empirical", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_empirical", bench)  # dataclasses look it up there
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script adds its folder
    spec.loader.exec_module(bench)
    assert bench.main(["--configs", "tiny", "--quick", "--no-memory", "--repeats", "1",
                       "--threads", "1", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "bench_empirical.csv")))
    assert {r["method"] for r in rows} == {*bench.RECIPES, *bench.ENGINES}
    # Every method's kernel (the tutorial's summed trace divided by O) equals the reference.
    assert all(float(r["max_rel_diff"]) < 1e-5 for r in rows), rows


@pytest.mark.slow
def test_revision_comparison_script_times_both_trees(tmp_path, monkeypatch):
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("needs the git checkout the script compares with")
    path = root / "benchmarks" / "bench_compare.py"
    spec = importlib.util.spec_from_file_location("bench_compare", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script adds its folder
    spec.loader.exec_module(bench)
    assert bench.main(["--ref", "HEAD", "--configs", "tiny", "--methods", "structured",
                       "--rounds", "1", "--calls", "2", "--threads", "1",
                       "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "bench_compare.csv")))
    assert [(r["mode"], r["method"]) for r in rows] == [("full", "structured"),
                                                        ("trace", "structured")]
    # One process per tree, two timed calls each.
    assert all(float(r["old_s"]) > 0 and float(r["new_s"]) > 0 and r["samples"] == "2"
               for r in rows)


@pytest.mark.parametrize("rows", [5, 64, 203])
def test_gram_of_upper_blocks_is_the_product_and_exactly_symmetric(rows):
    from ntk_torch._engines.jacobian import gram

    m = torch.randn(rows, 37, generator=torch.Generator().manual_seed(rows), dtype=torch.float64)
    g = gram(m)
    assert torch.equal(g, g.T)
    assert_close(g, m @ m.T)


def test_structured_share_script_reports_every_model(monkeypatch, capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_structured_share.py"
    spec = importlib.util.spec_from_file_location("bench_structured_share", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script adds its folder
    spec.loader.exec_module(bench)
    assert bench.main([]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == list(bench.MODELS)
    # GPT-2's Conv1D, the packed attention projections and the LSTMCell's two weight pairs
    # have rules: nothing falls back.
    assert rows[1].endswith("| 100.0% | nothing |")
    assert rows[3].endswith("| 100.0% | nothing |")
