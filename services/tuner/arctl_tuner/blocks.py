"""Decoder-block inputs and forward passes over cached activations.

The first block's inputs are captured once by running the model until that block is called (a
forward pre-hook records its arguments and stops the pass). Every sample is run with batch size 1,
so the keyword arguments (attention mask, rotary embeddings, ...) have batch dimension 1 and
broadcast over any batch of cached hidden states.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class _Stop(Exception):
    """Raised by the capture hook to end the model's forward pass early."""


@dataclass
class BlockInputs:
    """``hidden``: ``[nsamples, seqlen, hidden_size]``; ``kwargs``: the other block arguments."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


def capture_block_inputs(model: nn.Module, first_block: nn.Module, input_ids: torch.Tensor) -> BlockInputs:
    """Run ``model`` on each row of ``input_ids`` ``[n, seqlen]`` (on any device) up to ``first_block``;
    return its inputs, on the model's device."""
    hidden: list[torch.Tensor] = []
    captured_kwargs: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        states = args[0] if args else kwargs["hidden_states"]
        hidden.append(states.detach())
        if not captured_kwargs:
            captured_kwargs.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    device = next(model.parameters()).device
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for row in input_ids:
                try:
                    model(row.unsqueeze(0).to(device), use_cache=False)
                except _Stop:
                    continue
    finally:
        handle.remove()
    captured_kwargs.pop("past_key_values", None)
    captured_kwargs.pop("past_key_value", None)
    captured_kwargs["use_cache"] = False
    return BlockInputs(hidden=torch.cat(hidden, dim=0), kwargs=captured_kwargs)


def block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """The block's hidden-state output (blocks return a tensor or a tuple starting with it)."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def run_block(
    block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], batch_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Outputs of ``block`` for every cached sample, ``batch_size`` at a time, without gradients."""
    outputs = []
    with torch.no_grad(), autocast_to(dtype, hidden.device):
        for chunk in hidden.split(batch_size):
            outputs.append(block_output(block, chunk, kwargs).to(hidden.dtype))
    return torch.cat(outputs, dim=0)


def autocast_to(dtype: torch.dtype, device: torch.device) -> torch.autocast:
    """Autocast to ``dtype`` on ``device`` (off for float32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


@contextmanager
def tuning_attention(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Eager attention while tuning in bfloat16 on CPU, the model's own choice otherwise.

    PyTorch's CPU flash-attention backward is slow in bfloat16: forward + backward of 8 x 9 heads
    x 128 tokens x 64 took 20.9 ms with SDPA and 8.8 ms eager (in float32 SDPA wins, 13.3 vs 19.6
    ms; 2-core AMD EPYC, torch 2.13). Block inputs must be captured inside this context: the
    attention mask the model passes its blocks depends on the implementation.
    """
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    on_cpu = next(model.parameters()).device.type == "cpu"
    switch = on_cpu and dtype == torch.bfloat16 and previous == "sdpa" and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(previous)
