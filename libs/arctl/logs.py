"""Structured logging: pretty on a terminal, JSON lines otherwise; secrets never printed."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

SECRET_KEYS = ("key", "token", "secret", "password", "authorization")


def redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace the value of every field whose name looks like a credential."""
    for name in list(event):
        if any(word in name.lower() for word in SECRET_KEYS):
            event[name] = "[redacted]"
    return event


class _CurrentStderr:
    """``sys.stderr`` as it is when a line is written: it may be replaced (and the old one closed)
    after logging is configured, e.g. by a test runner's output capture."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Set up structlog. ``fmt``: ``auto`` (pretty on a tty, JSON otherwise), ``pretty`` or ``json``.
    Logs go to stderr so that ``--json`` output on stdout stays machine-readable."""
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}; valid: debug, info, warning, error")
    pretty = sys.stderr.isatty() if fmt == "auto" else fmt == "pretty"
    if fmt not in ("auto", "pretty", "json"):
        raise ValueError(f"unknown log format {fmt!r}; valid: auto, pretty, json")
    renderer: Any = structlog.dev.ConsoleRenderer() if pretty else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
