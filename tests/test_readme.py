"""Every ```python block of the README runs as written (blocks of a section share state)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[tuple[int, str]]:
    text = README.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1))
            for m in re.finditer(r"```python\n(.*?)```", text, flags=re.S)]


@pytest.mark.parametrize("line,code", python_blocks(), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_readme_block_runs(line, code, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
