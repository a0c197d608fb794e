"""GPTQ int32 packing of unsigned integer codes, and its exact inverse. Pure torch functions.

The GPTQ layouts (``auto_gptq``, ``auto_round:auto_gptq``) are one rule: along the packed dimension,
value ``k`` of ``bits`` bits occupies bits ``k*bits .. k*bits + bits - 1`` of a little-endian bit
stream cut into 32-bit words. For 2/4/8 bits a word holds ``32 // bits`` whole values (value ``j``
of the word at bit offset ``j*bits``); for 3 bits 32 values fill 3 words, values 10 and 21
straddling a word boundary (10 + 2|1 + 10 + 1|2 + 10 bits) — the standard GPTQ 3-bit layout.

Shapes (``out``/``in`` = out_features/in_features, ``groups`` = scale groups per row):

- ``qweight`` int32 ``[in * bits / 32, out]``: codes ``[out, in]`` packed along in_features.
- ``qzeros``  int32 ``[groups, out * bits / 32]``: zero points ``[out, groups]`` packed along
  out_features, stored as ``zp - 1`` (the GPTQ v1 convention that ``auto_round:auto_gptq`` keeps;
  loaders add the 1 back).

compressed-tensors' ``pack-quantized`` uses the same little-endian stream for every width from 1 to
8 bits (``pack_stream``: 32 values fill exactly ``bits`` words, values straddling word boundaries).

AWQ (``auto_awq``, GEMM version) packs 4-bit values **along out_features**, eight per int32 word,
interleaved: value ``k`` of each run of eight sits in nibble ``AWQ_ORDER[k]`` (``pack_awq``):

- ``qweight`` int32 ``[in, out / 8]``: codes ``[out, in]`` transposed, then packed along out.
- ``qzeros``  int32 ``[groups, out / 8]``: zero points ``[out, groups]`` (stored as is) likewise.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
STREAM_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
WORD_BITS = 32
# AWQ's interleave: value k of a run of eight goes to nibble AWQ_ORDER[k] (AutoAWQ packs nibble i
# from value [0, 2, 4, 6, 1, 3, 5, 7][i], the inverse permutation).
AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
AWQ_BITS = 4
_WORD_MOD = 1 << WORD_BITS


def _check_bits(bits: int, allowed: tuple[int, ...] = SUPPORTED_BITS) -> None:
    if bits not in allowed:
        raise ValueError(f"this packing supports {allowed} bits, got {bits}")


def _check_length(length: int, bits: int, what: str) -> None:
    if (length * bits) % WORD_BITS:
        need = 32 if bits == 3 else WORD_BITS // bits
        raise ValueError(
            f"{what}: {length} values of {bits} bits do not fill whole int32 words (need a multiple of {need})"
        )


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in ``[0, 2**32)`` -> int32 with the same bit pattern."""
    return torch.where(words >= (1 << 31), words - _WORD_MOD, words).to(torch.int32)


def _to_unsigned(words: torch.Tensor) -> torch.Tensor:
    """int32 words -> int64 in ``[0, 2**32)`` with the same bit pattern."""
    wide = words.to(torch.int64)
    return torch.where(wide < 0, wide + _WORD_MOD, wide)


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dimension of ``values`` (unsigned, ``< 2**bits``) into int32 words.

    ``[..., n]`` -> ``[..., n * bits / 32]``; value ``k`` sits at stream bit ``k * bits``.

    Raises:
        ValueError: unsupported ``bits``, ``n`` not filling whole words, or a value out of range.
    """
    _check_bits(bits)
    return _pack(values, bits)


def pack_stream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``pack_int32`` for any width of 1 to 8 bits (compressed-tensors' dense ``pack-quantized``)."""
    _check_bits(bits, STREAM_BITS)
    return _pack(values, bits)


