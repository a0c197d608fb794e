"""Per-block results of a tuning run on disk, so a killed run continues from its last finished block.

A work folder holds ``run.json`` (a fingerprint of model, plan, settings and calibration data) and
one ``block_NNNN.safetensors`` per finished block (its layers' QuantizedTensors, the block's stats
in the metadata), each written to a temporary name and renamed. A folder made with other inputs is
refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from arctl.checkpoint import flatten_quantized, unflatten_quantized
from arctl.plan import Plan
from arctl.quant import QuantizedTensor
from arctl_tuner.signround import BlockStats


class ResumeMismatchError(ValueError):
    """The work folder belongs to a run with other inputs."""


def fingerprint(model_sha256: str, plan: Plan, settings: dict[str, Any], calibration: torch.Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(model_sha256.encode())
    digest.update(plan.to_json().encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(calibration.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()


class BlockStore:
    def __init__(self, folder: Path, run_fingerprint: str, resume: bool) -> None:
        self.folder = Path(folder)
        marker = self.folder / "run.json"
        if self.folder.exists() and resume:
            found = json.loads(marker.read_text()).get("fingerprint") if marker.is_file() else None
            if found != run_fingerprint:
                raise ResumeMismatchError(
                    f"{self.folder} holds a run with another model, plan, settings or data; remove it or drop --resume"
                )
        else:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
            marker.write_text(json.dumps({"fingerprint": run_fingerprint}) + "\n")

    def _path(self, index: int) -> Path:
        return self.folder / f"block_{index:04d}.safetensors"

    def save(self, index: int, quantized: dict[str, QuantizedTensor], stats: BlockStats) -> None:
        flat = flatten_quantized(quantized)
        metadata = {"stats": json.dumps(asdict(stats)), "layers": json.dumps(sorted(quantized))}
        final = self._path(index)
        tmp = final.with_suffix(".tmp")
        save_file(flat, str(tmp), metadata=metadata)
        os.replace(tmp, final)

    def load(self, index: int, plan: Plan) -> tuple[dict[str, QuantizedTensor], BlockStats] | None:
        path = self._path(index)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        schemes = {layer.name: layer.scheme for layer in plan.layers}
        quantized = unflatten_quantized(tensors, {name: schemes[name] for name in json.loads(metadata["layers"])})
        return quantized, BlockStats(**json.loads(metadata["stats"]))

    def load_all(self, count: int, plan: Plan) -> dict[str, QuantizedTensor]:
        """The quantized layers of blocks ``0 .. count-1``, every one of which must be on disk."""
        quantized: dict[str, QuantizedTensor] = {}
        for index in range(count):
            saved = self.load(index, plan)
            if saved is None:
                raise FileNotFoundError(f"{self._path(index)} is missing: the work folder changed during the run")
            quantized.update(saved[0])
        return quantized

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
