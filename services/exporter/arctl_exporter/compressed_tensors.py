"""The ``compressed-tensors`` writer: ``quant_method: compressed-tensors`` (the llm-compressor format that
vLLM and SGLang load for INT, MX, NV and FP8 weights, and transformers decompresses).

Output: a Hugging Face model folder. ``config.json`` gets::

    {"quant_method": "compressed-tensors", "format": "mixed-precision" | <the one format>,
     "quantization_status": "compressed", "version": "0.20.0", "provider": "arctl",
     "config_groups": {"group_0": {"targets": ["model.layers.0.mlp.down_proj", ...],
                                   "weights": {"num_bits": 4, "type": "int", "symmetric": true,
                                               "group_size": 32, "strategy": "group", "dynamic": false},
                                   "input_activations": null (or the preset's args, below),
                                   "output_activations": null,
                                   "format": "pack-quantized"}, ...},
     "ignore": ["lm_head", "model.layers.1.self_attn.o_proj"], "kv_cache_scheme": null}

One config group per distinct scheme, its ``targets`` the explicit module names (never the class name
``Linear``, which made vLLM unpack mixed checkpoints with one group's layout). ``ignore`` lists every
other linear weight: vLLM refuses a Linear that no group targets and ``ignore`` does not name.

Per quantized layer (``out``/``in`` = out_features/in_features):

| scheme | format | tensors |
|---|---|---|
| INT b-bit, sym/asym, group or channel | ``pack-quantized`` | ``weight_packed`` int32 ``[out, in*b/32]`` (dense little-endian stream of ``q + 2**(b-1)``, i.e. our unsigned codes), ``weight_scale`` fp16 ``[out, groups]``, ``weight_shape`` int64 ``[2]``; asym: ``weight_zero_point`` int32 ``[out*b/32, groups]`` (the stream of ``zp_signed + 2**(b-1)`` packed along out = our unsigned zeros) |
| MXFP4 | ``mxfp4-pack-quantized`` | ``weight_packed`` uint8 ``[out, in/2]`` (E2M1, element 2i low nibble), ``weight_scale`` uint8 E8M0 ``[out, in/32]`` |
| MXFP8 | ``mxfp8-quantized`` | ``weight`` float8_e4m3fn ``[out, in]``, ``weight_scale`` uint8 E8M0 ``[out, in/32]`` |
| NVFP4 | ``nvfp4-pack-quantized`` | ``weight_packed`` uint8 ``[out, in/2]``, ``weight_scale`` float8_e4m3fn ``[out, in/16]``, ``weight_global_scale`` fp32 ``[1]`` (value = fp4 * scale / global) |
| FP8 (per channel) | ``float-quantized`` | ``weight`` float8_e4m3fn ``[out, in]``, ``weight_scale`` fp32 ``[out, 1]`` |

Every other tensor keeps the checkpoint's dtype.

Activation quantization (``Scheme.act``; one group per scheme, so FP8 and FP8_STATIC are two groups)
goes into the group's ``input_activations``, the ``model_dump(mode="json")`` of compressed-tensors'
own preset, and a calibrated scale into one more tensor per layer:

| scheme | ``input_activations`` (preset) | tensor |
|---|---|---|
| FP8_STATIC | ``FP8``: float 8, ``tensor``, ``dynamic: false``, observer ``static_minmax`` | ``input_scale`` fp32 ``[1]``, our ``input_scale`` (``amax / 448``; input = e4m3(x / s) * s) |
| FP8_DYNAMIC | ``FP8_DYNAMIC``: float 8, ``token``, ``dynamic: true`` | none |
| NVFP4_A4 | ``NVFP4``: float 4, ``tensor_group`` 16, ``dynamic: "local"``, scale_dtype E4M3 | ``input_global_scale`` fp32 ``[1]``, our ``input_scale`` as is (``448 * 6 / amax``, value = fp4 * scale / global: compressed-tensors' convention too) |
| MXFP4_A4, MXFP8_A8 | ``MXFP4`` / ``MXFP8``: float 4/8, ``group`` 32, ``dynamic: true``, scale_dtype uint8 | none |

The weights keep their rows above (FP8: per channel, where the ``FP8`` preset has one scale per
tensor; vLLM runs channel weights with static per-tensor inputs). Runtimes compute the dynamic scales
themselves, and arctl's fake quantization of activations computes what compressed-tensors' does (the
tests compare logits), MX included: the group's amax is rounded to one mantissa bit before its
exponent is taken (``arctl.quant.activations.runtime_mx_exponent``).

The layers of a fused group (q/k/v, gate/up) must share one scheme, NVFP4 ones one global scale, and
static-activation ones one input scale: vLLM and SGLang run the group as one module.

Before the rename the folder is read back with an independent numpy reader (bit-by-bit unpacking,
E2M1/E4M3/E8M0 decoded by arithmetic): every layer must give exactly ``dequantize`` of the checkpoint,
every group's ``input_activations`` must be its scheme's, and every calibrated input scale must be the
checkpoint's, bit for bit.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from arctl.atomic import atomic_directory
from arctl.checkpoint import QuantizedCheckpoint
from arctl.plan import LayerPlan, Plan
from arctl.quant import QuantizedTensor, dequantize
from arctl.schemes import PER_CHANNEL, ActQuant, Scheme
from arctl_exporter import hf_folder, packing
from arctl_exporter.auto_round import sharded_plan_problems, with_group_lead
from arctl_exporter.errors import ExportError, ExportVerificationError, join_problems

FORMAT_NAME = "compressed-tensors"
QUANT_METHOD = "compressed-tensors"
# The compressed-tensors release whose layouts this writer reproduces (and is tested with).
CT_VERSION = "0.20.0"
MIXED = "mixed-precision"
_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)


def format_of(scheme: Scheme) -> str:
    return {
        "int": "pack-quantized",
        "mxfp": "mxfp4-pack-quantized" if scheme.bits == 4 else "mxfp8-quantized",
        "nvfp": "nvfp4-pack-quantized",
        "fp8": "float-quantized",
    }[scheme.dtype]


def weight_args(scheme: Scheme) -> dict[str, Any]:
    """compressed-tensors' ``QuantizationArgs`` of a scheme, as its ``model_dump(mode="json")`` writes them."""
    if scheme.dtype == "int":
        channel = scheme.group_size == PER_CHANNEL
        return {
            "num_bits": scheme.bits,
            "type": "int",
            "symmetric": scheme.sym,
            "group_size": None if channel else scheme.group_size,
            "strategy": "channel" if channel else "group",
            "dynamic": False,
        }
    if scheme.dtype == "fp8":
        return {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "group_size": None,
            "strategy": "channel",
            "dynamic": False,
        }
    if scheme.dtype == "nvfp":
        return {
            "num_bits": 4,
            "type": "float",
            "symmetric": True,
            "group_size": 16,
            "strategy": "tensor_group",
            "dynamic": False,
            "scale_dtype": "torch.float8_e4m3fn",
        }
    return {
        "num_bits": scheme.bits,
        "type": "float",
        "symmetric": True,
        "group_size": 32,
        "strategy": "group",
        "dynamic": False,
        "scale_dtype": "torch.uint8",
    }


