"""True bit accounting: codes plus the scale and zero-point storage the formats write.

Per group of ``g`` weights (``g`` = in_features for per-channel schemes):

| scheme      | codes | scale                 | zero                 | example: bits per weight   |
|-------------|-------|-----------------------|----------------------|----------------------------|
| int sym     | b     | 16 (fp16)             | implicit (2**(b-1))  | INT4 g128: 4 + 16/128 = 4.125 |
| int asym    | b     | 16 (fp16)             | b (packed qzeros)    | INT4 g64 asym: 4 + 20/64 = 4.3125 |
| mxfp        | 4, 8  | 8 (E8M0) per 32       | -                    | MXFP4 4.25, MXFP8 8.25     |
| nvfp        | 4     | 8 (E4M3) per 16, + 32 per tensor | -         | NVFP4 4.5 (+ 32 bits)      |
| fp8         | 8     | 32 (fp32) per row     | -                    | 8 + 32/in                  |
| bf16        | 16    | -                     | -                    | 16                         |

The "ignore scale/zero" figure (AutoRound's published average bits) is the code width alone.
Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from arctl.schemes import PER_CHANNEL, Scheme

SCALE_BITS = {"int": 16, "mxfp": 8, "nvfp": 8, "fp8": 32}
NVFP4_GLOBAL_SCALE_BITS = 32


@dataclass(frozen=True)
class LayerBits:
    """Storage of one weight matrix under one scheme."""

    weights: int
    code_bits: int
    scale_bits: int
    zero_bits: int

    @property
    def total(self) -> int:
        return self.code_bits + self.scale_bits + self.zero_bits

    @property
    def per_weight(self) -> float:
        return self.total / self.weights

    @property
    def per_weight_codes_only(self) -> float:
        return self.code_bits / self.weights


def layer_bits(scheme: Scheme, out_features: int, in_features: int) -> LayerBits:
    """Bits needed to store an ``[out_features, in_features]`` weight with ``scheme``."""
    weights = out_features * in_features
    if not scheme.quantized:
        return LayerBits(weights, weights * scheme.bits, 0, 0)
    groups = out_features * (1 if scheme.group_size == PER_CHANNEL else scheme.groups(in_features))
    scale_bits = groups * SCALE_BITS[scheme.dtype]
    if scheme.dtype == "nvfp":
        scale_bits += NVFP4_GLOBAL_SCALE_BITS
    zero_bits = 0 if scheme.sym else groups * scheme.bits
    return LayerBits(weights, weights * scheme.bits, scale_bits, zero_bits)


@dataclass(frozen=True)
class ModelBits:
    """Sum over the layers of a plan."""

    weights: int
    total_bits: int
    code_bits: int

    @property
    def average(self) -> float:
        """True average bits per weight."""
        return self.total_bits / self.weights if self.weights else 0.0

    @property
    def average_codes_only(self) -> float:
        """Average bits ignoring scale and zero storage (AutoRound's published figure)."""
        return self.code_bits / self.weights if self.weights else 0.0


def model_bits(layers: list[LayerBits]) -> ModelBits:
    return ModelBits(
        weights=sum(layer.weights for layer in layers),
        total_bits=sum(layer.total for layer in layers),
        code_bits=sum(layer.code_bits for layer in layers),
    )
