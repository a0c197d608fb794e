"""SignRound on the output layer (``lm_head``), tuned after the last decoder block.

Its inputs are the final norm of the two streams: ``X_q`` (the quantized model's) and ``X`` (the float
model's), ``[tokens, in]``. The loss is AutoRound's layer loss, the mean squared error between
``X_q W_q^T`` and ``X W^T`` over every calibration token and vocabulary entry, written through
``[in, in]`` input products so that no logits are ever formed (SmolLM2's vocabulary of 49152 makes
them 800 MB at 32 x 128 tokens, 51 GB at 128 x 2048). With ``W_q = W + Δ``:

    tokens * out * MSE = sum((Δ H) * Δ) + 2 sum(Δ * D) + c,
    H = X_q^T X_q,   D = W (X_q - X)^T X_q,   c = sum((W E) * W),   E = (X_q - X)^T (X_q - X)

so a step costs one ``[out, in] x [in, in]`` product, on every calibration token at once (the exact
full-batch gradient, ``2 (Δ H + D)``, no batch sampling). The rest is as in a block: signed steps on
the rounding offsets and clipping factors with the same step sizes, clipping searched at the start,
the best iteration kept (on the held-out samples when the layer has at least
``config.holdout_min_bits`` bits).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from arctl.plan import LayerPlan
from arctl.quant import QuantizedTensor
from arctl_tuner.config import TuneConfig
from arctl_tuner.signround import CLIP_SEARCH_LOW, CLIP_SEARCH_STEPS, HOLDOUT_CHECKS, BlockStats
from arctl_tuner.signsgd import clamp_factors, linear_decay, signed_step
from arctl_tuner.tunable import TunableLinear


@dataclass(frozen=True)
class OutputProducts:
    """``H``, ``D`` and ``c`` of the loss above over some tokens, already divided by ``tokens * out``
    (``H`` by ``tokens`` only, ``D`` and ``c`` by ``tokens * out``; the ``1/out`` of the first term is
    applied in ``mse``)."""

    input_moment: torch.Tensor
    cross: torch.Tensor
    constant: float
    out_features: int

    @torch.no_grad()
    def mse(self, delta: torch.Tensor) -> tuple[float, torch.Tensor]:
        """The MSE at weight error ``delta`` ``[out, in]`` and its gradient with respect to ``delta``."""
        product = (delta @ self.input_moment) / self.out_features
        value = float((delta * product).sum() + 2 * (delta * self.cross).sum()) + self.constant
        return value, 2 * (product + self.cross)


@torch.no_grad()
def output_products(weight: torch.Tensor, q_inputs: torch.Tensor, inputs: torch.Tensor) -> OutputProducts:
    """``OutputProducts`` of the layer with float ``weight`` ``[out, in]`` for inputs ``[..., in]``."""
    w = weight.detach().float()
    xq, x = (rows.reshape(-1, rows.shape[-1]).float() for rows in (q_inputs, inputs))
    tokens, out_features = xq.shape[0], w.shape[0]
    gap = xq - x
    cross = w @ (gap.T @ xq) / (tokens * out_features)
    constant = float(((w @ (gap.T @ gap)) * w).sum()) / (tokens * out_features)
    return OutputProducts(xq.T @ xq / tokens, cross, constant, out_features)


def tune_head(
    head: nn.Linear,
    layer: LayerPlan,
    q_inputs: torch.Tensor,
    inputs: torch.Tensor,
    config: TuneConfig,
) -> tuple[dict[str, QuantizedTensor], BlockStats]:
    """Tune ``head`` (planned as ``layer``) on the normed streams ``[nsamples, seqlen, in]`` of the
    quantized and the float model; its own weight is left unchanged."""
    started = time.perf_counter()
    tunable = TunableLinear(head, layer.scheme, config.enable_minmax_tuning)
    nsamples = q_inputs.shape[0]
    held = config.holdout_count(nsamples) if layer.scheme.bits >= config.holdout_min_bits else 0
    train = nsamples - held
    training = output_products(head.weight, q_inputs[:train], inputs[:train])
    held_out = output_products(head.weight, q_inputs[train:], inputs[train:]) if held else None
    if config.search_init_clip and config.enable_minmax_tuning:
        tunable.search_clipping(torch.diagonal(training.input_moment), torch.linspace(CLIP_SEARCH_LOW, 1.0, CLIP_SEARCH_STEPS))
    weight = head.weight.detach().float()
    checks = set(range(0, config.iters + 1, max(1, config.iters // HOLDOUT_CHECKS))) | {config.iters}
    best_loss, best_iter, loss_before = float("inf"), 0, float("nan")
    best = tunable.snapshot()
    for step in range(config.iters + 1):
        delta = tunable.qdq_weight(torch.float32) - weight
        loss, gradient = training.mse(delta.detach())
        if held_out is not None:
            loss = held_out.mse(delta.detach())[0] if step in checks else float("inf")
        if step == 0:
            loss_before = loss
        if loss < best_loss:
            best_loss, best_iter, best = loss, step, tunable.snapshot()
        if step == config.iters:
            break
        delta.backward(gradient)
        signed_step(tunable.rounding_params(), linear_decay(config.lr_for_bits(layer.scheme.bits), step, config.iters))
        clipping = tunable.clipping_params()
        signed_step(clipping, linear_decay(config.minmax_lr_for_bits(layer.scheme.bits), step, config.iters))
        clamp_factors(clipping)
    tunable.restore(best)
    stats = BlockStats(loss_before, best_loss, best_iter, round(time.perf_counter() - started, 3))
    return {layer.name: tunable.quantized()}, stats
