"""Inputs as real models take them: positional and keyword tensors, integer token ids,
outputs picked from containers, fixed keyword arguments; against the float64 oracle."""

from __future__ import annotations

import collections
import dataclasses
import re

import pytest
import torch
from torch import nn

import ntk_torch as nt
from ntk_torch._engines import ENGINES
from tests.conftest import assert_close
from tests.oracle import naive_ntk, owner_names

MODES = ["full", "diagonal", "trace"]
IMPLEMENTATIONS = sorted(ENGINES) + ["auto"]


# -- models -----------------------------------------------------------------------------


class MaskedPooling(nn.Module):
    """``model(x, mask)``: per-position features, masked mean over positions, a head."""

    def __init__(self, d: int = 3, hidden: int = 5, out: int = 2) -> None:
        super().__init__()
        self.token = nn.Linear(d, hidden)
        self.head = nn.Linear(hidden, out)

    def forward(self, x, mask):  # x (N, L, d) float, mask (N, L) float
        h = torch.tanh(self.token(x)) * mask[..., None]
        return self.head(h.sum(1) / mask.sum(1, keepdim=True))


@dataclasses.dataclass
class EncoderOutput:
    logits: torch.Tensor
    hidden: torch.Tensor


class TinyEncoder(nn.Module):
    """``model(input_ids=..., attention_mask=...)``: token and position embeddings, one
    attention layer whose keys skip the padding, a norm, a classifier on the first token.

    Returns ``as_output`` of ``(logits, hidden)``: a dict, a tuple or a dataclass.
    """

    def __init__(self, vocab: int = 11, length: int = 6, d: int = 8, classes: int = 3,
                 as_output=lambda logits, hidden: {"logits": logits, "hidden": hidden}) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, d, padding_idx=0)
        self.positions = nn.Embedding(length, d)
        self.attention = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.classifier = nn.Linear(d, classes)
        self.as_output = as_output

    def forward(self, input_ids, attention_mask, *, temperature: float = 1.0):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.tokens(input_ids) + self.positions(positions)
        attended, _ = self.attention(h, h, h, key_padding_mask=attention_mask == 0)
        hidden = self.norm(h + attended)
        return self.as_output(self.classifier(hidden[:, 0]) / temperature, hidden)


def _masked_inputs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 3, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, 5, (n,), generator=g)
    mask = (torch.arange(4) < lengths[:, None]).double()
    return x, mask


