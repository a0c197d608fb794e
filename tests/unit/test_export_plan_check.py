"""The plan-level check (``check_plan``, each writer's ``plan_problems``): what a format refuses from the
plan alone is refused before quantization, with the very message the export's check gives."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_llama

from arctl.checkpoint import write_checkpoint
from arctl.plan import LayerPlan, Plan
from arctl.quant import quantize
from arctl.quant.activations import static_input_scale
from arctl.schemes import get_scheme
from arctl_exporter.engine import check_plan, export
from arctl_exporter.errors import ExportError
from arctl_exporter.registry import WRITERS, UnknownFormatError


def uniform_checkpoint(scheme: str, folder: Path) -> tuple[Path, Plan]:
    """Every linear of a tiny Llama in ``scheme`` (round to nearest; a static activation scale for an
    input amax of 4, uncalibrated but as a checkpoint stores it), written as a checkpoint."""
    model = tiny_llama(tie=True)
    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")
    }
    plan = Plan(
        "tiny-llama",
        "",
        tuple(LayerPlan(name, tuple(module.weight.shape), get_scheme(scheme)) for name, module in linears.items()),
    )
    quantized = {layer.name: quantize(linears[layer.name].weight.detach(), layer.scheme) for layer in plan.layers}
    act = get_scheme(scheme).act
    if act is not None and act.static:
        quantized = {name: replace(qt, input_scale=static_input_scale(4.0, act)) for name, qt in quantized.items()}
    float_tensors = {
        name: tensor for name, tensor in model.state_dict().items() if name.removesuffix(".weight") not in quantized
    }

    def write_model_files(target: Path) -> None:
        model.config.save_pretrained(target)

    return write_checkpoint(folder, plan, quantized, float_tensors, write_model_files, {"method": "rtn"}), plan


@pytest.mark.parametrize(
    "scheme, formats, reason",
    [
        ("NVFP4_A4", ["auto_round"], "NVFP4_A4 cannot be written as auto_round:auto_gptq (it quantizes activations"),
        ("NVFP4_A4", ["gguf"], "NVFP4_A4 cannot be written as gguf (it quantizes activations"),
        ("FP8_DYNAMIC", ["auto_awq"], "FP8_DYNAMIC cannot be written as auto_awq (it quantizes activations"),
        ("MXFP4", ["auto_gptq"], "MXFP4 cannot be written as auto_gptq (INT only)"),
        ("MXFP4", ["compressed-tensors", "auto_gptq"], "MXFP4 cannot be written as auto_gptq (INT only)"),
    ],
)
def test_plan_check_refuses_with_the_exports_message(
    tmp_path: Path, scheme: str, formats: list[str], reason: str
) -> None:
    path, plan = uniform_checkpoint(scheme, tmp_path / "checkpoint")
    with pytest.raises(ExportError) as at_plan:
        check_plan(formats, plan)
    with pytest.raises(ExportError) as at_export:
        export(path, formats, tmp_path / "out")
    assert str(at_plan.value) == str(at_export.value)
    assert str(at_plan.value).startswith(f"model.layers.0.self_attn.q_proj: {reason}")
    assert str(at_plan.value).endswith("(and 9 more)")  # 14 layers, the first five named
    assert not (tmp_path / "out").exists()


# Plans no checkpoint can hold (quantization refuses them), so the export's check sees them on a
# stand-in that carries only the plan, as a checkpoint would.
PLANS = {
    "group size not dividing in_features": Plan(
        "m", "", (LayerPlan("model.layers.0.mlp.down_proj", (128, 100), get_scheme("W4A16G32")),)
    ),
    "activations": Plan("m", "", (LayerPlan("model.layers.0.mlp.up_proj", (256, 128), get_scheme("MXFP4_A4")),)),
    "nothing quantized": Plan("m", "", (LayerPlan("model.layers.0.mlp.up_proj", (256, 128), get_scheme("BF16")),)),
    "outside the blocks": Plan("m", "", (LayerPlan("lm_head", (512, 128), get_scheme("W4A16G32")),)),
    "fused group mixing schemes": Plan(
        "m",
        "",
        tuple(
            LayerPlan(f"model.layers.0.mlp.{name}", (256, 128), get_scheme(scheme), "model.layers.0.mlp.gate_up")
            for name, scheme in (("gate_proj", "W4A16G32"), ("up_proj", "W8A16G32"))
        ),
    ),
}


@pytest.mark.parametrize("plan_name", sorted(PLANS))
@pytest.mark.parametrize("format_name", sorted(WRITERS))
def test_every_writer_refuses_a_plan_as_its_check_does(format_name: str, plan_name: str) -> None:
    plan = PLANS[plan_name]
    writer = WRITERS[format_name]
    problems = writer.plan_problems(plan)
    if not problems:
        check_plan([format_name], plan)  # the plan is fine for this format: nothing raised
        return
    with pytest.raises(ExportError) as at_plan:
        check_plan([format_name], plan)
    with pytest.raises(ExportError) as at_check:
        writer.check(SimpleNamespace(plan=plan))
    assert str(at_plan.value) == str(at_check.value) == "; ".join(problems)


def test_compressed_tensors_refuses_a_group_size_not_dividing_in_features() -> None:
    with pytest.raises(ExportError, match=r"^model\.layers\.0\.mlp\.down_proj: W4A16G32 cannot be written as "
                       r"compressed-tensors \(group size 32 does not divide in_features 100\)"):
        check_plan(["compressed-tensors"], PLANS["group size not dividing in_features"])


def test_a_plan_every_format_holds_passes(tmp_path: Path) -> None:
    _, plan = uniform_checkpoint("W4A16G32", tmp_path / "checkpoint")
    check_plan(sorted(WRITERS), plan)


def test_unknown_or_repeated_formats_are_refused_as_export_refuses_them() -> None:
    plan = PLANS["activations"]
    with pytest.raises(UnknownFormatError, match="valid: auto_round"):
        check_plan(["onnx"], plan)
    with pytest.raises(ValueError, match="given twice: auto_round"):
        check_plan(["auto_round", "auto_round"], plan)
