"""The auto_gptq writer on tiny random Llama models: export, load with transformers + auto-round on CPU
(auto-round converts GPTQ v1 checkpoints to its ``auto_round:auto_gptq`` layers), compare with the
fake-quantized model.

Same comparison and tolerance as test_export_auto_round.py: the pinned ``auto_round:torch_zp``
backend computes in fp16, each QuantLinear must give exactly our dequantized weight rounded to fp16,
and the logits must agree within 4 fp16 ulps of the largest logit while the quantization itself moves
them more than 10x that. On CPU auto-round has no GPTQ-v1 backend for asymmetric layers (torch_zp is
symmetric only), so asymmetric exports are checked by feeding the written tensors to auto-round's
torch_zp QuantLinear directly (its dequantization does not depend on symmetry) and by our reader.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file
from test_export_auto_round import (
    assert_layers_exact,
    assert_logits_match,
    fake_quantized,
    linear_names,
    make_checkpoint,
    tiny_model,
)

from arctl.plan import LayerPlan
from arctl.quant import dequantize
from arctl.schemes import get_scheme
from arctl_exporter.auto_gptq import AutoGptqWriter, layer_problem, quantization_config, resolve
from arctl_exporter.engine import export
from arctl_exporter.errors import ExportError
from arctl_exporter.packing import unpack_qzeros

transformers = pytest.importorskip("transformers")
pytest.importorskip("auto_round")

MIXED = {
    "model.layers.0.self_attn.k_proj": "W4A16C",
    "model.layers.0.self_attn.q_proj": "W8A16G32",
    "model.layers.0.mlp.down_proj": "W2A16G32",
    "model.layers.1.mlp.up_proj": "W3A16G64",
    "model.layers.1.mlp.gate_proj": "W3A16G64",
    "model.layers.1.self_attn.o_proj": "BF16",
}


def load(folder):
    """Load with auto-round's pure-torch backend. Its GPTQ layers register no ``g_idx`` (they assume the
    identity grouping that the writer verifies), so those keys, and only those, are left unused."""
    backend = transformers.AutoRoundConfig(backend="auto_round:torch_zp")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=backend, output_loading_info=True
        )
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert info["unexpected_keys"] and all(key.endswith(".g_idx") for key in info["unexpected_keys"])
    return model.eval()


@pytest.fixture(scope="module")
def uniform_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq-uniform")
    model = tiny_model(tie=True)
    schemes = {name: "W4A16G32" for name in linear_names(model, with_lm_head=False)}
    checkpoint, quantized = make_checkpoint(model, schemes, root / "checkpoint")
    return quantized, export(checkpoint, ["auto_gptq"], root / "model")["auto_gptq"]


@pytest.fixture(scope="module")
def mixed_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq-mixed")
    model = tiny_model(tie=False, seed=1)
    schemes = {name: MIXED.get(name, "W4A16G64") for name in linear_names(model, with_lm_head=True)}
    schemes["lm_head"] = "W8A16G32"
    checkpoint, quantized = make_checkpoint(model, schemes, root / "checkpoint")
    return quantized, export(checkpoint, ["auto_gptq"], root / "model")["auto_gptq"]


def test_uniform_config_and_tensors(uniform_export):
    _, out = uniform_export
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "quantize_config.json",
    ]
    config = json.loads((out / "config.json").read_text())
    qconfig = config["quantization_config"]
    assert qconfig == json.loads((out / "quantize_config.json").read_text())
    assert qconfig["quant_method"] == "gptq" and "meta" not in qconfig and "dynamic" not in qconfig
    assert (qconfig["bits"], qconfig["group_size"], qconfig["sym"], qconfig["desc_act"]) == (
        4,
        32,
        True,
        False,
    )
    assert qconfig["lm_head"] is False and config["torch_dtype"] == "float16"
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{name}.qweight"].shape == (128 * 4 // 32, 128)
    assert torch.equal(tensors[f"{name}.g_idx"], torch.arange(128, dtype=torch.int32) // 32)
    assert torch.all(unpack_qzeros(tensors[f"{name}.qzeros"], 4) == 8)  # stored as 7: zp - 1
    assert int(tensors[f"{name}.qzeros"][0, 0]) == 0x77777777
    assert all(
        t.dtype == torch.float16 for k, t in tensors.items() if not k.endswith(("qweight", "qzeros", "g_idx"))
    )
    assert "lm_head.weight" not in tensors  # tied: stored once


def test_uniform_plan_loads_and_matches(uniform_export):
    quantized, out = uniform_export
    loaded = load(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_layers_exact(loaded, quantized)
    assert_logits_match(loaded, fake_quantized(tiny_model(tie=True), quantized), tiny_model(tie=True))


def test_mixed_plan_dynamic_rules(mixed_export):
    _, out = mixed_export
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qconfig["bits"], qconfig["group_size"]) == (4, 64)
    assert qconfig["lm_head"] is True
    dynamic = qconfig["dynamic"]
    assert dynamic[r"+:^model\.layers\.0\.self_attn\.q_proj$"] == {"bits": 8, "group_size": 32, "sym": True}
    assert dynamic[r"+:^model\.layers\.0\.self_attn\.k_proj$"] == {"bits": 4, "group_size": -1, "sym": True}
    assert dynamic[r"-:^model\.layers\.1\.self_attn\.o_proj$"] == {}
    assert dynamic[r"+:^lm_head$"] == {"bits": 8, "group_size": 32, "sym": True}
    assert resolve(qconfig, "model.layers.1.mlp.up_proj") == {"bits": 3, "group_size": 64, "sym": True}
    assert resolve(qconfig, "model.layers.0.self_attn.v_proj") == {"bits": 4, "group_size": 64, "sym": True}
    assert resolve(qconfig, "model.embed_tokens") is None


def test_mixed_plan_loads_and_matches(mixed_export):
    quantized, out = mixed_export
    loaded = load(out)
    modules = dict(loaded.named_modules())
    assert type(modules["model.layers.1.self_attn.o_proj"]) is torch.nn.Linear
    assert modules["model.layers.1.mlp.up_proj"].bits == 3 and modules["lm_head"].bits == 8
    assert_layers_exact(loaded, quantized)
    reference = fake_quantized(tiny_model(tie=False, seed=1), quantized)
    assert_logits_match(loaded, reference, tiny_model(tie=False, seed=1))


def test_fused_group_rule_names_the_fused_module():
    def layer(name, scheme):
        return LayerPlan(
            f"model.layers.0.self_attn.{name}", (128, 128), get_scheme(scheme), "model.layers.0.qkv"
        )

    plan = (
        layer("q_proj", "W8A16G32"),
        layer("k_proj", "W8A16G32"),
        layer("v_proj", "W8A16G32"),
        *(
            LayerPlan(f"model.layers.{i}.self_attn.o_proj", (128, 128), get_scheme("W4A16G32"))
            for i in range(4)
        ),
    )
    qconfig = quantization_config(plan, [])
    (key,) = qconfig["dynamic"]
    pattern = key.removeprefix("+:")
    for name in ("q_proj", "k_proj", "v_proj", "qkv_proj"):  # vLLM/SGLang match the fused name
        assert re.match(pattern, f"model.layers.0.self_attn.{name}")
    assert not re.match(pattern, "model.layers.0.self_attn.o_proj")
    assert not re.match(pattern, "model.layers.10.self_attn.q_proj")


def test_asymmetric_layers_read_back_through_auto_rounds_layer(tmp_path):
    from auto_round_extension.torch.qlinear_torch_zp import QuantLinear

    model = tiny_model(tie=True, seed=3)
    schemes = {name: "W4A16G32_ASYM" for name in linear_names(model, with_lm_head=False)}
    schemes["model.layers.0.mlp.down_proj"] = "W8A16G64_ASYM"
    schemes["model.layers.1.mlp.down_proj"] = "W3A16G32_ASYM"
    checkpoint, quantized = make_checkpoint(model, schemes, tmp_path / "checkpoint")
    if any(bool((qt.zeros == 0).any()) for qt in quantized.values()):
        pytest.skip("a random group got zero point 0 (not storable in GPTQ v1)")
    out = export(checkpoint, ["auto_gptq"], tmp_path / "model")["auto_gptq"]
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["sym"] is False
    tensors = load_file(str(out / "model.safetensors"))
    for name, qt in quantized.items():
        out_features, in_features = qt.shape
        layer = QuantLinear(qt.scheme.bits, qt.scheme.group_size, in_features, out_features, bias=False)
        layer.load_state_dict({part: tensors[f"{name}.{part}"] for part in ("qweight", "qzeros", "scales")})
        with torch.no_grad():
            weight = layer(torch.eye(in_features, dtype=torch.float16)).t()
        assert torch.equal(weight, dequantize(qt).to(torch.float16)), name


def test_zero_point_zero_is_refused_naming_the_layer(tmp_path):
    model = tiny_model(tie=True, seed=4)
    names = linear_names(model, with_lm_head=False)
    with torch.no_grad():  # a group of non-negative weights has zero point 0
        dict(model.named_modules())["model.layers.1.mlp.up_proj"].weight[:, :32].abs_()
    schemes = {name: "W4A16G32_ASYM" for name in names}
    checkpoint, _ = make_checkpoint(model, schemes, tmp_path / "checkpoint")
    with pytest.raises(
        ExportError,
        match=r"model\.layers\.1\.mlp\.up_proj: W4A16G32_ASYM has \d+ group\(s\) with zero point 0.*use auto_awq",
    ):
        export(checkpoint, ["auto_gptq"], tmp_path / "model")
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    ("scheme", "expected"),
    [
        ("MXFP4", r"MXFP4 cannot be written as auto_gptq \(INT only\); use compressed-tensors"),
        (
            "W6A16G32",
            r"W6A16G32 cannot be written as auto_gptq \(INT 2/3/4/8 only\); use compressed-tensors or gguf",
        ),
        ("NVFP4", r"NVFP4 cannot be written as auto_gptq \(INT only\)"),
        (
            "MXFP4_A4",
            (
                r"MXFP4_A4 cannot be written as auto_gptq \(it quantizes activations; this format stores weights "
                r"only\); use compressed-tensors$"
            ),
        ),
    ],
)
def test_unwritable_layer_is_refused(tmp_path, scheme, expected):
    model = tiny_model(tie=True)
    schemes = {name: "W4A16G32" for name in linear_names(model, with_lm_head=False)}
    schemes["model.layers.0.mlp.up_proj"] = scheme
    checkpoint, _ = make_checkpoint(model, schemes, tmp_path / "checkpoint")
    with pytest.raises(ExportError, match=r"^model\.layers\.0\.mlp\.up_proj: " + expected):
        export(checkpoint, ["auto_gptq"], tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


@pytest.mark.parametrize("scheme", ["FP8_STATIC", "FP8_DYNAMIC", "MXFP4_A4", "MXFP8_A8", "NVFP4_A4"])
def test_activation_quantization_is_refused(scheme):
    problem = layer_problem(LayerPlan("model.layers.0.mlp.up_proj", (128, 128), get_scheme(scheme)))
    assert problem == (
        f"model.layers.0.mlp.up_proj: {scheme} cannot be written as auto_gptq (it quantizes activations; "
        "this format stores weights only); use compressed-tensors"
    )


def test_writer_attributes():
    writer = AutoGptqWriter()
    assert writer.name == "auto_gptq" and "gptq" in writer.description


def test_asymmetric_plan_loads_with_ark(tmp_path):
    pytest.importorskip(
        "auto_round_kernel",
        reason="auto-round has no CPU backend for asymmetric GPTQ v1 without auto-round-lib (ARK)",
    )
    model = tiny_model(tie=True, seed=3)
    schemes = {name: "W4A16G32_ASYM" for name in linear_names(model, with_lm_head=False)}
    schemes["model.layers.0.mlp.down_proj"] = "W8A16G32_ASYM"
    checkpoint, quantized = make_checkpoint(model, schemes, tmp_path / "checkpoint")
    if any(bool((qt.zeros == 0).any()) for qt in quantized.values()):
        pytest.skip("a random group got zero point 0 (not storable in GPTQ v1)")
    out = export(checkpoint, ["auto_gptq"], tmp_path / "model")["auto_gptq"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            out, quantization_config=transformers.AutoRoundConfig(backend="auto")
        ).eval()
    modules = dict(loaded.named_modules())
    for name, qt in quantized.items():
        eye = torch.eye(qt.shape[1], dtype=loaded.dtype)
        with torch.no_grad():
            assert torch.equal(modules[name](eye).t(), dequantize(qt).to(loaded.dtype)), name
    assert_logits_match(
        loaded, fake_quantized(tiny_model(tie=True, seed=3), quantized), tiny_model(tie=True, seed=3)
    )