def input_args(act: ActQuant | None) -> dict[str, Any] | None:
    """The group's ``input_activations``: the ``model_dump(mode="json")`` of compressed-tensors' presets
    ``FP8`` (static per tensor), ``FP8_DYNAMIC`` (per token), ``NVFP4`` (``"local"``: E4M3 scales per 16
    at run time under a stored global scale), ``MXFP4`` / ``MXFP8`` (E8M0 scales per 32 at run time)."""
    if act is None:
        return None
    if act.dtype == "fp8":
        args: dict[str, Any] = {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "group_size": None,
            "strategy": "token" if act.dynamic else "tensor",
            "dynamic": act.dynamic,
        }
        return args if act.dynamic else {**args, "observer": "static_minmax"}
    if act.dtype == "nvfp":
        return {
            "num_bits": 4,
            "type": "float",
            "symmetric": True,
            "group_size": 16,
            "strategy": "tensor_group",
            "dynamic": "local",
            "scale_dtype": "torch.float8_e4m3fn",
            "observer": "static_minmax",
        }
    return {
        "num_bits": act.bits,
        "type": "float",
        "symmetric": True,
        "group_size": 32,
        "strategy": "group",
        "dynamic": True,
        "scale_dtype": "torch.uint8",
    }


def input_part(scheme: Scheme) -> str | None:
    """The tensor holding a layer's calibrated activation scale, or None (no static activations)."""
    if scheme.act is None or scheme.act.dynamic:
        return None
    return "input_global_scale" if scheme.act.dtype == "nvfp" else "input_scale"


