"""The run's orchestration, with the network replaced by a fake downloader (the real one is tested
on its own and end to end in tests/integration)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import zlib
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
from engine.fetch.throttle import download_workers
from engine.manager import MirrorRun, ResourceExhaustedError, summarize
from engine.manifest import Manifest, RunLock, file_key
from engine.models import FileResult, FileStatus, PlanItem, VerifyLevel
from engine.plan.invariants import PlanGuard
from engine.plan.sources import ItemsPlan, TablePlan, TapPlan, selection_fingerprint
from engine.plan.table import PlanWriter, items_to_table, iter_plan, plan_meta
from engine.progress import Progress
from engine.settings import Settings
from engine.shard import Shard


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

    def __init__(
        self,
        *_args,
        failing=(),
        gate: asyncio.Event | None = None,
        local_error=None,
        throttle=None,
        **_kwargs,
    ):
        self.failing = set(failing)
        self.throttle = throttle  # held around the request, as the real Downloader holds its slot
        self.gate = gate
        self.local_error = local_error
        self.calls: list[str] = []
        self.in_flight = 0  # requests (inside the limiter's slot)
        self.max_in_flight = 0
        self.in_hand = 0  # files a worker holds, whether requesting or not
        self.max_in_hand = 0
        FakeDownloader.instances.append(self)

    async def fetch(self, item: PlanItem, dest: Path, relpath: str) -> FileResult:
        self.calls.append(item.url)
        self.in_hand += 1
        self.max_in_hand = max(self.max_in_hand, self.in_hand)
        try:
            if self.throttle is None:
                return await self._fetch(item, dest, relpath)
            async with self.throttle.slot():
                return await self._fetch(item, dest, relpath)
        finally:
            self.in_hand -= 1

    async def _fetch(self, item: PlanItem, dest: Path, relpath: str) -> FileResult:
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
            downloader_factory=lambda *a, **k: FakeDownloader(*a, gate=gate, throttle=k["throttle"]),
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
    # 5 workers (3 requesting, 2 spare for files being committed) + 10 queued + at most one page
    # of 7 being handed over.
    workers = download_workers(3)
    assert workers == 5
    assert planned_while_blocked <= workers + 2 * workers + 7
    assert downloader.max_in_flight == 3  # requests: the connections, never more
    assert downloader.max_in_hand == workers
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


def test_a_plan_past_half_the_free_space_holds_its_downloads_until_its_size_is_known(tmp_path, monkeypatch):
    """Pages of 7 files of 100 B against 2,500 B free: the first page (700 B) starts at once, the
    second passes half the free space and waits, the fourth passes the free space: refused, and no
    file of the held pages was fetched (the disk never fills before the preflight speaks)."""
    monkeypatch.setattr("engine.manager._free_bytes", lambda _path: 2_500)
    items = make_items(30)
    with pytest.raises(DiskFullError, match=r"needs at least 2\.8 kB but only 2\.5 kB is free"):
        run(make_settings(tmp_path), items)
    fetched = set(FakeDownloader.instances[-1].calls)
    assert fetched <= {item.url for item in items[:7]}


def test_a_plan_that_fits_but_passes_half_the_free_space_is_downloaded_whole(tmp_path, monkeypatch):
    monkeypatch.setattr("engine.manager._free_bytes", lambda _path: 4_000)  # 3,000 B planned
    outcome, downloader = run(make_settings(tmp_path), make_items(30))
    assert (outcome.downloaded, outcome.exit_code) == (30, EXIT_OK)
    assert len(downloader.calls) == 30


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


# -- existing data: file identity, changed and withdrawn files, adoption ---------------------------
def fits_like(size: int, fill: bytes = b" ") -> bytes:
    """Bytes that pass the FITS sniff (the size and md5 are what these tests vary)."""
    return (b"SIMPLE  =" + fill * size)[:size]


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def obs_items(n: int, *, size: int = 2880) -> list[PlanItem]:
    data = fits_like(size)
    return [
        PlanItem(
            url=f"http://127.0.0.1:1/api/v0.1/Download/file?uri=mast:TESS/product/f{i:04d}_lc.fits",
            filename=f"f{i:04d}_lc.fits",
            obs_id=f"obs{i:04d}",
            size=size,
            md5=md5_hex(data),
        )
        for i in range(n)
    ]


class ContentDownloader(FakeDownloader):
    """Writes the archive's bytes for each file (`content[filename]`, else `fits_like(size)`)."""

    content: ClassVar[dict[str, bytes]] = {}
    on_fetch: ClassVar[list] = []  # callables run at each fetch (to look at the state mid-run)

    async def fetch(self, item: PlanItem, dest: Path, relpath: str) -> FileResult:
        self.calls.append(item.url)
        for hook in self.on_fetch:
            hook(item)
        data = self.content.get(item.filename, fits_like(item.size))
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")  # as the real Downloader: a new file renamed over
        part.write_bytes(data)
        part.replace(dest)
        return FileResult(
            item,
            FileStatus.VERIFIED,
            path=relpath,
            nbytes=len(data),
            md5=md5_hex(data),
            level=VerifyLevel.SIZE,
        )


