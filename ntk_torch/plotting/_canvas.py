"""The canvas every figure is drawn on: a matplotlib Figure on Agg, never pyplot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ntk_torch._extras import require


def new_figure(size: tuple[float, float]) -> Any:
    """A constrained-layout Figure; matplotlib (the ``plot`` extra) is imported here."""
    require("matplotlib", "plot", "plotting")
    from matplotlib.figure import Figure


    return Figure(figsize=size, layout="constrained")


def save(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Draw ``fig`` on an Agg canvas into the PNG ``path`` (parent folders are created)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)
    return path


def array(values: Any) -> Any:
    """A float numpy array of a tensor (any device, with or without grad) or array-like."""
    import numpy as np

    if hasattr(values, "detach"):
        values = values.detach().cpu()
    return np.asarray(values, dtype=float)
