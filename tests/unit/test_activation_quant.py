"""Activation quantization: the schemes, the math, calibration in RTN and SignRound, the checkpoint and
the evaluated model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama, tiny_tokenizer

from arctl.checkpoint import read_checkpoint, write_checkpoint
from arctl.data import CalibrationSet
from arctl.models import LoadedModel, load_checkpoint_model
from arctl.plan import LayerPlan, Plan
from arctl.quant import quantize
from arctl.quant.activations import fake_quantize_activation, runtime_mx_exponent, static_input_scale
from arctl.quant.floating import fake_quantize_mx, mx_exponent
from arctl.quant.rounding import fp8_e4m3_codes, fp8_e4m3_values
from arctl.rpc.convert import plan_to_proto
from arctl.schemes import PRESETS, ActQuant, Scheme, get_scheme
from arctl_planner.engine import plan_uniform
from arctl_tuner.config import TuneConfig, TuneConfigError
from arctl_tuner.engine import tune_model

ACT_PRESETS = ["FP8_STATIC", "FP8_DYNAMIC", "MXFP4_A4", "MXFP8_A8", "NVFP4_A4"]


# --- schemes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ACT_PRESETS)
def test_activation_presets_round_trip_by_name_and_dict(name: str) -> None:
    scheme = get_scheme(name)
    assert scheme.act is not None and scheme.name == name
    assert Scheme.from_dict(scheme.to_dict()) == scheme


def test_weight_only_schemes_keep_their_dict_without_an_act_key() -> None:
    assert "act" not in get_scheme("FP8").to_dict() and get_scheme("FP8") != get_scheme("FP8_STATIC")


@pytest.mark.parametrize(
    ("weights", "act", "message"),
    [
        (("int", 4, 32), ActQuant("mxfp", 4, 32, dynamic=True), "cannot have mxfp"),
        (("mxfp", 4, 32), ActQuant("mxfp", 8, 32, dynamic=True), "cannot have mxfp 8-bit"),
        (("nvfp", 4, 16), ActQuant("fp8", 8, 0, dynamic=False), "cannot have fp8"),
    ],
)
def test_activations_must_match_the_weight_format(weights: tuple, act: ActQuant, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Scheme(*weights, act=act)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("fp8", 8, 0, True), "per tensor static"),
        (("fp8", 8, -1, False), "per tensor static"),
        (("mxfp", 4, 32, False), "dynamic"),
        (("nvfp", 4, 16, True), "calibrated"),
        (("int", 8, 0, False), "unknown activation data type"),
    ],
)
def test_invalid_activation_settings_are_refused(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ActQuant(*args)


def test_activation_dict_with_missing_or_extra_keys_is_refused() -> None:
    data = get_scheme("FP8_STATIC").to_dict()
    data["act"] = {"dtype": "fp8", "bits": 8, "group_size": 0}
    with pytest.raises(ValueError, match="exactly the keys"):
        Scheme.from_dict(data)


# --- math ------------------------------------------------------------------------------------------


def _inputs() -> torch.Tensor:
    return torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(0)) * 3


def test_fp8_static_rounds_each_value_on_the_calibrated_grid() -> None:
    x = _inputs()
    act = PRESETS["FP8_STATIC"].act
    scale = static_input_scale(x.abs().amax(), act)
    assert torch.allclose(scale * 448, x.abs().amax())
    expected = fp8_e4m3_values(fp8_e4m3_codes(x / scale)) * scale
    assert torch.equal(fake_quantize_activation(x, act, scale), expected)
    # a value past the calibrated range saturates at 448 * scale
    assert float(fake_quantize_activation(x * 2, act, scale).abs().max()) == pytest.approx(float(448 * scale))


def test_fp8_dynamic_scales_each_token_to_its_own_max() -> None:
    x = _inputs()
    out = fake_quantize_activation(x, PRESETS["FP8_DYNAMIC"].act)
    assert torch.allclose(out.abs().amax(-1), x.abs().amax(-1))  # each token's max is exact (448 is on the grid)
    assert torch.allclose(out, x, rtol=0.07, atol=1e-6)


@pytest.mark.parametrize(("name", "bits"), [("MXFP4_A4", 4), ("MXFP8_A8", 8)])
def test_mx_activations_take_the_runtimes_exponent(name: str, bits: int) -> None:
    # groups whose amax mantissa is below 1.75 quantize as MX weights do (OCP floor rule) ...
    groups = torch.randn(6, 2, 32, generator=torch.Generator().manual_seed(1))
    amax = groups.abs().amax(-1, keepdim=True)
    low = groups * (1.5 * torch.exp2(torch.floor(torch.log2(amax))) / amax)
    x = low.reshape(6, 64)
    weight_rule = fake_quantize_mx(x, Scheme("mxfp", bits, 32))
    assert torch.equal(fake_quantize_activation(x, PRESETS[name].act), weight_rule)
    # ... from 1.75 on they take the next exponent, so nothing saturates
    high = (low * (1.875 / 1.5)).reshape(6, 64)
    exponent = runtime_mx_exponent(high.reshape(6, 2, 32), bits)
    assert torch.equal(exponent, mx_exponent(high.reshape(6, 2, 32), bits) + 1)
    # every amax is 3.75 (FP4) or 240 (E4M3) times 2**e: rounding errs at most half a grid step, 0.5 / 3.75
    # or 8 / 240 of it, where the floor rule clips it from 7.5 to 6 (0.2) or from 480 to 448 (0.067)
    grouped = high.reshape(6, 2, 32)
    error = (fake_quantize_activation(high, PRESETS[name].act).reshape(6, 2, 32) - grouped).abs()
    assert float((error / grouped.abs().amax(-1, keepdim=True)).max()) <= (0.5 / 3.75 if bits == 4 else 8 / 240) + 1e-6


def test_nvfp4_activations_use_fp4_elements_under_block_scales() -> None:
    x = _inputs()
    act = PRESETS["NVFP4_A4"].act
    global_scale = static_input_scale(x.abs().amax(), act)
    out = fake_quantize_activation(x, act, global_scale)
    blocks = out.reshape(-1, 16)
    # every block is fp4 values times one scale: at most 15 distinct magnitudes including 0
    assert all(len(torch.unique(block.abs())) <= 8 for block in blocks)
    relative = (out - x).pow(2).mean() / x.pow(2).mean()
    assert 1e-4 < float(relative) < 0.03


def test_static_activations_without_a_scale_are_refused() -> None:
    with pytest.raises(ValueError, match="calibrated input scale"):
        fake_quantize_activation(_inputs(), PRESETS["NVFP4_A4"].act)


def test_rounding_is_straight_through() -> None:
    x = _inputs().requires_grad_()
    act = PRESETS["FP8_STATIC"].act
    fake_quantize_activation(x, act, static_input_scale(2 * x.detach().abs().amax(), act)).sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x))  # inside the range
    x.grad = None
    fake_quantize_activation(x, act, static_input_scale(x.detach().abs().amax() / 2, act)).sum().backward()
    assert torch.equal(x.grad == 0, x.detach().abs() > x.detach().abs().amax() / 2)  # saturated: no gradient


# --- tuner, checkpoint, evaluation ---------------------------------------------------------------------


def _loaded() -> LoadedModel:
    return LoadedModel(tiny_llama(seed=0), tiny_tokenizer(), "tiny", "sha")


def _calibration(n: int = 8, seqlen: int = 32) -> CalibrationSet:
    ids = torch.randint(4, 512, (n, seqlen), generator=torch.Generator().manual_seed(0))
    return CalibrationSet(input_ids=ids, source="random", seed=0, mode="documents", skipped_short=0, documents_used=n)


def _first_q_proj_input_amax(loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """The first layer's input does not depend on any quantized layer: its calibrated amax is the float one."""
    seen = []
    module = loaded.model.get_submodule("model.layers.0.self_attn.q_proj")
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].abs().amax()))
    with torch.no_grad():
        for row in ids:
            loaded.model(row.unsqueeze(0))
    handle.remove()
    return torch.stack(seen).max()


