"""The retry policy of one download: what is worth another try, and how long to wait before it.

* Retried: every `TransferError` whose `retryable` is true (connection lost, idle timeout, HTTP 408,
  425, 429 and 5xx, and `IntegrityError`: a fresh copy may be right).
* Not retried: other 4xx, unsafe redirects, unsafe paths, and every `LocalError` (those stop the run).
* Waits: exponential backoff with *full jitter* (uniform in [0, min(max, initial * 2**n)]), so many
  workers that failed together do not come back together; a `Retry-After` from the server is a floor
  (capped at `RETRY_AFTER_CEILING`, so a hostile or broken header cannot park a worker for days).
"""

from __future__ import annotations

import email.utils
import math
import random
from collections.abc import Awaitable, Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from engine.exceptions import HTTPStatusError, TransferError
from engine.models import Clock
from engine.settings import FetchSettings

RETRY_AFTER_CEILING = 900.0


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP-date); None if absent/bad.

    `now` is the current Unix time (from the injected clock), for the HTTP-date form.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # HTTP-dates are GMT; a naive result means the zone was missing
            return None
        seconds = when.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_CEILING)


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, TransferError) and bool(exc.retryable)


def backoff_wait(
    settings: FetchSettings, rng: random.Random | None = None
) -> Callable[[RetryCallState], float]:
    """Full-jitter exponential backoff, floored by the failed try's Retry-After."""
    uniform = (rng or random).uniform

    def wait(state: RetryCallState) -> float:
        ceiling = min(settings.backoff_max, settings.backoff_initial * 2 ** (state.attempt_number - 1))
        delay = uniform(0.0, ceiling)
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, HTTPStatusError) and exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        return delay

    return wait


def retrying(
    settings: FetchSettings,
    clock: Clock,
    *,
    before_sleep: Callable[[RetryCallState], Awaitable[None] | None] | None = None,
    rng: random.Random | None = None,
) -> AsyncRetrying:
    """An AsyncRetrying for one file: `settings.retries` extra tries, sleeping on `clock`."""
    return AsyncRetrying(
        sleep=clock.sleep,
        stop=stop_after_attempt(settings.retries + 1),
        wait=backoff_wait(settings, rng),
        retry=retry_if_exception(is_retryable),
        before_sleep=before_sleep,
        reraise=True,
    )
