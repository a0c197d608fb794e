"""Domain errors of the rpc layer and the one table that maps every domain error to a status code.

The interceptor in ``arctl.rpc.interceptors`` is the only place that turns an exception into a gRPC
status; servicers and job handlers just raise. Services add their own domain errors with
``ErrorMap.extended`` (libs never import services).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from arctl.atomic import OutputNotWritableError
from arctl.checkpoint import CheckpointError
from arctl.data import DataError
from arctl.models import ModelNotFoundError, UnsafeModelError
from arctl.plan import PlanError
from arctl.quant import SchemeShapeError
from arctl.schemes import UnknownSchemeError


class InvalidArgument(ValueError):
    """A request field is missing, malformed or contradicts another one."""


class ArtefactNotFound(FileNotFoundError):
    """A referenced file or folder does not exist."""


class OutsideAllowedRoots(PermissionError):
    """A referenced path lies outside the folders this service may read or write."""


class JobNotFound(LookupError):
    """No job with that id in this service's store."""


class Busy(RuntimeError):
    """The service has no room for another job right now; retry later."""


class Draining(RuntimeError):
    """The service is shutting down and accepts no new jobs."""


class Unsupported(NotImplementedError):
    """A request asks for something this service does not implement (yet)."""


class DeadlineExpired(TimeoutError):
    """The caller's deadline passed before the work was accepted."""


class Unauthenticated(PermissionError):
    """Missing or wrong credentials."""


@dataclass(frozen=True)
class ErrorMap:
    """Exception types -> status codes; the first entry the exception is an instance of wins."""

    entries: tuple[tuple[type[BaseException], grpc.StatusCode], ...]

    def code_for(self, exc: BaseException) -> grpc.StatusCode | None:
        """The status code for ``exc``, or None for an unexpected error (a bug: INTERNAL)."""
        for kind, code in self.entries:
            if isinstance(exc, kind):
                return code
        return None

    def extended(self, extra: Iterable[tuple[type[BaseException], grpc.StatusCode]]) -> ErrorMap:
        """This map with ``extra`` entries checked first."""
        return ErrorMap(tuple(extra) + self.entries)


INVALID = grpc.StatusCode.INVALID_ARGUMENT

DOMAIN_ERRORS = ErrorMap(
    (
        (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
        (OutsideAllowedRoots, grpc.StatusCode.PERMISSION_DENIED),
        (JobNotFound, grpc.StatusCode.NOT_FOUND),
        (ArtefactNotFound, grpc.StatusCode.NOT_FOUND),
        (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
        (Busy, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Draining, grpc.StatusCode.UNAVAILABLE),
        (DeadlineExpired, grpc.StatusCode.DEADLINE_EXCEEDED),
        (Unsupported, grpc.StatusCode.UNIMPLEMENTED),
        (InvalidArgument, INVALID),
        (PlanError, INVALID),
        (CheckpointError, INVALID),
        (DataError, INVALID),
        (UnknownSchemeError, INVALID),
        (SchemeShapeError, INVALID),
        (UnsafeModelError, INVALID),
        (OutputNotWritableError, INVALID),
        (FileExistsError, INVALID),
        (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
        (FileNotFoundError, grpc.StatusCode.NOT_FOUND),
        (PermissionError, grpc.StatusCode.PERMISSION_DENIED),
    )
)
