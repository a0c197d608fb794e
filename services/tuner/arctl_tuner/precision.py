"""The compute dtype of the tuning passes: bfloat16 where the hardware multiplies in it, else float32.

AutoRound autocasts its blocks to bfloat16 by default and turns that off on a CPU that lacks the
type (auto-round 0.16.1 on AMD EPYC Zen 3: "amp is set to FALSE ..."). On such a CPU (AVX2 only)
PyTorch's bfloat16 matrix products fall back to slow code: on 2 Zen 3 cores, ``[1024, 576] x
[576, 1536]`` took 102 ms in bfloat16 and 16 ms in float32, and the input-gradient product
``[1024, 1536] x [1536, 576]`` 900 ms and 14 ms. ``auto`` picks bfloat16 on a CUDA device that
supports it and on a CPU with native bfloat16 arithmetic (x86: AVX512-BF16 or AMX, asked of
``torch.cpu``'s private probes; other CPUs: what oneDNN reports), float32 everywhere else.
"""

from __future__ import annotations

import platform

import torch


def native_bfloat16(device: torch.device) -> bool:
    """Whether matrix products in bfloat16 run natively (faster than float32) on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_compute_dtype(name: str, device: torch.device) -> str:
    """``name`` (one of ``arctl_tuner.config.COMPUTE_DTYPES``) as a concrete dtype name for ``device``."""
    if name == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    return name


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a concrete compute dtype name (``float32`` or ``bfloat16``)."""
    return torch.bfloat16 if name == "bfloat16" else torch.float32
