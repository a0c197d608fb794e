"""Output-space Fisher sensitivity: the predicted KL increase of quantizing one layer with one scheme.

For a linear layer ``y = W x`` whose weight changes by ``dW = Q(W) - W``, the second-order expansion
of the KL divergence to the float model around the float point is ``1/2 E_t[dy_t^T F_t dy_t]`` with
``F_t`` the Fisher of the model's own predictive distribution. With the Fisher taken diagonal in the
layer's output space and tokens' gradient and input treated as independent:

    predicted_kl(layer, scheme) = 1/2 * sum_j gbar_j * dW_j^T H dW_j

- ``gbar_j = E_t[G_tj^2]``: mean squared gradient of the loss with labels *sampled from the float
  model itself* (so that its expectation is the Fisher, not the empirical gradient), per output j;
- ``H = E_t[x_t x_t^T]``: the layer's input second moment;
- both from ONE forward+backward pass over the calibration tokens; each (layer, scheme) then costs
  a quantization and an ``[out, in] x [in, in]`` product, no model pass.

Unlike AutoScheme's DeltaLoss (|gradient * error| at the point where every layer uses scheme j,
gradient of the LM loss), this is the second-order KL term measured at the float point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from arctl.models import LayerInfo
from arctl.quant import fake_quantize
from arctl.schemes import Scheme


@dataclass
class LayerStatistics:
    """``input_moment``: ``H`` ``[in, in]``; ``output_grad_sq``: ``gbar`` ``[out]``; ``tokens`` seen."""

    input_moment: torch.Tensor
    output_grad_sq: torch.Tensor
    tokens: int


def collect_statistics(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    input_ids: torch.Tensor,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, LayerStatistics]:
    """One forward+backward per calibration row of ``input_ids`` ``[n, seqlen]`` with labels sampled
    from the model's own next-token distribution; returns ``H`` and ``gbar`` per layer."""
    generator = torch.Generator().manual_seed(seed)
    moments: dict[str, torch.Tensor] = {}
    grad_sq: dict[str, torch.Tensor] = {}
    tokens = 0
    handles = []

    def forward_hook(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            moments[name] = moments.get(name, 0) + x.T @ x

            def grad_hook(grad: torch.Tensor) -> None:
                g = grad.detach().float().reshape(-1, grad.shape[-1])
                grad_sq[name] = grad_sq.get(name, 0) + g.pow(2).sum(0)

            output.register_hook(grad_hook)

        return hook

    for layer in layers:
        handles.append(model.get_submodule(layer.name).register_forward_hook(forward_hook(layer.name)))
    parameters = [p for p in model.parameters()]
    flags = [p.requires_grad for p in parameters]
    try:
        for p in parameters:
            p.requires_grad_(False)
        model.eval()
        for index, row in enumerate(input_ids):
            ids = row.unsqueeze(0)
            embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeddings, use_cache=False).logits[0, :-1].float()
            with torch.no_grad():
                sampled = torch.multinomial(functional.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
            functional.cross_entropy(logits, sampled, reduction="sum").backward()
            tokens += ids.shape[1]
            if progress is not None:
                progress(index + 1, input_ids.shape[0])
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(parameters, flags, strict=True):
            p.requires_grad_(flag)
    return {
        layer.name: LayerStatistics(moments[layer.name] / tokens, grad_sq[layer.name] / tokens, tokens)
        for layer in layers
    }


@torch.no_grad()
def predicted_kl(weight: torch.Tensor, scheme: Scheme, stats: LayerStatistics) -> float:
    """``1/2 sum_j gbar_j dW_j^T H dW_j`` for quantizing ``weight`` ``[out, in]`` with ``scheme`` (nats/token)."""
    w = weight.detach().float()
    delta = fake_quantize(w, scheme) - w
    per_row = ((delta @ stats.input_moment) * delta).sum(dim=1)
    return 0.5 * float((stats.output_grad_sq * per_row).sum())
