"""A first planner: the uniform scheme at the budget, or two schemes mixed to hit it.

Pure planning logic over layer descriptions and per-layer error scores; no model, no I/O.

- Candidates are ordered by their true average bits on this model.
- If one candidate lands within ``tolerance`` below the target, every layer gets it.
- Otherwise every layer starts at the richest candidate that stays under the target, and fused
  groups (q/k/v, gate/up, experts) are raised to the next candidate, most error removed per added bit
  first, while the true average stays at or under the target.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from arctl.bits import layer_bits, model_bits
from arctl.models import LayerInfo
from arctl.plan import LayerPlan, Plan
from arctl.schemes import Scheme

TOLERANCE = 0.02

ErrorFn = Callable[[LayerInfo, Scheme], float]


class BudgetError(ValueError):
    """The requested average bits cannot be reached with the candidate schemes."""


@dataclass(frozen=True)
class Candidate:
    scheme: Scheme
    avg_bits: float


def average_bits(layers: Sequence[LayerInfo], scheme: Scheme) -> float:
    return model_bits([layer_bits(scheme, *layer.shape) for layer in layers]).average


def usable_candidates(layers: Sequence[LayerInfo], schemes: Sequence[Scheme]) -> list[Candidate]:
    """Schemes that fit every layer, sorted by true average bits on these layers."""
    fitting = [scheme for scheme in schemes if all(scheme.fits(layer.shape[1]) for layer in layers)]
    return sorted((Candidate(s, average_bits(layers, s)) for s in fitting), key=lambda c: c.avg_bits)


def _groups(layers: Sequence[LayerInfo]) -> dict[str, list[LayerInfo]]:
    groups: dict[str, list[LayerInfo]] = defaultdict(list)
    for layer in layers:
        groups[layer.fused_group or layer.name].append(layer)
    return groups


def plan_for_budget(
    layers: Sequence[LayerInfo],
    schemes: Sequence[Scheme],
    target_avg_bits: float,
    error: ErrorFn,
    model_id: str,
    model_sha256: str,
    tolerance: float = TOLERANCE,
) -> Plan:
    """A plan whose true average bits is at most ``target_avg_bits`` and, where the candidates allow,
    within ``tolerance`` of it.

    ``error(layer, scheme)`` is the damage of quantizing that layer with that scheme (any additive
    score, e.g. squared weight error); it is called only for the two schemes around the target.

    Raises:
        BudgetError: target below the cheapest or above the richest candidate, or no candidate fits.
    """
    candidates = usable_candidates(layers, schemes)
    if not candidates:
        names = ", ".join(s.name for s in schemes)
        raise BudgetError(f"none of the schemes ({names}) fits every layer's shape")
    low_end, high_end = candidates[0].avg_bits, candidates[-1].avg_bits
    if not low_end <= target_avg_bits <= high_end:
        raise BudgetError(
            f"--avg-bits {target_avg_bits} is outside what the schemes can reach on this model: "
            f"{low_end:.4f} ({candidates[0].scheme.name}) to {high_end:.4f} ({candidates[-1].scheme.name}) true bits"
        )
    below = [c for c in candidates if c.avg_bits <= target_avg_bits]
    low = below[-1]
    assignment = {layer.name: low.scheme for layer in layers}
    notes: dict[str, object] = {"planner": "budget", "schemes": [c.scheme.name for c in candidates]}
    if target_avg_bits - low.avg_bits > tolerance and low is not candidates[-1]:
        high = candidates[candidates.index(low) + 1]
        _raise_groups(layers, assignment, low.scheme, high.scheme, target_avg_bits, error)
    return Plan(
        model_id=model_id,
        model_sha256=model_sha256,
        layers=tuple(LayerPlan(x.name, x.shape, assignment[x.name], x.fused_group) for x in layers),
        target_avg_bits=target_avg_bits,
        notes=notes,
    )


def _raise_groups(
    layers: Sequence[LayerInfo],
    assignment: dict[str, Scheme],
    low: Scheme,
    high: Scheme,
    target: float,
    error: ErrorFn,
) -> None:
    """Move whole fused groups from ``low`` to ``high`` while the average stays <= ``target``."""
    total_weights = sum(x.shape[0] * x.shape[1] for x in layers)
    budget = target * total_weights - sum(layer_bits(low, *x.shape).total for x in layers)
    options = []
    for members in _groups(layers).values():
        cost = sum(layer_bits(high, *m.shape).total - layer_bits(low, *m.shape).total for m in members)
        gain = sum(error(m, low) - error(m, high) for m in members)
        options.append((gain / cost, cost, members))
    options.sort(key=lambda option: option[0], reverse=True)
    for _, cost, members in options:
        if cost <= budget:
            budget -= cost
            for member in members:
                assignment[member.name] = high
