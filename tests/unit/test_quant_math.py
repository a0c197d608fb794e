"""Quantization math against hand-computed values, error bounds, fake-quant identity and gradients.

The expected numbers below are written out literally; the comments show the arithmetic by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from arctl.quant import QuantizedTensor, SchemeShapeError, dequantize, fake_quantize, quantize
from arctl.quant.floating import quantize_fp8, quantize_mx, quantize_nvfp4
from arctl.quant.integer import fake_quantize_int, quantize_int
from arctl.quant.rounding import fp4_codes, fp4_values, round_fp4_ste, round_ste
from arctl.schemes import PRESETS, get_scheme

QUANTIZED = sorted(name for name, scheme in PRESETS.items() if scheme.quantized)
_QUANTIZE_WITH_OFFSET = {
    "int": quantize_int,
    "mxfp": quantize_mx,
    "nvfp": quantize_nvfp4,
    "fp8": quantize_fp8,
}


def padded_row(values: list[float], width: int) -> torch.Tensor:
    """One ``[1, width]`` row: ``values`` then zeros."""
    row = torch.zeros(1, width)
    row[0, : len(values)] = torch.tensor(values)
    return row


def grouped_rows(groups: list[list[float]], width: int) -> torch.Tensor:
    """One ``[1, len(groups) * width]`` row, each group padded with zeros to ``width``."""
    return torch.cat([padded_row(group, width) for group in groups], dim=1)


def random_weight(seed: int, out_features: int = 8, in_features: int = 256) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.02
    # A few outliers, as real LLM weights have.
    weight[0, 3] = 0.25
    weight[1, in_features // 2 + 3] = -0.3
    return weight


def expand(per_group: torch.Tensor, in_features: int) -> torch.Tensor:
    """``[out, groups]`` -> ``[out, in]`` (each group's value repeated over its inputs)."""
    return per_group.repeat_interleave(in_features // per_group.shape[1], dim=1)


# --- INT, symmetric full range ---------------------------------------------------------------------


def test_int4_sym_negative_extreme_dominates() -> None:
    # min -1.0, max 0.5: |min| wins -> scale = 1.0 / 2**3 = 0.125 (positive), exact in fp16.
    # w / s      = -8,  4,  2, 0, 2.5, 3.5, -0.5, 0.8
    # round (even)= -8, 4,  2, 0, 2,   4,   -0,   1
    # code = q + 8 = 0, 12, 10, 8, 10, 12,  8,    9   (padding zeros -> 8)
    w = padded_row([-1.0, 0.5, 0.25, 0.0, 0.3125, 0.4375, -0.0625, 0.1], 32)
    qt = quantize(w, get_scheme("W4A16G32"))
    assert qt.scales.dtype == torch.float16
    assert qt.scales.tolist() == [[0.125]]
    assert qt.zeros is None
    assert qt.codes[0, :8].tolist() == [0, 12, 10, 8, 10, 12, 8, 9]
    assert qt.codes[0, 8:].tolist() == [8] * 24
    expected = [-1.0, 0.5, 0.25, 0.0, 0.25, 0.5, 0.0, 0.125]
    assert dequantize(qt)[0, :8].tolist() == expected
    assert dequantize(qt)[0, 8:].abs().sum().item() == 0.0


def test_int4_sym_positive_extreme_dominates_gives_negative_scale() -> None:
    # max 1.0 > |min| 0.9: scale = -1.0 / 8 = -0.125, the max maps to q = -8 (code 0).
    # w / s = -8, 4, -2.4, 0, 7.2, -7.6  -> round -8, 4, -2, 0, 7, -8 -> codes 0, 12, 6, 8, 15, 0
    # dequant q * -0.125 = 1.0, -0.5, 0.25, 0, -0.875, 1.0
    w = padded_row([1.0, -0.5, 0.3, 0.0, -0.9, 0.95], 32)
    qt = quantize(w, get_scheme("W4A16G32"))
    assert qt.scales.tolist() == [[-0.125]]
    assert qt.codes[0, :6].tolist() == [0, 12, 6, 8, 15, 0]
    assert dequantize(qt)[0, :6].tolist() == [1.0, -0.5, 0.25, 0.0, -0.875, 1.0]


def test_int4_sym_tie_and_clamp() -> None:
    # |min| == max: the positive extreme wins (as in AutoRound): scale -0.125.
    # 1.0 / -0.125 = -8 -> code 0; -1.0 / -0.125 = 8 -> clamped to 7 -> code 15 -> -0.875.
    w = padded_row([1.0, -1.0], 32)
    qt = quantize(w, get_scheme("W4A16G32"))
    assert qt.scales.tolist() == [[-0.125]]
    assert qt.codes[0, :2].tolist() == [0, 15]
    assert dequantize(qt)[0, :2].tolist() == [1.0, -0.875]


def test_int2_sym_full_range() -> None:
    # 2 bits: q in [-2, 1]; min -1.0 dominates -> scale 1.0 / 2 = 0.5.
    # w / s = -2, 1, 0.6, -0.4 -> -2, 1, 1, 0 -> codes (q + 2) 0, 3, 3, 2 -> -1.0, 0.5, 0.5, 0.0
    w = padded_row([-1.0, 0.5, 0.3, -0.2], 32)
    qt = quantize(w, get_scheme("W2A16G32"))
    assert qt.scales.tolist() == [[0.5]]
    assert qt.codes[0, :4].tolist() == [0, 3, 3, 2]
    assert dequantize(qt)[0, :4].tolist() == [-1.0, 0.5, 0.5, 0.0]


def test_int8_sym() -> None:
    # scale = 2.0 / 128 = 0.015625; w / s = -128, 64, 0.64 -> codes (q + 128) 0, 192, 129.
    w = padded_row([-2.0, 1.0, 0.01], 32)
    qt = quantize(w, get_scheme("W8A16G32"))
    assert qt.scales.tolist() == [[0.015625]]
    assert qt.codes[0, :3].tolist() == [0, 192, 129]
    assert dequantize(qt)[0, :3].tolist() == [-2.0, 1.0, 0.015625]


def test_int_sym_scale_is_rounded_to_fp16() -> None:
    # raw scale 0.3 / 8 = 0.0375; fp16 spacing in [2**-5, 2**-4) is 2**-15:
    # 0.0375 / 2**-15 = 1228.8 -> 1229 * 2**-15 = 0.037506103515625.
    # -0.3 / 0.037506103515625 = -7.9987 -> -8 -> code 0 -> dequant -8 * s = -0.300048828125.
    w = padded_row([-0.3, 0.15], 32)
    qt = quantize(w, get_scheme("W4A16G32"))
    assert qt.scales.float().tolist() == [[0.037506103515625]]
    # 0.15 / s = 3.9994 -> 4 -> code 12 -> 4 * s = 0.1500244140625
    assert qt.codes[0, :2].tolist() == [0, 12]
    assert dequantize(qt)[0, :2].tolist() == [-0.300048828125, 0.1500244140625]


def test_int_scale_floor_is_representable_in_fp16() -> None:
    # A group whose raw scale (4e-5 / 8 = 5e-6) is below the 1e-5 floor: the floor is the fp16
    # value nearest 1e-5, 168 * 2**-24 = 1.00135803222656e-05, so the stored fp16 scale is the
    # one the codes were computed with and dequantize(quantize) equals fake_quantize.
    w = padded_row([-4e-5, 2e-5], 32)
    scheme = get_scheme("W4A16G32")
    qt = quantize(w, scheme)
    assert qt.scales.float().tolist() == [[168 * 2**-24]]
    # -4e-5 / 1.0014e-5 = -3.9946 -> -4 -> code 4; 2e-5 / 1.0014e-5 = 1.997 -> 2 -> code 10
    assert qt.codes[0, :2].tolist() == [4, 10]
    assert torch.equal(dequantize(qt), fake_quantize(w, scheme))


def test_all_zero_int_group() -> None:
    w = torch.zeros(2, 64)
    for name in ("W4A16G32", "W4A16G32_ASYM", "W2A16G64"):
        qt = quantize(w, get_scheme(name))
        assert torch.equal(dequantize(qt), w)
        assert torch.isfinite(qt.scales.float()).all()


def test_int_per_channel() -> None:
    # One group per row: row 0 scale 2.0 / 8 = 0.25, row 1 scale -4.0 / 8 = -0.5.
    w = torch.tensor([[-2.0, 0.5, 1.0, 0.1], [4.0, -1.0, 0.0, 0.3]])
    qt = quantize(w, get_scheme("W4A16C"))
    assert qt.scales.tolist() == [[0.25], [-0.5]]
    # row 0: w / s = -8, 2, 4, 0.4 -> codes 0, 10, 12, 8; row 1: -8, 2, 0, -0.6 -> 0, 10, 8, 7
    assert qt.codes.tolist() == [[0, 10, 12, 8], [0, 10, 8, 7]]
    assert dequantize(qt).tolist() == [[-2.0, 0.5, 1.0, 0.0], [4.0, -1.0, 0.0, 0.5]]


# --- INT, asymmetric -------------------------------------------------------------------------------


def test_int2_asym_mixed_signs() -> None:
    # min -0.5, max 1.0: scale = 1.5 / 3 = 0.5, zero = round(0.5 / 0.5) = 1.
    # w / s = -1, 0, 0.8, 2 -> round -1, 0, 1, 2 -> + 1 -> codes 0, 1, 2, 3 -> -0.5, 0, 0.5, 1.0
    w = padded_row([-0.5, 0.0, 0.4, 1.0], 32)
    qt = quantize(w, get_scheme("W2A16G32_ASYM"))
    assert qt.scales.dtype == torch.float16
    assert qt.zeros is not None and qt.zeros.dtype == torch.uint8
    assert qt.scales.tolist() == [[0.5]]
    assert qt.zeros.tolist() == [[1]]
    assert qt.codes[0, :4].tolist() == [0, 1, 2, 3]
    assert qt.codes[0, 4:].tolist() == [1] * 28
    assert dequantize(qt)[0, :4].tolist() == [-0.5, 0.0, 0.5, 1.0]


def test_int2_asym_one_sided_groups_include_zero() -> None:
    # Group 0 all positive: min clamps to 0 -> scale 0.75 / 3 = 0.25, zero 0.
    #   w / s = 0.4, 3, 1.2, 2 -> codes 0, 3, 1, 2 -> 0, 0.75, 0.25, 0.5
    # Group 1 all negative: max clamps to 0 -> scale 0.25, zero = round(0.75 / 0.25) = 3.
    #   w / s = -3, -0.4, -1.6 -> -3, -0, -2 -> + 3 -> codes 0, 3, 1 -> -0.75, 0, -0.5
    w = grouped_rows([[0.1, 0.75, 0.3, 0.5], [-0.75, -0.1, -0.4]], 32)
    qt = quantize(w, get_scheme("W2A16G32_ASYM"))
    assert qt.scales.tolist() == [[0.25, 0.25]]
    assert qt.zeros.tolist() == [[0, 3]]
    assert qt.codes[0, :4].tolist() == [0, 3, 1, 2]
    assert qt.codes[0, 32:35].tolist() == [0, 3, 1]
    back = dequantize(qt)
    assert back[0, :4].tolist() == [0.0, 0.75, 0.25, 0.5]
    assert back[0, 32:35].tolist() == [-0.75, 0.0, -0.5]


def test_int4_asym_with_fp16_scale() -> None:
    # scale = (2.0 - -1.0) / 15 = 0.2 -> fp16 (spacing 2**-13 in [0.125, 0.25)):
    #   0.2 / 2**-13 = 1638.4 -> 1638 * 2**-13 = 0.199951171875
    # zero = round(1.0 / 0.199951171875) = round(5.0012) = 5
    # w / s = -5.0012, 10.0024, 1.5004 -> -5, 10, 2 -> + 5 -> codes 0, 15, 7
    # dequant (code - 5) * s = -0.999755859375, 1.99951171875, 0.39990234375
    w = padded_row([-1.0, 2.0, 0.3], 64)
    qt = quantize(w, get_scheme("W4A16G64_ASYM"))
    assert qt.scales.float().tolist() == [[0.199951171875]]
    assert qt.zeros.tolist() == [[5]]
    assert qt.codes[0, :3].tolist() == [0, 15, 7]
    assert dequantize(qt)[0, :3].tolist() == [-0.999755859375, 1.99951171875, 0.39990234375]


def test_int2_asym_clamps_above_with_max_factor() -> None:
    # max_factor 0.5 shrinks max 2.0 to 1.0: scale (1.0 + 0.5) / 3 = 0.5, zero 1.
    # w / s = -1, 0, 1, 4 -> + 1 -> 0, 1, 2, 5 -> clamp at 3 -> dequant -0.5, 0, 0.5, 1.0
    w = padded_row([-0.5, 0.0, 0.5, 2.0], 32)
    qt = quantize_int(w, get_scheme("W2A16G32_ASYM"), max_factor=torch.tensor([[0.5]]))
    assert qt.scales.tolist() == [[0.5]]
    assert qt.zeros.tolist() == [[1]]
    assert qt.codes[0, :4].tolist() == [0, 1, 2, 3]
    assert dequantize(qt)[0, :4].tolist() == [-0.5, 0.0, 0.5, 1.0]


def test_int2_asym_clamps_below_with_min_factor() -> None:
    # min_factor 0.5 shrinks min -2.0 to -1.0: scale (0.5 + 1.0) / 3 = 0.5, zero round(2) = 2.
    # w / s = -4, 0, 0.5, 1 -> round -4, 0, 0 (half to even), 1 -> + 2 -> -2, 2, 2, 3 -> clamp 0
    w = padded_row([-2.0, 0.0, 0.25, 0.5], 32)
    qt = quantize_int(w, get_scheme("W2A16G32_ASYM"), min_factor=torch.tensor([[0.5]]))
    assert qt.zeros.tolist() == [[2]]
    assert qt.codes[0, :4].tolist() == [0, 2, 2, 3]
    assert dequantize(qt)[0, :4].tolist() == [-1.0, 0.0, 0.0, 0.5]


def test_int4_sym_clamps_with_max_factor() -> None:
    # max 2.0 * 0.5 = 1.0 ties |min| 1.0 -> positive wins -> scale -0.125.
    # w / s = 8, -16, -4 -> clamp to [-8, 7] -> 7, -8, -4 -> codes 15, 0, 4 -> -0.875, 1.0, 0.5
    w = padded_row([-1.0, 2.0, 0.5], 32)
    scheme = get_scheme("W4A16G32")
    factor = torch.tensor([[0.5]])
    qt = quantize_int(w, scheme, max_factor=factor)
    assert qt.scales.tolist() == [[-0.125]]
    assert qt.codes[0, :3].tolist() == [15, 0, 4]
    assert dequantize(qt)[0, :3].tolist() == [-0.875, 1.0, 0.5]
    assert torch.equal(fake_quantize(w, scheme, max_factor=factor), dequantize(qt))


def test_int_offset_shifts_rounding() -> None:
    # offset +0.5 turns round-to-nearest into round-up at ties: w / s = 0.8 + 0.5 -> 1 (code 9),
    # 0.25 / 0.125 = 2 + 0.5 = 2.5 -> 2 (half to even), -1.0 -> -8 + 0.5 = -7.5 -> -8 (code 0).
    w = padded_row([-1.0, 0.1, 0.25], 32)
    offset = torch.zeros_like(w)
    offset[0, :3] = 0.5
    qt = quantize_int(w, get_scheme("W4A16G32"), offset=offset)
    assert qt.codes[0, :3].tolist() == [0, 9, 10]


# --- rounding primitives ---------------------------------------------------------------------------


def test_round_ste_half_to_even_and_identity_gradient() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49, 2.51], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 0.0, 3.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0] * 7


