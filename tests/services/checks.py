"""Comparisons shared by the service tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Run-time measurements the tuner writes into the checkpoint's metadata.json; everything else must
# match byte for byte.
TIMING_KEYS = ("seconds",)


def _without(value: Any, keys: tuple[str, ...]) -> Any:
    """``value`` with every entry named in ``keys`` removed, at any depth (per-block stats have
    timings too)."""
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoint_differences(a: Path, b: Path, ignore: tuple[str, ...] = TIMING_KEYS) -> list[str]:
    """Files of two checkpoint folders that differ, ignoring only the ``ignore`` entries (timings)
    of metadata.json (and that file's hash in the manifest)."""
    left, right = files(a), files(b)
    different = sorted(name for name in left.keys() | right.keys() if left.get(name) != right.get(name))
    tolerated = []
    if "metadata.json" in different:
        meta = [_without(json.loads(left["metadata.json"]), ignore), _without(json.loads(right["metadata.json"]), ignore)]
        if meta[0] == meta[1]:
            tolerated.append("metadata.json")
    if "manifest.json" in different and "metadata.json" in tolerated:
        manifests = [json.loads(left["manifest.json"]), json.loads(right["manifest.json"])]
        for entry in manifests:
            entry["files"].pop("metadata.json", None)
        if manifests[0] == manifests[1]:
            tolerated.append("manifest.json")
    return [name for name in different if name not in tolerated]


def folder_differences(a: Path, b: Path) -> list[str]:
    left, right = files(a), files(b)
    return sorted(name for name in left.keys() | right.keys() if left.get(name) != right.get(name))
