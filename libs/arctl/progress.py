"""Progress reported by engines through a callback; the CLI draws it, the servers stream it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Progress:
    """One step of a long-running stage: ``completed`` of ``total`` units done."""

    stage: str
    completed: int
    total: int
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


ProgressCallback = Callable[[Progress], None]


def ignore_progress(_: Progress) -> None:
    """The callback used when nobody listens."""
