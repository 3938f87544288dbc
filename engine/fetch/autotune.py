"""`--concurrency auto`: find how many connections a path needs, then hold there.

The right number of downloads in flight depends on the path: the round-trip time, the rate the
archive allows one connection, and the link. Too few leave the link idle; more than enough only
queue at the bottleneck and crowd the archive. The tuner finds the count by measuring:

* **Start modestly** (``start``, 8 by default) and measure the aggregate goodput over a window.
* **Climb while it pays.** Double the count (×1.5 once the gain is less than proportional) while
  the added connections bring at least ``efficiency`` (half) of the rate they would bring if
  nothing else bound, and the time to first byte does not inflate (a queue building at the
  bottleneck shows there before the rate stops rising).
* **Hold at the knee.** When a step brings less, the count is set to what the measured rate needs
  at the best rate per connection seen, plus 10 % headroom (``ceil(1.1 × best rate ÷ best rate per
  connection)``), never above the count that was just tried, and held. While holding, a time to first
  byte that stays inflated for two windows gives back a quarter of the connections; every
  ``reprobe_after`` seconds one step up (×1.25) checks whether the path has improved.
* **Never above ``maximum``** (``--max-connections``, the politeness cap). A step that reaches
  the cap and pays only in part settles at the knee's estimate below it.
* **Overload wins.** The AdaptiveLimiter halves its limit at once on a 429 or 503. The tuner sees
  the overload at its next sample, takes the halved limit as its own, and does not climb again for
  ``overload_quiet`` seconds.
* **Only saturated windows count.** A window in which the limit was not the bound (the plan ran
  dry at the end of a run, planning was slower than the downloads) says nothing about the path; it
  is measured again. Run a few more workers than ``maximum`` (``maximum + maximum // 4``) so that
  work waits at the limiter whenever there is work.

Each new count first gets a settling time (slow start on new connections, their handshakes) before
its window is measured. Settling and windows scale with the round-trip time seen as time to first
byte (4 and 10 round trips, at least 0.25 and 0.5 s; a window also lasts until 2 MiB a connection
arrived, since bytes are reported in blocks of fetch.chunk_size): every second spent measuring a count below
the knee is a second of the link partly idle, and on a 50 ms path the former floors of 0.5 and 1 s
doubled the climb (tests/unit/tcp_path_sim.py models it; benchmarks/README.md has the runs). The
first settle counts from the first response, not from the tuner's creation (before it the plan is
read and connections open), and until a window has closed the round trip is taken as half the
quickest first byte, since the first requests go out on new connections (connect, then request).
The tuner is plain logic driven by an injected clock: `sample()` is one step, `run()` calls
it every ``sample_interval`` seconds. It never touches the network itself: the run feeds it
``add_bytes`` (body bytes as they arrive) and ``add_first_byte`` (seconds from sending a request
to its response headers), and it steers the limiter through ``AdaptiveLimiter.retarget``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from engine.fetch.throttle import AdaptiveLimiter
from engine.models import Clock, SystemClock

# The politeness cap when none is given: 32 connections carry 1 Gbit/s at 4 MiB/s each, which is
# enough for any path where one connection gets that much, while 32 is still modest next to a
# browser's 6 per host times a few tabs; past it, an archive shared by many users sees one client
# take an unfair part of its server slots.
DEFAULT_MAX_CONNECTIONS = 32
DEFAULT_START = 8


class RateMeter(Protocol):
    """What a transfer reports to the tuner (the Downloader's `meter`)."""

    def add_bytes(self, n: int) -> None: ...

    def add_first_byte(self, seconds: float) -> None: ...


@dataclass(frozen=True, slots=True)
class TunerSettings:
    """How the tuner measures and decides (the defaults suit paths from loopback to 300 ms)."""

    start: int = DEFAULT_START
    maximum: int = DEFAULT_MAX_CONNECTIONS
    minimum: int = 1
    sample_interval: float = 0.1  # seconds between samples
    settle_rtts: float = 4.0  # settle this many round trips after a change (slow start) ...
    settle_min: float = 0.25  # ... but at least and at most this many seconds
    settle_max: float = 3.0
    window_rtts: float = 10.0  # measure over this many round trips ...
    window_min: float = 0.5  # ... but at least and at most this many seconds
    window_max: float = 4.0
    # ... and until this many body bytes per connection arrived: the Downloader reports bytes in
    # blocks (fetch.chunk_size, 256 KiB), so a short window on slow connections counts whole blocks
    # that arrived before it or misses ones that are due (±10 % at 1 MiB/s a connection in 1 s).
    window_bytes_per_conn: int = 2 * 1024 * 1024
    efficiency: float = 0.5  # climb while new connections bring at least this share of their rate
    min_gain: float = 0.05  # a rate rise smaller than this is noise, not a gain
    headroom: float = 1.1  # connections beyond the knee's estimate, for jitter
    ttfb_inflation: float = 1.5  # the time to first byte is inflated above this × its base ...
    ttfb_slack: float = 0.010  # ... plus this many seconds (scheduler noise on short paths)
    saturated_share: float = 0.8  # a window counts when the limit bound it in this share of samples
    reprobe_after: float = 30.0  # seconds holding before one step up checks the path again
    overload_quiet: float = 60.0  # seconds without climbing after a 429/503
    rtt_guess: float = 0.1  # round-trip time assumed before the first response
    first_ttfb_rtts: float = 2.0  # round trips in a first response (connect, then request)

    def __post_init__(self) -> None:
        if self.maximum < 1:
            raise ValueError(f"max connections {self.maximum}: must be at least 1")
        if not 1 <= self.minimum <= self.maximum:
            raise ValueError(f"minimum connections {self.minimum}: must be between 1 and {self.maximum}")
        if self.start < 1:
            raise ValueError(f"start connections {self.start}: must be at least 1")
        if self.sample_interval <= 0:
            raise ValueError(f"sample interval {self.sample_interval}: must be positive")


@dataclass(frozen=True, slots=True)
class TuneStep:
    """One decision, for logs and benchmarks: at `at` seconds, `before` → `after` connections."""

    at: float
    before: int
    after: int
    rate: float  # bytes/s measured at `before` (0 when the step was not a measurement)
    ttfb: float  # median seconds to first byte in that window (0 when none)
    reason: str


class ConcurrencyTuner:
    """Steers an AdaptiveLimiter's limit to the number of connections the path needs.

    Parameters
    ----------
    limiter
        The run's limiter; the tuner calls its ``retarget`` and reads its overload counters.
    settings
        Thresholds and timing; ``settings.start`` is applied to the limiter at once.
    clock
        Time source (a fake one in tests).
    on_step
        Called with every TuneStep (a log line, the progress display).
    """

    def __init__(
        self,
        limiter: AdaptiveLimiter,
        settings: TunerSettings | None = None,
        *,
        clock: Clock | None = None,
        on_step: Callable[[TuneStep], None] | None = None,
    ) -> None:
        self.settings = settings or TunerSettings()
        self.limiter = limiter
        self._clock = clock or SystemClock()
        self._on_step = on_step
        self.steps: list[TuneStep] = []
        self.state = "probing"  # "probing": climbing; "holding": settled at the knee
        s = self.settings
        self._target = min(max(s.start, s.minimum), s.maximum)
        self._first_target = self._target
        limiter.retarget(self._target)
        now = self._clock.monotonic()
        self._started = now
        self._bytes = 0  # body bytes since the run began (add_bytes)
        self._ttfbs: list[float] = []  # this window's times to first byte
        self._base_ttfb: float | None = None  # the lowest window median seen: the path's own RTT
        self._best_per_conn = 0.0  # the best rate per connection seen in a counted window
        self._best_rate = 0.0
        self._prev: tuple[int, float] | None = None  # (connections, rate) of the last counted window
        self._inflated_windows = 0
        self._hold_since = now
        self._quiet_until = 0.0
        self._overloads_seen = limiter.overload_events
        self._phase = "first"  # until the first response: see sample()
        self._phase_end = math.inf
        self._samples = self._saturated = 0

    # -- what the run feeds in --------------------------------------------------------------------
    def add_bytes(self, n: int) -> None:
        """Body bytes received (call as they arrive; cheap)."""
        self._bytes += n

    def add_first_byte(self, seconds: float) -> None:
        """Seconds from sending a request to its response headers."""
        if seconds >= 0 and len(self._ttfbs) < 10_000:
            self._ttfbs.append(seconds)

    # -- what the run reads -----------------------------------------------------------------------
    @property
    def limit(self) -> int:
        """The number of connections the tuner asks for now."""
        return self._target

    @property
    def received(self) -> int:
        """Body bytes reported so far (add_bytes)."""
        return self._bytes

    @property
    def rtt(self) -> float:
        """The path's round-trip time as seen in the time to first byte (a guess before any)."""
        if self._base_ttfb is not None:
            return self._base_ttfb
        # Before the first window closes: the quickest response so far; the first ones come on new
        # connections, which take two round trips (connect, then request).
        if self._ttfbs:
            return min(self._ttfbs) / self.settings.first_ttfb_rtts
        return self.settings.rtt_guess

    def mean_limit(self) -> float:
        """The connection count averaged over the time since the tuner started."""
        end = self._clock.monotonic() - self._started
        if end <= 0:
            return float(self._target)
        total, at, count = 0.0, 0.0, self._first_target
        for step in self.steps:
            total += count * (step.at - at)
            at, count = step.at, step.after
        return (total + count * (end - at)) / end

    # -- the loop ---------------------------------------------------------------------------------
    async def run(self) -> None:
        """Sample every ``sample_interval`` seconds until cancelled."""
        while True:
            await self._clock.sleep(self.settings.sample_interval)
            self.sample()

    def sample(self) -> None:
        """One step: note saturation, react to overload, close a settle or a window when due."""
        now = self._clock.monotonic()
        if self.limiter.overload_events != self._overloads_seen:
            self._overloads_seen = self.limiter.overload_events
            self._overloaded(now)
            return
        self._samples += 1
        limiter = self.limiter
        # Saturated: requests wait for a slot, or nearly every slot is busy (a download between its
        # last byte and its rename holds no slot, so "every slot" would miss busy windows).
        if limiter.waiting or limiter.in_flight >= limiter.limit - max(1, limiter.limit // 8):
            self._saturated += 1
        if self._phase == "first":
            # Nothing has answered yet (the plan is still being read, connections are opening):
            # the settle counts from the first response, not from the tuner's creation.
            if not self._ttfbs:
                return
            self._begin_settle(now)
            return
        if now < self._phase_end:
            return
        if self._phase == "settle":
            self._begin_window(now)
            return
        enough = self._bytes - self._window_bytes >= self.settings.window_bytes_per_conn * self._target
        if not enough and now - self._window_start < self.settings.window_max:
            return
        self._close_window(now)

    # -- phases -----------------------------------------------------------------------------------
    def _begin_settle(self, now: float) -> None:
        s = self.settings
        self._phase = "settle"
        self._phase_end = now + _clamp(s.settle_rtts * self.rtt, s.settle_min, s.settle_max)
        self._samples = self._saturated = 0

    def _begin_window(self, now: float) -> None:
        s = self.settings
        self._phase = "window"
        self._window_start = now
        self._window_bytes = self._bytes
        self._phase_end = now + _clamp(s.window_rtts * self.rtt, s.window_min, s.window_max)
        self._samples = self._saturated = 0
        self._ttfbs = []

    def _close_window(self, now: float) -> None:
        s = self.settings
        elapsed = max(now - self._window_start, 1e-9)
        rate = (self._bytes - self._window_bytes) / elapsed
        ttfb = statistics.median(self._ttfbs) if self._ttfbs else 0.0
        counted = self._samples > 0 and self._saturated >= s.saturated_share * self._samples
        if not counted or rate <= 0:
            # The work ran short (not the path), or nothing arrived at all (a stall, a pause after
            # Retry-After): nothing to learn about more connections. Measure again.
            self._begin_window(now)
            return
        if self._ttfbs:
            self._base_ttfb = ttfb if self._base_ttfb is None else min(self._base_ttfb, ttfb)
        inflated = bool(self._ttfbs) and ttfb > s.ttfb_inflation * self.rtt + s.ttfb_slack
        n = self._target
        self._best_per_conn = max(self._best_per_conn, rate / n)
        self._best_rate = max(self._best_rate, rate)
        if self.state == "probing":
            self._judge_climb(now, n, rate, ttfb, inflated)
        else:
            self._judge_hold(now, n, rate, ttfb, inflated)

    def _judge_climb(self, now: float, n: int, rate: float, ttfb: float, inflated: bool) -> None:
        s = self.settings
        prev = self._prev
        self._prev = (n, rate)
        if prev is None or prev[0] >= n:
            # The first window (or one after a step down): nothing to compare with yet.
            efficient = proportional = True
            gain = 1.0
        else:
            gain = rate / max(prev[1], 1e-9) - 1.0
            expected = n / prev[0] - 1.0
            efficient = gain >= s.efficiency * expected and gain >= s.min_gain
            proportional = gain >= 0.8 * expected
        if efficient and not inflated:
            if n >= s.maximum:
                if proportional:
                    self._hold(now, n, rate, ttfb, "at --max-connections, the politeness cap")
                else:  # the knee lies between the last two counts: no need for the whole cap
                    lower = prev[0] + 1 if prev is not None else s.minimum
                    knee = min(max(self._knee(), lower), n)
                    self._hold(now, knee, rate, ttfb, "the last step paid only in part")
                return
            # Doubling while each step pays in full, like slow start; smaller steps near the knee.
            factor = 2.0 if proportional else 1.5
            step = min(s.maximum, max(n + 1, math.ceil(n * factor)))
            self._set(now, step, rate, ttfb, "the rate still rises with more connections")
            return
        # The rate stopped rising in proportion (or the queue grew): the knee is at or below n.
        ceiling = n if (gain >= s.min_gain and prev is not None) else (prev[0] if prev else n)
        settled = min(max(self._knee(), s.minimum), ceiling, s.maximum)
        why = "the time to first byte inflated" if inflated else "more connections stopped paying"
        self._hold(now, settled, rate, ttfb, why)

    def _knee(self) -> int:
        """Connections the best rate needs at the best rate per connection, with headroom."""
        return math.ceil(self.settings.headroom * self._best_rate / max(self._best_per_conn, 1e-9))

    def _judge_hold(self, now: float, n: int, rate: float, ttfb: float, inflated: bool) -> None:
        s = self.settings
        self._inflated_windows = self._inflated_windows + 1 if inflated else 0
        if self._inflated_windows >= 2 and n > s.minimum:
            self._inflated_windows = 0
            fewer = max(s.minimum, math.floor(n * 0.75))
            self._set(now, fewer, rate, ttfb, "a queue builds at the bottleneck")
            self._hold_since = now
            return
        if now - self._hold_since >= s.reprobe_after and now >= self._quiet_until and n < s.maximum:
            self.state = "probing"
            self._prev = (n, rate)
            # The path may have changed since the last climb: judge this one on its own figures.
            self._best_rate, self._best_per_conn = rate, rate / n
            more = min(s.maximum, max(n + 1, math.ceil(n * 1.25)))
            self._set(now, more, rate, ttfb, "probing whether the path has room now")
            return
        self._begin_window(now)

    def _overloaded(self, now: float) -> None:
        """A 429/503: the limiter has already cut; take its limit, hold, and stay quiet a while."""
        cut = max(self.settings.minimum, min(self.limiter.limit, self._target))
        self._quiet_until = now + self.settings.overload_quiet
        self._prev = None
        self._hold(now, cut, 0.0, 0.0, "the archive answered 429/503")

    # -- changes ----------------------------------------------------------------------------------
    def _hold(self, now: float, n: int, rate: float, ttfb: float, why: str) -> None:
        self.state = "holding"
        self._hold_since = now
        self._inflated_windows = 0
        self._set(now, n, rate, ttfb, f"hold: {why}")

    def _set(self, now: float, n: int, rate: float, ttfb: float, why: str) -> None:
        before = self._target
        self._target = n
        self.limiter.retarget(n)
        step = TuneStep(now - self._started, before, n, rate, ttfb, why)
        self.steps.append(step)
        if self._on_step is not None:
            self._on_step(step)
        self._begin_settle(now)


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


__all__ = ["DEFAULT_MAX_CONNECTIONS", "DEFAULT_START", "ConcurrencyTuner", "TuneStep", "TunerSettings"]
