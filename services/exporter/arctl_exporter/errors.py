"""Exporter errors.

``ExportError``: the plan or the checkpoint holds something the requested format cannot represent.
Raised by a writer's ``check`` before anything is written (and by ``engine.check_plan`` before anything
is quantized); the message names the layer, its scheme and a format that can hold it.

``ExportVerificationError``: a written folder did not read back as the checkpoint it came from; the
folder is discarded. This is a bug in a writer, never the user's input.
"""

from __future__ import annotations


class ExportError(ValueError):
    """A layer (or the model) cannot be written in the requested format."""


class ExportVerificationError(RuntimeError):
    """The written files do not reproduce the checkpoint; nothing was left behind."""


def join_problems(problems: list[str]) -> None:
    """Raise one ExportError listing the first five problems (and how many more); nothing if none."""
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ExportError("; ".join(problems[:5]) + more)
