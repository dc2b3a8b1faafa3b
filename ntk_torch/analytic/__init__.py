"""Infinite-width NNGP and NTK kernels, read from the same PyTorch models.

- :func:`kernel` ``(model, x1, x2=None) -> Kernel``: for ``nn.Sequential`` chains and any
  module ``torch.fx`` can trace, made of dense and convolutional layers, activations,
  residual sums, concatenation, pooling, LayerNorm and flattening.
- :func:`mlp_kernel` ``(x1, x2=None, *, depth, ...)``: the same for an MLP described by
  its hyper-parameters.
- :func:`monte_carlo_kernel` ``(build, x1, x2=None, *, n_samples, ...)``: the empirical
  kernels of ``n_samples`` initialisations averaged, with standard errors
  (:class:`MonteCarloKernel`): the finite-width estimate the two above are limits of.
- :class:`Kernel`: ``nngp`` and ``ntk``, each ``(N1, N2)``; the per-output kernels that
  the mean over outputs (``mode="trace"``) of the empirical kernels converges to.
- ``layers``: the ``Kernel -> Kernel`` maps; ``activations``: dual activations (closed
  forms and quadrature); ``read``: how a module's layers become those maps.
"""

from ntk_torch.analytic import activations, layers
from ntk_torch.analytic._limit import Kernel
from ntk_torch.analytic.mlp import mlp_kernel
from ntk_torch.analytic.monte_carlo import MonteCarloKernel, monte_carlo_kernel
from ntk_torch.analytic.read import kernel

__all__ = [
    # kernels of models
    "kernel",
    "mlp_kernel",
    "Kernel",
    # their Monte Carlo estimate at a finite width
    "monte_carlo_kernel",
    "MonteCarloKernel",
    # building blocks
    "activations",
    "layers",
]