def test_fp4_e2m1_rounding_ties_to_even_and_saturation() -> None:
    x = torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, 0.24, 0.26, 2.6, 4.9, 5.1, 6.0])
    # grid 0, 0.5, 1, 1.5, 2, 3, 4, 6: ties go to the even mantissa (0, 1, 2, 4); > 6 saturates.
    expected = [0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 0.0, 0.5, 3.0, 4.0, 6.0, 6.0]
    codes = fp4_codes(x)
    assert codes.dtype == torch.uint8
    assert codes.tolist() == [0, 0, 2, 2, 4, 4, 6, 6, 7, 7, 0, 1, 5, 6, 7, 7]
    assert fp4_values(codes).tolist() == expected
    assert round_fp4_ste(x).tolist() == expected


def test_fp4_negative_codes_set_bit_3() -> None:
    x = torch.tensor([-0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -7.0, -0.5, -3.0])
    codes = fp4_codes(x)
    # sign bit 8 | magnitude index; a value rounding to zero is stored as +0 (code 0)
    assert codes.tolist() == [0, 10, 10, 12, 12, 14, 14, 15, 9, 13]
    assert fp4_values(codes).tolist() == [0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0, -6.0, -0.5, -3.0]


def test_fp4_value_table() -> None:
    values = fp4_values(torch.arange(16, dtype=torch.uint8))
    assert values.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6]
    # Every code but -0 (8) round-trips through fp4_codes.
    codes = torch.tensor([c for c in range(16) if c != 8], dtype=torch.uint8)
    assert fp4_codes(fp4_values(codes)).tolist() == codes.tolist()


