"""The output layer (lm_head) and the input embeddings as quantized layers: found, planned and
measured, tuned (the head) or rounded (the embeddings), written, loaded, resumed and exported, on a
tiny Llama whose head is tied to its embeddings."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import tiny_llama, tiny_tokenizer

from arctl.checkpoint import read_checkpoint
from arctl.data import CalibrationSet
from arctl.models import (
    LayerInfo,
    LoadedModel,
    final_norm,
    input_embedding_name,
    is_input_embedding,
    load_checkpoint_model,
    output_layer_name,
    output_tied,
    quantizable_layers,
    untied_output,
)
from arctl.plan import LayerPlan, Plan
from arctl.progress import ignore_progress
from arctl.quant import dequantize
from arctl.quant.floating import nvfp4_global_scale
from arctl.schemes import get_scheme
from arctl_exporter.engine import export
from arctl_exporter.errors import ExportError
from arctl_planner.budget import BudgetError
from arctl_planner.engine import PlanRequest, fisher_error, plan_model, plan_uniform, target_bits_for_size
from arctl_planner.measure import SwapMeasure, measured_kl, reference_log_probs
from arctl_tuner import engine
from arctl_tuner import head as head_tuning
from arctl_tuner.config import TuneConfig
from arctl_tuner.engine import default_work_dir, tune_model
from arctl_tuner.head import RowsLoss, input_products
from arctl_tuner.rtn import PlanMismatchError
from tests.services.checks import folder_differences
from tests.unit.test_export_auto_gptq import load as load_gptq
from tests.unit.test_export_auto_round import assert_layers_exact, load

SCHEMES = tuple(get_scheme(n) for n in ("W2A16G32_ASYM", "W3A16G64", "W4A16G64", "W4A16G32", "W8A16G64", "BF16"))
TUNE = TuneConfig(iters=20, batch_size=4, nsamples=8, seqlen=32, dtype="float32")


def _loaded() -> LoadedModel:
    return LoadedModel(tiny_llama(tie=True), tiny_tokenizer(), "tiny", "sha")


def _calibration(n: int = 8, seqlen: int = 32) -> CalibrationSet:
    ids = torch.randint(4, 512, (n, seqlen), generator=torch.Generator().manual_seed(0))
    return CalibrationSet(input_ids=ids, source="random", seed=0, mode="documents", skipped_short=0, documents_used=n)


def test_the_output_layer_its_norm_and_untying() -> None:
    model = tiny_llama(tie=True)
    assert output_layer_name(model) == "lm_head" and final_norm(model) is model.model.norm
    assert quantizable_layers(model, with_head=True)[-1] == LayerInfo("lm_head", (512, 128), None)
    assert "lm_head" not in {layer.name for layer in quantizable_layers(model)}
    embeddings = model.model.embed_tokens.weight.detach().clone()
    with untied_output(model):
        assert not output_tied(model) and model.config.tie_word_embeddings is False
        with torch.no_grad():
            model.lm_head.weight.add_(1.0)
        assert torch.equal(model.model.embed_tokens.weight, embeddings)
    assert output_tied(model) and model.config.tie_word_embeddings is True
    assert torch.equal(model.lm_head.weight, embeddings)


def test_head_loss_from_input_products_is_the_output_mse_and_its_gradient_row_chunk_by_chunk() -> None:
    generator = torch.Generator().manual_seed(0)
    weight, q_inputs = torch.randn(50, 16, generator=generator), torch.randn(4, 50, 16, generator=generator)
    inputs = q_inputs + 0.1 * torch.randn(4, 50, 16, generator=generator)
    delta = (0.05 * torch.randn(50, 16, generator=generator)).requires_grad_()
    products = input_products(q_inputs, inputs)
    value, gradient = RowsLoss(weight, products, 50).mse(delta.detach())
    reference = (q_inputs @ (weight + delta).T - inputs @ weight.T).pow(2).mean()
    reference.backward()
    assert value == pytest.approx(float(reference.detach()), rel=1e-5)
    assert torch.allclose(gradient, delta.grad, rtol=1e-4, atol=1e-7)
    shares = [RowsLoss(weight[rows], products, 50).mse(delta.detach()[rows]) for rows in (slice(0, 20), slice(20, 50))]
    assert sum(share for share, _ in shares) == pytest.approx(value, rel=1e-5)
    assert torch.allclose(torch.cat([grad for _, grad in shares]), gradient)


@pytest.mark.parametrize("iters", [0, 20])
def test_a_quantized_head_is_tuned_written_untied_and_loads(iters: int, tmp_path: Path) -> None:
    loaded = _loaded()
    embeddings = loaded.model.model.embed_tokens.weight.detach().clone()
    plan = plan_uniform(loaded, get_scheme("W3A16G32"), head=True)
    assert plan.layers[-1].name == "lm_head"
    checkpoint = read_checkpoint(tune_model(loaded, plan, tmp_path / "ckpt", replace(TUNE, iters=iters), _calibration()))
    assert output_tied(loaded.model) and torch.equal(loaded.model.lm_head.weight, embeddings)  # the source is untouched
    assert json.loads((checkpoint.path / "config.json").read_text())["tie_word_embeddings"] is False
    quantized = checkpoint.quantized_tensors()
    model = load_checkpoint_model(checkpoint)
    assert torch.equal(model.lm_head.weight, dequantize(quantized["lm_head"]))
    assert torch.equal(model.model.embed_tokens.weight, embeddings)  # float, not the quantized head
    if iters:
        stats = checkpoint.metadata["blocks"]
        assert [entry["block"] for entry in stats] == ["model.layers.0", "model.layers.1", "lm_head"]
        assert stats[-1]["loss_after"] < 0.9 * stats[-1]["loss_before"]


@pytest.mark.parametrize("rows_per_chunk", [8192, 200])
def test_tuning_the_head_lowers_the_model_kl_below_round_to_nearest(
    rows_per_chunk: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the head quantized (2 bits): the tuned one keeps the model closer to the float one, in one
    chunk of rows or in three (200 + 200 + 112)."""
    monkeypatch.setattr(head_tuning, "ROWS_PER_CHUNK", rows_per_chunk)
    loaded = _loaded()
    plan = Plan("tiny", "sha", (LayerPlan("lm_head", (512, 128), get_scheme("W2A16G32_ASYM")),))
    rows = _calibration(4, 32).input_ids
    reference = reference_log_probs(loaded.model, rows)
    kl = {}
    for iters in (0, 40):
        checkpoint = read_checkpoint(tune_model(loaded, plan, tmp_path / f"i{iters}", replace(TUNE, iters=iters), _calibration()))
        kl[iters] = measured_kl(load_checkpoint_model(checkpoint), Plan("tiny", "sha", ()), rows, reference)
    assert kl[40] < 0.9 * kl[0]


