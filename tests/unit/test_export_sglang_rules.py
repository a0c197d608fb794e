"""auto_round exports against SGLang's rules for ``quant_method: auto-round``.

sglang cannot be imported here (no GPU build, no CUDA), so ``AutoRoundConfig.from_config`` and its
per-layer resolution cannot run: this test checks **the documented rules** of
../shared/reference/autoround.md §7 instead (``from_config`` validation, ``routing.py::get_layer_config``),
re-implemented below. When sglang is importable, ``test_sglang_parser_accepts`` runs its parser too.

Rules (§7.1, §7.2, §7.4):
- ``bits`` in {2, 3, 4, 8}; ``data_type`` "int"; ``packing_format`` in {auto_round:auto_gptq,
  auto_round:auto_awq}; ``backend`` (when present) in {auto, gptq, gptq:marlin, awq, awq:marlin, marlin}.
- per layer: an exact ``extra_config`` entry (missing keys from the global), else quantized only inside
  ``block_name_to_quantize`` and never the lm_head; regex keys (with metacharacters) by ``fullmatch``;
  ``bits >= 16`` means unquantized; every quantized layer's bits in {2, 3, 4, 8}.
- fused modules (q/k/v -> qkv_proj, gate/up -> gate_up_proj) resolve to identical configs.
- a MoE router (``mlp.gate``) stays unquantized.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from test_export_auto_round import linear_names, make_checkpoint, tiny_model

from arctl.plan import LayerPlan
from arctl.schemes import get_scheme
from arctl_exporter.auto_round import quantization_config
from arctl_exporter.engine import export

SGLANG_BITS = {2, 3, 4, 8}
SGLANG_PACKINGS = {"auto_round:auto_gptq", "auto_round:auto_awq"}
SGLANG_BACKENDS = {"auto", "gptq", "gptq:marlin", "awq", "awq:marlin", "marlin"}
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
REGEX_CHARS = set("*+?[](){}|^$\\")
KEYS = ("bits", "group_size", "sym")


def layer_config(qconfig: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    """SGLang's per-layer resolution (routing.py::get_layer_config); None = UnquantizedLinearMethod."""
    default = {key: qconfig[key] for key in KEYS}
    extra = qconfig.get("extra_config") or {}
    blocks = qconfig.get("block_name_to_quantize") or qconfig.get("to_quant_block_names")
    blocks = blocks.split(",") if isinstance(blocks, str) else (blocks or [])
    if prefix in extra:
        resolved = {**default, **{key: extra[prefix][key] for key in KEYS if key in extra[prefix]}}
    else:
        regex = [key for key in extra if REGEX_CHARS & set(key)]
        match = next((key for key in regex if re.fullmatch(key, prefix)), None)
        if match is not None:
            resolved = {**default, **{key: extra[match][key] for key in KEYS if key in extra[match]}}
        elif prefix == "lm_head" or (blocks and not any(prefix.startswith(block) for block in blocks)):
            return None
        else:
            resolved = default
    return None if int(resolved["bits"]) >= 16 else resolved


