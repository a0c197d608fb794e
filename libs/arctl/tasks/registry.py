"""The evaluation tasks arctl knows, where their files live in the data folder, and how to read them.

Files are read from the offline data folder (``--data-dir``, ``$ARCTL_DATA_DIR`` or
``../shared/data``; see :func:`arctl.data.default_data_dir`); nothing is downloaded. Items keep the
files' order, so ``limit=N`` takes the first N documents, as the harness's ``--limit`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arctl.data import DataError, parse_jsonl_records, read_text_file, require_data_dir, text_lines
from arctl.tasks.items import Item
from arctl.tasks.prompts import (
    RecordError,
    arc_item,
    hellaswag_item,
    lambada_item,
    piqa_item,
    winogrande_item,
)

PERPLEXITY_TASK = "wikitext2"


class UnknownTaskError(ValueError):
    """A task name arctl does not know; the message lists the known ones."""


@dataclass(frozen=True)
class TaskSpec:
    """One task.

    Attributes:
        name: the harness's task name.
        files: paths relative to the data folder that the task reads.
        split: which split those files hold.
        kind: ``choice`` (multiple choice: acc, acc_norm), ``loglikelihood`` (LAMBADA: greedy acc,
            perplexity) or ``perplexity`` (rolling token perplexity of a text).
        metrics: what the task reports (besides standard errors).
        read: data folder -> items, in file order.
    """

    name: str
    files: tuple[str, ...]
    split: str
    kind: str
    metrics: tuple[str, ...]
    read: Callable[[Path], list[Item]]


def _lines(path: Path) -> list[str]:
    return text_lines(read_text_file(path))


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [record for _, record in parse_jsonl_records(read_text_file(path), str(path))]


def _labels(path: Path) -> list[int]:
    labels = []
    for number, line in enumerate(_lines(path), 1):
        try:
            labels.append(int(line))
        except ValueError:
            raise DataError(f"{path}:{number}: label {line!r} is not an integer") from None
    return labels


def _build(path: Path, build: Callable[[int], Item], count: int) -> list[Item]:
    items = []
    for index in range(count):
        try:
            items.append(build(index))
        except RecordError as exc:
            raise DataError(f"{path}: record {index + 1}: {exc}") from exc
    return items


def _read_lambada(root: Path) -> list[Item]:
    path = root / LAMBADA_FILE
    records = _jsonl(path)
    return _build(path, lambda i: lambada_item(str(records[i].get("text", ""))), len(records))


def _read_piqa(root: Path) -> list[Item]:
    path = root / PIQA_FILE
    records, labels = _jsonl(path), _labels(root / PIQA_LABELS)
    if len(records) != len(labels):
        raise DataError(f"{path} has {len(records)} records but {PIQA_LABELS} has {len(labels)} labels")
    return _build(path, lambda i: piqa_item(records[i], labels[i]), len(records))


def _arc_reader(file: str) -> Callable[[Path], list[Item]]:
    def read(root: Path) -> list[Item]:
        records = _jsonl(root / file)
        return _build(root / file, lambda i: arc_item(records[i]), len(records))

    return read


def _read_hellaswag(root: Path) -> list[Item]:
    path = root / HELLASWAG_FILE
    lines = _lines(path)
    if len(lines) % 6:
        raise DataError(f"{path} has {len(lines)} lines, not 6 per task (llama.cpp's HellaSwag text form)")

    def build(index: int) -> Item:
        query, label, *endings = lines[6 * index : 6 * index + 6]
        if not label.strip().isdigit():
            raise RecordError(f"label line {label!r} is not a number")
        return hellaswag_item(query, int(label), endings)

    return _build(path, build, len(lines) // 6)


def _read_winogrande(root: Path) -> list[Item]:
    path = root / WINOGRANDE_FILE
    records = _jsonl(path)
    return _build(path, lambda i: winogrande_item(records[i]), len(records))


LAMBADA_FILE = "lambada_openai/lambada_test.jsonl"
PIQA_FILE, PIQA_LABELS = "piqa/valid.jsonl", "piqa/valid-labels.lst"
HELLASWAG_FILE = "hellaswag/hellaswag_val_full.txt"
WINOGRANDE_FILE = "winogrande_1.1/dev.jsonl"
ARC_EASY_FILE, ARC_CHALLENGE_FILE = "arc/ARC-Easy-Test.jsonl", "arc/ARC-Challenge-Test.jsonl"
WIKITEXT2_FILE = "wikitext-2-raw/wiki.test.raw"

CHOICE_METRICS = ("acc", "acc_norm")
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(PERPLEXITY_TASK, (WIKITEXT2_FILE,), "test", "perplexity", ("ppl",), lambda root: []),
        TaskSpec("lambada_openai", (LAMBADA_FILE,), "test", "loglikelihood", ("acc", "perplexity"), _read_lambada),
        TaskSpec("hellaswag", (HELLASWAG_FILE,), "validation", "choice", CHOICE_METRICS, _read_hellaswag),
        TaskSpec("piqa", (PIQA_FILE, PIQA_LABELS), "validation", "choice", CHOICE_METRICS, _read_piqa),
        TaskSpec("winogrande", (WINOGRANDE_FILE,), "validation (dev, 1.1)", "choice", ("acc",), _read_winogrande),
        TaskSpec("arc_easy", (ARC_EASY_FILE,), "test", "choice", CHOICE_METRICS, _arc_reader(ARC_EASY_FILE)),
        TaskSpec("arc_challenge", (ARC_CHALLENGE_FILE,), "test", "choice", CHOICE_METRICS, _arc_reader(ARC_CHALLENGE_FILE)),
    )
}
DEFAULT_TASKS = ("wikitext2", "lambada_openai", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge")
ZERO_SHOT_AVERAGE = ("lambada_openai", "hellaswag", "piqa", "winogrande", "arc_easy")


def parse_tasks(names: str | list[str]) -> list[TaskSpec]:
    """Task specs for a comma-separated string or a list; ``UnknownTaskError`` lists the known names."""
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if not wanted:
        raise UnknownTaskError(f"no task named; known tasks: {', '.join(TASKS)}")
    unknown = [name for name in wanted if name not in TASKS]
    if unknown:
        raise UnknownTaskError(f"unknown task {', '.join(map(repr, unknown))}; known tasks: {', '.join(TASKS)}")
    return [TASKS[name] for name in dict.fromkeys(wanted)]


def check_files(specs: list[TaskSpec], data_dir: Path | str | None) -> Path:
    """The data folder, after checking that every file the tasks read is there; otherwise a
    ``DataError`` naming each missing file and the tasks whose files are present."""
    root = require_data_dir(data_dir)
    missing = [f"{spec.name}: {file}" for spec in specs for file in spec.files if not (root / file).is_file()]
    if missing:
        available = [spec.name for spec in TASKS.values() if all((root / f).is_file() for f in spec.files)]
        raise DataError(
            f"missing data files in {root}: {'; '.join(missing)}; tasks available there: {', '.join(available) or 'none'}"
        )
    return root


def read_items(spec: TaskSpec, root: Path, limit: int | None = None) -> list[Item]:
    """The first ``limit`` items (all when ``None``) of a task, in file order."""
    items = spec.read(root)
    return items if limit is None else items[:limit]
