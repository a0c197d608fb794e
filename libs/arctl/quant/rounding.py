"""Rounding onto the grids the schemes use; straight-through where the tuner needs gradients."""

from __future__ import annotations

import itertools

import torch

# Magnitudes of FP4 E2M1, indexed by the 3 low bits of a code.
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_MAX = 6.0
FP8_E4M3_MAX = 448.0

# Round-half-to-even boundaries between neighbouring E2M1 magnitudes. A tie goes to the value with an
# even mantissa: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4. torch.bucketize
# (right=False) sends a value equal to a boundary down, so boundaries whose tie goes up are nudged below.
_TIES_DOWN = (0.25, 1.25, 2.5, 5.0)
_TIES_UP = (0.75, 1.75, 3.5)


def _fp4_boundaries() -> torch.Tensor:
    mids = [(a + b) / 2 for a, b in itertools.pairwise(FP4_E2M1_VALUES)]
    bounds = torch.tensor(mids, dtype=torch.float32)
    for i, mid in enumerate(mids):
        if mid in _TIES_UP:
            bounds[i] = torch.nextafter(bounds[i], torch.tensor(0.0))
        elif mid not in _TIES_DOWN:
            raise AssertionError(f"unclassified FP4 tie {mid}")
    return bounds


_FP4_BOUNDS = _fp4_boundaries()
_FP4_TABLE = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round`` (half to even) with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()


def round_fp4_magnitude(magnitude: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 magnitude of ``magnitude >= 0``, ties to even, saturating at 6.

    The grid has step 0.5 below 2, 1 from 2 to 4 and 2 from 4 to 6, so rounding ``magnitude / step``
    half-to-even lands on the value with the even mantissa, as the table rounding in
    ``_FP4_BOUNDS`` defines it (a test checks both agree on every tie and between).
    """
    clipped = magnitude.clamp(max=FP4_MAX)
    step = torch.where(clipped < 2.0, 0.5, torch.where(clipped < 4.0, 1.0, 2.0))
    return torch.round(clipped / step) * step


def fp4_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code of each element (saturating at +-6), uint8 nibble: sign << 3 | index."""
    value = round_fp4_magnitude(x.detach().abs().float())
    index = torch.where(value < 2.0, value * 2.0, torch.where(value < 4.0, value + 2.0, value / 2.0 + 4.0))
    sign = ((x.detach() < 0) & (index > 0)).to(torch.uint8) << 3
    return index.to(torch.uint8) | sign


def fp4_codes_by_table(x: torch.Tensor) -> torch.Tensor:
    """The same codes by table look-up (slow; the definition the fast path is tested against)."""
    index = torch.bucketize(x.detach().abs().float().clamp(max=FP4_MAX), _FP4_BOUNDS.to(x.device))
    sign = (x.detach() < 0).to(torch.uint8) << 3
    return (index.to(torch.uint8) | sign) & torch.where(index == 0, 7, 15).to(torch.uint8)


def fp4_values(codes: torch.Tensor) -> torch.Tensor:
    """float32 value of each E2M1 nibble code."""
    magnitude = _FP4_TABLE.to(codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -magnitude, magnitude)


def round_fp4_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the E2M1 grid (saturating), straight-through gradient."""
    detached = x.detach()
    rounded = torch.copysign(round_fp4_magnitude(detached.abs()), detached)
    return x + (rounded.to(x.dtype) - detached)


def fp8_e4m3_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest E4M3 (fn) bit pattern of each element, saturating at +-448, as uint8."""
    return x.detach().float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def fp8_e4m3_values(codes: torch.Tensor) -> torch.Tensor:
    """float32 value of each E4M3 bit pattern."""
    return codes.view(torch.float8_e4m3fn).float()


def round_fp8_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the E4M3 grid (saturating), straight-through gradient."""
    return x + (fp8_e4m3_values(fp8_e4m3_codes(x)).to(x.dtype) - x).detach()
