"""Hugging Face transformers models, built tiny from their configs (no download), with
tokenizer-style dict inputs, against the float64 oracle on every engine that runs them."""

from __future__ import annotations

import pytest
import torch

import ntk_torch as nt
from ntk_torch._engines import ENGINES
from tests.conftest import assert_close
from tests.test_inputs import oracle

transformers = pytest.importorskip("transformers")

IMPLEMENTATIONS = sorted(ENGINES)
BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            vocab_size=99, max_position_embeddings=16)
GPT2 = dict(n_embd=32, n_layer=2, n_head=2, vocab_size=99, n_positions=16)


def _tokenized(n: int, seed: int, length: int = 6, left: bool = False) -> dict[str, torch.Tensor]:
    """What ``tokenizer(texts, padding=True, return_tensors="pt")`` returns: int64 ids (0 on
    padding) and the attention mask, padded on the right (``left``: on the left)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    lengths[0] = length  # one unpadded sequence next to padded ones
    mask = (torch.arange(length) < lengths[:, None]).long()
    ids = torch.randint(1, 99, (n, length), generator=g) * mask
    if left:
        ids, mask = ids.flip(1), mask.flip(1)
    return {"input_ids": ids, "attention_mask": mask}


def _as_4d(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same batch with the additive 4-D mask (N, 1, 1, L) that transformers uses as is."""
    keep = batch["attention_mask"][:, None, None, :].to(torch.float64)
    return dict(batch, attention_mask=(1.0 - keep) * torch.finfo(torch.float64).min)


def _built(cls, config, **settings):
    torch.manual_seed(0)
    return cls(config(**settings)).double().eval()


@pytest.fixture(scope="module")
def bert():
    return _built(transformers.BertModel, transformers.BertConfig, **BERT)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bert_with_a_4d_attention_mask(bert, implementation):
    x1, x2 = _as_4d(_tokenized(3, 1)), _as_4d(_tokenized(2, 2))

    def pooled(o):
        return o.pooler_output

    k = nt.empirical_ntk(bert, x1, x2, mode="trace", implementation=implementation,
                         output=pooled)
    assert_close(k, oracle(bert, x1, x2, "trace", pooled))
    # The 4-D mask is the 2-D one: the model's outputs agree.
    plain = _tokenized(3, 1)
    assert_close(bert(**x1).pooler_output.detach(), bert(**plain).pooler_output.detach())


def test_bert_with_its_usual_2d_mask_takes_the_autograd_engine(bert):
    # transformers checks `padding_mask.all()` to skip the mask: control flow on the values,
    # which vmap cannot batch. auto takes the engine without vmap, with one warning.
    x1, x2 = _tokenized(3, 1), _tokenized(2, 2)

    def first_token(o):
        return o.last_hidden_state[:, 0, :4]

    fn = nt.empirical_ntk_fn(bert, mode="full", output=first_token)
    with pytest.warns(UserWarning, match="vmap cannot run this model.*'autograd'"):
        k = fn(x1, x2)
    assert fn.last_implementation == "autograd"
    assert_close(k, oracle(bert, x1, x2, "full", first_token))


@pytest.mark.parametrize("implementation", ["jacobian", "ntk_vp", "structured"])
def test_bert_2d_mask_on_a_vmap_engine_is_a_clear_error(bert, implementation):
    with pytest.raises(RuntimeError, match=r"torch.func.vmap, which cannot run this model.*"
                                           r"implementation='autograd'"):
        nt.empirical_ntk(bert, _tokenized(3, 1), mode="trace", implementation=implementation,
                         output=lambda o: o.last_hidden_state[:, 0])


def test_bert_sequence_classification_on_every_engine():
    model = _built(transformers.BertForSequenceClassification, transformers.BertConfig,
                   num_labels=3, **BERT)
    x = _as_4d(_tokenized(4, 3))

    def logits(o):
        return o.logits

    expected = oracle(model, x, None, "full", logits)
    for implementation in IMPLEMENTATIONS:
        k = nt.empirical_ntk(model, x, implementation=implementation, output=logits)
        assert_close(k, expected)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gpt2_tied_embeddings_last_token_logits(implementation):
    model = _built(transformers.GPT2LMHeadModel, transformers.GPT2Config,
                   attn_implementation="eager", **GPT2)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: counted once
    x1, x2 = _tokenized(3, 4, left=True), _tokenized(2, 5, left=True)

    def last(o):
        return o.logits[:, -1]

    fixed = {"use_cache": False}
    k = nt.empirical_ntk(model, x1, x2, mode="diagonal", implementation=implementation,
                         output=last, model_kwargs=fixed)
    assert_close(k, oracle(model, x1, x2, "diagonal", last, fixed))


def test_gpt2_outputs_without_output_name_what_came_back():
    model = _built(transformers.GPT2LMHeadModel, transformers.GPT2Config, **GPT2)
    with pytest.raises(TypeError, match=r"got CausalLMOutputWithCrossAttentions \{'logits': "
                                        r"Tensor \(N, 6, 99\).*output=lambda o: o\.logits"):
        nt.empirical_ntk(model, _tokenized(2, 1), mode="trace")
