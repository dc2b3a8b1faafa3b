"""Catalog of models the empirical-NTK engines must handle, built lazily in float64.

Each case is a factory of (model, input maker); tests iterate over ``CASES`` through the
``case`` fixture in ``conftest.py``. Add a model here and every engine test covers it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Case:
    name: str
    make_model: Callable[[], nn.Module]
    make_inputs: Callable[[int, torch.Generator], torch.Tensor]

    def build(self, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        model = self.make_model()
        # Move buffers/parameters away from their trivial init so every term matters
        # (before the dtype cast, so that every dtype gets the same values).
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name.endswith("running_mean"):
                    buf.uniform_(-0.5, 0.5)
                elif name.endswith("running_var"):
                    buf.uniform_(0.5, 2.0)
            for module in model.modules():
                if isinstance(module, _NORMS):
                    for p in module.parameters(recurse=False):
                        p.add_(0.3 * torch.randn_like(p))
        return model.to(dtype).eval()

    def inputs(self, n: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
        x = self.make_inputs(n, torch.Generator().manual_seed(seed))
        return x.to(dtype) if x.is_floating_point() else x


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def _normal(*shape: int) -> Callable[[int, torch.Generator], torch.Tensor]:
    return lambda n, g: torch.randn(n, *shape, generator=g, dtype=torch.float64)


class ResidualLayerNorm(nn.Module):
    """x + W2 gelu(W1 LN(x)), then a linear head."""

    def __init__(self, d: int = 5, hidden: int = 7, out: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, out)

    def forward(self, x):
        return self.head(x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x)))))


class TokenModel(nn.Module):
    """Embedding of integer tokens, a per-token Linear, mean over tokens, a head."""

    def __init__(self, vocab: int = 11, d: int = 4, out: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, out)

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))).mean(1))


class TiedWeights(nn.Module):
    """One Linear applied twice, and an input embedding tied to the output projection."""

    def __init__(self, vocab: int = 9, d: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.shared = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        h = self.embed(tokens)
        h = self.shared(torch.tanh(self.shared(h)))
        return self.out(h.mean(1))


class RawParameter(nn.Module):
    """Parameters used directly in forward, outside any standard layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.scale = nn.Parameter(torch.randn(4))
        self.shift = nn.Parameter(torch.randn(()))

    def forward(self, x):
        return torch.sin(self.fc(x) * self.scale) + self.shift


class TinyTransformer(nn.Module):
    def __init__(self, d: int = 8, out: int = 3) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=12, batch_first=True)
        self.head = nn.Linear(d, out)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def _frozen_mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    model[0].requires_grad_(False)
    model[4].bias.requires_grad_(False)
    return model


CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case("mlp", lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), _normal(4)),
        Case("mlp_scalar_output",
             lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1), nn.Flatten(0)),
             _normal(4)),
        Case("mlp_matrix_output",
             lambda: nn.Sequential(nn.Linear(4, 6), nn.SiLU(), nn.Linear(6, 6), nn.Unflatten(1, (2, 3))),
             _normal(4)),
        Case("mlp_no_bias", lambda: nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(),
                                                  nn.Linear(5, 2, bias=False)), _normal(4)),
        Case("cnn2d",
             lambda: nn.Sequential(
                 nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                 nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2), nn.Tanh(),
                 nn.Conv2d(4, 3, (2, 1), bias=False), nn.Flatten(), nn.Linear(18, 2)),
             _normal(2, 6, 5)),
        Case("cnn1d",
             lambda: nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.Tanh(),
                                   nn.Conv1d(4, 2, 2, stride=2, dilation=1), nn.Flatten()),
             _normal(3, 7)),
        Case("residual_layernorm", ResidualLayerNorm, _normal(5)),
        Case("sequence_layernorm", ResidualLayerNorm, _normal(3, 5)),
        Case("embedding", TokenModel, lambda n, g: torch.randint(0, 11, (n, 5), generator=g)),
        Case("tied_weights", TiedWeights, lambda n, g: torch.randint(0, 9, (n, 3), generator=g)),
        Case("frozen", _frozen_mlp, _normal(4)),
        Case("batchnorm_eval",
             lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                                   nn.Linear(12, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)),
             _normal(2, 4, 4)),
        Case("groupnorm",
             lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)),
             _normal(2, 4, 4)),
        Case("raw_parameter", RawParameter, _normal(3)),
        Case("transformer_eval", TinyTransformer, _normal(4, 8)),
    ]
}

