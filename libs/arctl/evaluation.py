"""Perplexity and agreement with a reference model, on token ids already tokenized.

Models are passed in (no loading here). A model is anything callable as ``model(input_ids)`` with
``input_ids`` LongTensor ``[batch, seqlen]`` that returns logits ``[batch, seqlen, vocab]``,
either as a tensor or as an object with ``.logits`` (Hugging Face causal LMs; they are called with
``use_cache=False``).

Protocol (GPTQ/AutoRound): the token stream ``[1, N]`` is cut into ``N // seqlen`` non-overlapping
windows (the incomplete tail is dropped); in each window the logits at positions ``0..seqlen-2``
predict tokens ``1..seqlen-1``, so a window yields ``seqlen - 1`` predicted tokens. The mean
negative log-likelihood over all predicted tokens gives ``ppl = exp(nll)``. Log-softmax runs in
float32 and sums accumulate in float64. Windows are processed ``batch_size`` at a time (1 by
default), so memory holds one batch of logits at a time.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Progress = Callable[[int, int], None]

_POSITION_CHUNK = 1024  # positions per log-softmax chunk: bounds float32 temporaries to [chunk, vocab]


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of one model.

    Attributes:
        ppl: ``exp(nll)``.
        nll: mean negative log-likelihood per predicted token (nats).
        tokens: predicted tokens, ``windows * (seqlen - 1)``.
        windows: windows evaluated.
        seqlen: tokens per window.
    """

    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int


@dataclass(frozen=True)
class ComparisonResult:
    """A model against its reference (e.g. quantized vs full precision), on the same windows.

    Attributes:
        ppl, nll: the model's perplexity and mean NLL.
        reference_ppl, reference_nll: the reference's.
        kl: mean over predicted positions of KL(reference || model) in nats.
        top1_agreement: fraction of predicted positions where both argmax tokens are equal.
        tokens, windows, seqlen: as in ``PerplexityResult``.
    """

    ppl: float
    nll: float
    reference_ppl: float
    reference_nll: float
    kl: float
    top1_agreement: float
    tokens: int
    windows: int
    seqlen: int


def tokenize_for_perplexity(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one LongTensor ``[1, N]``, tokenized as GPTQ/AutoRound do (with the
    tokenizer's default special tokens, e.g. one leading BOS where the tokenizer adds one)."""
    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)


# --------------------------------------------------------------------------- helpers


def _stream(token_ids: torch.Tensor) -> torch.Tensor:
    """``[N]`` or ``[1, N]`` integer ids as a flat LongTensor ``[N]``."""
    if token_ids.dim() == 2 and token_ids.shape[0] == 1:
        token_ids = token_ids[0]
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be [N] or [1, N], got shape {tuple(token_ids.shape)}")
    if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
        raise ValueError(f"token_ids must be integer ids, got {token_ids.dtype}")
    return token_ids.long()


def window_count(n_tokens: int, seqlen: int, max_windows: int | None = None) -> int:
    """Complete non-overlapping windows of ``seqlen`` in ``n_tokens``, capped by ``max_windows``.
    Raises ``ValueError`` when there is none or an argument is out of range."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2 (one predicted token), got {seqlen}")
    if max_windows is not None and max_windows <= 0:
        raise ValueError(f"max_windows must be positive or None, got {max_windows}")
    count = n_tokens // seqlen
    if count == 0:
        raise ValueError(f"{n_tokens} tokens are fewer than one window of seqlen={seqlen}")
    return count if max_windows is None else min(count, max_windows)


def _batches(stream: torch.Tensor, seqlen: int, windows: int, batch_size: int) -> Iterator[torch.Tensor]:
    """LongTensor ``[b, seqlen]`` batches of consecutive windows, ``b <= batch_size``."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    grid = stream[: windows * seqlen].reshape(windows, seqlen)
    for start in range(0, windows, batch_size):
        yield grid[start : start + batch_size]


def _device(model: nn.Module) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, seqlen, vocab]`` of ``model`` on ``input_ids`` ``[b, seqlen]``."""
    input_ids = input_ids.to(_device(model))
    takes_cache = getattr(getattr(model, "config", None), "use_cache", None) is not None
    output = model(input_ids, use_cache=False) if takes_cache else model(input_ids)
    logits = output if isinstance(output, torch.Tensor) else output.logits
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(input_ids.shape):
        raise ValueError(
            f"model returned logits of shape {tuple(logits.shape)} for input {tuple(input_ids.shape)}; "
            "expected [batch, seqlen, vocab]"
        )
    return logits


@contextlib.contextmanager
def _evaluating(*models: nn.Module) -> Iterator[None]:
    """Eval mode and inference mode for the block; each model's training flag is restored after."""
    flags = [model.training for model in models]
    try:
        for model in models:
            model.eval()
        with torch.inference_mode():
            yield
    finally:
        for model, flag in zip(models, flags, strict=True):
            model.train(flag)


