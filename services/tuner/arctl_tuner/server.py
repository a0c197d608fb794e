"""The tuner's gRPC server: ``python -m arctl_tuner`` (flags: ``--help``)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from arctl.models import EMBEDDED_MODELS
from arctl.rpc.errors import DOMAIN_ERRORS, ErrorMap
from arctl.rpc.server import Components, RunningServer, ServerSettings, main, start_server
from arctl.v1 import tuner_pb2, tuner_pb2_grpc
from arctl_tuner.config import TuneConfigError
from arctl_tuner.resume import ResumeMismatchError
from arctl_tuner.rtn import PlanMismatchError
from arctl_tuner.servicer import TunerServicer

SERVICE = "tuner"
SERVICE_NAME = tuner_pb2.DESCRIPTOR.services_by_name["TunerService"].full_name
ERRORS: ErrorMap = DOMAIN_ERRORS.extended(
    [
        (PlanMismatchError, grpc.StatusCode.INVALID_ARGUMENT),
        (TuneConfigError, grpc.StatusCode.INVALID_ARGUMENT),
        (ResumeMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    ]
)


def register(server: grpc.Server, components: Components) -> list[str]:
    tuner_pb2_grpc.add_TunerServiceServicer_to_server(TunerServicer(components.manager, components.artefacts), server)
    return [SERVICE_NAME]


def start(settings: ServerSettings) -> RunningServer:
    return start_server(settings, register, ERRORS, tuple(EMBEDDED_MODELS))


def run(argv: Sequence[str] | None = None) -> int:
    return main(SERVICE, register, ERRORS, tuple(EMBEDDED_MODELS), argv)
