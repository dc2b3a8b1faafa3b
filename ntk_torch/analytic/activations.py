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

Any other elementwise function goes through :func:`quadrature`, a tensor-product
Gauss–Hermite rule over the bivariate normal with derivatives from autograd.

Numerics: ``c`` is clamped into ``[-√(v1 v2), √(v1 v2)]`` (so correlations stay in
``[-1, 1]``), zero variances give ``ρ = 0`` rather than ``0/0``, and correlations within
16 ulps of ±1 are snapped to ±1 (see ``_correlation``).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Dual", "dual", "erf", "gelu", "identity", "leaky_relu", "quadrature", "relu",
           "ACTIVATION_TYPES", "DEFAULT_DEGREE", "DEGREES"]

Tensor = torch.Tensor

# Gauss–Hermite degrees (nodes per dimension, degree² per pair) tried by `quadrature`
# when no degree is given: it keeps the first whose estimated error (see `quadrature`) is
# below QUADRATURE_RTOL on probe pairs spanning the call's variances. Measured against a
# 300-node rule: sin, sigmoid, softplus, SiLU, GELU settle at 48-128 nodes for variances
# up to 4; tanh-like functions (poles at ±iπ/2) need about 50·v nodes at variance v, so
# 256 keeps them within 1e-6 up to v ≈ 5; non-smooth ones (hardtanh, ReLU6, ELU's second
# derivative jump) converge only algebraically and get a warning with the error estimate.
DEGREES = (32, 48, 64, 96, 128, 192, 256)
DEFAULT_DEGREE = None
QUADRATURE_RTOL = 1e-8
# Below this estimated error the largest degree still keeps the promised accuracy: no warning.
_WARN_RTOL = 1e-6

# Pairs evaluated at once by the quadrature; chunk memory is about 16·degree² bytes a pair.
_QUADRATURE_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class Dual:
    """``(c, v1, v2) -> (E[φ(u)φ(v)], E[φ'(u)φ'(v)])`` for one activation ``φ``.

    The results are fresh tensors of the broadcast shape, which callers may modify in place.

    Attributes:
        name: what it is, for messages and ``repr``.
        fn: ``(c, v1, v2, need_derivative) -> (T, T' or None)`` on broadcastable tensors.
    """

    name: str
    fn: Callable[[Tensor, Tensor, Tensor, bool], tuple[Tensor, Tensor | None]] = field(repr=False)

    def __call__(self, c: Tensor, v1: Tensor, v2: Tensor,
                 need_derivative: bool = True) -> tuple[Tensor, Tensor | None]:
        """Expectations over ``(u, v) ~ N(0, [[v1, c], [c, v2]])``, broadcast shapes.

        Example:
            >>> import torch
            >>> t, dt = relu(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0))
            >>> float(t), float(dt)  # E[relu(u)²] = 1/2, P(u > 0) = 1/2
            (0.5, 0.5)
        """
        return self.fn(c, v1, v2, need_derivative)