def _predicted(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift: logits ``[b*(seqlen-1), vocab]`` at positions ``0..seqlen-2`` and their targets
    ``[b*(seqlen-1)]`` (tokens ``1..seqlen-1``), on the logits' device."""
    vocab = logits.shape[-1]
    shifted = logits[:, :-1, :].reshape(-1, vocab)
    targets = input_ids[:, 1:].reshape(-1).to(logits.device)
    return shifted, targets


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum over rows of ``-log softmax(logits)[target]``; ``logits`` ``[rows, vocab]``, float32
    log-softmax per chunk of rows, float64 sum."""
    total = 0.0
    for start in range(0, logits.shape[0], _POSITION_CHUNK):
        chunk = logits[start : start + _POSITION_CHUNK].float()
        loss = F.cross_entropy(chunk, targets[start : start + _POSITION_CHUNK], reduction="none")
        total += float(loss.double().sum())
    return total


@dataclass(frozen=True)
class _PairSums:
    nll: float
    reference_nll: float
    kl: float
    agree: int


def _pair_sums(logits: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor) -> _PairSums:
    """Sums over rows of NLL (both), KL(reference || model) and argmax agreement; ``logits`` and
    ``reference`` ``[rows, vocab]`` on the same device, processed in chunks of rows."""
    nll = ref_nll = kl = 0.0
    agree = 0
    for start in range(0, logits.shape[0], _POSITION_CHUNK):
        rows = slice(start, start + _POSITION_CHUNK)
        log_p = F.log_softmax(logits[rows].float(), dim=-1)
        log_q = F.log_softmax(reference[rows].float(), dim=-1)
        target = targets[rows].unsqueeze(-1)
        nll -= float(log_p.gather(-1, target).double().sum())
        ref_nll -= float(log_q.gather(-1, target).double().sum())
        q = log_q.exp()
        per_row = torch.where(q > 0, q * (log_q - log_p), 0.0).sum(dim=-1)  # 0 * log 0 = 0
        kl += float(per_row.double().sum())
        agree += int((log_p.argmax(dim=-1) == log_q.argmax(dim=-1)).sum())
    return _PairSums(nll=nll, reference_nll=ref_nll, kl=kl, agree=agree)


# --------------------------------------------------------------------------- public


def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    seqlen: int,
    max_windows: int | None = None,
    progress: Progress | None = None,
    batch_size: int = 1,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``token_ids`` (LongTensor ``[1, N]`` or ``[N]``) over
    non-overlapping windows of ``seqlen`` (at most ``max_windows``), ``batch_size`` windows per
    forward. ``progress(done_windows, total_windows)`` is called after each forward."""
    stream = _stream(token_ids)
    windows = window_count(stream.numel(), seqlen, max_windows)
    total = 0.0
    done = 0
    with _evaluating(model):
        for batch in _batches(stream, seqlen, windows, batch_size):
            shifted, targets = _predicted(_logits(model, batch), batch)
            total += _nll_sum(shifted, targets)
            done += batch.shape[0]
            if progress is not None:
                progress(done, windows)
    tokens = windows * (seqlen - 1)
    nll = total / tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=tokens, windows=windows, seqlen=seqlen)


def compare_to_reference(
    model: nn.Module,
    reference_model: nn.Module,
    token_ids: torch.Tensor,
    seqlen: int,
    max_windows: int | None = None,
    progress: Progress | None = None,
    batch_size: int = 1,
) -> ComparisonResult:
    """Perplexity of both models, mean KL(reference || model) per predicted token and top-1
    agreement, in one pass over the windows of ``token_ids`` (``[1, N]`` or ``[N]``; windows as in
    ``perplexity``). The two models may live on different devices; the reference's logits are
    moved to the model's. ``progress(done_windows, total_windows)`` is called after each batch."""
    stream = _stream(token_ids)
    windows = window_count(stream.numel(), seqlen, max_windows)
    nll = ref_nll = kl = 0.0
    agree = 0
    done = 0
    with _evaluating(model, reference_model):
        for batch in _batches(stream, seqlen, windows, batch_size):
            logits = _logits(model, batch)
            reference = _logits(reference_model, batch).to(logits.device)
            if reference.shape != logits.shape:
                raise ValueError(
                    f"model logits {tuple(logits.shape)} and reference logits {tuple(reference.shape)} "
                    "differ: the models must share a vocabulary"
                )
            shifted, targets = _predicted(logits, batch)
            ref_shifted, _ = _predicted(reference, batch)
            sums = _pair_sums(shifted, ref_shifted, targets)
            nll += sums.nll
            ref_nll += sums.reference_nll
            kl += sums.kl
            agree += sums.agree
            done += batch.shape[0]
            if progress is not None:
                progress(done, windows)
    tokens = windows * (seqlen - 1)
    return ComparisonResult(
        ppl=math.exp(nll / tokens),
        nll=nll / tokens,
        reference_ppl=math.exp(ref_nll / tokens),
        reference_nll=ref_nll / tokens,
        kl=kl / tokens,
        top1_agreement=agree / tokens,
        tokens=tokens,
        windows=windows,
        seqlen=seqlen,
    )
