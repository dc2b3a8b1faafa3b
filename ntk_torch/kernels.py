"""A kernel matrix as a Gaussian prior: eigenmodes, log densities, the natural-gradient NTK.

Kernels come in the package's two dense layouts: trace mode ``(N, N)``, one kernel shared
by every output, and full mode ``(N, N, O, O)``, read as the ``(N·O, N·O)`` matrix with
row ``a·O + i`` for sample ``a`` and output ``i``. Labels are ``(N,)`` or ``(N, C)`` for a
trace kernel (each column an independent draw from the same prior) and ``(N, O)`` for a
full one (``(N,)`` when ``O = 1``).

Every function works from one symmetric eigendecomposition ``K = V diag(λ) Vᵀ``:
asymmetry beyond rounding and clearly negative eigenvalues are errors; the eigenvalues
that rounding pushes slightly below zero are clipped to zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ntk_torch._checks import _describe


# ----------------------------------------------------------------------------- plumbing
# Shared with ntk_torch.predict; kept here because this is the lower-level module.

def _check_kernel(k: object, name: str, *, rows: int | None = None, cols: int | None = None,
                 n_out: int | None = -1) -> torch.Tensor:
    """``k`` is a finite floating ``(R, C)`` or ``(R, C, O, O)`` tensor of the expected sizes.

    ``n_out=-1`` accepts either layout; ``None`` demands trace mode, an int full mode with
    that ``O``.
    """
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"`{name}` must be a kernel tensor of shape (N1, N2) or (N1, N2, O, O), "
                        f"got {_describe(k)}")
    if k.dim() == 3:
        raise ValueError(f"`{name}` has shape {tuple(k.shape)}, a diagonal-mode kernel; the "
                         "toolkit needs the trace (N1, N2) or the full (N1, N2, O, O) kernel "
                         "(mode='trace' or mode='full')")
    if k.dim() not in (2, 4):
        raise ValueError(f"`{name}` must have shape (N1, N2) or (N1, N2, O, O), "
                         f"got {tuple(k.shape)}")
    if k.dim() == 4 and k.shape[2] != k.shape[3]:
        raise ValueError(f"`{name}` must have shape (N1, N2, O, O) with equal output sizes, "
                         f"got {tuple(k.shape)}")
    if not k.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {k.dtype}")
    if n_out != -1:
        have = None if k.dim() == 2 else k.shape[2]
        if have != n_out:
            want = ("a trace-mode (N1, N2) kernel" if n_out is None
                    else f"a full (N1, N2, {n_out}, {n_out}) kernel")
            raise ValueError(f"`{name}` must be {want} like the training kernel, "
                             f"got shape {tuple(k.shape)}")
    for size, axis, label in ((rows, 0, "rows"), (cols, 1, "columns")):
        if size is not None and k.shape[axis] != size:
            raise ValueError(f"`{name}` must have {size} {label} (dimension {axis}) to match "
                             f"the other arguments, got shape {tuple(k.shape)}")
    if not torch.isfinite(k).all():
        bad = int((~torch.isfinite(k)).sum())
        raise ValueError(f"`{name}` has {bad} non-finite entries (NaN/inf)")
    return k


def _check_like(name: str, x: torch.Tensor, reference: torch.Tensor, reference_name: str) -> None:
    if x.dtype != reference.dtype or x.device != reference.device:
        raise ValueError(f"`{name}` must have `{reference_name}`'s dtype {reference.dtype} and "
                         f"device {reference.device}, got {x.dtype} on {x.device}")


def _n_out_of(k: torch.Tensor) -> int | None:
    return None if k.dim() == 2 else k.shape[2]


def _flatten(k: torch.Tensor) -> torch.Tensor:
    """``(R, C)`` as is; ``(R, C, O, O)`` -> ``(R·O, C·O)`` with row ``a·O + i``."""
    if k.dim() == 2:
        return k
    r, c, o, _ = k.shape
    return k.permute(0, 2, 1, 3).reshape(r * o, c * o)


def _unflatten(m: torch.Tensor, rows: int, cols: int, n_out: int | None) -> torch.Tensor:
    if n_out is None:
        return m
    return m.reshape(rows, n_out, cols, n_out).permute(0, 2, 1, 3)


@dataclass(frozen=True)
class _Targets:
    """Labels as the right-hand side ``(R, C)`` of the flattened kernel, and back."""

    n_out: int | None
    vector: bool  # labels were given as (N,)

    @staticmethod
    def read(y: object, name: str, n: int, n_out: int | None,
             like: torch.Tensor) -> tuple[_Targets, torch.Tensor]:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"`{name}` must be a tensor of shape (N,) or (N, O), "
                            f"got {_describe(y)}")
        if n_out is None:
            expected = "(N,) or (N, C)"
        else:
            expected = f"(N, {n_out})" + (" or (N,)" if n_out == 1 else "")
        if y.dim() not in (1, 2) or y.shape[0] != n:
            raise ValueError(f"`{name}` must have shape {expected} with N = {n} to match the "
                             f"kernel, got {tuple(y.shape)}")
        fits_full = (y.dim() == 2 and y.shape[1] == n_out) or (y.dim() == 1 and n_out == 1)
        if n_out is not None and not fits_full:
            raise ValueError(f"`{name}` must have shape {expected} for a full kernel with "
                             f"O = {n_out}, got {tuple(y.shape)}")
        if y.device != like.device:
            raise ValueError(f"`{name}` must be on the kernel's device {like.device}, "
                             f"got {y.device}")
        y = y.to(like.dtype)
        if not torch.isfinite(y).all():
            raise ValueError(f"`{name}` has non-finite entries (NaN/inf)")
        layout = _Targets(n_out=n_out, vector=y.dim() == 1)
        rhs = y.reshape(-1, 1) if (n_out is not None or y.dim() == 1) else y
        return layout, rhs

    def write(self, m: torch.Tensor, rows: int) -> torch.Tensor:
        if self.vector:
            return m.reshape(rows)
        if self.n_out is not None:
            return m.reshape(rows, self.n_out)
        return m


def _tolerances(dtype: torch.dtype, n: int) -> tuple[float, float]:
    """``(rel_sym, rel_rank)``: the relative asymmetry / negative eigenvalue we accept as
    rounding (``√eps``: kernels computed as ``J Jᵀ`` in float32 carry errors of order
    ``eps·√P``), and the relative eigenvalue below which a direction counts as null
    (``n·eps``, the cutoff ``torch.linalg.pinv`` uses)."""
    eps = torch.finfo(dtype).eps
    return math.sqrt(eps), max(n, 1) * eps


def _check_symmetric(m: torch.Tensor, name: str) -> None:
    """A flattened kernel ``(n, n)`` equals its transpose up to ``√eps`` relative."""
    if m.shape[0] != m.shape[1]:
        raise ValueError(f"`{name}` must be square, got shape {tuple(m.shape)} after "
                         "flattening outputs")
    if m.numel() == 0:
        return
    rel_sym, _ = _tolerances(m.dtype, m.shape[0])
    asym, scale = (m - m.T).abs().max(), m.abs().max()
    if asym > rel_sym * scale:
        raise ValueError(f"`{name}` must be symmetric: max |K - Kᵀ| = {float(asym):.3g} "
                         f"against max |K| = {float(scale):.3g}; a kernel of one set of "
                         "inputs with itself is")


def _symmetric_eigh(m: torch.Tensor, name: str, *, psd: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ``(n,)`` ascending and eigenvectors ``(n, n)`` of a symmetric matrix.

    With ``psd=True`` eigenvalues below ``-√eps·λ_max`` are an error and the rest are
    clipped at zero.
    """
    n = m.shape[0]
    _check_symmetric(m, name)
    rel_sym, _ = _tolerances(m.dtype, n)
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    if psd and n:
        top = values[-1].clamp_min(0)
        if values[0] < -rel_sym * top or (top == 0 and values[0] < 0):
            raise ValueError(f"`{name}` must be positive semi-definite: its smallest eigenvalue is "
                             f"{float(values[0]):.3g} against the largest {float(values[-1]):.3g}; "
                             "a kernel matrix J Jᵀ has none below rounding")
        values = values.clamp_min(0)
    return values, vectors


