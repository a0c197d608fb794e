"""QuantizedCheckpoint: the folder every stage hands to the next, and the exporter's only input.

Layout::

    manifest.json          {"format", "version", "files": {name: {"sha256", "bytes"}}}  (written last)
    plan.json              the Plan
    metadata.json          how it was made (method, data, iters, losses, source model)
    quantized.safetensors  per quantized layer: "<layer>.codes" uint8 [out, in] (unpacked),
                           "<layer>.scales", "<layer>.zeros" (int asym), "<layer>.global_scale" (nvfp),
                           "<layer>.input_scale" (static activation quantization)
    tensors.safetensors    every other tensor in its dtype (norms, embeddings, biases, BF16 layers);
                           a tensor tied to another (lm_head/embeddings) is stored once
    config.json, tokenizer files, generation_config.json   as the source model had them

It is written to a temporary folder and renamed when complete; ``read_checkpoint`` checks every
file against the manifest, so a partial or corrupted folder is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from arctl.atomic import atomic_directory
from arctl.plan import Plan, PlanError
from arctl.quant import QuantizedTensor
from arctl.schemes import Scheme

CHECKPOINT_FORMAT = "arctl.quantized_checkpoint"
CHECKPOINT_VERSION = 1
MANIFEST = "manifest.json"
QUANTIZED_FILE = "quantized.safetensors"
TENSORS_FILE = "tensors.safetensors"
_PARTS = ("codes", "scales", "zeros", "global_scale", "input_scale")


class CheckpointError(ValueError):
    """A folder that is not a complete, intact QuantizedCheckpoint."""


def flatten_quantized(quantized: Mapping[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    """``{"<layer>.codes": ..., "<layer>.scales": ..., ...}`` for safetensors, in host memory (absent parts
    left out)."""
    return {
        f"{name}.{part}": getattr(qt, part).contiguous().cpu()
        for name, qt in quantized.items()
        for part in _PARTS
        if getattr(qt, part) is not None
    }


def unflatten_quantized(tensors: Mapping[str, torch.Tensor], schemes: Mapping[str, Scheme]) -> dict[str, QuantizedTensor]:
    """The inverse of ``flatten_quantized`` for the layers named in ``schemes``."""
    return {
        name: QuantizedTensor(
            scheme=scheme,
            codes=tensors[f"{name}.codes"],
            scales=tensors[f"{name}.scales"],
            zeros=tensors.get(f"{name}.zeros"),
            global_scale=tensors.get(f"{name}.global_scale"),
            input_scale=tensors.get(f"{name}.input_scale"),
        )
        for name, scheme in schemes.items()
    }


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, kind: str, version: int, extra: Mapping[str, Any] | None = None) -> None:
    """Hash every file under ``folder`` into its manifest.json (written last)."""
    files = {
        str(path.relative_to(folder)): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    manifest = {"format": kind, "version": version, **(extra or {}), "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def verify_manifest(folder: Path, kind: str) -> dict[str, Any]:
    """Check every file of ``folder`` against its manifest; return the manifest."""
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST}: not a complete {kind}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != kind:
        raise CheckpointError(f"{folder} is a {manifest.get('format')!r}, not a {kind}")
    for name, entry in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: {name} is missing")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"{folder}: {name} does not match its manifest (corrupted or changed)")
    return manifest


def unique_tensors(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that are the same view (storage, offset, shape, strides, dtype) as an earlier one, as
    tied weights are; return (tensors, {alias: kept name})."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[object, ...], str] = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        storage = tensor.untyped_storage().data_ptr()
        key = (storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            kept_tensor = tensor.detach().contiguous()
            # Another view of a storage already kept (e.g. two rows of one buffer) is not a tie: copy it.
            kept[name] = kept_tensor.clone() if storage in storages else kept_tensor
            storages.add(storage)
    return kept, aliases


@dataclass(frozen=True)
class QuantizedCheckpoint:
    """A verified checkpoint folder; tensors are read on demand."""

    path: Path
    plan: Plan
    metadata: dict[str, Any]
    aliases: dict[str, str]

    def quantized_tensors(self) -> dict[str, QuantizedTensor]:
        schemes = {layer.name: layer.scheme for layer in self.plan.layers if layer.scheme.quantized}
        return unflatten_quantized(load_file(str(self.path / QUANTIZED_FILE)), schemes)

    def float_tensors(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / TENSORS_FILE))

    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text(encoding="utf-8"))

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


def write_checkpoint(
    out_dir: Path,
    plan: Plan,
    quantized: Mapping[str, QuantizedTensor],
    float_tensors: Mapping[str, torch.Tensor],
    write_model_files: Callable[[Path], None],
    metadata: Mapping[str, Any],
) -> Path:
    """Write a complete checkpoint to ``out_dir`` (atomically) and return its path.

    ``write_model_files(folder)`` writes config.json and the tokenizer files into the folder.
    """
    planned = {layer.name for layer in plan.layers if layer.scheme.quantized}
    if set(quantized) != planned:
        missing, extra = planned - set(quantized), set(quantized) - planned
        raise ValueError(f"quantized layers differ from the plan: missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}")
    uncalibrated = [name for name, qt in quantized.items() if qt.scheme.act and qt.scheme.act.static and qt.input_scale is None]
    if uncalibrated:
        raise ValueError(f"layers with static activation quantization lack their calibrated input scale: {uncalibrated[:3]}")
    tensors, aliases = unique_tensors(float_tensors)
    with atomic_directory(Path(out_dir)) as tmp:
        save_file(flatten_quantized(quantized), str(tmp / QUANTIZED_FILE), metadata={"format": CHECKPOINT_FORMAT})
        save_file({name: tensor.cpu() for name, tensor in tensors.items()}, str(tmp / TENSORS_FILE),
                  metadata={"format": CHECKPOINT_FORMAT})
        (tmp / "plan.json").write_text(plan.to_json(), encoding="utf-8")
        (tmp / "metadata.json").write_text(
            json.dumps({**metadata, "aliases": aliases}, indent=2, default=str) + "\n", encoding="utf-8"
        )
        write_model_files(tmp)
        write_manifest(tmp, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    return Path(out_dir)


def read_checkpoint(path: Path) -> QuantizedCheckpoint:
    """Open and verify a checkpoint folder.

    Raises:
        CheckpointError: missing, incomplete, corrupted, or not a checkpoint.
    """
    folder = Path(path)
    verify_manifest(folder, CHECKPOINT_FORMAT)
    try:
        plan = Plan.load(folder / "plan.json")
    except PlanError as exc:
        raise CheckpointError(f"{folder}: {exc}") from exc
    metadata = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
    return QuantizedCheckpoint(path=folder, plan=plan, metadata=metadata, aliases=dict(metadata.get("aliases", {})))
