"""Infinite-width NNGP and NTK kernels, read from the same PyTorch models.

- :func:`kernel` ``(model, x1, x2=None) -> Kernel``: for ``nn.Sequential`` models of
  dense/convolutional layers, activations, flatten, pooling, and :mod:`ntk_torch.nn` models.
- :func:`mlp_kernel` ``(x1, x2=None, *, depth, ...)``: the same for an MLP described by
  its hyper-parameters.
- :class:`Kernel`: ``nngp`` and ``ntk``, each ``(N1, N2)``; the per-output kernels that
  the mean over outputs (``mode="trace"``) of the empirical kernels converges to.
- ``layers``: the ``Kernel -> Kernel`` maps; ``activations``: dual activations (closed
  forms and quadrature); ``read``: how a module's layers become those maps.
"""

from ntk_torch.analytic import activations, layers
from ntk_torch.analytic._limit import Kernel
from ntk_torch.analytic.mlp import mlp_kernel
from ntk_torch.analytic.read import kernel

__all__ = [
    # kernels of models
    "kernel",
    "mlp_kernel",
    "Kernel",
    # building blocks
    "activations",
    "layers",
]
