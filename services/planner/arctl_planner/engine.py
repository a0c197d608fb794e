"""Planner engine: measure each layer's sensitivity to each candidate scheme, then solve for budgets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from arctl.models import (
    LayerInfo,
    LoadedModel,
    context_length,
    input_embedding_name,
    output_layer_name,
    output_tied,
    quantizable_layers,
)
from arctl.plan import LayerPlan, Plan
from arctl.progress import Progress, ProgressCallback, ignore_progress
from arctl.quant import fake_quantize
from arctl.schemes import PRESETS, Scheme
from arctl_planner.budget import (
    BudgetError,
    ErrorFn,
    average_bits,
    build_problem,
    refuse_activation_schemes,
    solve_budgets,
)
from arctl_planner.measure import reference_log_probs
from arctl_planner.refine import refine_plan
from arctl_planner.sensitivity import collect_statistics, predicted_kl

DEFAULT_BITS = (2, 3, 4, 8)
GROUP_SIZES = (128, 64, 32)
SENSITIVITIES = ("fisher", "weight")
# Runtimes that read quantized input embeddings: llama.cpp (GGUF token_embd); vLLM and SGLang do not.
EMBEDDING_RUNTIMES = ("gguf", "any")
# The Fisher sensitivity's calibration text unless a request says otherwise (CLI and service alike).
# Tried on SmolLM2 (benchmarks/planner_vs_autoscheme.py): 4 x 2048 tokens lowered RTN perplexity at 4.5
# bits (22.09 vs 22.62) but raised it at 3 bits (306 vs 257) and tripled planning time (132 s vs 48 s).
CALIBRATION_DATASET = "wikitext2"
CALIBRATION_NSAMPLES = 8
CALIBRATION_SEQLEN = 512
CALIBRATION_SEED = 0
# Measured swaps tried per plan after the solve (each is one forward pass over ``measure_rows`` rows).
REFINE_EVALUATIONS = 8


def calibration_seqlen(model: nn.Module, seqlen: int | None = None) -> int:
    """The calibration row length: ``seqlen`` when given, else ``CALIBRATION_SEQLEN`` capped at the
    model's context length."""
    if seqlen is not None:
        return seqlen
    return min(CALIBRATION_SEQLEN, context_length(model) or CALIBRATION_SEQLEN)


def default_schemes() -> list[Scheme]:
    """Symmetric INT 2/3/4/8 at groups 128/64/32 (each layer takes those that tile its rows),
    MXFP4, MXFP8, NVFP4 and BF16."""
    ints = [Scheme("int", bits, group, True) for bits in DEFAULT_BITS for group in GROUP_SIZES]
    return [*ints, PRESETS["MXFP4"], PRESETS["MXFP8"], PRESETS["NVFP4"], PRESETS["BF16"]]


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: one or several target true average bits (a Pareto front from one measurement),
    candidate schemes (None: ``default_schemes``), target runtime, fixed layers, whether the output
    layer (``lm_head``) and the input embeddings are planned (``head``, ``embeddings``: items measured
    and chosen like the others and counted in the average; otherwise they stay as the model has them,
    outside the average; tied embeddings without a planned head carry the output layer with them),
    and the sensitivity measure (``fisher``: predicted KL and LM-loss increase from calibration data; ``weight``: squared weight
    error, no data). With calibration data, each plan's real KL (round to nearest) is measured on
    ``measure_rows`` calibration rows and stored beside the predicted one, after up to
    ``refine_evaluations`` budget-neutral swaps were measured and the ones that lowered it kept."""

    targets: tuple[float, ...]
    schemes: tuple[Scheme, ...] | None = None
    runtime: str = "any"
    keep: tuple[tuple[str, Scheme], ...] = ()
    sensitivity: str = "fisher"
    head: bool = False
    embeddings: bool = False
    measure_rows: int = 2
    refine_evaluations: int = REFINE_EVALUATIONS
    notes: dict[str, object] = field(default_factory=dict)


def refuse_embeddings_for(runtime: str, embeddings: bool) -> None:
    """``BudgetError`` when quantized embeddings are asked for a runtime that cannot run them."""
    if embeddings and runtime not in EMBEDDING_RUNTIMES:
        raise BudgetError(f"{runtime} runs no quantized embeddings; plan them for {' or '.join(EMBEDDING_RUNTIMES)} (llama.cpp)")


def squared_weight_error(model: nn.Module) -> ErrorFn:
    """``error(layer, scheme)``: sum of squared differences between the weight and its quantization."""

    def error(layer: LayerInfo, scheme: Scheme) -> float:
        weight = model.get_submodule(layer.name).weight.detach().float()
        with torch.no_grad():
            return float((fake_quantize(weight, scheme) - weight).pow(2).sum())

    return _cached(error)


def fisher_error(
    model: nn.Module, layers: Sequence[LayerInfo], input_ids: torch.Tensor, progress: ProgressCallback
) -> ErrorFn:
    """``error(layer, scheme)``: predicted loss increase (nats/token; KL to the float model and LM loss
    on the calibration text, averaged) from one Fisher pass. Tied embeddings planned without the
    output layer add the output layer's share: quantizing them quantizes it."""
    names = {layer.name for layer in layers}
    embeddings = input_embedding_name(model)
    embeddings = embeddings if embeddings in names else None
    linears = [layer for layer in layers if layer.name != embeddings]
    head = output_layer_name(model)
    shared_head = head if embeddings is not None and head not in names and output_tied(model) else None
    if shared_head is not None:
        linears.append(quantizable_layers(model, with_head=True)[-1])
    stats = collect_statistics(
        model, linears, input_ids, progress=lambda done, total: progress(Progress("sensitivity", done, total)),
        embeddings=embeddings,
    )

    def error(layer: LayerInfo, scheme: Scheme) -> float:
        weight = model.get_submodule(layer.name).weight
        loss = predicted_kl(weight, scheme, stats[layer.name])
        if layer.name == embeddings and shared_head is not None:
            loss += predicted_kl(weight, scheme, stats[shared_head])
        return loss

    return _cached(error)


