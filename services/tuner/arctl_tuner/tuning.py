"""The one switch between the tuning engines the service (and later the CLI) can run.

Every engine has the signature ``TuneEngine``: (loaded model, plan, output folder, config,
progress callback, resume folder) -> the checkpoint folder. The resume folder is where an engine
keeps finished blocks; it is empty on a fresh start and holds the previous attempt's blocks when a
job resumes (after a server restart or with ``TuneRequest.resume``). ``select_engine`` picks the
engine for a config; when the block-wise SignRound engine lands, it is returned here for
``iters > 0``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from arctl.models import LoadedModel
from arctl.plan import Plan
from arctl.progress import ProgressCallback
from arctl_tuner.rtn import quantize_rtn

RECIPES = ("rtn", "signround")
DEFAULT_RECIPE = "signround"


class EngineUnavailableError(NotImplementedError):
    """The requested tuning method is not available in this build."""


@dataclass(frozen=True)
class TuneConfig:
    """Settings of one tuning run; None = the recipe's default."""

    recipe: str = DEFAULT_RECIPE
    iters: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    nsamples: int | None = None
    seqlen: int | None = None
    seed: int | None = None
    calibration_data: Path | None = None
    quantize_lm_head: bool = False

    @property
    def is_rtn(self) -> bool:
        return self.recipe == "rtn" or self.iters == 0


TuneEngine = Callable[[LoadedModel, Plan, Path, TuneConfig, ProgressCallback, Path | None], Path]


def rtn_engine(
    loaded: LoadedModel,
    plan: Plan,
    out_dir: Path,
    config: TuneConfig,
    progress: ProgressCallback,
    resume_dir: Path | None,
) -> Path:
    """Round to nearest: no data, no steps, nothing to resume (a rerun gives the same bytes)."""
    return quantize_rtn(loaded, plan, out_dir, progress)


def select_engine(config: TuneConfig) -> TuneEngine:
    """The engine for ``config``.

    Raises:
        EngineUnavailableError: SignRound (iters > 0) until its engine is wired in here.
    """
    if config.is_rtn:
        return rtn_engine
    raise EngineUnavailableError(
        "SignRound tuning (iters > 0) is not available in this build yet; use recipe 'rtn' or iters 0"
    )
