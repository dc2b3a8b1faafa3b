"""A kernel held in a :class:`ntk_torch.KernelStore`, seen as one symmetric matrix.

The matrix acts on flattened vectors, for the streaming solvers of ``_krylov_solve`` and
``_krylov_eigen``.

Rows and columns are ``a·O + i`` (sample ``a``, output ``i``) as for the dense kernels of
:mod:`ntk_torch._kernel_matrix`: a full kernel ``(N, N, O, O)`` is the ``(N·O, N·O)`` matrix, a
diagonal one ``(N, N, O)`` its block-diagonal part (``O`` kernels, one per output), a
trace kernel ``(N, N)`` itself.
"""

from __future__ import annotations

import torch

from ntk_torch._checks import describe


def is_store(kernel: object) -> bool:
    from ntk_torch.store import KernelStore

    return isinstance(kernel, KernelStore)


class StoreOperator:
    """:class:`ntk_torch._krylov.SymmetricOperator` of a symmetric kernel store.

    Every product streams the store once (:meth:`ntk_torch.KernelStore.matmul`).
    """

    def __init__(self, store, name: str) -> None:
        if not store.symmetric:
            raise ValueError(f"`{name}` must be the kernel of one set of inputs with itself "
                             f"(computed with x2=None), got a store of shape {store.shape}")
        self.store = store
        self.n_samples = store.shape[0]
        self.n_out = store.n_out
        self.size = self.n_samples * (self.n_out or 1)
        self.dtype = store.dtype
        self.device = torch.device("cpu")

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        columns = v.shape[1]
        shaped = v.reshape(self.n_samples, columns) if self.n_out is None else \
            v.reshape(self.n_samples, self.n_out, columns)
        return self.store.matmul(shaped).reshape(self.size, columns)  # in v's dtype

    def sketch(self, v: torch.Tensor) -> torch.Tensor:
        """``K v`` in the store's precision (at least float32).

        Half the time of :meth:`matmul` for the many columns of a preconditioner's sketch,
        which needs no more accuracy than the stored values have.
        """
        dtype = torch.promote_types(self.dtype, torch.float32)
        return self.matmul(v.to(dtype)).double()

    def diagonal(self) -> torch.Tensor:
        d = self.store.diagonal().double()
        if self.store.mode == "full":
            d = d.diagonal(dim1=1, dim2=2)
        return d.reshape(self.size)


def store_product(store, weights: torch.Tensor, name: str, n: int) -> torch.Tensor:
    """``K(X*, X) W``, flattened ``(M·O, C)``.

    For a store of shape ``(M, N, ...)`` and flattened ``W`` ``(N·O, C)``.
    """
    if store.shape[1] != n:
        raise ValueError(f"`{name}` must have {n} columns (dimension 1) to match the training "
                         f"kernel, got shape {store.shape}")
    columns = weights.shape[1]
    n_out = store.n_out
    shaped = weights.reshape(n, columns) if n_out is None else weights.reshape(n, n_out, columns)
    return store.matmul(shaped).reshape(-1, columns)


def check_store_like(store, name: str, n_out: int | None, mode: str) -> None:
    if store.mode != mode or store.n_out != n_out:
        raise ValueError(f"`{name}` must be a {mode}-mode kernel like the training kernel, "
                         f"got {describe(store)}")
