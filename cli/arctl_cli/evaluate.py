"""``arctl eval``: load what the user names (model, exported folder or checkpoint), run the tasks,
and build the run report (``arctl report`` compares several).

The report (JSON, ``format: arctl-eval/1``): the target, what its weights are (format, schemes,
true average bits: read from its files), the settings, per task its numbers with standard errors
and timing, and ``average_acc`` over lambada_openai, hellaswag, piqa, winogrande and arc_easy when
all five ran. WikiText-2 is GPTQ/AutoRound's token perplexity; with a reference model (given, or a
checkpoint's source model) it adds the reference's perplexity, KL(reference || target) and top-1
agreement on the same windows.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from arctl.checkpoint import read_checkpoint
from arctl.data import require_data_dir, wikitext2_test_text
from arctl.models import load_model
from arctl.progress import Progress, ProgressCallback
from arctl.tasks.registry import PERPLEXITY_TASK, check_files, parse_tasks
from arctl.tasks.runner import TaskSettings, run_tasks, zero_shot_average
from arctl_cli.pipeline import EvalSettings, evaluate_against
from arctl_serve.generation import is_checkpoint, load_for_serving
from arctl_serve.quantinfo import describe

REPORT_FORMAT = "arctl-eval/1"
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EvalOptionError(ValueError):
    """An ``arctl eval`` option that cannot be used (unknown dtype, ...)."""


def evaluate_target(
    target: str,
    tasks: str,
    settings: TaskSettings,
    reference: str | None,
    dtype: str,
    progress: ProgressCallback,
) -> dict[str, Any]:
    """Run ``tasks`` (comma-separated names) on ``target``; return the run report."""
    if dtype not in DTYPES:
        raise EvalOptionError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    specs = parse_tasks(tasks)
    check_files(specs, settings.data_dir)  # before spending time on loading
    started = time.perf_counter()
    progress(Progress("load", 0, 1, f"loading {target}"))
    served = load_for_serving(target)
    model = served.model if DTYPES[dtype] is None else served.model.to(DTYPES[dtype])
    model.eval()
    progress(Progress("load", 1, 1))
    weights = describe(Path(target)) if Path(target).exists() else {"format": "none", "avg_bits": None}
    if reference is None and Path(target).is_dir() and is_checkpoint(Path(target)):
        reference = read_checkpoint(Path(target)).metadata.get("source_model", {}).get("id")
    compare = reference if any(spec.name == PERPLEXITY_TASK for spec in specs) else None
    results = run_tasks(model, served.tokenizer, [s for s in specs if not (compare and s.name == PERPLEXITY_TASK)], settings, progress)
    tasks_report = {result.task: result.to_dict() for result in results}
    if compare:
        tasks_report[PERPLEXITY_TASK] = _wikitext2_against(model, served.tokenizer, compare, settings, progress)
    return {
        "format": REPORT_FORMAT,
        "target": target,
        "weights": weights,
        "reference": compare,
        "settings": {
            "limit": settings.limit,
            "batch_size": settings.batch_size,
            "dtype": dtype if DTYPES[dtype] is not None else str(next(model.parameters()).dtype).removeprefix("torch."),
            "wikitext_seqlen": settings.wikitext_seqlen,
            "wikitext_windows": settings.wikitext_windows,
            "data_dir": str(require_data_dir(settings.data_dir)),
        },
        "tasks": {spec.name: tasks_report[spec.name] for spec in specs},
        "average_acc": zero_shot_average(results),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _wikitext2_against(
    model: torch.nn.Module, tokenizer: Any, reference: str, settings: TaskSettings, progress: ProgressCallback
) -> dict[str, Any]:
    started = time.perf_counter()
    reference_model = load_model(reference).model
    comparison = evaluate_against(
        model,
        reference_model,
        tokenizer,
        wikitext2_test_text(settings.data_dir),
        EvalSettings(settings.wikitext_seqlen, settings.wikitext_windows, settings.data_dir),
        progress,
    )
    numbers = asdict(comparison)
    return {
        "items": numbers["windows"],
        "ppl": numbers.pop("ppl"),
        "ppl_stderr": None,
        **numbers,
        "seconds": round(time.perf_counter() - started, 2),
        "split": "test",
    }
