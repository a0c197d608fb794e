"""The exporter's gRPC server: ``python -m arctl_exporter`` (flags: ``--help``)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from arctl.rpc.errors import DOMAIN_ERRORS, ErrorMap
from arctl.rpc.server import Components, RunningServer, ServerSettings, main, start_server
from arctl.v1 import exporter_pb2, exporter_pb2_grpc
from arctl_exporter.errors import ExportError
from arctl_exporter.registry import UnknownFormatError
from arctl_exporter.servicer import ExporterServicer

SERVICE = "exporter"
SERVICE_NAME = exporter_pb2.DESCRIPTOR.services_by_name["ExporterService"].full_name
ERRORS: ErrorMap = DOMAIN_ERRORS.extended(
    [(ExportError, grpc.StatusCode.INVALID_ARGUMENT), (UnknownFormatError, grpc.StatusCode.INVALID_ARGUMENT)]
)


def register(server: grpc.Server, components: Components) -> list[str]:
    exporter_pb2_grpc.add_ExporterServiceServicer_to_server(
        ExporterServicer(components.manager, components.artefacts), server
    )
    return [SERVICE_NAME]


def start(settings: ServerSettings) -> RunningServer:
    return start_server(settings, register, ERRORS)


def run(argv: Sequence[str] | None = None) -> int:
    return main(SERVICE, register, ERRORS, (), argv)
