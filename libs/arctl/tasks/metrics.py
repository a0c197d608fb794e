"""Task metrics from request scores, as lm-evaluation-harness aggregates them (pure functions).

- ``acc``: the highest log-likelihood is the gold request (ties go to the first, as ``argmax``).
- ``acc_norm``: the same after dividing each log-likelihood by its choice's length in characters.
- LAMBADA ``acc``: the greedy continuation is the target; ``perplexity``: ``exp(-mean logprob)``.
- Standard errors: of a mean, ``sample std (n-1) / sqrt(n)``; of the perplexity, the delta method
  ``perplexity * stderr(logprob)`` (the harness bootstraps it; the two agree to a few percent).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from arctl.tasks.items import Item
from arctl.tasks.scoring import Score


@dataclass(frozen=True)
class Metric:
    """One number of a task with its standard error (``None`` where undefined, n < 2)."""

    value: float
    stderr: float | None


def mean_with_stderr(values: Sequence[float]) -> Metric:
    if not values:
        raise ValueError("no values to average")
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Metric(mean, None)
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Metric(mean, math.sqrt(variance / n))


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def choice_metrics(items: Sequence[Item], scores: Sequence[Sequence[Score]]) -> dict[str, Metric]:
    """``acc`` and ``acc_norm`` of multiple-choice items."""
    acc, acc_norm = [], []
    for item, item_scores in zip(items, scores, strict=True):
        logprobs = [s.logprob for s in item_scores]
        acc.append(float(_argmax(logprobs) == item.gold))
        normalized = [lp / max(chars, 1) for lp, chars in zip(logprobs, item.choice_chars, strict=True)]
        acc_norm.append(float(_argmax(normalized) == item.gold))
    return {"acc": mean_with_stderr(acc), "acc_norm": mean_with_stderr(acc_norm)}


def loglikelihood_metrics(scores: Sequence[Sequence[Score]]) -> dict[str, Metric]:
    """LAMBADA's ``acc`` (greedy match) and ``perplexity`` of single-request items."""
    greedy = [float(item[0].greedy) for item in scores]
    logprobs = [item[0].logprob for item in scores]
    mean_logprob = mean_with_stderr(logprobs)
    perplexity = math.exp(-mean_logprob.value)
    stderr = perplexity * mean_logprob.stderr if mean_logprob.stderr is not None else None
    return {"acc": mean_with_stderr(greedy), "perplexity": Metric(perplexity, stderr)}
