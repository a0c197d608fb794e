"""TunerService: thin — validate and convert the request, run the selected engine as a job,
convert back. Partial output never appears under the requested name (the engines write through
``atomic_directory``); finished blocks of the block-wise engine stay in the resume folder so that a
restarted server or a ``resume`` request continues from the last one."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
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
from arctl_tuner.tuning import select_engine

JOB_KIND = "tune"


def resume_folder(output: Path) -> Path:
    """Where finished blocks of ``output`` are kept until the checkpoint is complete."""
    return output.parent / f".{output.name}.resume"


class TunerServicer(tuner_pb2_grpc.TunerServiceServicer):
    def __init__(self, manager: JobManager, artefacts: ArtefactPolicy) -> None:
        self.manager = manager
        self.artefacts = artefacts
        manager.register(JOB_KIND, self.run_job)

    # -- rpc verbs -----------------------------------------------------------------------------------

    def StartTune(self, request: tuner_pb2.TuneRequest, context: grpc.ServicerContext) -> common_pb2.JobRef:
        tune_params(request, self.artefacts)
        record = self.manager.submit(JOB_KIND, request.SerializeToString())
        return common_pb2.JobRef(job_id=record.job_id)

    def Watch(self, request: common_pb2.WatchRequest, context: grpc.ServicerContext) -> Iterator[common_pb2.ProgressEvent]:
        yield from verbs.watch(self.manager, request, context)

    def Get(self, request: common_pb2.GetRequest, context: grpc.ServicerContext) -> tuner_pb2.TuneJobStatus:
        return tune_job_status(verbs.job_record(self.manager, request.job_id))

    def Cancel(self, request: common_pb2.CancelRequest, context: grpc.ServicerContext) -> common_pb2.JobStatus:
        return verbs.cancel(self.manager, request)

    # -- the job -------------------------------------------------------------------------------------

    def run_job(self, job: JobContext) -> Mapping[str, Any]:
        params = tune_params(tuner_pb2.TuneRequest.FromString(job.request), self.artefacts)
        engine = select_engine(params.config)
        resume_dir = resume_folder(params.output)
        if not (params.resume or job.resume):
            shutil.rmtree(resume_dir, ignore_errors=True)
        resume_dir.mkdir(parents=True, exist_ok=True)
        job.progress(Progress("load", 0, 0, f"tuner: loading {params.model}"))
        loaded = load_model(params.model)
        job.check()
        engine(loaded, params.plan, params.output, params.config, job.progress, resume_dir)
        job.progress(Progress("verify", 0, 1, "verifying the checkpoint"))
        checkpoint = read_checkpoint(params.output)
        shutil.rmtree(resume_dir, ignore_errors=True)
        job.progress(Progress("verify", 1, 1, "checkpoint complete"))
        return {
            "checkpoint": checkpoint_entry(params.output_uri, sha256_file(checkpoint.path / MANIFEST)),
            "artifacts": [checkpoint_entry(params.output_uri, sha256_file(checkpoint.path / MANIFEST))],
        }
