"""GPTQ int32 packing: hand-computed words, round trips, and bit equality with auto-round's packer."""

from __future__ import annotations

import pytest
import torch

from arctl_exporter.packing import (
    SUPPORTED_BITS,
    pack_int32,
    pack_qweight,
    pack_qzeros,
    sym_zeros,
    unpack_int32,
    unpack_qweight,
    unpack_qzeros,
)


def test_four_bit_codes_one_to_eight_make_a_known_word():
    # element j of the run at bit offset 4*j: 0x87654321, whose top bit makes the int32 negative.
    codes = torch.arange(1, 9, dtype=torch.uint8).reshape(1, 8)  # [out=1, in=8]
    qweight = pack_qweight(codes, 4)
    assert qweight.dtype == torch.int32 and qweight.shape == (1, 1)
    assert int(qweight) == 0x87654321 - (1 << 32) == -2023406815
    assert torch.equal(unpack_qweight(qweight, 4), codes)


def test_two_and_eight_bit_words_by_hand():
    assert int(pack_int32(torch.tensor([1, 2, 3, 0] * 4, dtype=torch.uint8), 2)) == 0x39393939
    assert int(pack_int32(torch.tensor([0x01, 0x02, 0x03, 0x80], dtype=torch.uint8), 8)) == 0x80030201 - (
        1 << 32
    )


def test_three_bit_values_straddle_words_like_gptq():
    # value 10 spans bits 30..32 (2 bits in word 0, 1 in word 1); value 21 spans bits 63..65.
    values = torch.zeros(32, dtype=torch.uint8)
    values[10] = 0b111
    words = pack_int32(values, 3)
    assert [int(w) & 0xFFFFFFFF for w in words] == [0xC0000000, 0x00000001, 0]
    values = torch.zeros(32, dtype=torch.uint8)
    values[21] = 0b111
    assert [int(w) & 0xFFFFFFFF for w in pack_int32(values, 3)] == [0, 0x80000000, 0x00000003]


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_round_trip(bits):
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (96, 128), generator=generator, dtype=torch.uint8)
    qweight = pack_qweight(codes, bits)
    assert qweight.shape == (128 * bits // 32, 96) and qweight.dtype == torch.int32
    assert torch.equal(unpack_qweight(qweight, bits), codes)
    zeros = torch.randint(1, 2**bits, (96, 4), generator=generator, dtype=torch.uint8)
    qzeros = pack_qzeros(zeros, bits)
    assert qzeros.shape == (4, 96 * bits // 32)
    assert torch.equal(unpack_qzeros(qzeros, bits), zeros)
    assert torch.equal(unpack_int32(pack_int32(codes, bits), bits), codes)


def test_qzeros_store_zp_minus_one():
    # symmetric 4-bit: zp 8 stored as 7 in every nibble.
    qzeros = pack_qzeros(sym_zeros(4, 8, 2), 4)
    assert qzeros.shape == (2, 1) and bool((qzeros == 0x77777777).all())


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="bits"):
        pack_qweight(torch.zeros(4, 32, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_qweight(torch.zeros(4, 16, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_qweight(torch.full((1, 8), 16, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="zero point of 0"):
        pack_qzeros(torch.zeros(8, 1, dtype=torch.uint8), 4)


@pytest.mark.filterwarnings(
    "ignore:To copy construct from a tensor:UserWarning"
)  # inside auto-round's packer
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_same_words_as_auto_round_packer(bits):
    qlinear_torch_zp = pytest.importorskip("auto_round_extension.torch.qlinear_torch_zp")
    out_features, in_features, group_size = 64, 128, 32
    generator = torch.Generator().manual_seed(10 + bits)
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=generator, dtype=torch.uint8)
    scales = (torch.rand(out_features, in_features // group_size, generator=generator) + 0.5).half()
    zero = 2 ** (bits - 1)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    linear.weight.data = (codes.float() - zero) * scales.float().repeat_interleave(group_size, 1)
    reference = qlinear_torch_zp.QuantLinear(bits, group_size, in_features, out_features, False)
    reference.pack(linear, scales.float(), torch.full(scales.shape, zero))
    assert torch.equal(reference.qweight, pack_qweight(codes, bits))
    assert torch.equal(
        reference.qzeros, pack_qzeros(sym_zeros(bits, out_features, in_features // group_size), bits)
    )
