"""Figures from long-format records (:mod:`ntk_torch.records`); measuring lives elsewhere.

matplotlib is imported inside each function, and figures are drawn on an Agg canvas
without pyplot, so importing :mod:`ntk_torch` never loads matplotlib or changes the
user's backend. Every function writes a PNG and returns its path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ntk_torch import records as _records

# Fields that locate a number inside one run; every other field identifies the run.
_WITHIN_RUN = ("step", "layer", "metric", "value")
_LINESTYLES = ("-", "--", ":", "-.")


def _run_key(record: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple((k, record[k]) for k in _records.columns([record]) if k not in _WITHIN_RUN)


def _labels(runs: list[tuple[tuple[str, Any], ...]]) -> list[str]:
    """``"width=64"``-style labels naming only the fields that differ between runs."""
    varying = {k for run in runs for k, v in run if any(dict(other).get(k) != v for other in runs)}
    return [", ".join(f"{k}={v}" for k, v in run if k in varying) for run in runs]


def _save(fig: Any, path: str | os.PathLike) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


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
    from matplotlib.figure import Figure

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

    fig = Figure(figsize=(11, 7.5), layout="constrained")
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
    return _save(fig, path)


def plot_eigenmodes(x: Any, modes: Any, path: str | os.PathLike, *, n_modes: int = 4,
                    title: str | None = None) -> Path:
    """Leading eigenvectors of a kernel on 1-D inputs, and its spectrum, as one PNG.

    Left: the first ``n_modes`` eigenvectors as functions of the input, labelled with their
    eigenvalues (the functions gradient flow fits first). Right: all eigenvalues on a log
    scale, the drawn ones marked.

    Args:
        x: the ``N`` scalar inputs the kernel was computed on, ``(N,)`` or ``(N, 1)``.
        modes: :func:`ntk_torch.eigenmodes` of an ``(N, N)`` kernel (or a full kernel with
            ``O = 1``): ``values`` ``(N,)`` descending, ``vectors`` ``(N, N)``.
        path: the PNG to write (parent folders are created).
        n_modes: how many leading modes to draw (at most ``N``).
        title: figure title.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Example:
        >>> import os, tempfile, torch, ntk_torch as nt
        >>> x = torch.linspace(-1, 1, 9)
        >>> k = torch.exp(-(x[:, None] - x[None, :]) ** 2)
        >>> path = plot_eigenmodes(x, nt.eigenmodes(k), os.path.join(tempfile.mkdtemp(), "m.png"))
        >>> path.stat().st_size > 0
        True
    """
    import numpy as np
    from matplotlib.figure import Figure

    values, vectors = modes
    xs = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=float)
    if xs.ndim == 2 and xs.shape[1] == 1:
        xs = xs[:, 0]
    vec = np.asarray(vectors.detach().cpu() if hasattr(vectors, "detach") else vectors, dtype=float)
    if vec.ndim == 3 and vec.shape[1] == 1:
        vec = vec[:, 0, :]
    lam = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=float)
    if xs.ndim != 1:
        raise ValueError(f"`x` must hold scalar inputs, shape (N,) or (N, 1), "
                         f"got {tuple(np.shape(x))}")
    if vec.ndim != 2 or vec.shape[0] != xs.shape[0] or lam.shape != (vec.shape[1],):
        raise ValueError(
            f"`modes` must be eigenmodes of an (N, N) kernel on the N = {xs.shape[0]} inputs "
            f"(values (n,), vectors (N, n)), got values {lam.shape} and vectors "
            f"{tuple(np.shape(vectors))}"
        )
    valid = isinstance(n_modes, int) and not isinstance(n_modes, bool)
    if not valid or not 1 <= n_modes <= vec.shape[1]:
        raise ValueError(f"`n_modes` must be an int in [1, {vec.shape[1]}], got {n_modes!r}")

    order = np.argsort(xs, kind="stable")
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    for j in range(n_modes):
        left.plot(xs[order], vec[order, j], marker="." if xs.size <= 60 else None,
                  label=f"mode {j + 1}: λ = {lam[j]:.3g}")
    left.axhline(0.0, color="0.7", linewidth=0.8)
    left.set_xlabel("input x")
    left.set_ylabel("eigenvector entry")
    left.set_title("leading eigenmodes", fontsize=10)
    left.legend(fontsize=8)
    index = np.arange(1, lam.size + 1)
    positive = lam > 0
    right.semilogy(index[positive], lam[positive], ".", color="0.4", label="eigenvalues")
    shown = positive & (index <= n_modes)
    right.semilogy(index[shown], lam[shown], "o", color="C3", label="drawn modes")
    right.set_xlabel("index j")
    right.set_ylabel("λ_j")
    right.set_title("spectrum (positive eigenvalues)", fontsize=10)
    right.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


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
        ax.fill_between(widths, [min(v) for v in values], [max(v) for v in values], color=colour, alpha=0.15)


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
    from matplotlib.figure import Figure

    from ntk_torch.sweeps import fit_power_law

    rows = list(records)
    errors = [r for r in rows if r.get("metric") == "ntk_error"]
    if not errors:
        raise ValueError("`records` has no ntk_error records (expected width_sweep records with an analytic kernel)")
    fig = Figure(figsize=(11, 4.3), layout="constrained")
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
            part = [r for r in rows if r.get("metric") == metric and r.get(by) == name and r["value"] > 0]
            if part:
                _series(right, part, f"{name or 'model'} {metric[4:]}", colour, log=True, linestyle=style,
                        marker=marker)
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
    return _save(fig, path)


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

    Example:
        >>> import os, tempfile
        >>> rs = [{"width": w, "seed": s, "metric": "m", "value": w ** -1.0} for w in (8, 16) for s in range(2)]
        >>> plot_vs_width(rs, os.path.join(tempfile.mkdtemp(), "m.png"), "m").stat().st_size > 0
        True
    """
    from matplotlib.figure import Figure

    rows = _records.select(records, metric=metric, **(where or {}))
    if log:
        rows = [r for r in rows if r["value"] > 0]
    if not rows:
        raise ValueError(f"`records` has no {metric!r} records" + (f" with {where}" if where else ""))
    panel_groups = _group(rows, panels) if panels else {None: rows}
    fig = Figure(figsize=(4.2 * len(panel_groups) + 0.6, 4.2), layout="constrained")
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
    return _save(fig, path)
