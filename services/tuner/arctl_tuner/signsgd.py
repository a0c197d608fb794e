"""Signed gradient descent with a linearly decaying step: the optimizer of SignRound.

Pure functions on tensors; the engine owns the loop.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def linear_decay(lr0: float, step: int, total: int) -> float:
    """Step size at ``step`` of ``total``: ``lr0 * (1 - step / total)`` (``lr0`` at 0, 0 at ``total``)."""
    if total <= 0:
        return 0.0
    return lr0 * max(0.0, 1.0 - step / total)


@torch.no_grad()
def signed_step(params: Iterable[torch.Tensor], lr: float) -> None:
    """``p -= lr * sign(grad)`` for every parameter with a gradient; gradients are cleared."""
    for param in params:
        if param.grad is None:
            continue
        param.add_(param.grad.sign_(), alpha=-lr)
        param.grad = None


@torch.no_grad()
def clamp_factors(params: Iterable[torch.Tensor], low: float = 0.0, high: float = 1.0) -> None:
    """Keep clipping factors inside ``[low, high]`` (AutoRound's ``minmax_scale_bound``)."""
    for param in params:
        param.clamp_(low, high)


class CyclicSampler:
    """Batches of sample indices from a shuffled cycle: reshuffle when fewer than a batch remain
    (the remainder is dropped), as AutoRound's IndexSampler does. Reproducible from its seed."""

    def __init__(self, nsamples: int, batch_size: int, seed: int) -> None:
        self._n = nsamples
        self._batch = batch_size
        self._generator = torch.Generator().manual_seed(seed)
        self._order: list[int] = []

    def next(self) -> list[int]:
        if len(self._order) < self._batch:
            self._order = torch.randperm(self._n, generator=self._generator).tolist()
        batch, self._order = self._order[: self._batch], self._order[self._batch :]
        return batch
