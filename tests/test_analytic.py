"""ntk_torch.analytic against independent oracles.

- Closed-form duals against a direct 2-d Gauss–Legendre integration of the bivariate
  normal split at the activations' kinks (numpy, hand-written derivatives).
- The adaptive quadrature against the same oracle, and at variances up to 100 against a
  nested trapezoidal rule in the standard-normal variables: 1e-8 on smooth functions,
  with an honest error estimate.
- Identities between activations and between ``kernel(MLP)`` and ``mlp_kernel``.
- Exactness on models linear in their parameters, whose empirical NTK is deterministic.
- Monte Carlo (``analytic.monte_carlo_kernel``): the mean over seeds of the empirical
  kernels of wide networks converges to the analytic kernel, within a few standard errors
  estimated from the seed-to-seed spread.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import special
from torch import nn

import ntk_torch as nt
from ntk_torch import analytic
from ntk_torch.analytic import _quadrature
from ntk_torch.analytic import activations as A
from ntk_torch.analytic._dual import correlation
from ntk_torch.nn import MLP, Conv2d, Dense, Elementwise
from tests.conftest import assert_close, assert_kernels_within_standard_errors, relative_error

DT = torch.float64

# --------------------------------------------------------------------------- oracle

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(96)


def _half_line(scale: float) -> tuple[np.ndarray, np.ndarray]:
    # Gauss–Legendre on [0, 12·scale]: the normal's tail beyond 12 std is below 1e-32, and
    # 96 nodes reproduce E[uv] = c and the exact GELU kernel to about 1e-14.
    length = 12 * scale
    return (_GL_NODES + 1) * length / 2, _GL_WEIGHTS * length / 2


def bivariate_expectation(f, g, c: float, v1: float, v2: float) -> float:
    """E[f(u) g(v)] for (u, v) ~ N(0, [[v1, c], [c, v2]]), |c| < √(v1 v2).

    Integrates the density over the four quadrants separately so that functions with a
    kink at 0 (ReLU, |·|) are smooth on each piece.
    """
    det = v1 * v2 - c * c
    total = 0.0
    for su in (1.0, -1.0):
        for sv in (1.0, -1.0):
            u, wu = _half_line(math.sqrt(v1))
            v, wv = _half_line(math.sqrt(v2))
            uu, vv = np.meshgrid(su * u, sv * v, indexing="ij")
            density = np.exp(-(v2 * uu**2 - 2 * c * uu * vv + v1 * vv**2) / (2 * det))
            density /= 2 * math.pi * math.sqrt(det)
            total += float(np.einsum("i,j,ij->", wu, wv, f(uu) * g(vv) * density))
    return total


def degenerate_expectation(f, g, sign: float, v1: float, v2: float) -> float:
    """E[f(u) g(v)] when v = sign·√(v2/v1)·u exactly (correlation ±1)."""
    total = 0.0
    for s in (1.0, -1.0):
        z, w = _half_line(1.0)
        z = s * z
        total += float(np.sum(w * f(math.sqrt(v1) * z) * g(sign * math.sqrt(v2) * z)
                              * np.exp(-z**2 / 2) / math.sqrt(2 * math.pi)))
    return total


_GELU_K = math.sqrt(2 / math.pi)


def _gelu_tanh_argument(x):
    return _GELU_K * (x + 0.044715 * x**3)


def _sech2(a):
    # 4e^{-2|a|}/(1 + e^{-2|a|})²: no overflow where cosh(a)² would.
    e = np.exp(-2 * np.abs(a))
    return 4 * e / (1 + e) ** 2


def _leaky(alpha):
    return (lambda x: np.where(x > 0, x, alpha * x)), (lambda x: np.where(x > 0, 1.0, alpha))


NUMPY_ACTIVATIONS = {
    "relu": _leaky(0.0),
    "leaky_relu(0.2)": _leaky(0.2),
    "abs": _leaky(-1.0),
    "identity": (lambda x: x, lambda x: np.ones_like(x)),
    "erf": (special.erf, lambda x: 2 / math.sqrt(math.pi) * np.exp(-x**2)),
    "gelu": (lambda x: x * special.ndtr(x),
             lambda x: special.ndtr(x) + x * np.exp(-x**2 / 2) / math.sqrt(2 * math.pi)),
    "tanh": (np.tanh, lambda x: 1 / np.cosh(x) ** 2),
    "sigmoid": (special.expit, lambda x: special.expit(x) * (1 - special.expit(x))),
    "softplus": (lambda x: np.logaddexp(0, x), special.expit),
    "silu": (lambda x: x * special.expit(x),
             lambda x: special.expit(x) * (1 + x * (1 - special.expit(x)))),
    "sin": (np.sin, np.cos),
    "gelu_tanh": (lambda x: 0.5 * x * (1 + np.tanh(_gelu_tanh_argument(x))),
                  lambda x: 0.5 * (1 + np.tanh(_gelu_tanh_argument(x)))
                  + 0.5 * x * _GELU_K * (1 + 3 * 0.044715 * x**2)
                  * _sech2(_gelu_tanh_argument(x))),
}

CLOSED_FORMS = {
    "relu": A.relu,
    "leaky_relu(0.2)": A.leaky_relu(0.2),
    "abs": A.leaky_relu(-1.0),
    "identity": A.identity,
    "erf": A.erf,
    "gelu": A.gelu,
}

VARIANCES = ((1.0, 1.0), (0.5, 2.0), (3.0, 0.2), (4.0, 4.0))
CORRELATIONS = [-0.95, -0.5, 0.0, 0.3, 0.8, 0.95]


@functools.lru_cache(maxsize=None)
def oracle_grid(name: str, variances=tuple(VARIANCES)):
    """(c, v1, v2, T, T') over the grid, the correlations ±1 included."""
    f, df = NUMPY_ACTIVATIONS[name]
    rows = []
    for v1, v2 in variances:
        for rho in CORRELATIONS:
            c = rho * math.sqrt(v1 * v2)
            rows.append((c, v1, v2, bivariate_expectation(f, f, c, v1, v2),
                         bivariate_expectation(df, df, c, v1, v2)))
        for sign in (1.0, -1.0):
            rows.append((sign * math.sqrt(v1 * v2), v1, v2,
                         degenerate_expectation(f, f, sign, v1, v2),
                         degenerate_expectation(df, df, sign, v1, v2)))
    return [torch.tensor(col, dtype=DT) for col in zip(*rows)]


def assert_dual_matches(dual, name, rtol, variances=VARIANCES):
    c, v1, v2, t, dt = oracle_grid(name, variances)
    got_t, got_dt = dual(c, v1, v2)
    assert_close(got_t, t, rtol)
    assert_close(got_dt, dt, rtol)


# ------------------------------------------------------------------ closed forms


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_closed_forms_match_direct_integration(name):
    # The oracle's own error is ~1e-14 (96-node Gauss–Legendre per half-line).
    assert_dual_matches(CLOSED_FORMS[name], name, rtol=1e-10)


def test_oracle_reproduces_known_moments():
    # E[uv] = c and E[relu(u)²] = v/2 pin down the oracle itself.
    c, v1, v2, t, _ = oracle_grid("identity")
    assert_close(t, c, 1e-12)
    f, _ = NUMPY_ACTIVATIONS["relu"]
    assert degenerate_expectation(f, f, 1.0, 3.0, 3.0) == pytest.approx(1.5, rel=1e-13)


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "softplus", "silu", "sin", "erf", "gelu"])
def test_quadrature_matches_direct_integration_on_smooth_activations(name):
    phi = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "softplus": nn.Softplus(),
           "silu": nn.SiLU(), "sin": torch.sin, "erf": torch.erf, "gelu": nn.GELU()}[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no convergence warning at these variances
        assert_dual_matches(A.quadrature(phi), name, rtol=A.QUADRATURE_RTOL)


def test_quadrature_agrees_with_closed_forms_on_a_random_grid():
    g = torch.Generator().manual_seed(0)
    v1 = torch.rand(7, 1, generator=g, dtype=DT) * 3 + 0.1
    v2 = torch.rand(1, 9, generator=g, dtype=DT) * 3 + 0.1
    c = (torch.rand(7, 9, generator=g, dtype=DT) * 2 - 1) * (v1 * v2).sqrt()
    for closed, phi in ((A.erf, torch.erf), (A.gelu, nn.GELU()), (A.relu, None)):
        if phi is None:
            continue
        t, dt = closed(c, v1, v2)
        qt, qdt = A.quadrature(phi)(c, v1, v2)
        assert qt.shape == (7, 9)
        assert_close(qt, t, A.QUADRATURE_RTOL)
        assert_close(qdt, dt, A.QUADRATURE_RTOL)


def test_quadrature_warns_on_non_smooth_activations():
    one = torch.ones(3, dtype=DT)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        A.quadrature(nn.Hardtanh())(0.5 * one, one, one)


def test_quadrature_with_fixed_degree_is_exact_for_polynomials():
    # Degree K integrates polynomials of degree < 2K exactly: E[u³ v³] = 9 c v1 v2 + 6 c³.
    c, v1, v2 = (torch.tensor([x], dtype=DT) for x in (0.3, 1.2, 0.7))
    t, dt = A.quadrature(lambda x: x**3, degree=4)(c, v1, v2)
    assert_close(t, 9 * c * v1 * v2 + 6 * c**3, 1e-13)
    assert_close(dt, 9 * (v1 * v2 + 2 * c**2), 1e-13)  # E[3u² 3v²]


# ------------------------------------------------------- quadrature at large variances

# Half-width, in the activation's own argument, of the strip around the real axis where it
# is analytic (its nearest complex singularities): tanh ±iπ/2; sigmoid, softplus and SiLU
# ±iπ; GELU's tanh approximation about ±0.63 ± 2.75i. sin is entire; 3 resolves its
# oscillation at the trapezoidal steps below.
STRIPS = {"tanh": math.pi / 2, "sigmoid": math.pi, "softplus": math.pi, "silu": math.pi,
          "gelu_tanh": 2.7, "sin": 3.0}
TORCH_ACTIVATIONS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "softplus": nn.Softplus(),
                     "silu": nn.SiLU(), "gelu_tanh": nn.GELU(approximate="tanh"),
                     "sin": torch.sin}
