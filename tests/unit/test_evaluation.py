"""Perplexity and comparison to a reference on hand-checkable models and a tiny random Llama."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from arctl.evaluation import (
    ComparisonResult,
    PerplexityResult,
    compare_to_reference,
    perplexity,
    tokenize_for_perplexity,
    window_count,
)

VOCAB = 256


class Uniform(nn.Module):
    """Zero logits (a uniform distribution over ``vocab``); records the windows it is given."""

    def __init__(self, vocab: int = VOCAB) -> None:
        super().__init__()
        self.vocab = vocab
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        self.seen.append(input_ids.clone())
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


class NextToken(nn.Module):
    """Predicts ``(token + 1) % vocab`` with logit ``log 3`` over 0 elsewhere, returned as a bare
    tensor: p(next) = 3 / (vocab + 2)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*input_ids.shape, VOCAB)
        logits.scatter_(-1, ((input_ids + 1) % VOCAB).unsqueeze(-1), math.log(3.0))
        return logits


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, n), generator=generator)


def test_uniform_logits_give_vocab_size() -> None:
    model = Uniform()
    result = perplexity(model, tokens(3 * 32 + 5), seqlen=32)
    assert isinstance(result, PerplexityResult)
    assert result.ppl == pytest.approx(VOCAB, rel=1e-6)
    assert result.nll == pytest.approx(math.log(VOCAB), rel=1e-7)
    assert (result.windows, result.tokens, result.seqlen) == (3, 3 * 31, 32)


def test_windows_are_non_overlapping_and_the_tail_is_dropped() -> None:
    ids = tokens(4 * 16 + 7)
    model = Uniform()
    perplexity(model, ids, seqlen=16, batch_size=3)
    seen = torch.cat(model.seen)
    assert [t.shape[0] for t in model.seen] == [3, 1]
    assert torch.equal(seen.reshape(-1), ids[0, : 4 * 16])


def test_hand_checked_probability() -> None:
    ids = torch.arange(0, 64).reshape(1, -1) % VOCAB  # every next token is the predicted one
    result = perplexity(NextToken(), ids, seqlen=8)
    assert result.ppl == pytest.approx((VOCAB + 2) / 3, rel=1e-6)


def test_max_windows_progress_and_flat_ids() -> None:
    calls: list[tuple[int, int]] = []
    result = perplexity(
        Uniform(), tokens(10 * 8)[0], seqlen=8, max_windows=4, progress=lambda d, t: calls.append((d, t))
    )
    assert result.windows == 4 and result.tokens == 4 * 7
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(Uniform(), tokens(10), seqlen=16)
    with pytest.raises(ValueError, match="at least 2"):
        window_count(100, 1)
    with pytest.raises(ValueError, match="max_windows"):
        window_count(100, 10, max_windows=0)
    with pytest.raises(ValueError, match=r"\[N\] or \[1, N\]"):
        perplexity(Uniform(), tokens(64).reshape(2, 32), seqlen=8)
    with pytest.raises(ValueError, match="integer ids"):
        perplexity(Uniform(), torch.zeros(1, 64), seqlen=8)


def test_zeroed_lm_head_llama_is_uniform() -> None:
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    result = perplexity(model, tokens(2 * 24), seqlen=24)
    assert result.ppl == pytest.approx(VOCAB, rel=1e-5)


def test_model_against_itself() -> None:
    model = tiny_llama()
    model.train()
    result = compare_to_reference(model, model, tokens(3 * 16), seqlen=16)
    assert isinstance(result, ComparisonResult)
    assert result.kl == 0.0
    assert result.top1_agreement == 1.0
    assert result.ppl == result.reference_ppl
    assert (result.windows, result.tokens) == (3, 45)
    assert model.training  # the training flag is restored
    alone = perplexity(model, tokens(3 * 16), seqlen=16)
    assert result.ppl == pytest.approx(alone.ppl, rel=1e-6)


def test_perturbed_weights_raise_kl() -> None:
    reference = tiny_llama()
    model = copy.deepcopy(reference)
    with torch.no_grad():
        for parameter in model.model.layers[0].parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    calls: list[tuple[int, int]] = []
    ids = tokens(4 * 16, seed=1)
    result = compare_to_reference(
        model, reference, ids, seqlen=16, batch_size=2, progress=lambda d, t: calls.append((d, t))
    )
    assert result.kl > 0.0
    assert 0.0 <= result.top1_agreement <= 1.0
    assert calls == [(2, 4), (4, 4)]
    assert result.reference_ppl == pytest.approx(perplexity(reference, ids, seqlen=16).ppl, rel=1e-6)
    assert result.ppl == pytest.approx(perplexity(model, ids, seqlen=16).ppl, rel=1e-6)


def test_uniform_reference_kl_is_log_vocab_minus_entropy() -> None:
    """KL(uniform || model) = -log V - mean_v log p_model(v), checked against a direct formula."""
    model = NextToken()
    ids = torch.arange(0, 32).reshape(1, -1)
    result = compare_to_reference(model, Uniform(), ids, seqlen=8)
    p_next, p_other = 3 / (VOCAB + 2), 1 / (VOCAB + 2)
    expected = -math.log(VOCAB) - (math.log(p_next) + (VOCAB - 1) * math.log(p_other)) / VOCAB
    assert result.kl == pytest.approx(expected, abs=1e-6)  # float32 log-softmax: ~1e-7 cancellation
    assert result.reference_ppl == pytest.approx(VOCAB, rel=1e-6)
    assert result.top1_agreement == 0.0  # uniform argmax is token 0; the model's is token + 1 ≠ 0


def test_tokenize_for_perplexity_uses_default_special_tokens() -> None:
    class Words:
        def __call__(self, text: str, verbose: bool = True) -> dict[str, list[int]]:
            return {"input_ids": [1] + [len(word) for word in text.split()]}

    ids = tokenize_for_perplexity(Words(), "a bb ccc")
    assert ids.dtype == torch.long and ids.tolist() == [[1, 1, 2, 3]]
