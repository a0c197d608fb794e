"""SignRound on the output layer (``lm_head``), tuned after the last decoder block.

Its inputs are the final norm of the two streams: ``X_q`` (the quantized model's) and ``X`` (the float
model's), ``[tokens, in]``. The loss is AutoRound's layer loss, the mean squared error between
``X_q W_q^T`` and ``X W^T`` over every calibration token and vocabulary entry, written through
``[in, in]`` input products so that no logits are ever formed (SmolLM2's vocabulary of 49152 makes
them 800 MB at 32 x 128 tokens, 51 GB at 128 x 2048). With ``W_q = W + Δ``, ``G = X_q - X``:

    tokens * out * MSE = sum((Δ H) * Δ) + 2 sum(Δ * (W A)) + sum((W E) * W),
    H = X_q^T X_q,   A = G^T X_q,   E = G^T G

so a step costs one ``[out, in] x [in, in]`` product, on every calibration token at once (the exact
full-batch gradient ``2 (Δ H + W A)``, no batch sampling). The loss is a sum over output rows and each
row's offsets and clipping factors move by their own gradient's sign only, so the rows are tuned in
chunks of ``ROWS_PER_CHUNK`` (the tuning state of a 49152-row head at once cost ~1 GB of peak memory
on SmolLM2), each chunk keeping its own best iteration. The rest is as in a block: signed steps with
the same step sizes, clipping searched at the start, the best iteration kept (on the held-out
samples when the layer has at least ``config.holdout_min_bits`` bits; else on every training token,
so unlike a block's training batches the iterations compare on the same data and
``config.last_min_bits`` does not apply); an NVFP4 head keeps the one global scale of the whole tensor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from arctl.plan import LayerPlan
from arctl.quant import QuantizedTensor
from arctl.quant.floating import nvfp4_global_scale
from arctl.schemes import Scheme
from arctl_tuner.config import TuneConfig
from arctl_tuner.signround import CLIP_SEARCH_LOW, CLIP_SEARCH_STEPS, HOLDOUT_CHECKS, BlockStats
from arctl_tuner.signsgd import clamp_factors, linear_decay, signed_step
from arctl_tuner.tunable import TunableLinear

ROWS_PER_CHUNK = 8192


@dataclass(frozen=True)
class InputProducts:
    """``H``, ``A`` and ``E`` above divided by the tokens, ``[in, in]`` each."""

    moment: torch.Tensor
    cross: torch.Tensor
    gap: torch.Tensor


@torch.no_grad()
def input_products(q_inputs: torch.Tensor, inputs: torch.Tensor) -> InputProducts:
    """``InputProducts`` of the normed streams ``[..., in]``."""
    xq, x = (rows.reshape(-1, rows.shape[-1]).float() for rows in (q_inputs, inputs))
    gap = xq - x
    tokens = xq.shape[0]
    return InputProducts(xq.T @ xq / tokens, gap.T @ xq / tokens, gap.T @ gap / tokens)


class RowsLoss:
    """The share of some rows ``weight`` ``[rows, in]`` of a layer with ``out_features`` rows in that
    layer's output MSE, as a function of their weight error."""

    def __init__(self, weight: torch.Tensor, products: InputProducts, out_features: int) -> None:
        w = weight.detach().float()
        self.moment = products.moment
        self.out_features = out_features
        self.cross = (w @ products.cross).div_(out_features)
        self.constant = float(((w @ products.gap) * w).sum()) / out_features

    @torch.no_grad()
    def mse(self, delta: torch.Tensor) -> tuple[float, torch.Tensor]:
        """The share at weight error ``delta`` ``[rows, in]`` and its gradient with respect to ``delta``."""
        product = (delta @ self.moment).div_(self.out_features)
        flat = delta.reshape(-1)
        value = float(torch.dot(flat, product.reshape(-1)) + 2 * torch.dot(flat, self.cross.reshape(-1)))
        return value + self.constant, product.add_(self.cross).mul_(2)


