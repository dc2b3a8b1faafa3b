"""ntk_torch: exact empirical neural tangent kernels of PyTorch models.

Public surface, grouped by purpose; everything else is private.
"""

from ntk_torch import analytic, data, metrics, nn, predict, records, sweeps, training
from ntk_torch.empirical import (
    EmpiricalNTK,
    empirical_nngp,
    empirical_ntk,
    empirical_ntk_fn,
    layerwise_ntk,
)
from ntk_torch.linearize import LinearizedModel, linearize
from ntk_torch.predict import (
    FlowPrediction,
    Gaussian,
    conditional,
    gp_posterior,
    gradient_descent_mse,
    gradient_flow_mse,
    kernel_regression,
    ntk_gp_posterior,
    solve,
)
from ntk_torch.priors import prior_logprob
from ntk_torch.spectral import Eigenmodes, eigenmodes, natural_ntk
from ntk_torch.store import KernelStore, StoreError, compute_kernel
from ntk_torch.sweeps import fit_power_law, width_sweep
from ntk_torch.tracking import KernelTracker

__version__ = "0.1.0"

__all__ = [
    # empirical kernels
    "EmpiricalNTK",
    "empirical_nngp",
    "empirical_ntk",
    "empirical_ntk_fn",
    "layerwise_ntk",
    # kernels bigger than memory: on-disk stores, many processes
    "KernelStore",
    "StoreError",
    "compute_kernel",
    # data
    "data",
    # parameterized layers and their infinite-width kernels
    "analytic",
    "nn",
    # training dynamics: kernel drift, feature and weight change
    "KernelTracker",
    "metrics",
    # kernel toolkit: linearized nets, predictions, eigenmodes, priors
    "Eigenmodes",
    "FlowPrediction",
    "Gaussian",
    "LinearizedModel",
    "conditional",
    "eigenmodes",
    "gp_posterior",
    "gradient_descent_mse",
    "gradient_flow_mse",
    "kernel_regression",
    "linearize",
    "natural_ntk",
    "ntk_gp_posterior",
    "predict",
    "prior_logprob",
    "solve",
    # width sweeps and their records
    "fit_power_law",
    "records",
    "sweeps",
    "training",
    "width_sweep",
]