LARGE_VARIANCES = ((1e-3, 1e-3), (0.5, 0.5), (6.7, 6.7), (25.0, 25.0), (100.0, 100.0),
                   (1e-3, 100.0), (100.0, 0.5), (25.0, 6.7))
LARGE_CORRELATIONS = (-1.0, -0.9, 0.0, 0.5, 0.99, 1.0)


def _trapezoid(step: float) -> tuple[np.ndarray, np.ndarray]:
    # N(0, 1) on [-10, 10], outside which its mass is 2e-23.
    z = np.arange(-math.ceil(10 / step), math.ceil(10 / step) + 1) * step
    return z, step * np.exp(-z**2 / 2) / math.sqrt(2 * math.pi)


def trapezoid_expectation(f, g, rho: float, v1: float, v2: float, strip: float) -> float:
    """E[f(u) g(v)] for u = √v1 z1, v = √v2 (ρ z1 + √(1-ρ²) z2), z1, z2 ~ N(0, 1).

    The trapezoidal rule, in z2 for each z1 and then in z1 (in z1 alone at ρ = ±1). On the
    real line its error on an integrand analytic in |Im z| < a decays like e^{-2πa/h}; f(σz)
    is analytic in |Im z| < strip/σ, so steps of a tenth of that (at most 1/4, for the
    Gaussian) leave e^{-60} times the growth near the poles: reproduced to 1e-14 by nested
    adaptive quadrature (scipy) and the closed forms.
    """
    s1, s2, tau = math.sqrt(v1), math.sqrt(v2), math.sqrt(max(0.0, 1 - rho * rho))
    z1, w1 = _trapezoid(min(0.25, strip / (10 * max(s1, abs(rho) * s2))))
    if tau == 0.0:
        return float(np.sum(w1 * f(s1 * z1) * g(rho * s2 * z1)))
    z2, w2 = _trapezoid(min(0.25, strip / (10 * s2 * tau)))
    v = s2 * (rho * z1[:, None] + tau * z2)
    return float(np.einsum("i,i,ij,j->", w1, f(s1 * z1), g(v), w2))