class _Rows(nn.Module):
    """Some rows of a linear layer, for ``TunableLinear`` (a view of the weight, no copy)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight
        self.bias = None


@dataclass(frozen=True)
class _Tuned:
    quantized: QuantizedTensor
    loss_before: float
    loss_after: float
    best_iter: int


def _tune_rows(
    weight: torch.Tensor,
    scheme: Scheme,
    global_scale: torch.Tensor | None,
    training: RowsLoss,
    held_out: RowsLoss | None,
    input_sq: torch.Tensor,
    config: TuneConfig,
) -> _Tuned:
    tunable = TunableLinear(_Rows(weight), scheme, config.enable_minmax_tuning)
    tunable.global_scale = global_scale
    if config.search_init_clip and config.enable_minmax_tuning:
        tunable.search_clipping(input_sq, torch.linspace(CLIP_SEARCH_LOW, 1.0, CLIP_SEARCH_STEPS))
    reference = weight.detach().float()
    checks = set(range(0, config.iters + 1, max(1, config.iters // HOLDOUT_CHECKS))) | {config.iters}
    best_loss, best_iter, loss_before = float("inf"), 0, float("nan")
    best = tunable.snapshot()
    for step in range(config.iters + 1):
        delta = tunable.qdq_weight(torch.float32) - reference
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
        del delta, gradient
        signed_step(tunable.rounding_params(), linear_decay(config.lr_for_bits(scheme.bits), step, config.iters))
        clipping = tunable.clipping_params()
        signed_step(clipping, linear_decay(config.minmax_lr_for_bits(scheme.bits), step, config.iters))
        clamp_factors(clipping)
    tunable.restore(best)
    return _Tuned(tunable.quantized(), loss_before, best_loss, best_iter)


def _stacked(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """One QuantizedTensor from row chunks (global and input scales are shared)."""

    def rows(name: str) -> torch.Tensor | None:
        return None if getattr(parts[0], name) is None else torch.cat([getattr(part, name) for part in parts])

    return replace(parts[0], codes=rows("codes"), scales=rows("scales"), zeros=rows("zeros"))


def tune_head(
    head: nn.Linear,
    layer: LayerPlan,
    q_inputs: torch.Tensor,
    inputs: torch.Tensor,
    config: TuneConfig,
) -> tuple[dict[str, QuantizedTensor], BlockStats]:
    """Tune ``head`` (planned as ``layer``) on the normed streams ``[nsamples, seqlen, in]`` of the
    quantized and the float model; its own weight is left unchanged. The stats' losses are the
    layer's output MSE, ``best_iter`` the latest of the chunks' best iterations."""
    started = time.perf_counter()
    nsamples = q_inputs.shape[0]
    held = config.holdout_count(nsamples) if layer.scheme.bits >= config.holdout_min_bits else 0
    train = nsamples - held
    training = input_products(q_inputs[:train], inputs[:train])
    held_out = input_products(q_inputs[train:], inputs[train:]) if held else None
    weight = head.weight.detach()
    out_features = weight.shape[0]
    global_scale = nvfp4_global_scale(weight) if layer.scheme.dtype == "nvfp" else None
    chunks = []
    for rows in weight.split(ROWS_PER_CHUNK):
        chunks.append(_tune_rows(
            rows, layer.scheme, global_scale,
            RowsLoss(rows, training, out_features),
            None if held_out is None else RowsLoss(rows, held_out, out_features),
            torch.diagonal(training.moment), config,
        ))
    stats = BlockStats(
        loss_before=sum(c.loss_before for c in chunks),
        loss_after=sum(c.loss_after for c in chunks),
        best_iter=max(c.best_iter for c in chunks),
        seconds=round(time.perf_counter() - started, 3),
    )
    return {layer.name: _stacked([c.quantized for c in chunks])}, stats
