"""The planner's gRPC server: ``python -m arctl_planner`` (flags: ``--help``)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from arctl.models import EMBEDDED_MODELS
from arctl.rpc.errors import DOMAIN_ERRORS, ErrorMap
from arctl.rpc.server import Components, RunningServer, ServerSettings, main, start_server
from arctl.v1 import planner_pb2, planner_pb2_grpc
from arctl_planner.budget import BudgetError
from arctl_planner.servicer import PlannerServicer

SERVICE = "planner"
SERVICE_NAME = planner_pb2.DESCRIPTOR.services_by_name["PlannerService"].full_name
ERRORS: ErrorMap = DOMAIN_ERRORS.extended([(BudgetError, grpc.StatusCode.INVALID_ARGUMENT)])


def register(server: grpc.Server, components: Components) -> list[str]:
    planner_pb2_grpc.add_PlannerServiceServicer_to_server(PlannerServicer(components.manager, components.artefacts), server)
    return [SERVICE_NAME]


def start(settings: ServerSettings) -> RunningServer:
    return start_server(settings, register, ERRORS, tuple(EMBEDDED_MODELS))


def run(argv: Sequence[str] | None = None) -> int:
    return main(SERVICE, register, ERRORS, tuple(EMBEDDED_MODELS), argv)
