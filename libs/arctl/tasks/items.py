"""What a task hands the scorer: items of (context, continuation) requests and the gold choice.

Shapes follow lm-evaluation-harness: a ``multiple_choice`` document becomes one request per choice
(``context``, ``target_delimiter + choice``) and is right when the most likely choice is the gold
one; a ``loglikelihood`` document (LAMBADA) is one request, right when every continuation token is
the model's greedy choice.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    """Score ``continuation`` given ``context``: log P(continuation | context) and greedy match."""

    context: str
    continuation: str


@dataclass(frozen=True)
class Item:
    """One document of a task.

    Attributes:
        requests: one per choice (multiple choice) or a single one (loglikelihood tasks).
        gold: index of the right request (0 for loglikelihood tasks).
        choice_chars: characters of each choice's text without the delimiter (lm-eval's
            ``acc_norm`` divides each log-likelihood by it).
    """

    requests: tuple[Request, ...]
    gold: int
    choice_chars: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.requests:
            raise ValueError("an item needs at least one request")
        if not 0 <= self.gold < len(self.requests):
            raise ValueError(f"gold index {self.gold} outside the {len(self.requests)} requests")
        if len(self.choice_chars) != len(self.requests):
            raise ValueError("choice_chars needs one length per request")


def multiple_choice(context: str, choices: list[str], gold: int, delimiter: str = " ") -> Item:
    """lm-eval's multiple choice: the same context, one ``delimiter + choice`` continuation each."""
    return Item(tuple(Request(context, delimiter + choice) for choice in choices), gold, tuple(len(c) for c in choices))


def multiple_contexts(contexts: list[str], continuation: str, gold: int, delimiter: str = " ") -> Item:
    """lm-eval's multiple-input form (WinoGrande's partial scoring): one context per choice, the same
    continuation after each; ``acc`` compares the continuation's likelihood under each context."""
    return Item(
        tuple(Request(context, delimiter + continuation) for context in contexts),
        gold,
        tuple(len(context) for context in contexts),
    )
