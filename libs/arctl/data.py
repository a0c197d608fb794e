"""Calibration and evaluation text: local files, the named offline datasets, calibration samples.

Everything here reads local files only; no hub or network access is ever attempted. The offline
copies live in a data folder (``ARCTL_DATA_DIR``, or ``../shared/data`` next to the checkout; see
its README for how each file was made).

File formats read by ``read_texts``:

- ``.txt`` / ``.raw``: one text per non-empty line (lines holding only whitespace are left out;
  each text is the line without its line ending).
- ``.jsonl``: one JSON object per non-blank line; the text is its ``field`` (``"text"`` by default).

Named local datasets (``LOCAL_DATASETS``), resolved under the data folder by split:

- ``wikitext2``: ``test`` = ``wikitext-2-raw/wiki.test.raw`` (perplexity),
  ``train`` = ``wikitext-2-raw/wiki.train.head.txt`` (calibration; first 36 articles).
- ``c4``: ``train`` = ``c4/c4-train.00000-of-01024.head1000.jsonl`` (calibration).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

DATA_DIR_ENV = "ARCTL_DATA_DIR"

LOCAL_DATASETS: Mapping[str, Mapping[str, str]] = {
    "wikitext2": {
        "test": "wikitext-2-raw/wiki.test.raw",
        "train": "wikitext-2-raw/wiki.train.head.txt",
    },
    "c4": {
        "train": "c4/c4-train.00000-of-01024.head1000.jsonl",
    },
}

TEXT_SUFFIXES = (".txt", ".raw")
JSONL_SUFFIXES = (".jsonl",)

SamplingMode = Literal["documents", "concatenated"]


class DataError(ValueError):
    """A data source that cannot be used: missing, unreadable, malformed, or an unknown name."""


# --------------------------------------------------------------------------- locations


def default_data_dir() -> Path | None:
    """The offline data folder: ``$ARCTL_DATA_DIR`` when set (returned even if it does not exist,
    so that a wrong setting is reported rather than silently replaced), else the first existing
    of ``<cwd>/../shared/data`` and ``<repository>/../shared/data``, else ``None``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    candidates = (
        Path.cwd().parent / "shared" / "data",
        Path(__file__).resolve().parents[2].parent / "shared" / "data",
    )
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


def require_data_dir(data_dir: Path | str | None) -> Path:
    found = Path(data_dir) if data_dir is not None else default_data_dir()
    if found is None:
        raise DataError(
            f"no data folder found: set {DATA_DIR_ENV} to the folder holding the offline datasets "
            "(e.g. .../shared/data), or pass a file path"
        )
    if not found.is_dir():
        raise DataError(f"data folder {found} does not exist or is not a folder")
    return found


def _valid_names() -> str:
    return ", ".join(f"{name} ({'/'.join(splits)})" for name, splits in sorted(LOCAL_DATASETS.items()))


def resolve_dataset(
    name_or_path: str | os.PathLike[str],
    data_dir: Path | str | None = None,
    split: str = "train",
) -> Path:
    """The file behind a local dataset name (``wikitext2``, ``c4``; see ``LOCAL_DATASETS``) and
    ``split``, or ``name_or_path`` itself when it is an existing file.

    Hub dataset names are not resolved: this never touches the network. Raises ``DataError`` for
    an unknown name (listing the valid ones), an unknown split, or a missing data file."""
    raw = os.fspath(name_or_path)
    path = Path(raw).expanduser()
    if path.is_file():
        return path
    if raw in LOCAL_DATASETS:
        splits = LOCAL_DATASETS[raw]
        if split not in splits:
            raise DataError(f"dataset {raw!r} has no split {split!r}; valid splits: {', '.join(splits)}")
        file = require_data_dir(data_dir) / splits[split]
        if not file.is_file():
            raise DataError(f"dataset {raw!r} ({split}) expects the file {file}, which does not exist")
        return file
    if path.exists():
        raise DataError(f"{path} is not a file")
    raise DataError(
        f"{raw!r} is neither a file nor a local dataset name; valid names: {_valid_names()}. "
        "Hub datasets need network access, which arctl does not use: download the file and pass its path"
    )


# --------------------------------------------------------------------------- readers


def read_text_file(path: Path) -> str:
    """A UTF-8 data file's text; ``DataError`` naming the file when missing or unreadable."""
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataError(f"{path} is not a file")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc


