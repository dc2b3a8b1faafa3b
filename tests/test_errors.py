"""Bad input gets an error naming the argument, the expectation and what arrived."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntk_torch as nt
from ntk_torch._engines import ENGINES
from tests.conftest import assert_close
from tests.oracle import naive_ntk
from tests.test_inputs import oracle


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


@pytest.mark.parametrize("make,what", [
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), "BatchNorm1d"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Linear(4, 2)), "Dropout"),
    (lambda: nn.Sequential(nn.Unflatten(1, (1, 3)), nn.Dropout1d(0.5), nn.Flatten(),
                           nn.Linear(3, 2)),
     "Dropout1d"),
])
def test_train_mode_batch_or_random_modules_are_refused(make, what):
    model = make().train()
    with pytest.raises(ValueError, match=rf"{what}.*train mode.*model\.eval\(\)"):
        nt.empirical_ntk(model, torch.randn(4, 3))
    with pytest.raises(ValueError, match="model.eval()"):
        nt.empirical_nngp(model, torch.randn(4, 3))
    nt.empirical_ntk(model.eval(), torch.randn(4, 3))  # eval mode is fine


def test_multihead_attention_dropout_in_train_mode_is_refused():
    model = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.1, batch_first=True)
    model.dropout = nn.Identity()
    model.dropout1 = nn.Identity()
    model.dropout2 = nn.Identity()
    with pytest.raises(ValueError, match=r"self_attn \(MultiheadAttention\).*dropout=0.1"):
        nt.empirical_ntk(model, torch.randn(2, 3, 4))


def test_dropout_between_stacked_rnn_layers_in_train_mode_is_refused():
    class Last(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(3, 4, num_layers=2, dropout=0.2, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    with pytest.raises(ValueError, match=r"rnn \(GRU\) in train mode with dropout=0.2.*eval"):
        nt.empirical_ntk(Last(), torch.randn(2, 5, 3))


def test_dropout_with_p_zero_is_allowed_in_train_mode():
    model = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.0)).train()
    assert nt.empirical_ntk(model, torch.randn(2, 3), mode="trace").shape == (2, 2)


def test_batchnorm_without_running_stats_is_refused_even_in_eval():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        nt.empirical_ntk(model, torch.randn(4, 3))


IMPLEMENTATIONS = sorted(ENGINES) + ["auto"]


class FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(F.dropout(torch.tanh(self.fc1(x)), 0.2, self.training))


class DropPath(nn.Module):
    """Drops whole samples' residual branches, as timm's DropPath does."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        keep = 1.0 - self.p
        mask = (torch.rand(x.shape[0], 1, dtype=x.dtype, device=x.device) < keep).to(x.dtype)
        return x * mask / keep


class Residual(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc, self.drop_path = nn.Linear(d, d), DropPath(0.3)

    def forward(self, x):
        return x + self.drop_path(torch.tanh(self.fc(x)))


class Noise(nn.Module):
    def forward(self, x):
        return x + 0.1 * torch.randn_like(x)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("make, module, random_in_eval", [
    (FunctionalDropout, r"the model \(FunctionalDropout\)", False),
    (lambda: nn.Sequential(nn.Linear(3, 6), Residual(6), nn.Linear(6, 2)),
     r"1\.drop_path \(DropPath\)", False),
    (lambda: nn.Sequential(nn.Linear(3, 6), Noise(), nn.Linear(6, 2)), r"1 \(Noise\)", True),
])
def test_random_draws_in_train_mode_are_refused_naming_the_module(make, module, random_in_eval,
                                                                  implementation):
    x = torch.randn(4, 3, dtype=torch.float64)
    model = make().double().train()
    with pytest.raises(ValueError, match=rf"output is random: {module} draws random numbers"
                                         r".*NTK is undefined\. Call model\.eval\(\) first"):
        nt.empirical_ntk(model, x, mode="trace", implementation=implementation)
    model.eval()
    if random_in_eval:
        with pytest.raises(ValueError, match=f"{module} draws.*in eval mode too"):
            nt.empirical_ntk(model, x, mode="trace", implementation=implementation)
    else:  # deterministic in eval mode: the kernel of the model as it is
        assert_close(nt.empirical_ntk(model, x, implementation=implementation),
                     naive_ntk(model, x, None, "full"))


def test_random_draws_on_a_path_the_check_missed_get_the_same_error():
    class NoisyInLargeBatches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            out = self.fc(x)
            if x.shape[0] > 2:  # the check's two samples do not take this path; ntk_vp does
                out = out + 0.0 * torch.randn_like(out)
            return out

    with pytest.raises(ValueError, match="output is random.*model.eval"):
        nt.empirical_ntk(NoisyInLargeBatches(), torch.randn(4, 3), implementation="ntk_vp")


def _convnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("make, x, message", [
    (_convnet, torch.randn(3, 8, 8),
     r"`x1` of shape \(3, 8, 8\) looks like a single sample without its batch dimension: the "
     r"model's first layer 0 \(Conv2d\) takes inputs \(N, 3, H, W\)\. Pass x1\.unsqueeze\(0\)"),
    (_convnet, torch.randn(5, 8, 8),
     r"`x1` has shape \(5, 8, 8\), but the model's first layer 0 \(Conv2d\) takes inputs "
     r"\(N, 3, H, W\)"),
    (mlp, torch.randn(3), r"`x1` of shape \(3,\) looks like a single sample.*x1\.unsqueeze\(0\)"),
    (lambda: nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)), torch.randn(5),
     r"`x1` of shape \(5,\) has no feature dimension.*x1\.unsqueeze\(1\) for 5 samples"),
])
def test_unbatched_inputs_are_refused_with_the_fix(make, x, message, implementation):
    with pytest.raises(ValueError, match=message):
        nt.empirical_ntk(make(), x, implementation=implementation)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("make, x, message", [
    (_convnet, torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8),
     r"`x1` has dtype torch\.uint8 but the model's first layer 0 \(Conv2d\) computes in "
     r"torch\.float32: convert the inputs with x1\.float\(\) or x1\.to\(torch\.float32\)"),
    (mlp, torch.randint(0, 5, (2, 3)), r"`x1` has dtype torch\.int64 but .*torch\.float32"),
    (lambda: nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 2)), torch.randn(2, 3),
     r"`x1` has dtype torch\.float32 but the model's first layer 0 \(Embedding\) looks up "
     r"integer token ids: pass x1\.long\(\)"),
])
def test_inputs_of_the_wrong_kind_of_dtype_are_refused(make, x, message, implementation):
    with pytest.raises(ValueError, match=message):
        nt.empirical_ntk(make(), x, implementation=implementation)


