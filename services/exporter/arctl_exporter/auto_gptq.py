"""The ``auto_gptq`` writer: ``quant_method: gptq`` (GPTQ v1 layout, as auto-round's ``auto_gptq`` export).

Output: a Hugging Face model folder that transformers (with auto-round installed, which converts
GPTQ v1 checkpoints to its own layers), GPTQModel, vLLM and SGLang load:

- ``config.json`` with ``quantization_config`` (also written alone as ``quantize_config.json``)::

      {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": true, "desc_act": false,
       "static_groups": false, "true_sequential": false, "damp_percent": 0.01,
       "checkpoint_format": "gptq", "lm_head": false, "provider": "arctl",
       "block_name_to_quantize": "model.layers",
       "dynamic": {"+:^model\\.layers\\.0\\.mlp\\.down_proj$": {"bits": 8, "group_size": 32, "sym": true},
                   "+:^model\\.layers\\.0\\.self_attn\\.(?:q_proj|k_proj|v_proj|qkv_proj)$": {...},
                   "-:^model\\.layers\\.1\\.self_attn\\.o_proj$": {}}}

  The global scheme is the most common one inside the blocks. Every other layer gets a GPTQModel
  ``dynamic`` rule: ``+:regex`` with its bits/group_size/sym, ``-:regex`` for a layer kept in float.
  A fused group's rule also matches the fused module's name (``qkv_proj``, ``gate_up_proj``), which is
  what vLLM and SGLang match it against. ``lm_head`` is true when the output layer is quantized
  (then it has its own ``+:`` rule). No ``meta`` key: transformers refuses a GPTQ config that has one
  when converting it for auto-round (it takes it for GPTQ v2).
- ``model.safetensors``: per quantized layer ``qweight`` int32 ``[in*bits/32, out]``, ``qzeros``
  int32 ``[groups, out*bits/32]`` holding ``zp - 1`` (symmetric codes: ``2**(bits-1) - 1``),
  ``scales`` fp16 ``[groups, out]``, ``g_idx`` int32 ``[in]`` = ``i // group_size``; every other
  tensor in fp16, as GPTQ kernels expect (auto-round's export does the same).

GPTQ v1 stores ``zp - 1``: an asymmetric group whose zero point is 0 cannot be written (the -1 would
wrap into the neighbouring values); such a layer is refused with the formats that can hold it.

Before the rename the folder is read back with an independent reader (safetensors' numpy API and a
bit-by-bit unpacker): every layer must dequantize to exactly the checkpoint's values, ``g_idx`` must
be the identity grouping, and the config must resolve every layer to its planned scheme under
GPTQModel's ``dynamic`` rules (first match wins).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arctl.atomic import atomic_directory
from arctl.checkpoint import QuantizedCheckpoint
from arctl.plan import LayerPlan, Plan
from arctl.quant import QuantizedTensor, dequantize
from arctl.schemes import PER_CHANNEL, Scheme
from arctl_exporter import hf_folder, packing
from arctl_exporter.auto_round import sharded_plan_problems
from arctl_exporter.errors import ExportError, ExportVerificationError, join_problems

FORMAT_NAME = "auto_gptq"
QUANT_METHOD = "gptq"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
PACK_MULTIPLE = 32


def layer_problem(layer: LayerPlan) -> str | None:
    """Why ``layer`` cannot be written as GPTQ, or None if its plan can be (its data is checked apart)."""
    scheme = layer.scheme
    if not scheme.quantized:
        return None
    out_features, in_features = layer.shape
    head = f"{layer.name}: {scheme.name} cannot be written as {FORMAT_NAME}"
    if scheme.act is not None:
        return f"{head} (it quantizes activations; this format stores weights only); use compressed-tensors"
    if scheme.dtype != "int":
        return f"{head} (INT only); use compressed-tensors"
    if scheme.bits not in packing.SUPPORTED_BITS:
        return f"{head} (INT 2/3/4/8 only); use compressed-tensors or gguf"
    if not scheme.fits(in_features):
        return f"{head} (group size {scheme.group_size} does not divide in_features {in_features}); plan a group size that does"
    if in_features % PACK_MULTIPLE or out_features % PACK_MULTIPLE:
        return (
            f"{head} (shape [{out_features}, {in_features}]: in and out features must be multiples of "
            f"{PACK_MULTIPLE} for int32 packing); use gguf or compressed-tensors"
        )
    return None


def data_problem(name: str, qt: QuantizedTensor) -> str | None:
    """An asymmetric layer with a zero point of 0, which GPTQ v1's ``zp - 1`` cannot store."""
    if qt.zeros is None or not bool((qt.zeros == 0).any()):
        return None
    count = int((qt.zeros == 0).sum())
    alternative = (
        "auto_awq, auto_round or compressed-tensors" if qt.scheme.bits == 4 else "compressed-tensors"
    )
    return (
        f"{name}: {qt.scheme.name} has {count} group(s) with zero point 0, which GPTQ v1 (zp - 1) cannot "
        f"store; use {alternative}"
    )


