"""Run a list of tasks on one loaded model: items from the data folder, scores, metrics, timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from arctl.data import wikitext2_test_text
from arctl.evaluation import perplexity, tokenize_for_perplexity
from arctl.progress import Progress, ProgressCallback, ignore_progress
from arctl.tasks.metrics import Metric, choice_metrics, loglikelihood_metrics
from arctl.tasks.registry import PERPLEXITY_TASK, ZERO_SHOT_AVERAGE, TaskSpec, check_files, read_items
from arctl.tasks.scoring import LoglikelihoodScorer


@dataclass(frozen=True)
class TaskSettings:
    """How to run the tasks.

    Attributes:
        limit: first N documents of each task (all when ``None``), as the harness's ``--limit``.
        batch_size: sequences per forward pass for single-request documents.
        wikitext_seqlen, wikitext_windows: the WikiText-2 perplexity protocol (GPTQ/AutoRound:
            non-overlapping windows; ``None`` windows = the whole test set).
        data_dir: the offline data folder (default: see ``arctl.data.default_data_dir``).
    """

    limit: int | None = None
    batch_size: int = 8
    wikitext_seqlen: int = 2048
    wikitext_windows: int | None = None
    data_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class TaskResult:
    """One task's numbers: ``metrics`` by name, on ``items`` documents, in ``seconds``."""

    task: str
    items: int
    metrics: dict[str, Metric]
    seconds: float
    split: str = ""
    files: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        numbers: dict[str, Any] = {}
        for name, metric in self.metrics.items():
            numbers[name] = metric.value
            numbers[f"{name}_stderr"] = metric.stderr
        return {"items": self.items, **numbers, "seconds": self.seconds, "split": self.split, "files": list(self.files)}


def run_tasks(
    model: nn.Module,
    tokenizer: Any,
    specs: list[TaskSpec],
    settings: TaskSettings,
    progress: ProgressCallback = ignore_progress,
) -> list[TaskResult]:
    """Every task of ``specs`` on ``model`` in order (files checked first, so a missing file fails
    before any model time is spent)."""
    root = check_files(specs, settings.data_dir)
    model.eval()
    results = []
    for spec in specs:
        started = time.perf_counter()
        if spec.kind == "perplexity":
            count, metrics = _wikitext2(model, tokenizer, settings, root, progress)
        else:
            count, metrics = _scored_task(model, tokenizer, spec, settings, root, progress)
        seconds = round(time.perf_counter() - started, 2)
        results.append(TaskResult(spec.name, count, metrics, seconds, spec.split, spec.files))
    return results


def zero_shot_average(results: list[TaskResult]) -> float | None:
    """Mean ``acc`` over the seed tables' five tasks, when all five were run."""
    accs = {r.task: r.metrics["acc"].value for r in results if "acc" in r.metrics}
    if not all(task in accs for task in ZERO_SHOT_AVERAGE):
        return None
    return sum(accs[task] for task in ZERO_SHOT_AVERAGE) / len(ZERO_SHOT_AVERAGE)


def _scored_task(
    model: nn.Module, tokenizer: Any, spec: TaskSpec, settings: TaskSettings, root: Path, progress: ProgressCallback
) -> tuple[int, dict[str, Metric]]:
    items = read_items(spec, root, settings.limit)
    scorer = LoglikelihoodScorer(model, tokenizer, batch_size=settings.batch_size)
    progress(Progress(spec.name, 0, len(items)))
    scores = scorer.score(items, lambda done, total: progress(Progress(spec.name, done, total)))
    if spec.kind == "loglikelihood":
        return len(items), loglikelihood_metrics(scores)
    metrics = choice_metrics(items, scores)
    return len(items), {name: metrics[name] for name in spec.metrics}


def _wikitext2(
    model: nn.Module, tokenizer: Any, settings: TaskSettings, root: Path, progress: ProgressCallback
) -> tuple[int, dict[str, Metric]]:
    ids = tokenize_for_perplexity(tokenizer, wikitext2_test_text(root))
    result = perplexity(
        model,
        ids,
        settings.wikitext_seqlen,
        max_windows=settings.wikitext_windows,
        progress=lambda done, total: progress(Progress(PERPLEXITY_TASK, done, total)),
    )
    return result.windows, {"ppl": Metric(result.ppl, None)}
