"""``arctl eval``: load what the user names (model, exported folder or checkpoint) and evaluate it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from arctl.checkpoint import MANIFEST, read_checkpoint
from arctl.data import wikitext2_test_text
from arctl.evaluation import perplexity, tokenize_for_perplexity
from arctl.models import load_checkpoint_model, load_model
from arctl.progress import Progress, ProgressCallback
from arctl_cli.pipeline import EvalSettings, evaluate_against


def _is_checkpoint(target: str) -> bool:
    return (Path(target) / MANIFEST).is_file() and (Path(target) / "quantized.safetensors").is_file()


def evaluate_target(
    target: str, reference: str | None, settings: EvalSettings, progress: ProgressCallback
) -> dict[str, Any]:
    """WikiText-2 perplexity of ``target``; with a reference (given, or a checkpoint's source model)
    also the reference's perplexity, KL(reference || target) and top-1 agreement."""
    text = wikitext2_test_text(settings.data_dir)
    progress(Progress("load", 0, 1, f"loading {target}"))
    if _is_checkpoint(target):
        checkpoint = read_checkpoint(Path(target))
        model = load_checkpoint_model(checkpoint)
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint.path))
        reference = reference or checkpoint.metadata.get("source_model", {}).get("id")
    else:
        loaded = load_model(target)
        model, tokenizer = loaded.model, loaded.tokenizer
    progress(Progress("load", 1, 1))
    result: dict[str, Any] = {"target": target, "reference": reference, "dataset": "wikitext2-test"}
    if reference:
        reference_model = load_model(reference).model
        comparison = evaluate_against(model, reference_model, tokenizer, text, settings, progress)
        result.update(asdict(comparison))
    else:
        measured = perplexity(
            model,
            tokenize_for_perplexity(tokenizer, text),
            settings.seqlen,
            max_windows=settings.windows,
            progress=lambda done, total: progress(Progress("evaluate", done, total)),
        )
        result.update(asdict(measured))
    return result