def text_lines(text: str) -> list[str]:
    """Split on ``\\n`` only (``\\r\\n`` tolerated); a final line ending adds no empty line.
    ``str.splitlines`` is not used: it also splits on characters such as U+2028 inside a line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def parse_text_lines(text: str) -> list[str]:
    """One text per non-empty line (whitespace-only lines left out)."""
    return [line for line in text_lines(text) if line.strip()]


def parse_jsonl_records(text: str, source: str = "<jsonl>") -> list[tuple[int, dict[str, Any]]]:
    """``(1-based line, object)`` for each non-blank line. Raises ``DataError`` naming ``source`` and
    the line for bad JSON or a value that is not an object."""
    records: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(text_lines(text), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(record, dict):
            raise DataError(f"{source}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records


def parse_jsonl(text: str, field: str = "text", source: str = "<jsonl>") -> list[str]:
    """The string ``field`` of each JSON object, one object per non-blank line. Raises
    ``DataError`` naming ``source`` and the 1-based line for bad JSON or a missing/non-string field."""
    texts: list[str] = []
    for number, record in parse_jsonl_records(text, source):
        if field not in record:
            raise DataError(f"{source}:{number}: no field {field!r} (fields: {', '.join(map(str, record))})")
        value = record[field]
        if not isinstance(value, str):
            raise DataError(f"{source}:{number}: field {field!r} is {type(value).__name__}, not a string")
        texts.append(value)
    return texts


def read_texts(path: str | os.PathLike[str], field: str = "text") -> list[str]:
    """The texts of a ``.txt``/``.raw`` file (one per non-empty line) or a ``.jsonl`` file (the
    string ``field`` of each line's object). Raises ``DataError`` on a missing or unreadable file,
    an unsupported suffix, bad JSON or a missing field (naming the file and line)."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES:
        raise DataError(
            f"{file}: unsupported format {suffix or '(no suffix)'!r}; "
            f"expected one of {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}"
        )
    text = read_text_file(file)
    if suffix in JSONL_SUFFIXES:
        return parse_jsonl(text, field=field, source=str(file))
    return parse_text_lines(text)


def load_texts(
    name_or_path: str | os.PathLike[str],
    data_dir: Path | str | None = None,
    split: str = "train",
    field: str = "text",
) -> list[str]:
    """``read_texts(resolve_dataset(name_or_path, data_dir, split), field)``."""
    return read_texts(resolve_dataset(name_or_path, data_dir, split), field=field)


# --------------------------------------------------------------------------- WikiText-2 test protocol


def wikitext2_rows(raw: str) -> list[str]:
    """The Hugging Face ``wikitext-2-raw-v1`` rows of a raw WikiText file: for each line,
    ``line + "\\n"``, or ``""`` when the line is whitespace only (see the data README)."""
    return [line + "\n" if line.strip() else "" for line in text_lines(raw)]


def wikitext2_test_text(data_dir: Path | str | None = None) -> str:
    """The standard (GPTQ/AutoRound) WikiText-2 perplexity text: ``"\\n\\n".join(rows)`` over the
    4358 test rows rebuilt from ``wiki.test.raw``."""
    path = resolve_dataset("wikitext2", data_dir, split="test")
    return "\n\n".join(wikitext2_rows(read_text_file(path)))


# --------------------------------------------------------------------------- calibration samples


@dataclass(frozen=True)
class CalibrationSet:
    """Token windows for calibration.

    Attributes:
        input_ids: LongTensor ``[n, seqlen]``.
        source: what the texts came from (a dataset name, a path, or ``"<N texts>"``).
        seed: the seed that reproduces this set.
        mode: ``"documents"``: each row is a random window of one document at least ``seqlen``
            tokens long (AutoRound/GPTQ style). ``"concatenated"``: too few such documents
            existed, so every document was joined (eos-separated) into one stream and each row
            is a random window of that stream (GPTQ's WikiText-2 style).
        skipped_short: documents left out for being shorter than ``seqlen`` (``documents`` mode;
            0 in ``concatenated`` mode, where every document is used).
        documents_used: documents that contributed tokens.
        stream_tokens: length of the joined stream (``concatenated`` mode; 0 otherwise).
    """

    input_ids: torch.Tensor
    source: str
    seed: int
    mode: SamplingMode
    skipped_short: int
    documents_used: int
    stream_tokens: int = 0

    @property
    def nsamples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.input_ids.shape[1])


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of one document, no special tokens (windows start anywhere in a document)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if isinstance(ids, torch.Tensor):
        return [int(i) for i in ids.reshape(-1).tolist()]
    return [int(i) for i in ids]


