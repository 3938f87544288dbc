"""engine.progress: the bar and batch lines tell the truth; the plan's summary; the free-space verdict."""

from __future__ import annotations

import io
import logging

import pytest

from engine.models import FileResult, FileStatus, PlanItem
from engine.progress import (
    PLANNING,
    PlanSummary,
    Progress,
    free_space_verdict,
    human_seconds,
)
from tests.helpers import FakeClock


class FakeLimiter:
    def __init__(self, limit: int, ceiling: int, events: int = 0, decreases: int = 0) -> None:
        self.limit, self.ceiling = limit, ceiling
        self.overload_events, self.decreases = events, decreases


def item(name: str = "tess-s0001-0000000000000001-s_lc.fits", **fields) -> PlanItem:
    return PlanItem(url=f"http://127.0.0.1/{name}", filename=name, **fields)


def verified(nbytes: int = 1000, attempts: int = 1) -> FileResult:
    return FileResult(item(), FileStatus.VERIFIED, nbytes=nbytes, attempts=attempts)


def test_a_line_before_planning_ends_shows_no_total_but_the_count_so_far():
    clock = FakeClock(now=100.0)
    progress = Progress(bar=False, clock=clock)
    progress.planned_items(120, 10**6)
    progress.file_done(verified())
    clock.now += 10
    line = progress.line()
    assert line.startswith(f"1/? ({PLANNING} 120 found so far) files")
    assert "ETA" not in line  # no ETA against a total that is still growing


def test_once_planning_ends_the_line_has_the_total_bytes_and_an_eta():
    clock = FakeClock(now=100.0)
    progress = Progress(bar=False, clock=clock)
    progress.planned_items(10, 10_000)
    progress.plan_complete()
    for _ in range(5):
        progress.file_done(verified(1000))
    clock.now += 50  # 5 files in 50 s: 5 more take 50 s
    line = progress.line()
    assert line.startswith("5/10 files (5 downloaded")
    assert "5.0 kB of 10.0 kB at 100 B/s" in line
    assert "ETA 50 s" in line


def test_retries_are_counted_from_attempts_and_shown_and_summarised(caplog):
    progress = Progress(bar=False, clock=FakeClock(now=100.0))
    progress.plan_complete()
    with caplog.at_level(logging.DEBUG, logger="engine.progress"):
        progress.file_done(verified(attempts=3))
        progress.file_done(verified(attempts=1))
    assert progress.retries == 2 and progress.files_retried == 1
    assert "2 retries" in progress.line()
    assert any(r.levelno == logging.DEBUG and "verified after 3 tries" in r.message for r in caplog.records)
    assert "retries     2 (on 1 files)" in progress.summary_lines()


def test_the_connection_limit_shows_only_while_the_overload_policy_has_cut_it():
    progress = Progress(bar=False, clock=FakeClock(now=100.0))
    limiter = FakeLimiter(16, 16)
    progress.attach_limiter(limiter)
    assert "limit" not in progress.line()
    limiter.limit, limiter.overload_events, limiter.decreases = 4, 7, 2
    assert "limit 4/16 connections" in progress.line()
    assert any("429/503 answers 7, slow-downs 2" in line for line in progress.summary_lines())


def test_the_mean_rate_is_over_the_whole_run():
    clock = FakeClock(now=100.0)
    progress = Progress(bar=False, clock=clock)
    progress.file_done(verified(2_000_000))
    clock.now += 4
    progress.close()
    clock.now += 100  # after close: the rate no longer falls
    assert progress.summary_lines()[0] == "mean rate   500.0 kB/s over 4 s"


def test_the_bar_says_planning_until_the_total_is_known_then_gets_the_total():
    stream = io.StringIO()
    progress = Progress(bar=True, stream=stream, clock=FakeClock(now=100.0))
    progress.planned_items(7, 0)
    assert progress._bar is not None and progress._bar.total is None
    assert f"{PLANNING} 7 found" in progress._bar.desc
    progress.plan_complete()
    assert progress._bar.total == 7 and progress._bar.desc.startswith("mirror")
    progress.close()


def test_the_plan_summary_counts_files_bytes_products_and_sectors():
    summary = PlanSummary()
    summary.add(
        [
            item("a", product="lc", sector=1, size=1000),
            item("b", product="lc", sector=2, est_kb=2),
            item("c", product="tp", sector=1),
        ]
    )
    lines = summary.lines(guard_line="plan: 3 files, 1 rows dropped (no URL: 1)")
    assert "files       3" in lines
    assert "bytes       3.0 kB (with 1 sizes estimated from access_estsize)" in lines
    assert "            1 files declare no size and are not counted" in lines
    assert "products    lc 2, tp 1" in lines
    assert "sectors     s0001 2, s0002 1" in lines
    assert lines[-1].startswith("plan: 3 files")


@pytest.mark.parametrize(
    ("needed", "free", "fits", "words"),
    [(10, 100, True, "fits"), (200, 100, False, "does NOT fit"), (10, 1 << 62, True, "unknown")],
)
def test_the_free_space_verdict(needed, free, fits, words):
    ok, line = free_space_verdict(needed, free, "/data")
    assert ok is fits and words in line and line.startswith("free space  ")


def test_human_seconds():
    assert [human_seconds(s) for s in (45, 600, 7200)] == ["45 s", "10.0 min", "2.0 h"]
