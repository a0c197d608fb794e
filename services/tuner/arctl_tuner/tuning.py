"""The one function the tuner service runs: the same engine call as the embedded pipeline
(``arctl_cli.pipeline.tune_from_settings``), so a remote tune gives the same bytes.

``iters == 0`` (recipe ``rtn``) is round-to-nearest and reads no data; otherwise the calibration
samples are drawn from ``dataset`` (a local dataset name such as ``wikitext2``/``c4``, or a file)
and SignRound runs block by block, keeping finished blocks in ``work_dir`` so that ``resume``
continues from the last one (after a server restart, or on a request with ``resume`` set).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from arctl.data import calibration_samples
from arctl.models import LoadedModel
from arctl.plan import Plan
from arctl.progress import ProgressCallback
from arctl_tuner.config import TuneConfig
from arctl_tuner.engine import default_work_dir, tune_model

DEFAULT_DATASET = "wikitext2"


@dataclass(frozen=True)
class TuneJobSettings:
    """What a tune request asks for: the engine's config and where its calibration text comes from."""

    config: TuneConfig
    dataset: str = DEFAULT_DATASET
    data_dir: Path | None = None


def work_folder(out_dir: Path) -> Path:
    """Where the engine keeps finished blocks of ``out_dir`` until the checkpoint is complete."""
    return default_work_dir(out_dir)


def run_tuning(
    loaded: LoadedModel,
    plan: Plan,
    out_dir: Path,
    settings: TuneJobSettings,
    progress: ProgressCallback,
    resume: bool,
) -> Path:
    """Read the calibration samples the settings name (if tuning) and run the tuner engine."""
    config = settings.config
    calibration = None
    if config.iters > 0 or plan.needs_calibrated_activations:
        calibration = calibration_samples(
            loaded.tokenizer, settings.dataset, config.nsamples, config.seqlen, config.seed, data_dir=settings.data_dir
        )
    return tune_model(loaded, plan, out_dir, config, calibration, progress, work_dir=work_folder(out_dir), resume=resume)
