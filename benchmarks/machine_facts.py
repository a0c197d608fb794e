"""What the benchmarks record about the machine they ran on, and the device they run on.

Imported by the benchmark scripts that sit beside it (``python benchmarks/<script>.py`` puts this
folder first on ``sys.path``). torch is imported only when a device is resolved, so that a parent
process that must stay small (``tuner_vs_autoround.py``) can use the rest.
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_features() -> list[str]:
    """The vector and matrix extensions that decide CPU matmul speed (bfloat16 is slow without the last two)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in wanted if flag in present]
    return []


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a CUDA device, else ``cpu``; an explicit name as given."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")
    return name