def test_round_fp4_ste_gradient_is_identity() -> None:
    x = torch.tensor([0.3, -2.6, 4.9], requires_grad=True)
    round_fp4_ste(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]


# --- MXFP4 / MXFP8 ---------------------------------------------------------------------------------


def test_mxfp4_hand_computed() -> None:
    scheme = get_scheme("MXFP4")
    w = grouped_rows(
        [
            # amax 3.0: e = floor(log2 3) - 2 = 1 - 2 = -1, E8M0 126; elements w * 2:
            # 6, -2.6, 0.4, 1.2, 4.4, -1.6, 1.4 -> 6, -3, 0.5, 1, 4, -1.5, 1.5
            [3.0, -1.3, 0.2, 0.6, 2.2, -0.8, 0.7],
            # amax 3.9: e = -1 too; 7.8 saturates to 6 -> 3.0; -0.2 -> 0; 2.0 -> 1.0
            [3.9, -0.1, 1.0],
            # all zero: e = -127, E8M0 0
            [],
            # amax 0.75: log2 = -0.415 -> floor -1 -> e = -3, E8M0 124; w * 8 = 6, 0.8 -> 6, 1
            [0.75, 0.1],
            # amax 8.0: e = 3 - 2 = 1, E8M0 128; w / 2 = 4, 2.5, -3.5 -> 4, 2 (tie even), -4
            [8.0, 5.0, -7.0],
        ],
        32,
    )
    qt = quantize(w, scheme)
    assert qt.scales.dtype == torch.uint8
    assert qt.scales.tolist() == [[126, 126, 0, 124, 128]]
    codes = qt.codes[0]
    assert codes[0:7].tolist() == [7, 13, 1, 2, 6, 11, 3]
    assert codes[32:35].tolist() == [7, 0, 4]
    assert codes[64:96].tolist() == [0] * 32
    assert codes[96:98].tolist() == [7, 2]
    assert codes[128:131].tolist() == [6, 4, 14]
    back = dequantize(qt)[0]
    assert back[0:7].tolist() == [3.0, -1.5, 0.25, 0.5, 2.0, -0.75, 0.75]
    assert back[32:35].tolist() == [3.0, 0.0, 1.0]
    assert back[64:96].tolist() == [0.0] * 32
    assert back[96:98].tolist() == [0.75, 0.125]
    assert back[128:131].tolist() == [8.0, 4.0, -8.0]