@functools.lru_cache(maxsize=None)
def trapezoid_grid(name: str, v1: float, v2: float):
    """(c, v1, v2, T, T') over LARGE_CORRELATIONS at variances v1, v2."""
    f, df = NUMPY_ACTIVATIONS[name]
    rows = [(rho * math.sqrt(v1 * v2), v1, v2,
             trapezoid_expectation(f, f, rho, v1, v2, STRIPS[name]),
             trapezoid_expectation(df, df, rho, v1, v2, STRIPS[name]))
            for rho in LARGE_CORRELATIONS]
    return [torch.tensor(col, dtype=DT) for col in zip(*rows)]


def test_trapezoid_reference_matches_adaptive_quadrature_and_closed_forms():
    from scipy import integrate

    # Nested scipy.integrate.quad (adaptive Gauss–Kronrod, split where tanh's argument is
    # 0) on tanh at variance 100, where its poles are nearest the real axis in z.
    rho, s, tau = 0.5, 10.0, math.sqrt(0.75)

    def normal(z):
        return math.exp(-z * z / 2) / math.sqrt(2 * math.pi)

    def inner(z1):
        mu = rho * s * z1
        return integrate.quad(lambda z2: math.tanh(mu + s * tau * z2) * normal(z2), -10, 10,
                              points=[-mu / (s * tau)], epsabs=1e-13, epsrel=1e-11,
                              limit=200)[0]

    nested = integrate.quad(lambda z1: math.tanh(s * z1) * normal(z1) * inner(z1), -10, 10,
                            points=[0.0], epsabs=1e-13, epsrel=1e-11, limit=200)[0]
    reference = trapezoid_expectation(np.tanh, np.tanh, rho, 100.0, 100.0, STRIPS["tanh"])
    assert reference == pytest.approx(nested, rel=1e-12)
    # erf is entire; tanh's strip.
    f, df = NUMPY_ACTIVATIONS["erf"]
    t, dt = A.erf(*(torch.tensor([x], dtype=DT) for x in (90.0, 100.0, 100.0)))
    assert trapezoid_expectation(f, f, 0.9, 100.0, 100.0, math.pi / 2) == pytest.approx(
        float(t), rel=1e-13)
    assert trapezoid_expectation(df, df, 0.9, 100.0, 100.0, math.pi / 2) == pytest.approx(
        float(dt), rel=1e-13)


