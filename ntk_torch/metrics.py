"""Similarity and change measures for kernels and features: pure functions on tensors.

Kernels may come in any of :func:`ntk_torch.empirical_ntk`'s three shapes, and each
function treats them as one symmetric matrix (``N`` samples, ``O`` outputs):

- trace ``(N, N)``: the matrix itself;
- full ``(N, N, O, O)``: the ``(N·O, N·O)`` matrix ``M[(a, i), (b, j)] = K[a, b, i, j]``;
- diagonal ``(N, N, O)``: the same ``(N·O, N·O)`` matrix with its cross-output entries
  (``i ≠ j``) zero, i.e. ``O`` blocks ``K[:, :, i]`` on the diagonal.

Frobenius inner products and norms are unchanged by this reshaping, so
:func:`kernel_distance` and :func:`relative_change` simply sum over every entry; the
views matter for :func:`spectrum`, :func:`effective_rank` and the target matrix of
:func:`kernel_alignment`. Scalars are returned as 0-d tensors in the inputs' dtype.
A kernel of zero norm has no direction, so measures that divide by its norm return NaN
(``0/0``) rather than raising: a dead network mid-training should not stop a tracker.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from ntk_torch import _kernel_matrix
from ntk_torch._checks import check_int, check_kernel, check_tensor, describe

__all__ = [
    "as_matrix",
    "effective_rank",
    "kernel_alignment",
    "kernel_distance",
    "linear_cka",
    "relative_change",
    "spectrum",
]


def _check_square_kernel(name: str, k: object) -> torch.Tensor:
    # NaN entries are measured, not refused: a tracker records a diverged run's NaNs.
    return check_kernel(name, k, diagonal=True, square=True, finite=False)


def _check_same_shape(name1: str, a: torch.Tensor, name2: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"`{name2}` must have `{name1}`'s shape {tuple(a.shape)}, got {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"`{name2}` must be on `{name1}`'s device {a.device}, got {b.device}")


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # 0/0 and x/0 become NaN on purpose (documented in the module docstring).
    safe = den.clamp_min(torch.finfo(den.dtype).tiny)
    return torch.where(den > 0, num / safe, den.new_tensor(math.nan))


def as_matrix(k: torch.Tensor) -> torch.Tensor:
    """The ``(N·O, N·O)`` matrix view of a kernel (``(N, N)`` is returned as it is).

    Args:
        k: ``(N, N)``, ``(N, N, O)`` (diagonal: cross-output blocks are zero) or
            ``(N, N, O, O)``.

    Returns:
        ``(N, N)`` or ``(N·O, N·O)`` with ``M[a·O + i, b·O + j] = K[a, b, i, j]``.

    Example:
        >>> import torch
        >>> as_matrix(torch.ones(2, 2, 3)).shape
        torch.Size([6, 6])
    """
    return _kernel_matrix.as_matrix(_check_square_kernel("k", k))


def kernel_distance(k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
    """Cosine distance between two kernels (Fort et al. 2020).

    ``d(K1, K2) = 1 − ⟨K1, K2⟩_F / (‖K1‖_F ‖K2‖_F)``: 0 when one kernel is a positive
    multiple of the other, 1 when they are orthogonal; scale-free, so a kernel that only
    grows (as in standard parameterization) has distance 0 from its start. Computed as
    ``½ ‖K1/‖K1‖_F − K2/‖K2‖_F‖_F²``, the same number without the cancellation of
    ``1 − cos`` (exactly 0 for identical kernels, accurate for tiny drifts).

    Args:
        k1: kernel ``(N, N)``, ``(N, N, O)`` or ``(N, N, O, O)`` (any tensor works; the
            Frobenius product is over every entry).
        k2: a tensor of ``k1``'s shape.

    Returns:
        0-d tensor in ``[0, 2]``; NaN if either kernel is zero.

    Example:
        >>> import torch
        >>> k = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
        >>> round(float(kernel_distance(k, 3 * k)), 6)
        0.0
        >>> round(float(kernel_distance(torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))), 6)
        1.0
    """
    k1 = check_tensor("k1", k1)
    k2 = check_tensor("k2", k2)
    _check_same_shape("k1", k1, "k2", k2)
    # 1 − cos = ½‖K1/‖K1‖ − K2/‖K2‖‖²: no cancellation, so small drifts keep their digits
    # (in float32, 1 − cos would bottom out near 1e-7) and identical kernels give exactly 0.
    n1, n2 = k1.norm(), k2.norm()
    if not (n1 > 0 and n2 > 0):
        return k1.new_tensor(math.nan)
    return (k1 / n1 - k2 / n2).square().sum() / 2


def relative_change(current: torch.Tensor | Sequence[torch.Tensor],
                    reference: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Relative Frobenius change ``‖X_t − X_0‖_F / ‖X_0‖_F``.

    Used for kernels (``K_t`` against ``K_0``), features ``(N, D)`` and weights alike. A
    sequence of tensors is one vector made of all their entries (the parameters of a
    layer or a model): ``sqrt(Σ_i ‖X_t^i − X_0^i‖²) / sqrt(Σ_i ‖X_0^i‖²)``, its sums
    accumulated in float64 without concatenating the tensors.

    Args:
        current: ``X_t``, a tensor of any shape or a sequence of them.
        reference: ``X_0``, shaped like ``current`` (tensor by tensor).

    Returns:
        0-d tensor ``≥ 0`` in the inputs' dtype; NaN if ``reference`` is zero.

    Example:
        >>> import torch
        >>> relative_change(torch.tensor([3.0, 5.0]), torch.tensor([0.0, 5.0]))
        tensor(0.6000)
        >>> relative_change([torch.tensor([3.0]), torch.tensor([5.0])],
        ...                 [torch.tensor([0.0]), torch.tensor([5.0])])
        tensor(0.6000)
    """
    if isinstance(current, torch.Tensor) or isinstance(reference, torch.Tensor):
        current = check_tensor("current", current)
        reference = check_tensor("reference", reference)
        _check_same_shape("reference", reference, "current", current)
        return _ratio((current - reference).norm(), reference.norm())
    currents, references = list(current), list(reference)
    if not currents or len(currents) != len(references):
        raise ValueError(f"`current` and `reference` must be tensors or equally long, non-empty "
                         f"sequences of tensors, got {len(currents)} and {len(references)}")
    change = reference_norm = torch.zeros((), dtype=torch.float64)
    for i, (now, then) in enumerate(zip(currents, references)):
        now, then = check_tensor(f"current[{i}]", now), check_tensor(f"reference[{i}]", then)
        _check_same_shape(f"reference[{i}]", then, f"current[{i}]", now)
        change = change.to(now.device) + (now.double() - then.double()).square().sum()
        reference_norm = reference_norm.to(now.device) + then.double().square().sum()
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in currents + references))
    return _ratio(change.sqrt(), reference_norm.sqrt()).to(dtype)


