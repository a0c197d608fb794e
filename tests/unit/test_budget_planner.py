from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest
from tiny_models import tiny_llama

from arctl.models import LayerInfo, LoadedModel
from arctl.schemes import get_scheme
from arctl_planner.budget import (
    BudgetError,
    average_bits,
    parse_keep,
    plan_for_budget,
    plan_for_budgets,
    runtime_allows,
    usable_candidates,
)
from arctl_planner.engine import CALIBRATION_SEQLEN, calibration_seqlen, plan_uniform
from arctl_planner.solver import InfeasibleBudgetError, Item, Option, solve

W2, W3, W4, W8, BF16 = (get_scheme(n) for n in ("W2A16G64", "W3A16G64", "W4A16G64", "W8A16G64", "BF16"))
ALL = [W2, W3, W4, W8, BF16]


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
    # down_proj is the most sensitive layer, o_proj next; each extra bit quarters the error.
    weight = 10.0 if "down" in layer.name else (3.0 if "o_proj" in layer.name else 1.0)
    return weight * 4.0 ** (-scheme.bits) * layer.shape[0] * layer.shape[1]


def plan(target: float, schemes=ALL, **kwargs):
    return plan_for_budget(LAYERS, list(schemes), target, error, "m", "sha", **kwargs)


def brute_force(items: list[Item], budget: int) -> float:
    best = float("inf")
    for combo in itertools.product(*(range(len(item.options)) for item in items)):
        cost = sum(item.options[c].cost for item, c in zip(items, combo))
        if cost <= budget:
            best = min(best, sum(item.options[c].loss for item, c in zip(items, combo)))
    return best


@pytest.mark.parametrize("seed", range(25))
def test_solver_equals_brute_force_on_random_instances(seed: int) -> None:
    rng = random.Random(seed)
    items = [
        Item(f"i{k}", tuple(Option(rng.randrange(1, 40) * 8, rng.random() * 10) for _ in range(rng.randrange(1, 5))))
        for k in range(rng.randrange(2, 7))
    ]
    low = sum(min(o.cost for o in item.options) for item in items)
    high = sum(max(o.cost for o in item.options) for item in items)
    budget = rng.randrange(low, high + 1)
    solution = solve(items, budget)
    assert solution.cost <= budget
    assert solution.loss == pytest.approx(brute_force(items, budget))


def test_coarsened_table_never_exceeds_the_budget() -> None:
    rng = random.Random(7)
    items = [Item(f"i{k}", tuple(Option(rng.randrange(1000, 90000), rng.random()) for _ in range(4))) for k in range(6)]
    budget = sum(sorted(o.cost for o in item.options)[2] for item in items)
    solution = solve(items, budget, max_states=50)  # forces rounding costs up to a coarse unit
    assert solution.cost <= budget
    assert solution.loss >= brute_force(items, budget) - 1e-12


def test_infeasible_budget() -> None:
    with pytest.raises(InfeasibleBudgetError):
        solve([Item("a", (Option(10, 1.0),))], 5)


def test_candidates_are_sorted_by_true_bits_and_must_fit() -> None:
    candidates = usable_candidates(LAYERS, [W8, get_scheme("W4A16"), W2, BF16])
    assert [c.scheme.name for c in candidates] == ["W2A16G64", "W4A16", "W8A16G64", "BF16"]
    assert candidates[1].avg_bits == pytest.approx(4.125)
    assert average_bits(LAYERS, BF16) == 16.0


@pytest.mark.parametrize("target", [2.3, 3.0, 4.25, 4.5, 5.0, 6.0, 7.9])
def test_plans_hit_the_budget_from_below(target: float) -> None:
    result = plan(target)
    assert result.avg_bits <= target + 1e-9
    # The smallest item changes cost by o_proj's 65536 weights x 1 bit (W3 -> W4): 0.0147 of the average.
    assert target - result.avg_bits < 0.02


def test_coarse_options_stay_under_the_budget() -> None:
    # Between W8 (8.25) and BF16 (16) the smallest step is o_proj: 65536 x 7.75 / 4456448 = 0.114.
    result = plan(12.0)
    assert 12.0 - 0.115 < result.avg_bits <= 12.0


def test_plan_is_the_optimum_of_the_additive_model() -> None:
    result = plan(4.5)
    loss = sum(error(LayerInfo(x.name, x.shape, x.fused_group), x.scheme) for x in result.layers)
    uniform_w4 = sum(error(layer, W4) for layer in LAYERS)
    assert loss < uniform_w4  # same budget class, strictly better than uniform 4.25 + leftover
    assert result.notes["predicted_loss"] == pytest.approx(loss)


def test_fused_groups_share_a_scheme_and_sensitive_layers_get_more_bits() -> None:
    result = plan(4.5)
    by_group: dict[str, set[str]] = {}
    for layer in result.layers:
        if layer.fused_group:
            by_group.setdefault(layer.fused_group, set()).add(layer.scheme.name)
    assert all(len(names) == 1 for names in by_group.values())
    bits = {layer.name.split(".")[-1]: layer.scheme.bits for layer in result.layers}
    assert bits["down_proj"] >= bits["q_proj"]


