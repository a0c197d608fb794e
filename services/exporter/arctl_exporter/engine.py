"""The exporter engine: a QuantizedCheckpoint in, one model folder per requested format out."""

from __future__ import annotations

from pathlib import Path

from arctl.checkpoint import read_checkpoint
from arctl.plan import Plan
from arctl_exporter.errors import join_problems
from arctl_exporter.registry import Writer, get_writer


def writers_for(formats: list[str]) -> list[Writer]:
    """The writers of ``formats``, in order.

    Raises:
        ValueError: no format, or one given twice.
        UnknownFormatError: a format name no writer handles.
    """
    if not formats:
        raise ValueError("no export format given")
    duplicates = sorted({name for name in formats if formats.count(name) > 1})
    if duplicates:
        raise ValueError(f"export format(s) given twice: {', '.join(duplicates)}")
    return [get_writer(name) for name in formats]


def check_plan(formats: list[str], plan: Plan) -> None:
    """Refuse, before anything is quantized, a plan that ``export`` would refuse for ``formats``.

    Raises the ``ExportError`` the export's check would raise for what the plan shows (layer schemes
    and shapes, fused groups); what only quantized data shows (zero points, NVFP4 global scales,
    calibrated input scales) and, for gguf, the model's architecture and tokenizer are still checked
    at export.

    Raises:
        ValueError: no format, or one given twice.
        UnknownFormatError: a format name no writer handles.
        ExportError: the first requested format that cannot hold ``plan``.
    """
    for writer in writers_for(formats):
        join_problems(writer.plan_problems(plan))


def export(checkpoint_path: Path, formats: list[str], out_dir: Path) -> dict[str, Path]:
    """Write the checkpoint at ``checkpoint_path`` in every format of ``formats``.

    One format: the model folder is ``out_dir`` itself. Several: ``out_dir/<format>`` each. Every
    format is checked before anything is written, so an unwritable combination fails fast and
    leaves no output; each folder is then written atomically (verified, then renamed).

    Returns:
        ``{format: folder}`` in the order given.

    Raises:
        CheckpointError: the checkpoint is missing, incomplete or corrupted.
        UnknownFormatError: a format name no writer handles.
        ExportError: the checkpoint holds a layer a requested format cannot represent.
        ExportVerificationError: a written folder did not read back as the checkpoint (a bug).
    """
    writers = writers_for(formats)
    checkpoint = read_checkpoint(Path(checkpoint_path))
    for writer in writers:
        writer.check(checkpoint)
    out_dir = Path(out_dir)
    if len(writers) == 1:
        return {writers[0].name: writers[0].write(checkpoint, out_dir)}
    return {writer.name: writer.write(checkpoint, out_dir / writer.name) for writer in writers}
