"""Measured KL of a planned model: the plan applied with round-to-nearest, against the float model,
on calibration tokens. Weights are swapped in place and restored."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional

from arctl.plan import Plan
from arctl.quant import fake_quantize


@contextmanager
def planned_weights(model: nn.Module, plan: Plan) -> Iterator[nn.Module]:
    """``model`` with every planned layer fake-quantized by its scheme, restored on exit."""
    originals: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for layer in plan.layers:
                module = model.get_submodule(layer.name)
                originals[layer.name] = module.weight.detach().clone()
                module.weight.copy_(fake_quantize(module.weight.float(), layer.scheme).to(module.weight.dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, weight in originals.items():
                model.get_submodule(name).weight.copy_(weight)


@torch.no_grad()
def reference_log_probs(model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Float log-probabilities per calibration row (kept to compare several plans)."""
    return [functional.log_softmax(model(row.unsqueeze(0), use_cache=False).logits[0].float(), dim=-1) for row in input_ids]


@torch.no_grad()
def measured_kl(model: nn.Module, plan: Plan, input_ids: torch.Tensor, reference: list[torch.Tensor]) -> float:
    """Mean KL(float || planned) per token over ``input_ids`` ``[n, seqlen]`` (nats)."""
    total, count = 0.0, 0
    with planned_weights(model, plan):
        for row, ref in zip(input_ids, reference, strict=True):
            logp = functional.log_softmax(model(row.unsqueeze(0), use_cache=False).logits[0].float(), dim=-1)
            total += float((ref.exp() * (ref - logp)).sum())
            count += ref.shape[0]
    return total / count