def _null_mask(values: torch.Tensor) -> torch.Tensor:
    """Eigenvalues that count as zero: at most ``n·eps·λ_max``."""
    if values.numel() == 0:
        return values.bool()
    _, rel_rank = _tolerances(values.dtype, values.numel())
    return values <= rel_rank * values.max().clamp_min(0)


def _check_nonnegative(name: str, value: object, *, positive: bool = False,
                       allow_inf: bool = False) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TypeError(f"`{name}` must be a number, got {_describe(value)}")
    bad = value <= 0 if positive else value < 0
    if bad or (math.isinf(value) and not allow_inf):
        what = "positive" if positive else "non-negative"
        what += " (inf allowed)" if allow_inf else " and finite"
        raise ValueError(f"`{name}` must be {what}, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------- public

class Eigenmodes(NamedTuple):
    """Eigenvalues ``(n,)``, largest first, and unit eigenvectors: column ``j`` of
    ``(N, n)`` for a trace kernel, ``[:, :, j]`` of ``(N, O, n)`` for a full one
    (``n = N`` or ``N·O``)."""

    values: torch.Tensor
    vectors: torch.Tensor


def eigenmodes(kernel, k: int | None = None, *, tol: float = 1e-8, seed: int = 0) -> Eigenmodes:
    """Eigendecomposition ``K = Σ_j λ_j v_j v_jᵀ`` of a kernel matrix, largest ``λ`` first.

    Under gradient flow with kernel ``K`` the component of the residual along ``v_j``
    decays as ``exp(-η λ_j t)``: the leading modes are the functions the network fits first
    and, as a Gaussian-process prior, the ones it finds most likely.

    A tensor is decomposed densely (``torch.linalg.eigh``). A :class:`ntk_torch.KernelStore`
    is never loaded: its top ``k`` pairs come from block Lanczos with thick restarts, each
    iteration one streamed pass over the store (``_krylov.top_eigenpairs``; about 7 passes
    for ``k = 10`` on kernels whose spectrum decays like an NTK's).

    Args:
        kernel: symmetric kernel ``(N, N)`` or ``(N, N, O, O)`` of one set of inputs with
            itself, as a tensor or a store computed with ``x2=None``.
        k: how many leading pairs to return; all (``n = N`` or ``N·O``) by default for a
            tensor, required for a store.
        tol: for a store, the Ritz residual ``‖K v - λ v‖ ≤ tol·λ_max`` every returned pair
            reaches (each ``λ`` is then within ``tol·λ_max`` of an eigenvalue).
        seed: for a store, seeds the random start of the iteration.

    Returns:
        :class:`Eigenmodes` ``(values, vectors)``: ``values`` ``(k,)`` descending,
        ``vectors`` ``(N, k)`` (trace) or ``(N, O, k)`` (full), orthonormal over the
        flattened ``N·O`` entries. Each vector's sign is fixed so that its largest-magnitude
        entry is positive; within a repeated eigenvalue the basis is arbitrary.

    Example:
        >>> import torch, ntk_torch as nt
        >>> values, vectors = nt.eigenmodes(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
        >>> values
        tensor([3., 1.])
        >>> torch.allclose(vectors[:, 0], torch.tensor([1.0, 1.0]) / 2**0.5)
        True
    """
    from ntk_torch import _krylov, _operators

    if _operators.is_store(kernel):
        if kernel.mode == "diagonal":
            raise ValueError("`kernel` is a diagonal-mode store; eigenmodes need the trace or the "
                             "full kernel (mode='trace' or mode='full')")
        if k is None:
            raise ValueError("`k` (the number of leading eigenpairs) is required for a kernel "
                             "store, e.g. nt.eigenmodes(store, k=10)")
        op = _operators.StoreOperator(kernel, "kernel")
        values, vectors, _ = _krylov.top_eigenpairs(op, k, tol=tol, seed=seed)
        values, vectors = values.to(kernel.dtype), vectors.to(kernel.dtype)
        n_out = op.n_out
        n = op.n_samples
    else:
        kernel = _check_kernel(kernel, "kernel")
        n_out = _n_out_of(kernel)
        n = kernel.shape[0]
        if kernel.shape[0] != kernel.shape[1]:
            raise ValueError(f"`kernel` must be square in its samples, got shape {tuple(kernel.shape)}")
        values, vectors = _symmetric_eigh(_flatten(kernel), "kernel", psd=False)
        size = values.numel()
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= size):
            raise ValueError(f"`k` must be an int with 1 ≤ k ≤ {size} (the kernel's size), got {k!r}")
        values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
        if vectors.numel():
            vectors = _krylov.sign_fixed(vectors)
    if n_out is not None:
        vectors = vectors.reshape(n, n_out, -1)
    return Eigenmodes(values, vectors)


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
    k = _check_kernel(k, "k")
    jitter = _check_nonnegative("jitter", jitter)
    if k.shape[0] != k.shape[1]:
        raise ValueError(f"`k` must be square in its samples, got shape {tuple(k.shape)}")
    _, rhs = _Targets.read(y, "y", k.shape[0], _n_out_of(k), k)
    values, vectors = _symmetric_eigh(_flatten(k), "k", psd=True)
    shifted = values + jitter
    n = shifted.numel()
    if n and (_null_mask(shifted) | (shifted <= 0)).any():
        low, high = float(shifted.min()), float(shifted.max())
        raise ValueError(f"`k` + jitter·I is singular to working precision (smallest eigenvalue "
                         f"{low:.3g}, largest {high:.3g}) and has no density; pass jitter > 0, "
                         f"e.g. jitter={1e-6 * high:.2g}")
    coefficients = vectors.T @ rhs  # (n, C)
    columns = rhs.shape[1]
    quadratic = (coefficients.pow(2) / shifted[:, None]).sum()
    return -0.5 * (quadratic + columns * (shifted.log().sum() + n * math.log(2 * math.pi)))


