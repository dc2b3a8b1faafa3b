"""The layers real models are made of, small: builders for the benchmark rows.

- ``vit``: a ViT-style encoder (patch convolution, ``nn.TransformerEncoderLayer`` with
  ``nn.MultiheadAttention``, learned position and class-token parameters);
- ``gpt2``: GPT-2-style blocks whose projections are ``Conv1D`` (below), causal attention
  written out as GPT-2's eager attention does it, token and position embeddings;
- ``bert``: a tiny BERT-like encoder (embeddings, post-norm ``nn.TransformerEncoder``,
  pooler and classifier on the first token);
- ``lstm_cell``: an ``nn.LSTMCell`` unrolled over time, then a readout;
- ``resnet_block``: a ResNet basic block (``Conv2d``, ``BatchNorm2d`` in eval mode, residual
  addition) between a stem and a pooled readout.

:func:`structured_share` tells which parameters the structured engine handles by a layer
rule and which fall back to per-sample Jacobians.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ntk_torch._engines import structured
from ntk_torch._functional import functionalize


class Conv1D(nn.Module):
    """The ``Conv1D`` of Hugging Face ``transformers``, as GPT-2 uses it.

    ``y = x @ W + b`` with ``W (nx, nf)``: a linear layer storing its weight transposed.
    """

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.randn(nf) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2Attention(nn.Module):
    def __init__(self, d: int, heads: int, context: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = Conv1D(3 * d, d)
        self.c_proj = Conv1D(d, d)
        self.register_buffer("causal", torch.tril(torch.ones(context, context, dtype=torch.bool)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(n, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        scores = scores.masked_fill(~self.causal[:t, :t], torch.finfo(scores.dtype).min)
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, t, d)
        return self.c_proj(attended)


class GPT2Block(nn.Module):
    def __init__(self, d: int, heads: int, context: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = GPT2Attention(d, heads, context)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = Conv1D(4 * d, d)
        self.c_proj = Conv1D(d, 4 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(nn.functional.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    """Token ids ``(N, T)`` to ``out`` scores read from the last token."""

    def __init__(self, vocab: int = 128, context: int = 16, d: int = 64, heads: int = 4,
                 layers: int = 2, out: int = 10) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.h = nn.ModuleList(GPT2Block(d, heads, context) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.score = nn.Linear(d, out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        x = self.wte(ids) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        return self.score(self.ln_f(x)[:, -1])


class ViT(nn.Module):
    """Images ``(N, C, H, W)`` to ``out`` scores read from the class token."""

    def __init__(self, image: int = 16, patch: int = 4, channels: int = 3, d: int = 64,
                 heads: int = 4, layers: int = 2, out: int = 10) -> None:
        super().__init__()
        self.patches = nn.Conv2d(channels, d, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.position = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.head(self.norm(self.encoder(tokens + self.position))[:, 0])


class BERT(nn.Module):
    """Token ids ``(N, T)`` to ``out`` scores from the pooled first token."""

    def __init__(self, vocab: int = 128, context: int = 16, d: int = 32, heads: int = 2,
                 layers: int = 2, out: int = 2) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab, d)
        self.positions = nn.Embedding(context, d)
        self.norm = nn.LayerNorm(d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu",
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pooler = nn.Linear(d, d)
        self.classifier = nn.Linear(d, out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        x = self.norm(self.words(ids) + self.positions(positions))
        return self.classifier(torch.tanh(self.pooler(self.encoder(x)[:, 0])))


class UnrolledLSTMCell(nn.Module):
    """Sequences ``(N, T, D)`` through an ``nn.LSTMCell`` step by step, then a readout."""

    def __init__(self, features: int = 16, hidden: int = 64, out: int = 10) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(features, hidden)
        self.readout = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        c = torch.zeros_like(h)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.readout(h)


class BasicBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


def resnet_block(channels: int = 16, out: int = 10) -> nn.Module:
    """Stem, one basic block and a pooled readout on ``(N, 3, H, W)`` images."""
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(channels), nn.ReLU(), BasicBlock(channels),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, out))


def structured_share(model: nn.Module, x: torch.Tensor) -> tuple[float, tuple[str, ...]]:
    """Share of the parameters that a layer rule handles, and the names that fall back."""
    fm = functionalize(model)
    params = fm.params()
    structure = structured.probe(fm, params, x[:1])
    total = sum(p.numel() for p in params.values())
    return 1.0 - structure.fallback_params / total, structure.fallback
