"""The run's orchestration, with the network replaced by a fake downloader (the real one is tested
on its own and end to end in tests/integration)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import ClassVar

import pytest
from astropy.table import Table

from engine.exceptions import (
    EXIT_INTERRUPTED,
    EXIT_LOCAL,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    ConfigError,
    DiskFullError,
    TapJobError,
)
from engine.manager import (
    MirrorRun,
    ResourceExhaustedError,
    TablePlan,
    TapPlan,
    selection_fingerprint,
    summarize,
)
from engine.manifest import Manifest
from engine.models import FileResult, FileStatus, PlanItem, VerifyLevel
from engine.plan.table import PlanWriter, items_to_table, iter_plan, plan_meta
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
    assert Manifest(settings.state_dir).load()["path:f0003_lc.fits"].error == "HTTP 404 Not Found"

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
    huge = [PlanItem(url="http://127.0.0.1:1/big_lc.fits", filename="big_lc.fits", size=1 << 60)]
    with pytest.raises(DiskFullError, match="free"):
        run(settings, huge)


def test_a_local_error_stops_the_run_and_propagates(tmp_path):
    settings = make_settings(tmp_path)
    with pytest.raises(DiskFullError, match="no space"):
        run(settings, make_items(5), local_error=DiskFullError("no space left on device", path=tmp_path))


# -- planning runs at the archive's pace; lifecycle ---------------------------------------------
class FakePlanner:
    """Yields `pages` pages of `per_page` items, then optionally fails; counts what it produced."""

    def __init__(self, pages: int, per_page: int, *, fail_with: Exception | None = None) -> None:
        self.items = make_items(pages * per_page)
        self.per_page = per_page
        self.fail_with = fail_with
        self.yielded = 0
        self.statements = ["SELECT * FROM ivoa.obscore WHERE 1=1"]

    async def pages(self):
        for start in range(0, len(self.items), self.per_page):
            await asyncio.sleep(0)
            self.yielded += self.per_page
            yield self.items[start : start + self.per_page]
        if self.fail_with is not None:
            raise self.fail_with


def tap_run(settings: Settings, planner: FakePlanner, **downloader_kwargs) -> MirrorRun:
    FakeDownloader.instances.clear()
    source = TapPlan(planner, settings.state_dir / "plan.ecsv", {"selection_fingerprint": "f"})
    return MirrorRun(
        settings,
        source,
        session_factory=fake_session,
        downloader_factory=lambda *a, **k: FakeDownloader(*a, **{**k, **downloader_kwargs}),
        progress=Progress(bar=False),
        handle_signals=False,
    )


def test_planning_is_not_held_back_by_the_download_queue_and_the_plan_is_saved_when_it_ends(tmp_path):
    settings = make_settings(tmp_path, concurrency=2)
    planner = FakePlanner(pages=40, per_page=25)  # 1,000 files; the queue holds 4
    gate = asyncio.Event()
    plan = settings.state_dir / "plan.ecsv"

    async def scenario():
        mirror = tap_run(settings, planner, gate=gate)
        task = asyncio.create_task(mirror.run())
        deadline = asyncio.get_running_loop().time() + 60  # generous: this waits for progress
        while not mirror.progress.planning_done and asyncio.get_running_loop().time() < deadline:
            assert not task.done(), task
            await asyncio.sleep(0.01)  # until planning is done, while every download is held
        saved_while_blocked = plan.exists()
        total_while_blocked = (mirror.progress.planned, mirror.progress.planning_done)
        gate.set()
        return saved_while_blocked, total_while_blocked, await task

    saved, total, outcome = asyncio.run(scenario())
    assert saved, "the plan must be saved when planning ends, not when downloads do"
    assert total == (1000, True), "the progress total is right once planning is done"
    assert sum(1 for _ in iter_plan(plan)) == 1000
    assert plan_meta(plan)["adql"] == planner.statements, "the plan records the ADQL that made it"
    assert outcome.downloaded == 1000 and outcome.exit_code == EXIT_OK
    assert not list(settings.state_dir.glob(".plan.ecsv.*.tmp"))


def test_a_plan_that_fails_midway_is_never_saved_and_leaves_no_temp_file(tmp_path):
    settings = make_settings(tmp_path)
    planner = FakePlanner(pages=5, per_page=10, fail_with=TapJobError("the TAP job failed"))
    with pytest.raises(TapJobError):
        asyncio.run(tap_run(settings, planner).run())
    assert not (settings.state_dir / "plan.ecsv").exists()
    assert not list(settings.state_dir.glob(".plan.ecsv.*.tmp"))
    assert not (settings.state_dir / "run.lock").exists()


def test_stale_plan_temp_files_are_removed_once_the_lock_is_held(tmp_path):
    settings = make_settings(tmp_path)
    settings.state_dir.mkdir(parents=True)
    stale = settings.state_dir / ".plan.ecsv.abc123.tmp"
    stale.write_text("left by a kill")
    outcome, _ = run(settings, make_items(3))
    assert outcome.exit_code == EXIT_OK and not stale.exists()


@pytest.mark.parametrize("token", ["abc\r", "abc def", "abc\n", "abc\x1b[0m"])
def test_a_token_with_control_characters_is_refused_before_anything_starts(tmp_path, monkeypatch, token):
    settings = make_settings(tmp_path)
    monkeypatch.setenv("MAST_API_TOKEN", token)
    with pytest.raises(ConfigError) as caught:
        run(settings, make_items(3))
    assert caught.value.exit_code == EXIT_USAGE
    assert "MAST_API_TOKEN" in str(caught.value) and "abc" not in str(caught.value)
    assert not settings.output.out_dir.exists(), "nothing is created for a run that cannot start"


def test_cancelling_the_run_flushes_the_manifest_and_releases_the_lock(tmp_path):
    """The Python API installs no handlers: a notebook's interrupt cancels the task."""
    settings = make_settings(tmp_path)
    items = make_items(30)

    async def scenario():
        gate = asyncio.Event()
        FakeDownloader.instances.clear()
        mirror = MirrorRun(
            settings,
            TablePlan(items_to_table(items)),
            session_factory=fake_session,
            downloader_factory=lambda *a, **k: FakeDownloader(*a, gate=gate, failing={items[0].url}),
            progress=Progress(bar=False),
            handle_signals=False,
        )
        task = asyncio.create_task(mirror.run())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert not (settings.state_dir / "run.lock").exists()
    assert not list(settings.output.out_dir.rglob("run.lock"))
    Manifest(settings.state_dir).load()
    resumed, _ = run(settings, items)
    assert resumed.downloaded + resumed.skipped == 30


