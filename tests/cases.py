"""Catalog of models the empirical-NTK engines must handle, built lazily in float64.

Each case is a factory of (model, input maker); tests iterate over ``CASES`` through the
``case`` fixture in ``conftest.py``. Add a model here and every engine test covers it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tests import architectures


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
        Case(
            "mlp_scalar_output",
            lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1), nn.Flatten(0)),
            _normal(4),
        ),
        Case(
            "mlp_matrix_output",
            lambda: nn.Sequential(
                nn.Linear(4, 6), nn.SiLU(), nn.Linear(6, 6), nn.Unflatten(1, (2, 3))
            ),
            _normal(4),
        ),
        Case(
            "mlp_no_bias",
            lambda: nn.Sequential(
                nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 2, bias=False)
            ),
            _normal(4),
        ),
        Case(
            "cnn2d",
            lambda: nn.Sequential(
                nn.Conv2d(2, 4, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2),
                nn.Tanh(),
                nn.Conv2d(4, 3, (2, 1), bias=False),
                nn.Flatten(),
                nn.Linear(18, 2),
            ),
            _normal(2, 6, 5),
        ),
        Case(
            "cnn1d",
            lambda: nn.Sequential(
                nn.Conv1d(3, 4, 3, padding=1),
                nn.Tanh(),
                nn.Conv1d(4, 2, 2, stride=2, dilation=1),
                nn.Flatten(),
            ),
            _normal(3, 7),
        ),
        Case("residual_layernorm", ResidualLayerNorm, _normal(5)),
        Case("sequence_layernorm", ResidualLayerNorm, _normal(3, 5)),
        Case("embedding", TokenModel, lambda n, g: torch.randint(0, 11, (n, 5), generator=g)),
        Case("tied_weights", TiedWeights, lambda n, g: torch.randint(0, 9, (n, 3), generator=g)),
        Case("frozen", _frozen_mlp, _normal(4)),
        Case(
            "batchnorm_eval",
            lambda: nn.Sequential(
                nn.Conv2d(2, 3, 3),
                nn.BatchNorm2d(3),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(12, 5),
                nn.BatchNorm1d(5),
                nn.Linear(5, 2),
            ),
            _normal(2, 4, 4),
        ),
        Case(
            "groupnorm",
            lambda: nn.Sequential(
                nn.Conv2d(2, 4, 3, padding=1),
                nn.GroupNorm(2, 4),
                nn.Tanh(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(4, 3),
            ),
            _normal(2, 4, 4),
        ),
        Case("raw_parameter", RawParameter, _normal(3)),
        Case("transformer_eval", TinyTransformer, _normal(4, 8)),
    ]
}


# Cases for the structured engine's rules (appended; every engine test covers them too).


class ConvPaddings(nn.Module):
    """String padding ('same' with an even kernel pads asymmetrically, 'valid') and
    non-zero padding modes, in 1-d and 2-d."""

    def __init__(self) -> None:
        super().__init__()
        self.same_even = nn.Conv1d(2, 3, 4, padding="same", dilation=2)
        self.reflect = nn.Conv1d(3, 2, 3, padding=1, padding_mode="reflect", stride=2)
        self.valid = nn.Conv2d(2, 3, (2, 3), padding="valid")
        self.circular = nn.Conv2d(3, 2, 3, padding=(1, 2), padding_mode="circular", stride=(1, 2))
        self.same2d = nn.Conv2d(2, 2, (2, 4), padding="same", padding_mode="replicate", bias=False)
        self.head = nn.Linear(2 * 4 + 2 * 4 * 3 + 2 * 5 * 5, 2)

    def forward(self, x):  # x: (N, 2, 5, 5)
        seq = torch.tanh(self.reflect(torch.tanh(self.same_even(x.flatten(2)[..., :8]))))
        img = torch.tanh(self.circular(torch.tanh(self.valid(x))))
        same = self.same2d(x)
        return self.head(torch.cat([seq.flatten(1), img.flatten(1), same.flatten(1)], 1))


class LinearPositions(nn.Module):
    """A Linear over two leading position dimensions, a head on their mean."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):  # x: (N, 2, 3, 4)
        return self.head(torch.tanh(self.inner(x)).mean((1, 2)))


class PaddedEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 3, padding_idx=0)
        self.head = nn.Linear(3, 2)

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens)).sum(1))


class ConvTwice(nn.Module):
    """One Conv1d applied at two call sites of different lengths (positions concatenated)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 3, padding=1)
        self.head = nn.Linear(2 * 6 + 2 * 3, 2)

    def forward(self, x):  # x: (N, 2, 6)
        a = torch.tanh(self.conv(x))
        b = torch.tanh(self.conv(a[..., ::2]))
        return self.head(torch.cat([a.flatten(1), b.flatten(1)], 1))


class SharedWeightLinears(nn.Module):
    """Two Linear modules holding one weight Parameter, each with its own bias."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.second.weight = self.first.weight
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


