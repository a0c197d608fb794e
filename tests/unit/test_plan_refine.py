"""The planner's refinement: budget-neutral swaps (pure ranking) and the measured greedy loop on a
tiny random model."""

from __future__ import annotations

import copy
import random
from dataclasses import replace

import pytest
import torch
from tiny_models import TINY_VOCAB, tiny_llama

from arctl.models import LoadedModel, quantizable_layers
from arctl.schemes import get_scheme
from arctl_planner.budget import build_problem, solve_budgets
from arctl_planner.engine import PlanRequest, plan_model, squared_weight_error
from arctl_planner.measure import SwapMeasure, measured_kl, reference_log_probs
from arctl_planner.refine import refine_plan
from arctl_planner.solver import Item, Option, solve
from arctl_planner.swaps import ranked_swaps

SCHEMES = [get_scheme(n) for n in ("W2A16G32_ASYM", "W3A16G64", "W4A16G64", "W4A16G32", "W8A16G64", "BF16")]


def random_items(rng: random.Random, count: int) -> list[Item]:
    items = []
    for index in range(count):
        costs = sorted(rng.sample(range(10, 80), 4))
        losses = sorted((rng.uniform(0, 10) for _ in costs), reverse=True)
        items.append(Item(f"i{index}", tuple(Option(c, l) for c, l in zip(costs, losses, strict=True))))
    return items


def adjacent(item: Item, current: int, other: int) -> bool:
    costs = sorted({o.cost for o in item.options})
    here, there = item.options[current].cost, item.options[other].cost
    return abs(costs.index(here) - costs.index(there)) == 1


@pytest.mark.parametrize("seed", range(10))
def test_ranked_swaps_stay_in_budget_move_two_items_one_step_and_match_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    items = random_items(rng, 6)
    capacity = sum(item.options[1].cost for item in items) + rng.randint(0, 20)
    choices = solve(items, capacity).choices
    swaps = ranked_swaps(items, choices, capacity, limit=1000)
    brute = []
    for up, up_item in enumerate(items):
        for down, down_item in enumerate(items):
            if up == down:
                continue
            for a, up_opt in enumerate(up_item.options):
                for b, down_opt in enumerate(down_item.options):
                    here_up, here_down = up_item.options[choices[up]], down_item.options[choices[down]]
                    if not (up_opt.cost > here_up.cost and up_opt.loss < here_up.loss and adjacent(up_item, choices[up], a)):
                        continue
                    if not (down_opt.cost < here_down.cost and adjacent(down_item, choices[down], b)):
                        continue
                    changed = list(choices)
                    changed[up], changed[down] = a, b
                    if sum(item.options[c].cost for item, c in zip(items, changed, strict=True)) <= capacity:
                        brute.append(up_opt.loss - here_up.loss + down_opt.loss - here_down.loss)
    assert sorted(s.predicted for s in swaps) == pytest.approx(sorted(brute))
    assert [s.predicted for s in swaps] == sorted(s.predicted for s in swaps)
    for swap in swaps:
        changed = swap.apply(choices)
        assert sum(a != b for a, b in zip(changed, choices, strict=True)) == 2
        assert sum(item.options[c].cost for item, c in zip(items, changed, strict=True)) <= capacity
        assert swap.predicted >= -1e-9  # the knapsack answer is exact: no swap is predicted to gain


def test_ranked_swaps_limit_and_no_room():
    items = [Item("a", (Option(1, 5.0), Option(2, 1.0))), Item("b", (Option(1, 5.0), Option(2, 1.0)))]
    assert ranked_swaps(items, [1, 1], capacity=4, limit=5) == []  # nothing richer to move to
    swaps = ranked_swaps(items, [1, 0], capacity=3, limit=5)
    assert [(s.up, s.down) for s in swaps] == [(1, 0)]
    assert ranked_swaps(items, [1, 0], capacity=3, limit=0) == []