def layer_problem(layer: LayerPlan) -> str | None:
    scheme = layer.scheme
    if not scheme.quantized:
        return None
    out_features, in_features = layer.shape
    head = f"{layer.name}: {scheme.name} cannot be written as {FORMAT_NAME}"
    if not scheme.fits(in_features):
        return f"{head} (group size {scheme.group_size} does not divide in_features {in_features}); plan a group size that does"
    if scheme.dtype == "int":
        if (in_features * scheme.bits) % 32:
            return f"{head} (in_features {in_features} x {scheme.bits} bits does not fill whole int32 words); use gguf"
        if not scheme.sym and (out_features * scheme.bits) % 32:
            return f"{head} (out_features {out_features} x {scheme.bits} bits does not fill the zero-point words); use gguf"
    return None


def nvfp4_fused_problems(layers: tuple[LayerPlan, ...], quantized: dict[str, QuantizedTensor]) -> list[str]:
    """NVFP4 layers of one fused group whose global scales differ."""
    problems = []
    for layer, lead in with_group_lead(layers, lambda layer: layer.scheme.dtype == "nvfp"):
        mine, theirs = quantized[layer.name].global_scale, quantized[lead.name].global_scale
        if mine is not None and theirs is not None and not torch.equal(mine, theirs):
            problems.append(
                f"{layer.name}: NVFP4 global scale {float(mine[0]):.6g} differs from {float(theirs[0]):.6g} of "
                f"{lead.name} in fused group {layer.fused_group}; vLLM and SGLang run the group with one global "
                "scale: quantize the group with a shared global scale, or use auto_round (INT) or gguf"
            )
    return problems


def input_scale_fused_problems(layers: tuple[LayerPlan, ...], quantized: dict[str, QuantizedTensor]) -> list[str]:
    """Layers with static activations of one fused group whose calibrated input scales differ (or are missing)."""
    static = [layer for layer in layers if input_part(layer.scheme) is not None]
    calibrated = [layer for layer in static if quantized[layer.name].input_scale is not None]
    lead_of = {layer.name: lead for layer, lead in with_group_lead(calibrated)}
    problems = []
    for layer in static:
        mine = quantized[layer.name].input_scale
        if mine is None:
            problems.append(
                f"{layer.name}: {layer.scheme.name} has no calibrated input scale; re-run the tuner with calibration data"
            )
            continue
        if layer.name not in lead_of:
            continue
        lead = lead_of[layer.name]
        theirs = quantized[lead.name].input_scale
        assert theirs is not None
        if not torch.equal(mine, theirs):
            alternative = ", or use FP8_DYNAMIC" if layer.scheme.dtype == "fp8" else ""
            problems.append(
                f"{layer.name}: {layer.scheme.name} input scale {float(mine[0]):.6g} differs from {float(theirs[0]):.6g} "
                f"of {lead.name} in fused group {layer.fused_group}; vLLM and SGLang quantize the group's shared "
                f"input once with one scale: calibrate the group's layers together{alternative}"
            )
    return problems


def config_problem(layers: tuple[LayerPlan, ...]) -> str | None:
    """Why no ``quantization_config`` can describe ``layers`` (nothing quantized), or None."""
    if not any(layer.scheme.quantized for layer in layers):
        return f"the plan quantizes no layer: nothing to write as {FORMAT_NAME}; keep the source model"
    return None