def _scheme_entry(scheme: Scheme) -> dict[str, Any]:
    return {"bits": scheme.bits, "group_size": scheme.group_size, "sym": scheme.sym}


def config_problem(layers: tuple[LayerPlan, ...]) -> str | None:
    """Why no GPTQ ``quantization_config`` can describe ``layers`` (nothing quantized, no numbered blocks), or None."""
    if not any(layer.scheme.quantized for layer in layers):
        return f"the plan quantizes no layer: nothing to write as {FORMAT_NAME}; keep the source model"
    if not hf_folder.blocks_of(layers):
        return (
            f"no planned layer lies in numbered blocks (e.g. model.layers.N): {FORMAT_NAME} needs them; "
            "use compressed-tensors"
        )
    return None


def quantization_config(layers: tuple[LayerPlan, ...], float_names: list[str]) -> dict[str, Any]:
    """The GPTQ ``quantization_config`` for a plan whose layers pass ``layer_problem``.

    ``float_names``: the checkpoint's other 2-D ``.weight`` tensors; one inside the blocks that the
    plan does not list gets a ``-:`` rule, so loaders leave it a plain Linear.
    """
    problem = config_problem(layers)
    if problem is not None:
        raise ExportError(problem)
    quantized = [layer for layer in layers if layer.scheme.quantized]
    blocks = hf_folder.blocks_of(layers)
    inside = [layer for layer in quantized if hf_folder.in_blocks(layer.name, blocks)] or quantized
    default = Counter(layer.scheme for layer in inside).most_common(1)[0][0]
    planned = {layer.name for layer in layers}
    unplanned = [
        LayerPlan(module, (0, 0), Scheme("bf16", 16, 0))
        for name in float_names
        if name.endswith(".weight")
        and (module := name.removesuffix(".weight")) not in planned
        and hf_folder.in_blocks(module, blocks)
    ]
    # a rule for every layer off the default inside the blocks, and for every quantized one outside
    # them (lm_head: the global scheme applies inside block_name_to_quantize only)
    overridden = [
        layer
        for layer in (*layers, *unplanned)
        if (layer.scheme.quantized and (layer.scheme != default or not hf_folder.in_blocks(layer.name, blocks)))
        or (not layer.scheme.quantized and hf_folder.in_blocks(layer.name, blocks))
    ]
    dynamic: dict[str, dict[str, Any]] = {}
    for pattern, members in hf_folder.unit_patterns(overridden):
        scheme = members[0].scheme
        dynamic[f"+:{pattern}" if scheme.quantized else f"-:{pattern}"] = (
            _scheme_entry(scheme) if scheme.quantized else {}
        )
    config: dict[str, Any] = {
        "quant_method": QUANT_METHOD,
        **_scheme_entry(default),
        "desc_act": False,
        "static_groups": False,
        "true_sequential": False,
        "damp_percent": 0.01,
        "checkpoint_format": "gptq",
        "lm_head": any(not hf_folder.in_blocks(layer.name, blocks) for layer in quantized),
        "provider": "arctl",
        "block_name_to_quantize": ",".join(blocks),
    }
    if dynamic:
        config["dynamic"] = dynamic
    return config


