"""What the writers of Hugging Face model folders share (``auto_gptq``, ``auto_awq``,
``compressed-tensors``): which float tensors go into the folder and in which dtype, tied embeddings,
the model files copied from the checkpoint, the fused-group rules, and an independent bit reader that
verification uses instead of the packers it checks.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from arctl.checkpoint import MANIFEST, QUANTIZED_FILE, TENSORS_FILE, CheckpointError, QuantizedCheckpoint
from arctl.plan import LayerPlan
from arctl.quant import QuantizedTensor
from arctl_exporter.auto_round import block_prefix
from arctl_exporter.errors import ExportError, ExportVerificationError

MODEL_FILE = "model.safetensors"
# Files of a checkpoint folder that are arctl's own, never copied into an exported model.
CHECKPOINT_OWN_FILES = {MANIFEST, QUANTIZED_FILE, TENSORS_FILE, "plan.json", "metadata.json", "config.json"}
# Leaf names of layers that vLLM and SGLang load as one fused module, and that module's leaf name.
FUSED_LEAVES = {
    frozenset({"q_proj", "k_proj", "v_proj"}): "qkv_proj",
    frozenset({"gate_proj", "up_proj"}): "gate_up_proj",
}
FP16_MAX = float(torch.finfo(torch.float16).max)


def blocks_of(layers: Iterable[LayerPlan]) -> list[str]:
    """The repeated-block lists the planned layers live in, e.g. ``["model.layers"]``."""
    return sorted({prefix for layer in layers if (prefix := block_prefix(layer.name)) is not None})


def in_blocks(name: str, blocks: list[str]) -> bool:
    return any(name.startswith(block + ".") for block in blocks)


def unit_patterns(layers: list[LayerPlan]) -> list[tuple[str, list[LayerPlan]]]:
    """Layers grouped into the units a runtime loads, each with a regex that matches exactly its members
    and, for a known fused group, the fused module's name (``...self_attn.qkv_proj``), in plan order.

    Loaders that match ``dynamic``/target patterns against a fused module's name (vLLM, SGLang) then
    find the same rule as loaders that match the separate layers (transformers)."""
    units: dict[str, list[LayerPlan]] = {}
    for layer in layers:
        units.setdefault(layer.fused_group or layer.name, []).append(layer)
    result = []
    for members in units.values():
        parents = {member.name.rpartition(".")[0] for member in members}
        leaves = [member.name.rpartition(".")[2] for member in members]
        if len(members) == 1 or len(parents) != 1:
            alternatives = [re_escape(member.name) for member in members]
            pattern = "^(?:" + "|".join(alternatives) + ")$" if len(members) > 1 else f"^{alternatives[0]}$"
        else:
            fused = FUSED_LEAVES.get(frozenset(leaves))
            names = leaves + ([fused] if fused else [])
            pattern = f"^{re_escape(parents.pop())}\\.(?:{'|'.join(names)})$"
        result.append((pattern, members))
    return result


def re_escape(name: str) -> str:
    """Escape the characters of a module name that mean something in a regex (only ``.`` in practice)."""
    return "".join(f"\\{char}" if char in ".^$*+?()[]{}|\\" else char for char in name)


# --- float tensors --------------------------------------------------------------------------------------


def tie_word_embeddings(config: dict[str, Any]) -> bool:
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    text = config.get("text_config")
    return bool(isinstance(text, dict) and text.get("tie_word_embeddings", False))


def _set_tie_word_embeddings(config: dict[str, Any], value: bool) -> None:
    config["tie_word_embeddings"] = value
    if isinstance(config.get("text_config"), dict) and "tie_word_embeddings" in config["text_config"]:
        config["text_config"]["tie_word_embeddings"] = value


@dataclass(frozen=True)
class FloatLayout:
    """The source config to write (tie flag fixed) and, per safetensors key, the checkpoint tensor it
    holds and the dtype to store it in (None: as the checkpoint has it)."""

    config: dict[str, Any]
    keys: dict[str, tuple[str, torch.dtype | None]]


def float_layout(
    checkpoint: QuantizedCheckpoint,
    quantized: dict[str, QuantizedTensor],
    blocks: list[str],
    cast: torch.dtype | None,
    cast_quantized_bias: torch.dtype | None = None,
) -> FloatLayout:
    """Every float tensor of the checkpoint except the weights the codes replace.

    ``cast`` applies to every float tensor (GPTQ and AWQ folders are fp16 throughout); else
    ``cast_quantized_bias`` to the biases of quantized layers only. A quantized layer outside the
    blocks (``lm_head``) unties the embeddings: it carries its own codes.
    """
    for name, qt in quantized.items():
        planned = next(layer for layer in checkpoint.plan.layers if layer.name == name)
        if qt.shape != planned.shape:
            raise CheckpointError(
                f"{name}: codes have shape {list(qt.shape)}, the plan says {list(planned.shape)}"
            )
    config = {key: value for key, value in checkpoint.config().items() if key != "quantization_config"}
    tied = tie_word_embeddings(config)
    if tied and any(not in_blocks(name, blocks) for name in quantized):
        tied = False
        _set_tie_word_embeddings(config, False)
    if cast is not None:
        for key in ("torch_dtype", "dtype"):
            if key in config or (key == "torch_dtype" and "dtype" not in config):
                config[key] = str(cast).removeprefix("torch.")
    with safe_open(str(checkpoint.path / TENSORS_FILE), framework="pt") as handle:
        names = list(handle.keys())

    def dtype_for(module: str, kind: str) -> torch.dtype | None:
        if cast is not None:
            return cast
        return cast_quantized_bias if module in quantized and kind == "bias" else None

    keys: dict[str, tuple[str, torch.dtype | None]] = {}
    for name in names:
        module, _, kind = name.rpartition(".")
        if module in quantized and kind == "weight":
            continue
        keys[name] = (name, dtype_for(module, kind))
    for alias, target in checkpoint.aliases.items():
        module, _, kind = alias.rpartition(".")
        if tied or (module in quantized and kind == "weight") or target not in names:
            continue
        keys[alias] = (target, dtype_for(module, kind))
    return FloatLayout(config=config, keys=keys)


def float_tensors(checkpoint: QuantizedCheckpoint, layout: FloatLayout) -> dict[str, torch.Tensor]:
    """The float tensors of ``layout``, cast, each its own storage.

    Raises:
        ExportError: a value the target dtype cannot hold (beyond fp16's range).
    """
    source = checkpoint.float_tensors()
    tensors = {}
    for key, (origin, dtype) in layout.keys.items():
        tensor = source[origin]
        if dtype is not None and tensor.dtype != dtype:
            if dtype == torch.float16 and tensor.is_floating_point() and tensor.numel():
                peak = float(tensor.detach().abs().max())
                if peak > FP16_MAX:
                    raise ExportError(
                        f"{origin}: values up to {peak:.3g} overflow float16, which this format stores every "
                        "tensor in; use auto_round or compressed-tensors (they keep the checkpoint's dtype)"
                    )
            tensor = tensor.to(dtype)
        tensors[key] = tensor.contiguous().clone() if origin != key else tensor.contiguous()
    return tensors


def verify_float_tensors(folder: Path, checkpoint: QuantizedCheckpoint, layout: FloatLayout) -> None:
    written = load_file(str(folder / MODEL_FILE))
    source = checkpoint.float_tensors()
    for key, (origin, dtype) in layout.keys.items():
        want = source[origin] if dtype is None else source[origin].to(dtype)
        if key not in written or written[key].dtype != want.dtype or not torch.equal(written[key], want):
            raise ExportVerificationError(f"{folder.name}: {key} differs from the checkpoint's {origin}")


# --- files -----------------------------------------------------------------------------------------------


def copy_model_files(source: Path, target: Path) -> list[str]:
    """Copy the tokenizer, generation config and other model files (not arctl's own) into ``target``."""
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name not in CHECKPOINT_OWN_FILES:
            shutil.copy2(path, target / path.name)
            copied.append(path.name)
    return copied


def save_folder(
    tmp: Path,
    checkpoint: QuantizedCheckpoint,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    extra_json: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Write ``model.safetensors``, the model files, ``config.json`` and any extra JSON files."""
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    copy_model_files(checkpoint.path, tmp)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for name, content in (extra_json or {}).items():
        (tmp / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def read_tensors(folder: Path, keys: Iterable[str]) -> dict[str, np.ndarray]:
    """The named tensors of ``model.safetensors`` as numpy arrays (safetensors' numpy API)."""
    with safe_open(str(folder / MODEL_FILE), framework="np") as handle:
        return {key: handle.get_tensor(key) for key in keys}


def np_unpack_stream(words: np.ndarray, bits: int) -> np.ndarray:
    """int32 ``[..., m]`` -> int64 ``[..., m*32/bits]``: value ``k`` from stream bits ``k*bits ..``.

    Written apart from the packers it verifies: widths that divide 32 shift each word by every value
    offset; the others read the stream one bit plane at a time."""
    stream = np.ascontiguousarray(words).view(np.uint32)
    if 32 % bits == 0:
        shifts = np.arange(0, 32, bits, dtype=np.uint32)
        values = (stream[..., None] >> shifts) & np.uint32((1 << bits) - 1)
        return values.reshape(words.shape[:-1] + (-1,)).astype(np.int64)
    wide = stream.astype(np.uint64)
    count = words.shape[-1] * 32 // bits
    values = np.zeros(words.shape[:-1] + (count,), dtype=np.int64)
    for bit in range(bits):
        position = np.arange(count, dtype=np.uint64) * np.uint64(bits) + np.uint64(bit)
        word = (position // np.uint64(32)).astype(np.int64)
        plane = (wide[..., word] >> (position % np.uint64(32))) & np.uint64(1)
        values |= plane.astype(np.int64) << bit
    return values


def tensor_keys(folder: Path) -> set[str]:
    with safe_open(str(folder / MODEL_FILE), framework="np") as handle:
        return set(handle.keys())