def test_mxfp4_exponent_just_below_a_power_of_two() -> None:
    # amax = largest float32 below 4: floor(log2) is 1, not 2 -> e = -1, E8M0 126.
    below_four = torch.nextafter(torch.tensor(4.0), torch.tensor(0.0)).item()
    qt = quantize(padded_row([below_four], 32), get_scheme("MXFP4"))
    assert qt.scales.tolist() == [[126]]


def test_mxfp_exponent_clamped_at_minus_127() -> None:
    # amax 2**-130: floor(log2) - 2 = -132 -> clamped to -127 (E8M0 0); element 2**-130 * 2**127
    # = 0.125 -> E2M1 rounds to 0 (0.125 < 0.25) -> dequant 0.
    qt = quantize(padded_row([2.0**-130], 32), get_scheme("MXFP4"))
    assert qt.scales.tolist() == [[0]]
    assert dequantize(qt)[0, 0].item() == 0.0


def test_mxfp8_hand_computed() -> None:
    scheme = get_scheme("MXFP8")
    w = grouped_rows(
        [
            # amax 3.0: e = 1 - 8 = -7, E8M0 120; elements w * 128:
            # 384 (exact), 166.4 -> 160 (step 16), -1.28 -> -1.25 (step 0.125), 25.6 -> 26 (step 2)
            [3.0, 1.3, -0.01, 0.2],
            # amax 3.9: e = -7; 499.2 saturates to 448 -> 3.5
            [3.9, -1.0],
            # amax 1.0: e = 0 - 8 = -8, E8M0 119; 1.0 * 256 = 256
            [1.0],
            [],
        ],
        32,
    )
    qt = quantize(w, scheme)
    assert qt.scales.dtype == torch.uint8
    assert qt.scales.tolist() == [[120, 120, 119, 0]]
    # E4M3 bit patterns: 384 = 0b0_1111_100, 160 = 0b0_1110_010, -1.25 = 0b1_0111_010, 26 = 0b0_1011_101
    assert qt.codes[0, :4].tolist() == [124, 114, 186, 93]
    # 448 = 0b0_1111_110 = 126; -128 (= -1.0 * 128) = 0b1_1110_000 = 240
    assert qt.codes[0, 32:34].tolist() == [126, 240]
    back = dequantize(qt)[0]
    assert back[:4].tolist() == [3.0, 1.25, -0.009765625, 0.203125]
    assert back[32:34].tolist() == [3.5, -1.0]
    assert back[64].item() == 1.0
    assert back[96:].tolist() == [0.0] * 32


