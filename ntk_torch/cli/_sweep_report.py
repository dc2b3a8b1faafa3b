"""What ``ntk-torch sweep`` concludes from its records: accuracy gaps, fits, summary.md."""

from __future__ import annotations

import numpy as np

from ntk_torch import records as rec
from ntk_torch.sweeps import fit_power_law

PREDICTORS = ("network", "linearized", "kernel")


def accuracy_gaps(records: list[rec.Record]) -> list[rec.Record]:
    """Per run: test accuracy of the trained network minus the linearized one's / the kernel's."""
    accuracy = {(r.get("parameterization"), r["width"], r["seed"], r["predictor"]): r["value"]
                for r in rec.select(records, metric="test_accuracy")}
    return [{"width": w, "seed": s, "parameterization": p, "predictor": predictor,
             "metric": "accuracy_gap", "value": accuracy[(p, w, s, "network")] - value}
            for (p, w, s, predictor), value in accuracy.items() if predictor != "network"]


def _verdict(holds: bool) -> str:
    return "**holds**" if holds else "**does not hold**"


def _mean_gap(records: list[rec.Record], parameterization: str, width: int) -> tuple[float, float]:
    values = [r["value"] for r in rec.select(records, metric="accuracy_gap", predictor="linearized",
                                             parameterization=parameterization, width=width)]
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def conclusions(records: list[rec.Record]) -> list[str]:
    """The claims the sweep tests, each with its numbers and whether this run supports it.

    - NTK parameterization: the eNTK's relative error to its infinite-width limit falls as
      ``width^(-1/2)``: the 95% interval of the fitted slope contains −½.
    - μP: the kernel drift over training is flat in width (the slope's interval contains
      0), while under the NTK parameterization it falls (lazy training).
    - The trained network's test accuracy minus its linearization's: negative at the
      narrowest width under NTK and standard parameterizations, positive under μP
      (feature learning), and closing with width in all three.
    """
    lines = []
    groups = rec.unique(records, "parameterization")

    def fit(metric: str, parameterization: str, **where):
        chosen = [r for r in rec.select(records, metric=metric, parameterization=parameterization,
                                        **where) if r["value"] > 0]
        return fit_power_law(chosen, metric) if len({r["width"] for r in chosen}) >= 3 else None

    error = fit("ntk_error", "ntk") if "ntk" in groups else None
    if error is not None:
        lines.append(f"- NTK parameterization, eNTK error ∝ width^(−½): slope "
                     f"{error.exponent:+.3f}, "
                     f"95% interval [{error.low:+.3f}, {error.high:+.3f}] "
                     f"({min(error.widths)}–{max(error.widths)}): "
                     f"{_verdict(error.low <= -0.5 <= error.high)}")
    drift = fit("kernel_relative_change", "mup", layer="total") if "mup" in groups else None
    if drift is not None:
        lazy = fit("kernel_relative_change", "ntk", layer="total") if "ntk" in groups else None
        contrast = f" (NTK parameterization: {lazy.exponent:+.3f})" if lazy is not None else ""
        lines.append(f"- μP kernel drift flat in width: slope {drift.exponent:+.3f}, 95% interval "
                     f"[{drift.low:+.3f}, {drift.high:+.3f}]{contrast}: "
                     f"{_verdict(drift.low <= 0 <= drift.high)}")
    gap_widths = sorted(rec.unique(rec.select(records, metric="accuracy_gap"), "width"))
    for p in groups if len(gap_widths) >= 2 else ():
        if p not in ("ntk", "standard", "mup"):
            continue
        (narrow, narrow_std), (wide, wide_std) = (_mean_gap(records, p, w)
                                                  for w in (gap_widths[0], gap_widths[-1]))
        sign = narrow > 0 if p == "mup" else narrow < 0
        expected = "above" if p == "mup" else "below"
        lines.append(f"- {p}: network − linearized test accuracy {narrow:+.3f} ± {narrow_std:.3f} "
                     f"at width {gap_widths[0]}, {wide:+.3f} ± {wide_std:.3f} at width "
                     f"{gap_widths[-1]}: {expected} zero when narrow and closing with width, "
                     f"{_verdict(sign and abs(wide) < abs(narrow))}")
    return lines


def _power_laws(records: list[rec.Record]) -> list[str]:
    lines = ["## Power laws `metric ∝ width^slope` (95% interval: seed bootstrap, or t-interval "
             "for per-width metrics)", "",
             "| parameterization | metric | layer | slope | 95% interval | widths |",
             "|---|---|---|---|---|---|"]
    wanted = [("ntk_error", None), ("ntk_fluctuation", None), ("ntk_bias", None),
              ("kernel_relative_change", "total"), ("weight_relative_change", "total")]
    layers = rec.unique(rec.select(records, metric="feature_relative_change"), "layer")
    wanted += [("feature_relative_change", layer) for layer in layers]
    for p in rec.unique(records, "parameterization"):
        for metric, layer in wanted:
            where = {"parameterization": p} | ({"layer": layer} if layer is not None else {})
            chosen = [r for r in rec.select(records, metric=metric, **where) if r["value"] > 0]
            if len({r["width"] for r in chosen}) < 3:
                continue
            fit = fit_power_law(chosen, metric)
            lines.append(f"| {p} | {metric} | {layer or ''} | {fit.exponent:+.3f} | "
                         f"[{fit.low:+.3f}, {fit.high:+.3f}] | "
                         f"{min(fit.widths)}–{max(fit.widths)} |")
    return lines


def _accuracies(records: list[rec.Record]) -> list[str]:
    accuracies = rec.select(records, metric="test_accuracy")
    if not accuracies:
        return []
    lines = ["", "## Test accuracy after training (mean over seeds)", "",
             "| parameterization | width | network | linearized | infinite-width NTK |",
             "|---|---|---|---|---|"]
    for p in rec.unique(records, "parameterization"):
        for w in sorted(rec.unique(rec.select(accuracies, parameterization=p), "width")):
            cells = []
            for predictor in PREDICTORS:
                values = [r["value"] for r in rec.select(accuracies, parameterization=p, width=w,
                                                         predictor=predictor)]
                cells.append(f"{np.mean(values):.3f}" if values else "–")
            lines.append(f"| {p} | {w} | " + " | ".join(cells) + " |")
    gap_widths = sorted(rec.unique(rec.select(records, metric="accuracy_gap"), "width"))
    if gap_widths:
        lines += ["", "## Feature-learning effect: test accuracy of the network minus the "
                  "linearized network's (mean ± std over seeds)", "",
                  "| parameterization | " + " | ".join(map(str, gap_widths)) + " |",
                  "|---|" + "---|" * len(gap_widths)]
        for p in rec.unique(records, "parameterization"):
            cells = [_mean_gap(records, p, w) for w in gap_widths]
            lines.append(f"| {p} | " + " | ".join(f"{m:+.3f} ± {s:.3f}" for m, s in cells) + " |")
    return lines


def summarize(records: list[rec.Record], command: str) -> str:
    """``summary.md``: the command, the conclusions, power-law fits and accuracy tables."""
    lines = ["# Width sweep summary", "", f"Command: `{command}`", ""]
    found = conclusions(records)
    if found:
        lines += ["## Conclusions", "", *found, ""]
    lines += _power_laws(records) + _accuracies(records)
    return "\n".join(lines) + "\n"