def quantization_config(layers: tuple[LayerPlan, ...], float_names: list[str]) -> dict[str, Any]:
    """The ``quantization_config``: one group per scheme (most common first), ``ignore`` the rest."""
    problem = config_problem(layers)
    if problem is not None:
        raise ExportError(problem)
    quantized = [layer for layer in layers if layer.scheme.quantized]
    order = [scheme for scheme, _ in Counter(layer.scheme for layer in quantized).most_common()]
    groups: dict[str, Any] = {}
    for index, scheme in enumerate(order):
        groups[f"group_{index}"] = {
            "targets": [layer.name for layer in quantized if layer.scheme == scheme],
            "weights": weight_args(scheme),
            "input_activations": input_args(scheme.act),
            "output_activations": None,
            "format": format_of(scheme),
        }
    ignore = [layer.name for layer in layers if not layer.scheme.quantized]
    planned = {layer.name for layer in layers}
    ignore += [
        module
        for name in float_names
        if name.endswith(".weight") and (module := name.removesuffix(".weight")) not in planned
    ]
    if "lm_head" not in planned and "lm_head" not in ignore:
        ignore.append("lm_head")  # tied to the embeddings, or not listed: never quantized
    formats = {group["format"] for group in groups.values()}
    return {
        "quant_method": QUANT_METHOD,
        "format": formats.pop() if len(formats) == 1 else MIXED,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "version": CT_VERSION,
        "provider": "arctl",
    }