def test_mx_offset_is_in_element_units() -> None:
    # amax 3.0, e = -1: 1.2 + 0.4 = 1.6 -> 1.5 -> 0.75 (without the offset 1.2 -> 1.0 -> 0.5)
    w = padded_row([3.0, 0.6], 32)
    offset = torch.zeros_like(w)
    offset[0, 1] = 0.4
    qt = quantize_mx(w, get_scheme("MXFP4"), offset=offset)
    assert dequantize(qt)[0, :2].tolist() == [3.0, 0.75]


# --- NVFP4 -----------------------------------------------------------------------------------------


def test_nvfp4_hand_computed() -> None:
    w = grouped_rows(
        [
            # amax(W) = 6 -> global = 448 * 6 / 6 = 448.
            # block amax 6: s = e4m3(448 * 6 / 6) = 448; elements w * 448 / 448 = w:
            # 6, -2.5 -> -2 (tie even), 1, 0.7 -> 0.5
            [6.0, -2.5, 1.0, 0.7],
            # block amax 1.5: s = e4m3(448 * 1.5 / 6 = 112) = 112; elements 4w = 6, 1.2 -> 1, -2.4 -> -2
            # dequant code * 112 / 448 = 1.5, 0.25, -0.5
            [1.5, 0.3, -0.6],
            # block amax 1.0: raw 448 / 6 = 74.67 -> e4m3 (step 8 in [64, 128)) = 72;
            # elements w * 448 / 72 = 6.22 -> 6 (saturate), 3.11 -> 3, -1.56 -> -1.5
            # dequant 6 * 72 / 448 = 0.9642857, 3 * 72 / 448 = 0.4821429, -1.5 * 72 / 448 = -0.2410714
            [1.0, 0.5, -0.25],
            # zero block: s = 0, codes 0, values 0
            [],
        ],
        16,
    )
    qt = quantize(w, get_scheme("NVFP4"))
    assert qt.global_scale is not None
    assert qt.global_scale.dtype == torch.float32
    assert qt.global_scale.tolist() == [448.0]
    assert qt.scales.dtype == torch.float8_e4m3fn
    assert qt.scales.float().tolist() == [[448.0, 112.0, 72.0, 0.0]]
    codes = qt.codes[0]
    assert codes[0:4].tolist() == [7, 12, 2, 1]
    assert codes[16:19].tolist() == [7, 2, 12]
    assert codes[32:35].tolist() == [7, 5, 11]
    assert codes[48:].tolist() == [0] * 16
    back = dequantize(qt)[0]
    assert back[0:4].tolist() == [6.0, -2.0, 1.0, 0.5]
    assert back[16:19].tolist() == [1.5, 0.25, -0.5]
    torch.testing.assert_close(
        back[32:35],
        torch.tensor([0.9642857142857143, 0.48214285714285715, -0.24107142857142858]),
        rtol=1e-6,
        atol=0,
    )
    assert back[48:].tolist() == [0.0] * 16


def test_nvfp4_dequant_is_code_times_scale_over_global() -> None:
    w = random_weight(5, 4, 64)
    qt = quantize(w, get_scheme("NVFP4"))
    amax = w.abs().max().item()
    assert qt.global_scale.item() == pytest.approx(448 * 6 / amax, rel=1e-6)
    manual = fp4_values(qt.codes) * expand(qt.scales.float(), 64) / qt.global_scale
    assert torch.equal(dequantize(qt), manual)


def test_nvfp4_needs_global_scale() -> None:
    qt = quantize(random_weight(6, 2, 32), get_scheme("NVFP4"))
    without = QuantizedTensor(qt.scheme, qt.codes, qt.scales)
    with pytest.raises(ValueError, match="global scale"):
        dequantize(without)