@pytest.mark.parametrize("name", sorted(TORCH_ACTIVATIONS))
def test_quadrature_reaches_its_tolerance_at_large_variances(name):
    # Relative to the largest |T| (|T'|) of each call. sin is left out at unequal variances:
    # there E[sin u sin v] = e^{-(v1+v2)/2} sinh(c) is ~e^{-50} against terms of order 1.
    dual = A.quadrature(TORCH_ACTIVATIONS[name])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no convergence warning
        for v1, v2 in LARGE_VARIANCES:
            if name == "sin" and v1 != v2:
                continue
            c, v1_, v2_, t, dt = trapezoid_grid(name, v1, v2)
            got_t, got_dt = dual(c, v1_, v2_)
            assert_close(got_t, t, A.QUADRATURE_RTOL)
            assert_close(got_dt, dt, A.QUADRATURE_RTOL)


@pytest.mark.parametrize("name", sorted(TORCH_ACTIVATIONS))
def test_quadrature_error_estimate_bounds_the_error(name):
    phi = TORCH_ACTIVATIONS[name]
    for v in (0.5, 6.7, 25.0, 100.0):
        rule, estimate = _quadrature._choose_rule(phi, name, v, torch.device("cpu"))
        assert estimate <= A.QUADRATURE_RTOL
        c, v1, v2, t, dt = trapezoid_grid(name, v, v)
        _, rho = correlation(c, v1, v2)
        got_t, got_dt = rule(phi, rho, v1.sqrt(), v2.sqrt(), True)
        # Below 1e-13 both the estimate and this comparison are rounding.
        assert relative_error(got_t, t) <= max(estimate, 1e-13)
        assert relative_error(got_dt, dt) <= max(estimate, 1e-13)


