"""SignRound on one decoder block: learn rounding offsets and clipping factors by signed gradient
descent on the MSE between the quantized block (fed the quantized stream) and the float block's
output (computed from the float stream).

Per iteration: draw a batch from a shuffled cycle, forward the block with fake-quantized weights,
MSE to the float target, backward, one signed step per parameter with a linearly decaying step
size. The loss of iteration ``t`` belongs to the parameters before step ``t``. Which parameters are
kept: in blocks whose quantized layers all have at least ``config.holdout_min_bits`` bits, the last
``config.holdout`` of the samples are held out of training, and the kept parameters are those with
the lowest MSE on them, measured before the first step, every ``iters // HOLDOUT_CHECKS`` steps and
after the last one. Elsewhere, in blocks of at least ``config.last_min_bits`` bits, those after the
last step (their loss and the initial one are measured on the first training batch), and in blocks
of fewer bits those of the lowest training-batch loss (AutoRound's "best iteration"). In a block with layers
of at most ``config.tune_max_bits`` bits, wider layers are not tuned (round to nearest). Layers with static
activation quantization get their input scale from the largest input the float block gives them on
the quantized stream, before tuning, and are tuned behind their quantized inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from arctl.plan import LayerPlan
from arctl.quant import QuantizedTensor
from arctl.quant.activations import static_input_scale
from arctl_tuner.blocks import autocast_to, block_output, run_block
from arctl_tuner.config import TuneConfig
from arctl_tuner.precision import resolve_compute_dtype, torch_dtype
from arctl_tuner.rtn import fused_nvfp4_global_scales
from arctl_tuner.signsgd import CyclicSampler, clamp_factors, linear_decay, signed_step
from arctl_tuner.tunable import TunableLinear, swapped


@dataclass(frozen=True)
class BlockStats:
    """What tuning did to one block: MSE of the initial parameters (iteration 0) and of the kept
    ones (on the held-out samples when there are any; else on the first training batch when the
    last step's are kept, on the training batch of that iteration otherwise), the iteration
    they come from (``iters``: after the last step), and the wall time."""

    loss_before: float
    loss_after: float
    best_iter: int
    seconds: float


HOLDOUT_CHECKS = 10
CLIP_SEARCH_LOW = 0.6
CLIP_SEARCH_STEPS = 17


@dataclass(frozen=True)
class InputStatistics:
    """Of the input of one linear over every token: ``E[x_j^2]`` (``[in_features]``) and ``max |x|``."""

    second_moment: torch.Tensor
    amax: torch.Tensor


def input_statistics(
    block: nn.Module, names: list[str], inputs: torch.Tensor, kwargs: dict[str, Any], batch_size: int, dtype: torch.dtype
) -> dict[str, InputStatistics]:
    """The input statistics of each named linear from a forward pass of the float block over ``inputs``."""
    sums: dict[str, torch.Tensor] = {}
    amax: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            amax[name] = torch.maximum(amax.get(name, torch.zeros(())), x.abs().amax())
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = [block.get_submodule(name).register_forward_pre_hook(hook_for(name)) for name in names]
    try:
        run_block(block, inputs, kwargs, batch_size, dtype)
    finally:
        for handle in handles:
            handle.remove()
    return {name: InputStatistics(sums[name] / counts[name], amax[name]) for name in names}


def _mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return functional.mse_loss(output.float(), target.float())


def tune_block(
    block: nn.Module,
    block_name: str,
    layers: list[LayerPlan],
    q_inputs: torch.Tensor,
    targets: torch.Tensor,
    kwargs: dict[str, Any],
    config: TuneConfig,
    seed: int,
) -> tuple[dict[str, QuantizedTensor], BlockStats]:
    """Tune the quantized layers of ``block`` and return their stored form and the block's stats.

    ``q_inputs`` and ``targets`` are ``[nsamples, seqlen, hidden]``; the block's own weights are
    left unchanged.
    """
    started = time.perf_counter()
    prefix = f"{block_name}."
    tunables = {
        layer.name[len(prefix):]: TunableLinear(block.get_submodule(layer.name[len(prefix):]), layer.scheme,
                                                config.enable_minmax_tuning)
        for layer in layers
        if layer.scheme.quantized
    }
    for name, scale in fused_nvfp4_global_scales(block, prefix, layers).items():
        tunables[name[len(prefix):]].global_scale = scale
    dtype = torch_dtype(resolve_compute_dtype(config.dtype, q_inputs.device))
    mixed = any(t.scheme.bits <= config.tune_max_bits for t in tunables.values())
    trained = {name: t for name, t in tunables.items() if not mixed or t.scheme.bits <= config.tune_max_bits}
    for name, tunable in tunables.items():
        if name not in trained:
            for param in (*tunable.rounding_params(), *tunable.clipping_params()):
                param.requires_grad_(False)
    search_clip = config.search_init_clip and config.enable_minmax_tuning
    calibrate = [name for name, t in tunables.items() if t.scheme.act is not None and t.scheme.act.static]
    if search_clip or calibrate:
        statistics = input_statistics(block, list(tunables), q_inputs, kwargs, config.batch_size, dtype)
        for name in calibrate:
            act = tunables[name].scheme.act
            assert act is not None
            tunables[name].input_scale = static_input_scale(statistics[name].amax, act)
        if search_clip:
            candidates = torch.linspace(CLIP_SEARCH_LOW, 1.0, CLIP_SEARCH_STEPS)
            for name, tunable in trained.items():
                tunable.search_clipping(statistics[name].second_moment, candidates)
    lowest_bits = min((t.scheme.bits for t in trained.values()), default=0)
    held = config.holdout_count(q_inputs.shape[0]) if lowest_bits >= config.holdout_min_bits else 0
    train = q_inputs.shape[0] - held
    sampler = CyclicSampler(train, config.batch_size, seed)
    checks = set(range(0, config.iters + 1, max(1, config.iters // HOLDOUT_CHECKS))) | {config.iters}
    iters = config.iters if trained else 0
    keep_last = not held and iters > 0 and lowest_bits >= config.last_min_bits
    best_loss, best_iter, loss_before = float("inf"), 0, float("nan")
    best = {} if keep_last else {name: t.snapshot() for name, t in tunables.items()}  # nothing to restore: last step

    def consider(value: float, step: int) -> None:
        nonlocal best_loss, best_iter, best, loss_before
        if step == 0:
            loss_before = value
        if value < best_loss:
            best_loss, best_iter = value, step
            best = {name: t.snapshot() for name, t in tunables.items()}

    with swapped(block, tunables):
        if not trained:
            consider(float(_mse(run_block(block, q_inputs, kwargs, config.batch_size, dtype), targets)), 0)
        first_batch: list[int] = []
        for step in range(iters + 1):
            if held and step in checks:
                held_out = run_block(block, q_inputs[train:], kwargs, config.batch_size, dtype)
                consider(float(_mse(held_out, targets[train:])), step)
            if step == iters:
                if keep_last:
                    final = run_block(block, q_inputs[first_batch], kwargs, config.batch_size, dtype)
                    best_loss, best_iter = float(_mse(final, targets[first_batch])), iters
                break
            batch = sampler.next()
            first_batch = first_batch or batch
            with autocast_to(dtype, q_inputs.device):
                output = block_output(block, q_inputs[batch], kwargs)
            loss = _mse(output, targets[batch])
            loss.backward()
            if keep_last and step == 0:
                loss_before = float(loss.detach())
            elif not held and not keep_last:
                consider(float(loss.detach()), step)
            for tunable in trained.values():
                bits = tunable.scheme.bits
                signed_step(tunable.rounding_params(), linear_decay(config.lr_for_bits(bits), step, config.iters))
                clipping = tunable.clipping_params()
                signed_step(clipping, linear_decay(config.minmax_lr_for_bits(bits), step, config.iters))
                clamp_factors(clipping)
        for name, values in best.items():
            tunables[name].restore(values)
        quantized = {f"{prefix}{name}": tunable.quantized() for name, tunable in tunables.items()}
    stats = BlockStats(
        loss_before=loss_before,
        loss_after=best_loss,
        best_iter=best_iter,
        seconds=round(time.perf_counter() - started, 3),
    )
    return quantized, stats
