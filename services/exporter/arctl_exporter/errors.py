"""Exporter errors.

``ExportError``: the checkpoint holds something the requested format cannot represent. Raised by a
writer's ``check`` before anything is written; the message names the layer, its scheme and a
format that can hold it.

``ExportVerificationError``: a written folder did not read back as the checkpoint it came from; the
folder is discarded. This is a bug in a writer, never the user's input.
"""

from __future__ import annotations


class ExportError(ValueError):
    """A layer (or the model) cannot be written in the requested format."""


class ExportVerificationError(RuntimeError):
    """The written files do not reproduce the checkpoint; nothing was left behind."""