def test_no_deprecation_or_future_warnings_reach_the_user():
    """Every engine, in a fresh process: torch warns once per process, on first use."""
    script = textwrap.dedent("""
        import warnings
        import torch
        from torch import nn
        import ntk_torch as nt
        from ntk_torch._engines import ENGINES

        models = {
            "mlp": (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), torch.randn(3, 3)),
            "attention": (nn.Sequential(nn.TransformerEncoderLayer(4, 2, 8, batch_first=True),
                                        nn.Flatten(), nn.Linear(12, 2)).eval(),
                          torch.randn(2, 3, 4)),
        }
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        # First, before any engine: linearize's forward-mode pass loads torch's rules itself.
        nt.linearize(models["mlp"][0])(models["mlp"][1]).sum().backward()
        for model, x in models.values():
            for implementation in [*ENGINES, "auto"]:
                nt.empirical_ntk(model, x, x[:1], implementation=implementation)
                nt.layerwise_ntk(model, x, implementation=implementation, mode="trace")
        print("ok")
    """)
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=root, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_mismatched_trailing_shapes():
    message = "`x2` must share `x1`'s trailing shape (3,), got (5,)"
    with pytest.raises(ValueError, match=re.escape(message)):
        nt.empirical_ntk(mlp(), torch.randn(4, 3), torch.randn(2, 5))


@pytest.mark.parametrize("bad", [[[1.0, 2.0, 3.0]], 3.0, None])
def test_non_tensor_inputs(bad):
    with pytest.raises(TypeError, match="`x1` must be a torch.Tensor"):
        nt.empirical_ntk(mlp(), bad)


def test_non_tensor_x2():
    with pytest.raises(TypeError, match="`x2` must be a torch.Tensor.*got list"):
        nt.empirical_ntk(mlp(), torch.randn(2, 3), [[1.0, 2.0, 3.0]])


def test_zero_dimensional_input():
    with pytest.raises(ValueError, match="`x1` must have a batch dimension"):
        nt.empirical_ntk(mlp(), torch.tensor(1.0))


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module, got function"):
        nt.empirical_ntk(lambda x: x, torch.randn(2, 3))


def test_model_without_trainable_parameters():
    model = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="`model` has no trainable parameters"):
        nt.empirical_ntk(model, torch.randn(2, 3))


def test_unknown_mode_and_implementation():
    with pytest.raises(ValueError,
                       match=r"`mode` must be one of 'full', 'diagonal', 'trace', got 'sum'"):
        nt.empirical_ntk(mlp(), torch.randn(2, 3), mode="sum")
    with pytest.raises(ValueError, match=r"`implementation` must be one of 'auto', .*got 'fast'"):
        nt.empirical_ntk(mlp(), torch.randn(2, 3), implementation="fast")
    with pytest.raises(ValueError, match="`mode` must be one of"):
        nt.empirical_nngp(mlp(), torch.randn(2, 3), mode="sum")


