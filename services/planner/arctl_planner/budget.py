"""Choosing one scheme per layer for a bit budget: items, options, constraints, and the exact solve.

Pure planning logic over layer descriptions and a per-(layer, scheme) loss; no model, no I/O.

- Items are the groups a runtime fuses (q/k/v, gate/up, all experts of a MoE layer) or single
  layers; an item's options are the schemes that tile every member, allowed by the target runtime.
- ``keep`` fixes the scheme of layers matching a glob (the first matching rule wins; the whole fused
  group follows).
- Cost is true bits (codes + scales + zeros); the budget is ``target * weights``; the choice is the
  exact least-loss assignment within it (``solver.KnapsackTable``), for one budget or several.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from arctl.bits import layer_bits, model_bits
from arctl.models import LayerInfo
from arctl.plan import LayerPlan, Plan
from arctl.schemes import Scheme
from arctl_planner.solver import InfeasibleBudgetError, Item, KnapsackTable, Option

ErrorFn = Callable[[LayerInfo, Scheme], float]

RUNTIMES = ("any", "sglang", "gguf", "compressed-tensors")


class BudgetError(ValueError):
    """The request cannot be met: budget out of reach, no scheme fits, a rule matches nothing."""


def runtime_allows(runtime: str, scheme: Scheme) -> bool:
    """Whether ``runtime`` runs ``scheme``: SGLang's auto_round path takes INT 2/3/4/8 symmetric;
    GGUF keeps INT4/INT5/INT8 in groups of 32 (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0); compressed-tensors
    takes INT, MXFP4/8, NVFP4, FP8."""
    if runtime not in RUNTIMES:
        raise BudgetError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
    if not scheme.quantized or runtime in ("any", "compressed-tensors"):
        return True
    if runtime == "sglang":
        return scheme.dtype == "int" and scheme.sym and scheme.bits in (2, 3, 4, 8)
    return scheme.dtype == "int" and scheme.group_size == 32 and (scheme.bits in (4, 5) or (scheme.bits == 8 and scheme.sym))


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


def parse_keep(rules: Sequence[str], lookup: Callable[[str], Scheme]) -> list[tuple[str, Scheme]]:
    """``["glob=SCHEME", ...]`` -> ``[(glob, scheme), ...]``."""
    parsed = []
    for rule in rules:
        pattern, sep, name = rule.partition("=")
        if not sep or not pattern or not name:
            raise BudgetError(f"--keep {rule!r} is not GLOB=SCHEME (e.g. '*.down_proj=W8A16G64')")
        parsed.append((pattern.strip(), lookup(name.strip())))
    return parsed


def _fixed_schemes(layers: Sequence[LayerInfo], keep: Sequence[tuple[str, Scheme]]) -> dict[str, Scheme]:
    fixed: dict[str, Scheme] = {}
    for pattern, scheme in keep:
        matched = [layer for layer in layers if fnmatch.fnmatchcase(layer.name, pattern)]
        if not matched:
            hint = "; the output layer is planned only with --lm-head" if fnmatch.fnmatchcase("lm_head", pattern) else ""
            if fnmatch.fnmatchcase("model.embed_tokens", pattern):
                hint = "; the input embeddings are planned only with --embeddings"
            raise BudgetError(f"--keep {pattern!r} matches no quantizable layer (e.g. {layers[0].name}){hint}")
        for layer in matched:
            if layer.name in fixed:
                continue  # the first matching rule wins
            if not scheme.fits(layer.shape[1]):
                raise BudgetError(f"--keep {pattern}: {scheme.name} does not fit {layer.name} (in_features {layer.shape[1]})")
            fixed[layer.name] = scheme
    return fixed


def _capacity(target: float, weights: int) -> int:
    """The budget in whole bits. A target computed from a plan's own bits (``bits / weights``) can land
    a rounding error below that integer: round such a target back up, never more than 1e-6 bit."""
    return int(target * weights + 1e-6)


@dataclass(frozen=True)
class BudgetProblem:
    """The knapsack for ``layers``: items (fused groups or lone layers), their member layers and the
    scheme behind each option; maps a choice vector to a Plan and back."""

    layers: tuple[LayerInfo, ...]
    items: tuple[Item, ...]
    members: tuple[tuple[LayerInfo, ...], ...]
    options: tuple[tuple[Scheme, ...], ...]

    @property
    def weights(self) -> int:
        return sum(layer.shape[0] * layer.shape[1] for layer in self.layers)

    def capacity(self, target: float) -> int:
        return _capacity(target, self.weights)

    def choices(self, plan: Plan) -> list[int]:
        """The option index of each item in ``plan``."""
        schemes = {layer.name: layer.scheme for layer in plan.layers}
        return [options.index(schemes[group[0].name]) for group, options in zip(self.members, self.options, strict=True)]

    def predicted_loss(self, choices: Sequence[int]) -> float:
        return sum(item.options[c].loss for item, c in zip(self.items, choices, strict=True))

    def plan(self, choices: Sequence[int], target: float, model_id: str, model_sha256: str, notes: Mapping[str, object]) -> Plan:
        chosen = {
            member.name: self.options[index][choice] for index, choice in enumerate(choices) for member in self.members[index]
        }
        return Plan(
            model_id=model_id,
            model_sha256=model_sha256,
            layers=tuple(LayerPlan(x.name, x.shape, chosen[x.name], x.fused_group) for x in self.layers),
            target_avg_bits=target,
            notes={**notes, "predicted_loss": self.predicted_loss(choices)},
        )


def refuse_activation_schemes(schemes: Sequence[Scheme], keep: Sequence[tuple[str, Scheme]] = ()) -> None:
    """``BudgetError`` naming the schemes with activation quantization among ``schemes`` and ``keep``:
    the planner's sensitivity and refinement measure weight quantization only."""
    with_activations = sorted({s.name for s in (*schemes, *(scheme for _, scheme in keep)) if s.act is not None})
    if with_activations:
        raise BudgetError(
            f"the planner measures weight quantization only, not {', '.join(with_activations)} (activation "
            "quantization): plan weight-only schemes, or quantize every layer with one such scheme (--scheme)"
        )


