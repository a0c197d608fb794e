"""One error formatter: bad input becomes a one-line message on stderr and exit code 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from arctl.atomic import OutputNotWritableError
from arctl.checkpoint import CheckpointError
from arctl.data import DataError
from arctl.models import ModelNotFoundError, UnsafeModelError
from arctl.plan import PlanError
from arctl.quant import SchemeShapeError
from arctl.schemes import UnknownSchemeError
from arctl.tasks.registry import UnknownTaskError
from arctl_cli.evaluate import EvalOptionError
from arctl_cli.report import ReportError
from arctl_exporter.errors import ExportError
from arctl_exporter.registry import UnknownFormatError
from arctl_planner.budget import BudgetError
from arctl_tuner.config import TuneConfigError
from arctl_tuner.resume import ResumeMismatchError
from arctl_tuner.rtn import PlanMismatchError

USAGE_ERROR = 2

USER_ERRORS: tuple[type[BaseException], ...] = (
    BudgetError,
    CheckpointError,
    DataError,
    EvalOptionError,
    ExportError,
    FileExistsError,
    ModelNotFoundError,
    OutputNotWritableError,
    PlanError,
    PlanMismatchError,
    ReportError,
    ResumeMismatchError,
    SchemeShapeError,
    TuneConfigError,
    UnknownFormatError,
    UnknownSchemeError,
    UnknownTaskError,
    UnsafeModelError,
)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr; return the Exit to raise."""
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(USAGE_ERROR)


def user_errors_exit_2(command: F) -> F:
    """Run ``command``; a known bad-input error prints one line and exits 2; Ctrl-C exits 130."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as exc:
            raise fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        except PermissionError as exc:
            raise fail(f"permission denied: {exc.filename or exc}") from None
        except KeyboardInterrupt:
            print("interrupted: nothing was written", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
