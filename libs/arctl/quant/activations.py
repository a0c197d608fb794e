"""Activation quantization: quantize-dequantize a layer's inputs ``[..., in]`` as an ``ActQuant`` says.

- FP8 static: ``s = input_scale`` (calibrated ``amax / 448``); ``e4m3(x / s) * s``, saturating.
- FP8 dynamic: the same with ``s = amax(token) / 448`` per token.
- MX: per 32 inputs of each token, as ``arctl.quant.floating`` quantizes MX weights except for the
  shared exponent, computed as the runtimes that quantize activations do (vLLM's reference,
  compressed-tensors 0.20.0's ``generate_mx_scales``): the group's amax is first rounded to one
  mantissa bit, so a group whose amax mantissa is >= 1.75 gets the next exponent (the OCP rule of
  MX weights floors it, saturating those groups' largest elements).
- NVFP4: per 16 inputs ``s = e4m3(g * amax_block / 6)`` with the calibrated global scale
  ``g = input_scale = 448 * 6 / amax``; ``e2m1(x * g / s) * s / g``.

Rounding is straight-through: the gradient of ``x`` passes unchanged inside the range, as SignRound
needs when it tunes the weights behind quantized activations.
"""

from __future__ import annotations

import torch

from arctl.quant.floating import (
    E8M0_BIAS,
    FP8_SCALE_FLOOR,
    _element_emax,
    _mx_scaled,
    _nvfp4_block_scale,
    _nvfp4_scaled,
    _round_elements_ste,
)
from arctl.quant.rounding import FP4_MAX, FP8_E4M3_MAX, round_fp4_ste, round_fp8_ste
from arctl.schemes import ActQuant

MX_GROUP = 32
_FP32_MANTISSA_BITS = 23
_HALF_OF_ONE_MANTISSA_BIT = 1 << (_FP32_MANTISSA_BITS - 2)  # amax's mantissa rounded to 1 bit
_SIGN_AND_EXPONENT = -(1 << _FP32_MANTISSA_BITS)  # 0xFF800000 as int32


def runtime_mx_exponent(grouped: torch.Tensor, bits: int) -> torch.Tensor:
    """Shared exponent per group ``[..., groups, 1]`` of activations ``[..., groups, 32]`` as runtimes
    compute it: ``floor(log2(round_1bit(amax))) - emax``, -127 for an all-zero group."""
    amax = grouped.detach().abs().amax(dim=-1, keepdim=True).float().contiguous()
    rounded = torch.bitwise_and(amax.view(torch.int32) + _HALF_OF_ONE_MANTISSA_BIT, _SIGN_AND_EXPONENT).view(torch.float32)
    safe = torch.where(amax > 0, rounded, torch.ones_like(rounded))
    exponent = torch.floor(torch.log2(safe)) - _element_emax(bits)
    return torch.where(amax > 0, exponent, torch.full_like(exponent, -E8M0_BIAS)).clamp(-E8M0_BIAS, E8M0_BIAS)


def static_input_scale(amax: torch.Tensor | float, act: ActQuant) -> torch.Tensor:
    """The stored float32 ``[1]`` scale of a static ``act`` whose inputs reach ``amax``: FP8's
    ``amax / 448`` (at least ``1 / (448 * 512)``), NVFP4's global ``448 * 6 / amax`` (1 when ``amax`` is 0)."""
    if not act.static:
        raise ValueError(f"{act.dtype} dynamic activations have no calibrated scale")
    value = torch.as_tensor(amax, dtype=torch.float32).reshape(1)
    if act.dtype == "fp8":
        return (value / FP8_E4M3_MAX).clamp(min=FP8_SCALE_FLOOR)
    return torch.where(value > 0, FP8_E4M3_MAX * FP4_MAX / value.clamp(min=1e-30), torch.ones_like(value))


def fake_quantize_activation(
    x: torch.Tensor, act: ActQuant, input_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``x`` quantized and dequantized by ``act`` (same shape and dtype); static ``act`` needs its
    ``input_scale`` (``static_input_scale``)."""
    if act.static and input_scale is None:
        raise ValueError(f"static {act.dtype} activations need their calibrated input scale")
    features = x.shape[-1]
    if act.group_size > 0 and features % act.group_size:
        raise ValueError(
            f"{features} inputs do not split into {act.dtype} activation groups of {act.group_size}"
        )
    rows = x.reshape(-1, features).float()
    if act.dtype == "fp8":
        if act.dynamic:
            scale = (rows.detach().abs().amax(dim=-1, keepdim=True) / FP8_E4M3_MAX).clamp(min=FP8_SCALE_FLOOR)
        else:
            scale = input_scale.float()  # type: ignore[union-attr]
        out = round_fp8_ste((rows / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)) * scale
    elif act.dtype == "mxfp":
        grouped = rows.reshape(rows.shape[0], -1, MX_GROUP)
        exponent = runtime_mx_exponent(grouped, act.bits)
        rounded = _round_elements_ste(_mx_scaled(grouped, exponent, act.bits, None), act.bits)
        out = (rounded * torch.exp2(exponent)).reshape(rows.shape)
    else:
        global_scale = input_scale.float()  # type: ignore[union-attr]
        grouped = rows.reshape(rows.shape[0], -1, act.group_size)
        block_scale = _nvfp4_block_scale(grouped.detach(), global_scale, None)
        rounded = round_fp4_ste(_nvfp4_scaled(grouped, block_scale, global_scale, None))
        out = (rounded * block_scale / global_scale).reshape(rows.shape)
    return out.reshape(x.shape).to(x.dtype)
