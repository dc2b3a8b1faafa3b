"""Figures of training dynamics: drift over steps, change against width."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ntk_torch import records as _records
from ntk_torch.plotting._canvas import new_figure, save

# Fields that locate a number inside one run; every other field identifies the run.
_WITHIN_RUN = ("step", "layer", "metric", "value")
_LINESTYLES = ("-", "--", ":", "-.")


def _run_key(record: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple((k, record[k]) for k in _records.columns([record]) if k not in _WITHIN_RUN)


def _labels(runs: list[tuple[tuple[str, Any], ...]]) -> list[str]:
    """``"width=64"``-style labels naming only the fields that differ between runs."""
    varying = {k for run in runs for k, v in run if any(dict(other).get(k) != v for other in runs)}
    return [", ".join(f"{k}={v}" for k, v in run if k in varying) for run in runs]


def plot_drift(records: Iterable[dict[str, Any]], path: str | os.PathLike, *,
               title: str | None = None, layers: Sequence[str] | None = None,
               log: bool = True) -> Path:
    """Kernel drift and per-layer feature change over training steps, as one PNG.

    Four panels against ``step``: the whole-model (``layer == "total"``)
    ``kernel_distance``, ``kernel_relative_change`` and ``kernel_velocity``, and every
    layer's ``feature_relative_change``. Records may hold several runs: fields other than
    step/layer/metric/value (``width``, ``parameterization``, ``seed``, ...) identify a run,
    which gets its own colour; layers are told apart by line style.

    Args:
        records: long-format records, e.g. :attr:`ntk_torch.KernelTracker.records`.
        path: the PNG to write (parent folders are created).
        title: figure title.
        layers: the layers to show in the feature panel (default: all, in first-seen order).
        log: logarithmic y axes (zeros, as at the reference step, are then not drawn).

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Raises:
        ValueError: if ``records`` has no ``kernel_distance`` or ``feature_relative_change``
            records to draw.

    Example:
        >>> import os, tempfile
        >>> recs = [{"step": s, "layer": "total", "metric": "kernel_distance", "value": 0.1 * s}
        ...         for s in range(3)]
        >>> path = plot_drift(recs, os.path.join(tempfile.mkdtemp(), "drift.png"))
        >>> path.stat().st_size > 0
        True
    """
    rows = list(records)
    panels = [("kernel_distance", "kernel distance to init  1 − cos(K_t, K_0)"),
              ("kernel_relative_change", "kernel relative change  ‖K_t − K_0‖/‖K_0‖"),
              ("kernel_velocity", "kernel velocity  d(K_t, K_t')/(t − t')"),
              ("feature_relative_change", "feature change  ‖h_t − h_0‖/‖h_0‖")]
    wanted = {m for m, _ in panels}
    if not any(r.get("metric") in wanted for r in rows):
        raise ValueError(
            "`records` has no kernel_distance, kernel_relative_change, kernel_velocity or "
            "feature_relative_change records to plot (expected KernelTracker records)"
        )
    run_keys: dict[tuple, None] = {}
    for r in rows:
        if r.get("metric") in wanted:
            run_keys.setdefault(_run_key(r), None)
    runs = list(run_keys)
    labels = _labels(runs)
    feature_rows = [r for r in rows if r.get("metric") == "feature_relative_change"]
    layer_names = list(layers) if layers is not None else _records.unique(feature_rows, "layer")

    fig = new_figure((11, 7.5))
    axes = fig.subplots(2, 2).ravel()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (metric, heading) in zip(axes, panels):
        per_layer = metric == "feature_relative_change"
        drawn = False
        for run, label, colour in zip(runs, labels, colours):
            in_run = [r for r in rows if r.get("metric") == metric and _run_key(r) == run]
            for i, layer in enumerate(layer_names if per_layer else ["total"]):
                points = sorted((r["step"], r["value"]) for r in in_run if r.get("layer") == layer)
                if not points:
                    continue
                steps, values = zip(*points)
                parts = [label] + ([f"layer {layer or '<root>'}"] if per_layer else [])
                ax.plot(steps, values, color=colour, marker=".", markersize=4,
                        linestyle=_LINESTYLES[i % len(_LINESTYLES)] if per_layer else "-",
                        label=", ".join(p for p in parts if p) or None)
                drawn = True
        ax.set_title(heading, fontsize=10)
        ax.set_xlabel("step")
        if drawn:
            if log:
                ax.set_yscale("log", nonpositive="mask")
            if ax.get_legend_handles_labels()[1] and (per_layer or len(runs) > 1):
                ax.legend(fontsize=7, handlelength=3.5 if per_layer else 2,
                          ncol=2 if per_layer and len(runs) * len(layer_names) > 8 else 1)
        else:
            ax.text(0.5, 0.5, f"no {metric} records", ha="center", va="center",
                    transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    return save(fig, path)



def plot_width_scaling(summary: Iterable[dict[str, Any]], path: str | os.PathLike, *,
                       title: str | None = None) -> Path:
    """Change over training against width, per parameterization, log-log, as one PNG.

    Three panels: ``kernel_relative_change`` ``‖K_T − K_0‖/‖K_0‖``,
    ``hidden_feature_change`` (the last hidden layer's ``‖h_T − h_0‖/‖h_0‖``) and
    ``kernel_distance`` ``1 − cos(K_T, K_0)``. Dotted: the lazy-regime slope through the
    narrowest NTK-parameterized net, ``width^(-1/2)`` for first-order changes and
    ``width^(-1)`` for the distance, which only sees the change orthogonal to ``K_0``,
    squared.

    Args:
        summary: one row per run with ``parameterization``, ``width`` and the three values
            (``ntk-torch drift``'s ``summary.csv``).
        path: the PNG to write (parent folders are created).
        title: figure title.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Example:
        >>> import os, tempfile
        >>> rows = [{"parameterization": "ntk", "width": w, "kernel_relative_change": w ** -0.5,
        ...          "hidden_feature_change": w ** -0.5, "kernel_distance": 1 / w}
        ...         for w in (16, 64)]
        >>> plot_width_scaling(rows, os.path.join(tempfile.mkdtemp(), "w.png")).stat().st_size > 0
        True
    """
    rows = list(summary)
    panels = [("kernel_relative_change", "kernel relative change ‖K_T − K_0‖/‖K_0‖", -0.5),
              ("hidden_feature_change", "last hidden layer's feature change", -0.5),
              ("kernel_distance", "kernel distance 1 − cos(K_T, K_0)", -1.0)]
    missing = [key for key, _, _ in panels if not rows or key not in rows[0]]
    if missing:
        raise ValueError(f"`summary` rows must have {[key for key, _, _ in panels]}, "
                         f"missing {missing}")
    fig = new_figure((10, 3.6))
    from matplotlib.ticker import NullFormatter

    widths = sorted(_records.unique(rows, "width"))
    for ax, (key, heading, slope) in zip(fig.subplots(1, 3), panels):
        for parameterization in _records.unique(rows, "parameterization"):
            mine = sorted(_records.select(rows, parameterization=parameterization),
                          key=lambda r: r["width"])
            ax.loglog([r["width"] for r in mine], [r[key] for r in mine], "o-",
                      label=parameterization)
        ntk = sorted(_records.select(rows, parameterization="ntk"), key=lambda r: r["width"])
        if ntk:
            w0, v0 = ntk[0]["width"], ntk[0][key]
            ax.loglog(widths, [v0 * (w / w0) ** slope for w in widths], ":", color="grey",
                      label=f"∝ width^{slope:g}")
        ax.set_xticks(widths, labels=[str(w) for w in widths])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("width")
        ax.set_title(heading, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title or "change over training against width; dotted: the lazy-regime slope "
                 "through the narrowest NTK-parameterized net")
    return save(fig, path)
