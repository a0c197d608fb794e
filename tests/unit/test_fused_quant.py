"""The fused fake-quantization the tuner uses: the same values as ``fake_quantize`` and the same
gradients (to float summation order; the offset's gradient bit for bit), for every scheme."""

from __future__ import annotations

import pytest
import torch

from arctl.quant import fake_quantize
from arctl.quant.fused import fused_clip_errors, fused_fake_quantize
from arctl.schemes import PER_CHANNEL, PRESETS, get_scheme

QUANTIZED = sorted(name for name, scheme in PRESETS.items() if scheme.quantized)


def _inputs(scheme_name: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    scheme = get_scheme(scheme_name)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(24, 128, generator=generator) * 0.02
    weight[0, 5] = 0.3  # an outlier
    weight[3, 70] = -0.25
    groups = 1 if scheme.group_size == PER_CHANNEL else scheme.groups(128)
    offset = torch.rand(24, 128, generator=generator) - 0.5
    min_factor = 0.7 + 0.3 * torch.rand(24, groups, generator=generator) if scheme.dtype == "int" else None
    max_factor = 0.7 + 0.3 * torch.rand(24, groups, generator=generator)
    return weight, offset, min_factor, max_factor


def _values_and_grads(fn, scheme_name: str, seed: int) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    scheme = get_scheme(scheme_name)
    weight, offset, min_factor, max_factor = _inputs(scheme_name, seed)
    params = [p.requires_grad_() if p is not None else None for p in (offset, min_factor, max_factor)]
    values = fn(weight, scheme, *params)
    upstream = torch.randn(values.shape, generator=torch.Generator().manual_seed(seed + 1))
    (values * upstream).sum().backward()
    return values.detach(), [None if p is None else p.grad for p in params]


@pytest.mark.parametrize("scheme_name", QUANTIZED)
def test_fused_matches_fake_quantize(scheme_name: str) -> None:
    for seed in (0, 1):
        expected, expected_grads = _values_and_grads(fake_quantize, scheme_name, seed)
        got, got_grads = _values_and_grads(fused_fake_quantize, scheme_name, seed)
        assert torch.equal(got, expected)
        offset_grad, *factor_grads = got_grads
        assert torch.equal(offset_grad, expected_grads[0])
        for got_grad, expected_grad in zip(factor_grads, expected_grads[1:], strict=True):
            if expected_grad is None or not expected_grad.any():
                # MX exponents are floors: no gradient either way (zeros or none)
                assert got_grad is None or not got_grad.any()
            else:
                torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scheme_name", ["W4A16G64", "W2A16G32_ASYM", "MXFP4"])
def test_fused_without_learned_parameters_is_round_to_nearest(scheme_name: str) -> None:
    weight, *_ = _inputs(scheme_name, 3)
    scheme = get_scheme(scheme_name)
    assert torch.equal(fused_fake_quantize(weight, scheme), fake_quantize(weight, scheme))


def test_fused_passes_the_weight_gradient_where_the_code_is_not_clamped() -> None:
    scheme = get_scheme("W4A16G64")
    weight, *_ = _inputs("W4A16G64", 4)
    expected_weight = weight.clone().requires_grad_()
    fake_quantize(expected_weight, scheme).sum().backward()
    got_weight = weight.clone().requires_grad_()
    fused_fake_quantize(got_weight, scheme).sum().backward()
    # through the scale (amax) the weight gets more than the straight-through part: compare both whole
    torch.testing.assert_close(got_weight.grad, expected_weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scheme_name", QUANTIZED)
def test_fused_clip_errors_match_quantizing_once_per_factor(scheme_name: str) -> None:
    scheme = get_scheme(scheme_name)
    weight, _, _, _ = _inputs(scheme_name, 3)
    input_sq = torch.rand(128, generator=torch.Generator().manual_seed(4))
    factors = [0.6, 0.75, 0.9, 1.0]
    with_min = scheme.dtype == "int"
    errors = fused_clip_errors(weight, scheme, factors, input_sq, with_min)
    if errors is None:
        assert scheme.dtype not in ("int",) and not (scheme.dtype == "mxfp" and scheme.bits == 4)
        return
    groups = 1 if scheme.group_size == PER_CHANNEL else scheme.groups(128)
    for index, value in enumerate(factors):
        factor = torch.full((24, groups), value)
        quantized = fake_quantize(weight, scheme, None, factor if with_min else None, factor)
        expected = ((quantized - weight).pow(2) * input_sq).reshape(24, groups, -1).sum(-1)
        torch.testing.assert_close(errors[index], expected, rtol=1e-5, atol=1e-12)
