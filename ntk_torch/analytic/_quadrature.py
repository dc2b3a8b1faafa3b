"""Duals of any elementwise activation by Gauss–Hermite quadrature.

The quadrature runs over the bivariate normal, with a degree that adapts to the activation
and the variances of each call.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import numpy as np
import torch

from ntk_torch._checks import check_int
from ntk_torch.analytic._dual import Dual, correlation

Tensor = torch.Tensor

__all__ = ["DEFAULT_DEGREE", "DEGREES", "QUADRATURE_RTOL", "quadrature"]

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
        >>> from ntk_torch.analytic.activations import erf
        >>> one = torch.tensor(1.0, dtype=torch.float64)
        >>> t, dt = quadrature(torch.erf)(0.5 * one, one, one)
        >>> t_exact, dt_exact = erf(0.5 * one, one, one)
        >>> torch.allclose(t, t_exact, rtol=1e-8), torch.allclose(dt, dt_exact, rtol=1e-8)
        (True, True)
    """
    check_int("degree", degree, low=1, optional=True)
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
        _, rho = correlation(c, v1, v2)
        shape = torch.broadcast_shapes(c.shape, v1.shape, v2.shape)
        k = degree_for(v1, v2) if rho.numel() else DEGREES[0]
        t, dt = _gauss_hermite(phi, rho.expand(shape).reshape(-1),
                               torch.sqrt(v1).expand(shape).reshape(-1),
                               torch.sqrt(v2).expand(shape).reshape(-1), k, need_derivative)
        return t.reshape(shape), (dt.reshape(shape) if dt is not None else None)

    return Dual(label, fn, phi)
