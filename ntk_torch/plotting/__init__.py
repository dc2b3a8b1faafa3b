"""Figures: every figure of the package and its programs is drawn here, measuring elsewhere.

Functions read long-format records (:mod:`ntk_torch.records`) or tensors and write one PNG,
returning its path. matplotlib (the ``plot`` extra: ``pip install 'ntk_torch[plot]'``) is
imported inside the functions, and figures are drawn on an Agg canvas without pyplot, so
importing :mod:`ntk_torch` never loads matplotlib or changes the user's backend.
"""

from ntk_torch.plotting._drift import plot_drift, plot_width_scaling
from ntk_torch.plotting._kernels import plot_eigenmodes, plot_kernel_matrices, plot_spectra
from ntk_torch.plotting._one_d import (
    plot_ensembles_vs_gp,
    plot_function_steps,
    plot_kernel_evolution,
    plot_tangent_kernels,
)
from ntk_torch.plotting._width import plot_kernel_error, plot_vs_width

__all__ = [
    # training dynamics and width sweeps (from records)
    "plot_drift",
    "plot_kernel_error",
    "plot_vs_width",
    "plot_width_scaling",
    # kernel matrices
    "plot_eigenmodes",
    "plot_kernel_matrices",
    "plot_spectra",
    # functions of one input
    "plot_ensembles_vs_gp",
    "plot_function_steps",
    "plot_kernel_evolution",
    "plot_tangent_kernels",
]