def test_an_nvfp4_head_tuned_in_chunks_keeps_one_global_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(head_tuning, "ROWS_PER_CHUNK", 200)
    loaded = _loaded()
    plan = Plan("tiny", "sha", (LayerPlan("lm_head", (512, 128), get_scheme("NVFP4")),))
    checkpoint = read_checkpoint(tune_model(loaded, plan, tmp_path / "ckpt", replace(TUNE, iters=5), _calibration()))
    quantized = checkpoint.quantized_tensors()["lm_head"]
    assert quantized.codes.shape == (512, 128) and quantized.scales.shape == (512, 8)
    assert torch.equal(quantized.global_scale, nvfp4_global_scale(loaded.model.lm_head.weight))


def test_resume_after_a_crash_in_the_head_gives_the_same_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_uniform(_loaded(), get_scheme("W4A16G32"), head=True)
    config = replace(TUNE, iters=4)
    uninterrupted = tune_model(_loaded(), plan, tmp_path / "a", config, _calibration())

    def killed(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt("killed")

    real = engine.tune_head
    monkeypatch.setattr(engine, "tune_head", killed)
    with pytest.raises(KeyboardInterrupt):
        tune_model(_loaded(), plan, tmp_path / "b", config, _calibration())
    assert (default_work_dir(tmp_path / "b") / "block_0001.safetensors").is_file()
    monkeypatch.setattr(engine, "tune_head", real)
    resumed = tune_model(_loaded(), plan, tmp_path / "b", config, _calibration(), resume=True)
    assert folder_differences(uninterrupted, resumed) == []


def test_activation_schemes_are_refused_for_the_head(tmp_path: Path) -> None:
    loaded = _loaded()
    with pytest.raises(BudgetError, match="output layer and the embeddings take weight-only schemes, not FP8_STATIC"):
        plan_uniform(loaded, get_scheme("FP8_STATIC"), head=True)
    plan = Plan("tiny", "sha", (LayerPlan("lm_head", (512, 128), get_scheme("FP8_DYNAMIC")),))
    with pytest.raises(PlanMismatchError, match="lm_head takes weight-only schemes"):
        tune_model(loaded, plan, tmp_path / "c", TUNE, _calibration())


def test_the_planner_measures_the_head_and_leaves_the_tied_embeddings_alone() -> None:
    loaded = _loaded()
    rows = _calibration(4, 32).input_ids
    embeddings = loaded.model.model.embed_tokens.weight.detach().clone()
    head = quantizable_layers(loaded.model, with_head=True)[-1]
    error = fisher_error(loaded.model, [head], rows, ignore_progress)
    assert error(head, get_scheme("W2A16G32_ASYM")) > error(head, get_scheme("W4A16G32")) > error(head, get_scheme("W8A16G64")) > 0
    plan = plan_model(loaded, PlanRequest(targets=(4.5,), schemes=SCHEMES, head=True, refine_evaluations=4), rows)[0]
    assert plan.layers[-1].name == "lm_head" and plan.avg_bits <= 4.5
    assert plan.notes["measured_kl"] <= plan.notes["measured_kl_before_refine"]
    assert output_tied(loaded.model) and torch.equal(loaded.model.model.embed_tokens.weight, embeddings)
    pinned = PlanRequest(targets=(4.5,), schemes=SCHEMES, head=True, keep=(("lm_head", get_scheme("W8A16G64")),),
                         refine_evaluations=0)
    assert plan_model(loaded, pinned, rows)[0].scheme_of("lm_head") == get_scheme("W8A16G64")
    with pytest.raises(BudgetError, match="the output layer is planned only with --lm-head"):
        plan_model(loaded, replace(pinned, head=False), rows)


def test_a_head_swap_is_measured_like_a_fresh_plan() -> None:
    loaded = _loaded()
    rows = _calibration(2, 32).input_ids
    plan = plan_uniform(loaded, get_scheme("W4A16G32"), head=True)
    reference = reference_log_probs(loaded.model, rows)
    float_copy = copy.deepcopy(loaded.model)
    changed = Plan("tiny", "sha", tuple(
        replace(layer, scheme=get_scheme("W2A16G32_ASYM")) if layer.name == "lm_head" else layer for layer in plan.layers
    ))
    with SwapMeasure(loaded.model, plan, rows, reference) as measure:
        kl = measure.trial({"lm_head": get_scheme("W2A16G32_ASYM")})
    assert kl == pytest.approx(measured_kl(float_copy, changed, rows, reference), rel=1e-6)
    assert output_tied(loaded.model) and output_tied(float_copy)


@pytest.mark.parametrize("fmt", ["auto_round", "auto_gptq", "compressed-tensors"])
def test_a_tuned_head_exports_and_loads_in_transformers(fmt: str, tmp_path: Path) -> None:
    loaded = _loaded()
    plan = plan_uniform(loaded, get_scheme("W4A16G32"), head=True)
    checkpoint = read_checkpoint(tune_model(loaded, plan, tmp_path / "ckpt", TUNE, _calibration()))
    quantized = checkpoint.quantized_tensors()
    out = export(checkpoint.path, [fmt], tmp_path / "model")[fmt]
    if fmt == "compressed-tensors":
        model = transformers.AutoModelForCausalLM.from_pretrained(
            out, quantization_config=transformers.CompressedTensorsConfig(run_compressed=False)
        )
        head = dequantize(quantized["lm_head"])
        assert torch.allclose(model.lm_head.weight.float(), head, rtol=0, atol=2 * torch.finfo(torch.float16).eps * float(head.abs().max()))
    else:
        model = (load if fmt == "auto_round" else load_gptq)(out)
        assert_layers_exact(model, quantized)  # lm_head a QuantLinear with our codes
    assert model.config.tie_word_embeddings is False
    embeddings = loaded.model.model.embed_tokens.weight
    assert torch.allclose(model.model.embed_tokens.weight.float(), embeddings, rtol=0, atol=float(embeddings.abs().max()) * 1e-3)


EMBEDDINGS = "model.embed_tokens"


def test_the_input_embeddings_are_found_first() -> None:
    model = tiny_llama(tie=True)
    assert input_embedding_name(model) == EMBEDDINGS and is_input_embedding(EMBEDDINGS)
    assert not is_input_embedding("model.layers.0.mlp.up_proj")
    layers = quantizable_layers(model, with_head=True, with_embeddings=True)
    assert layers[0] == LayerInfo(EMBEDDINGS, (512, 128), None) and layers[-1].name == "lm_head"


def test_fisher_predicts_the_measured_kl_of_quantized_tied_embeddings() -> None:
    """Tied and planned without the head, the table is quantized for both uses: the prediction adds
    the output layer's share and lands near the measured KL."""
    loaded = _loaded()
    rows = _calibration(4, 32).input_ids
    layers = quantizable_layers(loaded.model, with_embeddings=True)
    error = fisher_error(loaded.model, layers, rows, ignore_progress)
    reference = reference_log_probs(loaded.model, rows)
    embeddings = layers[0]
    predicted = {name: error(embeddings, get_scheme(name)) for name in ("W2A16G32_ASYM", "W4A16G32", "W8A16G64")}
    assert predicted["W2A16G32_ASYM"] > predicted["W4A16G32"] > predicted["W8A16G64"] > 0
    plan = Plan("tiny", "sha", (LayerPlan(EMBEDDINGS, (512, 128), get_scheme("W4A16G32")),))
    measured = measured_kl(loaded.model, plan, rows, reference)
    assert 0.5 < predicted["W4A16G32"] / measured < 2.0, (predicted, measured)
    head_only = fisher_error(loaded.model, quantizable_layers(loaded.model, with_head=True, with_embeddings=True), rows,
                             ignore_progress)
    assert head_only(embeddings, get_scheme("W4A16G32")) < 0.9 * predicted["W4A16G32"]  # untied: its own share only


def test_embeddings_are_planned_for_llama_cpp_only_and_measured_in_place() -> None:
    loaded = _loaded()
    rows = _calibration(4, 32).input_ids
    with pytest.raises(BudgetError, match="sglang runs no quantized embeddings"):
        plan_model(loaded, PlanRequest(targets=(4.5,), schemes=SCHEMES, runtime="sglang", embeddings=True), rows)
    weights = {key: value.clone() for key, value in loaded.model.state_dict().items()}
    request = PlanRequest(targets=(4.5,), schemes=SCHEMES, embeddings=True, refine_evaluations=4)
    plan = plan_model(loaded, request, rows)[0]
    assert plan.layers[0].name == EMBEDDINGS and plan.avg_bits <= 4.5
    assert output_tied(loaded.model)
    assert all(torch.equal(weights[key], value) for key, value in loaded.model.state_dict().items())
    embedding_plan = plan_uniform(loaded, get_scheme("W4A16G32"), embeddings=True)
    float_copy = copy.deepcopy(loaded.model)
    changed = Plan("tiny", "sha", tuple(
        replace(layer, scheme=get_scheme("W8A16G64")) if layer.name == EMBEDDINGS else layer for layer in embedding_plan.layers
    ))
    reference = reference_log_probs(loaded.model, rows)
    with SwapMeasure(loaded.model, embedding_plan, rows, reference) as measure:
        kl = measure.trial({EMBEDDINGS: get_scheme("W8A16G64")})
    assert kl == pytest.approx(measured_kl(float_copy, changed, rows, reference), rel=1e-6)


def test_size_budgets_count_a_tied_table_once() -> None:
    model = tiny_llama(tie=True)
    table, linears = 512 * 128, sum(s[0] * s[1] for s in (layer.shape for layer in quantizable_layers(model)))
    norms = 128 * (2 * 2 + 1)  # two norms per block and the final one
    size = 400_000
    assert target_bits_for_size(model, size) == pytest.approx((size * 8 - 16 * (table + norms)) / linears)
    # planned head: untied, the table stays at 16 bits beside it
    assert target_bits_for_size(model, size, head=True) == pytest.approx((size * 8 - 16 * (table + norms)) / (linears + table))
    # planned tied embeddings: one table, planned, the head follows it
    assert target_bits_for_size(model, size, embeddings=True) == pytest.approx((size * 8 - 16 * norms) / (linears + table))
    both = target_bits_for_size(model, size, head=True, embeddings=True)
    assert both == pytest.approx((size * 8 - 16 * norms) / (linears + 2 * table))


def test_quantized_tied_embeddings_carry_the_head_through_tuning_and_loading(tmp_path: Path) -> None:
    loaded = _loaded()
    plan = plan_uniform(loaded, get_scheme("W4A16G32"), embeddings=True)
    checkpoint = read_checkpoint(tune_model(loaded, plan, tmp_path / "ckpt", replace(TUNE, iters=5), _calibration()))
    assert json.loads((checkpoint.path / "config.json").read_text())["tie_word_embeddings"] is True
    assert not {f"{EMBEDDINGS}.weight", "lm_head.weight"} & set(checkpoint.float_tensors())
    model = load_checkpoint_model(checkpoint)
    table = dequantize(checkpoint.quantized_tensors()[EMBEDDINGS])
    assert torch.equal(model.model.embed_tokens.weight, table) and model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ExportError, match="quantized embeddings .* go into gguf only"):
        export(checkpoint.path, ["auto_round"], tmp_path / "auto_round")
    with pytest.raises(ExportError, match="quantized embeddings .* go into gguf only"):
        export(checkpoint.path, ["auto_awq"], tmp_path / "auto_awq")


def test_quantized_embeddings_and_head_are_two_tensors(tmp_path: Path) -> None:
    loaded = _loaded()
    base = plan_uniform(loaded, get_scheme("W4A16G32"), head=True, embeddings=True)
    plan = Plan("tiny", "sha", tuple(
        replace(layer, scheme=get_scheme("W8A16G32")) if layer.name == EMBEDDINGS else layer for layer in base.layers
    ))
    checkpoint = read_checkpoint(tune_model(loaded, plan, tmp_path / "ckpt", replace(TUNE, iters=0), None))
    quantized = checkpoint.quantized_tensors()
    model = load_checkpoint_model(checkpoint)
    assert torch.equal(model.model.embed_tokens.weight, dequantize(quantized[EMBEDDINGS]))
    assert torch.equal(model.lm_head.weight, dequantize(quantized["lm_head"]))
    assert json.loads((checkpoint.path / "config.json").read_text())["tie_word_embeddings"] is False
