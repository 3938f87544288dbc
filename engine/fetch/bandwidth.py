"""An optional byte-rate cap for the whole run (a token bucket shared by every download).

Consumers may take more than is available: the bucket goes into debt and the consumer sleeps until
the debt is repaid, so a chunk bigger than the burst is fine and concurrent consumers queue up fairly
(each one sees the debt of those before it). When no cap is configured the Downloader holds no bucket
and the hot loop pays nothing.
"""

from __future__ import annotations

from engine.models import Clock, SystemClock


class TokenBucket:
    """At most `rate_bytes_per_s` on average, with bursts up to `burst` bytes (default: one second)."""

    def __init__(
        self, rate_bytes_per_s: float, burst: float | None = None, clock: Clock | None = None
    ) -> None:
        if not rate_bytes_per_s > 0:
            raise ValueError(f"bandwidth limit {rate_bytes_per_s!r} bytes/s: must be positive")
        if burst is not None and not burst > 0:
            raise ValueError(f"bandwidth burst {burst!r} bytes: must be positive")
        self.rate = float(rate_bytes_per_s)
        self.burst = float(burst) if burst is not None else self.rate
        self._clock = clock or SystemClock()
        self._tokens = self.burst
        self._stamp = self._clock.monotonic()

    def _refill(self) -> None:
        now = self._clock.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def consume(self, n: int) -> None:
        """Take `n` bytes' worth of tokens, sleeping as long as the rate requires."""
        self._refill()
        self._tokens -= n
        if self._tokens < 0:
            await self._clock.sleep(-self._tokens / self.rate)
