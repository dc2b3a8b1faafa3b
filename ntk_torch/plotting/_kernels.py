"""Figures of kernel matrices: heat maps, spectra, eigenmodes."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ntk_torch.plotting._canvas import array, new_figure, save


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

    values, vectors = modes
    xs, vec, lam = array(x), array(vectors), array(values)
    if xs.ndim == 2 and xs.shape[1] == 1:
        xs = xs[:, 0]
    if vec.ndim == 3 and vec.shape[1] == 1:
        vec = vec[:, 0, :]
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
    fig = new_figure((11, 4))
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
    return save(fig, path)



def plot_kernel_matrices(kernels: Mapping[str, Any], path: str | os.PathLike, *,
                         labels: Any = None, normalise: bool = True,
                         title: str | None = None) -> Path:
    """Heat maps of ``(N, N)`` kernels side by side, e.g. the total and each layer's.

    With ``normalise``, each kernel is drawn as the cosine ``K_ij / sqrt(K_ii K_jj)``: the
    raw diagonal would swamp the structure between samples. With ``labels`` (sorted, as
    from ``load_digits(sort_by_label=True)``) lines separate the classes.

    Args:
        kernels: ``{name: (N, N) tensor or array}``, one panel each.
        path: the PNG to write (parent folders are created).
        labels: ``(N,)`` class of each sample, or None.
        normalise: draw the cosine kernel instead of ``K``.
        title: figure title.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Example:
        >>> import os, tempfile, torch
        >>> x = torch.randn(6, 3)
        >>> k = {"linear": x @ x.T, "squared": (x @ x.T) ** 2}
        >>> path = plot_kernel_matrices(k, os.path.join(tempfile.mkdtemp(), "k.png"))
        >>> path.stat().st_size > 0
        True
    """
    import numpy as np

    matrices = {name: array(k) for name, k in kernels.items()}
    for name, k in matrices.items():
        if k.ndim != 2 or k.shape[0] != k.shape[1]:
            raise ValueError(f"`kernels[{name!r}]` must be an (N, N) matrix, got shape {k.shape}")
    if not matrices:
        raise ValueError("`kernels` is empty: expected at least one (N, N) matrix")
    fig = new_figure((3.2 * len(matrices), 3.4))
    axes = fig.subplots(1, len(matrices), squeeze=False)[0]
    boundaries = [] if labels is None else np.flatnonzero(np.diff(array(labels))) + 0.5
    for ax, (name, k) in zip(axes, matrices.items()):
        if normalise:
            d = np.sqrt(np.clip(np.diag(k), np.finfo(float).tiny, None))
            k = k / d[:, None] / d[None, :]
        image = ax.imshow(k, cmap="viridis")
        for b in boundaries:
            ax.axhline(b, color="white", lw=0.3)
            ax.axvline(b, color="white", lw=0.3)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(image, ax=ax, fraction=0.046)
    what = "K_ij / sqrt(K_ii K_jj)" if normalise else "K_ij"
    fig.suptitle(f"{title or 'kernels'} ({what})")
    return save(fig, path)


def plot_spectra(spectra: Mapping[str, Any], path: str | os.PathLike, *,
                 title: str | None = None) -> Path:
    """Eigenvalues against rank, log-log, one line per kernel (``"total"`` drawn thicker).

    Args:
        spectra: ``{name: (N,) eigenvalues}`` in descending order; non-positive ones are
            not drawn.
        path: the PNG to write (parent folders are created).
        title: figure title.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Example:
        >>> import os, tempfile, torch
        >>> s = {"total": torch.tensor([4.0, 2.0, 1.0]), "layer 0": torch.tensor([2.0, 1.0, 0.0])}
        >>> plot_spectra(s, os.path.join(tempfile.mkdtemp(), "s.png")).stat().st_size > 0
        True
    """
    import numpy as np

    fig = new_figure((5, 3.6))
    ax = fig.subplots()
    for name, values in spectra.items():
        s = array(values)
        if s.ndim != 1:
            raise ValueError(f"`spectra[{name!r}]` must be (N,) eigenvalues, got shape {s.shape}")
        s = s[s > 0]
        ax.loglog(np.arange(1, len(s) + 1), s, label=name, lw=2 if name == "total" else 1)
    ax.set_xlabel("rank")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title or "spectrum")
    ax.legend(fontsize=8)
    return save(fig, path)
