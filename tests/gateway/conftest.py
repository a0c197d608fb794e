"""Fixtures for the gateway tests: a tiny quantized model (checkpoint and auto_round export) and
two real embedded engines serving it.

The tiny model: 2 blocks, hidden 128, vocab 512, 4096 positions (so long streams fit), quantized
RTN W4A16G32 (true average 4.5 bits).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from gateway_harness import Server, start_engine
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from arctl.models import load_model
from arctl.schemes import get_scheme
from arctl_cli.pipeline import run_quantize
from arctl_planner.engine import plan_uniform

VOCAB = 512
# Message contents one after the other: the word-level vocabulary has no role tokens.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}"


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{f"w{i}": i + 4 for i in range(VOCAB - 4)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@dataclass(frozen=True)
class TinyModels:
    checkpoint: Path
    export: Path
    avg_bits: float


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    root = tmp_path_factory.mktemp("gateway-models")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=3,
    )
    LlamaForCausalLM(config).eval().save_pretrained(str(root / "float"), safe_serialization=True)
    word_tokenizer().save_pretrained(str(root / "float"))
    loaded = load_model(str(root / "float"))
    plan = plan_uniform(loaded, get_scheme("W4A16G32"))
    report = run_quantize(loaded, plan, root / "run", ["auto_round"], None, lambda _: None)
    return TinyModels(Path(report.checkpoint), Path(report.exports["auto_round"]), plan.avg_bits)


@pytest.fixture(scope="session")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway-logs")


@pytest.fixture(scope="session")
def all_engines(tiny_models: TinyModels, logs: Path) -> Iterator[list[Server]]:
    """Three real embedded engines on the tiny checkpoint, all serving ``tiny-w4``, started together."""
    servers = [start_engine(tiny_models.checkpoint, logs, wait=False) for _ in range(3)]
    try:
        for server in servers:
            server.wait_ready("/health", timeout=180)
        yield servers
    finally:
        for server in servers:
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGCONT)  # in case a test left it stopped
            server.stop()




@pytest.fixture(scope="session")
def engines(all_engines: list[Server]) -> list[Server]:
    """Two engines that every test leaves running (a test may SIGSTOP one, and must SIGCONT it)."""
    return all_engines[:2]


@pytest.fixture(scope="session")
def spare_engine(all_engines: list[Server]) -> Server:
    """The third engine, for the one test that kills its worker."""
    return all_engines[2]
