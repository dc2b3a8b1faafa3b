"""Monte Carlo estimates of the infinite-width kernels: empirical kernels averaged over seeds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ntk_torch import _engines, _inputs
from ntk_torch._checks import check_batch_size, check_choice, check_dtype, check_int, describe
from ntk_torch._inputs import Batch
from ntk_torch.empirical import Implementation, empirical_nngp, empirical_ntk

__all__ = ["MonteCarloKernel", "monte_carlo_kernel"]


@dataclass(frozen=True)
class MonteCarloKernel:
    """Means over random initialisations of the empirical NNGP and NTK, with standard errors.

    Attributes:
        nngp: mean of ``empirical_nngp(model, x1, x2, mode="trace")`` over the draws,
            ``(N1, N2)``.
        ntk: mean of ``empirical_ntk(model, x1, x2, mode="trace")``, ``(N1, N2)``.
        nngp_stderr: standard error of ``nngp``, entry by entry: the sample standard
            deviation over the draws (``n_samples - 1`` degrees of freedom) over
            ``√n_samples``; ``(N1, N2)``.
        ntk_stderr: the same for ``ntk``.
        n_samples: number of draws.
    """

    __module__ = "ntk_torch.analytic"  # its public home, which pickles record

    nngp: torch.Tensor
    ntk: torch.Tensor
    nngp_stderr: torch.Tensor
    ntk_stderr: torch.Tensor
    n_samples: int


class _RunningMoments:
    """Welford's running mean and sum of squared deviations, in float64.

    Keeps two ``(N1, N2)`` tensors whatever the number of draws. Unlike the sums of ``k``
    and ``k²``, whose difference cancels catastrophically when the spread is small next to
    the mean (a wide network's NTK varies by ``O(1/√width)`` of its size), every update
    adds deviations from the current mean.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, k: torch.Tensor) -> None:
        k = k.to(torch.float64)
        if self.mean is None:
            self.mean, self.m2 = torch.zeros_like(k), torch.zeros_like(k)
        self.n += 1
        delta = k - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (k - self.mean)

    def stderr(self) -> torch.Tensor:
        return (self.m2 / ((self.n - 1) * self.n)).sqrt()


def monte_carlo_kernel(build: Callable[[int], nn.Module], x1: Batch, x2: Batch | None = None,
                       *, n_samples: int, seed: int = 0, dtype: torch.dtype = torch.float64,
                       implementation: Implementation = "auto", batch_size: int | None = None,
                       progress: bool = True) -> MonteCarloKernel:
    """Monte Carlo estimate of the NNGP and NTK from ``n_samples`` networks that ``build`` draws.

    For ``s = seed, seed + 1, ..., seed + n_samples - 1`` the global random generators are
    seeded with ``torch.manual_seed(s)`` and ``model_s = build(s)`` is drawn; with
    ``K_s = empirical_nngp(model_s, x1, x2, mode="trace")`` and
    ``Θ_s = empirical_ntk(model_s, x1, x2, mode="trace")``, each ``(N1, N2)`` and the mean
    over the ``O`` outputs,

        nngp = (1/S) Σ_s K_s,     nngp_stderr = sqrt(Σ_s (K_s − nngp)² / (S − 1)) / √S,

    and likewise ``ntk`` and ``ntk_stderr`` from ``Θ_s``, with ``S = n_samples``. Their
    expectations are the kernels of the architecture at its finite width, which
    :func:`ntk_torch.analytic.kernel` gives in the limit (exactly for the NNGP and NTK of
    one hidden layer of Gaussian weights, up to ``O(1/width)`` beyond). Only running
    moments are kept, never the draws; the caller's random state is restored afterwards,
    so the result depends on ``seed`` alone.

    Each model is converted to ``dtype`` and put in eval mode: the limits are those of the
    network's outputs at inference, where dropout is the identity (as
    :func:`ntk_torch.analytic.kernel` reads it); in train mode dropout would make each
    draw's empirical kernels random, and the engines refuse it.

    Args:
        build: ``seed -> nn.Module``, one randomly initialised network. It may ignore the
            seed (the generators are already seeded with it) or seed a generator of its
            own with it; the same seed must give the same network.
        x1: inputs ``(N1, ...)``, as :func:`ntk_torch.empirical_ntk` takes them (tensors,
            tuples or dicts of them), on the device ``build`` puts the models on. Floating
            tensors are converted to ``dtype``.
        x2: inputs ``(N2, ...)`` laid out as ``x1``; ``None`` means ``x1`` (symmetric
            results).
        n_samples: number of networks ``S``, at least 2 (a standard error needs two).
        seed: the first seed.
        dtype: the models' and inputs' dtype; float64 by default, so that the estimate
            carries no float32 rounding.
        implementation: the empirical NTK's engine (see :func:`ntk_torch.empirical_ntk`).
        batch_size: samples per block of both empirical kernels; the result is the same.
        progress: show a progress bar over the draws.

    Returns:
        :class:`MonteCarloKernel` of ``(N1, N2)`` float64 tensors on the models' device.

    Raises:
        TypeError: ``build`` is not a function (a module, say) or returns something else
            than an ``nn.Module`` (named in the message).

    Example:
        One hidden ReLU layer of Gaussian weights: the mean is unbiased at any width.

        >>> import torch, ntk_torch as nt
        >>> x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
        >>> build = lambda seed: nt.nn.MLP(4, 256, 1, 1, activation="relu")
        >>> mc = nt.analytic.monte_carlo_kernel(build, x, n_samples=8, progress=False)
        >>> limit = nt.analytic.kernel(build(0), x)
        >>> z = (mc.ntk - limit.ntk) / mc.ntk_stderr  # t with 7 dof: P(|t| > 6) = 5e-4
        >>> mc.ntk.shape, mc.ntk.dtype, bool(z.abs().max() < 6)
        (torch.Size([3, 3]), torch.float64, True)
    """
    # A module is callable too, but calling it on a seed would run it, not build a network.
    if not callable(build) or isinstance(build, nn.Module):
        raise TypeError("`build` must be a function seed -> nn.Module that builds a new "
                        f"network, e.g. lambda seed: Net(), got {describe(build)}")
    n_samples = check_int("n_samples", n_samples, low=2)
    seed = check_int("seed", seed, low=0)
    check_dtype(dtype)
    # The empirical kernels check these too, but only once a network has been built.
    check_choice("implementation", implementation, ("auto", *_engines.ENGINES))
    check_batch_size(batch_size)
    x1, x2 = _inputs.check_pair(x1, x2)
    x1, x2 = (None if x is None else _inputs.map_leaves(
        lambda t: t.to(dtype) if t.is_floating_point() else t, x) for x in (x1, x2))
    nngp, ntk = _RunningMoments(), _RunningMoments()
    with torch.random.fork_rng():
        for s in tqdm(range(seed, seed + n_samples), desc="Monte Carlo draws",
                      disable=not progress):
            torch.manual_seed(s)
            model = build(s)
            if not isinstance(model, nn.Module):
                raise TypeError(f"`build` must return a torch.nn.Module, got {describe(model)} "
                                f"from build({s})")
            model = model.to(dtype).eval()
            nngp.add(empirical_nngp(model, x1, x2, mode="trace", batch_size=batch_size))
            ntk.add(empirical_ntk(model, x1, x2, mode="trace", implementation=implementation,
                                  batch_size=batch_size))
            del model  # released before the next one is built, not while
    return MonteCarloKernel(nngp=nngp.mean, ntk=ntk.mean, nngp_stderr=nngp.stderr(),
                            ntk_stderr=ntk.stderr(), n_samples=n_samples)