def resolve(qconfig: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The scheme GPTQModel/vLLM give layer ``name`` (first matching ``dynamic`` rule, else the global
    scheme inside the blocks); None = left in float."""
    default = {key: qconfig[key] for key in ("bits", "group_size", "sym")}
    for key, override in qconfig.get("dynamic", {}).items():
        sign, pattern = key[:2], key[2:]
        if re.match(pattern, name):
            return None if sign == "-:" else {**default, **override}
    blocks = str(qconfig.get("block_name_to_quantize", "")).split(",")
    return default if hf_folder.in_blocks(name, blocks) else None


def _packed(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    bits = qt.scheme.bits
    out_features, in_features = qt.shape
    groups = int(qt.scales.shape[1])
    zeros = qt.zeros if qt.zeros is not None else packing.sym_zeros(bits, out_features, groups)
    width = in_features if qt.scheme.group_size == PER_CHANNEL else qt.scheme.group_size
    return {
        "qweight": packing.pack_qweight(qt.codes, bits),
        "qzeros": packing.pack_qzeros(zeros, bits),
        "scales": qt.scales.to(torch.float16).t().contiguous(),
        "g_idx": (torch.arange(in_features, dtype=torch.int32) // width).to(torch.int32),
    }


def _np_dequantize(arrays: dict[str, np.ndarray], bits: int) -> np.ndarray:
    """float32 ``[out, in]`` = (code - (stored zero + 1)) * scale, grouped by ``g_idx``."""
    codes = hf_folder.np_unpack_stream(arrays["qweight"].T, bits)  # [out, in]
    zeros = hf_folder.np_unpack_stream(arrays["qzeros"], bits) + 1  # [groups, out]
    group = arrays["g_idx"].astype(np.int64)
    zero_full = zeros.T[:, group].astype(np.float32)
    scale_full = arrays["scales"].T[:, group].astype(np.float32)
    return (codes.astype(np.float32) - zero_full) * scale_full


def verify_folder(
    folder: Path,
    checkpoint: QuantizedCheckpoint,
    quantized: dict[str, QuantizedTensor],
    layout: hf_folder.FloatLayout,
) -> None:
    def fail(message: str) -> None:
        raise ExportVerificationError(f"{folder.name}: {message}")

    config = hf_folder.read_json(folder / "config.json")
    qconfig = config.get("quantization_config", {})
    if (
        qconfig.get("quant_method") != QUANT_METHOD
        or hf_folder.read_json(folder / QUANTIZE_CONFIG_FILE) != qconfig
    ):
        fail("config.json and quantize_config.json lack the same gptq quantization_config")
    for layer in checkpoint.plan.layers:
        expected = _scheme_entry(layer.scheme) if layer.scheme.quantized else None
        if (resolved := resolve(qconfig, layer.name)) != expected:
            fail(f"config resolves {layer.name} to {resolved}, the plan says {expected}")
    parts = ("qweight", "qzeros", "scales", "g_idx")
    expected_keys = set(layout.keys) | {f"{name}.{part}" for name in quantized for part in parts}
    if (keys := hf_folder.tensor_keys(folder)) != expected_keys:
        fail(
            f"tensor names differ: missing {sorted(expected_keys - keys)[:3]}, extra {sorted(keys - expected_keys)[:3]}"
        )
    for name, qt in quantized.items():
        read = hf_folder.read_tensors(folder, [f"{name}.{part}" for part in parts])
        arrays = {part: read[f"{name}.{part}"] for part in parts}
        dtypes = tuple(str(arrays[part].dtype) for part in parts)
        if dtypes != ("int32", "int32", "float16", "int32"):
            fail(f"{name}: dtypes {dtypes}, expected int32/int32/float16/int32")
        width = qt.shape[1] if qt.scheme.group_size == PER_CHANNEL else qt.scheme.group_size
        if not np.array_equal(arrays["g_idx"], np.arange(qt.shape[1]) // width):
            fail(f"{name}: g_idx is not i // group_size")
        got = _np_dequantize(arrays, qt.scheme.bits)
        if got.shape != qt.shape or not np.array_equal(got, dequantize(qt).numpy()):
            fail(f"{name}: packed weights do not dequantize to the checkpoint's values")
    hf_folder.verify_float_tensors(folder, checkpoint, layout)


class AutoGptqWriter:
    """``auto_gptq`` format: GPTQ v1 (INT 2/3/4/8, sym or asym, per-layer schemes in ``dynamic``)."""

    name = FORMAT_NAME
    description = "quant_method gptq (GPTQ v1: qweight/qzeros zp-1/scales/g_idx), per-layer rules in dynamic"
    dtypes = ("int",)
    int_bits = (2, 3, 4, 8)
    runtimes = ("transformers", "vllm", "sglang")

    def plan_problems(self, plan: Plan) -> list[str]:
        """Every layer (and fused group) of ``plan`` this format cannot hold; else why no config can describe it."""
        return sharded_plan_problems(plan.layers, layer_problem, config_problem)

    def check(self, checkpoint: QuantizedCheckpoint) -> None:
        """Raise ExportError listing every layer this format cannot hold (plan, then data)."""
        join_problems(self.plan_problems(checkpoint.plan))
        quantized = checkpoint.quantized_tensors()
        join_problems([problem for name, qt in quantized.items() if (problem := data_problem(name, qt))])

    def write(self, checkpoint: QuantizedCheckpoint, out_dir: Path) -> Path:
        """Write, verify and rename into ``out_dir``; on any failure nothing is left behind."""
        self.check(checkpoint)
        layers = checkpoint.plan.layers
        quantized = checkpoint.quantized_tensors()
        blocks = hf_folder.blocks_of(layers)
        layout = hf_folder.float_layout(checkpoint, quantized, blocks, cast=torch.float16)
        tensors = hf_folder.float_tensors(checkpoint, layout)
        qconfig = quantization_config(layers, [key for key, tensor in tensors.items() if tensor.dim() == 2])
        for name, qt in quantized.items():
            tensors.update({f"{name}.{part}": tensor for part, tensor in _packed(qt).items()})
        config = {**layout.config, "quantization_config": qconfig}
        out_dir = Path(out_dir)
        with atomic_directory(out_dir) as tmp:
            hf_folder.save_folder(tmp, checkpoint, tensors, config, {QUANTIZE_CONFIG_FILE: qconfig})
            verify_folder(tmp, checkpoint, quantized, layout)
        return out_dir
