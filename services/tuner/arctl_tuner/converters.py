"""Protobuf <-> tuner domain: TuneRequest -> TuneParams, job record -> TuneJobStatus.
The only place in the tuner that reads or builds messages."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from arctl.plan import Plan
from arctl.rpc import convert
from arctl.rpc.artefacts import ArtefactPolicy
from arctl.rpc.errors import InvalidArgument, Unsupported
from arctl.rpc.jobs import JobRecord, JobState
from arctl.v1 import common_pb2, tuner_pb2
from arctl_tuner.tuning import RECIPES, TuneConfig, select_engine


@dataclass(frozen=True)
class TuneParams:
    """A validated tune request: every path checked against the service's artefact policy."""

    model: str
    plan: Plan
    output_uri: str
    output: Path
    config: TuneConfig
    resume: bool


def _optional(request: tuner_pb2.TuneRequest, name: str) -> int | float | None:
    return getattr(request, name) if request.HasField(name) else None


def tune_config(request: tuner_pb2.TuneRequest, artefacts: ArtefactPolicy) -> TuneConfig:
    recipe = request.recipe or "signround"
    if recipe not in RECIPES:
        raise InvalidArgument(f"unknown recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    if recipe == "rtn" and request.HasField("iters") and request.iters != 0:
        raise InvalidArgument("recipe 'rtn' takes no steps; leave iters unset or 0")
    lr = _optional(request, "lr")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise InvalidArgument(f"lr must be a positive number, got {lr}")
    for name in ("batch_size", "nsamples", "seqlen"):
        if request.HasField(name) and getattr(request, name) == 0:
            raise InvalidArgument(f"{name} must be positive")
    if request.quantize_lm_head:
        raise Unsupported("quantize_lm_head is not supported yet: plans cover the decoder blocks")
    data = (
        artefacts.existing(request.calibration_data.uri, "calibration_data")
        if request.HasField("calibration_data")
        else None
    )
    return TuneConfig(
        recipe=recipe,
        iters=_optional(request, "iters"),  # type: ignore[arg-type]
        lr=lr,
        batch_size=_optional(request, "batch_size"),  # type: ignore[arg-type]
        nsamples=_optional(request, "nsamples"),  # type: ignore[arg-type]
        seqlen=_optional(request, "seqlen"),  # type: ignore[arg-type]
        seed=_optional(request, "seed"),  # type: ignore[arg-type]
        calibration_data=data,
        quantize_lm_head=request.quantize_lm_head,
    )


def tune_params(request: tuner_pb2.TuneRequest, artefacts: ArtefactPolicy) -> TuneParams:
    """Validate a TuneRequest (InvalidArgument, NOT_FOUND, PERMISSION_DENIED errors with the reason)."""
    if not request.model:
        raise InvalidArgument("model is required")
    model = artefacts.model_reference(request.model)
    source = request.WhichOneof("plan_source")
    if source == "plan":
        plan = convert.plan_from_proto(request.plan)
    elif source == "plan_ref":
        plan = Plan.load(artefacts.existing(request.plan_ref.uri, "plan_ref", "file"))
    else:
        raise InvalidArgument("a plan is required: set plan or plan_ref")
    if not request.HasField("output") or not request.output.uri:
        raise InvalidArgument("output is required: the folder to write the checkpoint to")
    output = artefacts.output_path(request.output.uri, "output")
    config = tune_config(request, artefacts)
    select_engine(config)
    return TuneParams(model, plan, request.output.uri, output, config, request.resume)


def tune_job_status(record: JobRecord) -> tuner_pb2.TuneJobStatus:
    message = tuner_pb2.TuneJobStatus(status=convert.job_status(record))
    if record.state is JobState.SUCCEEDED:
        message.checkpoint.CopyFrom(convert.artifact_ref(record.result["checkpoint"]))
    return message


def checkpoint_entry(uri: str, manifest_sha256: str) -> dict[str, str]:
    return convert.artifact_entry(uri, common_pb2.ARTIFACT_KIND_CHECKPOINT, manifest_sha256)
