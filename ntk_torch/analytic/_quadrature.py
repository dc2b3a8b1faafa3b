"""Duals of any elementwise activation by quadrature over the bivariate normal.

Two rules, both vectorised over pairs: a tensor-product Gauss–Hermite rule, cheapest while
the pre-activation variances are of order one, and nested Gauss–Legendre panels graded
towards the zeros of the activation's arguments, which stay accurate when large variances
make the activation's features narrow against the Gaussian. Each call uses the cheapest
rule whose estimated error is below ``QUADRATURE_RTOL``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from ntk_torch._checks import check_int
from ntk_torch.analytic._dual import Dual, correlation

Tensor = torch.Tensor
# (phi, rho, s1, s2, need_derivative) -> (T, T' or None), flat (P,) tensors.
Rule = Callable[[Callable[[Tensor], Tensor], Tensor, Tensor, Tensor, bool],
                tuple[Tensor, Tensor | None]]

__all__ = ["DEFAULT_DEGREE", "DEGREES", "QUADRATURE_RTOL", "quadrature"]

# Gauss–Hermite degrees (nodes per dimension, degree² per pair) tried by `quadrature`
# when no degree is given. Measured against direct integration: sigmoid, softplus, SiLU,
# GELU and its tanh approximation need 40-128 nodes for variances up to 4, sin 256 or
# fewer up to 100; tanh (poles at ±iπ/2, i.e. at ±iπ/(2σ) in the standard variable) needs
# 128 at variance 1.4 and more than 256 beyond 4, where the panels take over. Steps of a
# quarter or less: GELU's tanh approximation converges unevenly, and small steps keep two
# successive degrees from agreeing by chance.
DEGREES = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
DEFAULT_DEGREE = None
QUADRATURE_RTOL = 1e-8
# A rule that misses QUADRATURE_RTOL with an estimated error below this still gives
# kernels to 6 digits, ample next to finite-width effects: no warning.
_WARN_RTOL = 1e-6

# Gauss–Legendre nodes per panel tried by the panel rule; 8 reach 1e-10 on tanh, sigmoid,
# softplus, SiLU and GELU's tanh approximation at variances up to 100. Even counts only:
# odd ones converge unevenly (a node at each panel's centre).
_PANEL_NODES = (4, 6, 8, 10, 12, 16)
# The standard-normal variables are integrated over [-_Z_MAX, _Z_MAX]: the mass outside is
# 2e-19, negligible even against the growth of φ(u)² at the ends.
_Z_MAX = 9.0
# Fixed panel edges for the Gaussian weight: panels of length 2 carry e^{-z²/2} to about
# 1e-11 with 8 nodes. Odd integers, so that the edge at the argument's zero (0 for the
# outer integral) is not a duplicate.
_GRID = tuple(float(z) for z in range(-9, 10, 2))
# Graded edges at ±2^k/σ around the argument's zero (σ: the argument's scale in z), from
# 1 in the activation's own argument, the scale of its features (poles at ±iπ/2 for tanh,
# ±0.63 ± 2.75i for GELU's tanh approximation), outwards until the grid's panels are no
# longer than their distance to that zero.
_GRADING_START = 1.0
# Time of one panel-rule node relative to one Gauss–Hermite node, which does not build its
# abscissa and Gaussian weight (measured 1.0-1.8 on tanh, softplus and GELU's tanh
# approximation).
_PANEL_COST = 1.5

# Nodes evaluated at once; chunk memory is about 16 (Gauss–Hermite) or 40 (panels) bytes
# a node. On CPU, whole calls run 1.4-1.9 times as fast with chunks of 2^19 nodes as with
# chunks of 2^23, whose fresh 64 MB temporaries fault their pages in at every operation;
# accelerators keep large chunks, which amortise kernel launches.
_CHUNK_NODES = {"cpu": 1 << 19}
_CHUNK_NODES_ACCELERATOR = 1 << 23


def _pairs_per_chunk(device: torch.device, nodes_per_pair: int) -> int:
    return max(1, _CHUNK_NODES.get(device.type, _CHUNK_NODES_ACCELERATOR) // nodes_per_pair)


@functools.lru_cache(maxsize=None)
def _hermite_numpy(degree: int) -> tuple[np.ndarray, np.ndarray]:
    # Probabilists' Hermite nodes: ∫ f(z) e^{-z²/2} dz ≈ Σ w_i f(z_i); normalised to N(0, 1).
    nodes, weights = np.polynomial.hermite_e.hermegauss(degree)
    return nodes, weights / math.sqrt(2 * math.pi)


@functools.lru_cache(maxsize=None)
def _legendre_numpy(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    # On [-1, 1]; the weights carry the normal density's constant 1/√(2π).
    x, w = np.polynomial.legendre.leggauss(nodes)
    return x, w / math.sqrt(2 * math.pi)


def _rule_tensors(rule: tuple[np.ndarray, np.ndarray], dtype: torch.dtype,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    return tuple(torch.as_tensor(a, dtype=dtype, device=device) for a in rule)


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
                   need_derivative: bool, *, degree: int) -> tuple[Tensor, Tensor | None]:
    """Flat ``(P,)`` correlations and standard deviations -> ``(P,)`` expectations."""
    z, w = _rule_tensors(_hermite_numpy(degree), rho.dtype, rho.device)
    t = torch.empty_like(rho)
    dt = torch.empty_like(rho) if need_derivative else None
    chunk = _pairs_per_chunk(rho.device, degree * degree)
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


def _grading_levels(sigma: float) -> int:
    """Graded edge pairs ``±2^k/σ``, ``k < levels``, up to the first at ``|z| >= 2``.

    Beyond it the grid's panels (length 2) are no longer than their distance to the
    argument's zero, as the graded ones.
    """
    if not sigma > 0:
        return 0
    return max(0, math.ceil(math.log2(2 * sigma / _GRADING_START)) + 1)


def _panel_nodes(center: Tensor, scale: Tensor, levels: int,
                 nodes: int) -> tuple[Tensor, Tensor]:
    """Nodes and weights ``(..., M)`` for ``E[f(scale·(z - center))]``, ``z ~ N(0, 1)``.

    Panels on ``[-_Z_MAX, _Z_MAX]`` between the fixed grid, the argument's zero and the
    graded edges ``center ± 2^k/scale``; edges outside the range are clamped onto its ends
    (empty panels), so every entry has the same ``M = nodes·(len(_GRID) + 2·levels)``
    nodes. A zero scale (a constant argument) leaves only the grid and the centre.
    """
    dtype, device = center.dtype, center.device
    grid = torch.tensor(_GRID, dtype=dtype, device=device).expand(*center.shape, -1)
    grading = _GRADING_START * 2.0 ** torch.arange(levels, dtype=dtype, device=device)
    offsets = grading / scale[..., None]                  # inf for a zero scale
    c = center[..., None]
    edges = torch.cat([grid, c, c - offsets, c + offsets], -1)
    edges = edges.clamp_(-_Z_MAX, _Z_MAX).sort(-1).values
    x, w = _rule_tensors(_legendre_numpy(nodes), dtype, device)
    half = (edges[..., 1:, None] - edges[..., :-1, None]) / 2  # (..., panels, 1)
    z = torch.addcmul(edges[..., :-1, None] + half, half, x)   # (..., panels, nodes)
    weights = torch.mul(z, z).mul_(-0.5).exp_().mul_(half).mul_(w)
    return z.flatten(-2), weights.flatten(-2)


def _gauss_legendre_panels(phi: Callable[[Tensor], Tensor], rho: Tensor, s1: Tensor,
                           s2: Tensor, need_derivative: bool, *, nodes: int,
                           levels: int) -> tuple[Tensor, Tensor | None]:
    """Flat ``(P,)`` correlations and standard deviations -> ``(P,)`` expectations.

    ``E[f(u) g(v)] = E_z1[f(σa z1) E[g(μ + τ z2)]]`` with ``μ = ρ σb z1``,
    ``τ = σb √(1-ρ²)``, both integrals on panels graded towards the argument's zero
    (:func:`_panel_nodes`); σa is the larger of the two standard deviations (``T`` is
    symmetric in them), so that the outer grading, at its scale, also resolves the inner
    expectation, a smoothed ``g`` of scale at least ``1/σb`` in ``z1``. At ``|ρ| = 1``,
    ``τ = 0`` makes the inner integrand constant: exact.
    """
    t = torch.empty_like(rho)
    dt = torch.empty_like(rho) if need_derivative else None
    m = nodes * (len(_GRID) + 2 * levels)
    chunk = _pairs_per_chunk(rho.device, m * m)
    for start in range(0, rho.numel(), chunk):
        sl = slice(start, start + chunk)
        r = rho[sl]
        sa, sb = torch.maximum(s1[sl], s2[sl]), torch.minimum(s1[sl], s2[sl])
        z1, w1 = _panel_nodes(torch.zeros_like(sa), sa, levels, nodes)     # (P, M)
        tau = sb * torch.sqrt(1 - r * r)
        mu = (r * sb)[:, None] * z1                                        # (P, M)
        # Where τ = 0 the centre is ±inf (or nan at μ = 0): clamped, it only adds edges.
        center = mu.div(tau[:, None]).neg_().nan_to_num_(0.0).clamp_(-_Z_MAX, _Z_MAX)
        z2, w2 = _panel_nodes(center, tau[:, None].expand_as(mu), levels, nodes)  # (P, M, M)
        fu, dfu = _values_and_derivatives(phi, sa[:, None] * z1, need_derivative)
        v = z2.mul_(tau[:, None, None]).add_(mu[..., None])
        fv, dfv = _values_and_derivatives(phi, v, need_derivative)
        t[sl] = torch.einsum("pi,pi,pi->p", w1, fu, (w2 * fv).sum(-1))
        if dt is not None:
            dt[sl] = torch.einsum("pi,pi,pi->p", w1, dfu, (w2 * dfv).sum(-1))
    return t, dt


class _Candidate(NamedTuple):
    cost: float        # time a pair, in Gauss–Hermite node evaluations
    family: str
    accuracy: float    # the variable in which the family's error decays exponentially
    description: str
    rule: Rule


def _candidates(v_hi: float) -> list[_Candidate]:
    """Every rule for variances up to ``v_hi``, cheapest first.

    Gauss–Hermite errors decay like ``e^{-a√degree}`` on functions analytic in a strip;
    those of the panels geometrically in the nodes a panel.
    """
    levels = _grading_levels(math.sqrt(v_hi))
    panels = len(_GRID) + 2 * levels
    rules = [_Candidate(float(d * d), "hermite", math.sqrt(d), f"Gauss–Hermite degree {d}",
                        functools.partial(_gauss_hermite, degree=d)) for d in DEGREES]
    rules += [_Candidate(_PANEL_COST * (n * panels) ** 2, "panels", float(n),
                         f"{panels} Gauss–Legendre panels of {n} nodes",
                         functools.partial(_gauss_legendre_panels, nodes=n, levels=levels))
              for n in _PANEL_NODES]
    return sorted(rules, key=lambda candidate: candidate.cost)


def _choose_rule(phi: Callable[[Tensor], Tensor], name: str, v_hi: float,
                 device: torch.device) -> tuple[Rule, float]:
    """The cheapest rule whose estimated error is below QUADRATURE_RTOL, and that estimate.

    If none is, the rule with the smallest estimate, with a warning above _WARN_RTOL.
    Probes sit at the largest variance, where the Gaussian is widest relative to the
    features of ``φ`` and the rules converge slowest, and at an eighth of it; in float64
    whatever the dtype of the call, so that rounding is not mistaken for the rule's error.
    """
    pairs = torch.tensor([(v_hi, v_hi), (v_hi / 8, v_hi), (v_hi / 8, v_hi / 8)],
                         dtype=torch.float64, device=device).sqrt()
    rhos = torch.tensor([-1, -0.9, -0.5, 0, 0.5, 0.9, 0.99, 1], dtype=torch.float64,
                        device=device)
    s1 = pairs[:, 0].repeat_interleave(len(rhos))
    s2 = pairs[:, 1].repeat_interleave(len(rhos))
    rho = rhos.repeat(len(pairs))
    # Per family: the last rule's values and accuracy, and the last difference between
    # successive rules with the step in accuracy it took.
    state: dict[str, tuple[tuple[Tensor, Tensor], float, tuple[float, float] | None]] = {}
    tiny = torch.finfo(torch.float64).tiny
    best = (math.inf, "", None)
    for candidate in _candidates(v_hi):
        current = candidate.rule(phi, rho, s1, s2, True)
        if candidate.family not in state:
            state[candidate.family] = current, candidate.accuracy, None
            continue
        previous, accuracy, last = state[candidate.family]
        step = candidate.accuracy - accuracy
        difference = max(float((a - b).abs().max() / b.abs().max().clamp_min(tiny))
                         for a, b in zip(previous, current))
        # The previous rule's error is about `difference`. The current one's is smaller
        # by the decay the last step showed, extrapolated to this step at half its rate:
        # convergence can slow down (the panels' errors mix rates), and algebraic
        # convergence (non-smooth φ) shows no decay at all, never mistaken for accuracy.
        error = difference
        if last is not None and 0 < difference < last[0]:
            rate = math.log(last[0] / difference) / last[1]
            error *= math.exp(-rate * step / 2)
        if error <= QUADRATURE_RTOL:
            return candidate.rule, error
        state[candidate.family] = current, candidate.accuracy, (difference, step)
        if error < best[0]:
            best = (error, candidate.description, candidate.rule)
    error, description, rule = best
    if error > _WARN_RTOL:
        warnings.warn(
            f"quadrature of {name} did not converge at variances up to {v_hi:.3g}: the "
            f"estimated relative error of the most accurate rule ({description}) is "
            f"{error:.2g}, which bounds the accuracy of this kernel; a non-smooth "
            "activation or very large pre-activation variances cause this", RuntimeWarning,
            stacklevel=4)
    return rule, error


def quadrature(phi: Callable[[Tensor], Tensor], degree: int | None = DEFAULT_DEGREE,
               name: str | None = None) -> Dual:
    """Dual of any elementwise ``φ`` by quadrature over the bivariate normal.

    For ``(u, v) ~ N(0, [[v1, c], [c, v2]])`` the :class:`Dual` returns
    ``T = E[φ(u) φ(v)]`` and ``T' = E[φ'(u) φ'(v)]`` for broadcastable ``c, v1, v2`` of
    any shape, as tensors of the broadcast shape; ``φ'`` comes from autograd. Write
    ``u = √v1 z1``, ``v = √v2 (ρ z1 + √(1-ρ²) z2)`` with ``ρ = c/√(v1 v2)`` and
    ``z1, z2 ~ N(0, 1)`` independent. Two rules:

    - Gauss–Hermite of ``degree`` nodes per dimension:
      ``E[f(u) g(v)] ≈ Σ_ij w_i w_j f(u_i) g(v_ij)`` on ``degree²`` nodes, exact for
      polynomials of degree ``< 2·degree``. It converges fast while ``φ(σ z)`` is smooth
      on the scale of the Gaussian, slowly when ``φ`` has complex poles at distance ``d``
      from the real axis (``π/2`` for tanh) and ``σ = √v`` is large: in ``z`` they sit at
      ``d/σ``.
    - Nested Gauss–Legendre panels: ``E[f(u) g(v)] = E_z1[f(u) E[g(μ + τ z2)]]`` with
      ``μ = (c/v1) u``, ``τ² = v2 - c²/v1``, taking for ``u`` the larger variance (``T``
      is symmetric). Each integral runs over ``[-9, 9]`` on panels of length 2 (for the
      Gaussian) refined by an edge where the activation's argument is 0 and edges at
      ``±2^k/s`` around it (``s``: the argument's scale in ``z``), so that panels near
      the activation's features are no longer than their distance to them. 8 nodes a
      panel give 1e-10 for tanh, sigmoid, softplus, SiLU and GELU's tanh approximation
      at variances up to 100, on ``176²`` nodes a pair there (``256²`` for the largest
      Gauss–Hermite rule, which misses 1e-8 for tanh from variance 4 on).
      Activations non-smooth only at 0 (ELU, SELU, softsign) converge too, thanks to the
      edge there; at ``ρ = ±1`` the inner integrand is constant, which is exact.

    With ``degree=None`` (default) the rule adapts to ``φ`` and to the variances of each
    call: the cheapest of the Gauss–Hermite rules of ``DEGREES`` (32 ... 256) and the
    panel rules of 4 ... 16 nodes a panel whose estimated error is below
    ``QUADRATURE_RTOL = 1e-8`` relative to the largest entry, on probe pairs at the largest
    variance of the call (and an eighth of it) with correlations from -1 to 1. The
    estimate is the difference from the previous rule of the same family (about that
    rule's error), reduced by the decay the family's last step showed, extrapolated at half
    its rate (in ``√degree`` for Gauss–Hermite, in nodes a panel for the panels); tests
    check it against direct 2-d integration. If no rule qualifies, the one with the
    smallest estimate is used, with a ``RuntimeWarning`` reporting the estimate when it
    exceeds 1e-6 (non-smooth functions with kinks away from 0, like hardtanh or ReLU6).
    Rules are memoised per largest variance (rounded up to a power of ``2^(1/4)``). With
    an explicit ``degree`` the Gauss–Hermite rule of that degree is used. Cost: the
    evaluations of ``φ`` and of its backward pass given above, in chunks of bounded memory.

    Args:
        phi: elementwise tensor function (module or callable), differentiable by autograd.
        degree: Gauss–Hermite nodes per dimension, ``>= 1``, or ``None`` for the adaptive
            choice.
        name: label; defaults to ``phi.__name__`` or ``repr(phi)``.

    Example:
        >>> import torch
        >>> from ntk_torch.analytic.activations import erf
        >>> c = torch.tensor([0.5, 90.0], dtype=torch.float64)
        >>> v = torch.tensor([1.0, 100.0], dtype=torch.float64)
        >>> t, dt = quadrature(torch.erf)(c, v, v)
        >>> t_exact, dt_exact = erf(c, v, v)
        >>> torch.allclose(t, t_exact, rtol=1e-8), torch.allclose(dt, dt_exact, rtol=1e-8)
        (True, True)
    """
    check_int("degree", degree, low=1, optional=True)
    label = f"quadrature({name or getattr(phi, '__name__', None) or repr(phi)})"
    chosen: dict[tuple[int, str], Rule] = {}

    def rule_for(v1: Tensor, v2: Tensor) -> Rule:
        if degree is not None:
            return functools.partial(_gauss_hermite, degree=degree)
        v_hi = float(torch.maximum(v1.max(), v2.max()))
        if not v_hi > 0:
            # every node sits at 0: exact
            return functools.partial(_gauss_hermite, degree=DEGREES[0])
        # Round the largest variance up onto a 2^(1/4) grid so that the blocks and layers
        # of one kernel share a rule (and the memo stays small).
        hi = math.ceil(4 * math.log2(v_hi))
        key = (hi, str(v1.device))
        if key not in chosen:
            chosen[key], _ = _choose_rule(phi, label, 2 ** (hi / 4), v1.device)
        return chosen[key]

    def fn(c: Tensor, v1: Tensor, v2: Tensor, need_derivative: bool):
        _, rho = correlation(c, v1, v2)
        shape = torch.broadcast_shapes(c.shape, v1.shape, v2.shape)
        rule = (rule_for(v1, v2) if rho.numel()
                else functools.partial(_gauss_hermite, degree=DEGREES[0]))
        t, dt = rule(phi, rho.expand(shape).reshape(-1),
                     torch.sqrt(v1).expand(shape).reshape(-1),
                     torch.sqrt(v2).expand(shape).reshape(-1), need_derivative)
        return t.reshape(shape), (dt.reshape(shape) if dt is not None else None)

    return Dual(label, fn, phi)
