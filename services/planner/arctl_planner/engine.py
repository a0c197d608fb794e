"""Planner engine: choose schemes for a loaded model and a target average bit-width."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from arctl.models import LayerInfo, LoadedModel, quantizable_layers
from arctl.plan import Plan
from arctl.quant import fake_quantize
from arctl.schemes import PRESETS, Scheme
from arctl_planner.budget import average_bits, plan_for_budget

DEFAULT_BITS = (2, 3, 4, 8)
GROUP_PREFERENCE = (128, 64, 32)


def default_schemes(layers: Sequence[LayerInfo]) -> list[Scheme]:
    """Symmetric INT 2/3/4/8, each at the largest group size of 128/64/32 that tiles every layer
    (what the auto_round export and SGLang run), plus BF16."""
    schemes = []
    for bits in DEFAULT_BITS:
        for group_size in GROUP_PREFERENCE:
            scheme = Scheme("int", bits, group_size, True)
            if all(scheme.fits(layer.shape[1]) for layer in layers):
                schemes.append(scheme)
                break
    schemes.append(PRESETS["BF16"])
    return schemes


def squared_weight_error(model: nn.Module):
    """``error(layer, scheme)``: sum of squared differences between a layer's weight and its
    round-to-nearest quantization (cached)."""
    cache: dict[tuple[str, Scheme], float] = {}

    def error(layer: LayerInfo, scheme: Scheme) -> float:
        key = (layer.name, scheme)
        if key not in cache:
            weight = model.get_submodule(layer.name).weight.detach().float()
            with torch.no_grad():
                cache[key] = float((fake_quantize(weight, scheme) - weight).pow(2).sum())
        return cache[key]

    return error


def plan_model(loaded: LoadedModel, target_avg_bits: float, schemes: Sequence[Scheme] | None = None) -> Plan:
    """A plan for ``loaded.model`` at ``target_avg_bits`` true bits (uniform, or two schemes mixed)."""
    layers = quantizable_layers(loaded.model)
    candidates = list(schemes) if schemes else default_schemes(layers)
    return plan_for_budget(
        layers,
        candidates,
        target_avg_bits,
        squared_weight_error(loaded.model),
        model_id=loaded.model_id,
        model_sha256=loaded.sha256,
    )


def plan_uniform(loaded: LoadedModel, scheme: Scheme) -> Plan:
    """Every quantizable layer with ``scheme``."""
    layers = quantizable_layers(loaded.model)
    return plan_for_budget(
        layers, [scheme], average_bits(layers, scheme), lambda *_: 0.0, loaded.model_id, loaded.sha256
    )
