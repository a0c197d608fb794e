"""Tuning settings and the named recipes (AutoRound's defaults, so results compare one to one)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


class TuneConfigError(ValueError):
    """Settings that cannot run (non-positive sizes, unknown recipe, ...)."""


@dataclass(frozen=True)
class TuneConfig:
    """SignRound settings.

    Attributes:
        iters: signed-gradient steps per block; 0 is round-to-nearest.
        lr: step size at iteration 0 (None: ``1/iters``, ``2/iters`` for <= 3-bit layers when
            ``iters >= 1000``), decaying linearly to 0.
        minmax_lr: step size of the clipping factors (None: same as ``lr``).
        batch_size: calibration samples per step.
        nsamples, seqlen: calibration samples and their length in tokens.
        seed: sampling and sample-order seed.
        enable_minmax_tuning: learn per-group clipping factors as well as rounding offsets.
        enable_quanted_input: feed each block the previous quantized blocks' outputs.
        search_init_clip: start the clipping factors at the per-group value that minimizes the
            activation-weighted weight error, instead of 1.0 as AutoRound does. Measured on SmolLM2
            block 3 (16 x 256 tokens, 30 iters), tuned block MSE: W2 g32 asym 0.108 -> 0.093,
            W3 g64 0.042 -> 0.037, MXFP4 0.028 -> 0.021, W4 g64 unchanged (0.0132 vs 0.0133).
        dtype: compute dtype of the block forward and backward passes: ``bfloat16`` (autocast, as
            AutoRound's default amp), ``float32``, or ``auto``: bfloat16 where the device multiplies
            in it natively, float32 elsewhere (``arctl_tuner.precision``; on CPUs without bfloat16
            instructions a bfloat16 step is several times slower). The engine replaces ``auto`` by the
            dtype it chose before anything is fingerprinted or recorded. Quantization math and the
            loss stay in float32.
        holdout: fraction of the calibration samples kept out of the training steps and used to
            pick the best iteration, in blocks whose quantized layers all have at least
            ``holdout_min_bits`` bits; elsewhere (and with 0) see ``last_min_bits``. Measured on
            SmolLM2 (32 x 128 C4 tokens, 20 iters, WikiText-2 ppl / KL; against the lowest-batch-loss
            rule, in bfloat16): W5 g32 asym RTN 25.43 / 0.0575, tuned 26.38 / 0.0721 (tuning hurts), tuned with
            holdout 1/8 25.47 / 0.0544; but W3 g64 50.19 / 0.670 -> 51.49 / 0.685 with it and W4 g64
            30.23 / 0.198 -> 29.83 / 0.209: at 4 bits and below the held-out samples are worth more
            as training data.
        holdout_min_bits: see ``holdout``.
        last_min_bits: which parameters a block without held-out samples keeps: those after the
            last step when its quantized layers all have at least this many bits, else those of
            the lowest training-batch loss (AutoRound's best iteration, which compares losses of
            different batches). Measured on SmolLM2 (32 x 128 C4 tokens, 20 iters, float32,
            WikiText-2 ppl / KL; last step vs lowest batch loss; auto-round 0.16.1 on the same
            samples): W3 g64 seeds 42 / 1 / 2 47.82 / 49.28 / 49.07 (KL 0.634 / 0.658 / 0.654) vs
            50.53 / 54.89 / 53.54 (KL 0.682 / 0.722 / 0.727; auto-round 48.33 / 52.05 / 50.75, KL
            0.675 / 0.739 / 0.698); W4 g64 seeds 42 / 1 30.86 / 29.80 (KL 0.205 / 0.197) vs 30.40 /
            29.51 (KL 0.228 / 0.197): a little higher perplexity, lower or equal KL; MXFP4 31.74 /
            0.290 vs 33.58 / 0.297 (seed 42; the lowest-batch number is tuner_vs_autoround's at
            f773aee); but W2 g32 asym seeds 42 / 1 371.5 / 204.3 (KL 2.59 /
            2.006) vs 222.7 / 206.7 (KL 2.11 / 2.004).
        tune_max_bits: in a block that has layers of at most this many bits, the layers with more
            keep round-to-nearest (still quantized in the block's forward, so the others are tuned
            around them); blocks of wider layers only are tuned whole. In mixed-bit plans the wide
            layers' rounding is mostly noise to learn from 32 x 128 tokens. Measured on SmolLM2's
            planned mixes (same settings, WikiText-2 ppl / KL; RTN / every layer tuned / this rule):
            6 bits 24.70 / 0.0281, 25.24 / 0.0351, 24.70 / 0.0265; 4.5 bits 28.33 / 0.171,
            28.75 / 0.152, 27.85 / 0.131; 3.5 bits (1 + 16 wide layers) tuned 37.33 / 0.411 vs 37.27 / 0.418.
    """

    iters: int = 200
    lr: float | None = None
    minmax_lr: float | None = None
    batch_size: int = 8
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 42
    enable_minmax_tuning: bool = True
    enable_quanted_input: bool = True
    search_init_clip: bool = True
    dtype: str = "auto"
    holdout: float = 0.125
    holdout_min_bits: int = 5
    tune_max_bits: int = 4
    last_min_bits: int = 3

    def __post_init__(self) -> None:
        if self.iters < 0:
            raise TuneConfigError(f"iters must be >= 0, got {self.iters}")
        for name in ("batch_size", "nsamples", "seqlen"):
            if getattr(self, name) <= 0:
                raise TuneConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size > self.nsamples:
            raise TuneConfigError(f"batch_size {self.batch_size} is larger than nsamples {self.nsamples}")
        for name in ("lr", "minmax_lr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise TuneConfigError(f"{name} must be positive, got {value}")
        if not 0.0 <= self.holdout < 1.0:
            raise TuneConfigError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.dtype not in COMPUTE_DTYPES:
            raise TuneConfigError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.dtype!r}")

    def holdout_count(self, nsamples: int) -> int:
        """Samples held out of ``nsamples``: at least one when ``holdout`` > 0, but never so many
        that fewer than ``batch_size`` are left to train on."""
        if self.holdout == 0:
            return 0
        return min(max(1, round(nsamples * self.holdout)), nsamples - self.batch_size)

    def lr_for_bits(self, bits: int) -> float:
        """Initial step size of a layer with ``bits``-bit codes (AutoRound's rule)."""
        if self.lr is not None:
            return self.lr
        if self.iters >= 1000 and bits <= 3:
            return 2.0 / self.iters
        return 1.0 / max(self.iters, 1)

    def minmax_lr_for_bits(self, bits: int) -> float:
        return self.minmax_lr if self.minmax_lr is not None else self.lr_for_bits(bits)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RECIPES: dict[str, TuneConfig] = {
    # Round to nearest reads calibration samples only for static activation scales (a per-tensor
    # maximum): 16 x 512 tokens, one forward pass (~40 s for SmolLM2 on 2 CPU cores).
    "rtn": TuneConfig(iters=0, nsamples=16, seqlen=512),
    "light": TuneConfig(iters=50, lr=5e-3),
    "default": TuneConfig(),
    "best": TuneConfig(iters=1000, nsamples=512),
}


def recipe(name: str, **overrides: Any) -> TuneConfig:
    """The recipe called ``name`` with ``overrides`` (None values are ignored)."""
    if name not in RECIPES:
        raise TuneConfigError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
    return replace(RECIPES[name], **{key: value for key, value in overrides.items() if value is not None})
