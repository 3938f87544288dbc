"""AdaptiveLimiter (AIMD + shared Retry-After pause), TokenBucket, and the retry policy's pieces."""

from __future__ import annotations

import asyncio
import random

import pytest
from tenacity import RetryCallState

from engine.exceptions import ConnectionLostError, HTTPStatusError, NotFitsError, UnsafeRedirectError
from engine.fetch.bandwidth import TokenBucket
from engine.fetch.retry import RETRY_AFTER_CEILING, backoff_wait, is_retryable, parse_retry_after
from engine.fetch.throttle import AdaptiveLimiter
from engine.settings import FetchSettings
from tests.helpers import FakeClock


def test_limiter_halves_on_overload_and_recovers_one_step_per_round() -> None:
    limiter = AdaptiveLimiter(8, minimum=2, clock=FakeClock())
    limiter.on_overload(None)
    assert limiter.limit == 4
    limiter.on_overload(None)
    limiter.on_overload(None)
    assert limiter.limit == 2  # never below the minimum
    assert (limiter.overload_events, limiter.decreases) == (3, 2)
    for _ in range(2):
        limiter.on_success()
    assert limiter.limit == 3  # +1 after `limit` (2) successes
    for _ in range(3 + 4 + 5 + 6 + 6):
        limiter.on_success()
    assert limiter.limit == 7  # one success short of the next step
    limiter.on_success()
    assert limiter.limit == 8  # back to the initial value, and no further
    limiter.on_success()
    assert limiter.limit == 8


def test_limiter_bounds_requests_in_flight() -> None:
    async def main() -> int:
        limiter = AdaptiveLimiter(3, clock=FakeClock())
        peak = 0

        async def request() -> None:
            nonlocal peak
            async with limiter.slot():
                peak = max(peak, limiter.in_flight)
                await asyncio.sleep(0.001)

        await asyncio.gather(*(request() for _ in range(10)))
        assert limiter.in_flight == 0
        return peak

    assert asyncio.run(main()) == 3


def test_overloads_from_one_window_halve_only_once() -> None:
    async def main() -> None:
        limiter = AdaptiveLimiter(8, clock=FakeClock())
        started = asyncio.Event()
        admitted = 0

        async def overloaded_request() -> None:
            nonlocal admitted
            async with limiter.slot():
                admitted += 1
                if admitted == 4:
                    started.set()
                await started.wait()
                limiter.on_overload(None)  # all four were admitted before the first halving

        await asyncio.gather(*(overloaded_request() for _ in range(4)))
        assert (limiter.limit, limiter.decreases, limiter.overload_events) == (4, 1, 4)
        async with limiter.slot():  # admitted after the halving: a new window
            limiter.on_overload(None)
        assert limiter.limit == 2

    asyncio.run(main())


def test_retry_after_pauses_every_new_request() -> None:
    async def main() -> None:
        clock = FakeClock()
        limiter = AdaptiveLimiter(4, clock=clock)
        limiter.on_overload(30.0)
        assert limiter.paused_for == 30.0
        async with limiter.slot():
            assert clock.now >= 30.0
        assert sum(clock.sleeps) == pytest.approx(30.0)

    asyncio.run(main())


def test_a_cancelled_waiter_gives_its_turn_back() -> None:
    async def main() -> None:
        limiter = AdaptiveLimiter(1, clock=FakeClock())
        async with limiter.slot():
            waiter = asyncio.create_task(limiter.slot().__aenter__())
            await asyncio.sleep(0)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        assert limiter.in_flight == 0
        async with limiter.slot():
            assert limiter.in_flight == 1

    asyncio.run(main())


def test_limiter_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError, match="minimum=5"):
        AdaptiveLimiter(4, minimum=5)
    with pytest.raises(ValueError, match="initial=0"):
        AdaptiveLimiter(0)