def test_unknown_parameter_names():
    with pytest.raises(ValueError,
                       match=r"`params` names unknown parameter '9.weight'; the model has: 0.bias"):
        nt.empirical_ntk(mlp(), torch.randn(2, 3), params=["9.weight"])
    with pytest.raises(TypeError, match=r"got the string '0.weight'; use \['0.weight'\]"):
        nt.empirical_ntk(mlp(), torch.randn(2, 3), params="0.weight")
    with pytest.raises(ValueError, match="`params` predicate selected no parameters"):
        nt.empirical_ntk(mlp(), torch.randn(2, 3), params=lambda name, p: False)


def test_mixed_devices_and_dtypes():
    with pytest.raises(ValueError,
                       match="`x1` is on meta but the model's parameter '0.weight' is on cpu"):
        nt.empirical_ntk(mlp(), torch.randn(2, 3, device="meta"))
    with pytest.raises(ValueError, match="`x1` has dtype torch.float64 but the model's parameter"):
        nt.empirical_ntk(mlp(), torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="`x2` must have `x1`'s dtype"):
        nt.empirical_ntk(mlp(), torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64))


def test_model_returning_non_tensor():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x), x

    with pytest.raises(TypeError,
                       match="`model` must return a Tensor of shape \\(N, ...\\), got tuple"):
        nt.empirical_ntk(Pair(), torch.randn(2, 3))


@pytest.mark.parametrize("bad, error, got", [(0, ValueError, "0"), (-3, ValueError, "-3"),
                                             (2.5, TypeError, "float 2.5"),
                                             (True, TypeError, "bool True")])
def test_bad_batch_size(bad, error, got):
    with pytest.raises(error, match=f"`batch_size` must be a positive int or None, got {got}"):
        nt.empirical_ntk(mlp(), torch.randn(2, 3), batch_size=bad)


def test_memory_budget_error_says_what_fits():
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 10))
    x = torch.randn(64, 20)
    budget = 2e6  # bytes; the full (64, 64, 10, 10) float32 kernel alone is 1.6 MB
    with pytest.raises(MemoryError) as info:
        nt.empirical_ntk(model, x, mode="full", implementation="jacobian", memory_budget=budget)
    message = str(info.value)
    assert "needs about" in message and "memory budget is" in message
    suggestion = re.search(r"implementation='jacobian' with batch_size=(\d+)", message)
    assert suggestion, message
    batch_size = int(suggestion.group(1))
    assert 1 <= batch_size < 64
    # Following the advice works and gives the same kernel.
    tiled = nt.empirical_ntk(model, x, mode="full", implementation="jacobian", memory_budget=budget,
                             batch_size=batch_size)
    whole = nt.empirical_ntk(model, x, mode="full", implementation="jacobian",
                             memory_budget=float("inf"))
    torch.testing.assert_close(tiled, whole)


def test_memory_budget_error_suggests_a_cheaper_mode():
    # Many samples, few parameters: the (N, N, O, O) output is what does not fit.
    model, x = nn.Linear(3, 10), torch.randn(200, 3)
    with pytest.raises(MemoryError,
                       match=r"(?s)needs about 1\d\.\d MiB.*mode='diagonal'.*mode='trace'"):
        nt.empirical_ntk(model, x, mode="full", memory_budget=4 * 2**20)
    assert nt.empirical_ntk(model, x, mode="trace", memory_budget=4 * 2**20).shape == (200, 200)


def test_a_result_bigger_than_memory_points_to_a_kernel_store(tmp_path):
    model, x = nn.Linear(3, 10).double(), torch.randn(200, 3, dtype=torch.float64)
    budget = 4 * 2**20  # the (200, 200, 10, 10) float64 result alone is 30.5 MiB
    with pytest.raises(MemoryError) as info:
        nt.empirical_ntk(model, x, mode="full", memory_budget=budget)
    message = str(info.value)
    assert "(200, 200, 10, 10) x 8 bytes, needs about 30.5 MiB" in message
    tile = int(re.search(r"nt\.compute_kernel\(.*mode='full', tile=(\d+)\)", message).group(1))
    # Following the advice works within the same budget and gives the kernel.
    store = nt.compute_kernel(model, x, store=tmp_path / "k", mode="full", tile=tile,
                              memory_budget=budget, progress=False)
    torch.testing.assert_close(store.block(slice(0, 50), slice(0, 200)),
                               nt.empirical_ntk(model, x[:50], x, mode="full"))


