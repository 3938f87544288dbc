"""File I/O off the event loop: the plan export and the targets file go through aiofiles.

Each "does not block" test hands the coroutine a named pipe whose other end waits until a ticker
task on the loop has ticked: if the file operation ran on the loop, the ticker could never tick and
the other end would give up waiting (a bounded wait, not a hang), failing the test.
"""

from __future__ import annotations

import asyncio
import importlib
import io
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.cli import _export_plan
from engine.exceptions import ConfigError
from engine.models import PlanItem
from engine.plan.planner import _read_targets
from engine.plan.table import EXPORT_FORMATS, PlanExporter
from engine.progress import PlanSummary

GIVE_UP = 60.0  # seconds the pipe's other end waits for the ticker before it goes on regardless
TICKS = 20


def _items(n: int, start: int = 0) -> list[PlanItem]:
    return [
        PlanItem(
            url=f"https://mast.example.org/files/tess-s0001-{i:07d}_lc.fits",
            filename=f"tess-s0001-{i:07d}_lc.fits",
            obs_id=f"tess-s0001-{i:07d}",
            product="lc",
            sector=1,
            size=2039040 + i,
            est_kb=1991,
            md5=f"{i:032x}",
            target_name=str(i),
        )
        for i in range(start, start + n)
    ]


PAGES = [_items(3000), _items(3000, start=3000), _items(5, start=6000)]  # > 64 KiB: fills a pipe


class _FakeSource:
    """A plan source with fixed pages (no TAP)."""

    def __init__(self, pages: list[list[PlanItem]]) -> None:
        self._pages = pages

    async def pages(self) -> AsyncIterator[list[PlanItem]]:
        for page in self._pages:
            await asyncio.sleep(0)
            yield page


@pytest.fixture
def fake_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        importlib.import_module("engine.plan.sources"),
        "plan_source_for",
        lambda settings, save=True: _FakeSource(PAGES),
    )


SETTINGS = SimpleNamespace(run=SimpleNamespace(progress_interval=3600.0))


def _reference(fmt: str) -> str:
    """What the export wrote before aiofiles: the exporter straight on the file, page by page."""
    out = io.StringIO()
    exporter = PlanExporter(fmt, out)
    for page in PAGES:
        exporter.write(page)
    exporter.close()
    return out.getvalue()


async def _with_ticker(work, opened: threading.Event, release: threading.Event) -> tuple[object, int]:
    """Run `work` while a ticker counts; once the pipe is open at both ends, TICKS ticks later the
    ticker releases the pipe's other end."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            if not opened.is_set():
                continue  # the ticks that count are those while the file operation is under way
            ticks += 1
            if ticks >= TICKS:
                release.set()

    ticking = asyncio.ensure_future(ticker())
    try:
        result = await work
    finally:
        ticking.cancel()
    return result, ticks


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_export_to_a_file_is_byte_identical_to_the_exporter_writing_directly(
    fmt: str, tmp_path: Path, fake_source: None
) -> None:
    path = tmp_path / f"plan.{fmt}"
    summary = PlanSummary()
    asyncio.run(_export_plan(SETTINGS, fmt, str(path), summary))
    written = path.read_bytes()
    assert written == _reference(fmt).encode("utf-8")
    assert summary.files == sum(len(page) for page in PAGES)


def test_export_to_standard_output_is_byte_identical(
    capsys: pytest.CaptureFixture[str], fake_source: None
) -> None:
    asyncio.run(_export_plan(SETTINGS, "aria2", None, PlanSummary()))
    assert capsys.readouterr().out == _reference("aria2")


def test_export_into_a_pipe_nobody_reads_yet_leaves_the_loop_running(
    tmp_path: Path, fake_source: None
) -> None:
    pipe = tmp_path / "plan.fifo"
    os.mkfifo(pipe)
    opened, release = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def reader() -> None:
        with open(pipe, "rb") as handle:  # opens once the export opens its end
            opened.set()
            seen["released_by_ticker"] = release.wait(GIVE_UP)  # meanwhile the export's writes block
            seen["data"] = handle.read()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    _guard_line, ticks = asyncio.run(
        _with_ticker(_export_plan(SETTINGS, "csv", str(pipe), PlanSummary()), opened, release)
    )
    thread.join(GIVE_UP)
    assert seen["released_by_ticker"] is True, "the loop stood still while the export waited on the pipe"
    assert ticks >= TICKS
    assert seen["data"] == _reference("csv").encode("utf-8")


def test_an_unwritable_export_path_is_a_config_error_naming_the_flag(
    tmp_path: Path, fake_source: None
) -> None:
    with pytest.raises(ConfigError, match="cannot write") as caught:
        asyncio.run(_export_plan(SETTINGS, "urls", str(tmp_path / "missing" / "plan.txt"), PlanSummary()))
    assert "-o/--output" in str(caught.value)


def test_targets_file_is_read_the_same_way(tmp_path: Path) -> None:
    targets = tmp_path / "targets.txt"
    targets.write_bytes(b"# two targets\r\nTIC 1001\r\n1004 # a comment\n\n1001\n")
    assert asyncio.run(_read_targets(targets)) == ["1001", "1004"]


def test_a_missing_targets_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        asyncio.run(_read_targets(tmp_path / "nope.txt"))


def test_reading_a_targets_file_that_is_slow_to_arrive_leaves_the_loop_running(tmp_path: Path) -> None:
    pipe = tmp_path / "targets.fifo"
    os.mkfifo(pipe)
    opened, release = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def writer() -> None:
        with open(pipe, "wb") as handle:  # opens once the planner opens its end
            opened.set()
            seen["released_by_ticker"] = release.wait(GIVE_UP)  # meanwhile the planner's read waits
            handle.write(b"TIC 7\n8\n")

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    targets, ticks = asyncio.run(_with_ticker(_read_targets(pipe), opened, release))
    thread.join(GIVE_UP)
    assert seen["released_by_ticker"] is True, "the loop stood still while the targets file was read"
    assert ticks >= TICKS
    assert targets == ["7", "8"]
