"""Every ```python block of the README and of the pages under docs/ runs as written.

Shell (```bash) and output (```text) blocks are not run. The README's links to files of
the repository (pages, figures) must point at files that exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
LOCAL_LINK = re.compile(r"\]\((?!https?://|#)([^)#\s]+)(?:#[^)]*)?\)")
CODE = re.compile(r"^```.*?^```|`[^`\n]*`", flags=re.S | re.M)


def python_blocks() -> list[tuple[str, str]]:
    """``("page.md:line", code)`` for every python block, in page order."""
    blocks = []
    for page in PAGES:
        text = page.read_text()
        for match in PYTHON_BLOCK.finditer(text):
            line = text[: match.start()].count("\n") + 1
            blocks.append((f"{page.relative_to(ROOT)}:{line}", match.group(1)))
    return blocks


BLOCKS = python_blocks()


@pytest.mark.parametrize("where,code", BLOCKS, ids=[where for where, _ in BLOCKS])
def test_code_block_runs(where, code, tmp_path, monkeypatch):
    if "from transformers import" in code:  # the pages' Hugging Face examples
        pytest.importorskip("transformers")
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    exec(compile(code, where, "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_local_links_exist(page):
    text = CODE.sub("", page.read_text())
    missing = [target for target in LOCAL_LINK.findall(text)
               if not (page.parent / target).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_api_reference_reads_house_docstrings(tmp_path):
    """The griffe extension of the API reference: doctest sections and shared parameters."""
    griffe = pytest.importorskip("griffe")
    extension = griffe.load_extensions(
        f"{ROOT / 'docs/_griffe/google_sections.py'}:GoogleSections")
    source = '''
def f(rows, cols, *, tile):
    """Sum of a block.

    Args:
        rows, cols: index ranges,
            half-open.
        tile: side of a tile.

    Returns:
        the sum.

    Example:
        >>> f(1, 2, tile=3)
        6
    """
'''
    (tmp_path / "m.py").write_text(source)
    module = griffe.load("m", search_paths=[tmp_path], extensions=extension)
    sections = {s.kind.value: s for s in module["f"].docstring.parse("google")}
    names = [p.name for p in sections["parameters"].value]
    assert names == ["rows", "cols", "tile"]
    assert sections["parameters"].value[1].description == "index ranges,\nhalf-open."
    assert sections["examples"].value == [(sections["examples"].value[0][0],
                                           ">>> f(1, 2, tile=3)\n6")]
