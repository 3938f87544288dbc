"""ConcurrencyTuner (`--concurrency auto`) against modelled paths, on a fake clock.

Each test holds real slots of a real AdaptiveLimiter with more workers than the tuner may ever
allow, so the limiter is saturated the way a run with a long plan is. A modelled path turns the
connections in flight into bytes and a time to first byte: the tests check where the tuner settles,
not how fast anything runs.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from engine.fetch.autotune import DEFAULT_MAX_CONNECTIONS, ConcurrencyTuner, TunerSettings
from engine.fetch.throttle import AdaptiveLimiter
from tests.helpers import FakeClock

MB = 1e6


@dataclass
class Path:
    """Rate = min(connections × per_conn, link); the first byte waits rtt, plus a queue past the knee."""

    per_conn: float
    link: float
    rtt: float = 0.1
    queue_past_knee: float = 0.0  # seconds of extra first-byte delay once the link is full

    def rate(self, conns: int) -> float:
        return min(conns * self.per_conn, self.link)

    def ttfb(self, conns: int) -> float:
        return self.rtt + (self.queue_past_knee if conns * self.per_conn > self.link else 0.0)


class Rig:
    """A limiter saturated by `workers` tasks that hold their slots, a tuner, a clock, a path."""

    def __init__(self, path: Path, settings: TunerSettings | None = None, workers: int = 80) -> None:
        self.clock = FakeClock()
        self.limiter = AdaptiveLimiter(64, clock=self.clock)
        self.tuner = ConcurrencyTuner(self.limiter, settings, clock=self.clock)
        self.path = path
        self.workers = workers
        self.release = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.peak = 0

    async def __aenter__(self) -> Rig:
        async def hold() -> None:
            async with self.limiter.slot():
                await self.release.wait()

        self.tasks = [asyncio.create_task(hold()) for _ in range(self.workers)]
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await asyncio.gather(*self.tasks)

    async def drive(self, seconds: float, until: Callable[[], bool] | None = None) -> None:
        """Advance the clock in sample steps, feeding what the path delivers at the connections in flight."""
        dt = self.tuner.settings.sample_interval
        for _ in range(round(seconds / dt)):
            conns = min(self.limiter.in_flight, self.limiter.limit)
            self.peak = max(self.peak, self.limiter.in_flight)
            self.clock.now += dt
            self.tuner.add_bytes(int(self.path.rate(conns) * dt))
            for _ in range(max(1, conns // 4)):
                self.tuner.add_first_byte(self.path.ttfb(conns))
            self.tuner.sample()
            await asyncio.sleep(0)  # let woken waiters take their slots
            if until is not None and until():
                return


def run(coro) -> None:
    asyncio.run(coro)


def test_climbs_to_the_knee_of_a_link_bound_path_and_holds_there() -> None:
    async def main() -> None:
        # 4.19 MB/s per connection, 46.8 MB/s link (the WAN harness's defaults): 12 connections fill it.
        async with Rig(Path(per_conn=4.19 * MB, link=46.8 * MB)) as rig:
            await rig.drive(25)  # less than reprobe_after (30 s)
            knee = math.ceil(46.8 / 4.19)
            assert rig.tuner.state == "holding"
            assert knee <= rig.tuner.limit <= math.ceil(1.1 * knee) + 1
            assert rig.limiter.limit == rig.tuner.limit
            assert rig.peak <= 16  # it tried 16 once, never more
            assert [(s.before, s.after) for s in rig.tuner.steps] == [(8, 16), (16, rig.tuner.limit)]
            await rig.drive(30)  # one probe above the knee gains nothing: back to the same count
            assert rig.tuner.limit == rig.tuner.steps[1].after
            assert "probing" in rig.tuner.steps[2].reason

    run(main())


def test_climbs_to_max_connections_when_the_connections_are_the_limit() -> None:
    async def main() -> None:
        # 1 MiB/s per connection, 400 Mbit/s: 45 connections would be needed; the cap is 32.
        async with Rig(Path(per_conn=1.05 * MB, link=46.8 * MB)) as rig:
            await rig.drive(60)
            assert rig.tuner.limit == DEFAULT_MAX_CONNECTIONS
            assert rig.tuner.state == "holding"
            assert "politeness cap" in rig.tuner.steps[-1].reason
            assert rig.peak == DEFAULT_MAX_CONNECTIONS  # never above the cap

    run(main())


def test_holds_its_start_when_more_connections_bring_nothing() -> None:
    async def main() -> None:
        # A CPU-bound client: the rate is the same at any count.
        async with Rig(Path(per_conn=100 * MB, link=50 * MB)) as rig:
            await rig.drive(30)
            assert rig.tuner.state == "holding"
            assert rig.tuner.limit == 8  # tried 16, gained nothing, went back
            assert [s.after for s in rig.tuner.steps] == [16, 8]

    run(main())


def test_a_time_to_first_byte_that_inflates_stops_the_climb() -> None:
    async def main() -> None:
        # The rate would still rise a little past the knee, but a queue builds (bufferbloat).
        path = Path(per_conn=2 * MB, link=28 * MB, rtt=0.05, queue_past_knee=0.2)
        async with Rig(path) as rig:
            await rig.drive(40)
            assert rig.tuner.state == "holding"
            assert rig.tuner.limit <= 16
            assert any("inflated" in s.reason for s in rig.tuner.steps)

    run(main())


def test_an_overload_cuts_at_once_and_quiets_the_climb() -> None:
    async def main() -> None:
        settings = TunerSettings(overload_quiet=60.0, reprobe_after=30.0)
        async with Rig(Path(per_conn=1.05 * MB, link=100 * MB), settings) as rig:
            await rig.drive(20, until=lambda: rig.tuner.limit >= 16)
            before = rig.limiter.limit
            rig.limiter.on_overload(None)  # a 429 from the archive: the limiter halves at once
            assert rig.limiter.limit == before // 2
            await rig.drive(1)
            assert rig.tuner.limit == before // 2
            assert "429/503" in rig.tuner.steps[-1].reason
            await rig.drive(55)  # inside the quiet period: no climbing
            assert rig.tuner.limit == before // 2
            assert rig.limiter.limit == before // 2
            await rig.drive(40)  # after it: the tuner probes again, and the path has room
            assert rig.tuner.limit > before // 2

    run(main())


def test_windows_where_the_work_ran_short_are_not_judged() -> None:
    async def main() -> None:
        # Only 5 downloads to do: the limit of 8 is never the bound, so nothing can be learned.
        async with Rig(Path(per_conn=4 * MB, link=400 * MB), workers=5) as rig:
            await rig.drive(30)
            assert rig.tuner.steps == []
            assert rig.tuner.limit == 8

    run(main())


def test_holding_gives_back_connections_when_a_queue_builds() -> None:
    async def main() -> None:
        path = Path(per_conn=4 * MB, link=44 * MB, rtt=0.05)
        async with Rig(path, TunerSettings(reprobe_after=1000.0)) as rig:
            await rig.drive(30)
            held = rig.tuner.limit
            assert rig.tuner.state == "holding"
            # Someone else's traffic now fills the bottleneck's queue: the first byte takes 4× longer.
            path.rtt = 0.2
            await rig.drive(20)
            assert rig.tuner.limit < held
            assert "queue builds" in rig.tuner.steps[-1].reason

    run(main())


def test_holding_probes_again_and_follows_a_path_that_got_faster() -> None:
    async def main() -> None:
        path = Path(per_conn=4 * MB, link=40 * MB)
        async with Rig(path, TunerSettings(reprobe_after=20.0)) as rig:
            await rig.drive(30)
            held = rig.tuner.limit
            path.link = 120 * MB  # the link got faster; more connections now pay
            await rig.drive(90)
            assert rig.tuner.limit > held
            assert any("probing" in s.reason for s in rig.tuner.steps)
            assert rig.tuner.limit <= DEFAULT_MAX_CONNECTIONS

    run(main())


def test_the_start_is_applied_to_the_limiter_and_bounded_by_the_cap() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(64, clock=clock)
    tuner = ConcurrencyTuner(limiter, TunerSettings(start=50, maximum=24), clock=clock)
    assert tuner.limit == 24 and limiter.limit == 24 and limiter.ceiling == 24


def test_bad_tuner_settings_are_refused_with_the_value() -> None:
    with pytest.raises(ValueError, match="max connections 0"):
        TunerSettings(maximum=0)
    with pytest.raises(ValueError, match="minimum connections 9"):
        TunerSettings(minimum=9, maximum=8)
    with pytest.raises(ValueError, match="start connections 0"):
        TunerSettings(start=0)


def test_run_samples_on_the_clock_until_cancelled() -> None:
    async def main() -> None:
        clock = FakeClock()
        limiter = AdaptiveLimiter(8, clock=clock)
        tuner = ConcurrencyTuner(limiter, TunerSettings(sample_interval=0.5), clock=clock)
        task = asyncio.create_task(tuner.run())
        while clock.now < 5.0:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert clock.now >= 5.0

    run(main())


def test_mean_limit_weighs_each_count_by_the_time_it_was_in_force() -> None:
    async def main() -> None:
        async with Rig(Path(per_conn=100 * MB, link=50 * MB)) as rig:
            await rig.drive(30)
            (up, down) = rig.tuner.steps  # 8 until the first step, 16 until the second, then 8
            expected = (8 * up.at + 16 * (down.at - up.at) + 8 * (30 - down.at)) / 30
            assert rig.tuner.mean_limit() == pytest.approx(expected)

    run(main())


def test_a_slot_or_two_free_between_downloads_still_counts_as_saturated() -> None:
    async def main() -> None:
        # 15 busy of 16 slots (one download is being renamed): the window is judged, and the tuner climbs.
        settings = TunerSettings(start=16)
        async with Rig(Path(per_conn=1 * MB, link=100 * MB), settings, workers=15) as rig:
            await rig.drive(5)
            assert rig.tuner.steps and rig.tuner.steps[0].before == 16

    run(main())


def test_a_window_in_which_nothing_arrived_is_not_taken_for_a_rate() -> None:
    async def main() -> None:
        stalled = Path(per_conn=0.0, link=0.0)  # every connection open, no byte comes
        async with Rig(stalled) as rig:
            await rig.drive(20)
            assert rig.tuner.steps == [] and rig.tuner.limit == 8

    run(main())


def test_a_step_to_the_cap_that_pays_only_in_part_settles_below_the_cap() -> None:
    async def main() -> None:
        # 1.8 MB/s per connection, 46.8 MB/s link: 26 connections fill it; 16 -> 32 gains 62 %.
        async with Rig(Path(per_conn=1.8 * MB, link=46.8 * MB)) as rig:
            await rig.drive(25)
            assert rig.tuner.state == "holding"
            assert math.ceil(46.8 / 1.8) <= rig.tuner.limit < DEFAULT_MAX_CONNECTIONS
            assert "only in part" in rig.tuner.steps[-1].reason

    run(main())


def test_a_new_climb_judges_the_knee_on_the_path_as_it_is_now() -> None:
    async def main() -> None:
        path = Path(per_conn=4.19 * MB, link=46.8 * MB)
        async with Rig(path, TunerSettings(reprobe_after=20.0)) as rig:
            await rig.drive(20)
            assert rig.tuner.limit <= 16 and rig.tuner.state == "holding"
            path.per_conn = 2.0 * MB  # each connection now gets half: the link needs 24 of them
            await rig.drive(60)
            assert rig.tuner.state == "holding"
            assert math.ceil(46.8 / 2.0) <= rig.tuner.limit <= DEFAULT_MAX_CONNECTIONS

    run(main())
