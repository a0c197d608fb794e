"""Floating-point schemes: MXFP4 / MXFP8 (E8M0 shared exponents), NVFP4 (FP8 block scales and a
global scale), FP8 (per output row).

Shapes: weight ``[out, in]``; codes uint8 ``[out, in]``; scales ``[out, groups]`` (``[out, 1]`` for FP8).

- MX (OCP microscaling): per 32 inputs ``e = clamp(floor(log2(amax)) - emax, -127, 127)`` with
  ``emax`` = 2 (E2M1) or 8 (E4M3); elements are ``w / 2**e`` rounded to the element grid,
  saturating. The scale is stored as E8M0, ``e + 127``. An all-zero group gets ``e = -127``.
- NVFP4: ``global = 448 * 6 / amax(W)`` (or one given: the layers a runtime fuses share one); per 16 inputs ``s = e4m3(global * amax_block / 6)``;
  elements ``e2m1(w * global / s)``; value = element * s / global.
- FP8: per output row ``s = amax_row / 448`` (at least ``1 / (448 * 512)``); elements ``e4m3(w / s)``.

``max_factor`` (per group, or per row for FP8) shrinks the range, as SignRound's clipping does.
"""

from __future__ import annotations

import torch

from arctl.quant.grouping import from_groups, to_groups
from arctl.quant.rounding import (
    FP4_MAX,
    FP8_E4M3_MAX,
    fp4_codes,
    fp4_values,
    fp8_e4m3_codes,
    fp8_e4m3_values,
    round_fp4_ste,
    round_fp8_ste,
)
from arctl.quant.tensors import QuantizedTensor
from arctl.schemes import Scheme

E8M0_BIAS = 127
FP8_SCALE_FLOOR = 1.0 / (FP8_E4M3_MAX * 512.0)


def _element_max(bits: int) -> float:
    return FP4_MAX if bits == 4 else FP8_E4M3_MAX


def _element_emax(bits: int) -> int:
    return 2 if bits == 4 else 8


def _round_elements_ste(x: torch.Tensor, bits: int) -> torch.Tensor:
    return round_fp4_ste(x) if bits == 4 else round_fp8_ste(x)


def _element_codes(x: torch.Tensor, bits: int) -> torch.Tensor:
    return fp4_codes(x) if bits == 4 else fp8_e4m3_codes(x)


