"""The ``auto_awq`` writer: ``quant_method: awq``, GEMM version (AutoAWQ's ``WQLinear_GEMM`` layout).

Output: a Hugging Face model folder that AutoAWQ, transformers (through auto-round or GPTQModel),
vLLM and SGLang load:

- ``config.json`` with ``quantization_config``::

      {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "zero_point": true,
       "sym": false, "modules_to_not_convert": ["model.layers.1.self_attn.o_proj"]}

  AWQ has one scheme for the whole model: every quantized layer must be INT4 with the same group
  size (a positive one dividing in_features). Symmetric layers are written with the zero point 8,
  which is exactly their implicit zero (code = q + 8), so sym and asym layers mix freely and
  ``zero_point`` is always true (every AWQ kernel reads ``qzeros``). ``sym`` is what auto-round's
  loader reads to decide whether to use ``qzeros`` (it ignores ``zero_point``): false as soon as one
  layer is asymmetric. Layers kept in float are listed in ``modules_to_not_convert``;
  a quantized layer outside the blocks (``lm_head``) has no place in AWQ and is refused.
- ``model.safetensors``: per layer ``qweight`` int32 ``[in, out/8]`` (packed along out_features,
  interleaved: value k of each run of eight in nibble ``[0, 4, 1, 5, 2, 6, 3, 7][k]``), ``qzeros``
  int32 ``[in/group, out/8]`` (zero points as is, same interleave), ``scales`` fp16 ``[in/group, out]``;
  every other tensor in fp16 (AWQ kernels and auto-round's AWQ export are fp16).

Before the rename the folder is read back by an independent unpacker (AutoAWQ's own order map,
nibble by nibble, in numpy) and every layer must dequantize to exactly the checkpoint's values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from arctl.atomic import atomic_directory
from arctl.checkpoint import QuantizedCheckpoint
from arctl.plan import LayerPlan, Plan
from arctl.quant import QuantizedTensor, dequantize
from arctl_exporter import hf_folder, packing
from arctl_exporter.auto_round import embedding_problem
from arctl_exporter.errors import ExportVerificationError, join_problems

FORMAT_NAME = "auto_awq"
QUANT_METHOD = "awq"
# AutoAWQ packs nibble i of a word from value ORDER_MAP[i] of its run of eight (WQLinear_GEMM.from_linear).
AUTOAWQ_ORDER_MAP = (0, 2, 4, 6, 1, 3, 5, 7)


def layer_problem(layer: LayerPlan, blocks: list[str]) -> str | None:
    scheme = layer.scheme
    if not scheme.quantized:
        return None
    out_features, in_features = layer.shape
    head = f"{layer.name}: {scheme.name} cannot be written as {FORMAT_NAME}"
    if scheme.act is not None:
        return f"{head} (it quantizes activations; this format stores weights only); use compressed-tensors"
    if scheme.dtype != "int" or scheme.bits != 4:
        alternative = (
            "compressed-tensors" if scheme.dtype != "int" else "auto_round, auto_gptq or compressed-tensors"
        )
        return f"{head} (INT4 only); use {alternative}"
    if scheme.group_size <= 0 or not scheme.fits(in_features):
        return f"{head} (needs a group size dividing in_features {in_features}); use auto_gptq or compressed-tensors"
    if out_features % 8:
        return f"{head} (out_features {out_features} is not a multiple of 8); use compressed-tensors"
    if blocks and not hf_folder.in_blocks(layer.name, blocks):
        return f"{head} (AWQ quantizes no layer outside the decoder blocks); use auto_gptq or auto_round"
    return None


def uniformity_problems(layers: tuple[LayerPlan, ...]) -> list[str]:
    """AWQ's config holds one group size: name every quantized layer that differs from the first (or say
    that none is quantized)."""
    quantized = [layer for layer in layers if layer.scheme.quantized]
    if not quantized:
        return [f"the plan quantizes no layer: nothing to write as {FORMAT_NAME}; keep the source model"]
    lead = quantized[0]
    return [
        f"{layer.name}: group size {layer.scheme.group_size} differs from {lead.scheme.group_size} of {lead.name}; "
        f"{FORMAT_NAME} holds one group size per model: use auto_round, auto_gptq or compressed-tensors"
        for layer in quantized
        if layer.scheme.group_size != lead.scheme.group_size
    ]


def quantization_config(layers: tuple[LayerPlan, ...], float_names: list[str]) -> dict[str, Any]:
    blocks = hf_folder.blocks_of(layers)
    quantized = [layer for layer in layers if layer.scheme.quantized]
    planned = {layer.name for layer in layers}
    skipped = [
        layer.name
        for layer in layers
        if not layer.scheme.quantized and hf_folder.in_blocks(layer.name, blocks)
    ]
    skipped += [
        module
        for name in float_names
        if name.endswith(".weight")
        and (module := name.removesuffix(".weight")) not in planned
        and hf_folder.in_blocks(module, blocks)
    ]
    return {
        "quant_method": QUANT_METHOD,
        "version": "gemm",
        "bits": 4,
        "group_size": quantized[0].scheme.group_size,
        "zero_point": True,
        "sym": all(layer.scheme.sym for layer in quantized),
        "modules_to_not_convert": skipped or None,
    }


def _zeros(qt: QuantizedTensor) -> torch.Tensor:
    if qt.zeros is not None:
        return qt.zeros
    return packing.sym_zeros(4, qt.shape[0], int(qt.scales.shape[1]))


def _packed(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    return {
        "qweight": packing.pack_awq_qweight(qt.codes),
        "qzeros": packing.pack_awq_qzeros(_zeros(qt)),
        "scales": qt.scales.to(torch.float16).t().contiguous(),
    }


def np_unpack_awq(words: np.ndarray) -> np.ndarray:
    """int32 ``[rows, m]`` -> int64 ``[rows, 8m]``, placing nibble i of each word at AutoAWQ's value ORDER_MAP[i]."""
    unsigned = np.ascontiguousarray(words).view(np.uint32).astype(np.int64)
    rows, m = words.shape
    values = np.zeros((rows, m, 8), dtype=np.int64)
    for nibble, value_index in enumerate(AUTOAWQ_ORDER_MAP):
        values[:, :, value_index] = (unsigned >> (4 * nibble)) & 0xF
    return values.reshape(rows, m * 8)


