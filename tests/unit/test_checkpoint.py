"""QuantizedCheckpoint: write, read back, tied tensors, corruption and atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from arctl.checkpoint import (
    CHECKPOINT_FORMAT,
    MANIFEST,
    QUANTIZED_FILE,
    TENSORS_FILE,
    CheckpointError,
    read_checkpoint,
    sha256_file,
    unique_tensors,
    write_checkpoint,
)
from arctl.plan import LayerPlan, Plan
from arctl.quant import QuantizedTensor, dequantize, quantize
from arctl.schemes import get_scheme

QUANTIZED_LAYERS = {
    "model.layers.0.self_attn.q_proj": ("W4A16G32", (16, 64)),
    "model.layers.0.self_attn.k_proj": ("W2A16G32_ASYM", (8, 64)),
    "model.layers.0.mlp.up_proj": ("MXFP4", (32, 64)),
    "model.layers.0.mlp.gate_proj": ("MXFP8", (32, 64)),
    "model.layers.0.mlp.down_proj": ("NVFP4", (64, 32)),
    "model.layers.0.self_attn.o_proj": ("FP8", (64, 16)),
}
CONFIG = {"model_type": "llama", "hidden_size": 64, "tie_word_embeddings": True}


def make_inputs() -> tuple[Plan, dict[str, QuantizedTensor], dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    quantized = {}
    layers = []
    for name, (scheme_name, shape) in QUANTIZED_LAYERS.items():
        scheme = get_scheme(scheme_name)
        quantized[name] = quantize(torch.randn(*shape, generator=generator) * 0.05, scheme)
        layers.append(LayerPlan(name, shape, scheme))
    layers.append(LayerPlan("model.layers.0.self_attn.v_proj", (8, 64), get_scheme("BF16")))
    embed = torch.randn(100, 64, generator=generator)
    floats = {
        "model.embed_tokens.weight": embed,
        "model.layers.0.self_attn.v_proj.weight": torch.randn(8, 64, generator=generator).to(torch.bfloat16),
        "model.norm.weight": torch.ones(64),
        "model.layers.0.mlp.up_proj.bias": torch.randn(32, generator=generator).to(torch.float16),
        "lm_head.weight": embed,  # tied: the same storage
    }
    plan = Plan(model_id="tiny", model_sha256="00" * 32, layers=tuple(layers), target_avg_bits=4.0)
    return plan, quantized, floats


def write_model_files(folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps(CONFIG), encoding="utf-8")
    (folder / "tokenizer.json").write_text('{"version": "1.0"}', encoding="utf-8")


METADATA = {"method": "rtn", "iters": 0, "losses": [0.5, 0.25]}


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, Plan, dict[str, QuantizedTensor], dict[str, torch.Tensor]]:
    plan, quantized, floats = make_inputs()
    out = write_checkpoint(tmp_path / "ckpt", plan, quantized, floats, write_model_files, METADATA)
    return out, plan, quantized, floats


def test_folder_layout(written) -> None:
    out, *_ = written
    assert out.name == "ckpt"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            MANIFEST,
            QUANTIZED_FILE,
            TENSORS_FILE,
            "plan.json",
            "metadata.json",
            "config.json",
            "tokenizer.json",
        ]
    )
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["format"] == CHECKPOINT_FORMAT
    assert manifest["version"] == 1
    assert sorted(manifest["files"]) == sorted(n for n in names if n != MANIFEST)
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(out / name)
        assert entry["bytes"] == (out / name).stat().st_size
    # Nothing but the checkpoint next to it: the temporary folder was renamed.
    assert [p.name for p in out.parent.iterdir()] == ["ckpt"]


def test_read_back_equal(written) -> None:
    out, plan, quantized, floats = written
    ckpt = read_checkpoint(out)
    assert ckpt.plan == plan
    assert ckpt.config() == CONFIG
    assert ckpt.metadata["method"] == "rtn"
    assert ckpt.metadata["losses"] == [0.5, 0.25]
    assert ckpt.size_bytes() == sum(p.stat().st_size for p in out.iterdir())

    back = ckpt.quantized_tensors()
    assert set(back) == set(quantized)
    for name, qt in quantized.items():
        got = back[name]
        assert got.scheme == qt.scheme
        assert got.codes.dtype == torch.uint8
        assert torch.equal(got.codes, qt.codes)
        assert got.scales.dtype == qt.scales.dtype
        assert torch.equal(got.scales.float(), qt.scales.float())
        for part in ("zeros", "global_scale"):
            mine, theirs = getattr(qt, part), getattr(got, part)
            assert (mine is None) == (theirs is None), (name, part)
            if mine is not None:
                assert torch.equal(mine, theirs)
        assert torch.equal(dequantize(got), dequantize(qt))
    assert back["model.layers.0.mlp.down_proj"].global_scale is not None
    assert back["model.layers.0.mlp.down_proj"].scales.dtype == torch.float8_e4m3fn
    assert back["model.layers.0.self_attn.k_proj"].zeros is not None

    tensors = ckpt.float_tensors()
    assert set(tensors) == set(floats) - {"lm_head.weight"}
    for name, tensor in tensors.items():
        assert tensor.dtype == floats[name].dtype
        assert torch.equal(tensor, floats[name])


def test_tied_tensor_stored_once_with_alias(written) -> None:
    out, _, _, floats = written
    ckpt = read_checkpoint(out)
    assert ckpt.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    raw = load_file(str(out / TENSORS_FILE))
    assert "lm_head.weight" not in raw
    assert torch.equal(raw[ckpt.aliases["lm_head.weight"]], floats["lm_head.weight"])
    # The file holds the embedding once: its size is well below two copies.
    embed_bytes = floats["model.embed_tokens.weight"].numel() * 4
    assert (out / TENSORS_FILE).stat().st_size < 1.5 * embed_bytes


def test_unique_tensors_keeps_distinct_views_of_one_buffer() -> None:
    # Two rows of one buffer share storage and shape but are different tensors: both are stored.
    buffer = torch.arange(8.0).reshape(2, 4)
    kept, aliases = unique_tensors({"a": buffer[0], "b": buffer[1], "c": buffer[1], "d": buffer})
    assert aliases == {"c": "b"}
    assert kept["a"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert kept["b"].tolist() == [4.0, 5.0, 6.0, 7.0]
    assert torch.equal(kept["d"], buffer)


def test_distinct_views_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    plan, quantized, floats = make_inputs()
    fused = torch.arange(64 * 3, dtype=torch.float32).reshape(3, 64)
    floats = {**floats, "q.weight": fused[0], "k.weight": fused[1], "v.weight": fused[2]}
    out = write_checkpoint(tmp_path / "ckpt", plan, quantized, floats, write_model_files, METADATA)
    tensors = read_checkpoint(out).float_tensors()
    assert torch.equal(tensors["q.weight"], fused[0])
    assert torch.equal(tensors["k.weight"], fused[1])
    assert torch.equal(tensors["v.weight"], fused[2])


@pytest.mark.parametrize("name", [QUANTIZED_FILE, TENSORS_FILE, "plan.json", "config.json"])
def test_changed_byte_is_detected(written, name: str) -> None:
    out, *_ = written
    path = out / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(out)
    assert name in str(info.value)


def test_truncated_file_is_detected(written) -> None:
    out, *_ = written
    path = out / QUANTIZED_FILE
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=QUANTIZED_FILE):
        read_checkpoint(out)


def test_missing_file_is_detected(written) -> None:
    out, *_ = written
    (out / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        read_checkpoint(out)


def test_missing_manifest_is_detected(written) -> None:
    out, *_ = written
    (out / MANIFEST).unlink()
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(out)
    assert MANIFEST in str(info.value)


def test_wrong_manifest_format(written) -> None:
    out, *_ = written
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    manifest["format"] = "arctl.export"
    (out / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(CheckpointError, match="arctl.export"):
        read_checkpoint(out)
    (out / MANIFEST).write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="JSON"):
        read_checkpoint(out)


def test_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "absent")
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "file")


def test_failure_in_write_model_files_leaves_nothing(tmp_path: Path) -> None:
    plan, quantized, floats = make_inputs()
    parent = tmp_path / "exports"
    parent.mkdir()

    def failing(folder: Path) -> None:
        (folder / "config.json").write_text("{}", encoding="utf-8")
        raise RuntimeError("tokenizer download failed")

    with pytest.raises(RuntimeError, match="tokenizer download failed"):
        write_checkpoint(parent / "ckpt", plan, quantized, floats, failing, METADATA)
    assert list(parent.iterdir()) == []


def test_failed_overwrite_keeps_the_old_checkpoint(written) -> None:
    out, plan, quantized, floats = written
    before = (out / MANIFEST).read_text(encoding="utf-8")

    def failing(folder: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(out, plan, quantized, floats, failing, {"method": "signround"})
    assert [p.name for p in out.parent.iterdir()] == ["ckpt"]
    assert (out / MANIFEST).read_text(encoding="utf-8") == before
    assert read_checkpoint(out).metadata["method"] == "rtn"


def test_overwrite_replaces_and_cleans_up(written) -> None:
    out, plan, quantized, floats = written
    write_checkpoint(out, plan, quantized, floats, write_model_files, {"method": "signround", "iters": 200})
    assert [p.name for p in out.parent.iterdir()] == ["ckpt"]
    assert read_checkpoint(out).metadata["iters"] == 200


def test_quantized_layers_must_match_the_plan(tmp_path: Path) -> None:
    plan, quantized, floats = make_inputs()
    del quantized["model.layers.0.mlp.up_proj"]
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj"):
        write_checkpoint(tmp_path / "ckpt", plan, quantized, floats, write_model_files, METADATA)
    assert list(tmp_path.iterdir()) == []