def _center(k: torch.Tensor) -> torch.Tensor:
    """``H K H`` over the two sample axes, ``H = I − 11ᵀ/N`` (per output pair)."""
    k = k - k.mean(dim=0, keepdim=True)
    return k - k.mean(dim=1, keepdim=True)


def _targets(y: object, n: int, n_out: int | None, like: torch.Tensor) -> torch.Tensor:
    """Targets as a float ``(N, C)`` matrix; integer ``(N,)`` labels become one-hot."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"`y` must be a torch.Tensor of shape (N,) or (N, C), got {describe(y)}")
    if y.dim() not in (1, 2) or y.shape[0] != n:
        raise ValueError(
            f"`y` must have shape (N,) or (N, C) with N = {n} as in `k`, got {tuple(y.shape)}")
    if y.device != like.device:
        raise ValueError(f"`y` must be on `k`'s device {like.device}, got {y.device}")
    if y.is_floating_point():
        return (y[:, None] if y.dim() == 1 else y).to(like.dtype)
    if y.dtype == torch.bool or y.dim() != 1:
        raise TypeError(
            f"`y` must be float targets (N,) / (N, C) or integer class labels (N,), "
            f"got dtype {y.dtype} and shape {tuple(y.shape)}"
        )
    if n and int(y.min()) < 0:
        raise ValueError(f"`y` class labels must be >= 0, got {int(y.min())}")
    classes = int(y.max()) + 1 if n else 1
    if n_out is not None:
        if classes > n_out:
            raise ValueError(
                f"`y` has class label {classes - 1} but the kernel has only O = {n_out} outputs"
            )
        classes = n_out
    return torch.nn.functional.one_hot(y, classes).to(like.dtype)


def kernel_alignment(k: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Centred kernel-target alignment (Cortes, Mohri & Rostamizadeh 2012).

    ``A(K, y) = ⟨K_c, Y_c⟩_F / (‖K_c‖_F ‖Y_c‖_F)`` with ``K_c = H K H``,
    ``H = I_N − 11ᵀ/N`` acting on the sample axes and the target kernel ``Y`` built in
    ``k``'s layout from targets ``y`` ``(N, C)``:

    - trace ``(N, N)``: ``Y = y yᵀ`` (any ``C``);
    - full ``(N, N, O, O)``: ``Y[a, b, i, j] = y[a, i] y[b, j]``, i.e. ``vec(y) vec(y)ᵀ``
      in the ``(N·O, N·O)`` view (needs ``C = O``);
    - diagonal ``(N, N, O)``: ``Y[a, b, i] = y[a, i] y[b, i]`` (needs ``C = O``).

    In every layout ``A = 1`` exactly when ``K_c`` is a positive multiple of ``Y_c``.

    Args:
        k: kernel ``(N, N)``, ``(N, N, O)`` or ``(N, N, O, O)``.
        y: real targets ``(N,)`` or ``(N, C)`` (e.g. one-hot), or integer class labels
            ``(N,)``, which are one-hot encoded (with ``O`` classes for full/diagonal).

    Returns:
        0-d tensor in ``[-1, 1]``; NaN if the centred kernel is zero.

    Raises:
        ValueError: if ``y`` is the same for every sample (``Y_c = 0``: no target to align to).

    Example:
        >>> import torch
        >>> y = torch.tensor([1.0, -2.0, 0.5, 3.0])
        >>> kernel_alignment(torch.outer(y, y), y)
        tensor(1.)
    """
    k = _check_square_kernel("k", k)
    n = k.shape[0]
    targets = _targets(y, n, None if k.dim() == 2 else k.shape[2], k)
    if k.dim() > 2 and targets.shape[1] != k.shape[2]:
        raise ValueError(
            f"`y` must have C = O = {k.shape[2]} columns for a kernel of shape {tuple(k.shape)}, "
            f"got {targets.shape[1]}"
        )
    # Centring y's rows once centres Y on both sample axes: H y yᵀ H = (Hy)(Hy)ᵀ.
    yc = targets - targets.mean(dim=0, keepdim=True)
    if not bool((yc != 0).any()):
        raise ValueError("`y` is the same for every sample, so the centred alignment is undefined")
    if k.dim() == 2:
        target = yc @ yc.T
    elif k.dim() == 3:
        target = torch.einsum("ai,bi->abi", yc, yc)
    else:
        target = torch.einsum("ai,bj->abij", yc, yc)
    kc = _center(k)
    return _ratio((kc * target).sum(), kc.norm() * target.norm())