def sglang_problems(qconfig: dict[str, Any], layer_names: list[str]) -> list[str]:
    problems = []
    if qconfig.get("quant_method") != "auto-round":
        problems.append(f"quant_method {qconfig.get('quant_method')!r} is not auto-round")
    if qconfig.get("bits") not in SGLANG_BITS:
        problems.append(f"bits {qconfig.get('bits')} not in {sorted(SGLANG_BITS)}")
    if qconfig.get("data_type", "int") != "int":
        problems.append(f"data_type {qconfig.get('data_type')!r} is not int")
    if qconfig.get("packing_format", "auto_round:auto_gptq") not in SGLANG_PACKINGS:
        problems.append(f"packing_format {qconfig.get('packing_format')!r} not in {sorted(SGLANG_PACKINGS)}")
    if qconfig.get("backend", "auto") not in SGLANG_BACKENDS:
        problems.append(f"backend {qconfig.get('backend')!r} not accepted")
    for name in layer_names:
        resolved = layer_config(qconfig, name)
        if resolved is not None and int(resolved["bits"]) not in SGLANG_BITS:
            problems.append(f"{name}: {resolved['bits']} bits")
        if resolved is not None and name.endswith(".mlp.gate"):
            problems.append(f"{name}: a MoE router must stay unquantized")
    parents = {name.rpartition(".")[0] for name in layer_names}
    for parent in parents:
        for fused, parts in FUSED.items():
            members = [f"{parent}.{part}" for part in parts if f"{parent}.{part}" in layer_names]
            if (
                len(members) > 1
                and len({json.dumps(layer_config(qconfig, m), sort_keys=True) for m in members}) > 1
            ):
                problems.append(f"{parent}.{fused}: its sub-layers resolve to different configs")
    return problems


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {  # mixed bits at fused-module granularity, a float layer, a quantized lm_head
            "model.layers.0.self_attn.q_proj": "W8A16G32",
            "model.layers.0.self_attn.k_proj": "W8A16G32",
            "model.layers.0.self_attn.v_proj": "W8A16G32",
            "model.layers.1.mlp.gate_proj": "W2A16G32",
            "model.layers.1.mlp.up_proj": "W2A16G32",
            "model.layers.0.mlp.down_proj": "W3A16G64",
            "model.layers.1.self_attn.o_proj": "BF16",
            "lm_head": "W8A16G32",
        },
    ],
)
def test_auto_round_exports_follow_sglangs_documented_rules(tmp_path, changes):
    model = tiny_model(tie=False)
    names = linear_names(model, with_lm_head=True)
    schemes = {name: "W4A16G64" for name in names if name != "lm_head"}
    schemes.update(changes)
    checkpoint, _ = make_checkpoint(model, schemes, tmp_path / "checkpoint")
    out = export(checkpoint, ["auto_round"], tmp_path / "model")["auto_round"]
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert sglang_problems(qconfig, names) == []
    for name in names:  # and SGLang resolves every layer to its planned scheme
        scheme = get_scheme(schemes.get(name, "BF16"))
        expected = (
            {"bits": scheme.bits, "group_size": scheme.group_size, "sym": scheme.sym}
            if scheme.quantized
            else None
        )
        assert layer_config(qconfig, name) == expected, name


def test_the_rules_catch_what_sglang_refuses():
    base = {
        "quant_method": "auto-round",
        "packing_format": "auto_round:auto_gptq",
        "bits": 4,
        "group_size": 32,
        "sym": True,
        "data_type": "int",
        "block_name_to_quantize": "model.layers",
    }
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.gate"]
    mixed_fused = {**base, "extra_config": {"model.layers.0.self_attn.k_proj": {"bits": 8}}}
    assert sglang_problems(mixed_fused, names) == [
        "model.layers.0.mlp.gate: a MoE router must stay unquantized",
        "model.layers.0.self_attn.qkv_proj: its sub-layers resolve to different configs",
    ]
    assert sglang_problems({**base, "packing_format": "auto_round", "bits": 6}, names[:1]) == [
        "bits 6 not in [2, 3, 4, 8]",
        "packing_format 'auto_round' not in ['auto_round:auto_awq', 'auto_round:auto_gptq']",
        "model.layers.0.self_attn.q_proj: 6 bits",
    ]
    router_kept = {**base, "extra_config": {"model.layers.0.mlp.gate": {"bits": 16, "data_type": "float"}}}
    assert sglang_problems(router_kept, names) == []


def test_a_router_planned_in_float_is_marked_unquantized():
    layers = (
        LayerPlan("model.layers.0.mlp.gate", (8, 128), get_scheme("BF16")),
        LayerPlan("model.layers.0.mlp.experts.0.up_proj", (128, 128), get_scheme("W4A16G32")),
    )
    qconfig = quantization_config(layers, [])
    assert layer_config(qconfig, "model.layers.0.mlp.gate") is None
    assert sglang_problems(qconfig, [layer.name for layer in layers]) == []


def test_sglang_parser_accepts(tmp_path):
    auto_round_module = pytest.importorskip(
        "sglang.srt.layers.quantization.auto_round",
        reason="sglang is not importable here: the documented rules above stand in",
    )
    model = tiny_model(tie=True)
    schemes = {name: "W4A16G32" for name in linear_names(model, with_lm_head=False)}
    checkpoint, _ = make_checkpoint(model, schemes, tmp_path / "checkpoint")
    out = export(checkpoint, ["auto_round"], tmp_path / "model")["auto_round"]
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    config = auto_round_module.AutoRoundConfig.from_config(qconfig)
    assert config.get_name() == "auto-round"
