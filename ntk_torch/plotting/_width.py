"""Figures of width sweeps: a metric against width, the eNTK's error with its fits."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ntk_torch import records as _records
from ntk_torch.plotting._canvas import new_figure, save


def _by_width(rows: list[dict[str, Any]]) -> tuple[list[int], list[list[float]]]:
    """Widths in order and, per width, the values of ``rows`` (one per seed)."""
    widths = sorted({int(r["width"]) for r in rows})
    return widths, [[float(r["value"]) for r in rows if int(r["width"]) == w] for w in widths]


_MARKERS = ("o", "s", "^", "D", "v", "P")


def _series(ax: Any, rows: list[dict[str, Any]], label: str, colour: str, *, log: bool,
            linestyle: str = "-", marker: str = "o") -> None:
    """Mean over seeds against width, with the seeds' min–max as a band."""
    import numpy as np

    widths, values = _by_width(rows)
    if log:
        # Geometric mean: the same centre a log-log fit uses.
        centre = [float(np.exp(np.mean(np.log(v)))) for v in values]
    else:
        centre = [float(np.mean(v)) for v in values]
    ax.plot(widths, centre, marker=marker, markersize=4, markerfacecolor="none", color=colour,
            linestyle=linestyle, label=label)
    if any(len(v) > 1 for v in values):
        ax.fill_between(widths, [min(v) for v in values], [max(v) for v in values],
                        color=colour, alpha=0.15)


def _group(rows: list[dict[str, Any]], key: str) -> dict[Any, list[dict[str, Any]]]:
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r.get(key), []).append(r)
    return groups


def plot_kernel_error(records: Iterable[dict[str, Any]], path: str | os.PathLike, *,
                      by: str = "parameterization", title: str | None = None) -> Path:
    """Relative error of the eNTK to its analytic limit against width, log-log, with fits.

    Left: per-seed ``ntk_error`` (geometric mean over seeds, min–max band) and its fitted
    power law (:func:`ntk_torch.fit_power_law`; slope and 95% interval in the legend).
    Right: the per-width split into ``ntk_fluctuation`` (solid) and ``ntk_bias`` (dashed),
    with the ``width^(-1/2)`` and ``width^(-1)`` reference slopes. One colour per value of
    ``by`` (e.g. parameterization).

    Example:
        >>> import os, tempfile
        >>> rs = [{"width": w, "seed": s, "metric": "ntk_error", "value": (1 + s) * w ** -0.5}
        ...       for w in (64, 128, 256) for s in range(3)]
        >>> plot_kernel_error(rs, os.path.join(tempfile.mkdtemp(), "e.png")).stat().st_size > 0
        True
    """
    import numpy as np

    from ntk_torch.sweeps import fit_power_law

    rows = list(records)
    errors = [r for r in rows if r.get("metric") == "ntk_error"]
    if not errors:
        raise ValueError("`records` has no ntk_error records (expected width_sweep records "
                         "with an analytic kernel)")
    fig = new_figure((11, 4.3))
    left, right = fig.subplots(1, 2)
    for i, (name, group) in enumerate(_group(errors, by).items()):
        colour = f"C{i % 10}"
        fit = fit_power_law(group, "ntk_error")
        label = f"{name or 'model'}: slope {fit.exponent:+.2f} [{fit.low:+.2f}, {fit.high:+.2f}]"
        marker = _MARKERS[i % len(_MARKERS)]  # groups with identical kernels stay visible
        _series(left, group, label, colour, log=True, marker=marker)
        w = np.array(fit.widths, dtype=float)
        left.plot(w, fit.prefactor * w**fit.exponent, color=colour, linestyle=":", linewidth=1)
        for metric, style in (("ntk_fluctuation", "-"), ("ntk_bias", "--")):
            part = [r for r in rows
                    if r.get("metric") == metric and r.get(by) == name and r["value"] > 0]
            if part:
                _series(right, part, f"{name or 'model'} {metric[4:]}", colour, log=True,
                        linestyle=style, marker=marker)
    fluctuation = sorted((int(r["width"]), r["value"]) for r in rows
                         if r.get("metric") == "ntk_fluctuation" and r["value"] > 0)
    if fluctuation:  # reference slopes through the first fluctuation point
        widths = np.array(sorted({w for w, _ in fluctuation}), dtype=float)
        for exponent, style in ((-0.5, (0, (1, 3))), (-1.0, (0, (4, 4)))):
            right.plot(widths, fluctuation[0][1] * (widths / widths[0]) ** exponent, color="0.5",
                       linestyle=style, linewidth=1, label=f"∝ width^{exponent:g}")
    for ax, heading in ((left, "‖K_s − K∞‖ / ‖K∞‖ per seed (dotted: fit)"),
                        (right, "seed-to-seed fluctuation (solid) and bias (dashed)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", nonpositive="mask")
        ax.set_xlabel("width")
        ax.set_title(heading, fontsize=10)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7)
    fig.suptitle(title or "empirical NTK at initialisation vs its infinite-width limit")
    return save(fig, path)


def plot_vs_width(records: Iterable[dict[str, Any]], path: str | os.PathLike, metric: str, *,
                  by: str = "parameterization", panels: str | None = None, lines: str | None = None,
                  where: dict[str, Any] | None = None, log: bool = True, title: str | None = None,
                  ylabel: str | None = None) -> Path:
    """A metric against width: one colour per ``by``, optional panels and line groups.

    Values are averaged over seeds (geometric mean when ``log``), the band spans the seeds.

    Args:
        records: long-format records with ``width``, ``metric``, ``value``.
        path: the PNG to write.
        metric: the metric to draw.
        by: field told apart by colour (within a panel).
        panels: field giving one panel per value (e.g. ``"parameterization"``), or None.
        lines: field giving one line per value inside a colour group (e.g. ``"layer"``);
            when set, colours follow this field instead of ``by``.
        where: further filters on the records, e.g. ``{"layer": "total"}``.
        log: log-log axes.
        title: figure title (default: the metric).
        ylabel: y-axis label (default: the metric).

    Example:
        >>> import os, tempfile
        >>> rs = [{"width": w, "seed": s, "metric": "m", "value": w ** -1.0}
        ...       for w in (8, 16) for s in range(2)]
        >>> plot_vs_width(rs, os.path.join(tempfile.mkdtemp(), "m.png"), "m").stat().st_size > 0
        True
    """
    rows = _records.select(records, metric=metric, **(where or {}))
    if log:
        rows = [r for r in rows if r["value"] > 0]
    if not rows:
        raise ValueError(f"`records` has no {metric!r} records"
                         + (f" with {where}" if where else ""))
    panel_groups = _group(rows, panels) if panels else {None: rows}
    fig = new_figure((4.2 * len(panel_groups) + 0.6, 4.2))
    axes = fig.subplots(1, len(panel_groups), squeeze=False)[0]
    for ax, (panel, panel_rows) in zip(axes, panel_groups.items()):
        groups = _group(panel_rows, lines or by)
        for i, (name, group) in enumerate(groups.items()):
            _series(ax, group, str(name), f"C{i % 10}", log=log, marker=_MARKERS[i % len(_MARKERS)])
        if log:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", nonpositive="mask")
        else:
            ax.set_xscale("log", base=2)
        ax.set_xlabel("width")
        ax.set_ylabel(ylabel or metric)
        if panel is not None:
            ax.set_title(f"{panels}={panel}", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(title or metric)
    return save(fig, path)