def _pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 nibbles uint8 ``[out, in]`` -> uint8 ``[out, in/2]``, element 2i in the low nibble."""
    return (codes[:, 0::2] & 0xF) | ((codes[:, 1::2] & 0xF) << 4)


def part_names(qt: QuantizedTensor) -> tuple[str, ...]:
    """The tensors a layer gets (``_tensors``' keys), without packing anything."""
    dtype = qt.scheme.dtype
    if dtype == "int":
        return ("weight_packed", "weight_scale", "weight_shape") + (
            ("weight_zero_point",) if qt.zeros is not None else ()
        )
    if dtype == "nvfp":
        return ("weight_packed", "weight_scale", "weight_global_scale")
    if dtype == "fp8" or qt.scheme.bits == 8:
        return ("weight", "weight_scale")
    return ("weight_packed", "weight_scale")


def input_tensors(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """``{"input_scale" | "input_global_scale": float32 [1]}`` for static activations, else empty.
    compressed-tensors' ``input_global_scale`` has our convention (``448 * 6 / amax``): stored as is."""
    part = input_part(qt.scheme)
    if part is None:
        return {}
    if qt.input_scale is None:
        raise ExportError(f"a {qt.scheme.name} layer has no calibrated input scale; re-run the tuner with calibration data")
    return {part: qt.input_scale.float().reshape(1).contiguous()}


def _tensors(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    return {**_weight_tensors(qt), **input_tensors(qt)}


def _weight_tensors(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    scheme = qt.scheme
    if scheme.dtype == "int":
        result = {
            "weight_packed": packing.pack_stream(qt.codes, scheme.bits),
            "weight_scale": qt.scales.to(torch.float16).contiguous(),
            "weight_shape": torch.tensor(qt.shape, dtype=torch.int64),
        }
        if qt.zeros is not None:
            result["weight_zero_point"] = packing.pack_stream(qt.zeros.t(), scheme.bits).t().contiguous()
        return result
    if scheme.dtype == "fp8":
        return {"weight": qt.codes.view(torch.float8_e4m3fn), "weight_scale": qt.scales.float().contiguous()}
    if scheme.dtype == "nvfp":
        if qt.global_scale is None:
            raise ExportError(
                f"an NVFP4 layer of shape {list(qt.shape)} has no global scale; re-run the tuner"
            )
        return {
            "weight_packed": _pack_fp4(qt.codes),
            "weight_scale": qt.scales.to(torch.float8_e4m3fn).contiguous(),
            "weight_global_scale": qt.global_scale.float().reshape(1),
        }
    if scheme.bits == 4:
        return {"weight_packed": _pack_fp4(qt.codes), "weight_scale": qt.scales.to(torch.uint8).contiguous()}
    return {
        "weight": qt.codes.view(torch.float8_e4m3fn),
        "weight_scale": qt.scales.to(torch.uint8).contiguous(),
    }


# --- verification (independent reader) ------------------------------------------------------------------


def _np_e2m1(nibbles: np.ndarray) -> np.ndarray:
    magnitude = _E2M1[nibbles & 7]
    return np.where(nibbles & 8, -magnitude, magnitude).astype(np.float32)


def _np_e4m3(bits: np.ndarray) -> np.ndarray:
    """float8_e4m3fn bit patterns -> float32 by arithmetic (no NaN codes are ever written)."""
    bits = bits.astype(np.int64)
    exponent, mantissa = (bits >> 3) & 0xF, bits & 7
    magnitude = np.where(
        exponent == 0, np.ldexp(mantissa.astype(np.float64), -9), np.ldexp(1.0 + mantissa / 8.0, exponent - 7)
    )
    return np.where(bits & 0x80, -magnitude, magnitude).astype(np.float32)


def _np_unpack_fp4(packed: np.ndarray) -> np.ndarray:
    out = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2], out[:, 1::2] = packed & 0xF, packed >> 4
    return out


def _np_grouped(values: np.ndarray, per_group: np.ndarray) -> np.ndarray:
    """Broadcast ``per_group`` ``[out, groups]`` over ``values`` ``[out, in]``."""
    width = values.shape[1] // per_group.shape[1]
    return np.repeat(per_group, width, axis=1)


def np_dequantize(arrays: dict[str, np.ndarray], scheme: Scheme, shape: tuple[int, int]) -> np.ndarray:
    """float32 ``[out, in]`` from the written arrays alone."""
    if scheme.dtype == "int":
        codes = hf_folder.np_unpack_stream(arrays["weight_packed"], scheme.bits).astype(np.float32)
        scale = arrays["weight_scale"].astype(np.float32)
        if "weight_zero_point" in arrays:
            zeros = hf_folder.np_unpack_stream(arrays["weight_zero_point"].T, scheme.bits).T.astype(
                np.float32
            )
        else:
            zeros = np.full_like(scale, float(1 << (scheme.bits - 1)))
        return (codes - _np_grouped(codes, zeros)) * _np_grouped(codes, scale)
    if scheme.dtype == "fp8":
        return _np_e4m3(arrays["weight"].view(np.uint8)) * arrays["weight_scale"].astype(np.float32)
    if scheme.dtype == "nvfp":
        values = _np_e2m1(_np_unpack_fp4(arrays["weight_packed"]))
        scale = _np_e4m3(arrays["weight_scale"].view(np.uint8))
        return (values * _np_grouped(values, scale)) / arrays["weight_global_scale"].astype(np.float32)
    values = (
        _np_e2m1(_np_unpack_fp4(arrays["weight_packed"]))
        if scheme.bits == 4
        else _np_e4m3(arrays["weight"].view(np.uint8))
    )
    exponent = arrays["weight_scale"].astype(np.int64) - 127
    return values * _np_grouped(values, np.ldexp(np.float32(1.0), exponent).astype(np.float32))


def _read_array(handle: Any, key: str) -> np.ndarray:
    """safetensors' numpy API has no float8: read those as their bytes."""
    tensor = handle.get_tensor(key)
    return tensor.view(torch.uint8).numpy() if tensor.dtype == torch.float8_e4m3fn else tensor.numpy()


def verify_folder(
    folder: Path,
    checkpoint: QuantizedCheckpoint,
    quantized: dict[str, QuantizedTensor],
    layout: hf_folder.FloatLayout,
) -> None:
    def fail(message: str) -> None:
        raise ExportVerificationError(f"{folder.name}: {message}")

    qconfig = hf_folder.read_json(folder / "config.json").get("quantization_config", {})
    if qconfig.get("quant_method") != QUANT_METHOD:
        fail("config.json lacks the compressed-tensors quantization_config")
    targets = {
        target: group
        for group in qconfig.get("config_groups", {}).values()
        for target in group.get("targets", [])
    }
    for layer in checkpoint.plan.layers:
        group = targets.get(layer.name)
        if layer.scheme.quantized and (
            group is None
            or group["weights"] != weight_args(layer.scheme)
            or group.get("input_activations") != input_args(layer.scheme.act)
            or group["format"] != format_of(layer.scheme)
        ):
            fail(f"{layer.name} is not targeted by a group of its scheme {layer.scheme.name}")
        if not layer.scheme.quantized and (group is not None or layer.name not in qconfig.get("ignore", [])):
            fail(f"{layer.name} (kept in float) is targeted or not ignored")
    expected_keys = set(layout.keys)
    for name, qt in quantized.items():
        expected_keys |= {f"{name}.{part}" for part in part_names(qt)}
        if (part := input_part(qt.scheme)) is not None:
            expected_keys.add(f"{name}.{part}")
    if (keys := hf_folder.tensor_keys(folder)) != expected_keys:
        fail(
            f"tensor names differ: missing {sorted(expected_keys - keys)[:3]}, extra {sorted(keys - expected_keys)[:3]}"
        )
    with safe_open(str(folder / hf_folder.MODEL_FILE), framework="pt") as handle:
        for name, qt in quantized.items():
            arrays = {part: _read_array(handle, f"{name}.{part}") for part in part_names(qt)}
            got = np_dequantize(arrays, qt.scheme, qt.shape)
            if got.shape != qt.shape or not np.array_equal(got, dequantize(qt).numpy()):
                fail(f"{name}: written tensors do not dequantize to the checkpoint's values")
            if (part := input_part(qt.scheme)) is not None:
                scale = _read_array(handle, f"{name}.{part}")
                want = qt.input_scale.float().reshape(1).numpy()  # type: ignore[union-attr]
                if scale.dtype != np.float32 or not np.array_equal(scale, want):
                    fail(f"{name}.{part}: {scale!r} is not the checkpoint's input scale {want!r} (float32 [1])")
    hf_folder.verify_float_tensors(folder, checkpoint, layout)


class CompressedTensorsWriter:
    """``compressed-tensors`` format: INT (pack-quantized), MXFP4, MXFP8, NVFP4 and FP8 (with or without quantized
    activations), mixed allowed."""

    name = FORMAT_NAME
    description = (
        "quant_method compressed-tensors: pack-quantized INT, MXFP4, MXFP8, NVFP4, FP8, with quantized activations "
        "(FP8 static/dynamic, MX, NVFP4); one group per scheme"
    )
    dtypes = ("int", "mxfp", "nvfp", "fp8")
    int_bits = (2, 3, 4, 5, 6, 8)
    runtimes = ("transformers", "vllm", "sglang")

    def plan_problems(self, plan: Plan) -> list[str]:
        """Every layer (and fused group) of ``plan`` this format cannot hold; else why no config can describe it."""
        return sharded_plan_problems(plan.layers, layer_problem, config_problem)

    def check(self, checkpoint: QuantizedCheckpoint) -> None:
        """Raise ExportError for what the plan shows, then for what only the data shows (NVFP4 global
        scales and input scales of fused groups)."""
        join_problems(self.plan_problems(checkpoint.plan))
        layers = checkpoint.plan.layers
        nvfp4_fused = any(layer.scheme.dtype == "nvfp" and layer.fused_group for layer in layers)
        static_act = any(input_part(layer.scheme) for layer in layers)
        if nvfp4_fused or static_act:
            quantized = checkpoint.quantized_tensors()
            join_problems(nvfp4_fused_problems(layers, quantized) + input_scale_fused_problems(layers, quantized))

    def write(self, checkpoint: QuantizedCheckpoint, out_dir: Path) -> Path:
        """Write, verify and rename into ``out_dir``; on any failure nothing is left behind."""
        self.check(checkpoint)
        layers = checkpoint.plan.layers
        quantized = checkpoint.quantized_tensors()
        blocks = hf_folder.blocks_of(layers)
        layout = hf_folder.float_layout(checkpoint, quantized, blocks, cast=None)
        tensors = hf_folder.float_tensors(checkpoint, layout)
        qconfig = quantization_config(layers, [key for key, tensor in tensors.items() if tensor.dim() == 2])
        for name, qt in quantized.items():
            tensors.update({f"{name}.{part}": tensor for part, tensor in _tensors(qt).items()})
        config = {**layout.config, "quantization_config": qconfig}
        out_dir = Path(out_dir)
        with atomic_directory(out_dir) as tmp:
            hf_folder.save_folder(tmp, checkpoint, tensors, config)
            verify_folder(tmp, checkpoint, quantized, layout)
        return out_dir
