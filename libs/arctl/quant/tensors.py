"""The stored form of one quantized weight matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from arctl.schemes import Scheme


@dataclass(frozen=True)
class QuantizedTensor:
    """Codes and scales of one ``[out_features, in_features]`` weight.

    Attributes:
        scheme: how the codes are to be read.
        codes: uint8 ``[out, in]``, unpacked. ``int``: unsigned codes ``0 .. 2**bits - 1``;
            4-bit floats: E2M1 nibbles (bit 3 sign, bits 0-2 magnitude index); 8-bit floats: the
            E4M3 bit pattern.
        scales: ``[out, groups]``. ``int``: float16 (negative allowed, full-range sym);
            ``mxfp``: uint8 E8M0 (exponent + 127); ``nvfp``: float8_e4m3fn; ``fp8``: float32 ``[out, 1]``.
        zeros: ``int`` asym only, uint8 ``[out, groups]``; symmetric codes have the implicit zero
            ``2**(bits-1)``.
        global_scale: ``nvfp`` only, float32 ``[1]``; dequantized value = code * scale / global_scale.
        input_scale: schemes with static activation quantization only, float32 ``[1]`` calibrated on
            data: FP8's per-tensor scale (``amax / 448``), NVFP4's global scale (``448 * 6 / amax``).
    """

    scheme: Scheme
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))
