"""The vertical slice the CLI composes: plan -> quantize -> export -> evaluate, in one process."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from arctl.atomic import atomic_directory
from arctl.checkpoint import read_checkpoint
from arctl.data import calibration_samples, wikitext2_test_text
from arctl.evaluation import ComparisonResult, compare_to_reference, tokenize_for_perplexity
from arctl.logs import get_logger
from arctl.models import LoadedModel, load_checkpoint_model
from arctl.plan import Plan
from arctl.progress import Progress, ProgressCallback
from arctl_exporter.engine import check_plan, export
from arctl_tuner.config import TuneConfig
from arctl_tuner.engine import default_work_dir, tune_model

CHECKPOINT_DIR = "checkpoint"
REPORT_FILE = "report.json"
log = get_logger("arctl.pipeline")


@dataclass(frozen=True)
class EvalSettings:
    """WikiText-2 test, non-overlapping windows of ``seqlen`` tokens, at most ``windows`` of them
    (None: the whole test set)."""

    seqlen: int = 2048
    windows: int | None = 8
    data_dir: Path | None = None


@dataclass(frozen=True)
class TuneSettings:
    """How to quantize: ``config.iters == 0`` is round-to-nearest (no calibration data read unless
    the plan has activation scales to calibrate)."""

    config: TuneConfig = field(default_factory=lambda: TuneConfig(iters=0))
    dataset: str = "wikitext2"
    data_dir: Path | None = None
    resume: bool = False


def tune_from_settings(
    loaded: LoadedModel, plan: Plan, out_dir: Path, settings: TuneSettings, progress: ProgressCallback,
    work_dir: Path | None = None,
) -> Path:
    """Read the calibration samples the settings name (if tuning) and run the tuner engine."""
    config = settings.config
    calibration = None
    if config.iters > 0 or plan.needs_calibrated_activations:
        calibration = calibration_samples(
            loaded.tokenizer, settings.dataset, config.nsamples, config.seqlen, config.seed, data_dir=settings.data_dir
        )
    return tune_model(loaded, plan, out_dir, config, calibration, progress, work_dir=work_dir, resume=settings.resume)


@dataclass
class QuantizeReport:
    out_dir: str
    checkpoint: str
    exports: dict[str, str]
    plan: dict[str, Any]
    checkpoint_bytes: int
    export_bytes: dict[str, int]
    evaluation: dict[str, Any] | None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def plan_summary(plan: Plan) -> dict[str, Any]:
    bits = plan.bits
    return {
        "target_avg_bits": plan.target_avg_bits,
        "avg_bits": round(bits.average, 4),
        "avg_bits_codes_only": round(bits.average_codes_only, 4),
        "layers": len(plan.layers),
        "schemes": plan.scheme_counts(),
        "predicted_kl": plan.notes.get("predicted_loss"),
        "measured_kl": plan.notes.get("measured_kl"),
    }


def evaluate_against(
    model: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    text: str,
    settings: EvalSettings,
    progress: ProgressCallback,
) -> ComparisonResult:
    """Perplexity of both models on ``text`` (WikiText-2 test), KL and top-1 agreement of ``model``
    to ``reference``."""
    token_ids = tokenize_for_perplexity(tokenizer, text)
    return compare_to_reference(
        model,
        reference,
        token_ids,
        settings.seqlen,
        max_windows=settings.windows,
        progress=lambda done, total: progress(Progress("evaluate", done, total)),
    )


def run_quantize(
    loaded: LoadedModel,
    plan: Plan,
    out_dir: Path,
    formats: list[str],
    evaluation: EvalSettings | None,
    progress: ProgressCallback,
    tuning: TuneSettings | None = None,
) -> QuantizeReport:
    """Quantize (round to nearest), export and evaluate into ``out_dir``, all or nothing: the folder
    appears only when every step has finished. Tuned blocks wait in ``<out>.partial`` so that a
    killed run continues with ``resume``. A plan a requested format cannot hold is refused first
    (``ExportError``), before anything is quantized or written."""
    if formats:
        check_plan(formats, plan)
    eval_text = wikitext2_test_text(evaluation.data_dir) if evaluation is not None else ""
    seconds: dict[str, float] = {}
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        started = time.perf_counter()
        tune_from_settings(loaded, plan, tmp / CHECKPOINT_DIR, tuning or TuneSettings(), progress, work_dir=default_work_dir(out_dir))
        seconds["quantize"] = round(time.perf_counter() - started, 2)
        log.info("quantized", layers=len(plan.layers), avg_bits=round(plan.avg_bits, 4), seconds=seconds["quantize"])
        checkpoint = read_checkpoint(tmp / CHECKPOINT_DIR)
        started = time.perf_counter()
        exports = export(checkpoint.path, formats, tmp / "export") if formats else {}
        seconds["export"] = round(time.perf_counter() - started, 2)
        log.info("exported", formats=formats, seconds=seconds["export"])
        result = None
        if evaluation is not None:
            started = time.perf_counter()
            quantized_model = load_checkpoint_model(checkpoint, dtype=next(loaded.model.parameters()).dtype)
            comparison = evaluate_against(quantized_model, loaded.model, loaded.tokenizer, eval_text, evaluation, progress)
            result = {"dataset": "wikitext2-test", **asdict(comparison)}
            seconds["evaluate"] = round(time.perf_counter() - started, 2)
            log.info("evaluated", ppl=round(comparison.ppl, 4), kl=round(comparison.kl, 5), seconds=seconds["evaluate"])
            del quantized_model
        final_exports = {name: out_dir / path.relative_to(tmp) for name, path in exports.items()}
        report = QuantizeReport(
            out_dir=str(out_dir),
            checkpoint=str(out_dir / CHECKPOINT_DIR),
            exports={name: str(path) for name, path in final_exports.items()},
            plan=plan_summary(plan),
            checkpoint_bytes=folder_bytes(checkpoint.path),
            export_bytes={name: folder_bytes(path) for name, path in exports.items()},
            evaluation=result,
            seconds=seconds,
        )
        (tmp / REPORT_FILE).write_text(report.to_json(), encoding="utf-8")
        (tmp / "plan.json").write_text(plan.to_json(), encoding="utf-8")
    return report


