"""Quantization math: pure functions of torch tensors, one family per module.

``quantize`` gives the stored form (codes, scales, zeros), ``dequantize`` reads it back, and
``fake_quantize`` is their differentiable composition (straight-through rounding) used by tuning.
Imports only torch and the standard library.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from arctl.quant.floating import (
    dequantize_fp8,
    dequantize_mx,
    dequantize_nvfp4,
    fake_quantize_fp8,
    fake_quantize_mx,
    fake_quantize_nvfp4,
    quantize_fp8,
    quantize_mx,
    quantize_nvfp4,
)
from arctl.quant.grouping import SchemeShapeError
from arctl.quant.integer import dequantize_int, fake_quantize_int, quantize_int
from arctl.quant.tensors import QuantizedTensor
from arctl.schemes import DataType, Scheme

__all__ = ["QuantizedTensor", "SchemeShapeError", "dequantize", "fake_quantize", "quantize"]

_QUANTIZE: dict[DataType, Callable[..., QuantizedTensor]] = {
    "int": quantize_int,
    "mxfp": quantize_mx,
    "nvfp": quantize_nvfp4,
    "fp8": quantize_fp8,
}
_DEQUANTIZE: dict[DataType, Callable[[QuantizedTensor], torch.Tensor]] = {
    "int": dequantize_int,
    "mxfp": dequantize_mx,
    "nvfp": dequantize_nvfp4,
    "fp8": dequantize_fp8,
}
_FAKE_QUANTIZE: dict[DataType, Callable[..., torch.Tensor]] = {
    "int": fake_quantize_int,
    "mxfp": fake_quantize_mx,
    "nvfp": fake_quantize_nvfp4,
    "fp8": fake_quantize_fp8,
}


def _require_quantized(scheme: Scheme) -> None:
    if not scheme.quantized:
        raise ValueError(f"{scheme.name} is not a quantized scheme")


def _learned(scheme: Scheme, offset, min_factor, max_factor, global_scale=None) -> dict[str, torch.Tensor | None]:
    """SignRound's learned parameters (and a given NVFP4 global scale) as keyword arguments; only
    ``int`` schemes have a min factor, only ``nvfp`` ones a global scale."""
    if global_scale is not None and scheme.dtype != "nvfp":
        raise ValueError(f"{scheme.name} has no global scale (only NVFP4 schemes do)")
    if scheme.dtype == "int":
        return {"offset": offset, "min_factor": min_factor, "max_factor": max_factor}
    if min_factor is not None:
        raise ValueError(f"{scheme.name} has no min clipping factor (only int schemes do)")
    if scheme.dtype == "nvfp":
        return {"offset": offset, "max_factor": max_factor, "global_scale": global_scale}
    return {"offset": offset, "max_factor": max_factor}


def quantize(
    weight: torch.Tensor,
    scheme: Scheme,
    offset: torch.Tensor | None = None,
    min_factor: torch.Tensor | None = None,
    max_factor: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Quantize ``weight`` ``[out, in]`` with ``scheme``: round to nearest, or with SignRound's
    learned rounding ``offset`` (``[out, in]``) and clipping factors (``[out, groups]``); NVFP4
    takes a given ``global_scale`` (fp32 ``[1]``) instead of its own."""
    _require_quantized(scheme)
    return _QUANTIZE[scheme.dtype](weight, scheme, **_learned(scheme, offset, min_factor, max_factor, global_scale))


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """float32 ``[out, in]`` values of a QuantizedTensor."""
    _require_quantized(qt.scheme)
    return _DEQUANTIZE[qt.scheme.dtype](qt)


def fake_quantize(
    weight: torch.Tensor,
    scheme: Scheme,
    offset: torch.Tensor | None = None,
    min_factor: torch.Tensor | None = None,
    max_factor: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize with straight-through rounding (differentiable in ``offset`` and the
    clipping factors); BF16 rounds to bfloat16."""
    if not scheme.quantized:
        return weight.to(torch.bfloat16).to(weight.dtype)
    return _FAKE_QUANTIZE[scheme.dtype](weight, scheme, **_learned(scheme, offset, min_factor, max_factor, global_scale))