def run_content(settings: Settings, items: list[PlanItem], **run_kwargs) -> tuple:
    FakeDownloader.instances.clear()
    mirror = MirrorRun(
        settings,
        TablePlan(items_to_table(items), page_size=3),
        session_factory=fake_session,
        downloader_factory=lambda *a, **k: ContentDownloader(*a, **k),
        progress=Progress(bar=False),
        handle_signals=False,
        **run_kwargs,
    )
    outcome = asyncio.run(mirror.run())
    return outcome, FakeDownloader.instances[-1]


@pytest.fixture
def content_settings(tmp_path: Path) -> Settings:
    ContentDownloader.content = {}
    ContentDownloader.on_fetch = []
    settings = make_settings(tmp_path)
    settings.verify.level = VerifyLevel.SIZE
    return settings


def test_a_new_url_for_a_verified_file_is_the_same_file_and_is_not_fetched_again(content_settings):
    items = obs_items(5)
    outcome, _ = run_content(content_settings, items)
    assert outcome.downloaded == 5
    moved = [
        PlanItem(
            **{**{f: getattr(i, f) for f in i.__slots__}, "url": f"http://127.0.0.1:2/files/tid/{i.filename}"}
        )
        for i in items
    ]
    outcome, downloader = run_content(content_settings, moved)
    assert downloader.calls == []
    assert (outcome.skipped, outcome.downloaded, outcome.exit_code) == (5, 0, EXIT_OK)
    assert set(Manifest(content_settings.state_dir).load()) == {
        f"obs{i:04d}/f{i:04d}_lc.fits" for i in range(5)
    }


def test_a_reprocessed_file_is_fetched_again_its_old_copy_kept_and_a_withdrawn_one_listed(content_settings):
    settings = content_settings
    items = obs_items(4)
    run_content(settings, items)
    out = settings.output.out_dir
    old = {i.filename: (out / i.filename).read_bytes() for i in items}
    # The archive reprocesses two files (new bytes, new size and md5) and withdraws the last one.
    new_bytes = {i.filename: fits_like(5760, b"R") for i in items[:2]}
    ContentDownloader.content = new_bytes
    refreshed = [
        PlanItem(
            **{**{f: getattr(i, f) for f in i.__slots__}, "size": 5760, "md5": md5_hex(new_bytes[i.filename])}
        )
        for i in items[:2]
    ] + [items[2]]
    outcome, downloader = run_content(settings, refreshed)
    assert sorted(downloader.calls) == sorted(i.url for i in items[:2])
    assert (outcome.changed, outcome.new, outcome.unchanged, outcome.withdrawn) == (2, 0, 1, 1)
    for item in items[:2]:
        assert (out / item.filename).read_bytes() == new_bytes[item.filename]
        assert (settings.state_dir / "superseded" / item.filename).read_bytes() == old[item.filename]
    gone = items[3]
    assert (out / gone.filename).read_bytes() == old[gone.filename]  # withdrawn: listed, never deleted
    assert outcome.withdrawn_keys == [f"{gone.obs_id}/{gone.filename}"]
    listed = (settings.state_dir / "withdrawn.txt").read_text().splitlines()
    assert listed[1:] == [f"{gone.obs_id}/{gone.filename}"]
    lines = list(summarize(outcome))
    assert any(line.startswith("withdrawn   1") and gone.filename in line for line in lines)
    assert any("changed 2" in line for line in lines)


