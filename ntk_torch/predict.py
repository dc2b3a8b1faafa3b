"""What a fixed kernel predicts: gradient flow, kernel regression, Gaussian-process posteriors.

Layouts as in :mod:`ntk_torch.spectral`: trace kernels ``(N1, N2)`` shared by all outputs
and full kernels ``(N1, N2, O, O)`` read as ``(N1·O, N2·O)`` matrices; labels ``(N,)`` or
``(N, C)`` (trace) and ``(N, O)`` (full). ``N`` counts training inputs, ``M`` test inputs.

Loss convention. Gradient flow here is on the summed squared error

    L(θ) = ½ Σ_a ‖f(x_a; θ) - y_a‖²,      dθ/dt = -η ∇L,

so for a model linear in ``θ`` with NTK ``Θ = J Jᵀ`` the training outputs obey
``df/dt = -η Θ (f - y)``. One step of gradient descent with step size ``η`` on this loss
advances ``t`` by one; the time of ``k`` steps is ``t = k`` at ``lr = η``, or equivalently
``t = k·η`` at ``lr = 1``. With a mean loss ``½ Σ ‖f - y‖² / (N·O)`` divide ``lr`` by
``N·O``.

Every solve in memory goes through the eigendecomposition of the (symmetric, PSD-checked)
training kernel. Where the kernel is singular the infinite-time limits use the pseudo-inverse:
the minimum-norm interpolant that gradient flow from ``f0`` reaches.
"""

from ntk_torch._gaussian_process import (
    Gaussian,
    conditional,
    gp_posterior,
    kernel_regression,
    solve,
)
from ntk_torch._gradient_flow import (
    FlowPrediction,
    gradient_descent_mse,
    gradient_flow_mse,
    ntk_gp_posterior,
)

__all__ = [
    # training under a fixed kernel
    "FlowPrediction",
    "gradient_descent_mse",
    "gradient_flow_mse",
    "ntk_gp_posterior",
    # Gaussian processes and kernel regression
    "Gaussian",
    "conditional",
    "gp_posterior",
    "kernel_regression",
    "solve",
]
