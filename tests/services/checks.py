"""Comparisons shared by the service tests."""

from __future__ import annotations

from pathlib import Path


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def folder_differences(a: Path, b: Path) -> list[str]:
    """Files of two folders that differ in bytes, or are in only one of them (checkpoints hold no
    run-time measurements, so nothing is tolerated)."""
    left, right = files(a), files(b)
    return sorted(name for name in left.keys() | right.keys() if left.get(name) != right.get(name))