def test_files_renamed_into_place_before_the_lost_manifest_batch_are_adopted_not_fetched(content_settings):
    settings = content_settings
    items = obs_items(6)
    run_content(settings, items)
    manifest = settings.state_dir / "manifest.jsonl"
    # What a kill -9 between the renames and the batch's flush leaves: fewer records than files.
    manifest.write_bytes(b"".join(manifest.read_bytes().splitlines(keepends=True)[:2]))
    out = settings.output.out_dir
    before = {i.filename: (out / i.filename).stat() for i in items}
    outcome, downloader = run_content(settings, items)
    assert downloader.calls == []
    assert (outcome.skipped, outcome.adopted, outcome.downloaded, outcome.exit_code) == (2, 4, 0, EXIT_OK)
    for item in items:  # verified in place: the same inode, untouched
        after = (out / item.filename).stat()
        assert (after.st_ino, after.st_mtime_ns) == (
            before[item.filename].st_ino,
            before[item.filename].st_mtime_ns,
        )
    entries = Manifest(settings.state_dir).load()
    assert {e.status for e in entries.values()} == {"verified"} and len(entries) == 6
    assert sum(e.origin == "adopted" for e in entries.values()) == 4
    assert all(
        e.md5 == items[0].md5 and e.level == "checksum" for e in entries.values() if e.origin == "adopted"
    )


def test_a_file_in_place_that_fails_its_checks_is_quarantined_then_fetched(content_settings):
    settings = content_settings
    items = obs_items(3)
    run_content(settings, items)
    (settings.state_dir / "manifest.jsonl").unlink()
    out = settings.output.out_dir
    bad = out / items[1].filename
    bad.write_bytes(fits_like(2880, b"X"))  # the right size, the wrong md5
    outcome, downloader = run_content(settings, items)
    assert downloader.calls == [items[1].url]
    assert (outcome.adopted, outcome.downloaded, outcome.quarantined) == (2, 1, 1)
    assert (settings.state_dir / "quarantine" / items[1].filename).read_bytes() == fits_like(2880, b"X")
    assert bad.read_bytes() == fits_like(2880)


def test_only_files_with_something_at_their_place_are_looked_at_before_their_download(
    content_settings, monkeypatch
):
    """The producer's lstat per page finds the empty places; their files skip the adoption hop.
    A file already in place, a symlink, a seed tree: each is still looked at (and adopted or not)."""
    settings = content_settings
    items = obs_items(9)
    out = settings.output.out_dir
    out.mkdir(parents=True)
    (out / items[2].filename).write_bytes(fits_like(2880))  # good: adopted
    (out / items[5].filename).symlink_to(out / "elsewhere")  # a dangling link: not empty, looked at
    looked: list[str] = []
    adopt = MirrorRun._adopt

    def spy(self, item, relpath, dest):
        looked.append(item.filename)
        return adopt(self, item, relpath, dest)

    monkeypatch.setattr(MirrorRun, "_adopt", spy)
    outcome, downloader = run_content(settings, items)
    assert sorted(looked) == [items[2].filename, items[5].filename]
    assert (outcome.adopted, outcome.downloaded, outcome.exit_code) == (1, 8, EXIT_OK)
    assert items[2].url not in downloader.calls
    assert not (out / items[5].filename).is_symlink()  # replaced by the verified download

    looked.clear()
    seeds = settings.output.out_dir.parent / "seeds"
    seeds.mkdir()
    (settings.state_dir / "manifest.jsonl").unlink()
    for item in items:
        (out / item.filename).unlink()
    outcome, downloader = run_content(settings, items[:3], adopt_from=[seeds])
    assert sorted(looked) == sorted(item.filename for item in items[:3])  # seed trees: always looked in


def test_a_file_on_disk_with_nothing_declared_to_check_it_against_is_fetched(content_settings):
    item = PlanItem(url="http://127.0.0.1:1/files/x_lc.fits", filename="x_lc.fits")  # a bare URL
    dest = content_settings.output.out_dir / item.filename
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"SIMPLE  = whatever")
    ContentDownloader.content = {item.filename: fits_like(2880)}
    outcome, downloader = run_content(content_settings, [item])
    assert downloader.calls == [item.url] and outcome.adopted == 0


