"""TunerService: thin — validate and convert the request, run the tuner engine as a job (the same
call as the embedded pipeline), convert back. Partial output never appears under the requested
name (the engine writes through ``atomic_directory``); finished SignRound blocks stay in the work
folder beside it (``<output>.partial``), so a restarted server, or a request with ``resume``,
continues from the last finished block. A cancelled job keeps them too, for a later ``resume``.
Calibration datasets named in requests are read from the service's ``ARCTL_DATA_DIR``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import grpc

from arctl.checkpoint import MANIFEST, read_checkpoint, sha256_file
from arctl.models import load_model
from arctl.progress import Progress
from arctl.rpc import verbs
from arctl.rpc.artefacts import ArtefactPolicy
from arctl.rpc.jobs import JobContext, JobManager
from arctl.v1 import common_pb2, tuner_pb2, tuner_pb2_grpc
from arctl_tuner.converters import checkpoint_entry, tune_job_status, tune_params
from arctl_tuner.tuning import run_tuning

JOB_KIND = "tune"


class TunerServicer(tuner_pb2_grpc.TunerServiceServicer):
    def __init__(self, manager: JobManager, artefacts: ArtefactPolicy) -> None:
        self.manager = manager
        self.artefacts = artefacts
        manager.register(JOB_KIND, self.run_job)

    # -- rpc verbs -----------------------------------------------------------------------------------

    def StartTune(self, request: tuner_pb2.TuneRequest, context: grpc.ServicerContext) -> common_pb2.JobRef:
        tune_params(request, self.artefacts)
        return verbs.submit(self.manager, JOB_KIND, request, context)

    def Watch(self, request: common_pb2.WatchRequest, context: grpc.ServicerContext) -> Iterator[common_pb2.ProgressEvent]:
        yield from verbs.watch(self.manager, request, context)

    def Get(self, request: common_pb2.GetRequest, context: grpc.ServicerContext) -> tuner_pb2.TuneJobStatus:
        return tune_job_status(verbs.job_record(self.manager, request.job_id))

    def Cancel(self, request: common_pb2.CancelRequest, context: grpc.ServicerContext) -> common_pb2.JobStatus:
        return verbs.cancel(self.manager, request)

    # -- the job -------------------------------------------------------------------------------------

    def run_job(self, job: JobContext) -> Mapping[str, Any]:
        params = tune_params(tuner_pb2.TuneRequest.FromString(job.request), self.artefacts)
        output = params.output or self.artefacts.staging_output(params.output_uri, "output", job.job_id)
        job.progress(Progress("load", 0, 0, f"tuner: loading {params.model}"))
        loaded = load_model(params.model)
        job.check()
        run_tuning(loaded, params.plan, output, params.settings, job.progress, resume=params.resume or job.resume)
        job.progress(Progress("verify", 0, 1, "verifying the checkpoint"))
        checkpoint = read_checkpoint(output)
        uri = self.artefacts.publish(output, params.output_uri, "output")
        job.progress(Progress("verify", 1, 1, "checkpoint complete"))
        entry = checkpoint_entry(uri, sha256_file(checkpoint.path / MANIFEST))
        return {"checkpoint": entry, "artifacts": [entry]}