def _correlation(c: Tensor, v1: Tensor, v2: Tensor) -> tuple[Tensor, Tensor]:
    """``√(v1 v2)`` and ``ρ = c/√(v1 v2)`` clamped into ``[-1, 1]``, ``0/0 -> 0``; fresh tensors.

    The clamped covariance is ``ρ·√(v1 v2)``. The closed forms below work in place on
    these to avoid full-size temporaries: on a large grid every fresh tensor costs page
    faults, which dominate the few flops per entry.
    """
    # √v1 · √v2: square roots of the (small) variance tensors, one full-size product.
    norms = torch.mul(v1.sqrt(), v2.sqrt())
    rho = torch.div(c, norms)
    if norms.shape != rho.shape:  # c broadcasts further than the variances
        norms = norms.expand_as(rho).clone()
    if not (bool((v1 > 0).all()) and bool((v2 > 0).all())):  # zero-norm inputs: 0/0
        rho.nan_to_num_(nan=0.0)
    rho.clamp_(-1.0, 1.0)
    # An input paired with itself (or its negative) has ρ = ±1 up to rounding (c and v are
    # summed in different orders), and arccos turns 1 - ε into θ ≈ √(2ε) ≈ 2e-8: T' of
    # ReLU-like activations would be off by 1e-9 there and depend on the blocking. Snap to
    # exactly ±1 within 16 ulps, which moves near-parallel pairs by no more than rounding.
    edge = rho.abs() > 1 - 16 * torch.finfo(rho.dtype).eps
    if bool(edge.any()):
        rho[edge] = rho[edge].sign()
    return norms, rho


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
        norms, rho = _correlation(c, v1, v2)
        # T' = a² + b² (1 - 2θ/π), in the buffer of θ; then, since a² ρ + (b²/π)(π - 2θ) ρ
        # = T' ρ, T = √(v1 v2) ((2b²/π) sin θ + T' ρ), in the buffer of 1 - ρ² (>= 0 for
        # |ρ| <= 1 in floating point too).
        dt = torch.arccos(rho).mul_(-2 * b2 / math.pi).add_(a2 + b2)
        t = torch.mul(rho, rho).neg_().add_(1.0).sqrt_().mul_(2 * b2 / math.pi)
        t.addcmul_(rho, dt).mul_(norms)
        return t, (dt if need_derivative else None)

    return Dual(f"leaky_relu({slope:g})", fn)


relu = Dual("relu", leaky_relu(0.0).fn)


def _identity(c: Tensor, v1: Tensor, v2: Tensor, need_derivative: bool):
    norms, rho = _correlation(c, v1, v2)
    return rho.mul_(norms), (torch.ones_like(rho) if need_derivative else None)


identity = Dual("identity", _identity)


def _erf(c: Tensor, v1: Tensor, v2: Tensor, need_derivative: bool):
    norms, rho = _correlation(c, v1, v2)
    c = rho.mul_(norms)
    prod = torch.mul(1 + 2 * v1, 1 + 2 * v2)
    t = torch.div(c, prod.sqrt()).mul_(2.0).clamp_(-1.0, 1.0).arcsin_().mul_(2 / math.pi)
    if not need_derivative:
        return t, None
    # prod - 4c² >= 1 + 2 v1 + 2 v2 > 0 once |c| <= √(v1 v2).
    dt = prod.expand_as(c).addcmul(c, c, value=-4.0).sqrt_().reciprocal_().mul_(4 / math.pi)
    return t, dt


erf = Dual("erf", _erf)


def _gelu(c: Tensor, v1: Tensor, v2: Tensor, need_derivative: bool):
    norms, rho = _correlation(c, v1, v2)
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


gelu = Dual("gelu", _gelu)


@functools.lru_cache(maxsize=None)
def _hermite_numpy(degree: int) -> tuple[np.ndarray, np.ndarray]:
    # Probabilists' Hermite nodes: ∫ f(z) e^{-z²/2} dz ≈ Σ w_i f(z_i); normalised to N(0, 1).
    nodes, weights = np.polynomial.hermite_e.hermegauss(degree)
    return nodes, weights / math.sqrt(2 * math.pi)


def _hermite_rule(degree: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    nodes, weights = _hermite_numpy(degree)
    return (torch.as_tensor(nodes, dtype=dtype, device=device),
            torch.as_tensor(weights, dtype=dtype, device=device))


def _values_and_derivatives(phi: Callable[[Tensor], Tensor], t: Tensor,
                            need_derivative: bool) -> tuple[Tensor, Tensor | None]:
    # Grad mode is set explicitly: callers may run under torch.no_grad().
    with torch.enable_grad():
        t = t.detach().requires_grad_(need_derivative)
        y = phi(t)
        if not isinstance(y, torch.Tensor) or y.shape != t.shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"activation {phi!r} must be elementwise: an input of shape "
                             f"{tuple(t.shape)} gave {got}")
        if not need_derivative:
            return y.detach(), None
        if not y.requires_grad:  # a constant function of its input
            return y.detach(), torch.zeros_like(t)
        (dy,) = torch.autograd.grad(y.sum(), t)
    return y.detach(), dy


