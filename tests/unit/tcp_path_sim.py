"""A fluid model of a bulk download over TCP, to drive the ConcurrencyTuner as a real run would.

The unit tests of the tuner hold slots and feed a rate per connection count; this model adds what
those leave out and what decides how much a search for the right count costs on a real path:
a new connection answers after two round trips (connect, request) and then grows its window from
ten segments, doubling every round trip (slow start) up to the per-connection cap; a kept-alive one
answers after one round trip with its window intact; all share the link in proportion to what they
would send; files of a given size are worked through by the connections the limiter allows.

It is the WAN harness's model limit (benchmarks/wan.py `model_limit`) made dynamic: no CPU cost,
no loss, no queueing delay. It runs on the tuner's injected clock in steps of `dt` seconds, so a
whole run of 300 files takes a fraction of a second and gives the same answer every time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from engine.fetch.autotune import ConcurrencyTuner, TunerSettings

MSS = 1448  # payload bytes per segment (the harness's advmss 1460 less timestamps)


@dataclass(frozen=True)
class PathModel:
    """A path: round-trip time (s), cap per connection and link (bytes/s; inf for none)."""

    rtt: float
    per_conn: float
    link: float

    @property
    def knee(self) -> float:
        """Connections that fill the link at the per-connection cap."""
        return self.link / self.per_conn


class SimLimiter:
    """What the tuner reads and steers of an AdaptiveLimiter, counted by the model."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.waiting = 0
        self.overload_events = 0
        self.peak = 0

    def retarget(self, limit: int) -> None:
        self.limit = limit


@dataclass
class _Conn:
    cwnd: float = 10.0 * MSS
    # the download on it: bytes left, the time its response arrives, whether it was reported
    left: float = 0.0
    answer_at: float = 0.0
    answered: bool = False
    ttfb: float = 0.0
    unreported: float = 0.0  # bytes received but not yet reported (the Downloader's blocks)


@dataclass
class SimResult:
    """One simulated run."""

    seconds: float
    ideal: float
    tuner: ConcurrencyTuner
    peak: int
    opened: int
    counts: list[tuple[float, int]] = field(default_factory=list)

    @property
    def efficiency(self) -> float:
        """The ideal time (the link or the cap at the settled count) over the run's time."""
        return self.ideal / self.seconds


def simulate(
    path: PathModel,
    files: int,
    size: float,
    settings: TunerSettings | None = None,
    *,
    fixed: int | None = None,
    jitter: float = 0.1,
    dt: float = 0.005,
    limit_s: float = 3600.0,
    seed: int = 1,
    block: float = 256 * 1024,
) -> SimResult:
    """Run `files` downloads of `size` bytes ± `jitter` over `path` with the tuner (or a `fixed`
    count). Sizes vary as the harness's files do; equal files would finish in lockstep and leave
    the link idle for a round trip between rounds, which real paths never do. Bytes reach the tuner
    in `block`s per download, and the rest at its end, as the Downloader reports them."""
    settings = settings or TunerSettings()
    rng = random.Random(seed)
    sizes = [size * (1 + jitter * (2 * rng.random() - 1)) for _ in range(files)]
    now = [0.0]

    class Clock:
        def monotonic(self) -> float:
            return now[0]

        def time(self) -> float:
            return now[0]

        async def sleep(self, seconds: float) -> None:  # pragma: no cover - run() is not used
            now[0] += seconds

    limiter = SimLimiter(fixed or settings.start)
    tuner = ConcurrencyTuner(limiter, settings, clock=Clock())  # type: ignore[arg-type]
    if fixed is not None:
        limiter.limit = fixed
    idle: list[_Conn] = []
    busy: list[_Conn] = []
    left_files = files
    opened = 0
    next_sample = settings.sample_interval
    counts = [(0.0, limiter.limit)]
    while (left_files or busy) and now[0] < limit_s:
        # Start downloads while the limiter allows (a worker waits for every file left).
        while left_files and len(busy) < limiter.limit:
            if idle:
                conn = idle.pop()
                conn.ttfb = path.rtt
            else:
                conn, opened = _Conn(), opened + 1
                conn.ttfb = 2 * path.rtt
            conn.left, conn.answer_at, conn.answered = sizes[left_files - 1], now[0] + conn.ttfb, False
            busy.append(conn)
            left_files -= 1
        limiter.in_flight = len(busy)
        limiter.peak = max(limiter.peak, len(busy))
        limiter.waiting = left_files if len(busy) >= limiter.limit else 0
        # Move the bytes of one step: each answered download at its window's rate, the link shared.
        sending = [c for c in busy if now[0] >= c.answer_at]
        for conn in sending:
            if not conn.answered:
                conn.answered = True
                tuner.add_first_byte(conn.ttfb)
        want = [min(path.per_conn, conn.cwnd / path.rtt) for conn in sending]
        total = sum(want)
        scale = min(1.0, path.link / total) if total > 0 else 1.0
        for conn, rate in zip(sending, want, strict=True):
            got = min(conn.left, rate * scale * dt)
            conn.left -= got
            conn.unreported += got
            if conn.left <= 0 or not block:
                tuner.add_bytes(int(conn.unreported))
                conn.unreported = 0.0
            while block and conn.unreported >= block:
                tuner.add_bytes(int(block))
                conn.unreported -= block
            if conn.cwnd / path.rtt < path.per_conn:
                conn.cwnd += got  # slow start: the window grows by what was acknowledged
        now[0] += dt
        for conn in [c for c in sending if c.left <= 0]:
            busy.remove(conn)
            idle.append(conn)
        if now[0] >= next_sample - 1e-9:
            next_sample += settings.sample_interval
            if fixed is None:
                before = limiter.limit
                tuner.sample()
                if limiter.limit != before:
                    counts.append((now[0], limiter.limit))
    settled = limiter.limit
    rate = min(path.link, settled * path.per_conn)
    return SimResult(now[0], sum(sizes) / rate, tuner, limiter.peak, opened, counts)
