"""Protobuf <-> planner domain: PlanRequest -> PlanParams, job record -> PlanJobStatus.
The only place in the planner that reads or builds messages."""

from __future__ import annotations

import math
from dataclasses import dataclass

from arctl.data import LOCAL_DATASETS
from arctl.plan import Plan
from arctl.rpc import convert
from arctl.rpc.artefacts import ArtefactPolicy
from arctl.rpc.errors import InvalidArgument
from arctl.rpc.jobs import JobRecord, JobState
from arctl.schemes import Scheme, get_scheme
from arctl.v1 import planner_pb2
from arctl_planner.budget import RUNTIMES, parse_keep
from arctl_planner.engine import (
    CALIBRATION_DATASET,
    CALIBRATION_NSAMPLES,
    CALIBRATION_SEED,
    REFINE_EVALUATIONS,
    SENSITIVITIES,
    PlanRequest,
    refuse_embeddings_for,
)

# Calibration of the fisher sensitivity when the request leaves it unset (as `arctl plan` does).


@dataclass(frozen=True)
class PlanParams:
    """A validated plan request.

    ``targets``: the request's own budget first (None when it is a size, resolved once the model
    is loaded), then the Pareto budgets. ``uniform``: one candidate scheme and no budget at all.
    """

    model: str
    target_avg_bits: float | None
    max_size_bytes: int | None
    pareto: tuple[float, ...]
    schemes: tuple[Scheme, ...] | None
    runtime: str
    keep: tuple[tuple[str, Scheme], ...]
    sensitivity: str
    dataset: str
    nsamples: int
    seqlen: int | None  # None: the planner's default, capped at the model's context
    seed: int
    refine_evaluations: int = REFINE_EVALUATIONS
    head: bool = False
    embeddings: bool = False

    @property
    def uniform(self) -> Scheme | None:
        if self.target_avg_bits is None and self.max_size_bytes is None and not self.pareto and self.schemes:
            return self.schemes[0] if len(self.schemes) == 1 else None
        return None

    def engine_request(self, own_target: float | None) -> PlanRequest:
        """The engine's request: the request's own budget (if any), then the Pareto budgets."""
        targets = ((own_target,) if own_target is not None else ()) + self.pareto
        return PlanRequest(
            targets=targets, schemes=self.schemes, runtime=self.runtime, keep=self.keep, sensitivity=self.sensitivity,
            head=self.head, embeddings=self.embeddings, refine_evaluations=self.refine_evaluations,
        )


def _bits(value: float, what: str) -> float:
    if not math.isfinite(value) or not 0 < value <= 32:
        raise InvalidArgument(f"{what} must be a number of bits in (0, 32], got {value}")
    return float(value)


def _dataset(request: planner_pb2.PlanRequest, artefacts: ArtefactPolicy) -> str:
    uri = request.calibration_data.uri if request.HasField("calibration_data") else ""
    if not uri:
        return CALIBRATION_DATASET
    return uri if uri in LOCAL_DATASETS else str(artefacts.existing(uri, "calibration_data", "file"))


def plan_params(request: planner_pb2.PlanRequest, artefacts: ArtefactPolicy) -> PlanParams:
    """Validate a PlanRequest (InvalidArgument / UnknownSchemeError / BudgetError with the reason)."""
    if not request.model:
        raise InvalidArgument("model is required")
    target = _bits(request.target_avg_bits, "target_avg_bits") if request.HasField("target_avg_bits") else None
    size = None
    if request.HasField("max_size_bytes"):
        if request.max_size_bytes == 0:
            raise InvalidArgument("max_size_bytes must be positive")
        size = int(request.max_size_bytes)
    if target is not None and size is not None:
        raise InvalidArgument("give target_avg_bits or max_size_bytes, not both")
    schemes = tuple(get_scheme(name) for name in request.candidate_schemes) or None
    pareto = tuple(_bits(value, "pareto_budgets") for value in request.pareto_budgets)
    if target is None and size is None and not pareto and not (schemes and len(schemes) == 1):
        raise InvalidArgument("give target_avg_bits, max_size_bytes or pareto_budgets (or one candidate scheme: a uniform plan)")
    runtime = request.target_runtime or "any"
    if runtime not in RUNTIMES:
        raise InvalidArgument(f"unknown target_runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
    refuse_embeddings_for(runtime, request.plan_embeddings)
    sensitivity = request.sensitivity or "fisher"
    if sensitivity not in SENSITIVITIES:
        raise InvalidArgument(f"unknown sensitivity {sensitivity!r}; valid: {', '.join(SENSITIVITIES)}")
    for name in ("nsamples", "seqlen"):
        if request.HasField(name) and getattr(request, name) == 0:
            raise InvalidArgument(f"{name} must be positive")
    return PlanParams(
        model=request.model,
        target_avg_bits=target,
        max_size_bytes=size,
        pareto=pareto,
        schemes=schemes,
        runtime=runtime,
        keep=tuple(parse_keep(list(request.keep), get_scheme)),
        sensitivity=sensitivity,
        dataset=_dataset(request, artefacts) if sensitivity == "fisher" else CALIBRATION_DATASET,
        nsamples=request.nsamples if request.HasField("nsamples") else CALIBRATION_NSAMPLES,
        seqlen=request.seqlen if request.HasField("seqlen") else None,
        seed=request.seed if request.HasField("seed") else CALIBRATION_SEED,
        refine_evaluations=request.refine_evaluations if request.HasField("refine_evaluations") else REFINE_EVALUATIONS,
        head=request.plan_lm_head,
        embeddings=request.plan_embeddings,
    )


def plan_job_status(record: JobRecord) -> planner_pb2.PlanJobStatus:
    message = planner_pb2.PlanJobStatus(status=convert.job_status(record))
    if record.state is JobState.SUCCEEDED:
        message.plan.CopyFrom(convert.plan_to_proto(Plan.from_json(record.result["plan_json"])))
        message.pareto_front.extend(convert.plan_to_proto(Plan.from_json(text)) for text in record.result.get("pareto", []))
    return message
