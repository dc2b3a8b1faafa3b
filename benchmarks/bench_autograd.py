"""The engine without vmap against the bare autograd work it does, on an LSTM classifier.

And the structured engine, which runs the LSTM unrolled under vmap, on the same model.

The model: ``nn.LSTM`` (``--input`` 16 features, ``--hidden`` 64, ``--layers`` 2,
batch-first) over ``--steps`` 20 time steps, its last step read by a Linear head to
``--outputs`` O = 10; ``--n`` N = 32 float32 samples. Timed:

- ``engine full`` / ``engine trace``: ``empirical_ntk_fn(model, mode=...,
  implementation="autograd")(x)``, the ``(N, N, O, O)`` or ``(N, N)`` kernel with everything
  it does (profiling, checks, the per-sample Jacobians, their contraction);
- ``structured full`` / ``structured trace``: the same with ``implementation="structured"``
  (layer inputs and output cotangents of the unrolled LSTM, batched over samples);
- ``bare loop``: for each sample a forward of that sample alone and ``O`` calls of
  ``torch.autograd.grad(out[i], params, retain_graph=True)``, results dropped: the passes
  the engine needs, with no bookkeeping;
- ``bare loop + J Jᵀ``: the same passes keeping the gradients as rows of one ``(N·O, P)``
  matrix ``J``, then the one product ``J Jᵀ``: the least work any kernel from per-sample
  Jacobians does in full mode (its ``2·N²·O²·P`` FLOPs grow with ``O`` faster than the
  passes' ``N·O``).

Method: one untimed warm-up call of each, then ``--rounds`` rounds alternating them
(A B C D E F A B ...); the table gives the medians and the ratios. The command, date,
machine, torch version and thread count are printed with it, and both engines' kernels
are checked against the bare loop's (vmap, and with it the jacobian and ntk_vp engines,
cannot run this model).

Usage:
    python benchmarks/bench_autograd.py [--rounds 7] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402  (sibling helper module of this script)

import ntk_torch as nt  # noqa: E402


class LSTMClassifier(nn.Module):
    """``nn.LSTM`` over ``(N, T, D)``, a Linear head on the last time step."""

    def __init__(self, d: int, hidden: int, layers: int, out: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(d, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, out)

    def forward(self, x):
        h, _ = self.lstm(x)
        return self.head(h[:, -1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--outputs", type=int, default=10)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.steps, args.n, args.rounds = 8, 4, 4, 1
    return args


def bare_loop(model: nn.Module, x: torch.Tensor) -> None:
    """The per-sample forwards and ``O`` backward passes, with nothing kept."""
    params = list(model.parameters())
    for a in range(x.shape[0]):
        out = model(x[a:a + 1]).reshape(-1)
        for i in range(out.shape[0]):
            torch.autograd.grad(out[i], params, retain_graph=True)


def bare_kernel(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(N·O, N·O)``: ``J Jᵀ`` of the bare loop's gradients, rows ``(a, i)``."""
    params = list(model.parameters())
    rows = []
    for a in range(x.shape[0]):
        out = model(x[a:a + 1]).reshape(-1)
        rows += [torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[i], params,
                                                                       retain_graph=True)])
                 for i in range(out.shape[0])]
    jac = torch.stack(rows)
    return jac @ jac.T


def machine() -> str:
    threads = torch.get_num_threads()
    return (f"{_timing.cpu_name()}, {platform.system()}, torch {torch.__version__}, "
            f"{threads} threads")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = LSTMClassifier(args.input, args.hidden, args.layers, args.outputs).eval()
    x = torch.randn(args.n, args.steps, args.input)
    full = nt.empirical_ntk_fn(model, mode="full", implementation="autograd")
    trace = nt.empirical_ntk_fn(model, mode="trace", implementation="autograd")
    s_full = nt.empirical_ntk_fn(model, mode="full", implementation="structured")
    s_trace = nt.empirical_ntk_fn(model, mode="trace", implementation="structured")

    n, o = args.n, args.outputs
    reference = bare_kernel(model, x).view(n, o, n, o).permute(0, 2, 1, 3)
    error = float((full(x) - reference).abs().max() / reference.abs().max())
    s_error = float((s_full(x) - reference).abs().max() / reference.abs().max())

    methods = {"engine full": lambda: full(x), "engine trace": lambda: trace(x),
               "structured full": lambda: s_full(x), "structured trace": lambda: s_trace(x),
               "bare loop": lambda: bare_loop(model, x),
               "bare loop + J Jᵀ": lambda: bare_kernel(model, x)}
    samples = _timing.alternate(methods, repeats=args.rounds, budget_s=float("inf"))
    median = {name: s.median for name, s in samples.items()}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"date:    {datetime.now(timezone.utc).isoformat(timespec='minutes')}")
    print(f"machine: {machine()}")
    print(f"model:   LSTM {args.input}->{args.hidden} x{args.layers}, T={args.steps}, "
          f"O={o}, N={n}, P={n_params:,}, float32, x2=None")
    print(f"full kernel vs the bare loop's gradients: relative difference {error:.1e} "
          f"(autograd), {s_error:.1e} (structured)")
    print()
    print("| timed | median s | rounds |")
    print("|---|---|---|")
    for name, s in samples.items():
        print(f"| {name} | {s.median:.3f} | {len(s.seconds)} |")
    for engine, baseline in (("engine full", "bare loop + J Jᵀ"), ("engine full", "bare loop"),
                             ("engine trace", "bare loop"), ("structured full", "engine full"),
                             ("structured trace", "engine trace"),
                             ("structured full", "bare loop + J Jᵀ")):
        print(f"| ratio {engine} / {baseline} | {median[engine] / median[baseline]:.2f} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
