"""A linear layer with SignRound's learnable quantization parameters, used while a block is tuned.

For a weight ``[out, in]`` with ``groups`` scale groups per row:
- ``offset`` ``[out, in]`` (init 0): added to ``w / scale`` before rounding;
- ``max_factor`` / ``min_factor`` ``[out, groups]`` (init 1, kept in [0, 1]): shrink the group's
  range before the scale is computed (``min_factor`` only for int schemes).
The forward pass uses the fake-quantized weight (straight-through rounding), computed by the fused
kernels of ``arctl.quant.fused``, and quantizes its input when the scheme quantizes activations
(static ones with ``input_scale``, set from calibration before tuning).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn
from torch.nn import functional

from arctl.quant import QuantizedTensor, quantize
from arctl.quant.activations import fake_quantize_activation
from arctl.quant.fused import fused_clip_errors, fused_fake_quantize
from arctl.schemes import PER_CHANNEL, Scheme


class TunableLinear(nn.Module):
    def __init__(self, linear: nn.Linear, scheme: Scheme, tune_minmax: bool) -> None:
        super().__init__()
        self.linear = linear
        self.scheme = scheme
        out_features, in_features = linear.weight.shape
        groups = 1 if scheme.group_size == PER_CHANNEL else scheme.groups(in_features)
        device = linear.weight.device
        self.offset = nn.Parameter(torch.zeros(out_features, in_features, device=device))
        self.max_factor = nn.Parameter(torch.ones(out_features, groups, device=device)) if tune_minmax else None
        with_min = tune_minmax and scheme.dtype == "int"
        self.min_factor = nn.Parameter(torch.ones(out_features, groups, device=device)) if with_min else None
        self.input_scale: torch.Tensor | None = None
        self.global_scale: torch.Tensor | None = None  # NVFP4: shared by a fused group

    def rounding_params(self) -> list[nn.Parameter]:
        return [self.offset]

    def clipping_params(self) -> list[nn.Parameter]:
        return [p for p in (self.min_factor, self.max_factor) if p is not None]

    def qdq_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return fused_fake_quantize(
            self.linear.weight, self.scheme, self.offset, self.min_factor, self.max_factor, dtype, self.global_scale
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        bias = None if self.linear.bias is None else self.linear.bias.to(dtype)
        if self.scheme.act is not None:
            x = fake_quantize_activation(x, self.scheme.act, self.input_scale)
        return functional.linear(x.to(dtype), self.qdq_weight(dtype), bias)

    def snapshot(self) -> list[torch.Tensor]:
        """A copy of the learned parameters (to restore the best iteration)."""
        return [p.detach().clone() for p in (self.offset, self.min_factor, self.max_factor) if p is not None]

    @torch.no_grad()
    def restore(self, values: list[torch.Tensor]) -> None:
        params = [p for p in (self.offset, self.min_factor, self.max_factor) if p is not None]
        for param, value in zip(params, values, strict=True):
            param.copy_(value)

    @torch.no_grad()
    def search_clipping(self, input_sq: torch.Tensor, candidates: torch.Tensor) -> None:
        """Start the clipping factors at the per-group value among ``candidates`` that minimizes the
        activation-weighted error ``sum_j E[x_j^2] (w_j - q(w)_j)^2`` (``input_sq``: ``[in]``; the
        first of equal errors)."""
        if self.max_factor is None:
            return
        weight = self.linear.weight.detach().float()
        values = candidates.tolist()
        with_min = self.min_factor is not None
        errors = None if self.global_scale is not None else fused_clip_errors(weight, self.scheme, values, input_sq, with_min)
        if errors is None:
            input_sq = input_sq.to(weight.device)
            errors = torch.stack([self._clip_error(weight, input_sq, value, with_min) for value in values])
        best_factor = candidates.to(weight.device)[errors.argmin(0)]
        self.max_factor.copy_(best_factor)
        if with_min:
            self.min_factor.copy_(best_factor)

    def _clip_error(self, weight: torch.Tensor, input_sq: torch.Tensor, value: float, with_min: bool) -> torch.Tensor:
        """The per-group error of round to nearest with clipping factor ``value``, ``[out, groups]``."""
        factor = torch.full_like(self.max_factor, value)
        quantized = fused_fake_quantize(weight, self.scheme, None, factor if with_min else None, factor,
                                        global_scale=self.global_scale)
        return ((quantized - weight).pow(2) * input_sq).reshape(*factor.shape, -1).sum(-1)

    @torch.no_grad()
    def quantized(self) -> QuantizedTensor:
        """The stored form with the current learned parameters (and the calibrated input scale)."""
        qt = quantize(self.linear.weight, self.scheme, self.offset, self.min_factor, self.max_factor, self.global_scale)
        return replace(qt, input_scale=self.input_scale)


@contextmanager
def swapped(block: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[None]:
    """Put ``replacements`` (relative dotted name -> module) into ``block``; put the originals back after."""
    originals: dict[str, nn.Module] = {}
    try:
        for name, module in replacements.items():
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            originals[name] = getattr(parent, child)
            setattr(parent, child, module)
        yield
    finally:
        for name, module in originals.items():
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, child, module)
