"""Refinement of a solved plan by measurement: try the budget-neutral swaps the additive model rates
nearly as good (``swaps.ranked_swaps``), measure each swapped plan's KL to the float model on the
calibration rows (``SwapMeasure``: only the blocks from the first changed one are rerun), keep a
swap when it lowers the measured KL. Greedy, ``evaluations`` measurements at most; the plan never
leaves its budget."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from arctl.plan import Plan
from arctl_planner.budget import BudgetProblem
from arctl_planner.measure import SwapMeasure
from arctl_planner.swaps import ranked_swaps


@dataclass(frozen=True)
class Refinement:
    plan: Plan
    measured_kl: float
    measured_kl_before: float
    evaluations: int
    accepted: int


def refine_plan(
    model: nn.Module,
    problem: BudgetProblem,
    plan: Plan,
    rows: torch.Tensor,
    reference: list[torch.Tensor],
    evaluations: int,
    on_step: Callable[[int, float], None] = lambda _done, _kl: None,
) -> Refinement:
    """``plan`` improved by at most ``evaluations`` measured swaps; the returned plan's notes carry
    ``measured_kl`` (on ``rows``), ``measured_kl_before_refine``, ``refine_evaluations`` and
    ``refine_accepted``. ``on_step(done, best_kl)`` is called after each measurement."""
    capacity = problem.capacity(plan.target_avg_bits)
    choices = problem.choices(plan)
    tried: set[tuple[int, ...]] = {tuple(choices)}
    done = accepted = 0
    with SwapMeasure(model, plan, rows, reference) as measure:
        before = best = measure.kl
        while done < evaluations:
            candidates = [
                swap for swap in ranked_swaps(problem.items, choices, capacity, len(tried) + evaluations)
                if tuple(swap.apply(choices)) not in tried
            ]
            if not candidates:
                break
            swap = candidates[0]
            trial_choices = swap.apply(choices)
            tried.add(tuple(trial_choices))
            changes = {
                member.name: problem.options[item][trial_choices[item]]
                for item in (swap.up, swap.down)
                for member in problem.members[item]
            }
            kl = measure.trial(changes)
            done += 1
            if kl < best:
                measure.accept()
                best, choices, accepted = kl, trial_choices, accepted + 1
            else:
                measure.reject()
            on_step(done, best)
    plan = problem.plan(choices, plan.target_avg_bits, plan.model_id, plan.model_sha256, plan.notes)
    notes = {
        **plan.notes,
        "measured_kl": best,
        "measured_tokens": int(rows.numel()),
        "measured_kl_before_refine": before,
        "refine_evaluations": done,
        "refine_accepted": accepted,
    }
    return Refinement(replace(plan, notes=notes), best, before, done, accepted)
