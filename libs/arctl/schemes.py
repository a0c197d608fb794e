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

A floating-point scheme may also quantize the layer's input activations (``act``, an ``ActQuant``):
FP8 with one scale per tensor calibrated on data (static) or one per token (dynamic), MXFP4/MXFP8
with E8M0 scales per 32 inputs computed at run time, NVFP4 with E4M3 scales per 16 inputs computed
at run time under one global scale calibrated on data.

This module imports no torch: the gateway and ``import arctl`` read schemes too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DataType = Literal["int", "mxfp", "nvfp", "fp8", "bf16"]
DATA_TYPES: tuple[DataType, ...] = ("int", "mxfp", "nvfp", "fp8", "bf16")

PER_CHANNEL = -1
PER_TENSOR = 0
PER_TOKEN = -1

ActDataType = Literal["fp8", "mxfp", "nvfp"]


class UnknownSchemeError(ValueError):
    """A scheme name that is not a preset; the message lists the valid names."""


@dataclass(frozen=True)
class ActQuant:
    """How a layer's input activations are quantized at run time.

    Attributes:
        dtype: ``fp8`` (E4M3), ``mxfp`` (E2M1 / E4M3 elements, E8M0 scales) or ``nvfp`` (E2M1
            elements, E4M3 scales under a global scale).
        bits: bits per element.
        group_size: ``0`` one scale per tensor, ``-1`` one per token, else inputs per scale.
        dynamic: scales computed from each input at run time; otherwise the per-tensor scale (FP8)
            or global scale (NVFP4) is calibrated on data and stored with the layer.
    """

    dtype: ActDataType
    bits: int
    group_size: int
    dynamic: bool

    def __post_init__(self) -> None:
        if self.dtype == "fp8":
            if self.bits != 8 or (self.group_size, self.dynamic) not in ((PER_TENSOR, False), (PER_TOKEN, True)):
                raise ValueError(
                    "fp8 activations are 8 bits, per tensor static (group 0) or per token dynamic (group -1)"
                )
        elif self.dtype == "mxfp":
            if self.bits not in (4, 8) or self.group_size != 32 or not self.dynamic:
                raise ValueError("mxfp activations are 4 or 8 bits, group 32, dynamic")
        elif self.dtype == "nvfp":
            if self.bits != 4 or self.group_size != 16 or self.dynamic:
                raise ValueError("nvfp activations are 4 bits, group 16, with a calibrated (static) global scale")
        else:
            raise ValueError(f"unknown activation data type {self.dtype!r}; valid: fp8, mxfp, nvfp")

    @property
    def static(self) -> bool:
        """Whether the layer stores a scale calibrated on data (``input_scale``)."""
        return not self.dynamic

    def to_dict(self) -> dict[str, object]:
        return {"dtype": self.dtype, "bits": self.bits, "group_size": self.group_size, "dynamic": self.dynamic}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ActQuant:
        allowed = {"dtype", "bits", "group_size", "dynamic"}
        if not isinstance(data, dict) or set(data) != allowed:
            raise ValueError(f"activation quantization needs exactly the keys {sorted(allowed)}, got {data!r}")
        return cls(
            dtype=data["dtype"],  # type: ignore[arg-type]
            bits=int(data["bits"]),  # type: ignore[call-overload]
            group_size=int(data["group_size"]),  # type: ignore[call-overload]
            dynamic=bool(data["dynamic"]),
        )


# The activation family each weight family may have (same element format and group).
_ACT_FOR_WEIGHT: dict[str, str] = {"fp8": "fp8", "mxfp": "mxfp", "nvfp": "nvfp"}


@dataclass(frozen=True)
class Scheme:
    """How one weight matrix is quantized.

    Attributes:
        dtype: the code family, one of ``DATA_TYPES``.
        bits: bits per code (16 for ``bf16``).
        group_size: inputs sharing one scale; ``-1`` means one group per output row.
        sym: symmetric (no zero point) or asymmetric (one zero point per group); only ``int``
            may be asymmetric.
        act: how the layer's inputs are quantized (``None``: kept in 16 bits); only floating-point
            schemes, with activations of their own element format.
    """

    dtype: DataType
    bits: int
    group_size: int
    sym: bool = True
    act: ActQuant | None = None

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
        if self.act is not None and not self._act_matches(self.act):
            raise ValueError(
                f"{self.dtype} {self.bits}-bit weights cannot have {self.act.dtype} {self.act.bits}-bit "
                "activations; activation quantization goes with FP8, MXFP4/MXFP8 and NVFP4 weights of the same format"
            )

    def _act_matches(self, act: ActQuant) -> bool:
        return _ACT_FOR_WEIGHT.get(self.dtype) == act.dtype and (self.dtype != "mxfp" or act.bits == self.bits)

    @property
    def name(self) -> str:
        """The preset name, e.g. ``W4A16G64``, ``W2A16G32_ASYM``, ``MXFP4``, ``FP8_STATIC``."""
        if self.act is not None:
            if self.dtype == "fp8":
                return "FP8_DYNAMIC" if self.act.dynamic else "FP8_STATIC"
            return f"{'MXFP' if self.dtype == 'mxfp' else 'NVFP'}{self.bits}_A{self.act.bits}"
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
        data: dict[str, object] = {"dtype": self.dtype, "bits": self.bits, "group_size": self.group_size, "sym": self.sym}
        if self.act is not None:
            data["act"] = self.act.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Scheme:
        allowed = {"dtype", "bits", "group_size", "sym", "act"}
        extra = set(data) - allowed
        if extra:
            raise ValueError(f"unknown scheme keys {sorted(extra)}; allowed: {sorted(allowed)}")
        return cls(
            dtype=data["dtype"],  # type: ignore[arg-type]
            bits=int(data["bits"]),  # type: ignore[call-overload]
            group_size=int(data["group_size"]),  # type: ignore[call-overload]
            sym=bool(data.get("sym", True)),
            act=None if data.get("act") is None else ActQuant.from_dict(data["act"]),  # type: ignore[arg-type]
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
    "FP8_STATIC": Scheme("fp8", 8, PER_CHANNEL, act=ActQuant("fp8", 8, PER_TENSOR, dynamic=False)),
    "FP8_DYNAMIC": Scheme("fp8", 8, PER_CHANNEL, act=ActQuant("fp8", 8, PER_TOKEN, dynamic=True)),
    "MXFP4_A4": Scheme("mxfp", 4, 32, act=ActQuant("mxfp", 4, 32, dynamic=True)),
    "MXFP8_A8": Scheme("mxfp", 8, 32, act=ActQuant("mxfp", 8, 32, dynamic=True)),
    "NVFP4_A4": Scheme("nvfp", 4, 16, act=ActQuant("nvfp", 4, 16, dynamic=False)),
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
