"""Which parameters of common architectures the structured engine covers by a layer rule.

The rest fall back to exact per-sample Jacobians (``implementation="structured"`` computes
them with torch.func), which costs what the jacobian engine costs for those parameters.
Models (``benchmarks/_models.py``, float32, eval mode): a ViT (patch embedding, two
``nn.TransformerEncoderLayer`` with packed ``nn.MultiheadAttention``), a GPT-2-style stack
(Hugging Face ``Conv1D`` projections, tied embeddings), a BERT-style encoder, an unrolled
``nn.LSTMCell`` and a ResNet basic block. For each: the parameter count, the share on the
structured path, and the fallback parameters grouped by their attribute name. No timing:
the numbers are the same on every machine.

Usage:
    python benchmarks/bench_structured_share.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models  # noqa: E402  (sibling helper module of this script)

MODELS = {
    "ViT 3x16x16": (_models.ViT, lambda: torch.randn(2, 3, 16, 16)),
    "GPT-2 style, 16 tokens": (_models.GPT2, lambda: torch.randint(0, 128, (2, 16))),
    "BERT style, 16 tokens": (_models.BERT, lambda: torch.randint(0, 128, (2, 16))),
    "LSTMCell unrolled, 8 steps": (_models.UnrolledLSTMCell, lambda: torch.randn(2, 8, 16)),
    "ResNet basic block": (_models.resnet_block, lambda: torch.randn(2, 3, 16, 16)),
}


def share_row(name: str) -> str:
    """One markdown row: model, parameters, structured share, what falls back."""
    build, inputs = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    share, fallback = _models.structured_share(model, inputs())
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    kinds: dict[str, int] = {}
    for n in fallback:
        kinds[n.rpartition(".")[2]] = kinds.get(n.rpartition(".")[2], 0) + params[n].numel()
    falls = ", ".join(f"`{k}` {v:,} ({v / total:.1%})"
                      for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])) or "nothing"
    return f"| {name} | {total:,} | {share:.1%} | {falls} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", choices=sorted(MODELS), default=list(MODELS))
    args = parser.parse_args(argv)
    print("| model | parameters | structured | falls back (attribute, count, share) |")
    print("|---|---|---|---|")
    for name in args.models:
        print(share_row(name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
