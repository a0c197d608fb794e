"""Integer schemes: full-range symmetric (AutoRound's default) and asymmetric, per group.

Shapes: weight ``[out, in]`` -> codes uint8 ``[out, in]``, scales float16 ``[out, groups]``,
zeros uint8 ``[out, groups]`` (asym only).

Symmetric ("full range"): per group the extreme with the larger magnitude maps to ``-2**(b-1)``, so
``scale = -max / 2**(b-1)`` when the positive extreme dominates (the scale is then negative) and
``scale = |min| / 2**(b-1)`` otherwise; ``q = clamp(round(w / scale), -2**(b-1), 2**(b-1) - 1)``,
stored as ``q + 2**(b-1)``. Asymmetric: ``scale = (max - min) / (2**b - 1)``,
``zero = round(-min / scale)``, ``code = clamp(round(w / scale) + zero, 0, 2**b - 1)``. Group
minima and maxima include 0. Scales are rounded to float16, the dtype every INT format stores.

The optional ``offset`` (added before rounding) and ``min_factor`` / ``max_factor`` (shrinking the
group range) are SignRound's learnable parameters; with them unset this is round-to-nearest.
"""

from __future__ import annotations

import torch

from arctl.quant.grouping import from_groups, to_groups
from arctl.quant.rounding import round_ste
from arctl.quant.tensors import QuantizedTensor
from arctl.schemes import Scheme

# AutoRound clamps the fp16 scale to 1e-5 in fp16, i.e. to the fp16 value nearest 1e-5 (1.0014e-5); the
# floor must be representable in fp16, or the stored scale would differ from the one the codes used.
FP16_SCALE_FLOOR = float(torch.tensor(1e-5, dtype=torch.float16))


def _fp16_scale(raw: torch.Tensor) -> torch.Tensor:
    """Round scales to float16 (straight-through) and keep their magnitude >= the fp16 floor."""
    rounded = raw + (raw.detach().to(torch.float16).float() - raw.detach())
    floor = torch.full_like(rounded, FP16_SCALE_FLOOR)
    return torch.where(rounded < 0, torch.minimum(rounded, -floor), torch.maximum(rounded, floor))


def int_scale_zero(
    grouped: torch.Tensor,
    scheme: Scheme,
    min_factor: torch.Tensor | None = None,
    max_factor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per group of ``grouped`` ``[out, groups, width]``.

    Returns ``(scale, zero)``, both ``[out, groups, 1]`` float32; ``zero`` is an integer value
    (``2**(b-1)`` for symmetric schemes).
    """
    wmin = grouped.amin(dim=-1, keepdim=True).clamp(max=0)
    wmax = grouped.amax(dim=-1, keepdim=True).clamp(min=0)
    if min_factor is not None:
        wmin = wmin * min_factor.reshape(wmin.shape)
    if max_factor is not None:
        wmax = wmax * max_factor.reshape(wmax.shape)
    if scheme.sym:
        half = 2 ** (scheme.bits - 1)
        neg_dominates = -wmin > wmax
        signed_max = torch.where(neg_dominates, -wmin, -wmax)
        scale = _fp16_scale(signed_max / half)
        zero = torch.full_like(scale, float(half))
        return scale, zero
    levels = 2**scheme.bits - 1
    scale = _fp16_scale((wmax - wmin) / levels)
    zero = torch.round(-wmin.detach() / scale.detach()).clamp(0, levels)
    return scale, zero


def int_codes(
    grouped: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unsigned codes ``clamp(round(w / scale + offset) + zero, 0, 2**bits - 1)`` as float (STE)."""
    scaled = grouped / scale
    if offset is not None:
        scaled = scaled + offset.reshape(scaled.shape)
    return (round_ste(scaled) + zero).clamp(0, 2**bits - 1)


def quantize_int(
    weight: torch.Tensor,
    scheme: Scheme,
    offset: torch.Tensor | None = None,
    min_factor: torch.Tensor | None = None,
    max_factor: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Quantize ``weight`` ``[out, in]`` with an ``int`` scheme."""
    with torch.no_grad():
        grouped = to_groups(weight.float(), scheme)
        scale, zero = int_scale_zero(grouped, scheme, min_factor, max_factor)
        codes = int_codes(grouped, scale, zero, scheme.bits, offset)
    return QuantizedTensor(
        scheme=scheme,
        codes=from_groups(codes).to(torch.uint8),
        scales=scale.squeeze(-1).to(torch.float16),
        zeros=None if scheme.sym else zero.squeeze(-1).to(torch.uint8),
    )


def dequantize_int(qt: QuantizedTensor) -> torch.Tensor:
    """float32 ``[out, in]`` from an ``int`` QuantizedTensor."""
    grouped = to_groups(qt.codes.float(), qt.scheme)
    scale = qt.scales.float().unsqueeze(-1)
    if qt.zeros is None:
        zero = torch.full_like(scale, float(2 ** (qt.scheme.bits - 1)))
    else:
        zero = qt.zeros.float().unsqueeze(-1)
    return from_groups((grouped - zero) * scale)


def fake_quantize_int(
    weight: torch.Tensor,
    scheme: Scheme,
    offset: torch.Tensor | None = None,
    min_factor: torch.Tensor | None = None,
    max_factor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable quantize-dequantize (straight-through rounding), same dtype as ``weight``."""
    grouped = to_groups(weight.float(), scheme)
    scale, zero = int_scale_zero(grouped, scheme, min_factor, max_factor)
    codes = int_codes(grouped, scale, zero, scheme.bits, offset)
    return from_groups((codes - zero) * scale).to(weight.dtype)