def test_nvfp4_all_zero_weight() -> None:
    qt = quantize(torch.zeros(2, 32), get_scheme("NVFP4"))
    assert qt.global_scale.tolist() == [1.0]
    assert torch.equal(dequantize(qt), torch.zeros(2, 32))


# --- FP8 per channel -------------------------------------------------------------------------------


def test_fp8_per_channel_hand_computed() -> None:
    w = torch.tensor(
        [
            # amax 3.5 = 448 * 2**-7 -> scale 2**-7 exactly; w / s = 448, 224, -64, 1, 2**-9, 12.8
            # all exact in E4M3 except 12.8 -> 13 (step 1 in [8, 16)) -> 13 / 128 = 0.1015625
            [3.5, 1.75, -0.5, 0.0078125, 2.0**-16, 0.1],
            # amax 448 -> scale 1; 0.3 -> 0.3125 (step 1/32 in [0.25, 0.5)); -0.0 stays 0
            [448.0, -448.0, 0.3, 2.0, -0.0, 0.0],
            # all zero: scale floor 1 / (448 * 512), codes 0
            [0.0] * 6,
        ]
    )
    qt = quantize(w, get_scheme("FP8"))
    assert qt.scales.dtype == torch.float32
    assert qt.scales.shape == (3, 1)
    assert qt.scales.tolist() == [[2.0**-7], [1.0], [pytest.approx(1 / (448 * 512))]]
    # E4M3 patterns: 448 = 0x7E, 224 = 0x76, -64 = 0xE8, 1 = 0x38, 2**-9 = 0x01 (subnormal), 13 = 0x55
    assert qt.codes[0].tolist() == [126, 118, 232, 56, 1, 85]
    back = dequantize(qt)
    assert back[0].tolist() == [3.5, 1.75, -0.5, 0.0078125, 2.0**-16, 0.1015625]
    assert back[1].tolist() == [448.0, -448.0, 0.3125, 2.0, 0.0, 0.0]
    assert back[2].tolist() == [0.0] * 6


def test_fp8_scale_is_row_amax_over_448() -> None:
    w = random_weight(7, 6, 64)
    qt = quantize(w, get_scheme("FP8"))
    torch.testing.assert_close(qt.scales, w.abs().amax(dim=1, keepdim=True) / 448, rtol=0, atol=0)
    # The row maximum is 448 * scale (up to one float32 rounding of the scale).
    row_max = dequantize(qt).abs().amax(dim=1)
    torch.testing.assert_close(row_max, w.abs().amax(dim=1), rtol=1e-6, atol=0)


# --- error bounds on random weights ----------------------------------------------------------------


def _half_step_fp4(x: torch.Tensor) -> torch.Tensor:
    """Half the E2M1 grid step around |x| (steps 0.5 below 2, 1 below 4, 2 above)."""
    ax = x.abs()
    return torch.where(ax < 2, 0.25, torch.where(ax < 4, 0.5, 1.0))


def _half_step_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Half the E4M3 grid step around |x|: 2**(floor(log2|x|) - 3) / 2, subnormal step 2**-9."""
    ax = x.abs().clamp(min=2.0**-6)
    return torch.exp2(torch.floor(torch.log2(ax)) - 3) / 2


def _element_bound(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Largest |rounded - x| in element units: half a step, or the distance past saturation."""
    if bits == 4:
        return torch.maximum(_half_step_fp4(x), x.abs() - 6.0)
    return torch.maximum(_half_step_e4m3(x), x.abs() - 448.0)


def _check_int_bound(w: torch.Tensor, qt: QuantizedTensor) -> None:
    scheme = qt.scheme
    in_features = w.shape[1]
    scale = expand(qt.scales.float(), in_features)
    err = (dequantize(qt) - w).abs()
    t = w / scale
    tiny = 1e-6 * w.abs() + 1e-9
    if scheme.sym:
        half = 2 ** (scheme.bits - 1)
        # Rounding error is half a step. Only the non-dominant extreme can pass the top code
        # half - 1 (by at most 1 + half * 2**-10 steps, the fp16 rounding of the scale).
        clipped = t > half - 0.5
        assert bool((err[~clipped] <= scale.abs()[~clipped] / 2 + tiny[~clipped]).all())
        assert bool((err[clipped] <= scale.abs()[clipped] * (1 + half / 1024) + tiny[clipped]).all())
    else:
        levels = 2**scheme.bits - 1
        zero = expand(qt.zeros.float(), in_features)
        # Codes never clip below 0 (round(-b) + round(b) = 0); above, w / s + zero can pass
        # `levels` by the fp16 rounding of the scale (< levels * 2**-10) plus the zero's rounding (0.5).
        clipped = torch.round(t) + zero > levels
        assert bool((err[~clipped] <= scale[~clipped] / 2 + tiny[~clipped]).all())
        assert bool((err[clipped] <= scale[clipped] * (0.5 + levels / 1024) + tiny[clipped]).all())
        assert bool((torch.round(t) + zero >= 0).all())
    assert clipped.float().mean().item() < 0.05


@pytest.mark.parametrize("name", sorted(n for n, s in PRESETS.items() if s.dtype == "int"))
def test_int_round_trip_error_bound(name: str) -> None:
    w = random_weight(11)
    _check_int_bound(w, quantize(w, get_scheme(name)))


