"""Artefact references: what a request may name, checked before any work starts.

Artefacts move between services by reference, never as message bytes. A reference is an absolute
local path (or ``file://`` URL) on a volume the services share; it must resolve (symlinks followed)
inside one of the service's allowed roots, so ``..`` and links cannot reach anything else. Inputs
must exist; a folder that carries a manifest (checkpoint) must be complete: every file it lists
present with its size, and its sha256 when the request gives one. Other URL schemes (``s3://``,
``gs://``, ``memory://`` ...) are accepted only when the service was given ``url_prefixes`` and the
optional ``fsspec`` package is installed: inputs are fetched into the service's cache folder
and outputs written locally first, then uploaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from arctl.rpc.errors import ArtefactNotFound, InvalidArgument, OutsideAllowedRoots, Unsupported

MANIFEST = "manifest.json"


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_url(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return len(scheme) > 1 and scheme != "file"


@dataclass(frozen=True)
class ArtefactPolicy:
    """Where this service may read and write.

    ``roots``: folders (resolved) that every local reference must lie inside. ``url_prefixes``:
    remote URL prefixes allowed through fsspec (empty: none). ``cache_dir``: where remote inputs are
    fetched to. ``embedded_models``: model names that are not paths (e.g. ``smollm2``).
    """

    roots: tuple[Path, ...]
    url_prefixes: tuple[str, ...] = ()
    cache_dir: Path | None = None
    embedded_models: tuple[str, ...] = ()

    @classmethod
    def create(
        cls,
        roots: Sequence[Path | str],
        url_prefixes: Sequence[str] = (),
        cache_dir: Path | None = None,
        embedded_models: Sequence[str] = (),
    ) -> ArtefactPolicy:
        if not roots:
            raise InvalidArgument("at least one allowed root is required")
        resolved = tuple(Path(root).expanduser().resolve() for root in roots)
        if url_prefixes and importlib.util.find_spec("fsspec") is None:
            raise Unsupported("URL artefacts need the optional package fsspec (pip install fsspec)")
        return cls(resolved, tuple(url_prefixes), cache_dir, tuple(embedded_models))

    # -- local paths ---------------------------------------------------------------------------------

    def local_path(self, uri: str, what: str) -> Path:
        """The resolved local path of ``uri``; refuses relative paths, other schemes and anything
        outside the allowed roots."""
        if not uri:
            raise InvalidArgument(f"{what}: no path given")
        if "\x00" in uri:
            raise InvalidArgument(f"{what}: the path contains a NUL byte")
        if uri.startswith("file://"):
            parsed = urlparse(uri)
            if parsed.netloc not in ("", "localhost"):
                raise InvalidArgument(f"{what}: file URL with a host ({parsed.netloc}) is not a local path")
            uri = unquote(parsed.path)
        elif is_url(uri):
            raise InvalidArgument(f"{what}: {uri} is a URL; this call needs a local path")
        path = Path(uri)
        if not path.is_absolute():
            raise InvalidArgument(f"{what}: {uri} is a relative path; give an absolute path on the shared volume")
        resolved = path.resolve()
        for root in self.roots:
            if resolved == root or resolved.is_relative_to(root):
                return resolved
        roots = ", ".join(str(root) for root in self.roots)
        raise OutsideAllowedRoots(f"{what}: {uri} is outside the allowed roots ({roots})")

    def existing(self, uri: str, what: str, kind: str = "any") -> Path:
        """An input path that exists; ``kind``: ``file``, ``dir`` or ``any``."""
        path = self.input_path(uri, what)
        if not path.exists():
            raise ArtefactNotFound(f"{what}: {uri} does not exist")
        if kind == "file" and not path.is_file():
            raise InvalidArgument(f"{what}: {uri} is not a file")
        if kind == "dir" and not path.is_dir():
            raise InvalidArgument(f"{what}: {uri} is not a folder")
        return path

    def complete_folder(self, uri: str, what: str, expected_format: str, expected_sha256: str = "") -> Path:
        """A folder with a manifest of ``expected_format`` whose listed files are all present with
        their sizes; with ``expected_sha256``, the manifest file's hash must match it. (The full
        per-file sha256 check is the reader's, e.g. ``read_checkpoint``.)"""
        folder = self.existing(uri, what, "dir")
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            raise InvalidArgument(f"{what}: {uri} has no {MANIFEST}: incomplete or not a {expected_format}")
        try:
            manifest: dict[str, Any] = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"{what}: {manifest_path} is not valid JSON: {exc}") from exc
        if manifest.get("format") != expected_format:
            raise InvalidArgument(f"{what}: {uri} is a {manifest.get('format')!r}, not a {expected_format}")
        for name, entry in dict(manifest.get("files") or {}).items():
            member = (folder / name).resolve()
            if not member.is_relative_to(folder):
                raise InvalidArgument(f"{what}: manifest entry {name!r} points outside the folder")
            if not member.is_file():
                raise InvalidArgument(f"{what}: {uri} is incomplete: {name} is missing")
            if member.stat().st_size != entry.get("bytes"):
                raise InvalidArgument(f"{what}: {uri} is incomplete or changed: {name} has the wrong size")
        if expected_sha256 and sha256_of(manifest_path) != expected_sha256.lower():
            raise InvalidArgument(f"{what}: {uri} does not match the sha256 given in the request")
        return folder

    def output_path(self, uri: str, what: str) -> Path:
        """Where a job may write: inside the roots, not an existing file, parent creatable."""
        path = self.local_path(uri, what)
        if path in self.roots:
            raise InvalidArgument(f"{what}: {uri} is an allowed root itself; name a folder inside it")
        if path.is_file():
            raise InvalidArgument(f"{what}: {uri} is an existing file, not a folder")
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InvalidArgument(f"{what}: {parent} is not writable by the service")
        return path

    def model_reference(self, reference: str) -> str:
        """A model the service may load: an embedded name, or an existing path inside the roots."""
        if reference in self.embedded_models:
            return reference
        if not reference:
            raise InvalidArgument("model: no model given")
        path = self.existing(reference, "model")
        # Loaded by the name given (checked above), so the plan's model id is the caller's reference.
        return str(path) if reference.startswith("file://") or is_url(reference) else reference

    # -- remote URLs (fsspec) ------------------------------------------------------------------------

    def _allowed_url(self, uri: str, what: str) -> None:
        if not any(uri.startswith(prefix) for prefix in self.url_prefixes):
            raise OutsideAllowedRoots(f"{what}: {uri} is not under an allowed URL prefix")

    def input_path(self, uri: str, what: str) -> Path:
        """A local path for an input: the path itself, or a fetched copy of an allowed URL."""
        if not is_url(uri):
            return self.local_path(uri, what)
        self._allowed_url(uri, what)
        if self.cache_dir is None:
            raise Unsupported(f"{what}: this service has no cache folder for URL inputs")
        import fsspec  # optional dependency, checked in create()

        fs, remote = fsspec.core.url_to_fs(uri)
        if not fs.exists(remote):
            raise ArtefactNotFound(f"{what}: {uri} does not exist")
        target = self.cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:24] / Path(remote).name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get(remote, str(target), recursive=fs.isdir(remote))
        return target

    def publish(self, local: Path, uri: str, what: str) -> str:
        """Upload ``local`` to ``uri`` when it is an allowed URL; returns the reference to report
        (a local path: ``uri`` as the request named it)."""
        if not is_url(uri):
            return uri
        self._allowed_url(uri, what)
        import fsspec  # optional dependency, checked in create()

        fs, remote = fsspec.core.url_to_fs(uri)
        fs.put(str(local), remote, recursive=local.is_dir())
        return uri

    def check_output(self, uri: str, what: str) -> Path | None:
        """Validate an output reference: the local path (see ``output_path``), or None for an
        allowed URL (the job writes to ``staging_output`` and then ``publish``es)."""
        if not is_url(uri):
            return self.output_path(uri, what)
        self._allowed_url(uri, what)
        if self.cache_dir is None:
            raise Unsupported(f"{what}: this service has no cache folder for URL outputs")
        return None

    def staging_output(self, uri: str, what: str, job_id: str) -> Path:
        """Local folder a job writes to: the output path itself, or a cache folder for a URL output."""
        if not is_url(uri):
            return self.output_path(uri, what)
        self._allowed_url(uri, what)
        if self.cache_dir is None:
            raise Unsupported(f"{what}: this service has no cache folder for URL outputs")
        return self.cache_dir / "outputs" / job_id / Path(urlparse(uri).path).name
