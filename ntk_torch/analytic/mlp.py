"""Infinite-width kernels of an MLP described by its hyper-parameters, without a module."""

from __future__ import annotations

import torch

from ntk_torch import nn as ntk_nn
from ntk_torch._checks import check_choice, check_dtype, check_int
from ntk_torch.analytic import layers as L
from ntk_torch.analytic._evaluate import NamedLayer, evaluate
from ntk_torch.analytic._limit import Kernel
from ntk_torch.analytic.activations import dual
from ntk_torch.nn import ActivationSpec

__all__ = ["mlp_kernel"]


def mlp_kernel(x1: torch.Tensor, x2: torch.Tensor | None = None, *, depth: int,
               activation: ActivationSpec = "relu", weight_std: float = 1.0,
               bias_std: float = 0.0, parameterization: ntk_nn.Parameterization = "ntk",
               width: int | None = None, bias: bool = True, dtype: torch.dtype = torch.float64,
               batch_size: int | None = None) -> Kernel:
    """Infinite-width NNGP and NTK of ``ntk_torch.nn.MLP(d, width, depth, O, ...)``.

    ``depth`` hidden layers (dense + activation) and a dense readout, each with weight std
    ``σ_w = weight_std`` and bias std ``β = bias_std`` in the given parameterization
    (table in :mod:`ntk_torch.nn`). In the NTK parameterization, with ``Σ⁰ = σ_w² x·x'/d
    + β²`` and ``Θ⁰ = Σ⁰``, each hidden layer applies

        Σˡ⁺¹ = σ_w² T(Σˡ) + β²,     Θˡ⁺¹ = Σˡ⁺¹ + σ_w² T'(Σˡ) Θˡ,

    with ``T, T'`` the activation's dual (``activations.py``), and the result is
    ``(Σ^depth, Θ^depth)``. The standard and muP parameterizations change the weights'
    NTK terms by powers of the width, so they need ``width``.

    Args:
        x1: ``(N1, d)``.
        x2: ``(N2, d)`` or ``None`` for ``x1``.
        depth: number of hidden layers, ``>= 0``.
        activation: name, module or elementwise callable (closed forms for relu,
            leaky_relu, abs, identity, erf, gelu; quadrature otherwise).
        weight_std: ``σ_w``.
        bias_std: ``β``.
        parameterization: ``"ntk"``, ``"standard"`` or ``"mup"``.
        width: hidden width ``n``; required for ``"standard"`` and ``"mup"``, unused by
            ``"ntk"`` (whose limit does not depend on it).
        bias: whether the layers have biases (with ``"standard"`` a zero-initialised
            bias still adds 1 per layer to the NTK).
        dtype: computation and result dtype, as in :func:`ntk_torch.analytic.kernel`.
        batch_size: samples per block, as in :func:`ntk_torch.analytic.kernel`.

    Returns:
        :class:`Kernel` with ``nngp`` and ``ntk`` of shape ``(N1, N2)``.

    Example:
        >>> import torch, ntk_torch as nt
        >>> x = torch.randn(3, 2, dtype=torch.float64)
        >>> k = nt.analytic.mlp_kernel(x, depth=1, activation="identity")
        >>> lin = x @ x.T / 2  # identity: Σ¹ = K, Θ¹ = Σ¹ + Θ⁰ = 2K
        >>> torch.allclose(k.nngp, lin), torch.allclose(k.ntk, 2 * lin)
        (True, True)
    """
    if not isinstance(x1, torch.Tensor) or x1.dim() != 2:
        got = tuple(x1.shape) if isinstance(x1, torch.Tensor) else type(x1).__name__
        raise ValueError(f"`x1` must be a tensor of shape (N1, d), got {got}")
    check_int("depth", depth, low=0)
    check_choice("parameterization", parameterization, ntk_nn.PARAMETERIZATIONS)
    if width is None and parameterization != "ntk" and depth > 0:
        raise ValueError(f"`width` is required with parameterization={parameterization!r}: its "
                         "NTK grows with the width, so the kernel is taken at that width")
    check_int("width", width, low=1, optional=True)
    if parameterization == "mup" and depth == 0:
        raise ValueError("`depth` must be >= 1 with parameterization='mup': a single dense "
                         "layer has no width to scale, got depth=0")
    check_dtype(dtype)
    d = x1.shape[1]
    n = width if width is not None else 1  # "ntk": m²n and m²s²n do not depend on n
    phi = L.activation(dual(activation))
    layers: list[NamedLayer] = []
    fan_in = d
    for i in range(depth):
        m, s, mb, sb = ntk_nn.scales(parameterization, "input" if i == 0 else "hidden", fan_in, n,
                                     weight_std, bias_std)
        layers.append((f"hidden{i}", None, L.dense(fan_in, n, m, s, mb if bias else 0.0,
                                                   sb if bias else 0.0, bias_trainable=bias)))
        layers.append((f"act{i}", None, phi))
        fan_in = n
    m, s, mb, sb = ntk_nn.scales(parameterization, "readout", fan_in, 1, weight_std, bias_std)
    layers.append(("readout", None, L.dense(fan_in, 1, m, s, mb if bias else 0.0,
                                            sb if bias else 0.0, bias_trainable=bias)))
    return evaluate(layers, x1, x2, dtype, batch_size)
