"""Protobuf <-> tuner domain: TuneRequest -> TuneParams, job record -> TuneJobStatus.
The only place in the tuner that reads or builds messages."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from arctl.data import LOCAL_DATASETS
from arctl.plan import Plan
from arctl.rpc import convert
from arctl.rpc.artefacts import ArtefactPolicy
from arctl.rpc.errors import InvalidArgument
from arctl.rpc.jobs import JobRecord, JobState
from arctl.v1 import common_pb2, tuner_pb2
from arctl_tuner.config import RECIPES, recipe
from arctl_tuner.tuning import DEFAULT_DATASET, TuneJobSettings

# The proto's names for the recipes, besides the engine's own (rtn, light, default, best).
RECIPE_ALIASES = {"": "default", "signround": "default"}


@dataclass(frozen=True)
class TuneParams:
    """A validated tune request: every path checked against the service's artefact policy."""

    model: str
    plan: Plan
    output_uri: str
    output: Path | None  # None: a URL output, written to a staging folder and uploaded
    settings: TuneJobSettings
    resume: bool


def _optional(request: tuner_pb2.TuneRequest, name: str) -> int | float | None:
    return getattr(request, name) if request.HasField(name) else None


def _dataset(request: tuner_pb2.TuneRequest, artefacts: ArtefactPolicy) -> str:
    """A local dataset name (``wikitext2``, ``c4``) as is, or a file inside the allowed roots."""
    if not request.HasField("calibration_data") or not request.calibration_data.uri:
        return DEFAULT_DATASET
    uri = request.calibration_data.uri
    if uri in LOCAL_DATASETS:
        return uri
    return str(artefacts.existing(uri, "calibration_data", "file"))


def tune_settings(request: tuner_pb2.TuneRequest, artefacts: ArtefactPolicy, data_dir: Path | None) -> TuneJobSettings:
    name = RECIPE_ALIASES.get(request.recipe, request.recipe)
    if name not in RECIPES:
        raise InvalidArgument(f"unknown recipe {request.recipe!r}; valid: {', '.join(RECIPES)}")
    lr = _optional(request, "lr")
    if lr is not None and not math.isfinite(lr):
        raise InvalidArgument(f"lr must be a finite number, got {lr}")
    config = recipe(
        name,
        iters=_optional(request, "iters"),
        lr=lr,
        batch_size=_optional(request, "batch_size"),
        nsamples=_optional(request, "nsamples"),
        seqlen=_optional(request, "seqlen"),
        seed=_optional(request, "seed"),
    )
    return TuneJobSettings(config, _dataset(request, artefacts) if config.iters > 0 else DEFAULT_DATASET, data_dir)


def tune_params(request: tuner_pb2.TuneRequest, artefacts: ArtefactPolicy, data_dir: Path | None = None) -> TuneParams:
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
    output = artefacts.check_output(request.output.uri, "output")
    settings = tune_settings(request, artefacts, data_dir)
    return TuneParams(model, plan, request.output.uri, output, settings, request.resume)


def tune_job_status(record: JobRecord) -> tuner_pb2.TuneJobStatus:
    message = tuner_pb2.TuneJobStatus(status=convert.job_status(record))
    if record.state is JobState.SUCCEEDED:
        message.checkpoint.CopyFrom(convert.artifact_ref(record.result["checkpoint"]))
    return message


def checkpoint_entry(uri: str, manifest_sha256: str) -> dict[str, str]:
    return convert.artifact_entry(uri, common_pb2.ARTIFACT_KIND_CHECKPOINT, manifest_sha256)
