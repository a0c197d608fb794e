"""The compressed-tensors writer on tiny random Llama models, read back by the ``compressed-tensors``
package itself: its config parser (``QuantizationConfig``), its decompressors, and transformers'
compressed-tensors loader (``run_compressed=False`` decompresses every layer while loading).

What "the same weights" means per format (the decompressors' own arithmetic):
- INT (``pack-quantized``): ``(q - zp) * scale`` in the scale's dtype, fp16: exactly our value rounded
  once to fp16.
- MXFP4, MXFP8, FP8: power-of-two or fp32 scales: exactly our value.
- NVFP4: the decompressor unpacks to bfloat16 and computes ``q * (scale / global)``: our value
  ``q * scale / global`` within one bfloat16 rounding (half an ulp, plus the order of the two products).

transformers 5.24 decompresses every dense layer with one config group (``get_dense_scheme``), so a
mixed-precision folder fails to load there; mixed plans are checked with the package's decompressors
per group, uniform plans through transformers end to end.

Activation quantization. ``dequantize=True`` (``run_compressed=False``) leaves a dense model that
quantizes no inputs; the default path (``dequantize=False``) applies compressed-tensors' own lifecycle:
every targeted Linear gets the group's scheme, its ``input_scale`` / ``input_global_scale`` loaded from
the folder, and a forward that fake-quantizes its input (``forward_quantize``, float32 here) before the
matmul; the weights are decompressed on the first forward. What it computes, against
``arctl.models.load_checkpoint_model`` of the source checkpoint (float32, 2 x 16 tokens):
- FP8 static and dynamic: the same float32 operations (``e4m3(x / s) * s``, s per tensor or
  ``amax(token) / 448``): logits equal within ``LOGIT_TOLERANCE`` (observed: bit-equal), while the
  activation quantization itself moves them over 100x that.
- NVFP4: the decompressor dequantizes FP4 weights to bfloat16, which a float32 model cannot multiply
  (the first forward fails on dtypes); once decompressed the weights are checked within one bfloat16
  rounding of ours (as above) and replaced by ours in float32, so the check isolates the input path:
  compressed-tensors divides by ``scale / global`` where we multiply by ``global / scale``, float32
  last-place differences (observed 2.4e-7 on the logits). With its bfloat16 weights kept (cast to
  float32) the logits differ by 0.096: weights 2.3e-4 apart flip FP4 roundings of the activations
  downstream, and in this random model that adds up to 2/3 of what activation quantization moves
  (0.14).
- MXFP4 / MXFP8: the weights decompress to bfloat16, which holds MX values exactly (replaced by ours
  in float32 as for NVFP4); the activations' shared exponent follows the runtimes' rule (amax rounded
  to one mantissa bit first, ``arctl.quant.activations.runtime_mx_exponent``), so the logits agree
  within ``LOGIT_TOLERANCE``. (With the OCP floor rule of MX weights, one group in five of real
  inputs got half the runtime's scale, moving the tiny model's logits by 0.17, as much as
  activation quantization itself.)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_export_auto_round import fake_quantized, linear_names, make_checkpoint, tiny_model

from arctl.checkpoint import read_checkpoint, write_checkpoint
from arctl.models import fused_group, load_checkpoint_model
from arctl.plan import LayerPlan, Plan
from arctl.quant import dequantize, quantize
from arctl.quant.activations import static_input_scale
from arctl.quant.floating import nvfp4_global_scale
from arctl.schemes import get_scheme
from arctl_exporter.compressed_tensors import (
    CompressedTensorsWriter,
    input_args,
    input_scale_fused_problems,
    nvfp4_fused_problems,
    weight_args,
)
from arctl_exporter.engine import export
from arctl_exporter.errors import ExportError

transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

SCHEMES = [
    "W4A16G32",
    "W4A16G32_ASYM",
    "W3A16G64",
    "W8A16C_ASYM",
    "W6A16G32",
    "MXFP4",
    "MXFP8",
    "NVFP4",
    "FP8",
]
MIXED = {
    "model.layers.0.self_attn.q_proj": "W8A16G32",
    "model.layers.0.self_attn.k_proj": "W4A16C",
    "model.layers.0.mlp.down_proj": "W4A16G32_ASYM",
    "model.layers.0.self_attn.o_proj": "MXFP4",
    "model.layers.1.self_attn.o_proj": "NVFP4",
    "model.layers.1.mlp.down_proj": "FP8",
    "model.layers.1.mlp.up_proj": "MXFP8",
    "model.layers.1.mlp.gate_proj": "W3A16G64",
    "model.layers.0.mlp.up_proj": "BF16",
}


def assert_same_weights(got: torch.Tensor, qt) -> None:
    """``got`` is the decompressor's weight; ``qt`` ours (see the module docstring for each rule)."""
    want = dequantize(qt)
    if qt.scheme.dtype == "int":
        assert torch.equal(got.float(), want.to(torch.float16).float())
    elif qt.scheme.dtype == "nvfp":
        ulp = torch.finfo(torch.bfloat16).eps * want.abs()
        assert torch.all((got.float() - want).abs() <= ulp)
        assert float((got.float() == want.to(torch.bfloat16).float()).float().mean()) > 0.95
    else:
        assert torch.equal(got.float(), want)


