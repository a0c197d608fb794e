"""Writers by format name: one writer per on-disk format, looked up by the name users type."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from arctl.checkpoint import QuantizedCheckpoint
from arctl.plan import Plan
from arctl_exporter.auto_awq import AutoAwqWriter
from arctl_exporter.auto_gptq import AutoGptqWriter
from arctl_exporter.auto_round import AutoRoundWriter
from arctl_exporter.compressed_tensors import CompressedTensorsWriter
from arctl_exporter.gguf_format import GgufWriter


class UnknownFormatError(ValueError):
    """A format name that no writer handles; the message lists the valid names."""


@runtime_checkable
class Writer(Protocol):
    """Writes a QuantizedCheckpoint in one format.

    ``plan_problems`` lists what the format cannot hold that the plan alone shows (layer schemes and
    shapes, fused groups), so a run can be refused before it quantizes; ``check`` raises ``ExportError``
    for those first (the same message), then for what only the checkpoint shows, and writes nothing;
    ``write`` writes ``out_dir`` completely (verified) or not at all and returns it.
    """

    name: str

    def plan_problems(self, plan: Plan) -> list[str]: ...

    def check(self, checkpoint: QuantizedCheckpoint) -> None: ...

    def write(self, checkpoint: QuantizedCheckpoint, out_dir: Path) -> Path: ...


WRITERS: dict[str, Writer] = {
    writer.name: writer
    for writer in (
        AutoRoundWriter(),
        AutoGptqWriter(),
        AutoAwqWriter(),
        CompressedTensorsWriter(),
        GgufWriter(),
    )
}


def get_writer(name: str) -> Writer:
    """The writer for format ``name``.

    Raises:
        UnknownFormatError: listing every valid format name.
    """
    writer = WRITERS.get(name.strip())
    if writer is None:
        raise UnknownFormatError(f"unknown export format {name!r}; valid: {', '.join(WRITERS)}")
    return writer
