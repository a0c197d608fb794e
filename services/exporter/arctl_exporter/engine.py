"""The exporter engine: a QuantizedCheckpoint in, one model folder per requested format out."""

from __future__ import annotations

from pathlib import Path

from arctl.checkpoint import read_checkpoint
from arctl_exporter.registry import get_writer


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
    if not formats:
        raise ValueError("no export format given")
    duplicates = sorted({name for name in formats if formats.count(name) > 1})
    if duplicates:
        raise ValueError(f"export format(s) given twice: {', '.join(duplicates)}")
    checkpoint = read_checkpoint(Path(checkpoint_path))
    writers = [get_writer(name) for name in formats]
    for writer in writers:
        writer.check(checkpoint)
    out_dir = Path(out_dir)
    if len(writers) == 1:
        return {writers[0].name: writers[0].write(checkpoint, out_dir)}
    return {writer.name: writer.write(checkpoint, out_dir / writer.name) for writer in writers}
