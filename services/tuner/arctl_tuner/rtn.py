"""Round-to-nearest quantization of a whole model from a Plan (SignRound with zero iterations).

The engine: domain logic on torch modules, no gRPC. Output is a QuantizedCheckpoint folder.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

import arctl
from arctl.checkpoint import write_checkpoint
from arctl.models import LoadedModel, input_embedding_name, output_layer_name, output_tied, quantizable_layers
from arctl.plan import LayerPlan, Plan
from arctl.progress import Progress, ProgressCallback, ignore_progress
from arctl.quant import QuantizedTensor, SchemeShapeError, quantize
from arctl.quant.floating import nvfp4_global_scale
from arctl_tuner.calibration import calibrate_input_scales


class PlanMismatchError(ValueError):
    """The plan names layers or shapes the model does not have."""


def check_plan_fits(model: nn.Module, plan: Plan) -> None:
    """Every planned layer exists with the planned shape and its scheme tiles the rows; the output
    layer and the embeddings take weight-only schemes."""
    head, embeddings = output_layer_name(model), input_embedding_name(model)
    known = {
        layer.name: layer.shape
        for layer in quantizable_layers(model, with_head=head is not None, with_embeddings=embeddings is not None)
    }
    for layer in plan.layers:
        if layer.name not in known:
            raise PlanMismatchError(f"plan layer {layer.name} is not a quantizable layer of this model")
        if layer.name in (head, embeddings) and layer.scheme.act is not None:
            raise PlanMismatchError(
                f"{layer.name} takes weight-only schemes, not {layer.scheme.name} (activation quantization)"
            )
        if known[layer.name] != layer.shape:
            raise PlanMismatchError(f"plan layer {layer.name} has shape {layer.shape}, the model {known[layer.name]}")
        if not layer.scheme.fits(layer.shape[1]):
            raise SchemeShapeError(
                f"{layer.name}: {layer.scheme.name} groups of {layer.scheme.group_size} do not divide "
                f"in_features {layer.shape[1]}"
            )


def fused_nvfp4_global_scales(module: nn.Module, prefix: str, layers: list[LayerPlan]) -> dict[str, torch.Tensor]:
    """One NVFP4 global scale for the NVFP4 layers of each fused group (q/k/v, gate/up), from their
    largest weight: vLLM and SGLang run a fused group as one module with one global scale. Layers
    are named ``prefix`` + their name in ``module``."""
    groups: dict[str, list[str]] = {}
    for layer in layers:
        if layer.scheme.dtype == "nvfp" and layer.fused_group is not None:
            groups.setdefault(layer.fused_group, []).append(layer.name)
    scales: dict[str, torch.Tensor] = {}
    for names in groups.values():
        amax = torch.stack([module.get_submodule(name[len(prefix):]).weight.detach().abs().amax().float() for name in names])
        shared = nvfp4_global_scale(amax)
        scales.update({name: shared.clone() for name in names})
    return scales


def write_model_files(loaded: LoadedModel, folder: Path, untie: bool = False) -> None:
    """config.json (``tie_word_embeddings`` off when ``untie``: a quantized output layer has its own
    weight), generation_config.json and the tokenizer files of the source model."""
    config = loaded.model.config
    if untie:
        config = copy.deepcopy(config)
        config.tie_word_embeddings = False
    config.save_pretrained(str(folder))
    generation = getattr(loaded.model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(folder))
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(str(folder))


def checkpoint_float_tensors(
    model: nn.Module, plan: Plan, quantized: dict[str, QuantizedTensor]
) -> dict[str, torch.Tensor]:
    """Every tensor of the model except the quantized layers' weights and what is tied to them (a
    tied output layer follows quantized embeddings); BF16 layers cast to bfloat16 (but a tied table
    planned BF16 stays the one float tensor both use)."""
    state = dict(model.state_dict())
    head, embeddings = output_layer_name(model), input_embedding_name(model)
    tied = {head, embeddings} if output_tied(model) else set()
    for name in quantized:
        del state[f"{name}.weight"]
    if tied and head not in quantized and embeddings in quantized:
        del state[f"{head}.weight"]
    for layer in plan.layers:
        if not layer.scheme.quantized and layer.name not in tied:
            state[f"{layer.name}.weight"] = state[f"{layer.name}.weight"].detach().to(torch.bfloat16)
    return state


def write_quantized_checkpoint(
    loaded: LoadedModel,
    plan: Plan,
    quantized: dict[str, QuantizedTensor],
    out_dir: Path,
    metadata: dict[str, object],
) -> Path:
    """The QuantizedCheckpoint of ``loaded`` with ``quantized`` layers (atomic)."""
    return write_checkpoint(
        out_dir,
        plan,
        quantized,
        checkpoint_float_tensors(loaded.model, plan, quantized),
        lambda folder: write_model_files(loaded, folder, untie=output_layer_name(loaded.model) in quantized),
        {
            **metadata,
            "source_model": {"id": loaded.model_id, "sha256": loaded.sha256},
            "arctl_version": arctl.__version__,
        },
    )


def quantize_rtn(
    loaded: LoadedModel,
    plan: Plan,
    out_dir: Path,
    progress: ProgressCallback = ignore_progress,
    calibration_ids: torch.Tensor | None = None,
) -> Path:
    """Quantize every planned layer of ``loaded.model`` to nearest and write the checkpoint; static
    activation scales are calibrated on ``calibration_ids`` ``[n, seqlen]`` (required if the plan has any)."""
    model = loaded.model
    check_plan_fits(model, plan)
    quantized: dict[str, QuantizedTensor] = {}
    total = len(plan.layers)
    global_scales = fused_nvfp4_global_scales(model, "", list(plan.layers))
    for index, layer in enumerate(plan.layers, start=1):
        if layer.scheme.quantized:
            weight = model.get_submodule(layer.name).weight.detach()
            quantized[layer.name] = quantize(weight, layer.scheme, global_scale=global_scales.get(layer.name))
        progress(Progress(stage="quantize", completed=index, total=total, message=layer.name))
    metadata: dict[str, object] = {"method": "rtn", "iters": 0}
    if plan.needs_calibrated_activations:
        if calibration_ids is None:
            raise ValueError("the plan's static activation scales need calibration samples")
        quantized = calibrate_input_scales(model, list(plan.layers), quantized, calibration_ids)
        metadata["activation_calibration"] = {"nsamples": int(calibration_ids.shape[0]), "seqlen": int(calibration_ids.shape[1])}
    return write_quantized_checkpoint(loaded, plan, quantized, out_dir, metadata)
