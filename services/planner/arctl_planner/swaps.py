"""Budget-neutral swaps around a knapsack solution, ranked by what the additive model predicts.

The solver's answer is optimal for the additive loss model, which ignores how layers' errors
interact. The refinement measures a few alternatives the model rates almost as good: one item moves
to its next richer option, another to its next cheaper one, the total cost staying within the
budget. Pure functions over ``solver.Item``; no model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from arctl_planner.solver import Item


@dataclass(frozen=True)
class Swap:
    """Item ``up`` to option ``up_option``, item ``down`` to ``down_option``; ``predicted`` is the
    additive model's change of loss (>= 0 around an exact optimum), ``cost`` the change of bits."""

    up: int
    up_option: int
    down: int
    down_option: int
    predicted: float
    cost: int

    def apply(self, choices: Sequence[int]) -> list[int]:
        changed = list(choices)
        changed[self.up] = self.up_option
        changed[self.down] = self.down_option
        return changed


def _neighbours(item: Item, current: int) -> tuple[int | None, int | None]:
    """The options next cheaper and next richer than ``current`` on the item's cost order (among
    options of lower loss when richer, so a move up can pay)."""
    cost, loss = item.options[current].cost, item.options[current].loss
    cheaper = [i for i, o in enumerate(item.options) if o.cost < cost]
    richer = [i for i, o in enumerate(item.options) if o.cost > cost and o.loss < loss]
    down = max(cheaper, key=lambda i: (item.options[i].cost, -item.options[i].loss)) if cheaper else None
    up = min(richer, key=lambda i: (item.options[i].cost, item.options[i].loss)) if richer else None
    return down, up


def ranked_swaps(items: Sequence[Item], choices: Sequence[int], capacity: int, limit: int) -> list[Swap]:
    """Up to ``limit`` budget-neutral swaps of two different items, least predicted loss first.

    The cost after the swap stays ``<= capacity``; each item moves at most one step on its cost
    order. Ties are broken by item order, so the ranking is deterministic.
    """
    used = sum(item.options[c].cost for item, c in zip(items, choices, strict=True))
    ups, downs = [], []
    for index, (item, current) in enumerate(zip(items, choices, strict=True)):
        down, up = _neighbours(item, current)
        here = item.options[current]
        if up is not None:
            ups.append((index, up, item.options[up].cost - here.cost, item.options[up].loss - here.loss))
        if down is not None:
            downs.append((index, down, item.options[down].cost - here.cost, item.options[down].loss - here.loss))
    if not ups or not downs or limit <= 0:
        return []
    up_cost = np.array([u[2] for u in ups], dtype=np.int64)[:, None]
    down_cost = np.array([d[2] for d in downs], dtype=np.int64)[None, :]
    predicted = np.array([u[3] for u in ups])[:, None] + np.array([d[3] for d in downs])[None, :]
    same_item = np.array([u[0] for u in ups])[:, None] == np.array([d[0] for d in downs])[None, :]
    feasible = (used + up_cost + down_cost <= capacity) & ~same_item
    predicted = np.where(feasible, predicted, np.inf)
    order = np.argsort(predicted, axis=None, kind="stable")[:limit]
    swaps = []
    for flat in order:
        row, col = divmod(int(flat), predicted.shape[1])
        if not np.isfinite(predicted[row, col]):
            break
        up, down = ups[row], downs[col]
        swaps.append(Swap(up[0], up[1], down[0], down[1], float(predicted[row, col]), int(up[2] + down[2])))
    return swaps
