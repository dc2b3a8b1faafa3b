"""Miniatures of real architectures, written with torch.nn as their libraries write them.

Each keeps the features that matter to the kernel engines (masks computed from the input,
GPT-2's transposed ``Conv1D`` projections, tied embeddings, BatchNorm in eval, residual
additions) at sizes small enough for the float64 oracle: ``d <= 8``, ``L <= 5``,
``vocab <= 11``. ``tests/cases.py`` registers them in the catalog.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB, LENGTH, PAD = 11, 5, 0


def padded_token_ids(n: int, g: torch.Generator) -> torch.Tensor:
    """``(n, LENGTH)`` ids in ``1..VOCAB-1`` followed by ``PAD``: rows of 5, 4, 3, 5, ... tokens."""
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
    lengths = LENGTH - torch.arange(n) % 3
    return ids.masked_fill(torch.arange(LENGTH) >= lengths[:, None], PAD)


def token_ids(n: int, g: torch.Generator) -> torch.Tensor:
    """``(n, LENGTH)`` ids in ``0..VOCAB-1``."""
    return torch.randint(0, VOCAB, (n, LENGTH), generator=g)


class PaddedAttentionClassifier(nn.Module):
    """Sequence classifier over padded token ids.

    Embedding, self-attention whose key-padding mask comes from the ids (``ids == pad``),
    the mean over the real tokens, a linear head. Outputs ``(N, out)``.
    """

    def __init__(self, vocab: int = VOCAB, d: int = 8, heads: int = 2, out: int = 3,
                 pad: int = PAD) -> None:
        super().__init__()
        self.pad = pad
        self.embed = nn.Embedding(vocab, d)
        self.attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, out)

    def forward(self, ids):  # ids: (N, L)
        padding = ids == self.pad
        h = self.embed(ids)
        h, _ = self.attention(h, h, h, key_padding_mask=padding, need_weights=False)
        real = (~padding).to(h.dtype).unsqueeze(-1)
        return self.head((h * real).sum(1) / real.sum(1))


class Conv1D(nn.Module):
    """GPT-2's linear layer: ``weight (in, out)``, the transpose of ``nn.Linear``'s."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.3 * torch.randn(n_in, n_out))
        self.bias = nn.Parameter(0.1 * torch.randn(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class CausalSelfAttention(nn.Module):
    """GPT-2's attention: one ``Conv1D`` for queries, keys and values, a causal mask."""

    def __init__(self, d: int, heads: int, positions: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = Conv1D(d, 3 * d)
        self.c_proj = Conv1D(d, d)
        causal = torch.tril(torch.ones(positions, positions, dtype=torch.bool))
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, x):  # x: (N, L, d)
        n, length, d = x.shape
        q, k, v = (t.reshape(n, length, self.heads, -1).transpose(1, 2)
                   for t in self.c_attn(x).split(d, dim=2))
        scores = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
        # GPT-2 masks with the dtype's lowest value rather than -inf.
        scores = torch.where(self.causal[:length, :length], scores, torch.finfo(x.dtype).min)
        h = scores.softmax(-1) @ v
        return self.c_proj(h.transpose(1, 2).reshape(n, length, d))


class GPT2Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln_1 x)``, then ``x + mlp(ln_2 x)``."""

    def __init__(self, d: int, heads: int, positions: int, hidden: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, positions)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(Conv1D(d, hidden), nn.GELU(approximate="tanh"),
                                 Conv1D(hidden, d))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT2(nn.Module):
    """Token and position embeddings, one block, a final LayerNorm and an LM head tied to
    the token embedding. Outputs the last position's logits, ``(N, vocab)``."""

    def __init__(self, vocab: int = VOCAB, positions: int = LENGTH, d: int = 8, heads: int = 2,
                 hidden: int = 12) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(positions, d)
        self.h = nn.ModuleList([GPT2Block(d, heads, positions, hidden)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):  # ids: (N, L)
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x[:, -1]))


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: two 3x3 convolutions with BatchNorm, the input
    (through a strided 1x1 convolution when the shape changes) added before the last ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class TinyResNet(nn.Module):
    """Stem (convolution, BatchNorm, ReLU, max-pooling), a basic block keeping the shape,
    a strided one with a downsampling shortcut, global average pooling, a linear head.

    Inputs ``(N, 2, 6, 6)``; outputs ``(N, out)``.
    """

    def __init__(self, c_in: int = 2, width: int = 4, out: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, width + 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width + 2, out)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(self.avgpool(x).flatten(1))
