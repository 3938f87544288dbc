"""Adaptive concurrency: slow the whole run down when the archive says it is overloaded.

Policy (AIMD, as TCP does for its congestion window):

* **Bound.** ``async with limiter.slot():`` admits at most ``limit`` requests at once; the others
  wait in arrival order.
* **Multiplicative decrease.** ``on_overload(retry_after)`` (a 429 or 503) halves ``limit``, never
  below ``minimum``. Only one halving per *window*: a request that started before the latest
  halving reports an overload the run has already answered, so it does not halve again (otherwise
  eight requests in flight that all got a 503 would crush the limit from 8 to 1).
* **Shared pause.** A ``Retry-After`` pauses *new* requests of every worker until it has passed: the
  server asked the client, not one connection, to wait. Requests already streaming continue.
* **Additive increase.** ``on_success()`` counts finished requests; every ``limit`` successes add
  one to ``limit``, up to the ``ceiling`` (``initial`` unless retargeted). So recovery takes about
  one "round" of requests per step.
* **Retarget.** ``retarget(n)`` moves both the ceiling and the limit to ``n`` at once: the
  ``--concurrency auto`` tuner (`engine.fetch.autotune`) steers the limit through it, while a 429 or
  503 still halves the limit here, at once, whatever the tuner last asked for.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from engine.models import Clock, SystemClock

# The window (halving generation) the current task's slot was admitted in; see the module docstring.
_slot_generation: contextvars.ContextVar[int | None] = contextvars.ContextVar("slot_generation", default=None)


def download_workers(connections: int) -> int:
    """How many download tasks a run of `connections` connections runs: a few more.

    `AdaptiveLimiter.slot` covers only a request and its body, so a worker that is checking, fsyncing
    and renaming its file holds no connection; the spare workers keep every connection busy
    meanwhile (an fsync is about a fifth of a 2 MB file's time on loopback). Under
    ``--concurrency auto`` work then also waits at the limiter whenever there is work, as the tuner
    needs: it counts only windows in which the limit, not the plan, was the bound.
    """
    return connections + max(2, connections // 4)


class AdaptiveLimiter:
    """AIMD bound on requests in flight, with a shared Retry-After pause."""

    def __init__(self, initial: int, minimum: int = 1, clock: Clock | None = None) -> None:
        if initial < 1:
            raise ValueError(f"AdaptiveLimiter initial={initial}: must be at least 1")
        if not 1 <= minimum <= initial:
            raise ValueError(f"AdaptiveLimiter minimum={minimum}: must be between 1 and initial={initial}")
        self.initial = initial
        self.minimum = minimum
        self._clock = clock or SystemClock()
        self._limit = initial
        self._ceiling = initial
        self._in_flight = 0
        self._successes = 0
        self._generation = 0
        self._paused_until = 0.0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.overload_events = 0  # every on_overload call
        self.decreases = 0  # the halvings those caused
        self.increases = 0

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def ceiling(self) -> int:
        """The most the additive increase may grow `limit` to."""
        return self._ceiling

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Requests queued for a slot (more work than the limit lets through)."""
        return len(self._waiters)

    @property
    def saturated(self) -> bool:
        """Every slot is taken: the limit, not the supply of work, bounds the requests in flight."""
        return self._in_flight >= self._limit

    def retarget(self, limit: int) -> None:
        """Set the ceiling and the limit to `limit` (at least `minimum`); wake waiters it lets in.

        Requests already in flight above a lowered limit finish normally; no new one starts until
        the count is below it again.
        """
        if limit < 1:
            raise ValueError(f"AdaptiveLimiter retarget({limit}): must be at least 1")
        limit = max(self.minimum, limit)
        self._ceiling = limit
        self._limit = limit
        self._successes = 0
        self._wake()

    @property
    def paused_for(self) -> float:
        """Seconds until new requests may start again (0 when not paused)."""
        return max(0.0, self._paused_until - self._clock.monotonic())

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the `limit` request slots for the duration of the block."""
        await self._acquire()
        token = _slot_generation.set(self._generation)
        try:
            yield
        finally:
            _slot_generation.reset(token)
            self._release()

    async def _acquire(self) -> None:
        if self._in_flight < self._limit and not self._waiters:
            self._in_flight += 1
        else:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter  # `_wake` hands the slot over (counts it in `in_flight`) before waking us
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release()  # handed a slot we will not use: pass it on
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
        try:
            # A Retry-After pause holds back new requests, even those already admitted.
            while (delay := self._paused_until - self._clock.monotonic()) > 0:
                await self._clock.sleep(delay)
        except asyncio.CancelledError:
            self._release()
            raise

    def _release(self) -> None:
        self._in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        """Hand free slots to the waiters, first come first served."""
        while self._in_flight < self._limit and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._in_flight += 1
                waiter.set_result(None)

    def on_overload(self, retry_after: float | None = None) -> None:
        """The archive said 429/503: halve the limit (once per window) and pause for `retry_after`."""
        self.overload_events += 1
        admitted_in = _slot_generation.get()
        if admitted_in is None or admitted_in >= self._generation:
            self._generation += 1
            new_limit = max(self.minimum, self._limit // 2)
            if new_limit < self._limit:
                self.decreases += 1
            self._limit = new_limit
            self._successes = 0
        if retry_after is not None and retry_after > 0:
            self._paused_until = max(self._paused_until, self._clock.monotonic() + retry_after)

    def on_success(self) -> None:
        """A request completed normally: grow the limit by one per `limit` successes, up to the ceiling."""
        if self._limit >= self._ceiling:
            return
        self._successes += 1
        if self._successes >= self._limit:
            self._successes = 0
            self._limit += 1
            self.increases += 1
            self._wake()
