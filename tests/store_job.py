"""A kernel-store job for the tests that need other processes: SIGKILL mid-run, ``torchrun``
ranks, independent workers. Run as ``python tests/store_job.py STORE [--ranks-file F]``;
the tests import :func:`build` to compute the same kernel in-process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

N, N2, TILE = 96, 40, 8


def build(x2: bool = False) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
    """The model and inputs every process builds alike (float64, seeded)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3)
    )
    model = model.double().eval()
    x1 = torch.randn(N, 5, generator=g, dtype=torch.float64)
    second = torch.randn(N2, 5, generator=g, dtype=torch.float64) if x2 else None
    return model, x1, second


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("--mode", default="full")
    parser.add_argument("--x2", action="store_true")
    parser.add_argument("--implementation", default="jacobian")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds of sleep per tile")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as the test process (tests/conftest.py): same rounding
    import ntk_torch as nt

    model, x1, x2 = build(args.x2)
    if args.delay:  # slow tiles, so that a kill lands mid-run

        def slow(module, inputs, output):
            time.sleep(args.delay / 2)

        model[0].register_forward_hook(slow)
    store = nt.compute_kernel(
        model,
        x1,
        x2,
        store=args.store,
        mode=args.mode,
        tile=TILE,
        implementation=args.implementation,
        progress=False,
    )
    rank = os.environ.get("RANK", "-")
    print(f"rank {rank} done {store.progress}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