def np_dequantize(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """float32 ``[out, in]`` from the AWQ arrays alone."""
    codes = np_unpack_awq(qweight).T.astype(np.float32)  # [out, in]
    zeros = np.repeat(np_unpack_awq(qzeros).T, group_size, axis=1).astype(np.float32)
    return (codes - zeros) * np.repeat(scales.T.astype(np.float32), group_size, axis=1)


def verify_folder(
    folder: Path,
    checkpoint: QuantizedCheckpoint,
    quantized: dict[str, QuantizedTensor],
    layout: hf_folder.FloatLayout,
) -> None:
    def fail(message: str) -> None:
        raise ExportVerificationError(f"{folder.name}: {message}")

    qconfig = hf_folder.read_json(folder / "config.json").get("quantization_config", {})
    if qconfig.get("quant_method") != QUANT_METHOD or qconfig.get("version") != "gemm":
        fail("config.json lacks the awq (gemm) quantization_config")
    skipped = qconfig.get("modules_to_not_convert") or []
    for layer in checkpoint.plan.layers:
        if layer.scheme.quantized == (layer.name in skipped):
            fail(
                f"{layer.name} ({layer.scheme.name}) is {'' if layer.name in skipped else 'not '}in modules_to_not_convert"
            )
    parts = ("qweight", "qzeros", "scales")
    expected_keys = set(layout.keys) | {f"{name}.{part}" for name in quantized for part in parts}
    if (keys := hf_folder.tensor_keys(folder)) != expected_keys:
        fail(
            f"tensor names differ: missing {sorted(expected_keys - keys)[:3]}, extra {sorted(keys - expected_keys)[:3]}"
        )
    for name, qt in quantized.items():
        read = hf_folder.read_tensors(folder, [f"{name}.{part}" for part in parts])
        qweight, qzeros, scales = (read[f"{name}.{part}"] for part in parts)
        if (qweight.dtype, qzeros.dtype, scales.dtype) != (np.int32, np.int32, np.float16):
            fail(
                f"{name}: dtypes {qweight.dtype}/{qzeros.dtype}/{scales.dtype}, expected int32/int32/float16"
            )
        got = np_dequantize(qweight, qzeros, scales, int(qconfig["group_size"]))
        if got.shape != qt.shape or not np.array_equal(got, dequantize(qt).numpy()):
            fail(f"{name}: packed weights do not dequantize to the checkpoint's values")
    hf_folder.verify_float_tensors(folder, checkpoint, layout)


class AutoAwqWriter:
    """``auto_awq`` format: AWQ GEMM, INT4 (asym, or sym with zero point 8), one group size."""

    name = FORMAT_NAME
    description = "quant_method awq, version gemm (INT4, interleaved packing, one group size)"
    dtypes = ("int",)
    int_bits = (4,)
    runtimes = ("transformers", "vllm", "sglang")

    def plan_problems(self, plan: Plan) -> list[str]:
        """Every layer of ``plan`` this format cannot hold; else every one breaking the single group size."""
        blocks = hf_folder.blocks_of(plan.layers)
        # One bits/group size for the model and qzeros read for every layer: a fused group mixing sym and
        # asym INT4 runs as one kernel without harm, so no fused-group rule beyond uniformity.
        problems = [problem for layer in plan.layers if (problem := embedding_problem(layer) or layer_problem(layer, blocks))]
        return problems or uniformity_problems(plan.layers)

    def check(self, checkpoint: QuantizedCheckpoint) -> None:
        """Raise ExportError listing every layer this format cannot hold (the plan tells it all)."""
        join_problems(self.plan_problems(checkpoint.plan))

    def write(self, checkpoint: QuantizedCheckpoint, out_dir: Path) -> Path:
        """Write, verify and rename into ``out_dir``; on any failure nothing is left behind."""
        self.check(checkpoint)
        layers = checkpoint.plan.layers
        quantized = checkpoint.quantized_tensors()
        layout = hf_folder.float_layout(
            checkpoint, quantized, hf_folder.blocks_of(layers), cast=torch.float16
        )
        tensors = hf_folder.float_tensors(checkpoint, layout)
        qconfig = quantization_config(layers, [key for key, tensor in tensors.items() if tensor.dim() == 2])
        for name, qt in quantized.items():
            tensors.update({f"{name}.{part}": tensor for part, tensor in _packed(qt).items()})
        config = {**layout.config, "quantization_config": qconfig}
        out_dir = Path(out_dir)
        with atomic_directory(out_dir) as tmp:
            hf_folder.save_folder(tmp, checkpoint, tensors, config)
            verify_folder(tmp, checkpoint, quantized, layout)
        return out_dir
