"""What a fixed kernel predicts: gradient flow, kernel regression, Gaussian-process posteriors.

Layouts as in :mod:`ntk_torch.kernels`: trace kernels ``(N1, N2)`` shared by all outputs
and full kernels ``(N1, N2, O, O)`` read as ``(N1·O, N2·O)`` matrices; labels ``(N,)`` or
``(N, C)`` (trace) and ``(N, O)`` (full). ``N`` counts training inputs, ``M`` test inputs.

Loss convention. Gradient flow here is on the summed squared error

    L(θ) = ½ Σ_a ‖f(x_a; θ) - y_a‖²,      dθ/dt = -η ∇L,

so for a model linear in ``θ`` with NTK ``Θ = J Jᵀ`` the training outputs obey
``df/dt = -η Θ (f - y)``. One step of gradient descent with step size ``η`` on this loss
advances ``t`` by one; the time of ``k`` steps is ``t = k`` at ``lr = η``, or equivalently
``t = k·η`` at ``lr = 1``. With a mean loss ``½ Σ ‖f - y‖² / (N·O)`` divide ``lr`` by
``N·O``.

Every solve goes through the eigendecomposition of the (symmetric, PSD-checked) training
kernel. Where the kernel is singular the infinite-time limits use the pseudo-inverse: the
minimum-norm interpolant that gradient flow from ``f0`` reaches.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ntk_torch.kernels import (
    _Targets,
    _check_kernel,
    _check_like,
    _check_nonnegative,
    _check_symmetric,
    _flatten,
    _n_out_of,
    _null_mask,
    _symmetric_eigh,
    _unflatten,
)


class Gaussian(NamedTuple):
    """A Gaussian over ``M`` test points: ``mean`` shaped like the labels (``(M,)``,
    ``(M, C)`` or ``(M, O)``), ``covariance`` ``(M, M)`` for a trace kernel (shared by every
    output column) or ``(M, M, O, O)`` for a full one."""

    mean: torch.Tensor
    covariance: torch.Tensor

    @property
    def variance(self) -> torch.Tensor:
        """Marginal variances: ``(M,)`` for a trace kernel, ``(M, O)`` for a full one."""
        c = self.covariance
        if c.dim() == 2:
            return c.diagonal()
        # (M, M, O, O) -> (O, O, M) -> (M, O)
        return c.diagonal(dim1=0, dim2=1).diagonal(dim1=0, dim2=1)


class FlowPrediction(NamedTuple):
    """Outputs after gradient flow: ``train`` shaped like ``y_train``, ``test`` like the
    test labels (``None`` when no test kernel was given)."""

    train: torch.Tensor
    test: torch.Tensor | None


def _check_time(t: object, lr: object) -> tuple[float, float]:
    return (_check_nonnegative("t", t, allow_inf=True), _check_nonnegative("lr", lr, positive=True))


def _flow_filters(values: torch.Tensor, time: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``decay = exp(-τλ)`` and ``gain = (1 - exp(-τλ))/λ`` at ``τ = lr·t``.

    ``gain`` is ``τ·φ(τλ)`` with ``φ(z) = -expm1(-z)/z``, ``φ(0) = 1``: exact for tiny
    ``λ``.
    At ``τ = ∞`` null directions keep their residual (``decay = 1``) and contribute nothing
    to test points (``gain = 0``), the pseudo-inverse.
    """
    if math.isinf(time):
        null = _null_mask(values)
        decay = null.to(values.dtype)
        return decay, _inverse_filter(values, 0.0)
    z = time * values
    decay = torch.exp(-z)
    safe = torch.where(z > 0, z, torch.ones_like(z))  # keeps 0/0 out of the unused branch
    phi = torch.where(z > 0, -torch.expm1(-z) / safe, torch.ones_like(z))
    return decay, time * phi


