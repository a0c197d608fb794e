"""The output layer (lm_head) as a quantized layer: found, planned and measured, tuned, written untied
from the embeddings, loaded, resumed and exported, on a tiny Llama whose head is tied."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama, tiny_tokenizer

from arctl.checkpoint import read_checkpoint
from arctl.data import CalibrationSet
from arctl.models import (
    LayerInfo,
    LoadedModel,
    final_norm,
    load_checkpoint_model,
    output_layer_name,
    output_tied,
    quantizable_layers,
    untied_output,
)
from arctl.plan import LayerPlan, Plan
from arctl.progress import ignore_progress
from arctl.quant import dequantize
from arctl.schemes import get_scheme
from arctl_exporter.engine import export
from arctl_planner.budget import BudgetError
from arctl_planner.engine import PlanRequest, fisher_error, plan_model, plan_uniform
from arctl_planner.measure import SwapMeasure, measured_kl, reference_log_probs
from arctl_tuner import engine
from arctl_tuner.config import TuneConfig
from arctl_tuner.engine import default_work_dir, tune_model
from arctl_tuner.head import output_products
from arctl_tuner.rtn import PlanMismatchError
from tests.services.checks import folder_differences
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


def test_head_loss_from_input_products_is_the_output_mse_and_its_gradient() -> None:
    generator = torch.Generator().manual_seed(0)
    weight, q_inputs = torch.randn(50, 16, generator=generator), torch.randn(4, 50, 16, generator=generator)
    inputs = q_inputs + 0.1 * torch.randn(4, 50, 16, generator=generator)
    delta = (0.05 * torch.randn(50, 16, generator=generator)).requires_grad_()
    value, gradient = output_products(weight, q_inputs, inputs).mse(delta.detach())
    reference = (q_inputs @ (weight + delta).T - inputs @ weight.T).pow(2).mean()
    reference.backward()
    assert value == pytest.approx(float(reference.detach()), rel=1e-5)
    assert torch.allclose(gradient, delta.grad, rtol=1e-4, atol=1e-7)


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


def test_tuning_the_head_lowers_the_model_kl_below_round_to_nearest(tmp_path: Path) -> None:
    """Only the head quantized (2 bits): the tuned one keeps the model closer to the float one."""
    loaded = _loaded()
    plan = Plan("tiny", "sha", (LayerPlan("lm_head", (512, 128), get_scheme("W2A16G32_ASYM")),))
    rows = _calibration(4, 32).input_ids
    reference = reference_log_probs(loaded.model, rows)
    kl = {}
    for iters in (0, 40):
        checkpoint = read_checkpoint(tune_model(loaded, plan, tmp_path / f"i{iters}", replace(TUNE, iters=iters), _calibration()))
        kl[iters] = measured_kl(load_checkpoint_model(checkpoint), Plan("tiny", "sha", ()), rows, reference)
    assert kl[40] < 0.9 * kl[0]


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
    with pytest.raises(BudgetError, match="output layer takes weight-only schemes, not FP8_STATIC"):
        plan_uniform(loaded, get_scheme("FP8_STATIC"), head=True)
    plan = Plan("tiny", "sha", (LayerPlan("lm_head", (512, 128), get_scheme("FP8_DYNAMIC")),))
    with pytest.raises(PlanMismatchError, match="output layer lm_head takes weight-only schemes"):
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


def test_a_tuned_head_exports_to_auto_round_and_loads_in_transformers(tmp_path: Path) -> None:
    loaded = _loaded()
    plan = plan_uniform(loaded, get_scheme("W4A16G32"), head=True)
    checkpoint = read_checkpoint(tune_model(loaded, plan, tmp_path / "ckpt", TUNE, _calibration()))
    out = export(checkpoint.path, ["auto_round"], tmp_path / "model")["auto_round"]
    model = load(out)
    assert_layers_exact(model, checkpoint.quantized_tensors())  # lm_head a QuantLinear with our codes
    assert torch.equal(model.model.embed_tokens.weight.float(), loaded.model.model.embed_tokens.weight.half().float())
