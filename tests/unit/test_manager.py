"""The run's orchestration, with the network replaced by a fake downloader (the real one is tested
on its own and end to end in tests/integration)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import ClassVar

import pytest
from astropy.table import Table

from engine.exceptions import EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, DiskFullError
from engine.manager import MirrorRun, TablePlan
from engine.manifest import Manifest
from engine.models import FileResult, FileStatus, PlanItem, VerifyLevel
from engine.plan.table import items_to_table
from engine.progress import Progress
from engine.settings import Settings


def make_items(n: int, *, size: int = 100) -> list[PlanItem]:
    return [
        PlanItem(url=f"http://127.0.0.1:1/file?uri=f{i:04d}_lc.fits", filename=f"f{i:04d}_lc.fits", size=size)
        for i in range(n)
    ]


def make_settings(tmp_path: Path, concurrency: int = 2) -> Settings:
    settings = Settings()
    settings.output.out_dir = tmp_path / "out"
    settings.output.layout = "flat"
    settings.output.fsync = False
    settings.fetch.concurrency = concurrency
    return settings


@contextlib.asynccontextmanager
async def fake_session(*_args, **_kwargs):
    yield None


class FakeDownloader:
    """Writes a file per item; fails the URLs in `failing`; can hold every fetch on a gate."""

    instances: ClassVar[list[FakeDownloader]] = []

    def __init__(self, *_args, failing=(), gate: asyncio.Event | None = None, local_error=None, **_kwargs):
        self.failing = set(failing)
        self.gate = gate
        self.local_error = local_error
        self.calls: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        FakeDownloader.instances.append(self)

    async def fetch(self, item: PlanItem, dest: Path, relpath: str) -> FileResult:
        self.calls.append(item.url)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.local_error is not None:
                raise self.local_error
            if item.url in self.failing:
                return FileResult(
                    item, FileStatus.FAILED, path=relpath, error="HTTP 404 Not Found", attempts=1
                )
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(b"x" * item.size)
            return FileResult(
                item,
                FileStatus.VERIFIED,
                path=relpath,
                nbytes=item.size,
                md5="0" * 32,
                level=VerifyLevel.SIZE,
            )
        finally:
            self.in_flight -= 1


def run(settings: Settings, items: list[PlanItem], **downloader_kwargs) -> tuple:
    FakeDownloader.instances.clear()
    mirror = MirrorRun(
        settings,
        TablePlan(items_to_table(items), page_size=7),
        session_factory=fake_session,
        downloader_factory=lambda *a, **k: FakeDownloader(*a, **{**k, **downloader_kwargs}),
        progress=Progress(bar=False),
        handle_signals=False,
    )
    outcome = asyncio.run(mirror.run())
    return outcome, FakeDownloader.instances[-1]


def test_a_full_run_verifies_every_file_and_a_second_run_skips_them_without_fetching(tmp_path):
    settings = make_settings(tmp_path)
    items = make_items(25)
    outcome, downloader = run(settings, items)
    assert (outcome.planned, outcome.downloaded, outcome.failed, outcome.exit_code) == (25, 25, 0, EXIT_OK)
    assert sorted(downloader.calls) == sorted(i.url for i in items)
    assert isinstance(outcome.results, Table) and len(outcome.results) == 25
    assert set(outcome.results["status"]) == {"verified"}
    entries = Manifest(settings.state_dir).load()
    assert {e.status for e in entries.values()} == {"verified"} and len(entries) == 25

    again, downloader = run(settings, items)
    assert downloader.calls == []
    assert (again.skipped, again.downloaded, again.exit_code) == (25, 0, EXIT_OK)
    assert set(again.results["action"]) == {"skipped"}


def test_a_failed_file_is_recorded_with_its_reason_and_retried_by_the_next_run(tmp_path):
    settings = make_settings(tmp_path)
    items = make_items(10)
    bad = items[3].url
    outcome, _ = run(settings, items, failing={bad})
    assert (outcome.downloaded, outcome.failed, outcome.exit_code) == (9, 1, EXIT_PARTIAL)
    row = outcome.results[list(outcome.results["url"]).index(bad)]
    assert row["status"] == "failed" and "404" in row["error"]
    assert Manifest(settings.state_dir).load()[bad].error == "HTTP 404 Not Found"

    again, downloader = run(settings, items)
    assert downloader.calls == [bad]
    assert (again.skipped, again.downloaded, again.exit_code) == (9, 1, EXIT_OK)


def test_a_hostile_file_name_is_refused_and_never_fetched(tmp_path):
    settings = make_settings(tmp_path)
    items = [*make_items(3), PlanItem(url="http://127.0.0.1:1/x", filename="../../etc/passwd", size=10)]
    outcome, downloader = run(settings, items)
    assert "http://127.0.0.1:1/x" not in downloader.calls
    assert outcome.failed == 1 and outcome.exit_code == EXIT_PARTIAL
    assert not (tmp_path / "etc").exists()


def test_the_queue_bounds_how_far_planning_runs_ahead_of_downloading(tmp_path):
    settings = make_settings(tmp_path, concurrency=3)
    gate = asyncio.Event()
    items = make_items(200)

    async def scenario():
        FakeDownloader.instances.clear()
        mirror = MirrorRun(
            settings,
            TablePlan(items_to_table(items), page_size=7),
            session_factory=fake_session,
            downloader_factory=lambda *a, **k: FakeDownloader(*a, gate=gate),
            progress=Progress(bar=False),
            handle_signals=False,
        )
        task = asyncio.create_task(mirror.run())
        for _ in range(50):
            await asyncio.sleep(0.01)
        planned_while_blocked = mirror.outcome.planned
        gate.set()
        outcome = await task
        return planned_while_blocked, outcome, FakeDownloader.instances[-1]

    planned_while_blocked, outcome, downloader = asyncio.run(scenario())
    # 3 in flight + 6 queued + at most one page of 7 being handed over.
    assert planned_while_blocked <= 3 + 2 * 3 + 7
    assert downloader.max_in_flight == 3
    assert outcome.downloaded == 200


def test_stop_interrupts_keeps_what_was_verified_and_reports_pending(tmp_path):
    settings = make_settings(tmp_path)
    items = make_items(30)

    async def scenario():
        gate = asyncio.Event()
        FakeDownloader.instances.clear()
        mirror = MirrorRun(
            settings,
            TablePlan(items_to_table(items)),
            session_factory=fake_session,
            downloader_factory=lambda *a, **k: FakeDownloader(*a, gate=gate),
            progress=Progress(bar=False),
            handle_signals=False,
        )
        task = asyncio.create_task(mirror.run())
        await asyncio.sleep(0.05)
        mirror.stop()
        return await task

    outcome = asyncio.run(scenario())
    assert outcome.interrupted and outcome.exit_code == EXIT_INTERRUPTED
    assert outcome.pending == 30 - outcome.downloaded - outcome.failed
    resumed, _ = run(settings, items)
    assert resumed.exit_code == EXIT_OK and resumed.downloaded + resumed.skipped == 30


def test_preflight_refuses_a_plan_larger_than_the_free_space_unless_forced(tmp_path):
    settings = make_settings(tmp_path)
    huge = [PlanItem(url="http://127.0.0.1:1/big", filename="big_lc.fits", size=1 << 60)]
    with pytest.raises(DiskFullError, match="free"):
        run(settings, huge)


def test_a_local_error_stops_the_run_and_propagates(tmp_path):
    settings = make_settings(tmp_path)
    with pytest.raises(DiskFullError, match="no space"):
        run(settings, make_items(5), local_error=DiskFullError("no space left on device", path=tmp_path))