def export_plan(tmp_path, schemes: dict[str, str], default: str | None, seed: int = 1):
    model = tiny_model(tie=False, seed=seed)
    plan = {name: schemes.get(name, default) for name in linear_names(model, with_lm_head=False)}
    checkpoint, quantized = make_checkpoint(model, plan, tmp_path / "checkpoint")
    out = export(checkpoint, ["compressed-tensors"], tmp_path / "model")["compressed-tensors"]
    return model, quantized, out


@pytest.mark.parametrize("scheme", SCHEMES)
def test_uniform_plan_loads_in_transformers_with_our_weights(tmp_path, scheme):
    _, quantized, out = export_plan(tmp_path, {}, scheme)
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = qconfig["config_groups"].values()
    assert qconfig["format"] == group["format"] and len(group["targets"]) == 14
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, quantization_config=transformers.CompressedTensorsConfig(run_compressed=False)
    )
    modules = dict(loaded.named_modules())
    for name, qt in quantized.items():
        assert_same_weights(modules[name].weight.detach(), qt)
    if scheme in ("MXFP4", "FP8"):  # exact weights: the whole model computes what ours does
        reference = fake_quantized(tiny_model(tie=False, seed=1), quantized)
        ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.allclose(loaded(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_mixed_plan_one_group_per_scheme_decompresses_exactly(tmp_path):
    _, quantized, out = export_plan(tmp_path, MIXED, "W4A16G64")
    raw = json.loads((out / "config.json").read_text())["quantization_config"]
    assert raw["format"] == "mixed-precision"
    config = QuantizationConfig.model_validate(raw)  # the package's own parser accepts it
    assert "model.layers.0.mlp.up_proj" in config.ignore and "lm_head" in config.ignore
    targets = {target: group for group in config.config_groups.values() for target in group.targets}
    assert set(targets) == set(quantized)  # explicit module names, never "Linear"
    assert len(config.config_groups) == len({qt.scheme for qt in quantized.values()})
    tensors = load_file(str(out / "model.safetensors"))
    for name, qt in quantized.items():
        scheme = targets[name]
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        state = {
            key.removeprefix(f"{name}."): value
            for key, value in tensors.items()
            if key.startswith(f"{name}.")
        }
        assert_same_weights(compressor.decompress(state, scheme)["weight"], qt)
    assert (
        tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32
    )  # kept as the checkpoint has it


def test_nvfp4_fused_group_needs_one_global_scale():
    torch.manual_seed(0)
    layers, quantized = [], {}
    for index, name in enumerate(("q_proj", "k_proj")):
        weight = torch.randn(64, 64) * (index + 1)
        layer = LayerPlan(
            f"model.layers.0.self_attn.{name}", (64, 64), get_scheme("NVFP4"), "model.layers.0.qkv"
        )
        layers.append(layer)
        quantized[layer.name] = quantize(weight, layer.scheme)
    (problem,) = nvfp4_fused_problems(tuple(layers), quantized)
    assert problem.startswith("model.layers.0.self_attn.k_proj: NVFP4 global scale")
    assert "shared global scale" in problem


def test_shapes_it_cannot_pack_are_refused():
    plan = Plan("m", "", (LayerPlan("model.layers.0.mlp.up_proj", (64, 100), get_scheme("W4A16C")),))
    with pytest.raises(
        ExportError, match=r"^model\.layers\.0\.mlp\.up_proj: W4A16C cannot be written as compressed-tensors"
    ):
        CompressedTensorsWriter().check(type("C", (), {"plan": plan})())


# --- activation quantization ---------------------------------------------------------------------------

# arctl scheme -> compressed-tensors preset whose input_activations it writes
ACT_PRESETS = {
    "FP8_STATIC": "FP8",
    "FP8_DYNAMIC": "FP8_DYNAMIC",
    "NVFP4_A4": "NVFP4",
    "MXFP4_A4": "MXFP4",
    "MXFP8_A8": "MXFP8",
}
ACT_MIXED = {
    "model.layers.0.self_attn.q_proj": "FP8_STATIC",
    "model.layers.0.self_attn.k_proj": "FP8_STATIC",
    "model.layers.0.self_attn.v_proj": "FP8_STATIC",
    "model.layers.0.self_attn.o_proj": "FP8",
    "model.layers.0.mlp.gate_proj": "FP8_DYNAMIC",
    "model.layers.0.mlp.up_proj": "FP8_DYNAMIC",
    "model.layers.0.mlp.down_proj": "NVFP4_A4",
    "model.layers.1.self_attn.q_proj": "MXFP4_A4",
    "model.layers.1.self_attn.k_proj": "MXFP4_A4",
    "model.layers.1.self_attn.v_proj": "MXFP4_A4",
    "model.layers.1.self_attn.o_proj": "NVFP4_A4",
    "model.layers.1.mlp.gate_proj": "MXFP8_A8",
    "model.layers.1.mlp.up_proj": "MXFP8_A8",
    "model.layers.1.mlp.down_proj": "W4A16G32",
}
# Observed 0 (FP8) and 2.4e-7 (NVFP4, float32 last places) on logits of magnitude ~1: 40x margin over
# that noise, and 1/3700 of the smallest move activation quantization makes here (0.037, FP8_DYNAMIC).
LOGIT_TOLERANCE = 1e-5


def write_tiny_checkpoint(model, plan: Plan, quantized, folder: Path) -> Path:
    float_tensors = {
        name: tensor for name, tensor in model.state_dict().items() if name.removesuffix(".weight") not in quantized
    }

    def write_model_files(target: Path) -> None:
        model.config.save_pretrained(target)
        model.generation_config.save_pretrained(target)

    return write_checkpoint(folder, plan, quantized, float_tensors, write_model_files, {"method": "rtn"})


def calibrated_checkpoint(model, schemes: dict[str, str], folder: Path):
    """RTN checkpoint of ``schemes`` with fused groups (NVFP4 ones sharing the group's global scale, as
    the tuner gives them); static activation scales from the float model's input amax on 2 x 16 random
    tokens (the tuner's calibration is not used here). Layers of a fused group see one input, hence
    one scale. Returns (path, quantized)."""
    modules = dict(model.named_modules())
    amax: dict[str, float] = {}

    def record(name: str):
        def hook(_module, args):
            amax[name] = max(amax.get(name, 0.0), float(args[0].detach().abs().max()))

        return hook

    handles = [modules[name].register_forward_pre_hook(record(name)) for name in schemes]
    with torch.no_grad():
        model(torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3)))
    for handle in handles:
        handle.remove()
    plan = Plan(
        "tiny-llama",
        "",
        tuple(
            LayerPlan(name, tuple(modules[name].weight.shape), get_scheme(scheme), fused_group(name))
            for name, scheme in schemes.items()
        ),
    )
    quantized = {}
    for layer in plan.layers:
        weight, global_scale = modules[layer.name].weight.detach(), None
        if layer.scheme.dtype == "nvfp" and layer.fused_group is not None:
            group = [other.name for other in plan.layers if other.fused_group == layer.fused_group]
            global_scale = nvfp4_global_scale(torch.cat([modules[name].weight.detach() for name in group]))
        qt = quantize(weight, layer.scheme, global_scale=global_scale)
        act = layer.scheme.act
        if act is not None and act.static:
            qt = dataclasses.replace(qt, input_scale=static_input_scale(amax[layer.name], act))
        quantized[layer.name] = qt
    return write_tiny_checkpoint(model, plan, quantized, folder), quantized


