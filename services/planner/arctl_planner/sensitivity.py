"""Output-space Fisher sensitivity: the predicted loss increase of quantizing one layer with one scheme.

For a linear layer ``y = W x`` whose weight changes by ``dW = Q(W) - W``, the second-order expansion
of the KL divergence to the float model around the float point is ``1/2 E_t[dy_t^T F_t dy_t]`` with
``F_t`` the Fisher of the model's own predictive distribution. With the Fisher taken diagonal in the
layer's output space and tokens' gradient and input treated as independent:

    predicted_kl(layer, scheme) = 1/2 * sum_j gbar_j * dW_j^T H dW_j

- ``gbar_j``: mean squared gradient per output j, averaged over two backward passes of each
  calibration row: one with labels *sampled from the float model itself* (its expectation is the
  Fisher: the KL to the float model's outputs) and one with the row's real next tokens (the
  empirical Fisher: the language-modelling loss on real text);
- ``H = E_t[x_t x_t^T]``: the layer's input second moment;
- both from ONE forward and two backward passes over the calibration tokens; each (layer, scheme)
  then costs a quantization and an ``[out, in] x [in, in]`` product, no model pass.

Why both label kinds: measured on SmolLM2 (plans at 3 / 3.5 / 4.5 / 6 true bits, round to nearest,
WikiText-2 test 4 x 2048 tokens, ppl / KL), sampled labels alone gave 334.6 / 2.60, 51.21 / 0.779,
29.06 / 0.191, 24.65 / 0.0278; real labels alone 374.0 / 2.72, 51.85 / 0.780, 28.25 / 0.174,
24.65 / 0.0279; the average 369.5 / 2.70, 51.14 / 0.778, 28.33 / 0.171, 24.70 / 0.0281.

The input embeddings (when planned) are measured the same way in their output space, token by token:
the embedding of token ``v`` is row ``W[v]``, so quantizing the table costs
``1/2 * sum_v sum_j G[v, j] * dW[v, j]^2`` with ``G[v, j]`` the squared gradient of the loss with
respect to that embedding element, summed over the calibration positions holding ``v`` (both label
kinds, per token): rows of tokens the calibration text does not hold weigh nothing, as in a linear
layer input directions the data does not excite. AutoScheme does not score embeddings at all (a rule
picks their bits).

Unlike AutoScheme's DeltaLoss (|gradient * error| at the point where every layer uses scheme j,
gradient of the LM loss), this is the second-order term measured at the float point.
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


@dataclass
class EmbeddingStatistics:
    """``rows``: the token ids seen ``[U]``; ``grad_sq``: ``G`` of those rows ``[U, hidden]``, already
    divided by twice the tokens (two label kinds)."""

    rows: torch.Tensor
    grad_sq: torch.Tensor


def collect_statistics(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    input_ids: torch.Tensor,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    embeddings: str | None = None,
) -> dict[str, LayerStatistics | EmbeddingStatistics]:
    """One forward and two backward passes per calibration row of ``input_ids`` ``[n, seqlen]``
    (labels sampled from the model's own next-token distribution, then the row's next tokens);
    returns ``H`` and ``gbar`` per layer, and ``G`` under the name ``embeddings`` when given."""
    generator = torch.Generator().manual_seed(seed)
    seen_ids: list[torch.Tensor] = []
    token_grad_sq: list[torch.Tensor] = []
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
            inputs = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            if embeddings is not None:
                row_grad_sq = torch.zeros(inputs.shape[1:])

                def add_grad_sq(grad: torch.Tensor, into: torch.Tensor = row_grad_sq) -> None:
                    into.add_(grad.detach()[0].float().pow(2))

                inputs.register_hook(add_grad_sq)
                seen_ids.append(row)
                token_grad_sq.append(row_grad_sq)
            logits = model(inputs_embeds=inputs, use_cache=False).logits[0, :-1].float()
            with torch.no_grad():
                sampled = torch.multinomial(functional.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
            functional.cross_entropy(logits, sampled, reduction="sum").backward(retain_graph=True)
            functional.cross_entropy(logits, row[1:].to(logits.device), reduction="sum").backward()
            tokens += ids.shape[1]
            if progress is not None:
                progress(index + 1, input_ids.shape[0])
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(parameters, flags, strict=True):
            p.requires_grad_(flag)
    stats: dict[str, LayerStatistics | EmbeddingStatistics] = {
        layer.name: LayerStatistics(moments[layer.name] / tokens, grad_sq[layer.name] / (2 * tokens), tokens)
        for layer in layers
    }
    if embeddings is not None:
        rows, inverse = torch.unique(torch.cat(seen_ids), return_inverse=True)
        summed = torch.zeros(len(rows), token_grad_sq[0].shape[-1]).index_add_(0, inverse, torch.cat(token_grad_sq))
        stats[embeddings] = EmbeddingStatistics(rows, summed / (2 * tokens))
    return stats


@torch.no_grad()
def predicted_kl(weight: torch.Tensor, scheme: Scheme, stats: LayerStatistics | EmbeddingStatistics) -> float:
    """``1/2 sum_j gbar_j dW_j^T H dW_j`` for quantizing ``weight`` ``[out, in]`` with ``scheme``
    (nats/token); for the embeddings ``1/2 sum G * dW^2`` over the rows seen."""
    w = weight.detach().float()
    delta = fake_quantize(w, scheme) - w
    if isinstance(stats, EmbeddingStatistics):
        return 0.5 * float((stats.grad_sq * delta[stats.rows].pow(2)).sum())
    per_row = ((delta @ stats.input_moment) * delta).sum(dim=1)
    return 0.5 * float((stats.output_grad_sq * per_row).sum())
