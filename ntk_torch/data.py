"""The real data set of the programs: scikit-learn's bundled 8×8 digits (no download).

scikit-learn comes with the ``data`` extra (``pip install 'ntk_torch[data]'``) and is
imported when the digits are loaded, not with the package.
"""

from __future__ import annotations

import numpy as np
import torch

from ntk_torch._extras import require

DIGITS = 1797
"""Images in the digits data set."""


def load_digits(samples: int | None = None, *, seed: int = 0, sort_by_label: bool = False,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as ``x (N, 64)`` on the sphere of radius √64 and labels ``y (N,)``.

    Pixels (0..16) are centred by their mean over the whole data set and each image is
    scaled to squared norm 64, so that ``x·x' / 64`` is a correlation in ``[-1, 1]`` — the
    input normalisation under which infinite-width kernels are usually compared.

    Args:
        samples: a random subset of this many images (``None``: all 1,797).
        seed: seed of the subset.
        sort_by_label: order the subset by digit, so kernel heat maps show class blocks.
        dtype: floating dtype of ``x``.

    Example:
        >>> x, y = load_digits(10, seed=1)
        >>> x.shape, y.shape, round(float(x[0] @ x[0]), 3)
        (torch.Size([10, 64]), torch.Size([10]), 64.0)
    """
    data = require("sklearn.datasets", "data", "the digits data set").load_digits()
    pixels = data.data - data.data.mean(0)
    pixels *= np.sqrt(pixels.shape[1]) / np.linalg.norm(pixels, axis=1, keepdims=True)
    idx = np.arange(len(data.target))
    if samples is not None:
        if not 1 <= samples <= len(idx):
            raise ValueError(f"`samples` must be between 1 and {len(idx)}, got {samples}")
        idx = np.random.default_rng(seed).choice(idx, size=samples, replace=False)
    if sort_by_label:
        idx = idx[np.argsort(data.target[idx], kind="stable")]
    return torch.tensor(pixels[idx], dtype=dtype), torch.tensor(data.target[idx])


def one_hot(y: torch.Tensor, classes: int = 10, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(N, classes)`` one-hot targets for MSE training."""
    return torch.nn.functional.one_hot(y.long(), classes).to(dtype)