def test_token_bucket_holds_the_rate() -> None:
    async def main() -> None:
        clock = FakeClock()
        bucket = TokenBucket(1000.0, burst=500.0, clock=clock)
        for _ in range(10):
            await bucket.consume(250)
        # 2500 bytes with 500 of burst: the other 2000 take 2 s at 1000 B/s.
        assert clock.now == pytest.approx(2.0)
        clock.now += 10.0  # idle time refills at most `burst`
        await bucket.consume(500)
        assert clock.now == pytest.approx(12.0)
        await bucket.consume(2000)  # bigger than the burst: allowed, paid for in time
        assert clock.now == pytest.approx(14.0)

    asyncio.run(main())


def test_token_bucket_rejects_a_non_positive_rate() -> None:
    with pytest.raises(ValueError, match="bandwidth limit 0"):
        TokenBucket(0)


def test_retry_after_parsing() -> None:
    assert parse_retry_after("7", now=0.0) == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412500.0) == 0.0  # in the past
    assert parse_retry_after("99999999", now=0.0) == RETRY_AFTER_CEILING
    assert parse_retry_after("soon", now=0.0) is None
    assert parse_retry_after(None, now=0.0) is None


def test_retryable_classification() -> None:
    assert is_retryable(HTTPStatusError(503, "HTTP 503"))
    assert is_retryable(HTTPStatusError(429, "HTTP 429"))
    assert not is_retryable(HTTPStatusError(404, "HTTP 404"))
    assert is_retryable(ConnectionLostError("reset"))
    assert is_retryable(NotFitsError("html"))
    assert not is_retryable(UnsafeRedirectError("ftp"))
    assert not is_retryable(ValueError("bug"))


def test_backoff_is_full_jitter_capped_and_floored_by_retry_after() -> None:
    settings = FetchSettings(backoff_initial=1.0, backoff_max=8.0)
    wait = backoff_wait(settings, random.Random(42))

    def state(attempt: int, exc: BaseException) -> RetryCallState:
        call = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        call.attempt_number = attempt
        call.set_exception((type(exc), exc, None))
        return call

    delays = [wait(state(attempt, ConnectionLostError("x"))) for attempt in range(1, 8) for _ in range(50)]
    assert all(0.0 <= delay <= 8.0 for delay in delays)
    assert max(delays[:50]) <= 1.0  # first retry: within [0, initial]
    assert max(delays) > 4.0  # later retries widen up to backoff_max
    assert wait(state(1, HTTPStatusError(503, "busy", retry_after=30.0))) == 30.0


def test_retarget_moves_the_ceiling_and_the_limit_and_bounds_the_recovery() -> None:
    limiter = AdaptiveLimiter(8, clock=FakeClock())
    limiter.retarget(20)
    assert (limiter.limit, limiter.ceiling) == (20, 20)
    limiter.on_overload(None)
    assert limiter.limit == 10  # a 429/503 still halves at once
    for _ in range(10 * 10 + 11 * 10):
        limiter.on_success()
    assert limiter.limit == 20  # recovered to the retargeted ceiling, not to `initial`
    limiter.retarget(3)
    assert (limiter.limit, limiter.ceiling) == (3, 3)
    with pytest.raises(ValueError, match="retarget"):
        limiter.retarget(0)


def test_retarget_up_lets_waiting_requests_in_and_down_lets_running_ones_finish() -> None:
    async def main() -> None:
        limiter = AdaptiveLimiter(2, clock=FakeClock())
        release = asyncio.Event()

        async def request() -> None:
            async with limiter.slot():
                await release.wait()

        tasks = [asyncio.create_task(request()) for _ in range(6)]
        await asyncio.sleep(0)
        assert (limiter.in_flight, limiter.waiting, limiter.saturated) == (2, 4, True)
        limiter.retarget(5)
        await asyncio.sleep(0)
        assert (limiter.in_flight, limiter.waiting) == (5, 1)
        limiter.retarget(1)
        assert limiter.in_flight == 5  # nothing is cut off mid-transfer
        release.set()
        await asyncio.gather(*tasks)
        assert (limiter.in_flight, limiter.waiting, limiter.saturated) == (0, 0, False)

    asyncio.run(main())