def test_pareto_plans_from_one_table_match_single_solves() -> None:
    front = plan_for_budgets(LAYERS, ALL, [3.0, 4.5, 6.0], error, "m", "sha")
    for target, single in zip([3.0, 4.5, 6.0], front):
        assert single.notes["predicted_loss"] == pytest.approx(plan(target).notes["predicted_loss"])
    losses = [p.notes["predicted_loss"] for p in front]
    assert losses == sorted(losses, reverse=True)


@pytest.mark.parametrize("target", [1.0, 2.0, 16.5, 30.0])
def test_unreachable_targets_are_refused_with_the_range(target: float) -> None:
    with pytest.raises(BudgetError, match=r"outside what the schemes can reach.*2\.25.*16\.0"):
        plan(target)


def test_no_fitting_scheme_is_refused() -> None:
    with pytest.raises(BudgetError, match="no candidate scheme fits x"):
        plan_for_budget([LayerInfo("x", (64, 96), None)], [W4], 4.5, error, "m", "sha")


def test_keep_rules_fix_layers_and_their_fused_group() -> None:
    keep = parse_keep(["*.k_proj=W8A16G64", "model.layers.0.mlp.down_proj=BF16"], get_scheme)
    result = plan(5.0, keep=keep)
    schemes = {layer.name: layer.scheme for layer in result.layers}
    assert all(schemes[f"model.layers.{b}.self_attn.q_proj"] == W8 for b in range(8))  # q/k/v fused with k
    assert schemes["model.layers.0.mlp.down_proj"] == BF16
    assert result.avg_bits <= 5.0


def test_the_first_matching_keep_rule_wins() -> None:
    keep = parse_keep(["model.layers.0.mlp.down_proj=BF16", "*.down_proj=W8A16G64"], get_scheme)
    schemes = {layer.name: layer.scheme for layer in plan(6.0, keep=keep).layers}
    assert schemes["model.layers.0.mlp.down_proj"] == BF16
    assert all(schemes[f"model.layers.{b}.mlp.down_proj"] == W8 for b in range(1, 8))


def test_bad_keep_rules() -> None:
    with pytest.raises(BudgetError, match="matches no quantizable layer"):
        plan(4.5, keep=parse_keep(["*.nothing=W4A16G64"], get_scheme))
    with pytest.raises(BudgetError, match="GLOB=SCHEME"):
        parse_keep(["*.down_proj"], get_scheme)
    with pytest.raises(BudgetError, match="different schemes"):
        plan(6.0, keep=parse_keep(["*.q_proj=W8A16G64", "*.k_proj=W4A16G64"], get_scheme))


def test_activation_schemes_are_refused_as_candidates_and_keep_rules() -> None:
    with pytest.raises(BudgetError, match="weight quantization only, not FP8_STATIC, NVFP4_A4"):
        plan_for_budget(LAYERS, [W4, get_scheme("NVFP4_A4"), get_scheme("FP8_STATIC")], 4.5, error, "m", "sha")
    with pytest.raises(BudgetError, match="not MXFP4_A4"):
        plan(4.5, keep=parse_keep(["*.down_proj=MXFP4_A4"], get_scheme))
    # a uniform plan of one such scheme is fine (arctl quantize --scheme FP8_STATIC)
    loaded = LoadedModel(tiny_llama(), None, "tiny", "sha")
    assert {layer.scheme.name for layer in plan_uniform(loaded, get_scheme("FP8_STATIC")).layers} == {"FP8_STATIC"}


def test_runtime_filters() -> None:
    assert runtime_allows("sglang", W4) and not runtime_allows("sglang", get_scheme("MXFP4"))
    assert not runtime_allows("sglang", get_scheme("W4A16G64_ASYM"))
    assert runtime_allows("gguf", get_scheme("W4A16G32_ASYM")) and not runtime_allows("gguf", W4)
    assert runtime_allows("compressed-tensors", get_scheme("NVFP4"))
    with pytest.raises(BudgetError, match="unknown runtime"):
        runtime_allows("tensorrt", W4)
    with pytest.raises(BudgetError, match="no candidate scheme fits"):
        plan(4.5, schemes=[get_scheme("MXFP4"), get_scheme("W4A16G64_ASYM")], runtime="sglang")


@pytest.mark.parametrize("name", ["NVFP4", "W4A16C_ASYM", "W3A16G32", "MXFP8"])
def test_uniform_plan_of_any_fitting_scheme(name: str) -> None:
    """plan_uniform does not go through the (cost-rounding) table: schemes whose exact uniform
    budget the table rounds past (NVFP4's per-tensor scale, channel-wise zeros) still plan."""
    loaded = LoadedModel(tiny_llama(), None, "tiny", "0")
    plan = plan_uniform(loaded, get_scheme(name))
    assert {layer.scheme.name for layer in plan.layers} == {name}
    assert plan.avg_bits == pytest.approx(plan.target_avg_bits)


def test_default_calibration_rows_fit_the_model_context():
    def model_with_context(context):
        return SimpleNamespace(config=SimpleNamespace(max_position_embeddings=context))

    assert calibration_seqlen(model_with_context(256)) == 256
    assert calibration_seqlen(model_with_context(8192)) == CALIBRATION_SEQLEN
    assert calibration_seqlen(SimpleNamespace()) == CALIBRATION_SEQLEN
    assert calibration_seqlen(model_with_context(256), seqlen=1024) == 1024  # asked for: taken as given