def build_problem(
    layers: Sequence[LayerInfo],
    schemes: Sequence[Scheme],
    error: ErrorFn,
    runtime: str = "any",
    keep: Sequence[tuple[str, Scheme]] = (),
    activations_allowed: bool = False,
) -> BudgetProblem:
    """Items (one per fused group or lone layer) with their options' true bits and summed loss;
    schemes with activation quantization only when ``activations_allowed`` (a uniform plan)."""
    if not activations_allowed:
        refuse_activation_schemes(schemes, keep)
    groups: dict[str, list[LayerInfo]] = defaultdict(list)
    for layer in layers:
        groups[layer.fused_group or layer.name].append(layer)
    fixed = _fixed_schemes(layers, keep)
    allowed = [scheme for scheme in schemes if runtime_allows(runtime, scheme)]
    items, members, options = [], [], []
    for name, group in groups.items():
        pinned = {fixed[m.name] for m in group if m.name in fixed}
        if len(pinned) > 1:
            raise BudgetError(f"--keep gives the fused group {name} different schemes; its layers must share one")
        choices = tuple(pinned) if pinned else tuple(s for s in allowed if all(s.fits(m.shape[1]) for m in group))
        if not choices:
            raise BudgetError(
                f"no candidate scheme fits {group[0].name} (in_features {group[0].shape[1]}) for runtime {runtime}"
            )
        item_options = tuple(
            Option(cost=sum(layer_bits(s, *m.shape).total for m in group), loss=sum(error(m, s) for m in group))
            for s in choices
        )
        items.append(Item(name, item_options))
        members.append(tuple(group))
        options.append(choices)
    return BudgetProblem(tuple(layers), tuple(items), tuple(members), tuple(options))


def plan_for_budgets(
    layers: Sequence[LayerInfo],
    schemes: Sequence[Scheme],
    targets: Sequence[float],
    error: ErrorFn,
    model_id: str,
    model_sha256: str,
    runtime: str = "any",
    keep: Sequence[tuple[str, Scheme]] = (),
    notes: Mapping[str, object] | None = None,
) -> list[Plan]:
    """For each target true average bits, the least-loss plan whose average is at most the target.

    Raises:
        BudgetError: a target below the cheapest or above the richest assignment, or no scheme fits.
    """
    return solve_budgets(build_problem(layers, schemes, error, runtime, keep), targets, model_id, model_sha256,
                         {**(notes or {}), "runtime": runtime})


def solve_budgets(
    problem: BudgetProblem, targets: Sequence[float], model_id: str, model_sha256: str, notes: Mapping[str, object]
) -> list[Plan]:
    """``plan_for_budgets`` on a built problem."""
    weights = problem.weights
    cheapest = sum(min(o.cost for o in item.options) for item in problem.items) / weights
    richest = sum(max(o.cost for o in item.options) for item in problem.items) / weights
    for target in targets:
        if not cheapest - 1e-9 <= target <= richest + 1e-9:
            raise BudgetError(
                f"--avg-bits {target} is outside what the schemes can reach on this model: "
                f"{cheapest:.4f} to {richest:.4f} true bits"
            )
    table = KnapsackTable(problem.items, problem.capacity(max(targets)))
    plans = []
    for target in targets:
        try:
            solution = table.solve(problem.capacity(target))
        except InfeasibleBudgetError as exc:
            raise BudgetError(f"--avg-bits {target}: {exc}") from exc
        plans.append(problem.plan(solution.choices, target, model_id, model_sha256, notes))
    return plans


def plan_for_budget(
    layers: Sequence[LayerInfo],
    schemes: Sequence[Scheme],
    target_avg_bits: float,
    error: ErrorFn,
    model_id: str,
    model_sha256: str,
    runtime: str = "any",
    keep: Sequence[tuple[str, Scheme]] = (),
    notes: Mapping[str, object] | None = None,
) -> Plan:
    """``plan_for_budgets`` for one target."""
    if not layers:
        raise BudgetError("the model has no quantizable layers")
    return plan_for_budgets(layers, schemes, [target_avg_bits], error, model_id, model_sha256, runtime, keep, notes)[0]
