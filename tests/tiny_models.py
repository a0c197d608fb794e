"""Tiny random models and a word-level tokenizer, built in-process for fast tests."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TINY_VOCAB = 512


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Words ``w0 .. w507`` plus specials; anything else is ``[UNK]``."""
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{f"w{i}": i + 4 for i in range(TINY_VOCAB - 4)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]", pad_token="<pad>"
    )


def tiny_llama(tie: bool = True, seed: int = 0) -> LlamaForCausalLM:
    """2 blocks, hidden 128 (rows divisible by 32/64/128), 4 heads / 2 KV heads, vocab 512."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    return LlamaForCausalLM(config).eval()
