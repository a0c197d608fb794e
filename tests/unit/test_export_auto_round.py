"""The auto_round writer on tiny random Llama models: export, load with transformers + auto-round on
CPU, and compare with the fake-quantized model.

Tolerance. On CPU the loader's choice for ``auto_round:auto_gptq`` is ARK (``auto-round-lib``, not
installed here, and without 3-bit) or else the pure-torch ``auto_round:torch_zp`` backend; the tests
pin the latter. Its compute dtypes are fp16/bf16, so ``post_init`` casts the loaded model to float16.
Its dequantized weight is ``fp16 scale * (code - zp)`` computed in fp16 — one rounding of the exact
value — and ``assert_layers_exact`` checks it is bit-equal to ``dequantize(qt)`` rounded to fp16. What remains between the loaded model and our float32
fake-quantized model is fp16 arithmetic on activations (unit roundoff 2**-11) through two decoder
blocks: we allow 4 fp16 ulps (4 * 2**-10) relative to the largest logit. Observed: 0.4-0.7 of one
such ulp (7.5e-4 and 7.3e-4 on logits up to 1.7 and 1.05). The quantization itself moves the logits
25-50x the tolerance, and each test asserts at least 10x, so the tolerance cannot hide a wrongly
packed layer.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from arctl.checkpoint import write_checkpoint
from arctl.plan import LayerPlan, Plan
from arctl.quant import dequantize, quantize
from arctl.schemes import get_scheme
from arctl_exporter import packing
from arctl_exporter.auto_round import UNQUANTIZED, AutoRoundWriter, layer_problem
from arctl_exporter.engine import export
from arctl_exporter.errors import ExportError, ExportVerificationError
from arctl_exporter.registry import WRITERS, UnknownFormatError, get_writer

transformers = pytest.importorskip("transformers")
pytest.importorskip("auto_round")

FP16_TOLERANCE = 4 * torch.finfo(torch.float16).eps  # 4 ulps of fp16, relative to the largest logit

MIXED = {
    "model.layers.0.self_attn.k_proj": "W4A16C",  # one group per row (group_size -1)
    "model.layers.0.self_attn.q_proj": "W8A16G32",
    "model.layers.0.mlp.down_proj": "W2A16G32",
    "model.layers.1.mlp.up_proj": "W3A16G64",
    "model.layers.1.mlp.gate_proj": "W3A16G64",
    "model.layers.1.self_attn.o_proj": "BF16",
}


def tiny_model(tie: bool, seed: int = 0) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def linear_names(model: torch.nn.Module, with_lm_head: bool) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and (name.startswith("model.layers.") or with_lm_head)
    ]


def make_checkpoint(model, schemes: dict[str, str], folder: Path):
    """Quantize (RTN) the layers of ``schemes`` and write a checkpoint; return (path, quantized)."""
    modules = dict(model.named_modules())
    plan = Plan(
        model_id="tiny-llama",
        model_sha256="",
        layers=tuple(
            LayerPlan(name, tuple(modules[name].weight.shape), get_scheme(scheme))
            for name, scheme in schemes.items()
        ),
    )
    quantized = {
        layer.name: quantize(modules[layer.name].weight.detach(), layer.scheme)
        for layer in plan.layers
        if layer.scheme.quantized
    }
    float_tensors = {
        name: tensor
        for name, tensor in model.state_dict().items()
        if name.removesuffix(".weight") not in quantized
    }

    def write_model_files(target: Path) -> None:
        model.config.save_pretrained(target)
        model.generation_config.save_pretrained(target)  # no tokenizer for a tiny random model

    path = write_checkpoint(folder, plan, quantized, float_tensors, write_model_files, {"method": "rtn"})
    return path, quantized


def fake_quantized(model, quantized) -> torch.nn.Module:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, qt in quantized.items():
            modules[name].weight.copy_(dequantize(qt))
    return model


def load(folder: Path):
    backend = transformers.AutoRoundConfig(backend="auto_round:torch_zp")
    with warnings.catch_warnings():  # "loading attributes (backend) will be overwritten": intended
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=backend, output_loading_info=True
        )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model.eval()


def assert_logits_match(loaded, reference, original, vocab: int = 512) -> None:
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(ids).logits
        got = loaded(ids).logits.float()
        unquantized = original(ids).logits
    tolerance = FP16_TOLERANCE * float(want.abs().max())
    difference = float((got - want).abs().max())
    assert difference <= tolerance, f"max |logit difference| {difference:.2e} > {tolerance:.2e}"
    assert float((unquantized - want).abs().max()) > 10 * tolerance  # the tolerance is discriminating


def assert_layers_exact(loaded, quantized) -> None:
    """Each QuantLinear applied to the identity returns its dequantized weight: exactly ours in fp16."""
    modules = dict(loaded.named_modules())
    for name, qt in quantized.items():
        module = modules[name]
        assert type(module).__name__ == "QuantLinear", name
        eye = torch.eye(qt.shape[1], dtype=loaded.dtype)
        with torch.no_grad():
            weight = module(eye)  # [in, out]
        assert torch.equal(weight, dequantize(qt).t().to(loaded.dtype)), name


@pytest.fixture(scope="module")
def uniform_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("uniform")
    model = tiny_model(tie=True)
    schemes = {name: "W4A16G32" for name in linear_names(model, with_lm_head=False)}
    checkpoint, quantized = make_checkpoint(model, schemes, root / "checkpoint")
    out = export(checkpoint, ["auto_round"], root / "model")["auto_round"]
    return model, quantized, out


@pytest.fixture(scope="module")
def mixed_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    model = tiny_model(tie=False, seed=1)
    schemes = {name: MIXED.get(name, "W4A16G64") for name in linear_names(model, with_lm_head=True)}
    schemes["lm_head"] = "W8A16G32"
    checkpoint, quantized = make_checkpoint(model, schemes, root / "checkpoint")
    out = export(checkpoint, ["auto_round"], root / "model")["auto_round"]
    return model, quantized, out


def test_uniform_plan_config_and_files(uniform_export):
    _, _, out = uniform_export
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["quantization_config"] == {
        "quant_method": "auto-round",
        "packing_format": "auto_round:auto_gptq",
        "bits": 4,
        "group_size": 32,
        "sym": True,
        "data_type": "int",
        "block_name_to_quantize": "model.layers",
        "autoround_version": "0.16.1",
    }
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        q_proj = "model.layers.0.self_attn.q_proj"
        assert handle.get_tensor(f"{q_proj}.qweight").shape == (128 * 4 // 32, 128)
        assert handle.get_tensor(f"{q_proj}.qzeros").shape == (128 // 32, 128 * 4 // 32)
        assert handle.get_tensor(f"{q_proj}.scales").dtype == torch.float16
        assert handle.get_tensor("model.norm.weight").dtype == torch.float32  # kept as the checkpoint has it
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # tied: stored once
    assert not any(key.endswith(".g_idx") for key in keys)
    assert not any(key.startswith("model.layers.") and key.endswith("proj.weight") for key in keys)


def test_uniform_plan_loads_and_matches(uniform_export):
    _, quantized, out = uniform_export
    loaded = load(out)
    assert loaded.dtype == torch.float16  # auto_round:torch_zp computes in fp16/bf16 only
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_layers_exact(loaded, quantized)
    original = tiny_model(tie=True)
    assert_logits_match(loaded, fake_quantized(tiny_model(tie=True), quantized), original)


def test_mixed_plan_extra_config(mixed_export):
    _, _, out = mixed_export
    config = json.loads((out / "config.json").read_text())
    qconfig = config["quantization_config"]
    assert (qconfig["bits"], qconfig["group_size"]) == (4, 64)
    extra = qconfig["extra_config"]
    assert extra["model.layers.0.self_attn.q_proj"] == {
        "bits": 8,
        "group_size": 32,
        "sym": True,
        "data_type": "int",
    }
    assert extra["model.layers.0.mlp.down_proj"]["bits"] == 2
    assert extra["model.layers.1.mlp.up_proj"] == {
        "bits": 3,
        "group_size": 64,
        "sym": True,
        "data_type": "int",
    }
    assert extra["model.layers.1.self_attn.o_proj"] == UNQUANTIZED == {"bits": 16, "data_type": "float"}
    assert extra["lm_head"] == {
        "bits": 8,
        "group_size": 32,
        "sym": True,
        "data_type": "int",
    }  # outside the blocks
    assert extra["model.layers.0.self_attn.k_proj"]["group_size"] == -1
    assert "model.layers.0.self_attn.v_proj" not in extra  # the default scheme
    assert config["tie_word_embeddings"] is False


def test_mixed_plan_loads_and_matches(mixed_export):
    _, quantized, out = mixed_export
    loaded = load(out)
    modules = dict(loaded.named_modules())
    assert type(modules["model.layers.1.self_attn.o_proj"]) is torch.nn.Linear  # the BF16 layer
    assert modules["model.layers.1.mlp.up_proj"].bits == 3
    assert modules["lm_head"].bits == 8
    assert_layers_exact(loaded, quantized)
    assert_logits_match(
        loaded, fake_quantized(tiny_model(tie=False, seed=1), quantized), tiny_model(tie=False, seed=1)
    )


@pytest.mark.parametrize(
    ("scheme", "expected"),
    [
        (
            "MXFP4",
            r"MXFP4 cannot be written as auto_round:auto_gptq \(INT sym only\); use compressed-tensors",
        ),
        (
            "W4A16G32_ASYM",
            r"W4A16G32_ASYM cannot be written as auto_round:auto_gptq \(symmetric INT only\); use auto_awq",
        ),
        ("W6A16G32", r"W6A16G32 cannot be written .*INT 2/3/4/8 only"),
        (
            "FP8_DYNAMIC",
            (
                r"FP8_DYNAMIC cannot be written as auto_round:auto_gptq \(it quantizes activations; this format "
                r"stores weights only\); use compressed-tensors$"
            ),
        ),
    ],
)
def test_unwritable_layer_is_refused_before_writing(tmp_path, scheme, expected):
    model = tiny_model(tie=True)
    names = linear_names(model, with_lm_head=False)
    schemes = {name: "W4A16G32" for name in names}
    schemes["model.layers.0.mlp.down_proj"] = scheme
    checkpoint, _ = make_checkpoint(model, schemes, tmp_path / "checkpoint")
    with pytest.raises(ExportError, match=r"^model\.layers\.0\.mlp\.down_proj: " + expected):
        export(checkpoint, ["auto_round"], tmp_path / "model")
    assert not (tmp_path / "model").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


@pytest.mark.parametrize("scheme", ["FP8_STATIC", "FP8_DYNAMIC", "MXFP4_A4", "MXFP8_A8", "NVFP4_A4"])
def test_activation_quantization_is_refused(scheme):
    """auto-round 0.16.1 has its own FP8 / MX / NVFP layouts with activation scales, but this writer packs
    INT weights only: such layers go to compressed-tensors."""
    problem = layer_problem(LayerPlan("model.layers.0.mlp.up_proj", (128, 128), get_scheme(scheme)))
    assert problem == (
        f"model.layers.0.mlp.up_proj: {scheme} cannot be written as auto_round:auto_gptq (it quantizes "
        "activations; this format stores weights only); use compressed-tensors"
    )


def test_shapes_the_packing_cannot_hold():
    w4 = get_scheme("W4A16G32")
    assert layer_problem(LayerPlan("a.layers.0.x", (64, 128), w4)) is None
    assert "multiples of 32" in layer_problem(LayerPlan("a.layers.0.x", (48, 128), w4))
    assert "does not divide in_features 96" in layer_problem(
        LayerPlan("a.layers.0.x", (64, 96), get_scheme("W4A16G64"))
    )
    assert layer_problem(LayerPlan("a.layers.0.x", (48, 100), get_scheme("BF16"))) is None


def test_fused_group_must_share_one_scheme():
    def layer(name, scheme):
        return LayerPlan(
            f"model.layers.0.self_attn.{name}", (128, 128), get_scheme(scheme), "model.layers.0.qkv"
        )

    same = Plan("m", "", (layer("q_proj", "W4A16G32"), layer("k_proj", "W4A16G32")))
    AutoRoundWriter().check(SimpleNamespace(plan=same))
    mixed = Plan("m", "", (layer("q_proj", "W4A16G32"), layer("k_proj", "W8A16G32")))
    with pytest.raises(
        ExportError, match=r"^model\.layers\.0\.self_attn\.k_proj: W8A16G32 differs from W4A16G32"
    ):
        AutoRoundWriter().check(SimpleNamespace(plan=mixed))


def test_verification_failure_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model(tie=True)
    schemes = {name: "W4A16G32" for name in linear_names(model, with_lm_head=False)}
    checkpoint, _ = make_checkpoint(model, schemes, tmp_path / "checkpoint")
    honest = packing.pack_qweight

    def one_flipped_bit(codes, bits):
        words = honest(codes, bits).clone()
        words[0, 0] ^= 1 << 5
        return words

    monkeypatch.setattr(packing, "pack_qweight", one_flipped_bit)
    with pytest.raises(ExportVerificationError, match="do not dequantize to the checkpoint"):
        export(checkpoint, ["auto_round"], tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no folder, no temporary left

    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "keep.txt").write_text("an earlier export")
    with pytest.raises(ExportVerificationError):
        export(checkpoint, ["auto_round"], previous)
    assert [p.name for p in previous.iterdir()] == ["keep.txt"]  # an existing folder is not replaced


def test_registry_and_engine_arguments(tmp_path):
    assert get_writer("auto_round") is WRITERS["auto_round"]
    with pytest.raises(UnknownFormatError, match="valid: auto_round"):
        get_writer("gptq-ish")
    with pytest.raises(ValueError, match="twice"):
        export(tmp_path, ["auto_round", "auto_round"], tmp_path / "out")
    with pytest.raises(ValueError, match="no export format"):
        export(tmp_path, [], tmp_path / "out")