class RawUseOfLayerWeight(nn.Module):
    """A Linear's weight also used outside the layer's call: it must take the fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.fc(x)) + torch.sin(x @ self.fc.weight.T)
        return self.head(h)


CASES.update(
    {
        c.name: c
        for c in [
            Case("conv_paddings", ConvPaddings, _normal(2, 5, 5)),
            Case("linear_positions", LinearPositions, _normal(2, 3, 4)),
            Case(
                "embedding_padding_idx",
                PaddedEmbedding,
                lambda n, g: (
                    torch.randint(0, 7, (n, 4), generator=g) * (torch.rand(n, 4, generator=g) > 0.3)
                ),
            ),
            Case("conv_called_twice", ConvTwice, _normal(2, 6)),
            Case(
                "batchnorm1d_sequence",
                lambda: nn.Sequential(
                    nn.Conv1d(2, 3, 2), nn.BatchNorm1d(3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2)
                ),
                _normal(2, 5),
            ),
            Case("shared_weight_linears", SharedWeightLinears, _normal(4)),
            Case("raw_use_of_layer_weight", RawUseOfLayerWeight, _normal(3)),
        ]
    }
)


def _ntk_torch_layers() -> nn.Module:
    """ntk_torch.nn layers: multipliers on weights and biases in every parameterization."""
    from ntk_torch import nn as ntk_nn

    return nn.Sequential(
        ntk_nn.Conv2d(2, 3, 3, parameterization="standard", bias_std=0.5),
        nn.Tanh(),
        ntk_nn.Conv2d(3, 2, (2, 3), parameterization="ntk", bias_std=0.7, padding="valid"),
        nn.Flatten(),
        ntk_nn.MLP(2 * 3 * 2, 5, 2, 3, parameterization="mup", bias_std=0.3, activation="erf"),
    )


CASES.update(
    {
        c.name: c
        for c in [
            Case("ntk_torch_layers", _ntk_torch_layers, _normal(2, 4, 4)),
        ]
    }
)


# Cases for separable heads: a layer whose output reaches the readout channel by channel
# (factored rule), next to layers that must not be factored.


def _ntk_torch_pooled_head() -> nn.Module:
    """ntk_torch.nn layers (multipliers on weights and biases) before and after pooling."""
    from ntk_torch import nn as ntk_nn

    return nn.Sequential(
        ntk_nn.Conv2d(2, 3, 3, parameterization="ntk", bias_std=0.5, padding="valid"),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        ntk_nn.Dense(3, 2, parameterization="mup", bias_std=0.7, role="readout"),
    )


class ResidualConvHead(nn.Module):
    """stem -> relu -> conv_a -> relu -> conv_b, plus the stem as a skip, then a pooled head.

    Only ``conv_b`` reaches the head channel by channel; the stem also reaches it around
    ``conv_b`` (through the skip), ``conv_a`` only through ``conv_b``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.conv_a = nn.Conv2d(4, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x: (N, 2, 4, 4)
        s = torch.relu(self.stem(x))
        z = torch.relu(self.conv_b(torch.relu(self.conv_a(s))) + s)
        return self.head(z.mean((2, 3)))


class HeadBypass(nn.Module):
    """A pooled head plus a second path from the convolution's output to the outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 2)
        self.head = nn.Linear(3, 2)
        self.side = nn.Linear(3 * 3 * 3, 2)

    def forward(self, x):  # x: (N, 2, 4, 4)
        y = self.conv(x)
        return self.head(torch.relu(y).mean((2, 3))) + self.side(y.flatten(1))


CASES.update(
    {
        c.name: c
        for c in [
            Case(
                "pooled_cnn_head",
                lambda: nn.Sequential(
                    nn.Conv2d(2, 4, 3, padding=1),
                    nn.ReLU(),
                    nn.Conv2d(4, 5, 3, stride=2, padding=1),
                    nn.BatchNorm2d(5),
                    nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1),
                    nn.Flatten(),
                    nn.Linear(5, 6),
                    nn.Tanh(),
                    nn.Linear(6, 3),
                ),
                _normal(2, 6, 6),
            ),
            Case("residual_conv_head", ResidualConvHead, _normal(2, 4, 4)),
            Case("head_bypass", HeadBypass, _normal(2, 4, 4)),
            Case(
                "grouped_conv1d_head",
                lambda: nn.Sequential(
                    nn.Conv1d(
                        4, 6, 3, groups=2, dilation=2, padding=2, padding_mode="reflect", stride=2
                    ),
                    nn.GELU(),
                    nn.AdaptiveMaxPool1d(1),
                    nn.Flatten(),
                    nn.Linear(6, 2),
                ),
                _normal(4, 9),
            ),
            Case("ntk_torch_pooled_head", _ntk_torch_pooled_head, _normal(2, 5, 5)),
            # The in-place activation rewrites the convolution's output tensor after the call.
            Case(
                "inplace_activation_head",
                lambda: nn.Sequential(
                    nn.Conv2d(2, 3, 3, padding=1),
                    nn.Tanh(),
                    nn.Conv2d(3, 4, 3),
                    nn.LeakyReLU(0.3, inplace=True),
                    nn.AdaptiveAvgPool2d(1),
                    nn.Flatten(),
                    nn.Linear(4, 3),
                ),
                _normal(2, 5, 5),
            ),
        ]
    }
)


# Miniatures of real architectures (tests/architectures.py).

CASES.update(
    {
        c.name: c
        for c in [
            Case("padded_attention", architectures.PaddedAttentionClassifier,
                 architectures.padded_token_ids),
            Case("gpt2_block", architectures.TinyGPT2, architectures.token_ids),
            Case("resnet_basic_block", architectures.TinyResNet, _normal(2, 6, 6)),
        ]
    }
)