@pytest.mark.parametrize("phi, closed", [(torch.erf, A.erf), (nn.GELU(), A.gelu)])
def test_quadrature_agrees_with_closed_forms_at_variance_100(phi, closed):
    rho = torch.tensor(LARGE_CORRELATIONS, dtype=DT)
    for v1, v2 in ((100.0, 100.0), (100.0, 0.5)):
        c = rho * math.sqrt(v1 * v2)
        v1_, v2_ = torch.full_like(c, v1), torch.full_like(c, v2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got_t, got_dt = A.quadrature(phi)(c, v1_, v2_)
        t, dt = closed(c, v1_, v2_)
        assert_close(got_t, t, A.QUADRATURE_RTOL)
        assert_close(got_dt, dt, A.QUADRATURE_RTOL)


def test_leaky_relu_is_a_combination_of_relus():
    # φ_α(u) = relu(u) - α relu(-u), so T_α(c) = (1 + α²) J(c) - 2α J(-c) with J relu's
    # dual, and φ_α'(u) = step(u) + α step(-u) gives T_α' = (1 + α²) J'(c) + 2α J'(-c).
    g = torch.Generator().manual_seed(1)
    v1, v2 = torch.rand(5, generator=g, dtype=DT) + 0.2, torch.rand(5, generator=g, dtype=DT) + 0.2
    c = (torch.rand(5, generator=g, dtype=DT) * 2 - 1) * (v1 * v2).sqrt()
    j, dj = A.relu(c, v1, v2)
    jm, djm = A.relu(-c, v1, v2)
    for alpha in (-1.0, 0.0, 0.2, 1.0):
        t, dt = A.leaky_relu(alpha)(c, v1, v2)
        assert_close(t, (1 + alpha**2) * j - 2 * alpha * jm)
        assert_close(dt, (1 + alpha**2) * dj + 2 * alpha * djm)


@pytest.mark.parametrize("spec, name", [
    (nn.ReLU(), "relu"), ("relu", "relu"), (torch.relu, "relu"),
    (nn.LeakyReLU(0.0), "leaky_relu(0)"), (nn.LeakyReLU(0.1), "leaky_relu(0.1)"),
    ("abs", "leaky_relu(-1)"), (torch.abs, "leaky_relu(-1)"),
    ("erf", "erf"), (torch.erf, "erf"), (Elementwise(torch.erf), "erf"), ("gelu", "gelu"),
    (nn.GELU(approximate="tanh"), "quadrature(GELU(approximate='tanh'))"),
    ("tanh", "quadrature(Tanh())"), (torch.sin, "quadrature(sin)"),
])
def test_dual_resolution(spec, name):
    assert A.dual(spec).name == name


# ------------------------------------------------------------------ identities


def _x(n=5, d=3, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=DT)


def test_leaky_relu_with_slope_zero_equals_relu():
    x = _x()
    a = analytic.mlp_kernel(x, depth=3, activation=nn.LeakyReLU(0.0), bias_std=0.3)
    b = analytic.mlp_kernel(x, depth=3, activation="relu", bias_std=0.3)
    assert_close(a.nngp, b.nngp)
    assert_close(a.ntk, b.ntk)


def test_abs_equals_leaky_relu_with_slope_minus_one():
    x = _x()
    a = analytic.mlp_kernel(x, depth=2, activation="abs", weight_std=1.3)
    b = analytic.mlp_kernel(x, depth=2, activation=nn.LeakyReLU(-1.0), weight_std=1.3)
    assert_close(a.ntk, b.ntk)
    assert_close(a.nngp, b.nngp)


@pytest.mark.parametrize("activation", ["identity", nn.LeakyReLU(1.0)])
def test_identity_activation_gives_the_linear_kernel(activation):
    # Linear network, NTK parameterization: Σˡ = σ_w^{2(l+1)} K + β² Σ_{j<=l} σ_w^{2j},
    # Θ^L = Σ_l Σ^L-with-layer-l-as-the-trained-one = Σ_{l=0}^{L} σ_w^{2(L-l)} Σˡ.
    x, sw, b, depth = _x(), 1.3, 0.4, 3
    k0 = x @ x.T / x.shape[1]
    sigmas = [sw ** (2 * (layer + 1)) * k0 + b**2 * sum(sw ** (2 * j) for j in range(layer + 1))
              for layer in range(depth + 1)]
    theta = sum(sw ** (2 * (depth - layer)) * sigmas[layer] for layer in range(depth + 1))
    k = analytic.mlp_kernel(x, depth=depth, activation=activation, weight_std=sw, bias_std=b)
    assert_close(k.nngp, sigmas[-1])
    assert_close(k.ntk, theta)


@pytest.mark.parametrize("parameterization", ["ntk", "standard", "mup"])
@pytest.mark.parametrize("activation, bias", [("relu", True), ("erf", False), ("gelu", True),
                                              (nn.Tanh(), True)])
def test_kernel_of_mlp_equals_mlp_kernel(parameterization, activation, bias):
    x1, x2 = _x(4, 3, 0), _x(3, 3, 1)
    net = MLP(3, 40, 2, 2, activation=activation, parameterization=parameterization,
              weight_std=1.2, bias_std=0.3, bias=bias)
    a = analytic.kernel(net, x1, x2)
    b = analytic.mlp_kernel(x1, x2, depth=2, activation=activation, weight_std=1.2, bias_std=0.3,
                            parameterization=parameterization, width=40, bias=bias)
    assert a.ntk.shape == (4, 3) and a.nngp.shape == (4, 3)
    assert_close(a.nngp, b.nngp)
    assert_close(a.ntk, b.ntk)


def test_ntk_parameterization_does_not_depend_on_width():
    x = _x()
    a = analytic.mlp_kernel(x, depth=2, bias_std=0.2, width=10)
    b = analytic.mlp_kernel(x, depth=2, bias_std=0.2)
    assert_close(a.ntk, b.ntk)


def test_standard_ntk_grows_linearly_with_width():
    # Θ = n·A + B in the standard parameterization: second differences in n vanish.
    x = _x()
    k = [analytic.mlp_kernel(x, depth=2, parameterization="standard", width=n).ntk
         for n in (10, 20, 30)]
    assert float((k[2] - 2 * k[1] + k[0]).abs().max()) <= 1e-12 * float(k[2].abs().max())
    assert float((k[1] - k[0]).abs().min()) > 0


def test_mup_nngp_vanishes_like_one_over_width():
    x = _x()
    a = analytic.mlp_kernel(x, depth=2, parameterization="mup", width=100).nngp
    b = analytic.mlp_kernel(x, depth=2, parameterization="mup", width=400).nngp
    assert_close(b, a / 4)


def test_symmetry_blocks_and_x2():
    x = _x(9)
    net = MLP(3, 10, 3, 1, activation="gelu", bias_std=0.5)
    full = analytic.kernel(net, x)
    assert torch.equal(full.ntk, full.ntk.T)
    blocked = analytic.kernel(net, x, batch_size=2)
    cross = analytic.kernel(net, x, x.clone(), batch_size=4)
    for k in (blocked, cross):
        assert_close(k.ntk, full.ntk)
        assert_close(k.nngp, full.nngp)


def test_identical_inputs_do_not_depend_on_the_blocking():
    # ρ = 1 for an input with itself up to rounding, which arccos would amplify to 1e-9 at
    # depth 10; it is snapped to 1, so a corner of a blocked kernel equals the kernel of
    # those points alone to rounding.
    x = _x(40, 8)
    full = analytic.mlp_kernel(x, depth=10, bias_std=0.1, batch_size=16)
    part = analytic.mlp_kernel(x[:10], depth=10, bias_std=0.1)
    assert_close(full.ntk[:10, :10], part.ntk, 1e-13)
    assert_close(full.nngp[:10, :10], part.nngp, 1e-13)


def test_benchmark_smoke(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_analytic.py"
    spec = importlib.util.spec_from_file_location("bench_analytic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        assert module.main(["--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["checks"]["finite"] and config["checks"]["symmetric"]
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 1 + 6


# ------------------------------------------------- models linear in their parameters


@pytest.mark.parametrize("layer", [
    nn.Linear(4, 3),
    Dense(4, 3, parameterization="ntk", weight_std=1.5, bias_std=0.5),
    Dense(4, 3, parameterization="mup", role="input", weight_std=1.5, bias_std=0.5),
    Dense(4, 3, parameterization="standard", bias=False),
])
def test_linear_layer_ntk_is_exact(layer):
    # J does not depend on the weights, so the empirical NTK equals its expectation.
    layer = layer.double()
    x = _x(5, 4)
    expected = nt.empirical_ntk(layer, x, mode="trace")
    assert_close(analytic.kernel(layer, x).ntk, expected)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(2, 3, 3, padding="same"),
    nn.Conv2d(2, 3, (2, 3), padding="same", dilation=(1, 2)),
    nn.Conv2d(2, 3, 2, padding=0),
    nn.Conv2d(2, 3, 3, padding=(1, 0), bias=False),
    Conv2d(2, 3, 2, parameterization="ntk", weight_std=1.4, bias_std=0.3),
    Conv2d(2, 3, 3, parameterization="standard", padding="valid"),
])
def test_single_convolution_ntk_is_exact(conv):
    # The per-output NTK of a conv layer is the mean over output pixels of the patch
    # inner products: deterministic, so analytic and empirical agree to rounding.
    conv = conv.double()
    x = torch.randn(3, 2, 5, 4, generator=torch.Generator().manual_seed(3), dtype=DT)
    expected = nt.empirical_ntk(conv, x, mode="trace")
    assert_close(analytic.kernel(conv, x).ntk, expected)


def test_frozen_parameters_contribute_no_ntk():
    layer = nn.Linear(4, 2).double()
    layer.bias.requires_grad_(False)
    x = _x(5, 4)
    assert_close(analytic.kernel(layer, x).ntk, x @ x.T)  # the bias's +1 is gone
    assert_close(analytic.kernel(layer, x).ntk, nt.empirical_ntk(layer, x, mode="trace"))


def test_conv_nngp_matches_patch_inner_products():
    # Σ(p, p') = m² s² Σ_{c,δ} x_c(p+δ) x'_c(p'+δ) + m_b² s_b², via unfold, after pooling.
    conv = Conv2d(2, 5, 3, parameterization="standard", weight_std=1.3, bias_std=0.7)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(4), dtype=DT)
    patches = torch.nn.functional.unfold(x, 3, padding=1)  # (N, C·9, P)
    pair = torch.einsum("akp,bkq->abpq", patches, patches)
    expected = conv.init_std**2 * pair.mean(dim=(2, 3)) + conv.bias_std**2
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert_close(analytic.kernel(model, x).nngp, expected)