@pytest.fixture(scope="module")
def tiny():
    loaded = LoadedModel(tiny_llama(seed=3), None, "tiny", "0")
    rows = torch.randint(4, TINY_VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))
    return loaded, rows


def test_refinement_keeps_the_budget_and_never_raises_the_measured_kl(tiny):
    loaded, rows = tiny
    layers = quantizable_layers(loaded.model)
    problem = build_problem(layers, SCHEMES, squared_weight_error(loaded.model))
    plan = solve_budgets(problem, [3.5], "tiny", "0", {})[0]
    reference = reference_log_probs(loaded.model, rows)
    result = refine_plan(loaded.model, problem, plan, rows, reference, evaluations=8)
    assert result.evaluations == 8
    assert result.measured_kl <= result.measured_kl_before
    assert result.measured_kl_before == pytest.approx(measured_kl(loaded.model, plan, rows, reference))
    assert result.measured_kl == pytest.approx(measured_kl(loaded.model, result.plan, rows, reference))
    assert result.plan.avg_bits <= 3.5
    changed = sum(a.scheme != b.scheme for a, b in zip(plan.layers, result.plan.layers, strict=True))
    assert (changed == 0) == (result.accepted == 0)
    assert result.plan.notes["refine_accepted"] == result.accepted
    assert result.plan.notes["predicted_loss"] == pytest.approx(problem.predicted_loss(problem.choices(result.plan)))
    unchanged = refine_plan(loaded.model, problem, plan, rows, reference, evaluations=0)
    assert unchanged.plan.layers == plan.layers and unchanged.evaluations == 0


def test_plan_model_reports_the_refinement(tiny):
    loaded, rows = tiny
    request = PlanRequest(targets=(3.5, 5.0), schemes=tuple(SCHEMES), sensitivity="weight", refine_evaluations=3)
    events = []
    plans = plan_model(loaded, request, rows, progress=events.append)
    assert [p.notes["refine_evaluations"] for p in plans] == [3, 3]
    assert all(p.notes["measured_kl"] <= p.notes["measured_kl_before_refine"] for p in plans)
    assert [e.stage for e in events if e.stage == "refine"] == ["refine", "refine"]
    plain = plan_model(loaded, PlanRequest(targets=(3.5,), schemes=tuple(SCHEMES), sensitivity="weight", refine_evaluations=0), rows)
    assert plain[0].notes["refine_evaluations"] == 0


def test_swap_measure_equals_a_full_measurement_and_restores_the_weights(tiny):
    loaded, rows = tiny
    model = loaded.model
    layers = quantizable_layers(model)
    problem = build_problem(layers, SCHEMES, squared_weight_error(model))
    plan = solve_budgets(problem, [3.5], "tiny", "0", {})[0]
    reference = reference_log_probs(model, rows)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    float_copy = copy.deepcopy(model)  # SwapMeasure changes ``model`` in place: expectations come from a copy
    last_block = layers[-1].name  # a change in the last block reruns only that block
    first_block = layers[0].name
    with SwapMeasure(model, plan, rows, reference) as measure:
        assert measure.kl == pytest.approx(measured_kl(float_copy, plan, rows, reference), rel=1e-6)
        for changes, keep in (({last_block: get_scheme("W2A16G32_ASYM")}, True), ({first_block: get_scheme("BF16")}, False),
                              ({first_block: get_scheme("W8A16G64"), last_block: get_scheme("W4A16G32")}, True)):
            trial = replace(plan, layers=tuple(
                replace(layer, scheme=changes.get(layer.name, measure.schemes[layer.name])) for layer in plan.layers
            ))
            kl = measure.trial(changes)
            assert kl == pytest.approx(measured_kl(float_copy, trial, rows, reference), rel=1e-6)
            if keep:
                measure.accept()
                plan = trial
            else:
                measure.reject()
            assert measure.kl == pytest.approx(measured_kl(float_copy, plan, rows, reference), rel=1e-6)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