def natural_ntk(k: torch.Tensor, *, damping: float) -> torch.Tensor:
    """The NTK of natural gradient descent: ``J (JᵀJ + λI)⁻¹ Jᵀ = K (K + λI)⁻¹``.

    Natural gradient flow ``dθ/dt = -η G⁻¹ ∇L`` with the Gauss–Newton / Fisher metric
    moves the training outputs by ``df/dt = -η J G⁻¹ Jᵀ ∂L/∂f``. For the Gaussian
    likelihood with noise variance ``σ²`` and the summed Fisher ``G = JᵀJ/σ² + λ'I``, and
    the loss ``L = Σ ½‖f - y‖²/σ²`` (the negative log likelihood), the push-through
    identity ``(JᵀJ + λI)⁻¹Jᵀ = Jᵀ(JJᵀ + λI)⁻¹`` gives
    ``df/dt = -η K(K + λI)⁻¹ (f - y)`` with ``λ = σ²λ'``: this function with
    ``damping = σ²λ'``. Other normalisations only rescale: a Fisher averaged over ``N``
    samples (``G = JᵀJ/(Nσ²)``) with the loss ``½Σ‖f - y‖²`` multiplies the kernel by
    ``Nσ²`` (and ``damping = Nσ²λ'``).

    When ``J`` has full row rank (an overparameterized net, ``P ≥ N·O``) the result tends
    to the identity as ``λ → 0``: every training residual decays at the same rate, the
    architecture's inductive bias on the training set is gone. With ``damping = 0`` the
    result is the projector onto the range of ``K``.

    Args:
        k: symmetric PSD kernel ``(N, N)`` or ``(N, N, O, O)`` of the training inputs.
        damping: ``λ ≥ 0``, in the kernel's units.

    Returns:
        Same shape as ``k``: symmetric, eigenvalues ``λ_j / (λ_j + damping)`` in ``[0, 1]``.

    Example:
        >>> import torch, ntk_torch as nt
        >>> nt.natural_ntk(torch.tensor([[3.0, 0.0], [0.0, 1.0]]), damping=1.0)
        tensor([[0.7500, 0.0000],
                [0.0000, 0.5000]])
    """
    k = _check_kernel(k, "k")
    damping = _check_nonnegative("damping", damping)
    if k.shape[0] != k.shape[1]:
        raise ValueError(f"`k` must be square in its samples, got shape {tuple(k.shape)}")
    values, vectors = _symmetric_eigh(_flatten(k), "k", psd=True)
    if damping > 0:
        gain = values / (values + damping)
    else:
        gain = (~_null_mask(values)).to(values.dtype)
    m = (vectors * gain) @ vectors.T
    m = (m + m.T) / 2
    return _unflatten(m, k.shape[0], k.shape[0], _n_out_of(k))
