"""ExporterService: thin — validate and convert the request, run the engine as a job, convert back.
Each format goes to ``<output>/<format>``; a cancelled job removes what it wrote."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import grpc

from arctl.checkpoint import read_checkpoint
from arctl.progress import Progress
from arctl.rpc import verbs
from arctl.rpc.artefacts import ArtefactPolicy
from arctl.rpc.jobs import JobCancelled, JobContext, JobManager
from arctl.v1 import common_pb2, exporter_pb2, exporter_pb2_grpc
from arctl_exporter.converters import (
    export_job_status,
    export_params,
    exported_entry,
    format_infos,
    format_uri,
)
from arctl_exporter.engine import export
from arctl_exporter.registry import get_writer

JOB_KIND = "export"


class ExporterServicer(exporter_pb2_grpc.ExporterServiceServicer):
    def __init__(self, manager: JobManager, artefacts: ArtefactPolicy) -> None:
        self.manager = manager
        self.artefacts = artefacts
        manager.register(JOB_KIND, self.run_job)

    # -- rpc verbs -----------------------------------------------------------------------------------

    def StartExport(self, request: exporter_pb2.ExportRequest, context: grpc.ServicerContext) -> common_pb2.JobRef:
        export_params(request, self.artefacts)
        return verbs.submit(self.manager, JOB_KIND, request, context)

    def Watch(self, request: common_pb2.WatchRequest, context: grpc.ServicerContext) -> Iterator[common_pb2.ProgressEvent]:
        yield from verbs.watch(self.manager, request, context)

    def Get(self, request: common_pb2.GetRequest, context: grpc.ServicerContext) -> exporter_pb2.ExportJobStatus:
        return export_job_status(verbs.job_record(self.manager, request.job_id))

    def Cancel(self, request: common_pb2.CancelRequest, context: grpc.ServicerContext) -> common_pb2.JobStatus:
        return verbs.cancel(self.manager, request)

    def ListFormats(
        self, request: exporter_pb2.ListFormatsRequest, context: grpc.ServicerContext
    ) -> exporter_pb2.ListFormatsResponse:
        return format_infos()

    # -- the job -------------------------------------------------------------------------------------

    def run_job(self, job: JobContext) -> Mapping[str, Any]:
        params = export_params(exporter_pb2.ExportRequest.FromString(job.request), self.artefacts)
        base = params.output or self.artefacts.staging_output(params.output_uri, "output", job.job_id)
        total = len(params.formats)
        job.progress(Progress("export", 0, total, "verifying the checkpoint"))
        checkpoint = read_checkpoint(params.checkpoint)
        for name in params.formats:  # every format checked before anything is written
            get_writer(name).check(checkpoint)
        written = []
        try:
            for index, name in enumerate(params.formats, start=1):
                job.check()
                export(params.checkpoint, [name], base / name)
                written.append(base / name)
                job.progress(Progress("export", index, total, name))
            job.check()
        except JobCancelled:
            for folder in written:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        exports = [
            exported_entry(self.artefacts.publish(base / name, format_uri(params, name), "output"), name)
            for name in params.formats
        ]
        return {"exports": exports, "artifacts": exports}