def _token_inputs(n: int, seed: int) -> dict[str, torch.Tensor]:
    """A tokenizer's padded batch: ids (0 is padding) and the attention mask, both int64."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 7, (n,), generator=g)
    mask = (torch.arange(6) < lengths[:, None]).long()
    ids = torch.randint(1, 11, (n, 6), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask}


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return (MaskedPooling() if kind == "positional" else TinyEncoder()).double().eval()


def _inputs(kind: str, n: int, seed: int):
    return _masked_inputs(n, seed) if kind == "positional" else _token_inputs(n, seed)


# -- the oracle on structured inputs ------------------------------------------------------


def _rows(x, index):
    if isinstance(x, torch.Tensor):
        return x[index]
    if isinstance(x, dict):
        return {k: _rows(v, index) for k, v in x.items()}
    return tuple(_rows(v, index) for v in x)


def _joined(x1, x2):
    if isinstance(x1, torch.Tensor):
        return torch.cat([x1, x2])
    if isinstance(x1, dict):
        return {k: _joined(x1[k], x2[k]) for k in x1}
    return tuple(_joined(u, v) for u, v in zip(x1, x2))


class _ByIndex(nn.Module):
    """One tensor in, as the oracle needs: sample indices into a fixed structured batch."""

    def __init__(self, model, batch, output=None, model_kwargs=None) -> None:
        super().__init__()
        self.model, self.batch = model, batch
        self.output, self.model_kwargs = output, model_kwargs or {}

    def forward(self, index):
        x = _rows(self.batch, index)
        if isinstance(x, dict):
            out = self.model(**x, **self.model_kwargs)
        elif isinstance(x, tuple):
            out = self.model(*x, **self.model_kwargs)
        else:
            out = self.model(x, **self.model_kwargs)
        return out if self.output is None else self.output(out)


def _first_leaf(x):
    if isinstance(x, torch.Tensor):
        return x
    return _first_leaf(next(iter(x.values())) if isinstance(x, dict) else x[0])


def oracle(model, x1, x2, mode, output=None, model_kwargs=None, names=None):
    """The naive kernel of ``output(model(x, **model_kwargs))`` on structured batches."""
    n1 = len(_first_leaf(x1))
    batch = x1 if x2 is None else _joined(x1, x2)
    wrapped = _ByIndex(model, batch, output, model_kwargs)
    index = torch.arange(len(_first_leaf(batch)))
    prefixed = None if names is None else [f"model.{name}" for name in names]
    return naive_ntk(wrapped, index[:n1], None if x2 is None else index[n1:], mode, prefixed)


def _logits(o):
    return o["logits"]


# -- every engine, mode, input kind -------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False], ids=["x2=None", "x2"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind", ["positional", "keyword"])
def test_structured_inputs_match_oracle(kind, implementation, mode, symmetric):
    model = _model(kind)
    x1, x2 = _inputs(kind, 5, 1), None if symmetric else _inputs(kind, 3, 2)
    output = _logits if kind == "keyword" else None
    k = nt.empirical_ntk(model, x1, x2, mode=mode, implementation=implementation, output=output)
    assert_close(k, oracle(model, x1, x2, mode, output))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind", ["positional", "keyword"])
def test_tiles_equal_the_whole_and_layers_sum_to_it(kind, implementation):
    model = _model(kind)
    x1, x2 = _inputs(kind, 5, 1), _inputs(kind, 4, 2)
    output = _logits if kind == "keyword" else None
    kw = dict(mode="full", implementation=implementation, output=output)
    for second in (None, x2):
        whole = nt.empirical_ntk(model, x1, second, **kw)
        assert_close(nt.empirical_ntk(model, x1, second, batch_size=2, **kw), whole)
        layers = nt.layerwise_ntk(model, x1, second, batch_size=3, **kw)
        assert_close(sum(layers.values()), whole)
    groups = owner_names(model)
    for layer, k in layers.items():
        assert_close(k, oracle(model, x1, x2, "full", output, names=groups[layer]))


@pytest.mark.parametrize("as_output, pick", [
    (lambda logits, hidden: (logits, hidden), lambda o: o[0]),
    (EncoderOutput, lambda o: o.logits),
    (lambda logits, hidden: collections.OrderedDict(hidden=hidden, logits=logits),
     lambda o: o["logits"][:, 1:]),
], ids=["tuple", "dataclass", "ordered_dict_slice"])
def test_output_picks_from_what_the_model_returns(as_output, pick):
    torch.manual_seed(0)
    model = TinyEncoder(as_output=as_output).double().eval()
    x = _token_inputs(4, 3)
    k = nt.empirical_ntk(model, x, mode="diagonal", output=pick)
    assert_close(k, oracle(model, x, None, "diagonal", pick))


def test_model_kwargs_reach_every_call():
    model, x1, x2 = _model("keyword"), _token_inputs(4, 1), _token_inputs(3, 2)
    fixed = {"temperature": 2.5}
    expected = oracle(model, x1, x2, "full", _logits, fixed)
    for implementation in IMPLEMENTATIONS:
        k = nt.empirical_ntk(model, x1, x2, implementation=implementation, output=_logits,
                             model_kwargs=fixed)
        assert_close(k, expected)
    # Outputs divided by 2.5: the kernel by 2.5².
    plain = nt.empirical_ntk(model, x1, x2, output=_logits)
    assert_close(expected * 2.5**2, plain)


def test_a_mapping_such_as_a_batch_encoding_and_lists_work_like_dicts_and_tuples():
    model = _model("keyword")
    x = _token_inputs(4, 1)
    as_mapping = collections.UserDict(x)  # a tokenizer's BatchEncoding is a UserDict
    k = nt.empirical_ntk(model, as_mapping, mode="trace", output=_logits)
    assert_close(k, nt.empirical_ntk(model, x, mode="trace", output=_logits))
    masked, (x1, mask) = _model("positional"), _masked_inputs(4, 1)
    assert_close(nt.empirical_ntk(masked, [x1, mask], mode="trace"),
                 nt.empirical_ntk(masked, (x1, mask), mode="trace"))


def test_ntk_fn_nngp_and_empty_batches():
    model, x1, x2 = _model("keyword"), _token_inputs(5, 1), _token_inputs(3, 2)
    ntk = nt.empirical_ntk_fn(model, mode="trace", output=_logits)
    assert_close(ntk(x1, x2), oracle(model, x1, x2, "trace", _logits))
    f1, f2 = model(**x1)["logits"].detach(), model(**x2)["logits"].detach()
    nngp = nt.empirical_nngp(model, x1, x2, mode="full", output=_logits, batch_size=2)
    assert_close(nngp, torch.einsum("ai,bj->abij", f1, f2))
    empty = {k: v[:0] for k, v in x1.items()}
    assert ntk(empty, x2).shape == (0, 3)


# -- the other entry points -------------------------------------------------------------


def test_compute_kernel_with_dict_inputs_and_datasets_of_them(tmp_path):
    pytest.importorskip("zarr")
    model, x1, x2 = _model("keyword"), _token_inputs(7, 1), _token_inputs(5, 2)
    expected = nt.empirical_ntk(model, x1, x2, mode="full", output=_logits)
    store = nt.compute_kernel(model, x1, x2, store=tmp_path / "a", mode="full", tile=3,
                              output=_logits, progress=False)
    assert_close(store.load(), expected)

    class Items(torch.utils.data.Dataset):  # (tokenised sample, label) pairs, as loaders give
        def __init__(self, batch):
            self.batch = batch

        def __len__(self):
            return len(self.batch["input_ids"])

        def __getitem__(self, i):
            return {k: v[i] for k, v in self.batch.items()}, i % 2

    from_items = nt.compute_kernel(model, Items(x1), Items(x2), store=tmp_path / "b",
                                   mode="full", tile=3, output=_logits, progress=False)
    assert_close(from_items.load(), expected)
    symmetric = nt.compute_kernel(model, x1, store=tmp_path / "c", tile=4, output=_logits,
                                  progress=False)
    assert_close(symmetric.load(), nt.empirical_ntk(model, x1, mode="trace", output=_logits))
    # Every leaf is fingerprinted: another attention mask is another kernel.
    changed = dict(x1, attention_mask=x1["attention_mask"].clone())
    changed["attention_mask"][5, 1] = 0
    with pytest.raises(nt.StoreError, match=r"`x1` \(values of samples 4-6\)"):
        nt.compute_kernel(model, changed, store=tmp_path / "c", tile=4, output=_logits,
                          progress=False)


def test_tracker_on_a_dict_probe():
    model, x = _model("keyword"), _token_inputs(5, 1)
    # (MultiheadAttention uses its out_proj's weight without calling it: no features there.)
    layers = ["tokens", "attention", "norm", "classifier"]
    tracker = nt.KernelTracker(model, x, every=1, output=_logits, layers=layers,
                               model_kwargs={"temperature": 2.0})
    tracker.update(0)
    expected = oracle(model, x, None, "trace", _logits, {"temperature": 2.0})
    assert_close(tracker.reference_kernel, expected)
    assert {r["layer"] for r in tracker.records} >= {"total", "tokens", "classifier"}
    again = nt.KernelTracker(model, dict(x), output=_logits, layers=layers,
                             model_kwargs={"temperature": 2.0})
    again.load_state_dict(tracker.state_dict())
    other = dict(x, input_ids=x["input_ids"].flip(0))
    with pytest.raises(ValueError, match="different `probe_x`"):
        nt.KernelTracker(model, other, output=_logits,
                         layers=layers).load_state_dict(tracker.state_dict())


def test_linearize_is_called_like_the_model_and_has_its_kernel():
    model, x = _model("keyword"), _token_inputs(4, 1)
    lin = nt.linearize(model)
    assert_close(lin(**x)["logits"], model(**x)["logits"].detach())
    picked = nt.linearize(model, output=_logits, model_kwargs={"temperature": 2.0})
    assert_close(picked(**x), model(**x, temperature=2.0)["logits"].detach())
    k = nt.empirical_ntk(picked, x, mode="full", implementation="jacobian")
    assert_close(k, oracle(model, x, None, "full", _logits, {"temperature": 2.0}))
    # Linear in θ: a step along d moves the outputs by J d, twice the step twice as far.
    with torch.no_grad():
        for p in picked.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    moved = picked(**x) - model(**x, temperature=2.0)["logits"].detach()
    with torch.no_grad():
        theta0 = picked.initial_params()
        for name, p in picked.model.named_parameters():
            if name in theta0:
                p.copy_(theta0[name] + 2 * (p - theta0[name]))
    assert_close(picked(**x) - model(**x, temperature=2.0)["logits"].detach(), 2 * moved)
    positional, (xs, mask) = _model("positional"), _masked_inputs(3, 1)
    assert_close(nt.linearize(positional)(xs, mask), positional(xs, mask).detach())


# -- errors -----------------------------------------------------------------------------


def test_leaves_with_different_batch_sizes_are_named():
    model, x = _model("keyword"), _token_inputs(4, 1)
    bad = dict(x, attention_mask=x["attention_mask"][:3])
    message = ("every tensor of `x1` must have the batch dimension N first: x1['input_ids'] has "
               "N = 4 (shape (4, 6)) but x1['attention_mask'] has shape (3, 6)")
    with pytest.raises(ValueError, match=re.escape(message)):
        nt.empirical_ntk(model, bad, output=_logits)


def test_x2_must_have_x1s_structure_and_leaf_shapes():
    model, x1, x2 = _model("keyword"), _token_inputs(4, 1), _token_inputs(3, 2)
    with pytest.raises(ValueError, match=re.escape(
            "`x2` must have `x1`'s structure {'input_ids': Tensor, 'attention_mask': Tensor}, "
            "got {'input_ids': Tensor}")):
        nt.empirical_ntk(model, x1, {"input_ids": x2["input_ids"]}, output=_logits)
    with pytest.raises(ValueError, match=re.escape("`x2` must have `x1`'s structure (Tensor, "
                                                   "Tensor), got {'input_ids': Tensor")):
        nt.empirical_ntk(_model("positional"), _masked_inputs(3, 1), x2)
    longer = {k: torch.cat([v, v[:, :1]], 1) for k, v in x2.items()}
    with pytest.raises(ValueError, match=re.escape(
            "`x2['input_ids']` must share `x1['input_ids']`'s trailing shape (6,), got (7,)")):
        nt.empirical_ntk(model, x1, longer, output=_logits)


def test_non_tensor_output_asks_for_output():
    model, x = _model("keyword"), _token_inputs(3, 1)
    with pytest.raises(TypeError, match=re.escape(
            "`model` must return a Tensor of shape (N, ...), got dict {'logits': Tensor (N, 3), "
            "'hidden': Tensor (N, 6, 8)}; pass `output=` to select it, e.g. "
            "output=lambda o: o['logits']")):
        nt.empirical_ntk(model, x)
    with pytest.raises(TypeError, match="`output` must return a Tensor of shape"):
        nt.empirical_ntk(model, x, output=lambda o: o.items())
    with pytest.raises(TypeError, match="`output` must be None or a callable"):
        nt.empirical_ntk(model, x, output="logits")


def test_bad_leaves_kwargs_and_dtypes_are_named():
    model, x = _model("keyword"), _token_inputs(3, 1)
    with pytest.raises(TypeError, match=r"`x1` must be a torch.Tensor .*\(x1\['input_ids'\] is "
                                        r"list \[1, 2\]\)"):
        nt.empirical_ntk(model, dict(x, input_ids=[1, 2]))
    with pytest.raises(ValueError, match=r"`model_kwargs` and the inputs both give the keyword "
                                         r"arguments \['attention_mask'\]"):
        nt.empirical_ntk(model, x, output=_logits, model_kwargs={"attention_mask": None})
    with pytest.raises(TypeError, match="`model_kwargs` must be a dict of keyword arguments"):
        nt.empirical_ntk(model, x, output=_logits, model_kwargs=[("temperature", 2.0)])
    masked, (xs, mask) = _model("positional"), _masked_inputs(3, 1)
    with pytest.raises(ValueError, match=r"`x1\[1\]` has dtype torch.float32 but the model's "
                                         r"parameter 'token.weight' has dtype torch.float64"):
        nt.empirical_ntk(masked, (xs, mask.float()))