# ------------------------------------------------------------------ numerics


@pytest.mark.parametrize("activation", ["relu", "erf", "gelu", "tanh", nn.LeakyReLU(0.1)])
def test_depth_100_and_zero_inputs_stay_finite(activation):
    x = _x(4)
    x[1] = 0.0
    x[2] = x[3]  # correlation exactly 1, where rounding would leave [-1, 1]
    k = analytic.mlp_kernel(x, depth=100, activation=activation, weight_std=1.4, bias_std=0.1)
    assert torch.isfinite(k.ntk).all() and torch.isfinite(k.nngp).all()
    assert k.ntk.dtype == torch.float64
    assert float(k.ntk.diagonal().min()) > 0


def test_zero_input_without_bias_has_zero_kernel():
    x = _x(3)
    x[0] = 0.0
    k = analytic.mlp_kernel(x, depth=3, weight_std=1.5)
    assert torch.count_nonzero(k.ntk[0]) == 0 and torch.count_nonzero(k.nngp[:, 0]) == 0
    assert not torch.isnan(k.ntk).any()


def test_float32_inputs_are_computed_in_float64_unless_asked():
    x = _x().float()
    assert analytic.mlp_kernel(x, depth=2).ntk.dtype == torch.float64
    k32 = analytic.mlp_kernel(x, depth=2, dtype=torch.float32)
    assert k32.ntk.dtype == torch.float32
    assert_close(k32.ntk, analytic.mlp_kernel(x, depth=2).ntk.float(), 1e-5)