@pytest.mark.parametrize("name", ["MXFP4", "MXFP8"])
def test_mx_round_trip_error_bound(name: str) -> None:
    w = random_weight(12)
    qt = quantize(w, get_scheme(name))
    # Independent check of the shared exponent: floor(log2 amax) via frexp, minus emax.
    emax = 2 if qt.scheme.bits == 4 else 8
    amax = w.reshape(w.shape[0], -1, 32).abs().amax(dim=-1)
    expected = [[math.frexp(a)[1] - 1 - emax + 127 for a in row] for row in amax.tolist()]
    assert qt.scales.tolist() == expected
    scale = torch.exp2(expand(qt.scales.float(), w.shape[1]) - 127)
    x = w / scale
    err = (dequantize(qt) - w).abs()
    assert bool((err <= _element_bound(x, qt.scheme.bits) * scale * (1 + 1e-6)).all())


def test_nvfp4_round_trip_error_bound() -> None:
    w = random_weight(13)
    qt = quantize(w, get_scheme("NVFP4"))
    step = expand(qt.scales.float(), w.shape[1]) / qt.global_scale
    x = w / step
    err = (dequantize(qt) - w).abs()
    assert bool((err <= _element_bound(x, 4) * step * (1 + 1e-5)).all())


def test_fp8_round_trip_error_bound() -> None:
    w = random_weight(14)
    qt = quantize(w, get_scheme("FP8"))
    x = w / qt.scales
    err = (dequantize(qt) - w).abs()
    assert bool((err <= _element_bound(x, 8) * qt.scales * (1 + 1e-5)).all())
    # E4M3 keeps 3 mantissa bits: relative error of normal values at most 2**-4.
    normal = x.abs() >= 2.0**-6
    assert bool((err[normal] <= w.abs()[normal] * 2.0**-4 * (1 + 1e-5)).all())


def _relative_error(w: torch.Tensor, name: str) -> float:
    return ((dequantize(quantize(w, get_scheme(name))) - w).norm() / w.norm()).item()


@pytest.mark.parametrize("suffix", ["G32", "G64", "", "G32_ASYM", "G64_ASYM", "_ASYM"])
def test_relative_error_decreases_with_bits(suffix: str) -> None:
    w = random_weight(21, 16, 256)
    errors = [_relative_error(w, f"W{bits}A16{suffix}") for bits in (2, 3, 4, 5, 6, 8)]
    assert errors == sorted(errors, reverse=True)
    assert len(set(errors)) == len(errors)
    # Each extra bit roughly halves the error; 8 bits is far below 2 bits.
    assert errors[-1] < errors[0] / 30


def test_relative_error_grows_with_group_size() -> None:
    w = random_weight(22, 16, 256)
    for bits in (2, 4):
        errors = [_relative_error(w, f"W{bits}A16{g}") for g in ("G32", "G64", "", "C")]
        assert errors == sorted(errors)


def test_relative_error_of_float_formats() -> None:
    w = random_weight(23, 16, 256)
    errors = {name: _relative_error(w, name) for name in ("MXFP4", "NVFP4", "MXFP8", "FP8")}
    assert errors["NVFP4"] < errors["MXFP4"]
    assert errors["MXFP8"] < errors["MXFP4"] / 4
    assert errors["FP8"] < errors["NVFP4"] / 3
    assert all(0 < e < 0.2 for e in errors.values())


# --- fake quantization -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", QUANTIZED)
def test_fake_quantize_equals_dequantize_of_quantize(name: str) -> None:
    scheme = get_scheme(name)
    w = random_weight(31)
    assert torch.equal(dequantize(quantize(w, scheme)), fake_quantize(w, scheme))


@pytest.mark.parametrize("name", ["W4A16G32", "W2A16G64_ASYM", "MXFP4", "MXFP8", "NVFP4", "FP8"])
def test_fake_quantize_equals_dequantize_with_offset(name: str) -> None:
    scheme = get_scheme(name)
    w = random_weight(32)
    offset = (torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) - 0.5) * 0.6
    qt = _QUANTIZE_WITH_OFFSET[scheme.dtype](w, scheme, offset=offset)
    assert torch.equal(dequantize(qt), fake_quantize(w, scheme, offset=offset))
    # The offset really changed something.
    assert not torch.equal(dequantize(qt), dequantize(quantize(w, scheme)))


def test_fake_quantize_keeps_dtype() -> None:
    w = random_weight(33).to(torch.bfloat16)
    for name in ("W4A16G32", "MXFP4", "NVFP4", "FP8"):
        out = fake_quantize(w, get_scheme(name))
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, dequantize(quantize(w, get_scheme(name))).to(torch.bfloat16))


def test_bf16_fake_quantize_rounds_to_bfloat16_and_quantize_refuses() -> None:
    w = torch.tensor([[1.0 + 2.0**-10, 3.0]])
    out = fake_quantize(w, get_scheme("BF16"))
    # bfloat16 has 7 mantissa bits: 1 + 2**-10 -> 1.0
    assert out.dtype == torch.float32
    assert out.tolist() == [[1.0, 3.0]]
    with pytest.raises(ValueError, match="BF16"):
        quantize(w, get_scheme("BF16"))