@pytest.mark.parametrize(
    ("ours", "preset"),
    [("MXFP4", "MXFP4"), ("MXFP8", "MXFP8"), ("NVFP4", "NVFP4"), ("FP8", "FP8_DYNAMIC")]
    + [(name, name) for name in ("W4A16", "W4A16_ASYM", "W8A16", "W3A16", "W2A16")],
)
def test_weight_args_are_the_library_presets_dump(ours, preset):
    assert weight_args(get_scheme(ours)) == PRESET_SCHEMES[preset]["weights"].model_dump(mode="json")


@pytest.mark.parametrize("name", [*SCHEMES, *ACT_PRESETS])
def test_args_survive_the_librarys_parser(name):
    """vLLM and transformers re-parse the config with ``QuantizationArgs``: what we write is a fixed point."""
    scheme = get_scheme(name)
    for args in (weight_args(scheme), input_args(scheme.act)):
        if args is not None:
            assert QuantizationArgs.model_validate(args).model_dump(mode="json") == args


@pytest.mark.parametrize(("ours", "preset"), list(ACT_PRESETS.items()))
def test_input_args_are_the_library_presets_dump(ours, preset):
    scheme = get_scheme(ours)
    assert input_args(scheme.act) == PRESET_SCHEMES[preset]["input_activations"].model_dump(mode="json")
    weight_only = dataclasses.replace(scheme, act=None)
    assert weight_args(scheme) == weight_args(weight_only) and input_args(weight_only.act) is None
    if ours == "FP8_STATIC":  # our FP8 weights stay per channel; the FP8 preset's are per tensor
        assert weight_args(scheme)["strategy"] == "channel"
        assert PRESET_SCHEMES[preset]["weights"].strategy == "tensor"


