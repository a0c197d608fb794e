"""Shared fixtures: a tiny random Llama saved as a safetensors folder with a word-level tokenizer,
and the offline data folder (tests that need it skip when it is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from arctl.data import default_data_dir

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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(str(folder), safe_serialization=True)
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    folder = default_data_dir()
    if folder is None or not (folder / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.skip("offline data folder (../shared/data or ARCTL_DATA_DIR) is absent")
    return folder
