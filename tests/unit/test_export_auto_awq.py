"""The auto_awq writer on tiny random Llama models.

Two readers:
- auto-round's AWQ loader through transformers. On CPU its only AWQ backends are ARK
  (``auto-round-lib``, module ``auto_round_kernel``) and GPTQModel; neither is a default dependency
  (auto-round-lib changes which kernel auto-round picks for every CPU load), so this test skips unless
  ARK can be imported. It computes in fp16: each layer must give exactly our weight rounded to fp16,
  logits within 4 fp16 ulps of the largest (as test_export_auto_round.py argues).
- an independent unpacker that follows AutoAWQ's own packing loop (``WQLinear_GEMM.from_linear``:
  nibble i of a word holds value ``[0, 2, 4, 6, 1, 3, 5, 7][i]`` of its run of eight), always run.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from test_export_auto_round import (
    assert_logits_match,
    fake_quantized,
    linear_names,
    make_checkpoint,
    tiny_model,
)

from arctl.plan import LayerPlan
from arctl.quant import dequantize
from arctl.schemes import get_scheme
from arctl_exporter.auto_awq import layer_problem
from arctl_exporter.engine import export
from arctl_exporter.errors import ExportError

transformers = pytest.importorskip("transformers")

AUTOAWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]


def autoawq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's loop, verbatim in torch: ``intweight`` ``[rows, cols]`` -> int32 ``[rows, cols / 8]``."""
    intweight = intweight.to(torch.int64)
    packed = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int64)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= intweight[:, col * 8 + AUTOAWQ_ORDER_MAP[i]] << (i * 4)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


@pytest.fixture(scope="module")
def awq_export(tmp_path_factory):
    """A mixed plan: asym and sym INT4 layers (sym written with zero point 8) and one layer in float."""
    root = tmp_path_factory.mktemp("awq")
    model = tiny_model(tie=True, seed=2)
    schemes = {name: "W4A16G32_ASYM" for name in linear_names(model, with_lm_head=False)}
    schemes["model.layers.0.mlp.up_proj"] = "W4A16G32"
    schemes["model.layers.1.self_attn.o_proj"] = "BF16"
    checkpoint, quantized = make_checkpoint(model, schemes, root / "checkpoint")
    return quantized, export(checkpoint, ["auto_awq"], root / "model")["auto_awq"]


def test_config(awq_export):
    _, out = awq_export
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "awq",
        "version": "gemm",
        "bits": 4,
        "group_size": 32,
        "zero_point": True,
        "sym": False,
        "modules_to_not_convert": ["model.layers.1.self_attn.o_proj"],
    }
    assert config["torch_dtype"] == "float16"


def test_tensors_match_autoawqs_packing(awq_export):
    quantized, out = awq_export
    tensors = load_file(str(out / "model.safetensors"))
    for name, qt in quantized.items():
        zeros = qt.zeros if qt.zeros is not None else torch.full_like(qt.scales, 8, dtype=torch.uint8)
        assert torch.equal(tensors[f"{name}.qweight"], autoawq_pack(qt.codes.t())), name
        assert torch.equal(tensors[f"{name}.qzeros"], autoawq_pack(zeros.t())), name
        assert torch.equal(tensors[f"{name}.scales"], qt.scales.t().to(torch.float16)), name
        # and the AutoAWQ reading: (code - zero) * scale per group of 32 inputs
        nibbles = torch.stack([(tensors[f"{name}.qweight"] >> (4 * i)) & 0xF for i in range(8)], dim=-1)
        codes = torch.empty_like(nibbles)
        codes[..., AUTOAWQ_ORDER_MAP] = nibbles
        codes = codes.reshape(qt.shape[1], qt.shape[0]).t().float()
        zero_nibbles = torch.stack([(tensors[f"{name}.qzeros"] >> (4 * i)) & 0xF for i in range(8)], dim=-1)
        zero = torch.empty_like(zero_nibbles)
        zero[..., AUTOAWQ_ORDER_MAP] = zero_nibbles
        zero = zero.reshape(-1, qt.shape[0]).t().repeat_interleave(32, dim=1).float()
        scale = tensors[f"{name}.scales"].t().float().repeat_interleave(32, dim=1)
        assert torch.equal((codes - zero) * scale, dequantize(qt)), name


def test_loads_with_auto_rounds_awq_loader(awq_export):
    pytest.importorskip(
        "auto_round_kernel",
        reason="auto-round's AWQ loader has no CPU backend without auto-round-lib (ARK) or GPTQModel",
    )
    quantized, out = awq_export
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
            out, quantization_config=transformers.AutoRoundConfig(backend="auto"), output_loading_info=True
        )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    modules = dict(loaded.named_modules())
    assert type(modules["model.layers.1.self_attn.o_proj"]) is torch.nn.Linear
    for name, qt in quantized.items():
        eye = torch.eye(qt.shape[1], dtype=loaded.dtype)
        with torch.no_grad():
            assert torch.equal(modules[name](eye).t(), dequantize(qt).to(loaded.dtype)), name
    assert_logits_match(
        loaded.eval(), fake_quantized(tiny_model(tie=True, seed=2), quantized), tiny_model(tie=True, seed=2)
    )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"model.layers.0.mlp.up_proj": "W8A16G32"},
            r"^model\.layers\.0\.mlp\.up_proj: W8A16G32 cannot be written as auto_awq \(INT4 only\); use auto_round",
        ),
        (
            {"model.layers.0.mlp.up_proj": "MXFP4"},
            r"^model\.layers\.0\.mlp\.up_proj: MXFP4 cannot be written as auto_awq \(INT4 only\); use compressed-tensors",
        ),
        (
            {"model.layers.0.mlp.up_proj": "FP8_DYNAMIC"},
            (
                r"^model\.layers\.0\.mlp\.up_proj: FP8_DYNAMIC cannot be written as auto_awq \(it quantizes activations; "
                r"this format stores weights only\); use compressed-tensors"
            ),
        ),
        (
            {"model.layers.0.mlp.up_proj": "W4A16C"},
            r"W4A16C cannot be written as auto_awq \(needs a group size",
        ),
        (
            {"model.layers.1.mlp.up_proj": "W4A16G64"},
            r"^model\.layers\.1\.mlp\.up_proj: group size 64 differs from 32 of model\.layers\.0\.self_attn\.q_proj",
        ),
        (
            {"lm_head": "W4A16G32"},
            r"^lm_head: W4A16G32 cannot be written as auto_awq \(AWQ quantizes no layer outside",
        ),
    ],
)
def test_what_awq_cannot_hold_is_refused(tmp_path, changes, expected):
    model = tiny_model(tie=False)
    schemes = {name: "W4A16G32" for name in linear_names(model, with_lm_head=False)}
    schemes.update(changes)
    checkpoint, _ = make_checkpoint(model, schemes, tmp_path / "checkpoint")
    with pytest.raises(ExportError, match=expected):
        export(checkpoint, ["auto_awq"], tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


@pytest.mark.parametrize("scheme", ["FP8_STATIC", "FP8_DYNAMIC", "MXFP4_A4", "MXFP8_A8", "NVFP4_A4"])
def test_activation_quantization_is_refused(scheme):
    problem = layer_problem(LayerPlan("model.layers.0.mlp.up_proj", (128, 128), get_scheme(scheme)), ["model.layers"])
    assert problem == (
        f"model.layers.0.mlp.up_proj: {scheme} cannot be written as auto_awq (it quantizes activations; "
        "this format stores weights only); use compressed-tensors"
    )