def test_activation_schemes_get_their_own_groups_and_scales(tmp_path):
    model = tiny_model(tie=False, seed=1)
    checkpoint, quantized = calibrated_checkpoint(model, ACT_MIXED, tmp_path / "checkpoint")
    out = export(checkpoint, ["compressed-tensors"], tmp_path / "model")["compressed-tensors"]
    raw = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(raw["config_groups"]) == len(set(ACT_MIXED.values()))  # FP8 and FP8_STATIC apart
    for group in raw["config_groups"].values():
        (name,) = {ACT_MIXED[target] for target in group["targets"]}
        assert group["weights"] == weight_args(get_scheme(name))
        assert group["input_activations"] == input_args(get_scheme(name).act)
    config = QuantizationConfig.model_validate(raw)
    by_target = {target: group for group in config.config_groups.values() for target in group.targets}
    tensors = load_file(str(out / "model.safetensors"))
    for name, qt in quantized.items():
        parsed, preset = by_target[name].input_activations, ACT_PRESETS.get(qt.scheme.name)
        if preset is None:
            assert parsed is None
        else:
            assert parsed.model_dump(mode="json") == PRESET_SCHEMES[preset]["input_activations"].model_dump(mode="json")
        parts = {key.removeprefix(f"{name}.") for key in tensors if key.startswith(f"{name}.input")}
        assert parts == {"FP8_STATIC": {"input_scale"}, "NVFP4_A4": {"input_global_scale"}}.get(qt.scheme.name, set())
        # the input parameters the library gives such a Linear when it loads a compressed folder
        probe = torch.nn.Linear(qt.shape[1], qt.shape[0], bias=False)
        initialize_module_for_quantization(probe, by_target[name], force_zero_point=False)
        assert parts == {key for key, _ in probe.named_parameters() if key.startswith("input")}
        for part in parts:
            written = tensors[f"{name}.{part}"]
            assert written.dtype == torch.float32 and written.shape == (1,) and torch.equal(written, qt.input_scale)
    qkv = [quantized[f"model.layers.0.self_attn.{p}"].input_scale for p in ("q_proj", "k_proj", "v_proj")]
    assert torch.equal(qkv[0], qkv[1]) and torch.equal(qkv[0], qkv[2])  # one input, one calibrated scale