def test_a_lightkurve_cache_is_adopted_by_hard_link_with_link_verified_and_never_moved(
    content_settings, tmp_path
):
    items = obs_items(3)
    cache = tmp_path / "home" / ".lightkurve-cache"
    seeds = {}
    for item in items:
        seed = cache / "mastDownload" / "TESS" / item.obs_id / item.filename
        seed.parent.mkdir(parents=True)
        seed.write_bytes(fits_like(2880))
        seeds[item.filename] = seed
    seeds[items[2].filename].write_bytes(fits_like(2880, b"C"))  # a corrupt seed: not adopted
    outcome, downloader = run_content(content_settings, items, adopt_from=[cache], adopt_link=True)
    assert downloader.calls == [items[2].url]
    assert (outcome.adopted, outcome.downloaded) == (2, 1)
    out = content_settings.output.out_dir
    for item in items[:2]:
        assert (out / item.filename).stat().st_ino == seeds[item.filename].stat().st_ino  # linked
    assert all(seed.exists() for seed in seeds.values())  # the user's files stay where they were
    assert seeds[items[2].filename].read_bytes() == fits_like(2880, b"C")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_url_keyed_manifest_is_upgraded_under_the_lock_before_any_download(content_settings):
    settings = content_settings
    items = obs_items(4)
    out = settings.output.out_dir
    out.mkdir(parents=True)
    legacy = []
    for item in items[:2]:  # what an earlier version wrote: keyed by URL, no key, no declared size
        (out / item.filename).write_bytes(fits_like(2880))
        rec = {
            "url": item.url, "path": item.filename, "status": "verified", "obs_id": item.obs_id,
            "nbytes": 2880, "md5": item.md5, "level": "fits", "checksum_declared": True, "error": "",
            "attempts": 1, "time": 1.0,
        }  # fmt: skip
        payload = json.dumps(rec, separators=(",", ":")).encode()
        legacy.append(b'{"crc":"%08x","rec":%s}\n' % (zlib.crc32(payload), payload))
    settings.state_dir.mkdir(parents=True)
    (settings.state_dir / "manifest.jsonl").write_bytes(b"".join(legacy))
    seen_at_fetch: list[bool] = []
    ContentDownloader.on_fetch = [
        lambda _item: seen_at_fetch.append(Manifest(settings.state_dir).needs_upgrade())
    ]
    outcome, downloader = run_content(settings, items)
    assert seen_at_fetch == [False, False]  # already upgraded when the first download began
    assert sorted(downloader.calls) == sorted(i.url for i in items[2:])
    assert outcome.skipped == 2
    first = json.loads((settings.state_dir / "manifest.jsonl").read_bytes().splitlines()[0])
    assert first["rec"]["key"] == f"{items[0].obs_id}/{items[0].filename}"


def test_the_plan_header_gets_the_footprints_of_the_chosen_detectors(tmp_path):
    from engine.plan.adql import Region
    from engine.plan.planner import Detector
    from engine.plan.sources import footprints_meta
    from engine.report import footprints_from_meta

    settings = make_settings(tmp_path)
    settings.selection.sector = 1
    vertices = [10.0, -60.0, 20.0, -60.0, 20.0, -50.0, 10.0, -50.0]

    class FakePlanner:
        pass

    planner = FakePlanner()
    planner.settings = settings
    planner.detectors = [
        Detector(camera=1, ccd=2, exposures=1, chosen=["x"], regions=[Region.polygon(vertices)])
    ]
    meta = footprints_meta(planner)
    assert meta == [{"name": "sector 1 camera 1 CCD 2", "polygon": vertices}]
    polygons, problems = footprints_from_meta({"footprints": meta})
    assert polygons == [("sector 1 camera 1 CCD 2", vertices)] and problems == []
    tap_plan = TapPlan(planner, None, {})  # type: ignore[arg-type]
    assert tap_plan._final_meta()["footprints"] == meta


def test_files_already_in_place_need_no_free_space_in_the_preflight(content_settings, monkeypatch):
    items = obs_items(3)
    run_content(content_settings, items)
    (content_settings.state_dir / "manifest.jsonl").unlink()
    monkeypatch.setattr("engine.manager._free_bytes", lambda _path: 100)  # less than one file
    outcome, downloader = run_content(content_settings, items)
    assert downloader.calls == [] and outcome.adopted == 3
    with pytest.raises(DiskFullError, match="free"):  # a file not yet on disk still needs its space
        run_content(content_settings, [*items, *obs_items(4)[3:]])


