"""Griffe extension: read this project's Google docstrings as the API reference shows them.

Two conventions of the docstrings that griffe's Google parser reads differently:

- ``Example:`` (singular) opens the doctest section. Griffe reads only ``Examples:`` as
  one and renders ``Example:`` as an admonition whose ``>>>`` lines become Markdown
  block quotes; the section title is rewritten to ``Examples:``.
- ``Args:`` items that document several parameters at once (``rows, cols: ...``) are
  split into one item per name with the shared description, so each parameter gets its
  own row and a misspelled name is still reported.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_TITLE = re.compile(r"^(\s*)Example:\s*$", flags=re.MULTILINE)
_PARAMETER_TITLE = re.compile(
    r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Keyword Arguments):\s*$")
_SEVERAL_NAMES = re.compile(r"^(\s+)(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+)\s*:(.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_shared_parameters(text: str) -> str:
    r"""``a, b: description`` items of parameter sections as ``a: description``, ``b: ...``.

    Args:
        text: a docstring, dedented.

    Returns:
        The docstring with each multi-name item repeated once per name, continuation
        lines included; everything else unchanged.

    Example:
        >>> split_shared_parameters("Args:\n    a, b: sizes.\n    c: other.")
        'Args:\n    a: sizes.\n    b: sizes.\n    c: other.'
    """
    lines = text.split("\n")
    out: list[str] = []
    section_indent = item_indent = None
    i = 0
    while i < len(lines):
        line = lines[i]
        title = _PARAMETER_TITLE.match(line)
        if title:
            section_indent, item_indent = len(title.group(1)), None
        elif line.strip() and section_indent is not None:
            if _indent(line) <= section_indent:
                section_indent = None
            elif item_indent is None:
                item_indent = _indent(line)
        at_item = section_indent is not None and line.strip() and _indent(line) == item_indent
        item = _SEVERAL_NAMES.match(line) if at_item else None
        if not item:
            out.append(line)
            i += 1
            continue
        indent, names, first = item.groups()
        block_end = i + 1
        while block_end < len(lines) and (not lines[block_end].strip()
                                          or _indent(lines[block_end]) > len(indent)):
            block_end += 1
        while block_end > i + 1 and not lines[block_end - 1].strip():
            block_end -= 1  # a blank line closing the item stays outside it
        for name in re.split(r"\s*,\s*", names):
            out.append(f"{indent}{name}:{first}")
            out.extend(lines[i + 1:block_end])
        i = block_end
    return "\n".join(out)


class GoogleSections(griffe.Extension):
    """Rewrites each docstring once, before anything parses it."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Apply both conventions to ``obj``'s docstring, if it has one.

        Args:
            obj: any loaded module, class, function or attribute.
            **kwargs: the other event arguments, unused.
        """
        docstring = obj.docstring
        if docstring is not None:
            with_examples = _EXAMPLE_TITLE.sub(r"\1Examples:", docstring.value)
            docstring.value = split_shared_parameters(with_examples)
