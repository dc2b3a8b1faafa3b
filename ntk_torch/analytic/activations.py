"""Dual activations: Gaussian expectations of ``φ(u)φ(v)`` and ``φ'(u)φ'(v)``.

For ``(u, v) ~ N(0, [[v1, c], [c, v2]])`` a :class:`Dual` returns the pair

    T(c, v1, v2)  = E[φ(u) φ(v)],      T'(c, v1, v2) = E[φ'(u) φ'(v)],

elementwise over broadcastable tensors ``c, v1, v2`` (any shape, e.g. ``(N1, N2)`` or
``(N1, N2, H, W, H, W)``). ``T`` maps the pre-activation NNGP to the post-activation one,
``T'`` multiplies the NTK (Jacot et al. 2018). Closed forms:

- ``leaky_relu(α)``, i.e. ``φ(u) = max(u, 0) + α min(u, 0)``, covering ReLU (``α = 0``),
  ``|u|`` (``α = -1``) and the identity (``α = 1``): with ``ρ = c/√(v1 v2) = cos θ``,
  ``φ = a u + b |u|``, ``a = (1+α)/2``, ``b = (1-α)/2``, and the arc-cosine kernels of
  Cho & Saul (2009), ``T = a² c + b² √(v1 v2) (2 sin θ + (π - 2θ) cos θ)/π``,
  ``T' = a² + b² (1 - 2θ/π)``;
- ``erf`` (Williams 1997): ``T = (2/π) asin(2c/√((1+2v1)(1+2v2)))``,
  ``T' = (4/π)/√((1+2v1)(1+2v2) - 4c²)``;
- exact ``gelu`` ``u Φ(u)``: with ``p = (1+v1)(1+v2)``, ``δ = √(p - c²)``, ``ψ = asin(c/√p)``,
  ``T = c/4 + (c ψ + (c² + v1 v2 δ²)/(p δ))/(2π)``,
  ``T' = ∂T/∂c = 1/4 + (ψ + c (2 + v1 + v2)/(p δ) + c/δ³)/(2π)``.

Any other elementwise function goes through :func:`quadrature` over the bivariate normal
(Gauss–Hermite, or nested Gauss–Legendre panels where large variances make the activation's
features narrow), with derivatives from autograd.

Numerics: ``c`` is clamped into ``[-√(v1 v2), √(v1 v2)]`` (so correlations stay in
``[-1, 1]``), zero variances give ``ρ = 0`` rather than ``0/0``, and correlations within
16 ulps of ±1 are snapped to ±1 (see ``_dual.correlation``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ntk_torch._activation_modules import Elementwise, activation_module
from ntk_torch.analytic._dual import Dual, correlation
from ntk_torch.analytic._quadrature import DEFAULT_DEGREE, DEGREES, QUADRATURE_RTOL, quadrature

__all__ = ["Dual", "derivative_product", "dual", "erf", "gelu", "identity", "leaky_relu",
           "quadrature", "relu",
           "ACTIVATION_TYPES", "DEFAULT_DEGREE", "DEGREES", "QUADRATURE_RTOL"]

Tensor = torch.Tensor


def leaky_relu(slope: float) -> Dual:
    """``φ(u) = max(u, 0) + slope · min(u, 0)`` through the arc-cosine kernels (Cho & Saul 2009).

    Example:
        >>> import torch
        >>> t, dt = leaky_relu(-1.0)(torch.tensor(0.3), torch.tensor(1.0), torch.tensor(2.0))
        >>> round(float(dt), 4)  # |u|: E[sign(u) sign(v)] = 1 - 2θ/π, cos θ = 0.3/√2
        0.1361
    """
    a2, b2 = ((1 + slope) / 2) ** 2, ((1 - slope) / 2) ** 2

    def fn(c: Tensor, v1: Tensor, v2: Tensor, need_derivative: bool):
        norms, rho = correlation(c, v1, v2)
        # T' = a² + b² (1 - 2θ/π), in the buffer of θ; then, since a² ρ + (b²/π)(π - 2θ) ρ
        # = T' ρ, T = √(v1 v2) ((2b²/π) sin θ + T' ρ), in the buffer of 1 - ρ² (>= 0 for
        # |ρ| <= 1 in floating point too).
        dt = torch.arccos(rho).mul_(-2 * b2 / math.pi).add_(a2 + b2)
        t = torch.mul(rho, rho).neg_().add_(1.0).sqrt_().mul_(2 * b2 / math.pi)
        t.addcmul_(rho, dt).mul_(norms)
        return t, (dt if need_derivative else None)

    return Dual(f"leaky_relu({slope:g})", fn,
                functools.partial(F.leaky_relu, negative_slope=slope), homogeneous=True)


relu = Dual("relu", leaky_relu(0.0).fn, torch.relu, homogeneous=True)


def _identity(c: Tensor, v1: Tensor, v2: Tensor, need_derivative: bool):
    norms, rho = correlation(c, v1, v2)
    return rho.mul_(norms), (torch.ones_like(rho) if need_derivative else None)


identity = Dual("identity", _identity, lambda t: t, homogeneous=True)


def _erf(c: Tensor, v1: Tensor, v2: Tensor, need_derivative: bool):
    norms, rho = correlation(c, v1, v2)
    c = rho.mul_(norms)
    prod = torch.mul(1 + 2 * v1, 1 + 2 * v2)
    t = torch.div(c, prod.sqrt()).mul_(2.0).clamp_(-1.0, 1.0).arcsin_().mul_(2 / math.pi)
    if not need_derivative:
        return t, None
    # prod - 4c² >= 1 + 2 v1 + 2 v2 > 0 once |c| <= √(v1 v2).
    dt = prod.expand_as(c).addcmul(c, c, value=-4.0).sqrt_().reciprocal_().mul_(4 / math.pi)
    return t, dt


erf = Dual("erf", _erf, torch.erf)


def _gelu(c: Tensor, v1: Tensor, v2: Tensor, need_derivative: bool):
    norms, rho = correlation(c, v1, v2)
    c = rho.mul_(norms)
    prod = norms.mul_(norms)                         # v1 v2
    prod1 = torch.mul(1 + v1, 1 + v2)                # p = (1 + v1)(1 + v2)
    delta2 = prod1.expand_as(c).addcmul(c, c, value=-1.0)  # p - c² >= 1 + v1 + v2 > 0
    delta = delta2.sqrt()
    angle = torch.arctan2(c, delta)                  # = asin(c/√p), stable at |c| -> √p
    # T = c/4 + (c ψ + (c² + v1 v2 δ²)/(p δ))/(2π)
    t = prod.mul_(delta2).addcmul_(c, c).div_(prod1).div_(delta)
    t.addcmul_(c, angle).div_(2 * math.pi).add_(c, alpha=0.25)
    if not need_derivative:
        return t, None
    # Price's theorem: T' = ∂T/∂c = 1/4 + (ψ + c (2 + v1 + v2)/(p δ) + c/δ³)/(2π),
    # simplified with p - v1 v2 = 1 + v1 + v2.
    dt = torch.div(2 + v1 + v2, prod1).div(delta)
    dt.add_(delta2.mul_(delta).reciprocal_()).mul_(c).add_(angle).div_(2 * math.pi).add_(0.25)
    return t, dt


gelu = Dual("gelu", _gelu, F.gelu)


# Modules accepted as elementwise activations; the named ones have closed forms.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Identity, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.CELU,
    nn.SELU, nn.Softplus, nn.Mish, nn.Hardtanh, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Threshold,
)

_CLOSED_CALLABLES: dict[Callable[[Tensor], Tensor], Dual] = {
    torch.relu: relu, F.relu: relu, torch.abs: leaky_relu(-1.0), torch.erf: erf,
    torch.special.erf: erf,
}


def dual(activation: object, degree: int = DEFAULT_DEGREE) -> Dual:
    """The :class:`Dual` of an activation given as a name, module or elementwise callable.

    Closed forms for ReLU, LeakyReLU(α), ``|·|``, identity, erf and exact GELU (modules,
    ``torch`` functions or the names of :func:`ntk_torch.nn.activation_module`); any other
    parameter-free activation module or callable uses :func:`quadrature`.

    Raises:
        TypeError: for a module that is not an elementwise activation, or one with
            parameters (its shared parameters would need their own kernel terms).

    Example:
        >>> import torch
        >>> dual(torch.nn.LeakyReLU(0.0)).name, dual("erf").name, dual(torch.nn.Tanh()).name
        ('leaky_relu(0)', 'erf', 'quadrature(Tanh())')
    """
    if isinstance(activation, str):
        activation = activation_module(activation)
    if isinstance(activation, Elementwise):
        activation = activation.fn
    if isinstance(activation, nn.Module):
        if any(True for _ in activation.parameters()):
            raise TypeError(f"activation {activation!r} has parameters; only parameter-free "
                            "elementwise activations have an analytic kernel")
        if isinstance(activation, nn.ReLU):
            return relu
        if isinstance(activation, nn.LeakyReLU):
            return leaky_relu(float(activation.negative_slope))
        if isinstance(activation, nn.Identity):
            return identity
        if isinstance(activation, nn.GELU) and activation.approximate == "none":
            return gelu
        if isinstance(activation, ACTIVATION_TYPES):
            return quadrature(activation, degree)
        raise TypeError(f"{type(activation).__name__} is not a supported elementwise activation; "
                        "wrap an elementwise function in ntk_torch.nn.Elementwise(fn)")
    if callable(activation):
        for known, closed in _CLOSED_CALLABLES.items():
            if activation is known:
                return closed
        return quadrature(activation, degree)
    raise TypeError(f"`activation` must be a name, an nn.Module or a callable, "
                    f"got {type(activation).__name__}")


def derivative_product(dual: Dual) -> Dual:
    """The dual of ``ψ(u) = u φ'(u)``: ``E[u φ'(u) v φ'(v)]`` (and its derivative).

    What a channel's tangent-kernel term ``z(x) z(x')`` (a LayerNorm gain's) becomes
    through the activation. Homogeneous activations have ``ψ = φ``; the others go through
    :func:`quadrature` with ``φ'`` from autograd.

    Raises:
        TypeError: when the dual does not carry its activation.

    Example:
        >>> import torch
        >>> derivative_product(relu) is relu
        True
        >>> one = torch.tensor(1.0, dtype=torch.float64)
        >>> t, _ = derivative_product(identity)(0.5 * one, one, one)
        >>> float(t)  # E[u v] = c
        0.5
    """
    if dual.homogeneous:
        return dual
    phi = dual.phi
    if phi is None:
        raise TypeError(f"the dual {dual.name} does not carry its activation, which "
                        "u φ'(u) needs")

    def psi(t: Tensor) -> Tensor:
        with torch.enable_grad():
            s = t if t.requires_grad else t.detach().requires_grad_()
            (d,) = torch.autograd.grad(phi(s).sum(), s, create_graph=t.requires_grad)
        return s * d if t.requires_grad else t * d.detach()

    return quadrature(psi, name=f"u·{dual.name}'(u)")