def gradient_flow_mse(k_train: torch.Tensor, y_train: torch.Tensor, f0_train: torch.Tensor,
                      t: float, *, lr: float = 1.0, k_test_train: torch.Tensor | None = None,
                      f0_test: torch.Tensor | None = None) -> FlowPrediction:
    """Outputs at time ``t`` of gradient flow on ``½ Σ ‖f - y‖²`` under a fixed kernel.

    With ``Θ`` the training NTK and ``τ = lr·t`` (see the module docstring for the loss and
    time conventions),

        f_t(X)  = y + exp(-τΘ) (f0(X) - y),
        f_t(X*) = f0(X*) + Θ(X*, X) Θ⁻¹ (I - exp(-τΘ)) (y - f0(X)),

    exactly what a linearized network (:func:`ntk_torch.linearize`) trained by gradient
    flow follows, and what a wide network follows approximately. At ``t = inf``:
    ``f(X) = y`` on the range of ``Θ`` and ``f(X*) = f0(X*) + Θ(X*, X) Θ⁺ (y - f0(X))``,
    which is :func:`kernel_regression` of the residual.

    Args:
        k_train: NTK ``(N, N)`` or ``(N, N, O, O)`` of the training inputs.
        y_train: targets ``(N,)``/``(N, C)`` (trace) or ``(N, O)`` (full).
        f0_train: outputs at ``t = 0``, shaped like ``y_train``.
        t: time ``≥ 0``; ``float('inf')`` gives the converged outputs.
        lr: learning rate ``η > 0`` of the flow.
        k_test_train: NTK ``(M, N)`` or ``(M, N, O, O)`` between test and training inputs.
        f0_test: test outputs at ``t = 0``, shaped like the predictions; zeros if omitted
            (the infinite-width mean).

    Returns:
        :class:`FlowPrediction` ``(train, test)``: ``train`` shaped like ``y_train``,
        ``test`` ``(M,)``/``(M, C)``/``(M, O)`` or ``None`` without ``k_test_train``.

    Example:
        One training point with ``Θ = 2``: the residual decays as ``exp(-2t)``.

        >>> import torch, ntk_torch as nt
        >>> k = torch.tensor([[2.0]], dtype=torch.float64)
        >>> out = nt.gradient_flow_mse(k, torch.tensor([1.0]), torch.tensor([0.0]), t=0.5,
        ...                            k_test_train=torch.tensor([[1.0]], dtype=torch.float64))
        >>> torch.allclose(out.train, 1 - torch.exp(torch.tensor(-1.0, dtype=torch.float64)))
        True
        >>> torch.allclose(out.test, out.train / 2)
        True
    """
    time, lr = _check_time(t, lr)
    return _evolve(k_train, y_train, f0_train, lambda values: _flow_filters(values, lr * time),
                   k_test_train, f0_test)


