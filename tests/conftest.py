"""Shared fixtures and the one dtype-keyed tolerance table."""

from __future__ import annotations

import pytest
import torch

from tests.cases import CASES

# Scripts that make the stored reference data need packages the suite does not.
collect_ignore = ["data"]

# Relative error (max-abs error / max-abs value). float64: engines and oracle differ only
# by summation order, about 1e-16 per operation, so 1e-10 leaves room for long sums.
# float32: eps 1.2e-7 times the same growth.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return float((actual - expected).abs().max() / scale)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float | None = None) -> None:
    rtol = RTOL[expected.dtype] if rtol is None else rtol
    err = relative_error(actual, expected.to(actual.dtype))
    if err > rtol:
        diff = (actual - expected).abs().flatten()
        worst = diff.topk(min(5, diff.numel())).indices
        rows = "\n".join(
            f"  flat index {int(i)}: got {actual.flatten()[i].item():.6g}, "
            f"expected {expected.flatten()[i].item():.6g}"
            for i in worst
        )
        raise AssertionError(f"relative error {err:.3g} > {rtol:.1g}; largest differences:\n{rows}")


def assert_within_standard_errors(mean: torch.Tensor, stderr: torch.Tensor,
                                  expected: torch.Tensor, z: float = 5.0) -> None:
    """Every entry of a Monte Carlo ``mean`` within ``z`` of its standard errors of ``expected``.

    With 32 draws, |t| > 5 has probability 2e-5 per entry for Gaussian draws (t with 31
    degrees of freedom). The NNGP's draws are skewed, ``K_s`` being a mean of products of
    outputs: with 8 outputs a diagonal entry is like χ²₈/8, for which simulation gives
    |t| > 5 a probability of 2e-4 (1 output: 5e-3). The mean kernel of a finite network
    differs from the limit by O(1/width) while the standard error is O(1/√(width·S)), so
    with S <= width/4 draws the bias stays within about one standard error.
    """
    stderr = stderr.clamp_min(1e-12 * float(expected.abs().max()))  # deterministic entries
    scores = (mean - expected).abs() / stderr
    if float(scores.max()) > z:
        worst = scores.flatten().topk(min(5, scores.numel())).indices
        rows = "\n".join(f"  entry {int(i)}: mean {mean.flatten()[i]:.6g} ± "
                         f"{stderr.flatten()[i]:.2g}, expected {expected.flatten()[i]:.6g}"
                         for i in worst)
        raise AssertionError(f"{float(scores.max()):.2f} standard errors off:\n{rows}")


def assert_kernels_within_standard_errors(mc, expected, z: float = 5.0) -> None:
    """Both kernels of a ``MonteCarloKernel`` against a ``Kernel``."""
    assert_within_standard_errors(mc.nngp, mc.nngp_stderr, expected.nngp, z)
    assert_within_standard_errors(mc.ntk, mc.ntk_stderr, expected.ntk, z)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The suite is mostly tiny tensor operations; on a 2-core machine shared with other
    # processes, every parallel region of two threads can stall for a scheduler time slice
    # (measured: minutes instead of seconds). Results do not depend on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=sorted(CASES), ids=sorted(CASES))
def case(request):
    return CASES[request.param]
