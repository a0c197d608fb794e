"""The Plan: JSON round trip, strict loading, atomic save."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arctl import atomic
from arctl.plan import PLAN_FORMAT, PLAN_VERSION, LayerPlan, Plan, PlanError
from arctl.schemes import get_scheme


def make_plan() -> Plan:
    return Plan(
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        model_sha256="ab" * 32,
        layers=(
            LayerPlan(
                "model.layers.0.self_attn.q_proj", (576, 576), get_scheme("W4A16G64"), "model.layers.0.qkv"
            ),
            LayerPlan(
                "model.layers.0.self_attn.k_proj", (192, 576), get_scheme("W4A16G64"), "model.layers.0.qkv"
            ),
            LayerPlan(
                "model.layers.0.self_attn.v_proj", (192, 576), get_scheme("W4A16G64"), "model.layers.0.qkv"
            ),
            LayerPlan("model.layers.0.mlp.down_proj", (576, 1536), get_scheme("W2A16G32_ASYM")),
            LayerPlan("model.layers.0.mlp.up_proj", (1536, 576), get_scheme("MXFP4")),
            LayerPlan("model.layers.0.mlp.gate_proj", (1536, 576), get_scheme("NVFP4")),
            LayerPlan("model.layers.1.self_attn.o_proj", (576, 576), get_scheme("FP8")),
            LayerPlan("lm_head", (49152, 576), get_scheme("BF16")),
        ),
        target_avg_bits=4.5,
        notes={"solver": "lagrangian", "budgets": [3.5, 4.5]},
    )


def test_json_round_trip_equality() -> None:
    plan = make_plan()
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.layers[0].shape == (576, 576)
    assert isinstance(again.layers[0].shape, tuple)
    assert again.to_json() == plan.to_json()


def test_json_content() -> None:
    plan = make_plan()
    data = json.loads(plan.to_json())
    assert data["format"] == PLAN_FORMAT == "arctl.plan"
    assert data["version"] == PLAN_VERSION == 1
    assert data["model"] == {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "sha256": "ab" * 32}
    assert data["target_avg_bits"] == 4.5
    assert data["layers"][3] == {
        "name": "model.layers.0.mlp.down_proj",
        "shape": [576, 1536],
        "scheme": {"dtype": "int", "bits": 2, "group_size": 32, "sym": False},
        "fused_group": None,
    }
    assert data["avg_bits"] == round(plan.avg_bits, 6)
    assert data["avg_bits_codes_only"] == round(plan.bits.average_codes_only, 6)
    assert data["notes"] == {"solver": "lagrangian", "budgets": [3.5, 4.5]}


def test_avg_bits_by_hand() -> None:
    plan = Plan(
        model_id="m",
        model_sha256="",
        layers=(
            LayerPlan("a", (64, 128), get_scheme("W4A16")),  # 8192 weights at 4.125
            LayerPlan("b", (64, 64), get_scheme("MXFP8")),  # 4096 weights at 8.25
        ),
    )
    # (8192 * 4.125 + 4096 * 8.25) / 12288 = (33792 + 33792) / 12288 = 5.5
    assert plan.avg_bits == 5.5
    assert plan.bits.average_codes_only == pytest.approx((8192 * 4 + 4096 * 8) / 12288)


def test_scheme_of_and_counts() -> None:
    plan = make_plan()
    assert plan.scheme_of("lm_head") == get_scheme("BF16")
    assert plan.scheme_of("model.layers.0.mlp.up_proj") == get_scheme("MXFP4")
    with pytest.raises(KeyError):
        plan.scheme_of("model.layers.9.mlp.up_proj")
    assert plan.scheme_counts() == {
        "W4A16G64": 3,
        "W2A16G32_ASYM": 1,
        "MXFP4": 1,
        "NVFP4": 1,
        "FP8": 1,
        "BF16": 1,
    }


def _data() -> dict:
    return json.loads(make_plan().to_json())


def test_version_mismatch_names_the_version() -> None:
    data = _data()
    data["version"] = 2
    with pytest.raises(PlanError) as info:
        Plan.from_dict(data)
    assert "version 2" in str(info.value)
    assert str(PLAN_VERSION) in str(info.value)


def test_missing_version_rejected() -> None:
    data = _data()
    del data["version"]
    with pytest.raises(PlanError, match="version"):
        Plan.from_dict(data)


def test_wrong_format_rejected() -> None:
    data = _data()
    data["format"] = "auto_round.layer_config"
    with pytest.raises(PlanError, match="arctl.plan"):
        Plan.from_dict(data)
    with pytest.raises(PlanError):
        Plan.from_dict([1, 2])  # type: ignore[arg-type]


def test_unknown_top_level_keys_rejected() -> None:
    data = _data()
    data["avg_bit"] = 4.4
    with pytest.raises(PlanError, match="avg_bit"):
        Plan.from_dict(data)


def test_unknown_layer_keys_rejected() -> None:
    data = _data()
    data["layers"][0]["fused_groups"] = "typo"
    with pytest.raises(PlanError) as info:
        Plan.from_dict(data)
    assert "fused_groups" in str(info.value)
    assert "model.layers.0.self_attn.q_proj" in str(info.value)


def test_unknown_scheme_keys_rejected() -> None:
    data = _data()
    data["layers"][1]["scheme"]["act_bits"] = 8
    with pytest.raises(PlanError, match="act_bits"):
        Plan.from_dict(data)


def test_invalid_scheme_rejected() -> None:
    data = _data()
    data["layers"][1]["scheme"]["bits"] = 11
    with pytest.raises(PlanError, match="malformed"):
        Plan.from_dict(data)


def test_missing_layer_field_rejected() -> None:
    data = _data()
    del data["layers"][2]["shape"]
    with pytest.raises(PlanError, match="malformed"):
        Plan.from_dict(data)


def test_tampered_avg_bits_rejected() -> None:
    data = _data()
    data["avg_bits"] = round(data["avg_bits"] - 0.25, 6)
    with pytest.raises(PlanError) as info:
        Plan.from_dict(data)
    assert "avg_bits" in str(info.value)
    data["avg_bits"] = "4.5"
    with pytest.raises(PlanError, match="avg_bits"):
        Plan.from_dict(data)


def test_tampered_layer_changes_avg_bits_and_is_rejected() -> None:
    # Changing a layer's scheme without updating avg_bits is caught.
    data = _data()
    data["layers"][3]["scheme"]["bits"] = 4
    with pytest.raises(PlanError, match="avg_bits"):
        Plan.from_dict(data)


def test_avg_bits_within_rounding_accepted_and_optional() -> None:
    data = _data()
    data["avg_bits"] = data["avg_bits"] + 5e-5
    assert Plan.from_dict(data) == make_plan()
    del data["avg_bits"]
    assert Plan.from_dict(data) == make_plan()


def test_duplicate_layer_rejected() -> None:
    data = _data()
    data["layers"].append(dict(data["layers"][4]))
    data.pop("avg_bits")
    with pytest.raises(PlanError) as info:
        Plan.from_dict(data)
    assert "model.layers.0.mlp.up_proj" in str(info.value)


def test_invalid_json_rejected() -> None:
    with pytest.raises(PlanError, match="JSON"):
        Plan.from_json('{"format": "arctl.plan", ')


def test_save_and_load(tmp_path: Path) -> None:
    plan = make_plan()
    path = tmp_path / "plans" / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan
    assert path.read_text(encoding="utf-8") == plan.to_json()
    assert sorted(p.name for p in path.parent.iterdir()) == ["plan.json"]


def test_save_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text("old content that is not a plan", encoding="utf-8")
    plan = make_plan()
    plan.save(path)
    text = path.read_text(encoding="utf-8")
    assert text == plan.to_json()
    assert text.endswith("}\n")
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_failed_save_leaves_old_file_and_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    make_plan().save(path)
    before = path.read_text(encoding="utf-8")
    bad = Plan(model_id="m", model_sha256="", layers=(), notes={"not json": object()})
    with pytest.raises(TypeError):
        bad.save(path)
    assert path.read_text(encoding="utf-8") == before
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_interrupted_rename_removes_the_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "plan.json"
    make_plan().save(path)
    before = path.read_text(encoding="utf-8")
    written: list[str] = []

    def failing_replace(src: str, dst: str) -> None:
        written.append(Path(src).read_text(encoding="utf-8"))
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    other = Plan(model_id="other", model_sha256="", layers=())
    with pytest.raises(OSError, match="disk full"):
        other.save(path)
    # The temporary file was complete when the rename was attempted, and is gone now.
    assert written == [other.to_json()]
    assert path.read_text(encoding="utf-8") == before
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="cannot read plan"):
        Plan.load(tmp_path / "absent.json")
