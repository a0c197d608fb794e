"""True bit accounting: codes + scales + zeros, per layer and averaged over a model."""

from __future__ import annotations

import pytest

from arctl.bits import LayerBits, layer_bits, model_bits
from arctl.schemes import get_scheme


@pytest.mark.parametrize(
    ("name", "out_features", "in_features", "per_weight"),
    [
        # 4 + 16 / 128
        ("W4A16", 256, 1024, 4.125),
        # 4 + (16 fp16 scale + 4 packed zero) / 64
        ("W4A16G64_ASYM", 256, 1024, 4 + (16 + 4) / 64),
        ("W4A16G64", 256, 1024, 4.25),
        # 2 + (16 + 2) / 32
        ("W2A16G32_ASYM", 256, 1024, 2.5625),
        ("W2A16G32", 256, 1024, 2.5),
        # 3 + 16 / 128
        ("W3A16", 256, 1024, 3.125),
        # 8 + (16 + 8) / 32
        ("W8A16G32_ASYM", 256, 1024, 8.75),
        # 4 + 8 / 32
        ("MXFP4", 256, 1024, 4.25),
        # 8 + 8 / 32
        ("MXFP8", 256, 1024, 8.25),
        # 16 bits per weight, nothing else
        ("BF16", 256, 1024, 16.0),
        # per channel: 8 + 32 / 1024
        ("FP8", 256, 1024, 8 + 32 / 1024),
        # per channel int: 4 + 16 / 1024
        ("W4A16C", 256, 1024, 4 + 16 / 1024),
        ("W4A16C_ASYM", 256, 1024, 4 + 20 / 1024),
    ],
)
def test_per_weight_bits(name: str, out_features: int, in_features: int, per_weight: float) -> None:
    bits = layer_bits(get_scheme(name), out_features, in_features)
    assert bits.weights == out_features * in_features
    assert bits.per_weight == pytest.approx(per_weight, abs=1e-12)


def test_int4_g128_sym_is_4_125_exactly() -> None:
    bits = layer_bits(get_scheme("W4A16"), 4096, 4096)
    assert bits.code_bits == 4096 * 4096 * 4
    assert bits.scale_bits == 4096 * 32 * 16
    assert bits.zero_bits == 0
    assert bits.per_weight == 4.125


def test_int4_g64_asym_parts() -> None:
    bits = layer_bits(get_scheme("W4A16G64_ASYM"), 10, 128)
    # 1280 weights, 20 groups: codes 5120, scales 20 * 16 = 320, zeros 20 * 4 = 80
    assert (bits.code_bits, bits.scale_bits, bits.zero_bits) == (5120, 320, 80)
    assert bits.total == 5520
    assert bits.per_weight == 4.3125


def test_nvfp4_is_4_5_plus_one_global_scale_per_tensor() -> None:
    bits = layer_bits(get_scheme("NVFP4"), 64, 256)
    weights = 64 * 256
    # 4 bits per code, 8 bits per 16-block scale, plus 32 bits of fp32 global scale
    assert bits.code_bits == 4 * weights
    assert bits.scale_bits == 8 * weights // 16 + 32
    assert bits.total == 4.5 * weights + 32
    assert bits.per_weight == pytest.approx(4.5 + 32 / weights, abs=1e-12)
    big = layer_bits(get_scheme("NVFP4"), 4096, 4096)
    assert big.per_weight == pytest.approx(4.5, abs=1e-5)


def test_mx_parts() -> None:
    bits = layer_bits(get_scheme("MXFP4"), 2, 64)
    # 128 weights: codes 512, 4 groups of E8M0 = 32 bits
    assert (bits.code_bits, bits.scale_bits, bits.zero_bits) == (512, 32, 0)
    assert bits.per_weight == 4.25


def test_fp8_per_channel_parts() -> None:
    bits = layer_bits(get_scheme("FP8"), 3, 576)
    assert (bits.code_bits, bits.scale_bits, bits.zero_bits) == (3 * 576 * 8, 3 * 32, 0)


def test_bf16_has_no_overhead() -> None:
    bits = layer_bits(get_scheme("BF16"), 576, 576)
    assert (bits.code_bits, bits.scale_bits, bits.zero_bits) == (576 * 576 * 16, 0, 0)
    assert bits.per_weight_codes_only == 16.0


@pytest.mark.parametrize(
    ("name", "codes_only"),
    [("W4A16", 4.0), ("W2A16G32_ASYM", 2.0), ("MXFP4", 4.0), ("MXFP8", 8.0), ("NVFP4", 4.0), ("FP8", 8.0)],
)
def test_codes_only_figure(name: str, codes_only: float) -> None:
    bits = layer_bits(get_scheme(name), 128, 512)
    assert bits.per_weight_codes_only == codes_only
    assert bits.per_weight > codes_only


def test_576_wide_layers() -> None:
    # SmolLM2 q_proj 576 x 576 with W4 g64 sym: 9 groups per row -> 4 + 16 / 64.
    assert layer_bits(get_scheme("W4A16G64"), 576, 576).per_weight == 4.25
    # down_proj 576 x 1536 with MXFP4: 48 groups per row.
    assert layer_bits(get_scheme("MXFP4"), 576, 1536).scale_bits == 576 * 48 * 8


def test_model_bits_weighted_by_weights() -> None:
    small = layer_bits(get_scheme("W2A16G32"), 64, 64)  # 4096 weights at 2.5
    large = layer_bits(get_scheme("W8A16"), 256, 256)  # 65536 weights at 8.125
    total = model_bits([small, large])
    assert total.weights == 4096 + 65536
    assert total.total_bits == 4096 * 2.5 + 65536 * 8.125
    # weighted: (4096 * 2.5 + 65536 * 8.125) / 69632 = 542720 / 69632 = 7.794117647...
    assert total.average == pytest.approx(542720 / 69632, abs=1e-12)
    assert total.average == pytest.approx(7.794117647058823, abs=1e-12)
    # not the plain mean of the two per-weight figures
    assert total.average != pytest.approx((2.5 + 8.125) / 2)
    # codes only: (4096 * 2 + 65536 * 8) / 69632
    assert total.code_bits == 4096 * 2 + 65536 * 8
    assert total.average_codes_only == pytest.approx(532480 / 69632, abs=1e-12)


def test_model_bits_mixed_formats() -> None:
    layers = [
        layer_bits(get_scheme("NVFP4"), 32, 64),  # 2048 * 4.5 + 32 = 9248
        layer_bits(get_scheme("BF16"), 32, 32),  # 1024 * 16 = 16384
        layer_bits(get_scheme("MXFP8"), 32, 64),  # 2048 * 8.25 = 16896
    ]
    total = model_bits(layers)
    assert total.weights == 5120
    assert total.total_bits == 9248 + 16384 + 16896
    assert total.average == pytest.approx(42528 / 5120, abs=1e-12)


def test_empty_model() -> None:
    total = model_bits([])
    assert total.weights == 0
    assert total.average == 0.0
    assert total.average_codes_only == 0.0


def test_layer_bits_total_is_sum_of_parts() -> None:
    bits = LayerBits(weights=10, code_bits=40, scale_bits=16, zero_bits=4)
    assert bits.total == 60
    assert bits.per_weight == 6.0
    assert bits.per_weight_codes_only == 4.0
