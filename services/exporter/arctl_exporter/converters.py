"""Protobuf <-> exporter domain: ExportRequest -> ExportParams, job record -> ExportJobStatus,
writers -> FormatInfo. The only place in the exporter that reads or builds messages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arctl.checkpoint import CHECKPOINT_FORMAT
from arctl.rpc import convert
from arctl.rpc.artefacts import ArtefactPolicy
from arctl.rpc.errors import InvalidArgument
from arctl.rpc.jobs import JobRecord, JobState
from arctl.v1 import common_pb2, exporter_pb2
from arctl_exporter.registry import WRITERS, get_writer

# What the proto's FormatInfo tells about each format, for writers that do not say it themselves
# (a writer may define ``description``, ``dtypes``, ``int_bits`` and ``runtimes`` attributes).
FORMAT_INFO: dict[str, dict[str, Any]] = {
    "auto_round": {
        "description": "quant_method auto-round, auto_round:auto_gptq packing (symmetric INT)",
        "dtypes": ["int"],
        "int_bits": [2, 3, 4, 8],
        "runtimes": ["sglang", "transformers", "vllm"],
    },
}


@dataclass(frozen=True)
class ExportParams:
    checkpoint: Path
    formats: tuple[str, ...]
    output_uri: str
    output: Path | None  # None: a URL output, written to a staging folder and uploaded


def export_params(request: exporter_pb2.ExportRequest, artefacts: ArtefactPolicy) -> ExportParams:
    """Validate an ExportRequest: a complete checkpoint inside the roots, known formats, an output."""
    if not request.HasField("checkpoint") or not request.checkpoint.uri:
        raise InvalidArgument("checkpoint is required")
    checkpoint = artefacts.complete_folder(
        request.checkpoint.uri, "checkpoint", CHECKPOINT_FORMAT, request.checkpoint.sha256
    )
    formats = tuple(name.strip() for name in request.formats)
    if not formats:
        raise InvalidArgument(f"at least one format is required; valid: {', '.join(sorted(WRITERS))}")
    duplicates = sorted({name for name in formats if formats.count(name) > 1})
    if duplicates:
        raise InvalidArgument(f"format(s) given twice: {', '.join(duplicates)}")
    for name in formats:
        get_writer(name)
    if not request.HasField("output") or not request.output.uri:
        raise InvalidArgument("output is required: the folder to write the formats under")
    output = artefacts.check_output(request.output.uri, "output")
    return ExportParams(checkpoint, formats, request.output.uri, output)


def format_uri(params: ExportParams, name: str) -> str:
    """Each format goes to ``<output>/<format>``."""
    base = params.output_uri.removeprefix("file://").rstrip("/")
    return f"{base}/{name}"


def exported_entry(uri: str, name: str) -> dict[str, str]:
    return {"format": name, **convert.artifact_entry(uri, common_pb2.ARTIFACT_KIND_EXPORTED_MODEL)}


def export_job_status(record: JobRecord) -> exporter_pb2.ExportJobStatus:
    message = exporter_pb2.ExportJobStatus(status=convert.job_status(record))
    if record.state is JobState.SUCCEEDED:
        for entry in record.result.get("exports", []):
            message.exports.add(format=entry["format"], artifact=convert.artifact_ref(entry))
    return message


def format_infos() -> exporter_pb2.ListFormatsResponse:
    infos = []
    for name in sorted(WRITERS):
        writer = WRITERS[name]
        known = FORMAT_INFO.get(name, {})
        infos.append(
            exporter_pb2.FormatInfo(
                name=name,
                description=getattr(writer, "description", known.get("description", "")),
                dtypes=getattr(writer, "dtypes", known.get("dtypes", [])),
                int_bits=getattr(writer, "int_bits", known.get("int_bits", [])),
                runtimes=getattr(writer, "runtimes", known.get("runtimes", [])),
            )
        )
    return exporter_pb2.ListFormatsResponse(formats=infos)
