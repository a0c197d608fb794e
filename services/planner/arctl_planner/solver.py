"""Multiple-choice knapsack: one option per item, total cost within a budget, least total loss.

Solved exactly by dynamic programming over integer costs. Costs are divided by their greatest common
divisor; if the table would still exceed ``max_states`` cells, costs are rounded *up* to a coarser
unit, so the answer never exceeds the budget (it is then optimal for the rounded costs). One pass
fills the table up to the largest budget, so any number of budgets (a Pareto front) is read from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAX_STATES = 400_000


@dataclass(frozen=True)
class Option:
    cost: int
    loss: float


@dataclass(frozen=True)
class Item:
    name: str
    options: tuple[Option, ...]


class InfeasibleBudgetError(ValueError):
    """Even the cheapest option of every item exceeds the budget."""


def _unit(items: Sequence[Item], top_budget: int, max_states: int) -> int:
    unit = 0
    for item in items:
        for option in item.options:
            unit = math.gcd(unit, option.cost)
    unit = max(unit, 1)
    if top_budget // unit > max_states:
        unit = -(-top_budget // max_states)
    return unit


@dataclass
class Solution:
    choices: list[int]
    cost: int
    loss: float


class KnapsackTable:
    """The DP table for ``items`` up to ``top_budget``; ``solve(budget)`` reads one optimum."""

    def __init__(self, items: Sequence[Item], top_budget: int, max_states: int = MAX_STATES) -> None:
        self.items = list(items)
        self.unit = _unit(self.items, top_budget, max_states)
        self.states = top_budget // self.unit + 1
        best = np.full(self.states, np.inf)
        best[0] = 0.0
        self.back = np.zeros((len(self.items), self.states), dtype=np.int16)
        for index, item in enumerate(self.items):
            new = np.full(self.states, np.inf)
            choice = np.zeros(self.states, dtype=np.int16)
            for option_index, option in enumerate(item.options):
                shift = -(-option.cost // self.unit)
                if shift >= self.states:
                    continue
                candidate = np.full(self.states, np.inf)
                candidate[shift:] = best[: self.states - shift] + option.loss
                better = candidate < new
                new[better] = candidate[better]
                choice[better] = option_index
            best = new
            self.back[index] = choice
        self.best = best

    def solve(self, budget: int) -> Solution:
        limit = min(budget // self.unit, self.states - 1)
        reachable = self.best[: limit + 1]
        if not np.isfinite(reachable).any():
            raise InfeasibleBudgetError("no assignment fits the budget")
        state = int(np.argmin(reachable))
        choices = [0] * len(self.items)
        for index in range(len(self.items) - 1, -1, -1):
            option_index = int(self.back[index, state])
            choices[index] = option_index
            state -= -(-self.items[index].options[option_index].cost // self.unit)
        cost = sum(item.options[c].cost for item, c in zip(self.items, choices, strict=True))
        loss = sum(item.options[c].loss for item, c in zip(self.items, choices, strict=True))
        return Solution(choices, cost, loss)


def solve(items: Sequence[Item], budget: int, max_states: int = MAX_STATES) -> Solution:
    """The least-loss choice of one option per item with total cost <= ``budget``."""
    return KnapsackTable(items, budget, max_states).solve(budget)
