"""Width sweeps: the empirical NTK against its infinite-width limit, and what training moves.

:func:`width_sweep` measures and returns long-format records; it does no I/O and no
plotting (scripts save, :mod:`ntk_torch.plotting` draws). :func:`fit_power_law` fits
``metric ∝ width^exponent`` to those records.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ntk_torch import records as _records
from ntk_torch._checks import check_int, check_ints, check_number
from ntk_torch._extras import require
from ntk_torch.empirical import empirical_ntk
from ntk_torch.records import Record
from ntk_torch.tracking import KernelTracker

Builder = Callable[[int, int], nn.Module]
AnalyticSpec = Union[Literal["auto"], None, Callable[[nn.Module, torch.Tensor], Any]]
Trainer = Callable[[nn.Module], Union[None, Mapping[str, float], Iterable[Record]]]

__all__ = ["PowerLaw", "fit_power_law", "width_sweep"]


def width_sweep(build: Builder, widths: Iterable[int], x: torch.Tensor, *,
                seeds: Iterable[int] = range(5),
                analytic: AnalyticSpec = "auto", train: Trainer | None = None,
                probe_y: torch.Tensor | None = None, implementation: str = "auto",
                tags: Mapping[str, Any] | None = None, progress: bool = True) -> list[Record]:
    """Empirical NTK at initialisation against the analytic limit, and drift under training.

    For every ``width`` and ``seed``, ``model = build(width, seed)`` and, on the probe
    inputs ``x (N, ...)``, the trace-mode eNTK ``K_s`` ``(N, N)`` (mean over outputs).
    With ``K∞`` the analytic kernel of the architecture, records (``‖·‖`` Frobenius):

    - per seed: ``ntk_error = ‖K_s − K∞‖ / ‖K∞‖``;
    - per width (no ``seed`` field), with ``K̄`` the mean over the ``S`` seeds:
      ``ntk_error_of_mean = ‖K̄ − K∞‖/‖K∞‖``, the seed-to-seed fluctuation
      ``ntk_fluctuation = σ/‖K∞‖`` with ``σ² = Σ_s ‖K_s − K̄‖² / (S − 1)``, and the
      systematic part ``ntk_bias = sqrt(max(0, ‖K̄ − K∞‖² − σ²/S)) / ‖K∞‖`` (an
      unbiased split of ``E‖K_s − K∞‖² = bias² + σ²``). At initialisation in the NTK
      parameterization theory expects fluctuation ``∝ width^(-1/2)`` and bias
      ``∝ width^(-1)``.

    With ``train``, after the kernel at initialisation, a :class:`~ntk_torch.KernelTracker`
    records its reference on ``x``, ``train(model)`` trains the model in place, and the
    tracker records again: kernel drift, per-layer feature and weight change (metrics of
    :class:`~ntk_torch.KernelTracker`, ``step`` = ``train.steps`` if it has one, else 1).
    Whatever ``train`` returns (a ``{metric: value}`` mapping or records, such as
    :class:`ntk_torch.training.GradientDescent`'s losses and accuracies of the trained,
    linearized and infinite-width predictors) is recorded too.

    Args:
        build: ``(width, seed) -> nn.Module``; seed the initialisation inside.
        widths: hidden widths to sweep.
        x: probe inputs ``(N, ...)``, ``N >= 2``.
        seeds: initialisation seeds, passed to ``build``.
        analytic: ``"auto"``: :func:`ntk_torch.analytic.kernel` of the first model of each
            width (skipped with a warning if the architecture is not supported); a callable
            ``(model, x) -> (N, N)`` tensor or ``Kernel``; ``None``: no error metrics.
        train: ``model -> None | {metric: value} | records`` training in place.
        probe_y: targets of ``x`` for the tracker's kernel alignment.
        implementation: eNTK engine (see :func:`ntk_torch.empirical_ntk`).
        tags: fields added to every record, e.g. ``{"parameterization": "ntk"}``.
        progress: show a progress bar with ETA.

    Returns:
        Records ``{width, seed?, step?, layer?, predictor?, metric, value, **tags}``.

    Example:
        >>> import torch, ntk_torch as nt
        >>> x = torch.randn(6, 3)
        >>> build = lambda width, seed: (torch.manual_seed(seed), nt.nn.MLP(3, width, 1, 1))[1]
        >>> records = width_sweep(build, [64, 256], x, seeds=range(3), progress=False)
        >>> sorted({r["metric"] for r in records})
        ['ntk_bias', 'ntk_error', 'ntk_error_of_mean', 'ntk_fluctuation']
    """
    widths, seeds = check_ints("widths", widths), check_ints("seeds", seeds)
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] < 2:
        raise ValueError(f"`x` must be a tensor of at least 2 probe inputs (N, ...), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not (analytic in ("auto", None) or callable(analytic)):
        raise ValueError("`analytic` must be 'auto', None or a callable (model, x) -> kernel, "
                         f"got {analytic!r}")
    tags = dict(tags or {})
    out: list[Record] = []
    bar = tqdm(total=len(widths) * len(seeds), desc="width sweep", disable=not progress)
    for width in widths:
        limit, kernels = None, []
        for i, seed in enumerate(seeds):
            bar.set_postfix(width=width, seed=seed)
            model = build(width, seed)
            if not isinstance(model, nn.Module):
                raise TypeError(f"`build({width}, {seed})` must return an nn.Module, "
                                f"got {type(model).__name__}")
            if i == 0 and analytic is not None:
                limit = _analytic_kernel(analytic, model, x)
            fields = {"width": width, "seed": seed, **tags}
            if train is None:
                k = empirical_ntk(model, x, mode="trace", implementation=implementation)
            else:  # the tracker's reference is the same trace-mode kernel at initialisation
                tracker = KernelTracker(model, x, probe_y, implementation=implementation, top_k=0)
                tracker.update(0)
                k = tracker.reference_kernel
                out += [{**fields, **r} for r in _train_and_track(tracker, train)]
            kernels.append(k.detach().to("cpu", torch.float64))
            if limit is not None:
                error = _relative(kernels[-1] - limit, limit)
                out.append({**fields, "metric": "ntk_error", "value": error})
            bar.update()
        if limit is not None:
            out += [{"width": width, **tags, "metric": m, "value": v}
                    for m, v in _split_error(kernels, limit).items()]
    bar.close()
    return out


def _relative(diff: torch.Tensor, reference: torch.Tensor) -> float:
    return float(diff.norm() / reference.norm())


def _analytic_kernel(analytic: AnalyticSpec, model: nn.Module,
                     x: torch.Tensor) -> torch.Tensor | None:
    if analytic == "auto":
        from ntk_torch import analytic as analytic_module

        try:
            result = analytic_module.kernel(model, x)
        except (TypeError, ValueError, NotImplementedError) as error:
            warnings.warn(f"no analytic kernel, so no error metrics: {error}", RuntimeWarning,
                          stacklevel=3)
            return None
    else:
        result = analytic(model, x)
    k = getattr(result, "ntk", result)
    if not isinstance(k, torch.Tensor) or k.shape != (x.shape[0], x.shape[0]):
        raise ValueError(f"`analytic` must give an ({x.shape[0]}, {x.shape[0]}) NTK, got "
                         f"{tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__}")
    return k.detach().to("cpu", torch.float64)


def _split_error(kernels: list[torch.Tensor], limit: torch.Tensor) -> dict[str, float]:
    stack = torch.stack(kernels)
    mean = stack.mean(0)
    norm = float(limit.norm())
    out = {"ntk_error_of_mean": float((mean - limit).norm()) / norm}
    if len(kernels) > 1:
        variance = float((stack - mean).square().sum()) / (len(kernels) - 1)
        bias2 = float((mean - limit).square().sum()) - variance / len(kernels)
        out["ntk_fluctuation"] = math.sqrt(variance) / norm
        out["ntk_bias"] = math.sqrt(max(bias2, 0.0)) / norm
    return out


def _train_and_track(tracker: KernelTracker, train: Trainer) -> list[Record]:
    """Train the tracked model; the tracker's records at the end and the trainer's."""
    result = train(tracker.model)
    steps = int(getattr(train, "steps", 1))
    tracker.update(steps, force=True)
    out = [r for r in tracker.records if r["step"] == steps]
    if isinstance(result, Mapping):
        out += [{"metric": str(m), "value": float(v)} for m, v in result.items()]
    elif result is not None:
        out += [dict(r) for r in result]
    return out


@dataclass(frozen=True)
class PowerLaw:
    """``value ≈ prefactor · width^exponent`` with a confidence interval for the exponent."""

    exponent: float
    prefactor: float
    low: float
    high: float
    confidence: float
    method: str
    widths: tuple[int, ...]

    def __str__(self) -> str:
        return (f"{self.exponent:+.3f} [{self.low:+.3f}, {self.high:+.3f}] "
                f"({self.confidence:.0%}, {self.method})")


def fit_power_law(records: Iterable[Record], metric: str, *, confidence: float = 0.95,
                  n_boot: int = 2000,
                  seed: int = 0, **where: Any) -> PowerLaw:
    """Fit ``metric ∝ width^exponent`` by least squares in log-log coordinates.

    The exponent is the slope of ``log m̄(w)`` against ``log w``, ``m̄(w)`` the geometric
    mean over seeds of the metric at width ``w``. Its interval:

    - records with a ``seed`` field: percentile bootstrap over seeds — resample each
      width's seeds with replacement, refit, take the ``(1 ± confidence)/2`` quantiles of
      ``n_boot`` slopes;
    - one record per width (e.g. ``ntk_error_of_mean``): the ordinary least-squares
      t-interval of the slope (needs at least three widths).

    Args:
        records: long-format records with ``width``, ``metric`` and ``value``.
        metric: which metric to fit; values must be positive and finite.
        confidence: coverage of the interval.
        n_boot: bootstrap resamples.
        seed: seed of the bootstrap.
        **where: further filters, e.g. ``parameterization="ntk"``, ``layer="hidden1"``.

    Example:
        >>> rs = [{"width": w, "seed": s, "metric": "e", "value": 3.0 * w ** -0.5 * (1 + 0.01 * s)}
        ...       for w in (64, 128, 256, 512) for s in range(4)]
        >>> fit = fit_power_law(rs, "e")
        >>> round(fit.exponent, 3), fit.low <= -0.5 <= fit.high
        (-0.5, True)
    """
    if check_number("confidence", confidence, strict=True) >= 1:
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence!r}")
    check_int("n_boot", n_boot, low=1)
    chosen = _records.select(records, metric=metric, **where)
    if not chosen:
        raise ValueError(f"no records with metric={metric!r}" + (f" and {where}" if where else ""))
    by_width: dict[int, list[float]] = {}
    for r in chosen:
        value = float(r["value"])
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"`{metric}` must be positive and finite to fit a power law, "
                             f"got {value} at width {r.get('width')}")
        by_width.setdefault(int(r["width"]), []).append(math.log(value))
    widths = sorted(by_width)
    if len(widths) < 2:
        raise ValueError(f"a power law needs at least 2 widths, got {widths}")
    log_w = np.log(np.array(widths, dtype=float))
    logs = [np.array(by_width[w]) for w in widths]
    slope, intercept = np.polyfit(log_w, [v.mean() for v in logs], 1)
    alpha = (1 - confidence) / 2
    if any("seed" in r for r in chosen) and max(len(v) for v in logs) > 1:
        rng = np.random.default_rng(seed)
        # The least-squares slope is linear in the per-width means: slope = means @ c.
        c = (log_w - log_w.mean()) / np.square(log_w - log_w.mean()).sum()
        means = np.stack([v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1) for v in logs],
                         axis=1)
        boot = means @ c
        # Resampling S seeds underestimates the variance of their mean by (S - 1)/S;
        # widen the bootstrap quantiles around the estimate accordingly.
        smallest = min(len(v) for v in logs)
        inflate = math.sqrt(smallest / (smallest - 1)) if smallest > 1 else 1.0
        low, high = slope + inflate * (np.quantile(boot, [alpha, 1 - alpha]) - slope)
        method = f"bootstrap over seeds, {n_boot} resamples"
    else:
        if len(widths) < 3:
            raise ValueError(f"an interval without seeds needs at least 3 widths, got {widths}")
        stats = require("scipy.stats", "stats", "a power-law fit without seeds")
        fit = stats.linregress(log_w, [v.mean() for v in logs])
        half = stats.t.ppf(1 - alpha, len(widths) - 2) * fit.stderr
        low, high = slope - half, slope + half
        method = "least-squares t-interval"
    return PowerLaw(float(slope), float(math.exp(intercept)), float(low), float(high), confidence,
                    method, tuple(widths))