def gradient_descent_mse(k_train: torch.Tensor, y_train: torch.Tensor, f0_train: torch.Tensor,
                         steps: int, *, lr: float, k_test_train: torch.Tensor | None = None,
                         f0_test: torch.Tensor | None = None) -> FlowPrediction:
    """Outputs after ``steps`` of gradient descent on ``½ Σ ‖f - y‖²`` under a fixed kernel.

    The discrete counterpart of :func:`gradient_flow_mse`: a model linear in its
    parameters with NTK ``Θ`` (a linearized network) trained with step size ``η`` moves
    exactly as ``f_{k+1}(X) = f_k(X) − η Θ (f_k(X) − y)``, so

        f_k(X)  = y + (I − ηΘ)^k (f0(X) − y),
        f_k(X*) = f0(X*) + Θ(X*, X) Θ⁻¹ (I − (I − ηΘ)^k) (y − f0(X))

    (``Θ⁻¹(I − (I − ηΘ)^k)`` read as ``kη`` on the null space). It tends to the flow at
    ``t = k`` as ``η → 0``; it diverges when ``η λ_max(Θ) > 2``. For a mean loss
    ``1/(2N) Σ ‖f − y‖²`` pass ``lr = η / N``. Shapes as in :func:`gradient_flow_mse`.

    Example:
        One training point with ``Θ = 2`` and ``η = 0.25``: the residual halves per step.

        >>> import torch, ntk_torch as nt
        >>> k = torch.tensor([[2.0]], dtype=torch.float64)
        >>> out = nt.gradient_descent_mse(k, torch.tensor([1.0]), torch.tensor([0.0]), 3, lr=0.25)
        >>> float(out.train)
        0.875
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"`steps` must be an int >= 0, got {steps!r}")
    lr = _check_nonnegative("lr", lr, positive=True)

    def filters(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decay = (1 - lr * values) ** steps
        # Σ_{m<k} η (1 − ηλ)^m = (1 − (1 − ηλ)^k)/λ, and kη where ηλ is negligible.
        small = (lr * values).abs() < 1e-12
        safe = torch.where(small, torch.ones_like(values), values)
        return decay, torch.where(small, torch.full_like(values, steps * lr), (1 - decay) / safe)

    return _evolve(k_train, y_train, f0_train, filters, k_test_train, f0_test)


def _evolve(k_train, y_train, f0_train, filters, k_test_train, f0_test) -> FlowPrediction:
    """Training outputs ``y + V diag(decay) Vᵀ (f0 − y)`` and test outputs
    ``f0* + Θ*ᵀ V diag(gain) Vᵀ (y − f0)`` for ``(decay, gain) = filters(eigenvalues)``."""
    k_train = _check_kernel(k_train, "k_train")
    n, n_out = k_train.shape[0], _n_out_of(k_train)
    layout, y = _Targets.read(y_train, "y_train", n, n_out, k_train)
    _, f0 = _Targets.read(f0_train, "f0_train", n, n_out, k_train)
    if tuple(f0_train.shape) != tuple(y_train.shape):
        raise ValueError(f"`f0_train` must have `y_train`'s shape {tuple(y_train.shape)}, "
                         f"got {tuple(f0_train.shape)}")
    values, vectors = _symmetric_eigh(_flatten(k_train), "k_train", psd=True)
    decay, gain = filters(values)
    residual = vectors.T @ (y - f0)  # (n, C) in the eigenbasis
    train = y - vectors @ (decay[:, None] * residual)
    test = None
    if k_test_train is not None:
        k_test_train = _check_kernel(k_test_train, "k_test_train", cols=n, n_out=n_out)
        _check_like("k_test_train", k_test_train, k_train, "k_train")
        m = k_test_train.shape[0]
        moved = _flatten(k_test_train) @ (vectors @ (gain[:, None] * residual))
        if f0_test is None:
            start = torch.zeros_like(moved)
        else:
            expected = layout.write(moved, m).shape
            if not isinstance(f0_test, torch.Tensor) or tuple(f0_test.shape) != tuple(expected):
                got = (tuple(f0_test.shape) if isinstance(f0_test, torch.Tensor)
                       else type(f0_test).__name__)
                raise ValueError(f"`f0_test` must have shape {tuple(expected)} (the test "
                                 f"predictions), got {got}")
            _, start = _Targets.read(f0_test, "f0_test", m, n_out, k_train)
        test = layout.write(start + moved, m)
    elif f0_test is not None:
        raise ValueError("`f0_test` was given without `k_test_train`; pass the test-train "
                         "kernel too")
    return FlowPrediction(layout.write(train, n), test)


def kernel_regression(k_train: torch.Tensor, k_test_train: torch.Tensor, y_train: torch.Tensor, *,
                      ridge: float = 0.0) -> torch.Tensor:
    """Kernel (ridge) regression ``K(X*, X) (K(X, X) + ridge·I)⁻¹ y``.

    With ``ridge = 0`` the inverse is the pseudo-inverse, so this is where gradient flow
    from ``f0 = 0`` ends (:func:`gradient_flow_mse` at ``t = inf``); with ``ridge = σ²`` it
    is the posterior mean of :func:`gp_posterior` with ``noise = σ²``.

    Args:
        k_train: ``(N, N)`` or ``(N, N, O, O)``, symmetric PSD.
        k_test_train: ``(M, N)`` or ``(M, N, O, O)``, same layout.
        y_train: ``(N,)``/``(N, C)`` (trace) or ``(N, O)`` (full).
        ridge: ``≥ 0``, added to the diagonal of ``k_train``.

    Returns:
        Predictions ``(M,)``, ``(M, C)`` or ``(M, O)``, shaped like ``y_train``.

    Example:
        A linear kernel ``x·x'`` fits the line through the origin (its training block is
        singular, rank one; the pseudo-inverse handles it):

        >>> import torch, ntk_torch as nt
        >>> x, xs = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0]])
        >>> pred = nt.kernel_regression(x @ x.T, xs @ x.T, torch.tensor([2.0, 4.0]))
        >>> torch.allclose(pred, torch.tensor([6.0]))
        True
    """
    ridge = _check_nonnegative("ridge", ridge)
    k_train = _check_kernel(k_train, "k_train")
    n, n_out = k_train.shape[0], _n_out_of(k_train)
    k_test_train = _check_kernel(k_test_train, "k_test_train", cols=n, n_out=n_out)
    _check_like("k_test_train", k_test_train, k_train, "k_train")
    layout, y = _Targets.read(y_train, "y_train", n, n_out, k_train)
    values, vectors = _symmetric_eigh(_flatten(k_train), "k_train", psd=True)
    inverse = _inverse_filter(values, ridge)
    weights = vectors @ (inverse[:, None] * (vectors.T @ y))
    return layout.write(_flatten(k_test_train) @ weights, k_test_train.shape[0])


def _inverse_filter(values: torch.Tensor, shift: float) -> torch.Tensor:
    """``1/(λ + shift)``; with ``shift = 0`` the pseudo-inverse's ``1/λ`` off the null space."""
    if shift > 0:
        return 1 / (values + shift)
    null = _null_mask(values)
    safe = torch.where(null, torch.ones_like(values), values)
    return torch.where(null, torch.zeros_like(values), 1 / safe)