def linear_cka(h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    """Linear centred kernel alignment of two feature matrices (Kornblith et al. 2019).

    With column-centred features ``X = H h1`` ``(N, D1)`` and ``Z = H h2`` ``(N, D2)``:
    ``CKA = ‖Zᵀ X‖_F² / (‖Xᵀ X‖_F ‖Zᵀ Z‖_F)``, equal to the centred alignment of the Gram
    matrices ``X Xᵀ`` and ``Z Zᵀ``. It is 1 when ``h2`` is an orthogonal transform of
    ``h1`` times a scalar (plus a constant offset); for one-dimensional features it is the
    squared Pearson correlation.

    Args:
        h1: features ``(N, D1)``; higher-dimensional ``(N, ...)`` are flattened per sample.
        h2: features ``(N, D2)`` of the same ``N`` samples.

    Returns:
        0-d tensor in ``[0, 1]``; NaN if either centred feature matrix is zero.

    Example:
        >>> import torch
        >>> h = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
        >>> q = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])  # a rotation
        >>> (linear_cka(h, 5 * h @ q + 7) - 1).abs() < 1e-6
        tensor(True)
    """
    h1 = check_tensor("h1", h1)
    h2 = check_tensor("h2", h2)
    if h1.dim() < 1 or h2.dim() < 1 or h1.shape[0] != h2.shape[0]:
        raise ValueError(
            f"`h1` and `h2` must be features (N, ...) of the same N samples, "
            f"got shapes {tuple(h1.shape)} and {tuple(h2.shape)}"
        )
    if h1.device != h2.device:
        raise ValueError(f"`h2` must be on `h1`'s device {h1.device}, got {h2.device}")
    dtype = torch.promote_types(h1.dtype, h2.dtype)
    x = h1.reshape(h1.shape[0], -1).to(dtype)
    z = h2.reshape(h2.shape[0], -1).to(dtype)
    x = x - x.mean(dim=0, keepdim=True)
    z = z - z.mean(dim=0, keepdim=True)
    n, d1, d2 = x.shape[0], x.shape[1], z.shape[1]
    # Same number either way; pick the cheaper of D1·D2 feature products or N² Grams.
    if d1 * d2 + d1 * d1 + d2 * d2 <= n * n:
        cross = (z.T @ x).square().sum()
        return _ratio(cross, (x.T @ x).norm() * (z.T @ z).norm())
    gx, gz = x @ x.T, z @ z.T
    return _ratio((gx * gz).sum(), gx.norm() * gz.norm())


def spectrum(k: torch.Tensor, num: int | None = None) -> torch.Tensor:
    """The ``num`` largest eigenvalues of a kernel, in descending order.

    Eigenvalues of the symmetric matrix view (``(N, N)`` or ``(N·O, N·O)``; see the module
    docstring), after symmetrising ``(M + Mᵀ)/2`` so rounding cannot make them complex.

    Args:
        k: kernel ``(N, N)``, ``(N, N, O)`` or ``(N, N, O, O)``.
        num: how many; ``None`` for all ``N`` (or ``N·O``). Must not exceed that size.

    Returns:
        ``(num,)``, largest first.

    Example:
        >>> import torch
        >>> spectrum(torch.tensor([[2.0, 1.0], [1.0, 2.0]]), 2)
        tensor([3., 1.])
    """
    k = _check_square_kernel("k", k)
    size = k.shape[0] * (1 if k.dim() == 2 else k.shape[2])
    num = check_int("num", num, low=1, high=size, optional=True)
    values = _kernel_matrix.eigenvalues(k)
    return values if num is None else values[:num]


def effective_rank(k: torch.Tensor) -> torch.Tensor:
    """Effective rank of a kernel (Roy & Vetterli 2007): ``exp`` of the spectral entropy.

    With eigenvalues ``λ_i`` of the matrix view clipped at 0 (negative ones are rounding of
    a positive semi-definite kernel) and ``p_i = λ_i / Σ_j λ_j``:
    ``erank(K) = exp(−Σ_i p_i log p_i)`` (``0 log 0 = 0``). It lies in ``[1, rank K]``,
    equals ``r`` for ``r`` equal non-zero eigenvalues, and is invariant to scaling.

    Args:
        k: kernel ``(N, N)``, ``(N, N, O)`` or ``(N, N, O, O)``.

    Returns:
        0-d tensor; NaN for a zero kernel.

    Example:
        >>> import torch
        >>> effective_rank(torch.diag(torch.tensor([5.0, 5.0, 5.0, 0.0])))
        tensor(3.)
    """
    k = _check_square_kernel("k", k)
    values = _kernel_matrix.eigenvalues(k).clamp_min(0)
    p = _ratio(values, values.sum())
    entropy = -torch.special.xlogy(p, p).sum()
    return entropy.exp()