def test_empty_inputs():
    k = analytic.kernel(MLP(3, 4, 1, 1), torch.zeros(0, 3, dtype=DT), _x(2))
    assert k.ntk.shape == (0, 2) and k.nngp.shape == (0, 2)


def test_model_is_not_changed():
    net = MLP(3, 4, 2, 1)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    analytic.kernel(net, _x())
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# ------------------------------------------------------------------ Monte Carlo


MC_SEEDS = 32


@pytest.mark.slow
@pytest.mark.parametrize("parameterization, activation, depth", [
    ("ntk", "erf", 2), ("standard", "gelu", 1), ("mup", "relu", 2),
])
def test_monte_carlo_mlp(parameterization, activation, depth):
    x = _x(5, 4, seed=5)
    build = lambda: MLP(4, 256, depth, 2, activation=activation, parameterization=parameterization,  # noqa: E731
                        weight_std=1.2, bias_std=0.3)
    mc = analytic.monte_carlo_kernel(lambda seed: build(), x, n_samples=MC_SEEDS,
                                     progress=False)
    assert_kernels_within_standard_errors(mc, analytic.kernel(build(), x))


@pytest.mark.slow
def test_monte_carlo_plain_sequential_with_default_init():
    # PyTorch's uniform init reaches Gaussian pre-activations by the central limit theorem
    # over the fan-in, so the input dimension is taken wide too (its non-Gaussianity
    # biases the mean kernel by O(1/d)).
    x = _x(5, 128, seed=6)
    build = lambda: nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Dropout(0.2),  # noqa: E731
                                  nn.Linear(256, 256), nn.Tanh(), nn.Identity(), nn.Linear(256, 1))
    mc = analytic.monte_carlo_kernel(lambda seed: build(), x, n_samples=MC_SEEDS,
                                     progress=False)
    assert_kernels_within_standard_errors(mc, analytic.kernel(build(), x))