def _gauss_hermite(phi: Callable[[Tensor], Tensor], rho: Tensor, s1: Tensor, s2: Tensor,
                   degree: int, need_derivative: bool) -> tuple[Tensor, Tensor | None]:
    """Flat ``(P,)`` correlations and standard deviations -> ``(P,)`` expectations."""
    z, w = _hermite_rule(degree, rho.dtype, rho.device)
    t = torch.empty_like(rho)
    dt = torch.empty_like(rho) if need_derivative else None
    chunk = max(1, _QUADRATURE_ELEMENTS // (degree * degree))
    for start in range(0, rho.numel(), chunk):
        sl = slice(start, start + chunk)
        r = rho[sl, None, None]
        u = s1[sl, None] * z                                              # (P, K): node i
        v = s2[sl, None, None] * (r * z[:, None] + torch.sqrt(1 - r * r) * z)  # (P, K, K): i, j
        fu, dfu = _values_and_derivatives(phi, u, need_derivative)
        fv, dfv = _values_and_derivatives(phi, v, need_derivative)
        t[sl] = torch.einsum("pi,i,pij,j->p", fu, w, fv, w)
        if dt is not None:
            dt[sl] = torch.einsum("pi,i,pij,j->p", dfu, w, dfv, w)
    return t, dt


def _choose_degree(phi: Callable[[Tensor], Tensor], name: str, v_hi: float, dtype: torch.dtype,
                   device: torch.device) -> int:
    """Smallest degree in DEGREES whose estimated error is below QUADRATURE_RTOL on probes.

    Probes sit at the largest variance, where the Gaussian is widest relative to the
    features of ``φ`` and the rule converges slowest, and at an eighth of it.
    """
    pairs = torch.tensor([(v_hi, v_hi), (v_hi / 8, v_hi), (v_hi / 8, v_hi / 8)], dtype=dtype,
                         device=device).sqrt()
    rhos = torch.tensor([-1, -0.9, -0.5, 0, 0.5, 0.9, 0.99, 1], dtype=dtype, device=device)
    s1 = pairs[:, 0].repeat_interleave(len(rhos))
    s2 = pairs[:, 1].repeat_interleave(len(rhos))
    rho = rhos.repeat(len(pairs))
    previous = _gauss_hermite(phi, rho, s1, s2, DEGREES[0], True)
    last_difference = error = math.inf
    for degree in DEGREES[1:]:
        current = _gauss_hermite(phi, rho, s1, s2, degree, True)
        tiny = torch.finfo(dtype).tiny
        difference = max(float((a - b).abs().max() / b.abs().max().clamp_min(tiny))
                         for a, b in zip(previous, current))
        # The previous degree's error is about `difference`; on a geometrically converging
        # rule the current one's is smaller by the last contraction factor. Algebraic
        # convergence (non-smooth φ) has factors near 1 and is not mistaken for accuracy.
        factor = min(1.0, difference / last_difference) if last_difference < math.inf else 1.0
        error = difference * factor
        if error <= QUADRATURE_RTOL:
            return degree
        previous, last_difference = current, difference
    if error <= _WARN_RTOL:
        return DEGREES[-1]
    warnings.warn(
        f"Gauss–Hermite quadrature of {name} did not converge at variances up to {v_hi:.3g}: "
        f"the estimated relative error at degree {DEGREES[-1]} is {error:.2g}, which bounds the "
        "accuracy of this kernel; a non-smooth activation or very large "
        "pre-activation variances cause this", RuntimeWarning, stacklevel=4)
    return DEGREES[-1]


def quadrature(phi: Callable[[Tensor], Tensor], degree: int | None = DEFAULT_DEGREE,
               name: str | None = None) -> Dual:
    """Dual of any elementwise ``φ`` by Gauss–Hermite quadrature over the bivariate normal.

    With ``u = √v1 z1``, ``v = √v2 (ρ z1 + √(1-ρ²) z2)`` and ``z1, z2 ~ N(0, 1)``
    independent, ``E[f(u) g(v)] ≈ Σ_ij w_i w_j f(u_i) g(v_ij)`` on ``degree²`` nodes; ``φ'``
    comes from autograd. Exact for polynomials of degree ``< 2·degree``. Cost:
    ``2·degree²`` evaluations of ``φ`` and a backward pass per pair, in chunks of bounded
    memory.

    With ``degree=None`` (default) the degree adapts to ``φ`` and to the variances of each
    call: the first of ``DEGREES`` (32 ... 256) whose estimated error is below
    ``QUADRATURE_RTOL = 1e-8`` relative to the largest entry, on probe pairs at the
    largest variance of the call (and an eighth of it) with correlations from -1 to 1. The
    estimate is the difference from the previous degree times the last contraction factor
    of those differences (geometric convergence, which smooth activations show); tests
    check the promised 1e-6 against direct 2-d integration. If no degree qualifies, 256 is
    used, with a ``RuntimeWarning`` reporting the estimate when it exceeds 1e-6. Degrees
    are memoised per largest variance (rounded up to a power of ``2^(1/4)``).

    Args:
        phi: elementwise tensor function (module or callable), differentiable by autograd.
        degree: nodes per dimension, ``>= 1``, or ``None`` for the adaptive choice.
        name: label; defaults to ``phi.__name__`` or ``repr(phi)``.

    Example:
        >>> import torch
        >>> one = torch.tensor(1.0, dtype=torch.float64)
        >>> t, dt = quadrature(torch.erf)(0.5 * one, one, one)
        >>> t_exact, dt_exact = erf(0.5 * one, one, one)
        >>> torch.allclose(t, t_exact, rtol=1e-8), torch.allclose(dt, dt_exact, rtol=1e-8)
        (True, True)
    """
    if degree is not None and (isinstance(degree, bool) or not isinstance(degree, int)
                               or degree < 1):
        raise ValueError(f"`degree` must be a positive int or None, got {degree!r}")
    label = f"quadrature({name or getattr(phi, '__name__', None) or repr(phi)})"
    chosen: dict[tuple[int, torch.dtype, str], int] = {}

    def degree_for(v1: Tensor, v2: Tensor) -> int:
        if degree is not None:
            return degree
        v_hi = float(torch.maximum(v1.max(), v2.max()))
        if not v_hi > 0:
            return DEGREES[0]  # every node sits at 0: exact
        # Round the largest variance up onto a 2^(1/4) grid so that the blocks and layers
        # of one kernel share a degree (and the memo stays small).
        hi = math.ceil(4 * math.log2(v_hi))
        key = (hi, v1.dtype, str(v1.device))
        if key not in chosen:
            chosen[key] = _choose_degree(phi, label, 2 ** (hi / 4), v1.dtype, v1.device)
        return chosen[key]

    def fn(c: Tensor, v1: Tensor, v2: Tensor, need_derivative: bool):
        _, rho = _correlation(c, v1, v2)
        shape = torch.broadcast_shapes(c.shape, v1.shape, v2.shape)
        k = degree_for(v1, v2) if rho.numel() else DEGREES[0]
        t, dt = _gauss_hermite(phi, rho.expand(shape).reshape(-1),
                               torch.sqrt(v1).expand(shape).reshape(-1),
                               torch.sqrt(v2).expand(shape).reshape(-1), k, need_derivative)
        return t.reshape(shape), (dt.reshape(shape) if dt is not None else None)

    return Dual(label, fn)


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
    from ntk_torch.nn import Elementwise, activation_module

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