def _pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    n = values.shape[-1]
    _check_length(n, bits, "pack")
    wide = values.to(torch.int64)
    if wide.numel() and (int(wide.min()) < 0 or int(wide.max()) >= (1 << bits)):
        raise ValueError(f"values must lie in [0, {(1 << bits) - 1}] to pack into {bits} bits")
    offsets = torch.arange(n, dtype=torch.int64) * bits
    word_index = offsets // WORD_BITS
    shift = offsets % WORD_BITS
    words = torch.zeros(*values.shape[:-1], n * bits // WORD_BITS, dtype=torch.int64)
    # Low part: the bits that fit in the value's first word (shifts stay below 2**63).
    low = (wide << shift) & (_WORD_MOD - 1)
    words.index_add_(-1, word_index, low)
    # High part: the bits of a value that straddles into the next word (3 bits only).
    spills = (shift + bits) > WORD_BITS
    if bool(spills.any()):
        high = wide[..., spills] >> (WORD_BITS - shift[spills])
        words.index_add_(-1, word_index[spills] + 1, high)
    return _to_int32(words)


def unpack_int32(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_int32``: ``[..., m]`` int32 -> ``[..., m * 32 / bits]`` uint8."""
    _check_bits(bits)
    return _unpack(words, bits)


def unpack_stream(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_stream``."""
    _check_bits(bits, STREAM_BITS)
    return _unpack(words, bits)


def _unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    if words.dtype != torch.int32:
        raise ValueError(f"packed words must be int32, got {words.dtype}")
    m = words.shape[-1]
    if (m * WORD_BITS) % bits:
        raise ValueError(f"unpack: {m} int32 words do not hold a whole number of {bits}-bit values")
    n = m * WORD_BITS // bits
    unsigned = _to_unsigned(words)
    offsets = torch.arange(n, dtype=torch.int64) * bits
    word_index = offsets // WORD_BITS
    shift = offsets % WORD_BITS
    mask = (1 << bits) - 1
    value = unsigned[..., word_index] >> shift
    spills = (shift + bits) > WORD_BITS
    if bool(spills.any()):
        nxt = torch.zeros_like(value)
        nxt[..., spills] = unsigned[..., word_index[spills] + 1] << (WORD_BITS - shift[spills])
        value = value | nxt
    return (value & mask).to(torch.uint8)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes uint8 ``[out, in]`` -> GPTQ ``qweight`` int32 ``[in * bits / 32, out]``."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be [out, in], got shape {tuple(codes.shape)}")
    _check_length(int(codes.shape[1]), bits, "qweight (in_features)")
    return pack_int32(codes, bits).t().contiguous()


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ ``qweight`` int32 ``[in * bits / 32, out]`` -> unsigned codes uint8 ``[out, in]``."""
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D, got shape {tuple(qweight.shape)}")
    return unpack_int32(qweight.t().contiguous(), bits)


def pack_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points ``[out, groups]`` (``1 .. 2**bits - 1``) -> ``qzeros`` int32 ``[groups, out * bits / 32]``
    holding ``zp - 1``.

    Raises:
        ValueError: a zero point of 0, which ``zp - 1`` cannot represent.
    """
    if zeros.dim() != 2:
        raise ValueError(f"zeros must be [out, groups], got shape {tuple(zeros.shape)}")
    _check_length(int(zeros.shape[0]), bits, "qzeros (out_features)")
    shifted = zeros.to(torch.int64) - 1
    if shifted.numel() and int(shifted.min()) < 0:
        raise ValueError("a zero point of 0 cannot be stored as zp - 1 (GPTQ v1 convention)")
    return pack_int32(shifted.t(), bits)


def unpack_qzeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """``qzeros`` int32 ``[groups, out * bits / 32]`` -> zero points uint8 ``[out, groups]`` (1 added back)."""
    if qzeros.dim() != 2:
        raise ValueError(f"qzeros must be 2-D, got shape {tuple(qzeros.shape)}")
    return (unpack_int32(qzeros, bits).to(torch.int16) + 1).to(torch.uint8).t().contiguous()


def sym_zeros(bits: int, out_features: int, groups: int) -> torch.Tensor:
    """The implicit zero point ``2**(bits-1)`` of symmetric codes, uint8 ``[out, groups]``."""
    return torch.full((out_features, groups), 1 << (bits - 1), dtype=torch.uint8)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """4-bit values ``[rows, n]`` -> AWQ words int32 ``[rows, n / 8]``, interleaved by ``AWQ_ORDER``.

    Raises:
        ValueError: ``n`` not a multiple of 8, or a value out of ``0..15``.
    """
    if values.dim() != 2 or values.shape[1] % 8:
        raise ValueError(
            f"AWQ packs runs of 8 values along the last dimension, got shape {tuple(values.shape)}"
        )
    rows, n = values.shape
    runs = values.reshape(rows, n // 8, 8)
    placed = torch.empty_like(runs)
    placed[..., list(AWQ_ORDER)] = runs
    return pack_int32(placed.reshape(rows, n), AWQ_BITS)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_awq``: int32 ``[rows, m]`` -> uint8 ``[rows, 8 * m]``."""
    nibbles = unpack_int32(words, AWQ_BITS)
    rows, n = nibbles.shape
    return nibbles.reshape(rows, n // 8, 8)[..., list(AWQ_ORDER)].reshape(rows, n)


def pack_awq_qweight(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes uint8 ``[out, in]`` -> AWQ ``qweight`` int32 ``[in, out / 8]``."""
    return pack_awq(codes.t().contiguous())


def pack_awq_qzeros(zeros: torch.Tensor) -> torch.Tensor:
    """Zero points uint8 ``[out, groups]`` -> AWQ ``qzeros`` int32 ``[groups, out / 8]`` (stored as is)."""
    return pack_awq(zeros.t().contiguous())
