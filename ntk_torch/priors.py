"""A kernel matrix as a Gaussian-process prior over labellings.

Kernels are trace ``(N, N)`` (labels ``(N,)`` or ``(N, C)``, each column an independent
draw from the same prior) or full ``(N, N, O, O)`` (labels ``(N, O)``), read as matrices as
in :mod:`ntk_torch.spectral`. To condition on observed labels see
:func:`ntk_torch.conditional`.
"""

from __future__ import annotations

import math

import torch

from ntk_torch._checks import check_kernel, check_number
from ntk_torch._kernel_matrix import Targets, as_matrix, n_out_of, null_mask, symmetric_eigh

__all__ = ["prior_logprob"]


def prior_logprob(k: torch.Tensor, y: torch.Tensor, *, jitter: float = 0.0) -> torch.Tensor:
    """Log density of labels under the Gaussian-process prior ``y ~ N(0, K + jitter·I)``.

    Through ``K = V diag(λ) Vᵀ`` with ``μ_j = λ_j + jitter``:

        log p(y) = -½ Σ_j (v_jᵀ y)² / μ_j - ½ Σ_j log μ_j - (n/2) log 2π,

    so a labelling is likely when its weight sits on the leading eigenmodes. Comparing
    candidate test labels this way is :func:`ntk_torch.conditional` in disguise: the best
    candidate is the conditional mean.

    Args:
        k: symmetric PSD kernel ``(N, N)`` or ``(N, N, O, O)``.
        y: labels ``(N,)`` or ``(N, C)`` for a trace kernel (columns independent, their log
            densities summed), ``(N, O)`` for a full one.
        jitter: added to the diagonal. A kernel singular to working precision
            (``μ_min ≤ n·eps·λ_max``) has no density: raise ``jitter``.

    Returns:
        Scalar tensor in the kernel's dtype.

    Example:
        With ``K = I`` the labels are independent standard normals:

        >>> import math, torch, ntk_torch as nt
        >>> lp = nt.prior_logprob(torch.eye(3, dtype=torch.float64), torch.tensor([1.0, 0.0, -1.0]))
        >>> round(lp.item(), 6) == round(-1.0 - 1.5 * math.log(2 * math.pi), 6)
        True
    """
    k = check_kernel("k", k, square=True)
    jitter = check_number("jitter", jitter)
    _, rhs = Targets.read("y", y, k.shape[0], n_out_of(k), k)
    values, vectors = symmetric_eigh("k", as_matrix(k), psd=True)
    shifted = values + jitter
    n = shifted.numel()
    if n and (null_mask(shifted) | (shifted <= 0)).any():
        low, high = float(shifted.min()), float(shifted.max())
        raise ValueError(f"`k` + jitter·I is singular to working precision (smallest eigenvalue "
                         f"{low:.3g}, largest {high:.3g}) and has no density; pass jitter > 0, "
                         f"e.g. jitter={1e-6 * high:.2g}")
    coefficients = vectors.T @ rhs  # (n, C)
    columns = rhs.shape[1]
    quadratic = (coefficients.pow(2) / shifted[:, None]).sum()
    return -0.5 * (quadratic + columns * (shifted.log().sum() + n * math.log(2 * math.pi)))