def gp_posterior(k_train: torch.Tensor, k_test_train: torch.Tensor, k_test: torch.Tensor,
                 y_train: torch.Tensor, *, noise: float = 0.0) -> Gaussian:
    """Posterior of a zero-mean Gaussian process with kernel ``K`` given noisy labels.

        mean = K(X*, X) (K + noise·I)⁻¹ y
        cov  = K(X*, X*) - K(X*, X) (K + noise·I)⁻¹ K(X, X*)

    (pseudo-inverse when ``noise = 0``: conditioning a degenerate Gaussian on labels in its
    support). Note the NTK used this way is *not* what trained networks compute; for that
    see :func:`ntk_gp_posterior`.

    Args:
        k_train: ``(N, N)`` or ``(N, N, O, O)``, symmetric PSD.
        k_test_train: ``(M, N)`` or ``(M, N, O, O)``.
        k_test: ``(M, M)`` or ``(M, M, O, O)``, symmetric.
        y_train: ``(N,)``/``(N, C)`` (trace) or ``(N, O)`` (full).
        noise: label-noise variance ``≥ 0`` added to the diagonal of ``k_train``.

    Returns:
        :class:`Gaussian` ``(mean, covariance)``: mean shaped like the test labels,
        covariance ``(M, M)`` or ``(M, M, O, O)``; ``.variance`` gives its diagonal.

    Example:
        Two perfectly correlated points: observing one pins the other.

        >>> import torch, ntk_torch as nt
        >>> k = torch.ones(2, 2, dtype=torch.float64)
        >>> post = nt.gp_posterior(k[:1, :1], k[1:, :1], k[1:, 1:], torch.tensor([3.0]))
        >>> post.mean, post.variance
        (tensor([3.], dtype=torch.float64), tensor([0.], dtype=torch.float64))
    """
    noise = _check_nonnegative("noise", noise)
    k_train, k_test_train, k_test = _check_blocks(k_train, k_test_train, k_test, prefix="k")
    n, m, n_out = k_train.shape[0], k_test.shape[0], _n_out_of(k_train)
    layout, y = _Targets.read(y_train, "y_train", n, n_out, k_train)
    values, vectors = _symmetric_eigh(_flatten(k_train), "k_train", psd=True)
    inverse = _inverse_filter(values, noise)
    cross = _flatten(k_test_train) @ vectors  # (m', n') in the eigenbasis
    mean = cross @ (inverse[:, None] * (vectors.T @ y))
    root = cross * inverse.sqrt()
    cov = _symmetrize(_flatten(k_test) - root @ root.T)
    return Gaussian(layout.write(mean, m), _unflatten(cov, m, m, n_out))


