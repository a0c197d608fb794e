"""Quantization schemes: small frozen dataclasses and the named presets.

A scheme says how one weight matrix ``[out_features, in_features]`` is stored:

- ``int``:  integer codes of ``bits`` bits, one scale per group of ``group_size`` consecutive inputs
  (``-1``: one group per output row), symmetric ("full range", AutoRound's convention) or asymmetric
  with one zero point per group.
- ``mxfp``: OCP microscaling floats (E2M1 for 4 bits, E4M3 for 8 bits), one E8M0 power-of-two
  scale per 32 inputs.
- ``nvfp``: NVFP4, E2M1 codes, one FP8 E4M3 scale per 16 inputs and one fp32 scale per tensor.
- ``fp8``:  E4M3 codes, one fp32 scale per output row.
- ``bf16``: not quantized (kept at 16 bits).

This module imports no torch: the gateway and ``import arctl`` read schemes too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DataType = Literal["int", "mxfp", "nvfp", "fp8", "bf16"]
DATA_TYPES: tuple[DataType, ...] = ("int", "mxfp", "nvfp", "fp8", "bf16")

PER_CHANNEL = -1


class UnknownSchemeError(ValueError):
    """A scheme name that is not a preset; the message lists the valid names."""


@dataclass(frozen=True)
class Scheme:
    """How one weight matrix is quantized.

    Attributes:
        dtype: the code family, one of ``DATA_TYPES``.
        bits: bits per code (16 for ``bf16``).
        group_size: inputs sharing one scale; ``-1`` means one group per output row.
        sym: symmetric (no zero point) or asymmetric (one zero point per group); only ``int``
            may be asymmetric.
    """

    dtype: DataType
    bits: int
    group_size: int
    sym: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DATA_TYPES:
            raise ValueError(f"unknown data type {self.dtype!r}; valid: {', '.join(DATA_TYPES)}")
        if self.dtype == "int":
            if not 2 <= self.bits <= 8:
                raise ValueError(f"int schemes need 2..8 bits, got {self.bits}")
            if self.group_size != PER_CHANNEL and self.group_size <= 0:
                raise ValueError(f"group_size must be positive or -1 (per channel), got {self.group_size}")
        elif self.dtype == "mxfp":
            if self.bits not in (4, 8) or self.group_size != 32 or not self.sym:
                raise ValueError("mxfp schemes are 4 or 8 bits, group 32, symmetric")
        elif self.dtype == "nvfp":
            if self.bits != 4 or self.group_size != 16 or not self.sym:
                raise ValueError("nvfp schemes are 4 bits, group 16, symmetric")
        elif self.dtype == "fp8":
            if self.bits != 8 or self.group_size != PER_CHANNEL or not self.sym:
                raise ValueError("fp8 schemes are 8 bits, per channel, symmetric")
        elif self.bits != 16 or self.group_size != 0 or not self.sym:
            raise ValueError("bf16 is 16 bits, group 0, symmetric")

    @property
    def name(self) -> str:
        """The preset name, e.g. ``W4A16G64``, ``W2A16G32_ASYM``, ``MXFP4``."""
        if self.dtype == "int":
            group = "" if self.group_size == 128 else ("C" if self.group_size == PER_CHANNEL else f"G{self.group_size}")
            return f"W{self.bits}A16{group}{'' if self.sym else '_ASYM'}"
        return {"mxfp": f"MXFP{self.bits}", "nvfp": "NVFP4", "fp8": "FP8", "bf16": "BF16"}[self.dtype]

    @property
    def quantized(self) -> bool:
        return self.dtype != "bf16"

    def fits(self, in_features: int) -> bool:
        """Whether rows of ``in_features`` inputs split into whole groups of this scheme."""
        if self.group_size in (0, PER_CHANNEL):
            return True
        return in_features % self.group_size == 0

    def groups(self, in_features: int) -> int:
        """Number of scale groups per output row."""
        if self.group_size == 0:
            return 1
        if self.group_size == PER_CHANNEL:
            return 1
        return -(-in_features // self.group_size)

    def to_dict(self) -> dict[str, object]:
        return {"dtype": self.dtype, "bits": self.bits, "group_size": self.group_size, "sym": self.sym}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Scheme:
        allowed = {"dtype", "bits", "group_size", "sym"}
        extra = set(data) - allowed
        if extra:
            raise ValueError(f"unknown scheme keys {sorted(extra)}; allowed: {sorted(allowed)}")
        return cls(
            dtype=data["dtype"],  # type: ignore[arg-type]
            bits=int(data["bits"]),  # type: ignore[call-overload]
            group_size=int(data["group_size"]),  # type: ignore[call-overload]
            sym=bool(data.get("sym", True)),
        )


def _int_presets() -> dict[str, Scheme]:
    presets: dict[str, Scheme] = {}
    for bits in (2, 3, 4, 5, 6, 8):
        for group_size in (128, 64, 32, PER_CHANNEL):
            for sym in (True, False):
                scheme = Scheme("int", bits, group_size, sym)
                presets[scheme.name] = scheme
    return presets


PRESETS: dict[str, Scheme] = {
    **_int_presets(),
    "MXFP4": Scheme("mxfp", 4, 32),
    "MXFP8": Scheme("mxfp", 8, 32),
    "NVFP4": Scheme("nvfp", 4, 16),
    "FP8": Scheme("fp8", 8, PER_CHANNEL),
    "BF16": Scheme("bf16", 16, 0),
}


def get_scheme(name: str) -> Scheme:
    """The preset called ``name`` (case-insensitive).

    Raises:
        UnknownSchemeError: listing every valid name.
    """
    scheme = PRESETS.get(name.strip().upper())
    if scheme is None:
        raise UnknownSchemeError(f"unknown scheme {name!r}; valid: {', '.join(PRESETS)}")
    return scheme