def test_rtn_needs_calibration_for_static_scales(tmp_path: Path) -> None:
    loaded = _loaded()
    with pytest.raises(TuneConfigError, match="calibration"):
        tune_model(loaded, plan_uniform(loaded, get_scheme("FP8_STATIC")), tmp_path / "ckpt", TuneConfig(iters=0), None)
    # dynamic activations need none
    tune_model(loaded, plan_uniform(loaded, get_scheme("FP8_DYNAMIC")), tmp_path / "dyn", TuneConfig(iters=0), None)


@pytest.mark.parametrize("scheme", ["FP8_STATIC", "NVFP4_A4"])
def test_rtn_calibrates_static_scales_on_the_calibration_rows(scheme: str, tmp_path: Path) -> None:
    loaded = _loaded()
    calibration = _calibration()
    plan = plan_uniform(loaded, get_scheme(scheme))
    checkpoint = read_checkpoint(tune_model(loaded, plan, tmp_path / "ckpt", TuneConfig(iters=0), calibration))
    quantized = checkpoint.quantized_tensors()
    assert all(qt.input_scale is not None and float(qt.input_scale) > 0 for qt in quantized.values())
    expected = static_input_scale(_first_q_proj_input_amax(loaded, calibration.input_ids), get_scheme(scheme).act)
    assert torch.allclose(quantized["model.layers.0.self_attn.q_proj"].input_scale, expected, rtol=1e-6)
    # layers that read the same input get the same scale (runtimes fuse them)
    for block in ("model.layers.0", "model.layers.1"):
        q, k, v = (quantized[f"{block}.self_attn.{p}_proj"].input_scale for p in "qkv")
        assert torch.equal(q, k) and torch.equal(q, v)
        assert torch.equal(quantized[f"{block}.mlp.gate_proj"].input_scale, quantized[f"{block}.mlp.up_proj"].input_scale)


