"""Fused straight-through quantize-dequantize for tuning: the same values and gradients as
``fake_quantize``, with the per-element work of the forward and of the backward pass each done in
one compiled pass over the weight.

Tuning runs ``fake_quantize`` twice per step on every weight of a block (forward and backward); as
a chain of torch operations that is ~15 full-size temporaries per weight, memory-bound, and on
SmolLM2 (2 CPU cores, W4 g64, 8 x 128 tokens) it was a third of a step. Here the element-wise part
is a custom autograd Function whose forward and backward are ``torch.compile``'d functions of the
weight, the offset and the (small) per-group scale; the scale itself still comes from the
differentiable ``int_scale_zero`` / ``mx_exponent``, so the clipping factors get their gradients
through ordinary autograd on ``[out, groups]`` tensors.

Gradients (straight-through rounding; ``u = w / s + offset``, ``inside`` = the clamp let ``u``'s
rounded code through):
- int: ``q = (clamp(round(u) + z, 0, 2^b - 1) - z) * s``; ``dq/d offset = inside * s``,
  ``dq/ds = (clamp(...) - z) - inside * w / s`` (summed over the group), ``dq/dw = inside``;
  ``z`` has no gradient (it is computed from detached values).
- MXFP4: ``q = e2m1(clamp(w * 2^-e + offset, -6, 6)) * 2^e``; ``dq/d offset = inside * 2^e``; the
  shared exponent is a floor, so it passes no gradient.
Other schemes (MXFP8, NVFP4, FP8) go through ``fake_quantize`` unchanged.

Where ``torch.compile`` cannot run (no C++ compiler, an unsupported backend) the same functions run
eagerly, after one warning.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch

from arctl.quant import fake_quantize
from arctl.quant.floating import mx_exponent
from arctl.quant.grouping import from_groups, to_groups
from arctl.quant.integer import int_scale_zero
from arctl.quant.rounding import FP4_MAX, round_fp4_magnitude
from arctl.schemes import Scheme


class _Kernel:
    """``fn`` compiled on first use (dynamic shapes: one kernel for every weight shape), or ``fn``
    itself once compiling has failed."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn
        self._compiled: Callable[..., Any] | None = None
        self._failed = False
        self._lock = threading.Lock()

    def __call__(self, *args: Any) -> Any:
        if self._failed:
            return self._fn(*args)
        with self._lock:
            if self._compiled is None:
                self._compiled = torch.compile(self._fn, dynamic=True)
        try:
            return self._compiled(*args)
        except Exception as error:  # noqa: BLE001 - any compiler failure: the eager function gives the same values
            self._failed = True
            warnings.warn(f"torch.compile failed ({type(error).__name__}: {error}); fused quantization runs eagerly",
                          RuntimeWarning, stacklevel=2)
            return self._fn(*args)