@pytest.mark.parametrize(
    "error",
    [MemoryError(), RuntimeError("can't start new thread"), OSError(12, "Cannot allocate memory")],
    ids=["MemoryError", "no thread", "ENOMEM"],
)
def test_running_out_of_memory_or_threads_stops_the_run_with_exit_4(tmp_path, error):
    settings = make_settings(tmp_path)
    with pytest.raises(ResourceExhaustedError) as caught:
        run(settings, make_items(5), local_error=error)
    assert caught.value.exit_code == EXIT_LOCAL
    assert "\n" not in caught.value.message
    assert not list(settings.output.out_dir.rglob("run.lock"))
    Manifest(settings.state_dir).load()


def test_every_source_goes_through_the_plan_guard_duplicates_merged_conflicts_failed(tmp_path):
    """A saved plan or URL list gets the same invariants as a TAP plan: one row per destination."""
    settings = make_settings(tmp_path)
    items = make_items(4)
    twin = PlanItem(url=items[0].url + "&mirror=2", filename=items[0].filename, size=items[0].size)
    rival = PlanItem(url=items[1].url + "&mirror=2", filename=items[1].filename, size=items[1].size + 1)
    nowhere = PlanItem(url="ftp://127.0.0.1/f_lc.fits", filename="f_lc.fits", size=10)
    outcome, downloader = run(settings, [*items, twin, rival, nowhere])
    assert sorted(downloader.calls) == sorted(i.url for i in items), "one download per destination"
    assert (outcome.merged, outcome.dropped, outcome.failed) == (1, 1, 1)
    assert Manifest(settings.state_dir).load()[f"url:{rival.url}"].status == "failed"
    assert any("1 duplicate rows merged, 1 unusable rows dropped" in line for line in summarize(outcome))


def test_a_resumed_run_knows_the_saved_plans_total_before_the_downloads_reach_it(tmp_path):
    settings = make_settings(tmp_path, concurrency=2)
    settings.state_dir.mkdir(parents=True)
    writer = PlanWriter(
        settings.state_dir / "plan.ecsv", meta={"selection_fingerprint": selection_fingerprint(settings)}
    )
    writer.write(make_items(300))
    writer.commit()
    gate = asyncio.Event()

    async def scenario():
        FakeDownloader.instances.clear()
        mirror = MirrorRun(
            settings,
            session_factory=fake_session,
            downloader_factory=lambda *a, **k: FakeDownloader(*a, gate=gate),
            progress=Progress(bar=False),
            handle_signals=False,
        )
        task = asyncio.create_task(mirror.run())
        deadline = asyncio.get_running_loop().time() + 60
        while not mirror.progress.planning_done and asyncio.get_running_loop().time() < deadline:
            assert not task.done(), task
            await asyncio.sleep(0.01)
        total = mirror.progress.planned
        gate.set()
        return total, await task

    total, outcome = asyncio.run(scenario())
    assert total == 300, "the whole total is shown while every download is still held"
    assert outcome.planned == 300 and outcome.downloaded == 300
