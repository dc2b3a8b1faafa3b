"""Spectral views of a kernel matrix: its eigenmodes and the natural-gradient NTK.

Kernels are trace ``(N, N)`` or full ``(N, N, O, O)``, the latter read as the
``(N·O, N·O)`` matrix with row ``a·O + i`` for sample ``a`` and output ``i``. Both
functions work from one symmetric eigendecomposition ``K = V diag(λ) Vᵀ`` (asymmetry
beyond rounding is an error; see :func:`ntk_torch.prior_logprob` for the kernel as a
Gaussian prior).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ntk_torch._checks import check_int, check_kernel, check_number
from ntk_torch._kernel_matrix import (
    as_matrix,
    from_matrix,
    n_out_of,
    null_mask,
    symmetric_eigh,
    symmetrize,
)

__all__ = ["Eigenmodes", "eigenmodes", "natural_ntk"]


class Eigenmodes(NamedTuple):
    """Eigenvalues ``(n,)``, largest first, and unit eigenvectors (``n = N`` or ``N·O``).

    Eigenvector ``j`` is column ``j`` of ``(N, n)`` for a trace kernel and ``[:, :, j]`` of
    ``(N, O, n)`` for a full one.
    """

    values: torch.Tensor
    vectors: torch.Tensor


def eigenmodes(kernel, k: int | None = None, *, tol: float = 1e-8, seed: int = 0) -> Eigenmodes:
    """Eigendecomposition ``K = Σ_j λ_j v_j v_jᵀ`` of a kernel matrix, largest ``λ`` first.

    Under gradient flow with kernel ``K`` the component of the residual along ``v_j``
    decays as ``exp(-η λ_j t)``: the leading modes are the functions the network fits first
    and, as a Gaussian-process prior, the ones it finds most likely.

    A tensor is decomposed densely (``torch.linalg.eigh``). A :class:`ntk_torch.KernelStore`
    is never loaded: its top ``k`` pairs come from block Lanczos with thick restarts, each
    iteration one streamed pass over the store (``_krylov_eigen.top_eigenpairs``; about 7 passes
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
    from ntk_torch import _krylov, _krylov_eigen, _operators

    if _operators.is_store(kernel):
        if kernel.mode == "diagonal":
            raise ValueError("`kernel` is a diagonal-mode store; eigenmodes need the trace or the "
                             "full kernel (mode='trace' or mode='full')")
        if k is None:
            raise ValueError("`k` (the number of leading eigenpairs) is required for a kernel "
                             "store, e.g. nt.eigenmodes(store, k=10)")
        op = _operators.StoreOperator(kernel, "kernel")
        values, vectors, _ = _krylov_eigen.top_eigenpairs(op, k, tol=tol, seed=seed)
        values, vectors = values.to(kernel.dtype), vectors.to(kernel.dtype)
        n_out = op.n_out
        n = op.n_samples
    else:
        kernel = check_kernel("kernel", kernel, square=True)
        n_out = n_out_of(kernel)
        n = kernel.shape[0]
        k = check_int("k", k, low=1, high=n * (n_out or 1), optional=True)
        values, vectors = symmetric_eigh("kernel", as_matrix(kernel), psd=False)
        values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
        if vectors.numel():
            vectors = _krylov.sign_fixed(vectors)
    if n_out is not None:
        vectors = vectors.reshape(n, n_out, -1)
    return Eigenmodes(values, vectors)


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
    k = check_kernel("k", k, square=True)
    damping = check_number("damping", damping)
    values, vectors = symmetric_eigh("k", as_matrix(k), psd=True)
    if damping > 0:
        gain = values / (values + damping)
    else:
        gain = (~null_mask(values)).to(values.dtype)
    m = symmetrize((vectors * gain) @ vectors.T)
    return from_matrix(m, k.shape[0], k.shape[0], n_out_of(k))
