"""Token-by-token generation with a KV cache on CPU: prompt encoding (the tokenizer's chat template),
sampling (greedy at temperature 0, else temperature + top-p), stop strings, EOS, and incremental
detokenisation that never emits half a character or the start of a stop string.

``Generator.steps`` is a plain iterator doing one forward pass per ``next()``; the server runs
each ``next()`` in its single model thread, so requests interleave token by token and a cancelled
request simply stops being advanced.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer

from arctl.checkpoint import MANIFEST, QUANTIZED_FILE, read_checkpoint
from arctl.models import context_length, load_checkpoint_model, load_model


class PromptError(ValueError):
    """A prompt the model cannot take (too long, empty, not encodable)."""


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None


@dataclass(frozen=True)
class Step:
    """New text since the previous step, and the finish reason on the last one."""

    text: str
    finish_reason: str | None
    completion_tokens: int


@dataclass
class ServedModel:
    model: nn.Module
    tokenizer: Any
    path: str


def is_checkpoint(path: Path) -> bool:
    return (path / MANIFEST).is_file() and (path / QUANTIZED_FILE).is_file()


def load_for_serving(reference: str) -> ServedModel:
    """A QuantizedCheckpoint folder (fake-quantized float model), or anything ``load_model`` takes:
    an exported folder (auto-round's loader), a float folder, a .gguf file, ``smollm2``."""
    path = Path(reference)
    if path.is_dir() and is_checkpoint(path):
        checkpoint = read_checkpoint(path)
        return ServedModel(load_checkpoint_model(checkpoint), AutoTokenizer.from_pretrained(str(path)), str(path))
    loaded = load_model(reference)
    return ServedModel(loaded.model, loaded.tokenizer, loaded.model_id)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
    return ""


class Generator:
    def __init__(self, served: ServedModel) -> None:
        self.model = served.model.eval()
        self.tokenizer = served.tokenizer
        self.max_context = context_length(self.model) or 2048
        eos: set[int] = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, list | tuple):
                eos.update(int(token) for token in source)
        self.eos_ids = frozenset(eos)

    # --- prompts --------------------------------------------------------------------------------------

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """The chat template's prompt with the assistant turn opened. A tokenizer without a template
        gets ``role: content`` lines and ``assistant:``."""
        plain = [{"role": m["role"], "content": _text_of(m.get("content"))} for m in messages]
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return [int(token) for token in ids]
        text = "".join(f"{m['role']}: {m['content']}\n" for m in plain) + "assistant:"
        return self.encode_text(text)

    def encode_text(self, text: str) -> list[int]:
        return [int(token) for token in self.tokenizer(text, add_special_tokens=True)["input_ids"]]

    def check_length(self, prompt_ids: list[int], max_tokens: int) -> None:
        if not prompt_ids:
            raise PromptError("the prompt encodes to no tokens")
        if len(prompt_ids) + max_tokens > self.max_context:
            raise PromptError(
                f"this model's maximum context length is {self.max_context} tokens; the prompt has "
                f"{len(prompt_ids)} and max_tokens asks for {max_tokens}"
            )

    # --- generation -----------------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
        if sampling.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p
            sorted_probs = sorted_probs * keep
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=generator))

    def steps(self, prompt_ids: list[int], sampling: Sampling) -> Iterator[Step]:
        generator = torch.Generator()
        generator.manual_seed(sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        longest_stop = max((len(s) for s in sampling.stop), default=0)
        generated: list[int] = []
        emitted = 0
        cache = None
        next_input = torch.tensor([prompt_ids], dtype=torch.long)
        while True:
            with torch.inference_mode():
                output = self.model(input_ids=next_input, past_key_values=cache, use_cache=True)
            cache = output.past_key_values
            token = self._sample(output.logits[0, -1], sampling, generator)
            finish = None
            if token in self.eos_ids and not sampling.ignore_eos:
                finish = "stop"
            else:
                generated.append(token)
                if len(generated) >= sampling.max_tokens:
                    finish = "length"
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            cut = _find_stop(text, sampling.stop, max(0, emitted - longest_stop))
            if cut is not None:
                yield Step(text[emitted:cut], "stop", len(generated))
                return
            if finish is not None:
                yield Step(text[emitted:], finish, len(generated))
                return
            safe = len(text) - max(0, longest_stop - 1)
            if text.endswith("\ufffd"):
                safe = min(safe, len(text) - 1)
            safe = max(safe, emitted)
            yield Step(text[emitted:safe], None, len(generated))
            emitted = safe
            next_input = torch.tensor([[token]], dtype=torch.long)


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    found = [index for stop in stops if stop and (index := text.find(stop, start)) >= 0]
    return min(found) if found else None