@pytest.mark.parametrize("name", QUANTIZED)
def test_fake_quantize_passes_gradients(name: str) -> None:
    scheme = get_scheme(name)
    w = random_weight(41).requires_grad_(True)
    offset = torch.zeros_like(w, requires_grad=True)
    out = fake_quantize(w, scheme, offset=offset)
    out.sum().backward()
    assert offset.grad is not None
    assert offset.grad.abs().sum().item() > 0
    assert bool((offset.grad != 0).float().mean() > 0.9)
    assert w.grad is not None
    assert torch.isfinite(w.grad).all()
    assert w.grad.abs().sum().item() > 0


def test_int_offset_gradient_is_the_scale() -> None:
    # d/d offset of (round_ste(w / s + offset) * s) is s wherever the code is not clamped.
    scheme = get_scheme("W4A16G32")
    w = random_weight(42)
    offset = torch.zeros_like(w, requires_grad=True)
    fake_quantize(w, scheme, offset=offset).sum().backward()
    qt = quantize(w, scheme)
    scale = expand(qt.scales.float(), w.shape[1])
    inside = (qt.codes > 0) & (qt.codes < 15)
    assert torch.equal(offset.grad[inside], scale[inside])


def test_max_factor_gradient_exists() -> None:
    w = random_weight(43)
    factor = torch.ones(8, 8, requires_grad=True)
    lo = torch.ones(8, 8, requires_grad=True)
    out = fake_quantize_int(w, get_scheme("W4A16G32_ASYM"), min_factor=lo, max_factor=factor)
    out.pow(2).sum().backward()
    assert factor.grad is not None and factor.grad.abs().sum().item() > 0
    assert lo.grad is not None and lo.grad.abs().sum().item() > 0


# --- shapes and dtypes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "in_features"), [("W4A16", 576), ("W2A16G64_ASYM", 96), ("MXFP4", 48), ("NVFP4", 40)]
)
def test_shape_error_names_the_scheme(name: str, in_features: int) -> None:
    w = torch.randn(4, in_features)
    scheme = get_scheme(name)
    with pytest.raises(SchemeShapeError) as info:
        quantize(w, scheme)
    assert name in str(info.value)
    assert str(in_features) in str(info.value)
    with pytest.raises(SchemeShapeError):
        fake_quantize(w, scheme)


def test_shape_error_for_non_matrix() -> None:
    with pytest.raises(SchemeShapeError):
        quantize(torch.randn(64), get_scheme("W4A16G32"))
    assert issubclass(SchemeShapeError, ValueError)


def test_576_wide_rows_with_fitting_schemes() -> None:
    w = torch.randn(2, 576, generator=torch.Generator().manual_seed(0))
    for name in ("W4A16G64", "W4A16G32", "MXFP4", "NVFP4", "FP8", "W4A16C"):
        assert dequantize(quantize(w, get_scheme(name))).shape == (2, 576)


@pytest.mark.parametrize("name", QUANTIZED)
def test_stored_dtypes_and_shapes(name: str) -> None:
    scheme = get_scheme(name)
    w = random_weight(51)
    qt = quantize(w, scheme)
    out_features, in_features = w.shape
    groups = 1 if scheme.group_size == -1 else in_features // scheme.group_size
    assert qt.shape == (out_features, in_features)
    assert qt.codes.dtype == torch.uint8
    assert qt.codes.shape == (out_features, in_features)
    assert qt.scales.shape == (out_features, groups)
    if scheme.dtype == "int":
        assert qt.scales.dtype == torch.float16
        assert int(qt.codes.max()) <= 2**scheme.bits - 1
        # Every group's extreme lands on code 0; the codes spread over the whole range.
        assert int(qt.codes.min()) == 0
        assert len(qt.codes.unique()) > 2**scheme.bits // 2
        if scheme.sym:
            assert qt.zeros is None
        else:
            assert qt.zeros is not None
            assert qt.zeros.dtype == torch.uint8
            assert qt.zeros.shape == (out_features, groups)
            assert int(qt.zeros.max()) <= 2**scheme.bits - 1
        assert qt.global_scale is None
    elif scheme.dtype == "mxfp":
        assert qt.scales.dtype == torch.uint8
        assert qt.zeros is None and qt.global_scale is None
        if scheme.bits == 4:
            assert int(qt.codes.max()) <= 15
    elif scheme.dtype == "nvfp":
        assert qt.scales.dtype == torch.float8_e4m3fn
        assert int(qt.codes.max()) <= 15
        assert qt.global_scale is not None
        assert qt.global_scale.dtype == torch.float32 and qt.global_scale.shape == (1,)
    else:
        assert scheme.dtype == "fp8"
        assert qt.scales.dtype == torch.float32
        assert qt.scales.shape == (out_features, 1)
        assert qt.zeros is None and qt.global_scale is None


def test_low_precision_inputs_match_float32() -> None:
    w = random_weight(52).to(torch.float16)
    for name in ("W4A16G32", "W3A16G64_ASYM", "MXFP4", "NVFP4", "FP8"):
        scheme = get_scheme(name)
        a = quantize(w, scheme)
        b = quantize(w.float(), scheme)
        assert torch.equal(a.codes, b.codes)
        assert torch.equal(a.scales.float(), b.scales.float())
