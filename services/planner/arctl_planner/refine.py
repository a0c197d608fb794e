"""Refinement of a solved plan by measurement: try the budget-neutral swaps the additive model rates
nearly as good (``swaps.ranked_swaps``), measure each swapped plan's KL to the float model on the
calibration rows, keep a swap when it lowers the measured KL. Greedy, ``evaluations`` measurements
at most; the plan never leaves its budget."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from arctl.plan import Plan
from arctl_planner.budget import BudgetProblem
from arctl_planner.measure import measured_kl
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
    before = best = measured_kl(model, plan, rows, reference)
    tried: set[tuple[int, ...]] = {tuple(choices)}
    done = accepted = 0
    while done < evaluations:
        candidates = [
            swap for swap in ranked_swaps(problem.items, choices, capacity, len(tried) + evaluations)
            if tuple(swap.apply(choices)) not in tried
        ]
        if not candidates:
            break
        trial_choices = candidates[0].apply(choices)
        tried.add(tuple(trial_choices))
        trial = problem.plan(trial_choices, plan.target_avg_bits, plan.model_id, plan.model_sha256, plan.notes)
        kl = measured_kl(model, trial, rows, reference)
        done += 1
        if kl < best:
            best, choices, plan, accepted = kl, trial_choices, trial, accepted + 1
        on_step(done, best)
    notes = {
        **plan.notes,
        "measured_kl": best,
        "measured_tokens": int(rows.numel()),
        "measured_kl_before_refine": before,
        "refine_evaluations": done,
        "refine_accepted": accepted,
    }
    return Refinement(replace(plan, notes=notes), best, before, done, accepted)
