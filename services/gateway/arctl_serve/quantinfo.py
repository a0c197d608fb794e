"""What a served model's weights are: format, schemes and true average bits, read from the files
alone (imports no torch: the CLI uses it to label an SGLang worker too).

- a QuantizedCheckpoint folder: its plan (``format: arctl_checkpoint``);
- an exported folder with ``quantization_config`` (``quant_method: auto-round``): the per-layer
  scheme from the config (default + ``extra_config``), the shapes from the safetensors headers
  (``qweight`` is ``[in * bits / 32, out]``); Linear weights inside the quantized blocks that stay
  float count at 16 bits, as the plan counts BF16 layers; bits via ``arctl.bits`` (scales included);
- a float folder: ``format: none``, the dtype's bits;
- a GGUF file: ``format: gguf``, per block weight the ggml type's bytes * 8 / weights.

Averages run over the quantizable layers only (the Linear weights of the decoder blocks, plus any
quantized layer outside them), like the Plan's.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import gguf

from arctl.bits import LayerBits, layer_bits, model_bits
from arctl.plan import Plan
from arctl.schemes import Scheme

DTYPE_BITS = {"F64": 64, "F32": 32, "BF16": 16, "F16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "I8": 8, "U8": 8}


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: ``{name: {"dtype", "shape", "data_offsets"}}``."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def _tensors(folder: Path) -> dict[str, dict[str, Any]]:
    tensors: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(safetensors_header(path))
    return tensors


def _summary(fmt: str, layers: list[tuple[str, LayerBits]], extra: dict[str, Any]) -> dict[str, Any]:
    bits = model_bits([entry for _, entry in layers])
    return {
        "format": fmt,
        **extra,
        "avg_bits": round(bits.average, 4),
        "avg_bits_codes_only": round(bits.average_codes_only, 4),
        "schemes": dict(Counter(name for name, _ in layers)),
        "layers": len(layers),
    }


def _from_plan(folder: Path) -> dict[str, Any]:
    plan = Plan.load(folder / "plan.json")
    layers = [(layer.scheme.name, layer.bits) for layer in plan.layers]
    metadata = {}
    if (folder / "metadata.json").is_file():
        metadata = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
    return _summary("arctl_checkpoint", layers, {"method": metadata.get("method", "unknown")})


def _scheme_from(entry: dict[str, Any], default: dict[str, Any]) -> Scheme | None:
    merged = {**default, **entry}
    bits = int(merged.get("bits", 16))
    if bits >= 16 or merged.get("data_type", "int") != "int":
        return None
    return Scheme("int", bits, int(merged.get("group_size", 128)), bool(merged.get("sym", True)))


def _from_auto_round(folder: Path, qconfig: dict[str, Any]) -> dict[str, Any]:
    tensors = _tensors(folder)
    default = {key: qconfig[key] for key in ("bits", "group_size", "sym", "data_type") if key in qconfig}
    extra_config = qconfig.get("extra_config") or {}
    blocks = [block for block in str(qconfig.get("block_name_to_quantize", "")).split(",") if block]
    layers: list[tuple[str, LayerBits]] = []
    quantized_modules = set()
    for key, info in tensors.items():
        if not key.endswith(".qweight"):
            continue
        module = key.removesuffix(".qweight")
        quantized_modules.add(module)
        scheme = _scheme_from(extra_config.get(module, {}), default)
        if scheme is None:
            continue
        packed_in, out_features = info["shape"]
        in_features = packed_in * 32 // scheme.bits
        layers.append((scheme.name, layer_bits(scheme, out_features, in_features)))
    float_scheme = Scheme("bf16", 16, 0)
    for key, info in tensors.items():
        module = key.removesuffix(".weight")
        inside = any(module.startswith(block) for block in blocks)
        if key.endswith(".weight") and len(info["shape"]) == 2 and inside and module not in quantized_modules:
            out_features, in_features = info["shape"]
            layers.append((float_scheme.name, layer_bits(float_scheme, out_features, in_features)))
    packing = str(qconfig.get("packing_format", ""))
    return _summary("auto_round", layers, {"quant_method": qconfig.get("quant_method"), "packing_format": packing})


def _from_float(folder: Path) -> dict[str, Any]:
    tensors = _tensors(folder)
    counts: Counter[str] = Counter()
    total_bits = weights = 0
    for key, info in tensors.items():
        shape = info["shape"]
        if key.endswith(".weight") and len(shape) == 2 and ".layers." in f".{key}":
            counts[info["dtype"]] += 1
            weights += shape[0] * shape[1]
            total_bits += shape[0] * shape[1] * DTYPE_BITS.get(info["dtype"], 16)
    average = round(total_bits / weights, 4) if weights else None
    return {"format": "none", "avg_bits": average, "avg_bits_codes_only": average, "schemes": dict(counts),
            "layers": sum(counts.values())}


def _from_gguf(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(str(path))
    counts: Counter[str] = Counter()
    total_bits = weights = 0
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.") and len(tensor.shape) == 2:
            counts[tensor.tensor_type.name] += 1
            weights += int(tensor.n_elements)
            total_bits += int(tensor.n_bytes) * 8
    average = round(total_bits / weights, 4) if weights else None
    return {"format": "gguf", "avg_bits": average, "schemes": dict(counts), "layers": sum(counts.values())}


def describe(path: Path) -> dict[str, Any]:
    """The quantization of the model at ``path`` (folder or .gguf file); ``format: unknown`` when
    the files say nothing arctl can read."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path)
    if (path / "plan.json").is_file() and (path / "quantized.safetensors").is_file():
        return _from_plan(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        return {"format": "unknown"}
    config = json.loads(config_path.read_text(encoding="utf-8"))
    qconfig = config.get("quantization_config")
    if isinstance(qconfig, dict):
        method = str(qconfig.get("quant_method", "unknown"))
        if method in ("auto-round", "intel/auto-round"):
            return _from_auto_round(path, qconfig)
        return {"format": method, "avg_bits": None, "schemes": {}}
    return _from_float(path)