def _cached(error: ErrorFn) -> ErrorFn:
    cache: dict[tuple[str, Scheme], float] = {}

    def lookup(layer: LayerInfo, scheme: Scheme) -> float:
        key = (layer.name, scheme)
        if key not in cache:
            cache[key] = error(layer, scheme)
        return cache[key]

    return lookup


def plan_model(
    loaded: LoadedModel,
    request: PlanRequest,
    calibration_ids: torch.Tensor | None = None,
    progress: ProgressCallback = ignore_progress,
) -> list[Plan]:
    """One plan per target of ``request`` for ``loaded.model``."""
    if request.sensitivity not in SENSITIVITIES:
        raise BudgetError(f"unknown sensitivity {request.sensitivity!r}; valid: {', '.join(SENSITIVITIES)}")
    refuse_activation_schemes(list(request.schemes or ()), request.keep)  # before the sensitivity pass
    refuse_embeddings_for(request.runtime, request.embeddings)
    layers = quantizable_layers(loaded.model, with_head=request.head, with_embeddings=request.embeddings)
    if request.sensitivity == "fisher":
        if calibration_ids is None:
            raise BudgetError("fisher sensitivity needs calibration data")
        error = fisher_error(loaded.model, layers, calibration_ids, progress)
    else:
        error = squared_weight_error(loaded.model)
    notes = {**request.notes, "planner": "fisher-knapsack", "sensitivity": request.sensitivity, "runtime": request.runtime}
    problem = build_problem(layers, list(request.schemes or default_schemes()), error, request.runtime, request.keep)
    plans = solve_budgets(problem, request.targets, loaded.model_id, loaded.sha256, notes)
    if calibration_ids is None or request.measure_rows <= 0:
        return plans
    rows = calibration_ids[: request.measure_rows]
    reference = reference_log_probs(loaded.model, rows)
    refined = []
    for index, plan in enumerate(plans):
        result = refine_plan(loaded.model, problem, plan, rows, reference, max(request.refine_evaluations, 0))
        refined.append(result.plan)
        progress(Progress(
            "refine", index + 1, len(plans),
            f"{plan.target_avg_bits:g} bits: measured KL {result.measured_kl_before:.4g} -> {result.measured_kl:.4g} "
            f"({result.accepted} of {result.evaluations} swaps kept)",
        ))
    return refined


def plan_uniform(loaded: LoadedModel, scheme: Scheme, head: bool = False, embeddings: bool = False) -> Plan:
    """Every quantizable layer (and the output layer when ``head``, the input embeddings when
    ``embeddings``) with ``scheme`` (``BudgetError`` naming a layer it does not fit).

    Built directly, not by the budget solver: its table may round costs up, which can make the
    exact uniform budget look unreachable (NVFP4, channel-wise schemes)."""
    layers = quantizable_layers(loaded.model, with_head=head, with_embeddings=embeddings)
    if (head or embeddings) and scheme.act is not None:
        raise BudgetError(
            f"the output layer and the embeddings take weight-only schemes, not {scheme.name} (activation quantization)"
        )
    build_problem(layers, [scheme], lambda *_: 0.0, activations_allowed=True)  # a budgeted plan's fit checks
    return Plan(
        model_id=loaded.model_id,
        model_sha256=loaded.sha256,
        layers=tuple(LayerPlan(x.name, x.shape, scheme, x.fused_group) for x in layers),
        target_avg_bits=average_bits(layers, scheme),
        notes={"predicted_loss": 0.0, "runtime": "any"},
    )


def unplanned_values(model: nn.Module, head: bool = False, embeddings: bool = False) -> int:
    """How many values the model holds outside the planned layers (the decoder-block linears, the
    output layer when ``head``, the input embeddings when ``embeddings``): norms, biases and the
    unplanned of the head and the embeddings, a tied tensor once (a planned head is untied from its
    embeddings; planned tied embeddings carry the head with them)."""
    planned = {f"{layer.name}.weight" for layer in quantizable_layers(model, with_head=head, with_embeddings=embeddings)}
    if embeddings and not head and output_tied(model):
        planned.add(f"{output_layer_name(model)}.weight")
    seen: set[int] = set()
    count = 0
    for name, tensor in model.state_dict().items():
        pointer = tensor.untyped_storage().data_ptr()
        if name in planned or pointer in seen:
            continue
        seen.add(pointer)
        count += tensor.numel()
    return count


def target_bits_for_size(model: nn.Module, max_size_bytes: int, head: bool = False, embeddings: bool = False) -> float:
    """The average bits of the planned layers (``unplanned_values``) that keeps the whole model, the
    unplanned values at 16 bits, within ``max_size_bytes``."""
    weights = sum(layer.shape[0] * layer.shape[1] for layer in quantizable_layers(model, with_head=head, with_embeddings=embeddings))
    bits = (max_size_bytes * 8 - unplanned_values(model, head, embeddings) * 16) / weights
    if bits <= 0:
        raise BudgetError(f"--max-size {max_size_bytes} bytes is smaller than the unquantized tensors alone")
    return bits
