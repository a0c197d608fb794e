"""Write a folder or file completely or not at all: write under a temporary name, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class OutputNotWritableError(OSError):
    """The output location cannot be created or written."""


def _check_parent(final: Path) -> Path:
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputNotWritableError(f"cannot create {parent}: {exc.strerror or exc}") from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputNotWritableError(f"output folder {parent} is not writable")
    return parent


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_readable(folder: Path) -> None:
    """Give the finished tree the permissions a plain mkdir/open would have (mkdtemp uses 0700)."""
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_directory(final: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; rename it to ``final`` when the block ends
    without error, delete it otherwise (exceptions, KeyboardInterrupt). An existing ``final`` is
    replaced only after the new one is complete."""
    final = Path(final)
    parent = _check_parent(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
    try:
        yield tmp
        _make_readable(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(final: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``final`` through a temporary file in the same folder."""
    atomic_write_bytes(final, text.encode("utf-8"))


def atomic_write_bytes(final: Path, data: bytes) -> None:
    """Write ``data`` to ``final`` through a temporary file in the same folder."""
    final = Path(final)
    parent = _check_parent(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