def _source_label(source: str | os.PathLike[str] | Sequence[str]) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return f"<{len(source)} texts>"


def _source_texts(
    source: str | os.PathLike[str] | Sequence[str], data_dir: Path | str | None, field: str
) -> list[str]:
    if isinstance(source, (str, os.PathLike)):
        return load_texts(source, data_dir, split="train", field=field)
    texts = list(source)
    bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
    if bad is not None:
        raise DataError(f"text {bad} of the source is {type(texts[bad]).__name__}, not a string")
    return texts


def _random_windows(stream: list[int], count: int, seqlen: int, rng: random.Random) -> list[list[int]]:
    starts = [rng.randint(0, len(stream) - seqlen) for _ in range(count)]
    return [stream[start : start + seqlen] for start in starts]


def calibration_samples(
    tokenizer: Any,
    source: str | os.PathLike[str] | Sequence[str],
    nsamples: int,
    seqlen: int,
    seed: int = 42,
    data_dir: Path | str | None = None,
    field: str = "text",
) -> CalibrationSet:
    """``nsamples`` windows of ``seqlen`` tokens, reproducible by ``seed``.

    ``source`` is a local dataset name (its ``train`` split), a file path, or a sequence of
    texts. Documents are visited in a seeded random order and tokenized without special tokens;
    those shorter than ``seqlen`` are skipped (and counted), and one random ``seqlen`` window is
    taken from each long one. When fewer than ``nsamples`` documents are long enough, the set is
    instead drawn as random windows of all documents joined by the tokenizer's eos token (no
    separator when it has none); ``mode`` says which happened.

    Returns a ``CalibrationSet`` with ``input_ids`` LongTensor ``[nsamples, seqlen]``. Raises
    ``DataError`` when the source yields no tokens, or fewer than ``seqlen`` tokens in all."""
    if nsamples <= 0 or seqlen <= 0:
        raise ValueError(f"nsamples and seqlen must be positive, got nsamples={nsamples}, seqlen={seqlen}")
    label = _source_label(source)
    texts = _source_texts(source, data_dir, field)
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)

    tokenized: list[list[int]] = []
    windows: list[list[int]] = []
    skipped = 0
    for index in order:
        ids = _token_ids(tokenizer, texts[index])
        tokenized.append(ids)
        if len(ids) < seqlen:
            skipped += 1
            continue
        start = rng.randint(0, len(ids) - seqlen)
        windows.append(ids[start : start + seqlen])
        if len(windows) == nsamples:
            return CalibrationSet(
                input_ids=torch.tensor(windows, dtype=torch.long),
                source=label,
                seed=seed,
                mode="documents",
                skipped_short=skipped,
                documents_used=len(windows),
            )

    stream = _join_with_eos(tokenized, getattr(tokenizer, "eos_token_id", None))
    if not stream:
        raise DataError(f"calibration source {label} yields no tokens ({len(texts)} texts)")
    if len(stream) < seqlen:
        raise DataError(
            f"calibration source {label} yields {len(stream)} tokens in all, fewer than one window "
            f"of seqlen={seqlen}"
        )
    stream_rng = random.Random(seed)
    return CalibrationSet(
        input_ids=torch.tensor(_random_windows(stream, nsamples, seqlen, stream_rng), dtype=torch.long),
        source=label,
        seed=seed,
        mode="concatenated",
        skipped_short=0,
        documents_used=sum(1 for ids in tokenized if ids),
        stream_tokens=len(stream),
    )


def _join_with_eos(documents: list[list[int]], eos_token_id: int | None) -> list[int]:
    """Non-empty documents in order, ``eos_token_id`` between consecutive ones (if not None)."""
    stream: list[int] = []
    for ids in documents:
        if not ids:
            continue
        if stream and eos_token_id is not None:
            stream.append(int(eos_token_id))
        stream.extend(ids)
    return stream
