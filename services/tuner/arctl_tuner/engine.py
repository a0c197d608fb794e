"""The tuner engine: SignRound block by block over a whole model, from a Plan, to a QuantizedCheckpoint.

For each decoder block in order:
1. target = float block(float stream)            (the float stream's next value)
2. tune the block's quantized layers on (quantized stream -> target)   [skipped if already on disk]
3. quantized stream = block with the tuned fake-quantized weights(quantized stream)
then, when the plan quantizes the output layer, tune it on the final norm of both streams
(``arctl_tuner.head``). Quantized input embeddings are rounded to nearest, and the quantized stream
starts from them. The model's weights are left as they were. Finished blocks (and the output layer)
are saved in a work folder, so a killed run continues with ``resume=True`` and gives the same
checkpoint as an uninterrupted run (every block's sample order is seeded by ``seed + block index``).
``iters == 0`` is round-to-nearest.

The checkpoint holds no run-time measurements: the same inputs and seed give the same bytes in
every file. Timings and whether a block came from the work folder are in the per-block Progress
events' metrics (``seconds``, ``resumed``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from arctl.data import CalibrationSet
from arctl.memory import release_free_memory
from arctl.models import LoadedModel, decoder_blocks, final_norm, input_embedding_name, output_layer_name
from arctl.plan import LayerPlan, Plan
from arctl.progress import Progress, ProgressCallback, ignore_progress
from arctl.quant import QuantizedTensor, quantize
from arctl_tuner.blocks import capture_block_inputs, run_block, tuning_attention
from arctl_tuner.calibration import fake_quantized
from arctl_tuner.config import TuneConfig, TuneConfigError
from arctl_tuner.head import tune_head
from arctl_tuner.precision import resolve_compute_dtype, torch_dtype
from arctl_tuner.resume import BlockStore, fingerprint
from arctl_tuner.rtn import PlanMismatchError, check_plan_fits, quantize_rtn, write_quantized_checkpoint
from arctl_tuner.signround import BlockStats, tune_block


def default_work_dir(out_dir: Path) -> Path:
    """Where finished blocks wait for the checkpoint: ``<out>.partial`` beside the output."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}.partial"


@dataclass(frozen=True)
class _Layout:
    """The planned layers of each decoder block, and the quantized output layer and input embeddings
    (None when the plan leaves them as they are)."""

    blocks: list[tuple[str, nn.Module, list[LayerPlan]]]
    head: LayerPlan | None
    embeddings: LayerPlan | None


def _layout(model: nn.Module, plan: Plan) -> _Layout:
    head, embeddings = output_layer_name(model), input_embedding_name(model)
    grouped = [(name, block, [l for l in plan.layers if l.name.startswith(f"{name}.")]) for name, block in decoder_blocks(model)]
    outside = {layer.name: layer for layer in plan.layers if layer.name in (head, embeddings)}
    if sum(len(layers) for _, _, layers in grouped) + len(outside) != len(plan.layers):
        raise PlanMismatchError("the plan has layers outside the decoder blocks, the output layer and the embeddings")

    def quantized(name: str | None) -> LayerPlan | None:
        layer = outside.get(name) if name is not None else None
        return layer if layer is not None and layer.scheme.quantized else None

    return _Layout(grouped, quantized(head), quantized(embeddings))


def tune_model(
    loaded: LoadedModel,
    plan: Plan,
    out_dir: Path,
    config: TuneConfig,
    calibration: CalibrationSet | None,
    progress: ProgressCallback = ignore_progress,
    work_dir: Path | None = None,
    resume: bool = False,
) -> Path:
    """Quantize ``loaded.model`` by ``plan`` with SignRound and write the checkpoint to ``out_dir``."""
    if config.iters == 0:
        if plan.needs_calibrated_activations and calibration is None:
            raise TuneConfigError("the plan's static activation scales (FP8_STATIC, NVFP4_A4) need calibration data")
        return quantize_rtn(loaded, plan, out_dir, progress, None if calibration is None else calibration.input_ids)
    if calibration is None:
        raise TuneConfigError("SignRound needs calibration data (iters > 0)")
    model = loaded.model
    check_plan_fits(model, plan)
    config = replace(config, dtype=resolve_compute_dtype(config.dtype, next(model.parameters()).device))
    dtype = torch_dtype(config.dtype)
    layout = _layout(model, plan)
    settings = config.to_dict()
    store = BlockStore(
        work_dir or default_work_dir(out_dir),
        fingerprint(loaded.sha256, plan, settings, calibration.input_ids),
        resume,
    )
    # the input embeddings are rounded to nearest (SignRound tunes linear layers only), once
    embeddings = layout.embeddings
    rounded = {} if embeddings is None else {
        embeddings.name: quantize(model.get_submodule(embeddings.name).weight.detach(), embeddings.scheme)
    }
    with frozen_weights(model), tuning_attention(model, dtype):
        block_stats = _tune_blocks(model, plan, config, calibration, progress, store, layout, rounded, dtype)
    quantized = {**store.load_all(len(layout.blocks) + (layout.head is not None), plan), **rounded}
    metadata = {
        "method": "signround",
        **settings,
        "calibration": {
            "source": calibration.source,
            "nsamples": calibration.nsamples,
            "seqlen": calibration.seqlen,
            "seed": calibration.seed,
            "mode": calibration.mode,
            "skipped_short": calibration.skipped_short,
            "documents_used": calibration.documents_used,
        },
        "blocks": block_stats,
    }
    path = write_quantized_checkpoint(loaded, plan, quantized, out_dir, metadata)
    store.remove()
    return path


@contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """No gradients for the model's own weights while tuning (only SignRound's parameters need them;
    ``.grad`` on every block weight cost ~400 MB of peak memory on SmolLM2)."""
    frozen = [param for param in model.parameters() if param.requires_grad]
    for param in frozen:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in frozen:
            param.requires_grad_(True)


def _tune_blocks(
    model: nn.Module,
    plan: Plan,
    config: TuneConfig,
    calibration: CalibrationSet,
    progress: ProgressCallback,
    store: BlockStore,
    layout: _Layout,
    rounded_embeddings: dict[str, QuantizedTensor],
    dtype: torch.dtype,
) -> list[dict[str, object]]:
    """The block loop, then the output layer; returns per-block stats (losses only: no timings, so
    the checkpoint's metadata does not depend on the run). Each block's quantized layers go to
    ``store`` and are not kept in memory: on SmolLM2 holding them cost ~100 MB of peak memory by the
    last block."""
    blocks, head = layout.blocks, layout.head
    total = len(blocks) + (head is not None)
    inputs = capture_block_inputs(model, blocks[0][1], calibration.input_ids)
    fp_stream = q_stream = inputs.hidden
    if layout.embeddings is not None and config.enable_quanted_input:
        with fake_quantized(model, "", [layout.embeddings], rounded_embeddings):
            q_stream = capture_block_inputs(model, blocks[0][1], calibration.input_ids).hidden
    block_stats: list[dict[str, object]] = []
    batch = config.batch_size
    for index, (name, block, layers) in enumerate(blocks):
        targets = run_block(block, fp_stream, inputs.kwargs, batch, dtype)
        saved = store.load(index, plan)
        if saved is None:
            tuned, stats = tune_block(block, name, layers, q_stream, targets, inputs.kwargs, config, config.seed + index)
            store.save(index, tuned, stats)
        else:
            tuned, stats = saved
        if config.enable_quanted_input:
            with fake_quantized(block, f"{name}.", layers, tuned):
                q_stream = run_block(block, q_stream, inputs.kwargs, batch, dtype)
        else:
            q_stream = targets
        fp_stream = targets
        block_stats.append(_stats_entry(name, stats))
        del tuned
        release_free_memory()  # glibc keeps the freed tuning temporaries: ~10 MB of RSS more per block
        progress(_block_progress(index, total, name, stats, resumed=saved is not None))
    if head is not None:
        index = len(blocks)
        saved = store.load(index, plan)
        if saved is None:
            norm = final_norm(model)
            with torch.no_grad():
                q_inputs, inputs = norm(q_stream), norm(fp_stream)
            tuned, stats = tune_head(model.get_submodule(head.name), head, q_inputs, inputs, config)
            store.save(index, tuned, stats)
        else:
            stats = saved[1]
        block_stats.append(_stats_entry(head.name, stats))
        progress(_block_progress(index, total, head.name, stats, resumed=saved is not None))
    return block_stats


def _stats_entry(name: str, stats: BlockStats) -> dict[str, object]:
    return {"block": name, "loss_before": stats.loss_before, "loss_after": stats.loss_after, "best_iter": stats.best_iter}


def _block_progress(index: int, total: int, name: str, stats: BlockStats, resumed: bool) -> Progress:
    """One tune event per block; ``seconds`` is the block's tuning time (of the run that tuned it,
    when ``resumed`` is 1.0)."""
    return Progress(
        stage="tune",
        completed=index + 1,
        total=total,
        message=f"{name}: loss {stats.loss_before:.3g} -> {stats.loss_after:.3g}",
        metrics={
            "loss_before": stats.loss_before,
            "loss_after": stats.loss_after,
            "seconds": stats.seconds,
            "resumed": 1.0 if resumed else 0.0,
        },
    )