def _shifted(scaled: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """``scaled + offset``: the value SignRound rounds (the offset is None for round-to-nearest)."""
    return scaled if offset is None else scaled + offset


# --- int ------------------------------------------------------------------------------------------


def _int_forward(grouped: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, offset: torch.Tensor | None,
                 maxq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    shifted = _shifted(grouped / scale, offset)
    return (((torch.round(shifted) + zero).clamp(min=0).minimum(maxq) - zero) * scale).to(dtype)


def _int_backward(grad: torch.Tensor, grouped: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  offset: torch.Tensor | None, maxq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad of the offset: grad * inside * s, grad of the scale [out, groups, 1])``."""
    grad = grad.float()
    scaled = grouped / scale
    code = torch.round(_shifted(scaled, offset)) + zero
    passed = torch.where((code >= 0) & (code <= maxq), grad, 0.0)
    grad_scale = (grad * (code.clamp(min=0).minimum(maxq) - zero) - passed * scaled).sum(-1, keepdim=True)
    return passed * scale, grad_scale


_INT_FORWARD = _Kernel(_int_forward)
_INT_BACKWARD = _Kernel(_int_backward)


class _IntQdq(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, grouped: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                offset: torch.Tensor | None, maxq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(grouped, scale, zero, offset, maxq)
        return _INT_FORWARD(grouped, scale, zero, offset, maxq, dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grouped, scale, zero, offset, maxq = ctx.saved_tensors
        grad_offset, grad_scale = _INT_BACKWARD(grad.contiguous(), grouped, scale, zero, offset, maxq)
        need_grouped, need_scale, _, need_offset, _, _ = ctx.needs_input_grad
        return (
            grad_offset / scale if need_grouped else None,  # d q / d w = inside (the weight is usually frozen)
            grad_scale if need_scale else None,
            None,
            grad_offset if need_offset else None,
            None,
            None,
        )


def _fused_int(weight: torch.Tensor, scheme: Scheme, offset: torch.Tensor | None,
               min_factor: torch.Tensor | None, max_factor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    grouped = to_groups(weight.float(), scheme)
    scale, zero = int_scale_zero(grouped, scheme, min_factor, max_factor)
    shaped_offset = None if offset is None else offset.reshape(grouped.shape)
    maxq = torch.tensor(float(2**scheme.bits - 1), device=weight.device)  # a tensor: one kernel for every bit width
    return from_groups(_IntQdq.apply(grouped, scale, zero.detach(), shaped_offset, maxq, dtype))


# --- MXFP4 ----------------------------------------------------------------------------------------


def _mx4_forward(grouped: torch.Tensor, exponent: torch.Tensor, offset: torch.Tensor | None,
                 dtype: torch.dtype) -> torch.Tensor:
    clamped = _shifted(grouped * torch.exp2(-exponent), offset).clamp(-FP4_MAX, FP4_MAX)
    return (torch.copysign(round_fp4_magnitude(clamped.abs()), clamped) * torch.exp2(exponent)).to(dtype)


def _mx4_backward(grad: torch.Tensor, grouped: torch.Tensor, exponent: torch.Tensor,
                  offset: torch.Tensor | None) -> torch.Tensor:
    """``grad * inside * 2^e``: the gradient of the offset."""
    grad = grad.float()
    shifted = _shifted(grouped * torch.exp2(-exponent), offset)
    inside = (shifted >= -FP4_MAX) & (shifted <= FP4_MAX)
    return torch.where(inside, grad, 0.0) * torch.exp2(exponent)


_MX4_FORWARD = _Kernel(_mx4_forward)
_MX4_BACKWARD = _Kernel(_mx4_backward)


class _Mx4Qdq(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, grouped: torch.Tensor, exponent: torch.Tensor, offset: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(grouped, exponent, offset)
        return _MX4_FORWARD(grouped, exponent, offset, dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grouped, exponent, offset = ctx.saved_tensors
        need_grouped, _, need_offset, _ = ctx.needs_input_grad
        if not (need_grouped or need_offset):
            return None, None, None, None
        grad_offset = _MX4_BACKWARD(grad.contiguous(), grouped, exponent, offset)
        # d q / d w = inside * 2^-e * 2^e = inside: the offset's gradient without the 2^e factor
        grad_grouped = grad_offset * torch.exp2(-exponent) if need_grouped else None
        return grad_grouped, None, grad_offset if need_offset else None, None


def _fused_mx4(weight: torch.Tensor, scheme: Scheme, offset: torch.Tensor | None,
               max_factor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    grouped = to_groups(weight.float(), scheme)
    exponent = mx_exponent(grouped, scheme.bits, max_factor).detach()
    shaped_offset = None if offset is None else offset.reshape(grouped.shape)
    return from_groups(_Mx4Qdq.apply(grouped, exponent, shaped_offset, dtype))


# --- clipping search -------------------------------------------------------------------------------


def _int_clip_errors(grouped: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor,
                     input_sq: torch.Tensor) -> torch.Tensor:
    quantized = ((torch.round(grouped / scale) + zero).clamp(min=0).minimum(maxq) - zero) * scale
    return ((quantized - grouped).pow(2) * input_sq).sum(-1)


def _mx4_clip_errors(grouped: torch.Tensor, exponent: torch.Tensor, input_sq: torch.Tensor) -> torch.Tensor:
    clamped = (grouped * torch.exp2(-exponent)).clamp(-FP4_MAX, FP4_MAX)
    quantized = torch.copysign(round_fp4_magnitude(clamped.abs()), clamped) * torch.exp2(exponent)
    return ((quantized - grouped).pow(2) * input_sq).sum(-1)


_INT_CLIP_ERRORS = _Kernel(_int_clip_errors)
_MX4_CLIP_ERRORS = _Kernel(_mx4_clip_errors)


@torch.no_grad()
def fused_clip_errors(weight: torch.Tensor, scheme: Scheme, factors: list[float], input_sq: torch.Tensor,
                      with_min: bool) -> torch.Tensor | None:
    """``sum_j input_sq_j (w_j - q(w)_j)^2`` per group of ``weight`` ``[out, in]`` round to nearest with
    each clipping factor in ``factors`` (on the group maximum, and on the minimum too when ``with_min``),
    ``[len(factors), out, groups]``, from one compiled pass that forms no quantized weight; None for
    schemes without a fused kernel (the caller quantizes once per factor instead).

    The group extremes are taken once: the scale of a group depends on its values only through them,
    so ``int_scale_zero`` and ``mx_exponent`` of the ``[out, groups, 2]`` extremes equal those of the group.
    """
    int_scheme = scheme.quantized and scheme.dtype == "int"
    mx4_scheme = scheme.quantized and scheme.dtype == "mxfp" and scheme.bits == 4 and not with_min
    if not (int_scheme or mx4_scheme):
        return None
    grouped = to_groups(weight.float(), scheme)
    extremes = torch.cat([grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)], dim=-1)
    shape = extremes.shape[:-1]
    full = [torch.full(shape, value, device=weight.device) for value in factors]
    sq = input_sq.to(weight.device).reshape(grouped.shape[1:])
    if int_scheme:
        scales, zeros = zip(*(int_scale_zero(extremes, scheme, f if with_min else None, f) for f in full), strict=True)
        maxq = torch.tensor(float(2**scheme.bits - 1), device=weight.device)
        return _INT_CLIP_ERRORS(grouped, torch.stack(scales), torch.stack(zeros), maxq, sq)
    exponents = torch.stack([mx_exponent(extremes, scheme.bits, f) for f in full])
    return _MX4_CLIP_ERRORS(grouped, exponents, sq)


def fused_fake_quantize(
    weight: torch.Tensor,
    scheme: Scheme,
    offset: torch.Tensor | None = None,
    min_factor: torch.Tensor | None = None,
    max_factor: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``fake_quantize`` with fused element-wise passes for int and MXFP4 schemes (same arguments,
    same values; gradients equal up to float summation order), in ``dtype`` (default: the
    weight's; the cast is part of the fused pass)."""
    dtype = weight.dtype if dtype is None else dtype
    if global_scale is not None:
        return fake_quantize(weight, scheme, offset, min_factor, max_factor, global_scale).to(dtype)
    if scheme.quantized and scheme.dtype == "int":
        return _fused_int(weight, scheme, offset, min_factor, max_factor, dtype)
    if scheme.quantized and scheme.dtype == "mxfp" and scheme.bits == 4 and min_factor is None:
        return _fused_mx4(weight, scheme, offset, max_factor, dtype)
    return fake_quantize(weight, scheme, offset, min_factor, max_factor, global_scale).to(dtype)
