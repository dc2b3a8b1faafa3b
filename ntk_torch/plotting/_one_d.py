"""Figures of functions of one input: gradient steps, tangent kernels, ensembles vs the NTK-GP."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ntk_torch.plotting._canvas import array, new_figure, save


def _panels(rows: int, cols: int, size: tuple[float, float]) -> tuple[Any, np.ndarray]:
    fig = new_figure(size)
    return fig, np.atleast_1d(fig.subplots(rows, cols)).ravel()


def _nearest(xs: np.ndarray, x0: float) -> int:
    return int(np.argmin(np.abs(xs - x0)))


def plot_function_steps(x: Any, steps: Mapping[str, tuple[Any, Any]], path: str | os.PathLike,
                        *, observation: tuple[float, float], lr: float) -> Path:
    """``f(x)`` before and after one gradient step on ``½(f(x0) − y0)²``, one panel per model.

    Arrows show how far the step moves each ``f(x)``: by ``−lr (f(x0) − y0) k(x, x0)`` to
    first order, with ``k`` the model's tangent kernel.

    Args:
        x: ``(N,)`` inputs the functions are drawn on.
        steps: ``{model name: (f before (N,), f after (N,))}``, at most four.
        path: the PNG to write (parent folders are created).
        observation: ``(x0, y0)``, the point the step fits.
        lr: the step's learning rate (for the title).

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Example:
        >>> import os, tempfile, torch
        >>> x = torch.arange(5.0)
        >>> steps = {"line": (x, x + 0.1 * (x + 1))}
        >>> path = plot_function_steps(x, steps, os.path.join(tempfile.mkdtemp(), "s.png"),
        ...                            observation=(2.0, 5.0), lr=0.1)
        >>> path.stat().st_size > 0
        True
    """
    if not 1 <= len(steps) <= 4:
        raise ValueError(f"`steps` must hold 1 to 4 models, got {len(steps)}")
    x0, y0 = observation
    fig, axes = _panels(2, 2, (11, 7.5))
    xs = array(x)
    i0 = _nearest(xs, x0)
    for ax, (name, (before, after)) in zip(axes, steps.items()):
        b, a = array(before), array(after)
        ax.plot(xs, b, "k.", label="f before")
        moved = np.abs(a - b) > 1e-9 * np.maximum(1.0, np.abs(b))
        ax.quiver(xs[moved], b[moved], np.zeros(moved.sum()), (a - b)[moved], angles="xy",
                  scale_units="xy", scale=1.0, color="C3", width=0.004, label="one gradient step")
        ax.plot(xs, a, ".", color="C3", alpha=0.5, label="f after the step")
        ax.plot(x0, y0, "x", color="C0", markersize=10, mew=2,
                label=f"observation ({x0:g}, {y0:g})")
        ax.set_title(f"{name}: f({x0:g}) {b[i0]:.3g} → {a[i0]:.3g}", fontsize=10)
        ax.set_xlabel("x")
        ax.legend(fontsize=7)
    for ax in axes[len(steps):]:
        ax.set_axis_off()
    fig.suptitle(f"one gradient step on ½(f({x0:g}) − {y0:g})², lr {lr:g}")
    return save(fig, path, dpi=110)


def plot_tangent_kernels(x: Any, limit: Mapping[str, Any],
                         finite: Mapping[str, Mapping[float, Any]], path: str | os.PathLike, *,
                         x0: float) -> Path:
    """The finite-step kernel ``[f(x; θ + η ∇f(x0)) − f(x; θ)] / η`` against its limit ``k(x, x0)``.

    One panel per model (at most four), both scaled by ``k(x0, x0)``: the η → 0 limit is
    the empirical NTK's column at ``x0``.

    Args:
        x: ``(N,)`` inputs.
        limit: ``{model name: k(x, x0) (N,)}``.
        finite: ``{model name: {η: finite-step kernel (N,)}}``.
        path: the PNG to write (parent folders are created).
        x0: the input whose column is drawn.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Example:
        >>> import os, tempfile, torch
        >>> x = torch.arange(5.0)
        >>> k = {"line": x * 2 + 1}
        >>> path = plot_tangent_kernels(x, k, {"line": {0.1: k["line"]}},
        ...                             os.path.join(tempfile.mkdtemp(), "k.png"), x0=2.0)
        >>> path.stat().st_size > 0
        True
    """
    if not 1 <= len(limit) <= 4 or set(finite) != set(limit):
        raise ValueError(f"`limit` must hold 1 to 4 models and `finite` the same ones, got "
                         f"{list(limit)} and {list(finite)}")
    fig, axes = _panels(2, 2, (11, 7.5))
    xs = array(x)
    i0 = _nearest(xs, x0)
    for ax, name in zip(axes, limit):
        column = array(limit[name])
        scale = float(column[i0])
        ax.plot(xs, column / scale, "k-", label=f"k(x, {x0:g}), η → 0 (empirical NTK)")
        for j, (eta, k) in enumerate(finite[name].items()):
            ax.plot(xs, array(k) / scale, "o", markersize=max(4 - j, 1), alpha=0.8,
                    label=f"finite step η = {eta:g}")
        ax.axhline(0.0, color="0.8", lw=0.8)
        ax.set_title(f"{name}  (k({x0:g}, {x0:g}) = {scale:.3g})", fontsize=10)
        ax.set_xlabel("x")
        ax.set_ylabel(f"k(x, {x0:g}) / k({x0:g}, {x0:g})")
        ax.legend(fontsize=7)
    for ax in axes[len(limit):]:
        ax.set_axis_off()
    fig.suptitle(f"how much f(x) moves when a step raises f({x0:g}): the tangent kernel")
    return save(fig, path, dpi=110)


def plot_kernel_evolution(x: Any, kernels: Any, functions: Any, path: str | os.PathLike, *,
                          x0: float, title: str | None = None) -> Path:
    """A kernel column ``k(x, x0)`` and the function ``f(x)`` along ``T`` training steps.

    Left: ``k_t(x, x0) / k_t(x0, x0)`` for ``t = 0..T``; right: ``f_t(x)``; colour runs
    from the first step to the last.

    Args:
        x: ``(N,)`` inputs.
        kernels: ``(T + 1, N)`` kernel columns ``k_t(x, x0)``.
        functions: ``(T + 1, N)`` outputs ``f_t(x)``.
        path: the PNG to write (parent folders are created).
        x0: the input of the kernel column.
        title: figure title.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Example:
        >>> import os, tempfile, torch
        >>> x = torch.arange(5.0)
        >>> k = torch.stack([x + 1, x + 2])
        >>> path = plot_kernel_evolution(x, k, 3 * k, os.path.join(tempfile.mkdtemp(), "e.png"),
        ...                              x0=2.0)
        >>> path.stat().st_size > 0
        True
    """
    xs, ks, fs = array(x), array(kernels), array(functions)
    if ks.ndim != 2 or ks.shape != fs.shape or ks.shape[1] != xs.shape[0]:
        raise ValueError(f"`kernels` and `functions` must both be (T + 1, N) with N = "
                         f"{xs.shape[0]} inputs, got {ks.shape} and {fs.shape}")
    fig, (left, right) = _panels(1, 2, (11, 4.2))
    from matplotlib import colormaps

    cmap = colormaps["plasma"]
    steps = ks.shape[0] - 1
    i0 = _nearest(xs, x0)
    for s in range(steps + 1):
        colour = cmap(0.85 * s / max(steps, 1))
        label = "step 0" if s == 0 else (f"step {steps}" if s == steps else None)
        left.plot(xs, ks[s] / ks[s, i0], color=colour, lw=1.2, label=label)
        right.plot(xs, fs[s], color=colour, lw=1.2, label=label)
    left.set_title(f"k(x, {x0:g}) / k({x0:g}, {x0:g}) along training", fontsize=10)
    right.set_title("f(x) along training", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("x")
        ax.axvline(x0, color="0.8", lw=0.8)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save(fig, path, dpi=110)


def plot_ensembles_vs_gp(x: Any, y: Any, grid: Any, runs: Mapping[str, Mapping[str, Any]],
                         path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Ensembles of trained and linearized nets against a Gaussian-process posterior.

    One row per run (e.g. per activation), two panels: the ``"trained"`` nets and the
    ``"linearized"`` ones, each curve one seed, with the ensemble mean ± 2 std dotted and
    the posterior mean ± 2 std shaded.

    Args:
        x: ``(N,)`` or ``(N, 1)`` training inputs.
        y: ``(N,)`` targets.
        grid: ``(M,)`` or ``(M, 1)`` inputs the curves are drawn on.
        runs: ``{name: {"posterior": Gaussian (mean (M,), covariance (M, M)),
            "trained": (S, M), "linearized": (S, M)}}`` (:class:`ntk_torch.Gaussian`).
        path: the PNG to write (parent folders are created).
        title: figure title.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Example:
        >>> import os, tempfile, torch, ntk_torch as nt
        >>> g = torch.linspace(-1, 1, 7)
        >>> run = {"posterior": nt.Gaussian(g, 0.1 * torch.eye(7)),
        ...        "trained": torch.stack([g, g + 0.1]), "linearized": torch.stack([g, g - 0.1])}
        >>> path = plot_ensembles_vs_gp(g[:2], g[:2], g, {"relu": run},
        ...                             os.path.join(tempfile.mkdtemp(), "r.png"))
        >>> path.stat().st_size > 0
        True
    """
    xs = array(grid).reshape(-1)
    fig, axes = _panels(len(runs), 2, (12, 4.2 * len(runs)))
    panels = [(name, kind, run) for name, run in runs.items() for kind in ("trained", "linearized")]
    for ax, (name, kind, run) in zip(axes, panels):
        mean = array(run["posterior"].mean)
        std = np.sqrt(np.clip(array(run["posterior"].variance), 0, None))
        curves = array(run[kind])
        if mean.shape != xs.shape or curves.ndim != 2 or curves.shape[1] != xs.shape[0]:
            raise ValueError(f"`runs[{name!r}]` must hold a posterior of shape {xs.shape} and "
                             f"(S, {xs.shape[0]}) curves, got {mean.shape} and {curves.shape}")
        ax.fill_between(xs, mean - 2 * std, mean + 2 * std, color="C1", alpha=0.2,
                        label="NTK-GP mean ± 2 std")
        ax.plot(xs, mean, color="C1", lw=2)
        colour = "C0" if kind == "trained" else "C2"
        for i, curve in enumerate(curves):
            ax.plot(xs, curve, color=colour, lw=0.8, alpha=0.6,
                    label=f"{kind} nets, one per seed" if i == 0 else None)
        ens_mean, ens_std = curves.mean(0), curves.std(0, ddof=1) if len(curves) > 1 else 0 * xs
        ax.plot(xs, ens_mean, "--", color="k", lw=1.2, label="ensemble mean")
        ax.plot(xs, ens_mean + 2 * ens_std, ":", color="k", lw=1.0, label="ensemble ± 2 std")
        ax.plot(xs, ens_mean - 2 * ens_std, ":", color="k", lw=1.0)
        ax.plot(array(x).reshape(-1), array(y), "x", color="C3", markersize=9, mew=2,
                label="training points")
        ax.set_title(f"{name}: {kind} nets", fontsize=10)
        ax.set_xlabel("x")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return save(fig, path, dpi=110)
