"""Quantize the inputs of a model's linear layers at run time (forward pre-hooks), as schemes with
activation quantization ask: evaluation of a checkpoint and the tuner's quantized stream use them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from arctl.quant import QuantizedTensor
from arctl.quant.activations import fake_quantize_activation
from arctl.schemes import ActQuant


def install_input_quantizers(
    model: nn.Module, layers: Mapping[str, tuple[ActQuant, torch.Tensor | None]]
) -> list[RemovableHandle]:
    """Quantize the first argument of each named submodule (``{name: (act, input_scale)}``) before
    its forward; remove the returned handles to stop."""

    def hook_for(act: ActQuant, scale: torch.Tensor | None):
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (fake_quantize_activation(args[0], act, scale), *args[1:])

        return hook

    return [
        model.get_submodule(name).register_forward_pre_hook(hook_for(act, scale))
        for name, (act, scale) in layers.items()
    ]


def activation_specs(
    quantized: Mapping[str, QuantizedTensor], prefix: str = ""
) -> dict[str, tuple[ActQuant, torch.Tensor | None]]:
    """``{name without prefix: (act, input_scale)}`` of the layers whose scheme quantizes activations,
    less static ones whose scale is not calibrated yet (a checkpoint has them all)."""
    return {
        name[len(prefix) :]: (qt.scheme.act, qt.input_scale)
        for name, qt in quantized.items()
        if qt.scheme.act is not None and name.startswith(prefix) and (qt.scheme.act.dynamic or qt.input_scale is not None)
    }
