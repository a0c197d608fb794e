"""PlannerService: thin — validate and convert the request, run the engine as a job, convert back."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import grpc

from arctl.data import calibration_samples
from arctl.models import load_model
from arctl.progress import Progress
from arctl.rpc import verbs
from arctl.rpc.artefacts import ArtefactPolicy
from arctl.rpc.jobs import JobContext, JobManager
from arctl.v1 import common_pb2, planner_pb2, planner_pb2_grpc
from arctl_planner.converters import plan_job_status, plan_params
from arctl_planner.engine import calibration_seqlen, plan_model, plan_uniform, target_bits_for_size

JOB_KIND = "plan"


class PlannerServicer(planner_pb2_grpc.PlannerServiceServicer):
    def __init__(self, manager: JobManager, artefacts: ArtefactPolicy) -> None:
        self.manager = manager
        self.artefacts = artefacts
        manager.register(JOB_KIND, self.run_job)

    # -- rpc verbs -----------------------------------------------------------------------------------

    def StartPlan(self, request: planner_pb2.PlanRequest, context: grpc.ServicerContext) -> common_pb2.JobRef:
        params = plan_params(request, self.artefacts)
        self.artefacts.model_reference(params.model)
        return verbs.submit(self.manager, JOB_KIND, request, context)

    def Watch(self, request: common_pb2.WatchRequest, context: grpc.ServicerContext) -> Iterator[common_pb2.ProgressEvent]:
        yield from verbs.watch(self.manager, request, context)

    def Get(self, request: common_pb2.GetRequest, context: grpc.ServicerContext) -> planner_pb2.PlanJobStatus:
        return plan_job_status(verbs.job_record(self.manager, request.job_id))

    def Cancel(self, request: common_pb2.CancelRequest, context: grpc.ServicerContext) -> common_pb2.JobStatus:
        return verbs.cancel(self.manager, request)

    # -- the job -------------------------------------------------------------------------------------

    def run_job(self, job: JobContext) -> Mapping[str, Any]:
        params = plan_params(planner_pb2.PlanRequest.FromString(job.request), self.artefacts)
        model = self.artefacts.model_reference(params.model)
        job.progress(Progress("load", 0, 0, f"planner: loading {params.model}"))
        loaded = load_model(model)
        job.check()
        if params.uniform is not None:
            plans = [plan_uniform(loaded, params.uniform, params.head, params.embeddings)]
        else:
            target = params.target_avg_bits
            if params.max_size_bytes is not None:
                target = target_bits_for_size(loaded.model, params.max_size_bytes, params.head, params.embeddings)
            request = params.engine_request(target)
            calibration = None
            if request.sensitivity == "fisher":
                seqlen = calibration_seqlen(loaded.model, params.seqlen)
                job.progress(Progress("calibrate", 0, 1, f"{params.nsamples} x {seqlen} tokens of {params.dataset}"))
                calibration = calibration_samples(
                    loaded.tokenizer, params.dataset, params.nsamples, seqlen, seed=params.seed
                ).input_ids
                job.progress(Progress("calibrate", 1, 1))
            plans = plan_model(loaded, request, calibration, job.progress)
            if target is None:  # a Pareto front only: the first budget is also "the" plan
                plans = [plans[0], *plans]
        return {"plan_json": plans[0].to_json(), "pareto": [plan.to_json() for plan in plans[1:]], "artifacts": []}
