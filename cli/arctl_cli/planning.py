"""CLI glue for planning: sizes, runtimes implied by export formats, calibration for the sensitivity."""

from __future__ import annotations

import re
from pathlib import Path

from arctl.data import calibration_samples
from arctl.models import LoadedModel
from arctl.plan import Plan
from arctl.progress import Progress, ProgressCallback
from arctl.schemes import get_scheme
from arctl_planner.budget import BudgetError, parse_keep
from arctl_planner.engine import (
    CALIBRATION_NSAMPLES,
    CALIBRATION_SEED,
    REFINE_EVALUATIONS,
    PlanRequest,
    calibration_seqlen,
    plan_model,
    target_bits_for_size,
)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(i?)[bB]?\s*$")
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
_FORMAT_RUNTIME = {"auto_round": "sglang", "auto_gptq": "sglang", "auto_awq": "sglang", "gguf": "gguf",
                   "compressed-tensors": "compressed-tensors"}


def parse_size(text: str) -> int:
    """``80MB`` -> 80_000_000 bytes (``MiB``: powers of two)."""
    match = _SIZE.match(text)
    if not match:
        raise BudgetError(f"--max-size {text!r} is not a size such as 80MB, 1.5GB or 500000")
    number, unit, binary = match.groups()
    scale = _UNITS[unit.lower()] if not binary else 1024 ** " kmg".index(unit.lower())
    return int(float(number) * scale)


def parse_budgets(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise BudgetError(f"--pareto {text!r} is not a comma-separated list of bit-widths") from exc


def runtime_for(formats: list[str], explicit: str | None) -> str:
    """The runtime a plan must fit: given with ``--for``, else the one the first export format serves."""
    if explicit:
        return explicit
    return _FORMAT_RUNTIME.get(formats[0], "any") if formats else "any"


def build_request(
    targets: tuple[float, ...], schemes: str | None, runtime: str, keep: list[str], sensitivity: str,
    refine_evaluations: int = REFINE_EVALUATIONS, head: bool = False, embeddings: bool = False,
) -> PlanRequest:
    parsed = tuple(get_scheme(name) for name in schemes.split(",") if name.strip()) if schemes else None
    return PlanRequest(
        targets=targets, schemes=parsed, runtime=runtime, keep=tuple(parse_keep(keep, get_scheme)), sensitivity=sensitivity,
        head=head, embeddings=embeddings, refine_evaluations=refine_evaluations,
    )


def resolve_targets(
    loaded: LoadedModel, avg_bits: float | None, max_size: str | None, pareto: str | None, head: bool = False,
    embeddings: bool = False,
) -> tuple[float, ...]:
    given = [x for x in (avg_bits, max_size, pareto) if x is not None]
    if len(given) > 1:
        raise BudgetError("give only one of --avg-bits, --max-size and --pareto")
    if pareto is not None:
        return parse_budgets(pareto)
    if max_size is not None:
        return (target_bits_for_size(loaded.model, parse_size(max_size), head, embeddings),)
    return (4.5 if avg_bits is None else avg_bits,)


def make_plans(
    loaded: LoadedModel,
    request: PlanRequest,
    dataset: str,
    data_dir: Path | None,
    progress: ProgressCallback,
    nsamples: int = CALIBRATION_NSAMPLES,
    seqlen: int | None = None,
) -> list[Plan]:
    """Read calibration samples when the sensitivity needs them, then plan every target (``seqlen``
    None: the planner's default capped at the model's context)."""
    calibration = None
    if request.sensitivity == "fisher":
        seqlen = calibration_seqlen(loaded.model, seqlen)
        progress(Progress("calibrate", 0, 1, f"{nsamples} x {seqlen} tokens of {dataset}"))
        calibration = calibration_samples(loaded.tokenizer, dataset, nsamples, seqlen, seed=CALIBRATION_SEED, data_dir=data_dir).input_ids
        progress(Progress("calibrate", 1, 1))
    return plan_model(loaded, request, calibration, progress)
