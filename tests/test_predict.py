"""Kernel toolkit against independent oracles: matrix exponentials and explicit solves,
gradient descent on a linearized network, joint-Gaussian precision matrices,
torch.distributions, explicit Jacobians for the natural NTK."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ntk_torch as nt
from tests.conftest import assert_close
from tests.oracle import naive_jacobian

F64 = torch.float64


def _features(n: int, p: int, seed: int) -> torch.Tensor:
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _trace_blocks(n: int, m: int, p: int = 12, seed: int = 0):
    """K = Φ Φᵀ / p over N train + M test points: a genuine PSD kernel and its blocks."""
    phi = _features(n + m, p, seed)
    k = phi @ phi.T / p
    return k[:n, :n], k[n:, :n], k[n:, n:]


def _full_blocks(n: int, m: int, o: int, p: int = 20, seed: int = 0):
    """Full (·, ·, O, O) kernel from per-sample Jacobians J (N+M, O, P)."""
    g = torch.Generator().manual_seed(seed)
    jac = torch.randn(n + m, o, p, generator=g, dtype=F64) / p**0.5
    k = torch.einsum("aip,bjp->abij", jac, jac)
    return k[:n, :n], k[n:, :n], k[n:, n:]


def _flat(k: torch.Tensor) -> torch.Tensor:
    r, c, o, _ = k.shape
    return k.permute(0, 2, 1, 3).reshape(r * o, c * o)


def _expm_flow(k, k_star, y, f0, f0_star, tau):
    """Closed form by torch.linalg.matrix_exp and an explicit solve (no eigendecomposition)."""
    decay = torch.linalg.matrix_exp(-tau * k)
    train = y + decay @ (f0 - y)
    eye = torch.eye(k.shape[0], dtype=k.dtype)
    test = f0_star + k_star @ torch.linalg.solve(k, (eye - decay) @ (y - f0))
    return train, test


# ----------------------------------------------------------------------- gradient flow

@pytest.mark.parametrize("t, lr", [(0.0, 1.0), (0.7, 1.0), (3.0, 0.25), (40.0, 2.0)])
def test_gradient_flow_matches_matrix_exponential_trace(t, lr):
    k, ks, _ = _trace_blocks(6, 4)
    g = torch.Generator().manual_seed(1)
    y, f0 = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 3, generator=g, dtype=F64)
    f0s = torch.randn(4, 3, generator=g, dtype=F64)
    out = nt.gradient_flow_mse(k, y, f0, t, lr=lr, k_test_train=ks, f0_test=f0s)
    train, test = _expm_flow(k, ks, y, f0, f0s, lr * t)
    # The exponential and the solve lose about cond(K)·eps; cond here is ~1e2.
    assert_close(out.train, train, rtol=1e-9)
    assert_close(out.test, test, rtol=1e-9)


def test_gradient_flow_matches_matrix_exponential_full():
    k, ks, _ = _full_blocks(4, 3, o=2)
    g = torch.Generator().manual_seed(2)
    y, f0 = torch.randn(4, 2, generator=g, dtype=F64), torch.randn(4, 2, generator=g, dtype=F64)
    out = nt.gradient_flow_mse(k, y, f0, 1.3, lr=0.5, k_test_train=ks)
    train, test = _expm_flow(_flat(k), _flat(ks), y.reshape(-1), f0.reshape(-1),
                             torch.zeros(6, dtype=F64), 0.65)
    assert out.train.shape == (4, 2) and out.test.shape == (3, 2)
    assert_close(out.train, train.reshape(4, 2), rtol=1e-9)
    assert_close(out.test, test.reshape(3, 2), rtol=1e-9)


@pytest.mark.parametrize("full", [False, True])
def test_gradient_descent_matches_the_explicit_recursion(full):
    # f ← f − ηΘ(f(X) − y) on the training points, f* ← f* − ηΘ*(f(X) − y), step by step.
    if full:
        k, ks, _ = _full_blocks(5, 3, o=2)
        k_flat, ks_flat = _flat(k), _flat(ks)
    else:
        k, ks, _ = _trace_blocks(5, 3)
        k_flat, ks_flat = k, ks
    g = torch.Generator().manual_seed(3)
    y, f0 = torch.randn(5, 2, generator=g, dtype=F64), torch.randn(5, 2, generator=g, dtype=F64)
    f0s = torch.randn(3, 2, generator=g, dtype=F64)
    lr, steps = 0.9 / float(torch.linalg.eigvalsh(k_flat).max()), 17
    f, fs = f0.reshape(-1) if full else f0, f0s.reshape(-1) if full else f0s
    target = y.reshape(-1) if full else y
    for _ in range(steps):
        residual = f - target
        f, fs = f - lr * k_flat @ residual, fs - lr * ks_flat @ residual
    out = nt.gradient_descent_mse(k, y, f0, steps, lr=lr, k_test_train=ks, f0_test=f0s)
    assert_close(out.train, f.reshape(5, 2), rtol=1e-11)
    assert_close(out.test, fs.reshape(3, 2), rtol=1e-11)


def test_gradient_descent_with_small_steps_tends_to_the_flow():
    # (1 − ηλ)^(t/η) = exp(−tλ)(1 + O(ηλ²t)): the gap shrinks linearly in η.
    k, ks, _ = _trace_blocks(6, 2)
    g = torch.Generator().manual_seed(4)
    y, f0 = torch.randn(6, generator=g, dtype=F64), torch.zeros(6, dtype=F64)
    flow = nt.gradient_flow_mse(k, y, f0, 2.0, k_test_train=ks)
    gaps = []
    for lr in (1e-2, 1e-3):
        out = nt.gradient_descent_mse(k, y, f0, round(2.0 / lr), lr=lr, k_test_train=ks)
        gaps.append(float((out.test - flow.test).abs().max()))
    assert gaps[1] < 0.2 * gaps[0] and gaps[1] < 1e-3


def test_full_kernel_with_identity_output_block_equals_trace_kernel():
    k, ks, _ = _trace_blocks(5, 3)
    eye = torch.eye(2, dtype=F64)
    kf, ksf = torch.einsum("ab,ij->abij", k, eye), torch.einsum("ab,ij->abij", ks, eye)
    y, f0 = _features(5, 2, 3), _features(5, 2, 4)
    a = nt.gradient_flow_mse(k, y, f0, 2.0, k_test_train=ks)
    b = nt.gradient_flow_mse(kf, y, f0, 2.0, k_test_train=ksf)
    assert_close(b.train, a.train)
    assert_close(b.test, a.test)


def test_gradient_flow_at_infinity_is_kernel_regression():
    k, ks, _ = _trace_blocks(6, 4)
    y, f0, f0s = _features(6, 1, 5)[:, 0], _features(6, 1, 6)[:, 0], _features(4, 1, 7)[:, 0]
    out = nt.gradient_flow_mse(k, y, f0, math.inf, k_test_train=ks, f0_test=f0s)
    assert_close(out.train, y)  # K is invertible: the training set is fitted exactly
    assert_close(out.test, f0s + nt.kernel_regression(k, ks, y - f0), rtol=1e-9)
    # f0 = 0: exactly kernel regression, which an explicit solve confirms.
    zero = torch.zeros_like(y)
    out0 = nt.gradient_flow_mse(k, y, zero, float("inf"), k_test_train=ks)
    assert_close(out0.test, ks @ torch.linalg.solve(k, y), rtol=1e-9)
    # t = 0 is the start.
    start = nt.gradient_flow_mse(k, y, f0, 0.0, k_test_train=ks, f0_test=f0s)
    assert_close(start.train, f0)
    assert_close(start.test, f0s)


def test_gradient_flow_on_a_singular_kernel_reaches_the_minimum_norm_fit():
    # A linear model f = Φ θ with P = 3 < N = 6, θ0 = 0: gradient flow converges to the
    # minimum-norm least-squares θ* = Φ⁺ y, so f(X*) = Φ* Φ⁺ y and f(X) = Φ Φ⁺ y.
    phi = _features(9, 3, 8)
    x_phi, s_phi = phi[:6], phi[6:]
    y = _features(6, 1, 9)[:, 0]
    out = nt.gradient_flow_mse(x_phi @ x_phi.T, y, torch.zeros(6, dtype=F64), math.inf,
                               k_test_train=s_phi @ x_phi.T)
    theta = torch.linalg.pinv(x_phi) @ y
    assert_close(out.train, x_phi @ theta, rtol=1e-9)
    assert_close(out.test, s_phi @ theta, rtol=1e-9)
    regression = nt.kernel_regression(x_phi @ x_phi.T, s_phi @ x_phi.T, y)
    assert_close(regression, s_phi @ theta, rtol=1e-9)


def test_small_step_gradient_descent_on_a_linearized_net_matches_gradient_flow():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    g = torch.Generator().manual_seed(10)
    x, xs = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(3, 3, generator=g, dtype=F64)
    y = torch.randn(5, 2, generator=g, dtype=F64)
    names = [n for n, _ in net.named_parameters()]
    jac, jac_s = naive_jacobian(net, x, names), naive_jacobian(net, xs, names)
    k = torch.einsum("aip,bjp->abij", jac, jac)
    ks = torch.einsum("aip,bjp->abij", jac_s, jac)
    f0, f0s = net(x).detach(), net(xs).detach()

    lam_max = float(torch.linalg.eigvalsh(_flat(k)).max())
    h = 4e-3 / lam_max  # step: h·λ_max = 4e-3
    steps = 500  # τ = steps·h, so τ·λ_max = 2
    lin = nt.linearize(net)
    opt = torch.optim.SGD(lin.parameters(), lr=h)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (lin(x) - y).pow(2).sum()).backward()
        opt.step()
    flow = nt.gradient_flow_mse(k, y, f0, steps, lr=h, k_test_train=ks, f0_test=f0s)

    # Per eigenvalue λ, GD shrinks the residual by (1 - hλ)^k and the flow by e^{-khλ};
    # since 0 ≤ e^{-x} - (1 - x) ≤ x²/2, they differ by at most k(hλ)²/2. Summed over the
    # spectrum this bounds the train error by k(hλ_max)²/2·‖r0‖ and the test error by
    # ‖Θ*‖·k·h²·λ_max/2·‖r0‖.
    r0 = float((y - f0).norm())
    bound_train = steps * (h * lam_max) ** 2 / 2 * r0
    bound_test = float(torch.linalg.matrix_norm(_flat(ks), ord=2)) * steps * h**2 * lam_max / 2 * r0
    err_train = float((lin(x).detach() - flow.train).abs().max())
    err_test = float((lin(xs).detach() - flow.test).abs().max())
    assert err_train <= bound_train, (err_train, bound_train)
    assert err_test <= bound_test, (err_test, bound_test)
    # The bound is not vacuous: training moved the outputs far more than it allows.
    assert float((flow.train - f0).abs().max()) > 20 * bound_train


# ----------------------------------------------------------------------- regression and GPs

def test_kernel_regression_matches_explicit_solve():
    k, ks, _ = _trace_blocks(6, 3)
    y = _features(6, 2, 11)
    eye = torch.eye(6, dtype=F64)
    expected = ks @ torch.linalg.solve(k + 0.3 * eye, y)
    assert_close(nt.kernel_regression(k, ks, y, ridge=0.3), expected)
    kf, ksf, _ = _full_blocks(4, 2, o=3)
    yf = _features(4, 3, 12)
    ridged = _flat(kf) + 0.1 * torch.eye(12, dtype=F64)
    expected = _flat(ksf) @ torch.linalg.solve(ridged, yf.reshape(-1))
    assert_close(nt.kernel_regression(kf, ksf, yf, ridge=0.1), expected.reshape(2, 3))


def _conditional_via_precision(joint: torch.Tensor, n: int, y: torch.Tensor):
    """Condition the last block of a joint Gaussian on the first n entries through the
    precision matrix Λ = C⁻¹: cov = Λ_**⁻¹, mean = -Λ_**⁻¹ Λ_*x y."""
    prec = torch.linalg.inv(joint)
    cov = torch.linalg.inv(prec[n:, n:])
    return -cov @ prec[n:, :n] @ y, cov


@pytest.mark.parametrize("noise", [0.0, 0.2])
def test_gp_posterior_matches_joint_gaussian_precision(noise):
    k, ks, kss = _trace_blocks(5, 3, p=20)
    y = _features(5, 1, 13)[:, 0]
    joint = torch.cat([torch.cat([k + noise * torch.eye(5, dtype=F64), ks.T], 1),
                       torch.cat([ks, kss], 1)], 0)
    mean, cov = _conditional_via_precision(joint, 5, y)
    post = nt.gp_posterior(k, ks, kss, y, noise=noise)
    assert_close(post.mean, mean, rtol=1e-8)
    assert_close(post.covariance, cov, rtol=1e-8)
    assert_close(post.variance, cov.diagonal(), rtol=1e-8)


def test_gp_posterior_full_kernel():
    k, ks, kss = _full_blocks(3, 2, o=2, p=30)
    y = _features(3, 2, 14)
    joint = torch.cat([torch.cat([_flat(k), _flat(ks).T], 1),
                       torch.cat([_flat(ks), _flat(kss)], 1)], 0)
    mean, cov = _conditional_via_precision(joint, 6, y.reshape(-1))
    post = nt.gp_posterior(k, ks, kss, y)
    assert post.mean.shape == (2, 2) and post.covariance.shape == (2, 2, 2, 2)
    assert_close(post.mean, mean.reshape(2, 2), rtol=1e-8)
    assert_close(_flat(post.covariance), cov, rtol=1e-8)
    assert_close(post.variance, cov.diagonal().reshape(2, 2), rtol=1e-8)


def _lee_posterior(kxx, kxs, kss, txx, txs, y, tau):
    """Lee et al. (2019) eqs. 15-16 by matrix exponential and explicit solve."""
    eye = torch.eye(txx.shape[0], dtype=txx.dtype)
    a = txs @ torch.linalg.solve(txx, eye - torch.linalg.matrix_exp(-tau * txx))
    cov = kss - a @ kxs.T - kxs @ a.T + a @ kxx @ a.T
    return a @ y, cov


@pytest.mark.parametrize("t", [0.0, 0.5, 4.0, math.inf])
def test_ntk_gp_posterior_matches_lee_et_al(t):
    kxx, kxs, kss = _trace_blocks(5, 3, p=20, seed=0)
    txx, txs, _ = _trace_blocks(5, 3, p=20, seed=1)
    y = _features(5, 1, 15)[:, 0]
    post = nt.ntk_gp_posterior(kxx, kxs, kss, txx, txs, y, t, lr=0.5)
    if t == 0:
        assert_close(post.mean, torch.zeros(3, dtype=F64))
        assert_close(post.covariance, kss)  # the prior
    elif math.isinf(t):
        a = txs @ torch.linalg.inv(txx)
        assert_close(post.mean, a @ y, rtol=1e-8)
        assert_close(post.covariance, kss - a @ kxs.T - kxs @ a.T + a @ kxx @ a.T, rtol=1e-8)
    else:
        mean, cov = _lee_posterior(kxx, kxs, kss, txx, txs, y, 0.5 * t)
        assert_close(post.mean, mean, rtol=1e-8)
        assert_close(post.covariance, cov, rtol=1e-8)


def test_ntk_gp_posterior_full_kernels_and_identity_case():
    kxx, kxs, kss = _full_blocks(3, 2, o=2, p=30, seed=3)
    txx, txs, _ = _full_blocks(3, 2, o=2, p=30, seed=4)
    y = _features(3, 2, 16)
    post = nt.ntk_gp_posterior(kxx, kxs, kss, txx, txs, y, 1.5)
    mean, cov = _lee_posterior(_flat(kxx), _flat(kxs), _flat(kss), _flat(txx), _flat(txs),
                               y.reshape(-1), 1.5)
    assert_close(post.mean, mean.reshape(2, 2), rtol=1e-8)
    assert_close(_flat(post.covariance), cov, rtol=1e-8)
    # With Θ = K the converged ensemble is the noise-free GP posterior.
    same = nt.ntk_gp_posterior(kxx, kxs, kss, kxx, kxs, y)
    gp = nt.gp_posterior(kxx, kxs, kss, y)
    assert_close(same.mean, gp.mean, rtol=1e-8)
    assert_close(same.covariance, gp.covariance, rtol=1e-8)


# ----------------------------------------------------------------------- kernels as priors

def test_eigenmodes_decompose_the_kernel():
    k, _, _ = _trace_blocks(7, 0, p=4)  # rank 4: null modes too
    values, vectors = nt.eigenmodes(k)
    assert torch.all(values[:-1] >= values[1:])
    assert_close(vectors @ torch.diag(values) @ vectors.T, k)
    assert_close(vectors.T @ vectors, torch.eye(7, dtype=F64))
    peaks = vectors.gather(0, vectors.abs().argmax(0, keepdim=True))
    assert torch.all(peaks > 0)
    assert_close(values, torch.linalg.eigvalsh(k).flip(0))

    kf, _, _ = _full_blocks(3, 0, o=2)
    values, vectors = nt.eigenmodes(kf)
    assert vectors.shape == (3, 2, 6)
    flat = vectors.reshape(6, 6)
    assert_close(flat @ torch.diag(values) @ flat.T, _flat(kf))


def test_prior_logprob_matches_multivariate_normal():
    k, _, _ = _trace_blocks(6, 0, p=10)
    y = _features(6, 2, 17)
    mvn = torch.distributions.MultivariateNormal(torch.zeros(6, dtype=F64), covariance_matrix=k)
    assert_close(nt.prior_logprob(k, y[:, 0]), mvn.log_prob(y[:, 0]))
    assert_close(nt.prior_logprob(k, y), mvn.log_prob(y.T).sum())  # columns independent
    jittered = torch.distributions.MultivariateNormal(
        torch.zeros(6, dtype=F64), covariance_matrix=k + 0.05 * torch.eye(6, dtype=F64))
    assert_close(nt.prior_logprob(k, y[:, 1], jitter=0.05), jittered.log_prob(y[:, 1]))
    kf, _, _ = _full_blocks(3, 0, o=2)
    yf = _features(3, 2, 18)
    mvn_f = torch.distributions.MultivariateNormal(torch.zeros(6, dtype=F64),
                                                   covariance_matrix=_flat(kf))
    assert_close(nt.prior_logprob(kf, yf), mvn_f.log_prob(yf.reshape(-1)))


def test_prior_logprob_of_a_singular_kernel_asks_for_jitter():
    k, _, _ = _trace_blocks(6, 0, p=3)
    with pytest.raises(ValueError, match="singular.*jitter"):
        nt.prior_logprob(k, torch.ones(6, dtype=F64))


def test_conditional_matches_explicit_gaussian_conditioning():
    k, _, _ = _trace_blocks(7, 0, p=12)
    obs, rest = [5, 0, 2], [1, 3, 4, 6]
    y_obs = _features(3, 1, 19)[:, 0]
    koo, kuo, kuu = k[obs][:, obs], k[rest][:, obs], k[rest][:, rest]
    mean = kuo @ torch.linalg.solve(koo, y_obs)
    cov = kuu - kuo @ torch.linalg.solve(koo, kuo.T)
    post = nt.conditional(k, obs, y_obs)
    assert_close(post.mean, mean, rtol=1e-9)
    assert_close(post.covariance, cov, rtol=1e-9)
    mask = torch.zeros(7, dtype=torch.bool)
    mask[obs] = True
    # A mask lists observed points in index order, so the labels follow that order.
    by_mask = nt.conditional(k, mask, y_obs[torch.tensor([1, 2, 0])])
    assert_close(by_mask.mean, mean, rtol=1e-9)
    by_negative = nt.conditional(k, [-2, 0, 2], y_obs)
    assert_close(by_negative.mean, mean, rtol=1e-9)


def test_conditional_mean_maximises_the_prior_density():
    # Among completions of the observed labels the conditional mean has the highest
    # prior log density; any perturbation lowers it.
    k, _, _ = _trace_blocks(5, 0, p=9)
    y_obs = torch.tensor([1.0, -0.5], dtype=F64)
    post = nt.conditional(k, [0, 1], y_obs)
    best = nt.prior_logprob(k, torch.cat([y_obs, post.mean]))
    g = torch.Generator().manual_seed(20)
    for _ in range(5):
        other = post.mean + 0.1 * torch.randn(3, generator=g, dtype=F64)
        assert nt.prior_logprob(k, torch.cat([y_obs, other])) < best


# ----------------------------------------------------------------------- natural NTK

def _small_net_jacobian(width: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 2)).double()
    x = torch.randn(n, 2, dtype=F64)
    jac = naive_jacobian(net, x, [name for name, _ in net.named_parameters()])  # (N, O, P)
    return jac.reshape(n * 2, -1), torch.einsum("aip,bjp->abij", jac, jac)


@pytest.mark.parametrize("width, damping", [(2, 0.3), (6, 1e-2)])
def test_natural_ntk_matches_explicit_parameter_space_formula(width, damping):
    jac, k = _small_net_jacobian(width, n=4, seed=width)
    p = jac.shape[1]
    explicit = jac @ torch.linalg.solve(jac.T @ jac + damping * torch.eye(p, dtype=F64), jac.T)
    assert_close(_flat(nt.natural_ntk(k, damping=damping)), explicit, rtol=1e-8)


def test_natural_ntk_tends_to_identity_for_an_overparameterized_net():
    jac, k = _small_net_jacobian(width=10, n=3, seed=0)  # P = 52 ≥ N·O = 6: full row rank
    lam_min = float(torch.linalg.eigvalsh(_flat(k)).min())
    assert lam_min > 0
    for damping in (1e-2 * lam_min, 1e-5 * lam_min):
        # K(K + λI)⁻¹ - I = -λ(K + λI)⁻¹, whose norm is λ/(λ_min + λ).
        gap = _flat(nt.natural_ntk(k, damping=damping)) - torch.eye(6, dtype=F64)
        err = float(torch.linalg.matrix_norm(gap, ord=2))
        assert abs(err - damping / (lam_min + damping)) <= 1e-9
    # damping = 0 on a rank-deficient kernel: the projector onto its range.
    phi = _features(6, 2, 21)
    proj = nt.natural_ntk(phi @ phi.T, damping=0.0)
    assert_close(proj, phi @ torch.linalg.pinv(phi), rtol=1e-9)


# ----------------------------------------------------------------------- float32 and errors

def test_float32_follows_float64():
    k, ks, _ = _trace_blocks(6, 3)
    y = _features(6, 1, 22)[:, 0]
    a = nt.gradient_flow_mse(k.float(), y.float(), torch.zeros(6), 2.0, k_test_train=ks.float())
    b = nt.gradient_flow_mse(k, y, torch.zeros(6, dtype=F64), 2.0, k_test_train=ks)
    assert a.test.dtype == torch.float32
    assert_close(a.test, b.test, rtol=1e-4)


def test_errors_name_the_argument():
    k, ks, kss = _trace_blocks(4, 2)
    y = torch.zeros(4, dtype=F64)
    with pytest.raises(ValueError, match="`k_train` must be symmetric"):
        nt.kernel_regression(k + torch.triu(torch.ones(4, 4, dtype=F64), 1), ks, y)
    with pytest.raises(ValueError, match="`k_train` must be positive semi-definite"):
        nt.kernel_regression(k - 2 * torch.eye(4, dtype=F64) * k.diagonal().max(), ks, y)
    with pytest.raises(ValueError, match=r"`k_test_train` must have 4 columns"):
        nt.kernel_regression(k, ks[:, :3], y)
    with pytest.raises(ValueError, match=r"`y_train` must have shape .*N = 4.*got \(3,\)"):
        nt.kernel_regression(k, ks, y[:3])
    with pytest.raises(ValueError, match="diagonal-mode kernel"):
        nt.eigenmodes(torch.ones(3, 3, 2, dtype=F64))
    with pytest.raises(ValueError, match="`k_test` must be symmetric"):
        nt.gp_posterior(k, ks, kss + torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=F64), y)
    with pytest.raises(ValueError, match=r"`t` must be a number >= 0 \(inf allowed\), got -1.0"):
        nt.gradient_flow_mse(k, y, y, -1.0)
    with pytest.raises(ValueError, match="`lr` must be a finite number > 0, got 0.0"):
        nt.gradient_flow_mse(k, y, y, 1.0, lr=0.0)
    with pytest.raises(ValueError, match="`f0_train` must have `y_train`'s shape"):
        nt.gradient_flow_mse(k, y, y[:, None], 1.0)
    with pytest.raises(ValueError, match="`f0_test` was given without `k_test_train`"):
        nt.gradient_flow_mse(k, y, y, 1.0, f0_test=torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="`k_train` has 1 non-finite"):
        bad = k.clone()
        bad[0, 0] = float("nan")
        nt.kernel_regression(bad, ks, y)
    kf, ksf, _ = _full_blocks(4, 2, o=2)
    with pytest.raises(ValueError, match=r"`k_test_train` must be a full \(N1, N2, 2, 2\) kernel"):
        nt.kernel_regression(kf, ks, torch.zeros(4, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"`y_train` must have shape \(N, 2\)"):
        nt.kernel_regression(kf, ksf, y)
    with pytest.raises(ValueError, match="`ntk_train` must be a full"):
        nt.ntk_gp_posterior(kf, ksf, _full_blocks(4, 2, o=2)[2], k, ks,
                            torch.zeros(4, 2, dtype=F64))
    with pytest.raises(ValueError, match="`k_test_train` must have `k_train`'s dtype"):
        nt.kernel_regression(k, ks.float(), y)
    with pytest.raises(ValueError, match="`observed_idx` must not repeat"):
        nt.conditional(k, [0, 0], torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="`observed_idx` must index the kernel's 4 samples"):
        nt.conditional(k, [7], torch.zeros(1, dtype=F64))
    with pytest.raises(TypeError, match="`observed_idx` must be"):
        nt.conditional(k, [0.5], torch.zeros(1, dtype=F64))
    with pytest.raises(ValueError, match="`damping` must be a finite number >= 0, got -1.0"):
        nt.natural_ntk(k, damping=-1.0)
    with pytest.raises(TypeError, match="`jitter` must be a finite number >= 0, got str"):
        nt.prior_logprob(k, y, jitter="0.1")
    with pytest.raises(TypeError, match="`steps` must be an int >= 0, got float 2.0"):
        nt.gradient_descent_mse(k, y, y, 2.0, lr=0.1)
    with pytest.raises(ValueError, match=r"`k` must be an int in \[1, 4\] or None, got 5"):
        nt.eigenmodes(k, k=5)
    with pytest.raises(ValueError, match=r"`kernel` must be a square kernel of shape \(N, N\)"):
        nt.solve(ks, torch.zeros(2, dtype=F64), ridge=1.0)
    with pytest.raises(TypeError, match="`k` must be a kernel tensor"):
        nt.natural_ntk(k.numpy(), damping=1.0)


def test_plot_eigenmodes_draws_and_checks_shapes(tmp_path):
    from ntk_torch.plotting import plot_eigenmodes

    x = torch.linspace(-1, 1, 7, dtype=F64)
    k = torch.exp(-(x[:, None] - x[None, :]) ** 2)
    modes = nt.eigenmodes(k)
    path = plot_eigenmodes(x[:, None], modes, tmp_path / "modes.png", n_modes=3, title="rbf")
    assert path.stat().st_size > 0
    full = nt.eigenmodes(k[:, :, None, None])  # a full kernel with O = 1 works too
    assert plot_eigenmodes(x, full, tmp_path / "full.png").stat().st_size > 0
    with pytest.raises(ValueError, match="`modes` must be eigenmodes of an \\(N, N\\) kernel"):
        plot_eigenmodes(x[:5], modes, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="`n_modes` must be an int in \\[1, 7\\]"):
        plot_eigenmodes(x, modes, tmp_path / "bad.png", n_modes=9)
    with pytest.raises(ValueError, match="`x` must hold scalar inputs"):
        plot_eigenmodes(torch.zeros(7, 2), modes, tmp_path / "bad.png")