def test_a_symlink_at_a_destination_is_never_adopted_or_followed(content_settings, tmp_path):
    (item,) = obs_items(1)
    outside = tmp_path / "outside.fits"
    outside.write_bytes(fits_like(2880))  # the right bytes, but not inside the mirror
    dest = content_settings.output.out_dir / item.filename
    dest.parent.mkdir(parents=True)
    dest.symlink_to(outside)
    outcome, downloader = run_content(content_settings, [item])
    # The path resolves outside the mirror: refused as unsafe, neither adopted nor written through.
    assert downloader.calls == [] and (outcome.adopted, outcome.failed) == (0, 1)
    assert "outside" in outcome.errors[0]
    assert outside.read_bytes() == fits_like(2880) and dest.is_symlink()


# -- shards (--shard K/N) ---------------------------------------------------------------------------
def test_shards_download_disjoint_shares_that_together_are_the_plan(tmp_path):
    items = make_items(40)
    fetched: list[str] = []
    for k in range(3):
        settings = make_settings(tmp_path)
        settings.run.shard = f"{k}/3"
        outcome, downloader = run(settings, items)
        assert outcome.exit_code == EXIT_OK and outcome.downloaded == len(downloader.calls)
        assert (settings.state_dir / "manifest.d" / f"shard-{k}-of-3.jsonl").exists()
        fetched += downloader.calls
    assert sorted(fetched) == sorted(i.url for i in items), "no overlap, no gap"
    settings = make_settings(tmp_path)
    assert not (settings.state_dir / "manifest.jsonl").exists()
    again, downloader = run(settings, items)  # an unsharded run reads every shard's manifest
    assert downloader.calls == [] and again.skipped == 40


def test_a_shard_preflight_counts_only_its_share(tmp_path, monkeypatch):
    items = make_items(40, size=1000)
    settings = make_settings(tmp_path)
    settings.run.shard = "0/4"
    share = sum(1 for i in items if Shard(0, 4).owns(file_key("", "", i.filename)))
    monkeypatch.setattr("engine.manager._free_bytes", lambda _path: share * 1000)  # exactly its share
    outcome, _ = run(settings, items)
    assert outcome.downloaded == share < 40


def test_a_shard_preflight_subtracts_what_other_live_shards_declared(tmp_path, monkeypatch):
    items = make_items(40, size=1000)
    settings = make_settings(tmp_path)
    settings.run.shard = "1/4"
    monkeypatch.setattr("engine.manager._free_bytes", lambda _path: 40 * 1000)  # the whole plan fits...
    other = RunLock(settings.state_dir, out_dir=settings.output.out_dir, shard="shard-0-of-4")
    with other:
        other.declare_need(39 * 1000)  # ...but another shard at work claimed nearly all of it
        with pytest.raises(DiskFullError, match="declared by other shards"):
            run(settings, items)
    outcome, _ = run(settings, items)  # the other shard is gone: its claim with it
    assert outcome.exit_code == EXIT_OK


def test_a_shard_of_a_counted_plan_counts_only_its_share_and_ends_ok(tmp_path):
    """A saved plan reports the whole plan's count up front; a shard's outcome is its own share."""
    items = make_items(30)
    settings = make_settings(tmp_path)
    settings.run.shard = "1/2"
    FakeDownloader.instances.clear()
    mirror = MirrorRun(
        settings,
        ItemsPlan(lambda: iter(items), count=lambda: len(items)),
        session_factory=fake_session,
        downloader_factory=FakeDownloader,
        progress=Progress(bar=False),
        handle_signals=False,
    )
    outcome = asyncio.run(mirror.run())
    share = sum(1 for i in items if Shard(1, 2).owns(file_key("", "", i.filename)))
    assert (outcome.planned, outcome.downloaded, outcome.pending) == (share, share, 0)
    assert outcome.exit_code == EXIT_OK