@pytest.mark.parametrize("scheme", ["FP8_STATIC", "NVFP4_A4"])
def test_fused_layers_need_one_input_scale(scheme):
    layers, quantized = [], {}
    for index, name in enumerate(("gate_proj", "up_proj")):
        layer = LayerPlan(f"model.layers.0.mlp.{name}", (64, 64), get_scheme(scheme), "model.layers.0.mlp.gate_up")
        qt = quantize(torch.randn(64, 64, generator=torch.Generator().manual_seed(index)), layer.scheme)
        layers.append(layer)
        quantized[layer.name] = dataclasses.replace(qt, input_scale=static_input_scale(3.0 + index, layer.scheme.act))
    (problem,) = input_scale_fused_problems(tuple(layers), quantized)
    assert problem.startswith(f"model.layers.0.mlp.up_proj: {scheme} input scale ")
    assert "of model.layers.0.mlp.gate_proj in fused group model.layers.0.mlp.gate_up" in problem
    assert ("FP8_DYNAMIC" in problem) == (scheme == "FP8_STATIC")
    quantized["model.layers.0.mlp.up_proj"] = dataclasses.replace(
        quantized["model.layers.0.mlp.up_proj"], input_scale=quantized["model.layers.0.mlp.gate_proj"].input_scale
    )
    assert input_scale_fused_problems(tuple(layers), quantized) == []


def test_export_refuses_fused_layers_with_different_input_scales(tmp_path):
    model = tiny_model(tie=False, seed=1)
    schemes = dict.fromkeys(linear_names(model, with_lm_head=False), "FP8_STATIC")
    checkpoint, quantized = calibrated_checkpoint(model, schemes, tmp_path / "checkpoint")
    plan = read_checkpoint(checkpoint).plan
    assert input_scale_fused_problems(plan.layers, quantized) == []
    k_proj = "model.layers.1.self_attn.k_proj"
    quantized[k_proj] = dataclasses.replace(quantized[k_proj], input_scale=quantized[k_proj].input_scale * 2)
    skewed = write_tiny_checkpoint(model, plan, quantized, tmp_path / "skewed")
    with pytest.raises(ExportError, match=r"^model\.layers\.1\.self_attn\.k_proj: FP8_STATIC input scale .* differs"):
        export(skewed, ["compressed-tensors"], tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "skewed"]


def load_with_input_quantization(folder: Path):
    """transformers' default compressed-tensors path (``dequantize=False``), decompressed as the first
    forward would do it; every tensor of the folder must have found its parameter."""
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded.hf_quantizer.compressor.decompress_model(loaded)
    return loaded.eval()


@pytest.mark.parametrize("scheme", ["FP8_STATIC", "FP8_DYNAMIC", "NVFP4_A4", "MXFP4_A4", "MXFP8_A8"])
def test_activation_schemes_load_in_transformers_and_match_our_model(tmp_path, scheme):
    model = tiny_model(tie=False, seed=1)
    schemes = dict.fromkeys(linear_names(model, with_lm_head=False), scheme)
    checkpoint, quantized = calibrated_checkpoint(model, schemes, tmp_path / "checkpoint")
    out = export(checkpoint, ["compressed-tensors"], tmp_path / "model")["compressed-tensors"]
    loaded = load_with_input_quantization(out)
    modules = dict(loaded.named_modules())
    part = {"FP8_STATIC": "input_scale", "NVFP4_A4": "input_global_scale"}.get(scheme)
    for name, qt in quantized.items():
        module = modules[name]
        assert module.quantization_scheme.input_activations.model_dump(mode="json") == input_args(qt.scheme.act)
        if part is None:
            assert not hasattr(module, "input_scale") and not hasattr(module, "input_global_scale")
        else:
            assert torch.equal(getattr(module, part).detach(), qt.input_scale)
        assert_same_weights(module.weight.detach(), qt)
        if module.weight.dtype != torch.float32:  # FP4 decompresses to bfloat16 (module docstring)
            module.weight.data = dequantize(qt)
    reference = load_checkpoint_model(read_checkpoint(checkpoint))
    weight_only = fake_quantized(tiny_model(tie=False, seed=1), quantized)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want, without = loaded(ids).logits, reference(ids).logits, weight_only(ids).logits
    assert float((got - want).abs().max()) <= LOGIT_TOLERANCE
    assert float((without - want).abs().max()) > 100 * LOGIT_TOLERANCE  # so the inputs were quantized