def test_batch_suggestions_leave_out_engines_far_slower_than_the_best():
    # Wide layers: one sample's Jacobian is O·P·4 = 170 MB, so `jacobian` could only run
    # blocks of a sample (millions of blocks) where `structured` needs a handful.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                          nn.Linear(2048, 10))
    x = torch.randn(3000, 64)
    with pytest.raises(MemoryError) as info:
        nt.empirical_ntk(model, x, mode="trace", memory_budget=400e6)
    message = str(info.value)
    suggestions = re.findall(r"implementation='(\w+)' with batch_size=(\d+) \(([\d,]+) blocks\)",
                             message)
    assert suggestions and all(engine != "jacobian" for engine, _, _ in suggestions), message
    fewest = min(int(blocks.replace(",", "")) for _, _, blocks in suggestions)
    assert fewest < 100, message
    # Asked for by name, the engine's own advice is still given.
    with pytest.raises(MemoryError,
                       match=r"implementation='jacobian' with batch_size=\d+ \([\d,]+ blocks\)"):
        nt.empirical_ntk(model, x, mode="trace", implementation="jacobian", memory_budget=400e6)


def test_memory_budget_must_be_positive():
    with pytest.raises(ValueError, match=r"`memory_budget` must be a number of bytes > 0 "
                                         r"\(inf allowed\) or None, got -1"):
        nt.empirical_ntk(mlp(), torch.randn(2, 3), memory_budget=-1)


def test_non_finite_kernel_warns():
    model = mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nt.empirical_ntk(model, torch.randn(2, 3), mode="trace")
    assert any("non-finite entries" in str(w.message) for w in caught)


_X = torch.randn(4, 3)
_K = torch.eye(4, dtype=torch.float64)


@pytest.mark.parametrize("call, error, message", [
    (lambda: nt.KernelTracker(mlp(), _X, every=True), TypeError,
     "`every` must be a positive int, got bool True"),
    (lambda: nt.KernelTracker(mlp(), _X, top_k=-1), ValueError,
     "`top_k` must be an int >= 0, got -1"),
    (lambda: nt.compute_kernel(mlp(), _X, store="unused", tile=0), ValueError,
     "`tile` must be a positive int, got 0"),
    (lambda: nt.analytic.mlp_kernel(_X, depth=1, width=0, parameterization="standard"),
     ValueError, "`width` must be a positive int or None, got 0"),
    (lambda: nt.analytic.mlp_kernel(_X, depth=1.0), TypeError,
     "`depth` must be an int >= 0, got float 1.0"),
    (lambda: nt.fit_power_law([], "e", n_boot=0), ValueError,
     "`n_boot` must be a positive int, got 0"),
    (lambda: nt.fit_power_law([], "e", confidence=0.0), ValueError,
     "`confidence` must be a finite number > 0, got 0.0"),
    (lambda: nt.eigenmodes(_K, k=0), ValueError,
     r"`k` must be an int in \[1, 4\] or None, got 0"),
    (lambda: nt.solve(_K, torch.ones(4, dtype=torch.float64), ridge=float("nan")), ValueError,
     "`ridge` must be a finite number >= 0, got nan"),
    (lambda: nt.gradient_flow_mse(_K, torch.ones(4), torch.ones(4), t="1"), TypeError,
     r"`t` must be a number >= 0 \(inf allowed\), got str '1'"),
    (lambda: nt.nn.Dense(3, 2, weight_std=float("inf")), ValueError,
     "`weight_std` must be a finite number >= 0, got inf"),
    (lambda: nt.metrics.spectrum(_K, num=5), ValueError,
     r"`num` must be an int in \[1, 4\] or None, got 5"),
])
def test_numbers_are_checked_alike_everywhere(call, error, message):
    """Every int and number argument names itself, the range and what arrived."""
    with pytest.raises(error, match=message):
        call()


def test_a_model_without_forward_mode_derivatives_never_runs_ntk_vp():
    # torch has no forward-mode derivative of nn.EmbeddingBag: jvp, and so ntk_vp, fail.
    bag = nn.EmbeddingBag(5, 2, mode="sum").double()
    x = {"input": torch.tensor([[1, 2, 0], [1, 1, 3], [4, 0, 2]]),
         "per_sample_weights": torch.rand(3, 3, dtype=torch.float64)}
    with pytest.raises(RuntimeError, match=r"'ntk_vp' needs forward-mode derivatives \(jvp\).*"
                                           r"_embedding_bag.*implementation='jacobian'"):
        nt.empirical_ntk(bag, x, implementation="ntk_vp")
    ntk = nt.empirical_ntk_fn(bag, memory_budget=1e12)
    for _ in range(2):  # whatever auto would rank first, ntk_vp is not among its candidates
        assert_close(ntk(x), oracle(bag, x, None, "full"))
        assert ntk.last_implementation != "ntk_vp"


def test_value_dependent_branch_under_vmap_names_the_autograd_engine():
    from ntk_torch._functional import vmap_errors_explained

    def branch(x):
        return x if x.sum() > 0 else -x

    with pytest.raises(RuntimeError, match=r"branches on the values.*implementation='autograd'"):
        with vmap_errors_explained("jacobian"):
            torch.func.vmap(branch)(torch.randn(3, 2))