def _check_blocks(train: torch.Tensor, test_train: torch.Tensor, test: torch.Tensor, *,
                  prefix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = (f"{prefix}_train", f"{prefix}_test_train", f"{prefix}_test")
    train = _check_kernel(train, names[0])
    n, n_out = train.shape[0], _n_out_of(train)
    test_train = _check_kernel(test_train, names[1], cols=n, n_out=n_out)
    m = test_train.shape[0]
    test = _check_kernel(test, names[2], rows=m, cols=m, n_out=n_out)
    for name, block in zip(names[1:], (test_train, test)):
        _check_like(name, block, train, names[0])
    _check_symmetric(_flatten(test), names[2])
    return train, test_train, test


def _symmetrize(m: torch.Tensor) -> torch.Tensor:
    return (m + m.T) / 2


def ntk_gp_posterior(nngp_train: torch.Tensor, nngp_test_train: torch.Tensor,
                     nngp_test: torch.Tensor, ntk_train: torch.Tensor,
                     ntk_test_train: torch.Tensor, y_train: torch.Tensor,
                     t: float = math.inf, *, lr: float = 1.0) -> Gaussian:
    """Distribution of test outputs of infinitely wide networks after gradient flow for time ``t``.

    At infinite width (Lee et al. 2019, "Wide neural networks of any depth evolve as linear
    models under gradient descent", eqs. 15–16) the initial outputs are a Gaussian process
    with the NNGP kernel ``K`` and training follows the fixed NTK ``Θ``. With
    ``A = Θ(X*, X) Θ⁻¹ (I - exp(-τΘ))``, ``τ = lr·t`` (loss ``½ Σ ‖f - y‖²``):

        f_t(X*) = f0(X*) + A (y - f0(X)),
        mean    = A y,
        cov     = K(X*, X*) - A K(X, X*) - K(X*, X) Aᵀ + A K(X, X) Aᵀ.

    ``t = 0`` is the prior ``N(0, K(X*, X*))``; ``t = inf`` takes ``A = Θ(X*, X) Θ⁺``, an
    ensemble of trained networks, which is *not* the NNGP posterior
    (:func:`gp_posterior`) unless ``Θ ∝ K``.

    Args:
        nngp_train, nngp_test_train, nngp_test: NNGP blocks ``(N, N)``, ``(M, N)``,
            ``(M, M)``, or all full ``(·, ·, O, O)``.
        ntk_train, ntk_test_train: NTK blocks ``(N, N)``, ``(M, N)`` in the same layout.
        y_train: ``(N,)``/``(N, C)`` (trace) or ``(N, O)`` (full).
        t: training time ``≥ 0`` (``float('inf')`` allowed).
        lr: learning rate ``η > 0``.

    Returns:
        :class:`Gaussian` ``(mean, covariance)`` over the test points: mean like the test
        labels, covariance ``(M, M)`` or ``(M, M, O, O)``.

    Example:
        When ``Θ = K`` the converged ensemble is the noise-free GP posterior:

        >>> import torch, ntk_torch as nt
        >>> k = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> y = torch.tensor([1.0])
        >>> a = nt.ntk_gp_posterior(k[:1, :1], k[1:, :1], k[1:, 1:], k[:1, :1], k[1:, :1], y)
        >>> b = nt.gp_posterior(k[:1, :1], k[1:, :1], k[1:, 1:], y)
        >>> torch.allclose(a.mean, b.mean) and torch.allclose(a.covariance, b.covariance)
        True
    """
    time, lr = _check_time(t, lr)
    nngp_train, nngp_test_train, nngp_test = _check_blocks(nngp_train, nngp_test_train, nngp_test,
                                                           prefix="nngp")
    n, m, n_out = nngp_train.shape[0], nngp_test.shape[0], _n_out_of(nngp_train)
    ntk_train = _check_kernel(ntk_train, "ntk_train", rows=n, cols=n, n_out=n_out)
    ntk_test_train = _check_kernel(ntk_test_train, "ntk_test_train", rows=m, cols=n, n_out=n_out)
    for name, block in (("ntk_train", ntk_train), ("ntk_test_train", ntk_test_train)):
        _check_like(name, block, nngp_train, "nngp_train")
    layout, y = _Targets.read(y_train, "y_train", n, n_out, nngp_train)
    values, vectors = _symmetric_eigh(_flatten(ntk_train), "ntk_train", psd=True)
    # The NNGP training block is a covariance: PSD like the NTK's.
    _symmetric_eigh(_flatten(nngp_train), "nngp_train", psd=True)
    _, gain = _flow_filters(values, lr * time)
    a = (_flatten(ntk_test_train) @ vectors) * gain @ vectors.T  # (m', n')
    k_cross = _flatten(nngp_test_train)
    a_k = a @ k_cross.T  # A K(X, X*)
    cov = _flatten(nngp_test) - a_k - a_k.T + a @ _flatten(nngp_train) @ a.T
    return Gaussian(layout.write(a @ y, m), _unflatten(_symmetrize(cov), m, m, n_out))


def conditional(k: torch.Tensor, observed_idx: object, y_observed: torch.Tensor, *,
                jitter: float = 0.0) -> Gaussian:
    """Which labels a kernel prefers for the unobserved points, given the observed ones.

    Under the prior ``y ~ N(0, K)`` over all ``N`` points, conditioning on ``y_o`` at the
    observed indices gives the unobserved
    ``y_u ~ N(K_uo K_oo⁻¹ y_o, K_uu - K_uo K_oo⁻¹ K_ou)``.
    The mean is the labelling with the highest :func:`ntk_torch.prior_logprob` among all
    completions of ``y_o``: the principled way to ask which test label the kernel prefers,
    rather than scoring a few candidates.

    Args:
        k: symmetric PSD kernel ``(N, N)`` or ``(N, N, O, O)`` over all points.
        observed_idx: the observed sample indices (ints, a 1-D integer tensor, or a boolean
            mask ``(N,)``), without repeats.
        y_observed: labels of the observed points in the order of ``observed_idx``:
            ``(N_o,)``/``(N_o, C)`` (trace) or ``(N_o, O)`` (full).
        jitter: added to the diagonal of ``K_oo`` (label noise); ``0`` uses the
            pseudo-inverse.

    Returns:
        :class:`Gaussian` over the unobserved points in increasing index order: mean
        ``(N_u,)``/``(N_u, C)``/``(N_u, O)``, covariance ``(N_u, N_u)`` or
        ``(N_u, N_u, O, O)``, ``.variance`` the marginal variances.

    Example:
        >>> import torch, ntk_torch as nt
        >>> k = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> post = nt.conditional(k, [0], torch.tensor([2.0]))
        >>> post.mean, post.variance
        (tensor([1.], dtype=torch.float64), tensor([0.7500], dtype=torch.float64))
    """
    k = _check_kernel(k, "k")
    if k.shape[0] != k.shape[1]:
        raise ValueError(f"`k` must be square in its samples, got shape {tuple(k.shape)}")
    n = k.shape[0]
    observed = _indices(observed_idx, n, k.device)
    mask = torch.zeros(n, dtype=torch.bool, device=k.device)
    mask[observed] = True
    unobserved = (~mask).nonzero().flatten()
    return gp_posterior(k[observed][:, observed], k[unobserved][:, observed],
                        k[unobserved][:, unobserved], y_observed, noise=jitter)


def _indices(idx: object, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool:
        if idx.shape != (n,):
            raise ValueError(f"`observed_idx` as a mask must have shape ({n},), "
                             f"got {tuple(idx.shape)}")
        return idx.to(device).nonzero().flatten()
    try:
        index = torch.as_tensor(idx, device=device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"`observed_idx` must be integer indices or a boolean mask, "
                        f"got {idx!r}") from error
    if index.dim() == 0:
        index = index.reshape(1)
    if index.dim() != 1 or (index.numel() and (index.is_floating_point() or index.is_complex())):
        raise TypeError(f"`observed_idx` must be a 1-D sequence of integer indices or a "
                        f"boolean mask, got {idx!r}")
    index = index.long()
    if index.numel() and (index.min() < -n or index.max() >= n):
        raise ValueError(f"`observed_idx` must index the kernel's {n} samples, "
                         f"got {index.tolist()}")
    index = index % n if n else index
    if index.unique().numel() != index.numel():
        raise ValueError(f"`observed_idx` must not repeat an index, got {index.tolist()}")
    return index