@pytest.mark.parametrize("scheme", ACT_PRESETS)
def test_signround_tunes_behind_quantized_activations(scheme: str, tmp_path: Path) -> None:
    loaded = _loaded()
    calibration = _calibration()
    plan = plan_uniform(loaded, get_scheme(scheme))
    config = TuneConfig(iters=20, batch_size=4, nsamples=8, seqlen=32, dtype="float32", holdout=0.0)
    checkpoint = read_checkpoint(tune_model(loaded, plan, tmp_path / "ckpt", config, calibration))
    blocks = checkpoint.metadata["blocks"]
    assert all(b["loss_after"] <= b["loss_before"] for b in blocks)
    quantized = checkpoint.quantized_tensors()
    static = get_scheme(scheme).act.static
    assert all((qt.input_scale is not None) == static for qt in quantized.values())
    if static:
        expected = static_input_scale(_first_q_proj_input_amax(loaded, calibration.input_ids), get_scheme(scheme).act)
        assert torch.allclose(quantized["model.layers.0.self_attn.q_proj"].input_scale, expected, rtol=1e-6)


def test_the_evaluated_model_quantizes_the_inputs(tmp_path: Path) -> None:
    loaded = _loaded()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    plans = {name: plan_uniform(loaded, get_scheme(name)) for name in ("NVFP4", "NVFP4_A4")}
    logits = {}
    for name, plan in plans.items():
        path = tune_model(loaded, plan, tmp_path / name, TuneConfig(iters=0), _calibration())
        with torch.no_grad():
            logits[name] = load_checkpoint_model(read_checkpoint(path))(ids).logits
    # same weights, so the difference is the inputs' quantization, and it is small but not zero
    difference = (logits["NVFP4_A4"] - logits["NVFP4"]).abs().max()
    assert 0 < float(difference) < 0.5 * float(logits["NVFP4"].abs().max())

    model = load_checkpoint_model(read_checkpoint(tmp_path / "NVFP4_A4"))
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    with torch.no_grad():
        model(ids)
    assert all(len(torch.unique(block.abs())) <= 8 for block in seen[0].reshape(-1, 16))


def test_a_checkpoint_refuses_static_layers_without_their_scale(tmp_path: Path) -> None:
    loaded = _loaded()
    plan = plan_uniform(loaded, get_scheme("FP8_STATIC"))
    layer = plan.layers[0]
    one = Plan(plan.model_id, plan.model_sha256, (layer,) + tuple(
        LayerPlan(l.name, l.shape, get_scheme("BF16"), l.fused_group) for l in plan.layers[1:]
    ))
    weight = loaded.model.get_submodule(layer.name).weight
    qt = quantize(weight, layer.scheme)
    with pytest.raises(ValueError, match="lack their calibrated input scale"):
        write_checkpoint(tmp_path / "c", one, {layer.name: qt}, {}, lambda _folder: None, {})
    write_checkpoint(tmp_path / "c", one, {layer.name: replace(qt, input_scale=torch.ones(1))}, {}, lambda _f: None, {})
    assert torch.equal(read_checkpoint(tmp_path / "c").quantized_tensors()[layer.name].input_scale, torch.ones(1))


def test_plans_carry_the_activation_settings_over_grpc() -> None:
    loaded = _loaded()
    message = plan_to_proto(plan_uniform(loaded, get_scheme("NVFP4_A4")))
    act = message.layers[0].scheme.act
    assert (act.dtype, act.bits, act.group_size, act.dynamic) == ("nvfp", 4, 16, False)
    assert not plan_to_proto(plan_uniform(loaded, get_scheme("NVFP4"))).layers[0].scheme.HasField("act")
