"""Long-format records: one measured number per dict, and their CSV/JSON files.

A record is a flat ``dict`` such as
``{"width": 256, "seed": 0, "step": 100, "layer": "body.0", "metric": "kernel_distance",
"value": 0.012}``. Any subset of the known fields (:data:`FIELDS`) may appear, plus any
extra keys with scalar values; measuring code (trackers, sweeps) produces records,
scripts save them, plotting reads them. Writers order columns as :data:`FIELDS`, then
extra keys in first-seen order.

Types survive a round trip: ``layer``, ``metric``, ``parameterization``, ``activation``
and ``implementation`` are always strings (a Sequential layer named ``"0"`` stays
``"0"``); ``width``, ``seed``, ``step``, ``depth`` are ints; ``value`` is a float (NaN
included). Other columns are read as int, else float, else str. An empty CSV cell means
"absent", except in ``layer``, where ``""`` names the root module (as in
:func:`ntk_torch.layerwise_ntk`), so a record without a ``layer`` reads back with ``""``.
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

Record = dict[str, Any]

FIELDS = ("width", "depth", "seed", "parameterization", "activation", "implementation",
          "step", "layer", "metric", "value")
STRING_FIELDS = frozenset({"layer", "metric", "parameterization", "activation", "implementation"})
INT_FIELDS = frozenset({"width", "depth", "seed", "step"})
FLOAT_FIELDS = frozenset({"value"})

__all__ = ["FIELDS", "Record", "columns", "read_csv", "read_json", "select", "to_csv", "to_json",
           "unique"]


def _scalar(key: str, value: Any) -> Any:
    """Plain Python scalar for numpy/torch numbers; errors on containers."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "item") and tuple(getattr(value, "shape", (None,))) == ():  # 0-d tensor/array
        return _scalar(key, value.item())
    raise TypeError(f"record field {key!r} must be a scalar (str, int, float), "
                    f"got {type(value).__name__} {value!r}")


def _clean(records: Iterable[Record]) -> list[Record]:
    out = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise TypeError(
                f"`records` must contain dicts, got {type(record).__name__} at position {i}")
        out.append({str(k): _scalar(str(k), v) for k, v in record.items()})
    return out


def columns(records: Iterable[Record]) -> list[str]:
    """Column order for ``records``: the known :data:`FIELDS` present, then extras first-seen.

    Example:
        >>> columns([{"value": 1.0, "note": "x", "step": 3}])
        ['step', 'value', 'note']
    """
    seen: dict[str, None] = {}
    for record in records:
        for key in record:
            seen.setdefault(key, None)
    known = [f for f in FIELDS if f in seen]
    return known + [k for k in seen if k not in FIELDS]


def _prepare(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def to_csv(records: Iterable[Record], path: str | os.PathLike) -> Path:
    """Write records as CSV, one row per record; returns the path.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "r.csv")
        >>> _ = to_csv([{"step": 0, "layer": "0", "metric": "m", "value": 0.5}], path)
        >>> read_csv(path)
        [{'step': 0, 'layer': '0', 'metric': 'm', 'value': 0.5}]
    """
    rows = _clean(records)
    path = _prepare(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns(rows), restval="")
        writer.writeheader()
        for row in rows:
            # repr() writes the shortest string that reads back as the same float.
            writer.writerow({k: "" if v is None else repr(v) if isinstance(v, float) else v
                             for k, v in row.items()})
    return path


def _parse(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_csv(path: str | os.PathLike) -> list[Record]:
    """Records written by :func:`to_csv` (types restored as in the module docstring)."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        record: Record = {}
        for key, text in row.items():
            if key == "layer":
                record[key] = text  # "" is a real layer: parameters on the root module
            elif text == "":
                continue
            elif key in STRING_FIELDS:
                record[key] = text
            elif key in INT_FIELDS:
                record[key] = int(text)
            elif key in FLOAT_FIELDS:
                record[key] = float(text)
            else:
                record[key] = _parse(text)
        out.append(record)
    return out


def to_json(records: Iterable[Record], path: str | os.PathLike) -> Path:
    """Write records as a JSON list; non-finite floats become ``null`` (valid JSON).

    Example:
        >>> import tempfile, os, math
        >>> path = os.path.join(tempfile.mkdtemp(), "r.json")
        >>> _ = to_json([{"width": 8, "metric": "m", "value": float("nan")}], path)
        >>> math.isnan(read_json(path)[0]["value"])
        True
    """
    rows = _clean(records)
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                row[key] = None
    path = _prepare(path)
    path.write_text(json.dumps(rows, indent=1, allow_nan=False) + "\n")
    return path


def read_json(path: str | os.PathLike) -> list[Record]:
    """Records written by :func:`to_json`; ``null`` in float fields reads back as NaN."""
    rows = json.loads(Path(path).read_text())
    if not isinstance(rows, list):
        raise ValueError(
            f"{os.fspath(path)!r} must hold a JSON list of records, got {type(rows).__name__}")
    for row in rows:
        for key in FLOAT_FIELDS:
            if key in row and row[key] is None:
                row[key] = math.nan
    return rows


def select(records: Iterable[Record], **where: Any) -> list[Record]:
    """Records whose fields equal every given value; a tuple/list/set value means "any of".

    Example:
        >>> rs = [{"layer": "a", "value": 1.0}, {"layer": "b", "value": 2.0}]
        >>> select(rs, layer="b")
        [{'layer': 'b', 'value': 2.0}]
        >>> len(select(rs, layer=("a", "b")))
        2
    """
    def keep(record: Record) -> bool:
        for key, wanted in where.items():
            if key not in record:
                return False
            if isinstance(wanted, (tuple, list, set, frozenset)):
                if record[key] not in wanted:
                    return False
            elif record[key] != wanted:
                return False
        return True

    return [r for r in records if keep(r)]


def unique(records: Sequence[Record], key: str) -> list[Any]:
    """Distinct values of ``key`` in first-seen order (records lacking it are skipped).

    Example:
        >>> unique([{"layer": "b"}, {"layer": "a"}, {"layer": "b"}, {}], "layer")
        ['b', 'a']
    """
    seen: dict[Any, None] = {}
    for record in records:
        if key in record:
            seen.setdefault(record[key], None)
    return list(seen)
