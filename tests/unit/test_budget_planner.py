from __future__ import annotations

import pytest

from arctl.models import LayerInfo
from arctl.schemes import get_scheme
from arctl_planner.budget import BudgetError, average_bits, plan_for_budget, usable_candidates

W2, W4, W8, BF16 = (get_scheme(n) for n in ("W2A16G64", "W4A16G64", "W8A16G64", "BF16"))


def layers_of_block(block: int) -> list[LayerInfo]:
    prefix = f"model.layers.{block}"
    return [
        LayerInfo(f"{prefix}.self_attn.q_proj", (256, 256), f"{prefix}.self_attn.qkv"),
        LayerInfo(f"{prefix}.self_attn.k_proj", (64, 256), f"{prefix}.self_attn.qkv"),
        LayerInfo(f"{prefix}.self_attn.v_proj", (64, 256), f"{prefix}.self_attn.qkv"),
        LayerInfo(f"{prefix}.self_attn.o_proj", (256, 256), None),
        LayerInfo(f"{prefix}.mlp.gate_proj", (512, 256), f"{prefix}.mlp.gate_up"),
        LayerInfo(f"{prefix}.mlp.up_proj", (512, 256), f"{prefix}.mlp.gate_up"),
        LayerInfo(f"{prefix}.mlp.down_proj", (256, 512), None),
    ]


LAYERS = [layer for block in range(8) for layer in layers_of_block(block)]


def error(layer: LayerInfo, scheme) -> float:
    # down_proj is the most sensitive layer, o_proj next; higher bits always lower the error.
    weight = 10.0 if "down" in layer.name else (3.0 if "o_proj" in layer.name else 1.0)
    return weight * 2.0 ** (-scheme.bits) * layer.shape[0] * layer.shape[1]


def plan(target: float, schemes=(W2, W4, W8, BF16)):
    return plan_for_budget(LAYERS, list(schemes), target, error, "m", "sha")


def test_candidates_are_sorted_by_true_bits_and_must_fit() -> None:
    candidates = usable_candidates(LAYERS, [W8, get_scheme("W4A16"), W2, BF16])
    assert [c.scheme.name for c in candidates] == ["W2A16G64", "W4A16", "W8A16G64", "BF16"]
    assert candidates[1].avg_bits == pytest.approx(4.125)
    odd = [LayerInfo("x", (64, 96), None)]
    assert [c.scheme.name for c in usable_candidates(odd, [get_scheme("W4A16"), get_scheme("W4A16G32")])] == ["W4A16G32"]


def test_exact_candidate_gives_a_uniform_plan() -> None:
    result = plan(4.25)
    assert result.scheme_counts() == {"W4A16G64": len(LAYERS)}
    assert result.avg_bits == pytest.approx(4.25)


@pytest.mark.parametrize("target", [4.5, 5.0, 6.0, 3.0])
def test_mixed_plan_hits_the_budget_from_below(target: float) -> None:
    result = plan(target)
    assert result.avg_bits <= target + 1e-9
    # The smallest unit moved is o_proj (65536 weights) at 4 more bits: 65536 * 4 / 4456448 = 0.0588.
    assert target - result.avg_bits < 0.0589
    assert len(result.scheme_counts()) == 2


def test_never_above_the_target() -> None:
    for target in (2.3, 4.3, 7.9, 8.2, 15.9):
        assert plan(target).avg_bits <= target + 1e-9


def test_fused_groups_share_a_scheme_and_sensitive_layers_go_first() -> None:
    result = plan(4.5)
    by_group: dict[str, set[str]] = {}
    for layer in result.layers:
        if layer.fused_group:
            by_group.setdefault(layer.fused_group, set()).add(layer.scheme.name)
    assert all(len(names) == 1 for names in by_group.values())
    upgraded = [layer.name for layer in result.layers if layer.scheme == W8]
    assert upgraded and all("down_proj" in name for name in upgraded)


@pytest.mark.parametrize("target", [1.0, 2.0, 16.5, 30.0])
def test_unreachable_targets_are_refused_with_the_range(target: float) -> None:
    with pytest.raises(BudgetError, match=r"outside what the schemes can reach.*2\.25.*16\.0"):
        plan(target)


def test_no_fitting_scheme_is_refused() -> None:
    with pytest.raises(BudgetError, match="fits every layer"):
        plan_for_budget([LayerInfo("x", (64, 96), None)], [W4], 4.5, error, "m", "sha")


def test_average_bits_weights_layers_by_size() -> None:
    assert average_bits(LAYERS, BF16) == 16.0
    assert average_bits(LAYERS, W2) == pytest.approx(2.25)
