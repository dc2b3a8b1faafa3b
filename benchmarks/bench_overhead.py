"""Fixed cost per call: ``empirical_ntk`` and ``EmpiricalNTK.__call__`` on tiny models.

On a tiny model the kernel itself takes about a millisecond, so what a call spends
besides it (argument checks, the model checks, profiling, choosing an engine) decides
the speed. Baseline: the torch.func tutorial's ``vmap(jacrev)`` recipe (``_tutorial.py``),
which does no checks at all.

Rows, all in float32, ``x2`` given (the tutorial has no symmetric path), ``mode="full"``:

- ``mlp``: ``Linear(8, 16), Tanh, Linear(16, 3)``, ``N = 4``;
- ``bert``: token embedding, one post-norm ``nn.TransformerEncoderLayer`` (d=16, 2 heads),
  mean over tokens, a 2-way readout; ``N = 4`` sequences of 8 token ids;
- ``gpt2``: token and position embeddings, one pre-norm GELU ``nn.TransformerEncoderLayer``
  with a causal mask, the last token's 4 logits; ``N = 4`` sequences of 8 token ids;
- ``lstm``: an ``nn.LSTMCell(4, 16)`` unrolled over 6 steps, a 2-way readout; ``N = 4``.

Methods per row: ``tutorial`` (the recipe); ``engine`` (the jacobian engine's ``compute``
called directly with the block's sizes: the kernel work without any of a call's checks);
``empirical_ntk`` (one-shot, a new call each time, as in a training loop) and
``empirical_ntk_jac`` (the same with ``implementation="jacobian"``); ``fn`` and
``fn_jacobian`` (``empirical_ntk_fn(model)`` made once, then called). The fixed cost of a
call is ``empirical_ntk_jac - engine`` and ``fn_jacobian - engine``. Methods are timed in
turns (A B C A B C ...) after one warm-up call each; the table gives medians in ms and
``tutorial / method`` (above 1: faster than the tutorial). The targets checked at the end:
a fixed cost of at most 2 ms per call on the MLP, and ``empirical_ntk`` at least as fast as
the tutorial on every row. ``--out DIR`` also writes ``DIR/bench_overhead.csv``.

Usage:
    python benchmarks/bench_overhead.py [--repeats 200] [--threads 1] [--out DIR]
    python benchmarks/bench_overhead.py --profile mlp
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import pstats
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402  (sibling helper modules of this script)
from _tutorial import tutorial_jacrev  # noqa: E402
from bench_empirical import library_problem  # noqa: E402

import ntk_torch as nt  # noqa: E402
from ntk_torch._engines import jacobian  # noqa: E402
from ntk_torch._functional import functionalize  # noqa: E402

N, TOKENS, VOCAB, STEPS = 4, 8, 50, 6


class _Bert(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.block = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, 2)

    def forward(self, tokens):
        return self.head(self.block(self.embed(tokens)).mean(1))


class _Gpt2(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.position = nn.Embedding(TOKENS, d)
        self.block = nn.TransformerEncoderLayer(d, 2, 4 * d, dropout=0.0, activation="gelu",
                                                batch_first=True, norm_first=True)
        self.head = nn.Linear(d, 4)

    def forward(self, tokens):
        t = tokens.shape[1]
        h = self.embed(tokens) + self.position(torch.arange(t, device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        return self.head(self.block(h, src_mask=mask, is_causal=True)[:, -1])


class _UnrolledLstm(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(4, hidden)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):  # x: (N, STEPS, 4)
        h = c = x.new_zeros(x.shape[0], self.cell.hidden_size)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)


def _tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (N, TOKENS), generator=torch.Generator().manual_seed(seed))


ROWS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]]] = {
    "mlp": lambda: (nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)),
                    torch.randn(N, 8), torch.randn(N, 8)),
    "bert": lambda: (_Bert().eval(), _tokens(1), _tokens(2)),
    "gpt2": lambda: (_Gpt2().eval(), _tokens(1), _tokens(2)),
    "lstm": lambda: (_UnrolledLstm(), torch.randn(N, STEPS, 4), torch.randn(N, STEPS, 4)),
}


def methods(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, Callable]:
    fn = nt.empirical_ntk_fn(model, mode="full")
    fn_jacobian = nt.empirical_ntk_fn(model, mode="full", implementation="jacobian")
    fm = functionalize(model)
    groups = fm.groups(False)
    problem = library_problem(model, x1, x2, "full")  # the block sizes a call passes on

    def engine():
        with torch.no_grad():
            return jacobian.compute(fm, fm.params(), x1, x2, "full", groups, problem=problem)

    return {
        "tutorial": lambda: tutorial_jacrev(model, x1, x2, "full"),
        "engine": engine,
        "empirical_ntk": lambda: nt.empirical_ntk(model, x1, x2, mode="full"),
        "empirical_ntk_jac": lambda: nt.empirical_ntk(model, x1, x2, mode="full",
                                                      implementation="jacobian"),
        "fn": lambda: fn(x1, x2),
        "fn_jacobian": lambda: fn_jacobian(x1, x2),
    }


def check_agreement(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> float:
    """Largest relative difference between ntk_torch's kernel and the tutorial's."""
    ours = nt.empirical_ntk(model, x1, x2, mode="full")
    theirs = tutorial_jacrev(model, x1, x2, "full")
    return float((ours - theirs).abs().max() / theirs.abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per method")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--rows", nargs="*", choices=sorted(ROWS), default=list(ROWS))
    parser.add_argument("--out", help="folder for bench_overhead.csv")
    parser.add_argument("--profile", choices=sorted(ROWS),
                        help="instead of timing, print cProfile's top functions of one-shot "
                             "calls on this row")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.profile:
        model, x1, x2 = ROWS[args.profile]()
        nt.empirical_ntk(model, x1, x2)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.repeats):
            nt.empirical_ntk(model, x1, x2)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
        return 0

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"command: python benchmarks/bench_overhead.py {' '.join(argv or sys.argv[1:])}")
    print(f"date: {stamp}; machine: {_timing.cpu_name()}, "
          f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
    print(f"{'row':6} {'method':14} {'median ms':>10} {'tutorial/method':>16}")
    records, checks = [], []
    for row in args.rows:
        model, x1, x2 = ROWS[row]()
        error = check_agreement(model, x1, x2)
        samples = _timing.alternate(methods(model, x1, x2), args.repeats, budget_s=30.0)
        base = samples["tutorial"].median
        for name, s in samples.items():
            print(f"{row:6} {name:14} {1e3 * s.median:10.3f} {base / s.median:16.2f}")
            records.append({"row": row, "method": name, "median_ms": 1e3 * s.median,
                            "tutorial_over_method": base / s.median, "max_rel_diff": error})
        engine = samples["engine"].median
        one_shot = samples["empirical_ntk_jac"].median - engine
        reused = samples["fn_jacobian"].median - engine
        print(f"{row:6} fixed cost per call beyond the jacobian engine's work: "
              f"empirical_ntk {1e3 * one_shot:.3f} ms, fn {1e3 * reused:.3f} ms; "
              f"kernels agree with the tutorial's to {error:.1e}")
        speed = base / samples["empirical_ntk"].median
        checks.append((speed >= 1, f"{row}: empirical_ntk at {speed:.2f}x the tutorial's speed "
                                   "(>= 1)"))
        if row == "mlp":
            checks.append((one_shot <= 2e-3, f"{row}: fixed cost per call {1e3 * one_shot:.2f} ms "
                                             "(<= 2)"))
    print()
    for ok, text in checks:
        print(f"- {'PASS' if ok else 'FAIL'}: {text}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with open(Path(args.out) / "bench_overhead.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
