"""Models whose samples see each other are refused by every engine; exact models are not.

The per-sample NTK needs each sample's outputs to depend on that sample alone. Where they
do not, the engines would disagree (each sees another batch), so every call is refused
with the module responsible named; models that are per-sample up to float32 rounding
(batched and one-sample matmuls sum in other orders) must pass.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import ntk_torch as nt
from ntk_torch._engines import ENGINES
from tests.conftest import assert_close
from tests.oracle import naive_ntk

IMPLEMENTATIONS = sorted(ENGINES) + ["auto"]
COUPLED = "depend on the rest of the batch.*per-sample NTK is undefined"


class Center(nn.Module):
    """Subtracts the batch mean: sample 0's output changes with the other samples."""

    def forward(self, h):
        return h - h.mean(0)


class BatchAttention(nn.Module):
    """Attention across the samples of the batch (instead of across tokens)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.query = nn.Linear(d, d)

    def forward(self, h):
        weights = torch.softmax(self.query(h) @ h.T, dim=-1)  # (N, N)
        return weights @ h


class MixesInItsOwnForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.fc2(h / h.norm())  # one norm over the whole batch


def centered() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 6), Center(), nn.Tanh(), nn.Linear(6, 2)).eval()


def attending() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), BatchAttention(6), nn.Linear(6, 2)).eval()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("make, module", [
    (centered, r"1 \(Center\)"),
    (attending, r"2 \(BatchAttention\)"),
    (MixesInItsOwnForward, r"the forward of the model \(MixesInItsOwnForward\), before it calls "
                           r"fc2 \(Linear\)"),
])
def test_mixing_samples_is_refused_naming_the_module(make, module, implementation):
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match=f"(?s){COUPLED}.*mixing happens in {module}"):
        nt.empirical_ntk(make(), x, mode="trace", implementation=implementation)
    with pytest.raises(ValueError, match=COUPLED):
        nt.empirical_ntk(make(), x[:2], x[2:], implementation=implementation)
    with pytest.raises(ValueError, match=COUPLED):
        nt.layerwise_ntk(make(), x, implementation=implementation)


def test_one_sample_of_each_input_is_still_checked():
    x1, x2 = torch.randn(1, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match=COUPLED):
        nt.empirical_ntk(centered(), x1, x2)


def test_a_kernel_function_checks_again_once_it_sees_two_samples():
    fn = nt.empirical_ntk_fn(centered(), mode="trace")
    fn(torch.randn(1, 3))  # one sample alone: nothing to compare, and nothing is mixed
    with pytest.raises(ValueError, match=COUPLED):
        fn(torch.randn(3, 3))


def _wide_mlp() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.Tanh(),
                          nn.Linear(1024, 2))
    return model, torch.randn(8, 256)


def _convnet() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2),
                          nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(64, 3))
    return model.eval(), torch.randn(4, 3, 32, 32)


def _transformer() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(nn.TransformerEncoderLayer(128, 4, 256, dropout=0.1, batch_first=True),
                          nn.Flatten(), nn.Linear(32 * 128, 2))
    return model.eval(), torch.randn(3, 32, 128)


def _lstm() -> tuple[nn.Module, torch.Tensor]:
    class Last(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.head = nn.LSTM(16, 128, batch_first=True), nn.Linear(128, 2)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    return Last(), torch.randn(3, 20, 16)


@pytest.mark.parametrize("make", [_wide_mlp, _convnet, _transformer, _lstm])
def test_float32_models_of_moderate_size_are_not_refused(make):
    """Batched and one-sample float32 forwards differ by rounding only: that is per-sample."""
    torch.manual_seed(0)
    model, x = make()
    k = nt.empirical_ntk(model, x[:2], x[2:3], mode="trace", implementation="structured")
    assert k.shape == (2, 1) and torch.isfinite(k).all()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("make, inputs", [
    (lambda: nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).eval(),
     lambda n: torch.randn(n, 3, dtype=torch.float64)),
    (lambda: nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 2)).eval(),
     lambda n: torch.randn(n, 3, dtype=torch.float64)),
    (lambda: nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 2)),
     lambda n: torch.randint(0, 7, (n, 3))),
])
def test_per_sample_models_are_not_refused(make, inputs, implementation):
    torch.manual_seed(0)
    model = make().double()
    x1, x2 = inputs(4), inputs(3)
    k = nt.empirical_ntk(model, x1, x2, implementation=implementation)
    assert_close(k, naive_ntk(model, x1, x2, "full"))


def test_what_is_learnt_about_a_model_is_released_with_it():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    nt.empirical_ntk(model, torch.randn(3, 3))
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