def test_a_shard_skips_files_verified_in_any_manifest(tmp_path):
    items = make_items(20)
    first, _ = run(make_settings(tmp_path), items[:10])  # an unsharded run: the main manifest
    other = make_settings(tmp_path)
    other.run.shard = "1/2"
    run(other, items)  # shard 1 of 2: its own manifest file
    settings = make_settings(tmp_path)
    settings.run.shard = "0/2"
    outcome, downloader = run(settings, items)
    share = [i for i in items if Shard(0, 2).owns(file_key("", "", i.filename))]
    done_before = [i for i in share if i in items[:10]]
    assert first.downloaded == 10 and done_before and len(done_before) < len(share)
    assert sorted(downloader.calls) == sorted(i.url for i in share if i not in done_before)
    assert outcome.skipped == len(done_before)


def test_the_resume_loop_skips_and_marks_exactly_as_file_key_seen_and_differs_say(tmp_path):
    """`_produce_pages` holds file_key, `_seen` and `_differs` written out: for random plans against
    random verified records (same, other or unknown size and md5, upper case, odd md5s, rows with and
    without an obs_id, files listed twice) it skips, queues and marks exactly as they say."""
    import random

    from engine.manager import _differs, _seen
    from engine.manifest import pack_record

    rng = random.Random(15)
    settings = make_settings(tmp_path)
    settings.run.force = True  # no free-space preflight: only the skip decisions are under test
    items: list[PlanItem] = []
    done: dict[str, int] = {}
    for n in range(3_000):
        name = f"f{rng.randint(0, 2_500):05d}_lc.fits"
        obs_id = rng.choice([f"obs{n % 97}", ""])
        md5 = f"{rng.getrandbits(128):032x}"
        size = rng.choice([-1, 0, 100, 2039040])
        items.append(
            PlanItem(
                url=f"http://127.0.0.1:1/files/{name}",
                filename=name,
                obs_id=obs_id,
                size=size,
                est_kb=rng.choice([-1, 0, 3]),
                md5=rng.choice(["", md5, md5.upper(), "x" * 32, md5[:31]]),
            )
        )
        if rng.random() < 0.7:
            key = file_key(obs_id, name, f"{name}")
            packed = pack_record(
                rng.choice([size, size, 100, 0]) if size >= 0 else rng.choice([0, 7]),
                rng.choice([md5, "", f"{rng.getrandbits(128):032x}"]),
            )
            done[key] = ~packed if rng.random() < 0.1 else packed  # a few already seen
    mirror = MirrorRun(
        settings, ItemsPlan(lambda: iter(items)), progress=Progress(bar=False), handle_signals=False
    )

    async def pages():
        for start in range(0, len(items), 101):
            yield items[start : start + 101]

    class Writer:  # conflicting rows (one name, other bytes) are recorded as failed
        failed: ClassVar[list[FileResult]] = []

        async def record(self, result: FileResult) -> None:
            self.failed.append(result)

    async def produce() -> list[tuple[PlanItem, str, bool]]:
        queue: asyncio.Queue = asyncio.Queue()
        await mirror._produce_pages(pages(), mine, queue, Writer(), 0)  # type: ignore[arg-type]
        return [(job[0], job[1], job[3]) for job in (queue.get_nowait() for _ in range(queue.qsize()))]

    mine = dict(done)
    queued = asyncio.run(produce())

    expected_queue, expected_skipped = [], 0
    reference_guard = PlanGuard(settings.output.layout)
    for start in range(0, len(items), 101):
        guarded = reference_guard.admit(items[start : start + 101])
        for item, _reason in guarded.failed:  # as the run marks them (not the loop under test)
            key = file_key(item.obs_id, item.filename)
            if key and key in done:
                expected_skipped += 1
                done[key] = _seen(done[key])
        for item, relpath in guarded.items:
            key = file_key(item.obs_id, item.filename, relpath)
            changed = False
            if key in done:
                packed = done[key]
                done[key] = _seen(packed)
                changed = _differs(item, packed)
                if not changed:
                    expected_skipped += 1
                    continue
            expected_queue.append((item, relpath, changed))
    assert queued == expected_queue
    assert mine == done
    assert mirror.outcome.skipped == expected_skipped > 100
    assert mirror.outcome.planned == len(items) - mirror.outcome.merged - mirror.outcome.dropped
    assert Writer.failed and all(result.status == FileStatus.FAILED for result in Writer.failed)
    assert sum(changed for _item, _relpath, changed in queued) > 100
