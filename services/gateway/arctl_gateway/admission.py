"""Admission control: at most ``max_concurrency`` requests run; up to ``max_queue`` more wait (FIFO)
at most ``queue_timeout_s``; anything beyond is refused at once. Memory stays bounded: a refused
request's body is never read."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from arctl_gateway.metrics import GatewayMetrics


class Rejected(Exception):
    """No slot: ``reason`` is ``queue_full`` or ``queue_timeout``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Admission:
    def __init__(self, max_concurrency: int, max_queue: int, queue_timeout_s: float, metrics: GatewayMetrics) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._metrics = metrics

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.running < self.max_concurrency and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise Rejected("queue_full")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._metrics.queue_depth.set(len(self._waiters))
        started = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot arrived just as we gave up: pass it on
            else:
                waiter.cancel()
                self._discard(waiter)
            if isinstance(exc, TimeoutError):
                raise Rejected("queue_timeout") from None
            raise
        finally:
            self._metrics.queue_depth.set(len(self._waiters))
            self._metrics.queue_wait.observe(time.monotonic() - started)
        # release() handed its slot straight to us: running was not decremented.

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1

    def _discard(self, waiter: asyncio.Future[None]) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()
