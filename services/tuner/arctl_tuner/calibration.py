"""Quantized weights (and inputs) in a model for a while, and activation scales calibrated under them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from arctl.activation_hooks import activation_specs, install_input_quantizers
from arctl.plan import LayerPlan
from arctl.quant import QuantizedTensor, dequantize
from arctl.quant.activations import static_input_scale


@contextmanager
def fake_quantized(
    module: nn.Module, prefix: str, layers: list[LayerPlan], quantized: dict[str, QuantizedTensor]
) -> Iterator[None]:
    """Give ``module``'s planned layers (named ``prefix`` + relative name) their quantized values
    (BF16 layers: bfloat16-rounded) and quantized inputs (where the scheme has activation
    quantization and its scale is known) for the duration; the float weights are put back afterwards."""
    originals: dict[str, torch.Tensor] = {}
    handles = []
    try:
        with torch.no_grad():
            for layer in layers:
                linear = module.get_submodule(layer.name[len(prefix):])
                originals[layer.name] = linear.weight.detach().clone()
                if layer.name in quantized:
                    value = dequantize(quantized[layer.name])
                else:
                    value = linear.weight.to(torch.bfloat16)
                linear.weight.copy_(value.to(linear.weight.dtype))
        handles = install_input_quantizers(module, activation_specs(quantized, prefix))
        yield
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for layer in layers:
                if layer.name in originals:
                    module.get_submodule(layer.name[len(prefix):]).weight.copy_(originals[layer.name])


def calibrate_input_scales(
    model: nn.Module, layers: list[LayerPlan], quantized: dict[str, QuantizedTensor], input_ids: torch.Tensor
) -> dict[str, QuantizedTensor]:
    """``quantized`` with the input scale of each layer with static activation quantization set from
    the largest input it sees over the rows of ``input_ids`` ``[n, seqlen]``, every planned layer at its
    quantized weights (and dynamically quantized inputs)."""
    static = [
        name for name, qt in quantized.items() if qt.scheme.act is not None and qt.scheme.act.static and qt.input_scale is None
    ]
    if not static:
        return quantized
    amax = {name: torch.zeros(()) for name in static}

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            amax[name] = torch.maximum(amax[name], args[0].detach().abs().amax().float())

        return hook

    device = next(model.parameters()).device
    handles = [model.get_submodule(name).register_forward_pre_hook(hook_for(name)) for name in static]
    try:
        with fake_quantized(model, "", layers, quantized), torch.no_grad():
            for row in input_ids:
                model(row.unsqueeze(0).to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    calibrated = dict(quantized)
    for name in static:
        act = quantized[name].scheme.act
        assert act is not None
        calibrated[name] = replace(quantized[name], input_scale=static_input_scale(amax[name], act))
    return calibrated