@pytest.mark.slow
@pytest.mark.parametrize("head", ["pool", "flatten"])
def test_monte_carlo_small_cnn(head):
    x = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(7), dtype=DT)
    if head == "pool":  # plain layers, default init
        build = lambda: nn.Sequential(  # noqa: E731
            nn.Conv2d(2, 64, 3, padding="same"), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 1))
    else:  # ntk_torch layers, an even kernel and a quadrature activation
        build = lambda: nn.Sequential(  # noqa: E731
            Conv2d(2, 128, 3, bias_std=0.2), nn.ReLU(), Conv2d(128, 64, 2, padding="same"),
            nn.SiLU(), nn.Flatten(), Dense(64 * 25, 1, parameterization="standard"))
    mc = analytic.monte_carlo_kernel(lambda seed: build(), x, n_samples=MC_SEEDS,
                                     progress=False)
    assert_kernels_within_standard_errors(mc, analytic.kernel(build(), x))


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("model, match", [
    (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)),
     "cannot read layer '1' \\(BatchNorm1d\\); supported layers"),
    (nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 1)), "'1'.*has parameters"),
    (nn.Sequential(nn.Flatten(0)), "only nn.Flatten\\(start_dim=1, end_dim=-1\\)"),
    (nn.Sequential(nn.MaxPool2d(2)), "\\(MaxPool2d module '0'\\).*supported layers"),
    (nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=1))), "'0.1' \\(Softmax\\)"),
])
def test_unsupported_layers_are_named(model, match):
    with pytest.raises(ValueError, match=match):
        analytic.kernel(model, _x())


@pytest.mark.parametrize("model, x, match", [
    (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Tanh(), nn.Linear(4, 1)), _x(),
     "layer '2' \\(Tanh\\): the activation .* needs Gaussian pre-activations"),
    (nn.Sequential(nn.ReLU(), nn.Linear(3, 1)), _x(), "layer '0' \\(ReLU\\)"),
    (nn.Sequential(nn.Linear(5, 1)), _x(), "layer '0' \\(Linear\\): this dense layer expects 5 "
     "input features, but the previous layers give 3"),
    (nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Linear(4, 1)), torch.randn(2, 2, 4, 4),
     "layer '1' \\(Linear\\): a dense layer needs vector inputs.*nn.Flatten"),
    (nn.Sequential(nn.Conv2d(2, 3, 3)), _x(), "needs inputs of shape \\(N, C, H, W\\)"),
    (nn.Sequential(nn.Conv2d(2, 3, 5)), torch.randn(2, 2, 4, 4),
     "does not fit images of size \\(4, 4\\)"),
    (nn.Sequential(nn.Linear(3, 1)), torch.randn(2, 3, 4),
     "layer '0' \\(Linear\\): a dense layer needs vector inputs"),
    (nn.Sequential(nn.Linear(3, 1)), torch.randn(2, 3, 4, 4, 4),
     "inputs must have shape \\(N, features\\)"),
])
def test_inconsistent_models_are_named(model, x, match):
    with pytest.raises(ValueError, match=match):
        analytic.kernel(model, x)


def test_bad_arguments():
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        analytic.kernel(lambda x: x, _x())
    with pytest.raises(ValueError,
                       match="`x2` must share `x1`'s trailing shape \\(3,\\), got \\(4,\\)"):
        analytic.kernel(nn.Linear(3, 1), _x(), _x(2, 4))
    with pytest.raises(TypeError, match="`x1` must be a torch.Tensor"):
        analytic.kernel(nn.Linear(3, 1), [[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="`batch_size` must be a positive int"):
        analytic.kernel(nn.Linear(3, 1), _x(), batch_size=0)
    with pytest.raises(TypeError, match="`dtype` must be a floating torch.dtype"):
        analytic.kernel(nn.Linear(3, 1), _x(), dtype=torch.int64)
    with pytest.raises(ValueError, match="`width` is required with parameterization='standard'"):
        analytic.mlp_kernel(_x(), depth=2, parameterization="standard")
    with pytest.raises(ValueError, match="`parameterization` must be one of"):
        analytic.mlp_kernel(_x(), depth=2, parameterization="NTK")
    with pytest.raises(ValueError, match="`depth` must be an int >= 0, got -1"):
        analytic.mlp_kernel(_x(), depth=-1)
    with pytest.raises(ValueError,
                       match="`x1` must be a tensor of shape \\(N1, d\\), got \\(2, 3, 4\\)"):
        analytic.mlp_kernel(torch.randn(2, 3, 4), depth=1)
    with pytest.raises(ValueError, match="`activation` must be one of"):
        analytic.mlp_kernel(_x(), depth=1, activation="swishy")
    with pytest.raises(ValueError, match="must be elementwise"):
        analytic.mlp_kernel(_x(), depth=1, activation=lambda t: t.sum(-1, keepdim=True))
