"""Shared fixtures and the one dtype-keyed tolerance table."""

from __future__ import annotations

import pytest
import torch

from tests.cases import CASES

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