def _element_values(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return fp4_values(codes) if bits == 4 else fp8_e4m3_values(codes)


def _apply_factor(amax: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    return amax if factor is None else amax * factor.reshape(amax.shape)


# --- MX -------------------------------------------------------------------------------------------


def mx_exponent(grouped: torch.Tensor, bits: int, max_factor: torch.Tensor | None = None) -> torch.Tensor:
    """Shared exponent per group, float ``[out, groups, 1]`` in ``[-127, 127]``."""
    amax = _apply_factor(grouped.detach().abs().amax(dim=-1, keepdim=True), max_factor)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    exponent = torch.floor(torch.log2(safe)) - _element_emax(bits)
    return torch.where(amax > 0, exponent, torch.full_like(exponent, -E8M0_BIAS)).clamp(-E8M0_BIAS, E8M0_BIAS)


def _mx_scaled(grouped: torch.Tensor, exponent: torch.Tensor, bits: int, offset: torch.Tensor | None):
    scaled = grouped * torch.exp2(-exponent)
    if offset is not None:
        scaled = scaled + offset.reshape(scaled.shape)
    limit = _element_max(bits)
    return scaled.clamp(-limit, limit)


def quantize_mx(weight: torch.Tensor, scheme: Scheme, offset=None, max_factor=None) -> QuantizedTensor:
    with torch.no_grad():
        grouped = to_groups(weight.float(), scheme)
        exponent = mx_exponent(grouped, scheme.bits, max_factor)
        codes = _element_codes(_mx_scaled(grouped, exponent, scheme.bits, offset), scheme.bits)
    return QuantizedTensor(
        scheme=scheme,
        codes=from_groups(codes),
        scales=(exponent.squeeze(-1) + E8M0_BIAS).to(torch.uint8),
    )


def dequantize_mx(qt: QuantizedTensor) -> torch.Tensor:
    grouped = to_groups(_element_values(qt.codes, qt.scheme.bits), qt.scheme)
    exponent = qt.scales.float().unsqueeze(-1) - E8M0_BIAS
    return from_groups(grouped * torch.exp2(exponent))


def fake_quantize_mx(weight: torch.Tensor, scheme: Scheme, offset=None, max_factor=None) -> torch.Tensor:
    grouped = to_groups(weight.float(), scheme)
    exponent = mx_exponent(grouped, scheme.bits, max_factor)
    rounded = _round_elements_ste(_mx_scaled(grouped, exponent, scheme.bits, offset), scheme.bits)
    return from_groups(rounded * torch.exp2(exponent)).to(weight.dtype)


# --- NVFP4 ----------------------------------------------------------------------------------------


def nvfp4_global_scale(weight: torch.Tensor) -> torch.Tensor:
    """fp32 ``[1]``: ``448 * 6 / amax(W)`` (1 for an all-zero weight)."""
    amax = weight.detach().abs().amax().float()
    return torch.where(amax > 0, FP8_E4M3_MAX * FP4_MAX / amax.clamp(min=1e-30), torch.ones_like(amax)).reshape(1)


def _nvfp4_block_scale(grouped, global_scale, max_factor):
    amax = _apply_factor(grouped.abs().amax(dim=-1, keepdim=True), max_factor)
    raw = (global_scale * amax / FP4_MAX).clamp(max=FP8_E4M3_MAX)
    return raw + (fp8_e4m3_values(fp8_e4m3_codes(raw)) - raw).detach()


def _nvfp4_scaled(grouped, block_scale, global_scale, offset):
    safe = torch.where(block_scale > 0, block_scale, torch.ones_like(block_scale))
    scaled = torch.where(block_scale > 0, grouped * global_scale / safe, torch.zeros_like(grouped))
    if offset is not None:
        scaled = scaled + offset.reshape(scaled.shape)
    return scaled.clamp(-FP4_MAX, FP4_MAX)


def quantize_nvfp4(weight: torch.Tensor, scheme: Scheme, offset=None, max_factor=None, global_scale=None) -> QuantizedTensor:
    with torch.no_grad():
        grouped = to_groups(weight.float(), scheme)
        global_scale = nvfp4_global_scale(weight) if global_scale is None else global_scale.float().reshape(1)
        block_scale = _nvfp4_block_scale(grouped, global_scale, max_factor)
        codes = fp4_codes(_nvfp4_scaled(grouped, block_scale, global_scale, offset))
    return QuantizedTensor(
        scheme=scheme,
        codes=from_groups(codes),
        scales=block_scale.squeeze(-1).to(torch.float8_e4m3fn),
        global_scale=global_scale,
    )


def dequantize_nvfp4(qt: QuantizedTensor) -> torch.Tensor:
    if qt.global_scale is None:
        raise ValueError("an NVFP4 tensor needs its global scale")
    grouped = to_groups(fp4_values(qt.codes), qt.scheme)
    return from_groups(grouped * qt.scales.float().unsqueeze(-1) / qt.global_scale.float())


def fake_quantize_nvfp4(weight: torch.Tensor, scheme: Scheme, offset=None, max_factor=None, global_scale=None) -> torch.Tensor:
    grouped = to_groups(weight.float(), scheme)
    global_scale = nvfp4_global_scale(weight) if global_scale is None else global_scale.float().reshape(1)
    block_scale = _nvfp4_block_scale(grouped, global_scale, max_factor)
    rounded = round_fp4_ste(_nvfp4_scaled(grouped, block_scale, global_scale, offset))
    return from_groups(rounded * block_scale / global_scale).to(weight.dtype)


# --- FP8 per channel -------------------------------------------------------------------------------


def _fp8_row_scale(weight2d: torch.Tensor, max_factor):
    amax = _apply_factor(weight2d.abs().amax(dim=-1, keepdim=True), max_factor)
    return (amax / FP8_E4M3_MAX).clamp(min=FP8_SCALE_FLOOR)


def _fp8_scaled(weight2d, scale, offset):
    scaled = weight2d / scale
    if offset is not None:
        scaled = scaled + offset.reshape(scaled.shape)
    return scaled.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)


def quantize_fp8(weight: torch.Tensor, scheme: Scheme, offset=None, max_factor=None) -> QuantizedTensor:
    with torch.no_grad():
        w = to_groups(weight.float(), scheme).squeeze(1)
        scale = _fp8_row_scale(w, max_factor)
        codes = fp8_e4m3_codes(_fp8_scaled(w, scale, offset))
    return QuantizedTensor(scheme=scheme, codes=codes, scales=scale.float())


def dequantize_fp8(qt: QuantizedTensor) -> torch.Tensor:
    return fp8_e4m3_values(qt.codes) * qt.scales.float()


def fake_quantize_fp8(weight: torch.Tensor, scheme: Scheme, offset=None, max_factor=None) -> torch.Tensor:
    w = to_groups(weight.float(), scheme).squeeze(1)
    scale = _fp8_row_scale(w, max_factor)
    return (round_fp8_ste(_fp8_scaled(w, scale, offset)) * scale).to(weight.dtype)
