"""Plan sources: where a run's plan comes from, page by page.

A saved ECSV plan, a URL list or an Astropy Table (`ItemsPlan`, `TablePlan`), or TAP queried at the
archive's pace into the plan file (`TapPlan`); `plan_source_for` picks one from the settings. The run
(engine/manager.py) only iterates `pages()`: a new kind of plan (a shard's share, another catalogue)
is a class here with that one method.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from engine.exceptions import TessMirrorError
from engine.models import PlanItem
from engine.plan.table import (
    PLAN_FILE,
    SAVED_PLAN_HINT,
    PlanTail,
    PlanWriter,
    count_plan,
    iter_input,
    iter_plan,
    plan_meta,
    table_to_items,
)
from engine.redact import redact
from engine.settings import Settings

if TYPE_CHECKING:  # planning's imports (astropy.table, pyvo) cost a second: only when planning
    from astropy.table import Table

    from engine.plan.planner import Planner

log = logging.getLogger(__name__)


class PlanSource(Protocol):
    on_page: Callable[[int, int], None] | None  # (files, declared bytes) per page
    on_complete: Callable[[int], None] | None  # the total, once planning has finished

    def pages(self) -> AsyncGenerator[list[PlanItem], None]: ...


class ItemsPlan:
    """A plan that is already known: a saved ECSV plan, a URL list or a table. No TAP at all.

    `items` is a factory for an iterator, read in pages in a worker thread: a plan file of a million
    rows streams through in bounded memory and never blocks the event loop. `count`, when given,
    counts the rows in a second pass (a saved plan file can be read twice), so progress shows the
    whole total from the start: `on_page(count, 0)` then `on_complete(count)` report it.
    """

    def __init__(
        self,
        items: Callable[[], Iterator[PlanItem]],
        *,
        page_size: int = 1000,
        count: Callable[[], int] | None = None,
    ) -> None:
        self.items = items
        self.page_size = page_size
        self.count = count
        self.on_page: Callable[[int, int], None] | None = None
        self.on_complete: Callable[[int], None] | None = None

    @property
    def reports_planning(self) -> bool:
        return self.count is not None

    async def pages(self) -> AsyncGenerator[list[PlanItem], None]:
        counting = asyncio.create_task(self._count()) if self.count is not None else None
        try:
            iterator = await asyncio.to_thread(self.items)
            while page := await asyncio.to_thread(lambda: list(itertools.islice(iterator, self.page_size))):
                yield page
            if counting is not None:
                await counting  # its error (a malformed row) would have stopped the reading too
        finally:
            if counting is not None and not counting.done():
                counting.cancel()
                await asyncio.gather(counting, return_exceptions=True)

    async def _count(self) -> None:
        assert self.count is not None
        total = await asyncio.to_thread(self.count)
        if self.on_page is not None:
            self.on_page(total, 0)
        if self.on_complete is not None:
            self.on_complete(total)


class TablePlan(ItemsPlan):
    """A plan held in an astropy Table (the Python API, `verify --repair`)."""

    def __init__(self, table: Table, *, page_size: int = 1000) -> None:
        super().__init__(lambda: table_to_items(table), page_size=page_size)


class TapPlan:
    """Plans through TAP and saves the plan as planning goes, at the archive's pace.

    With `save_to`, a planning task writes every page to the plan file as TAP returns it, whether or
    not the downloads keep up, and commits the file the moment the last page is in: a run stopped
    after planning resumes without TAP. `pages()` meanwhile reads the rows back from that file
    (`PlanTail`), so memory stays bounded however far planning runs ahead. A plan that failed or was
    interrupted is discarded, never saved partial. Without `save_to` (`tessmirror plan`) the pages
    pass straight through.

    `on_page(count, nbytes)` and `on_complete(total)` report planning's progress as it happens.
    """

    reports_planning = True

    def __init__(self, planner: Planner, save_to: Path | None, meta: dict[str, str]) -> None:
        self.planner = planner
        self.save_to = save_to
        self.meta = meta
        self.page_size = 1000
        self.on_page: Callable[[int, int], None] | None = None
        self.on_complete: Callable[[int], None] | None = None
        self.total: int | None = None  # known once planning has finished

    def _planned(self, page: list[PlanItem]) -> None:
        if self.on_page is not None:
            self.on_page(len(page), sum(declared_bytes(item) for item in page))

    def _completed(self, total: int) -> None:
        self.total = total
        if self.on_complete is not None:
            self.on_complete(total)

    async def pages(self) -> AsyncGenerator[list[PlanItem], None]:
        if self.save_to is None:
            total = 0
            try:
                async for page in self.planner.pages():
                    total += len(page)
                    self._planned(page)
                    yield page
            finally:
                self._close_tap()
            self._completed(total)
            return
        save_to = self.save_to  # not None here; a local, so the lambda sees it narrowed
        writer = await _created(lambda: PlanWriter(save_to, meta=self.meta))
        try:
            tail = await asyncio.to_thread(PlanTail, writer)
        except BaseException:
            writer.discard()
            raise
        grown = asyncio.Event()
        planning = asyncio.create_task(self._plan(writer, grown), name="planner")
        consumed = 0
        try:
            while True:
                if consumed < writer.count:
                    count = min(self.page_size, writer.count - consumed)
                    try:
                        page = await asyncio.to_thread(tail.read, count)
                    except TessMirrorError:
                        if planning.done() and not planning.cancelled() and planning.exception():
                            planning.result()  # the cause (a full disk, say), not its symptom
                        raise
                    consumed += count
                    yield page
                elif planning.done():
                    planning.result()  # planning's error, if it failed
                    if consumed >= writer.count:
                        return
                else:
                    grown.clear()
                    waiter = asyncio.ensure_future(grown.wait())
                    try:
                        await asyncio.wait({planning, waiter}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()
        finally:
            if not planning.done():
                planning.cancel()
            # Retrieved either way: a failure already raised above is not logged a second time.
            await asyncio.gather(planning, return_exceptions=True)
            tail.close()

    def _final_meta(self) -> dict[str, object]:
        """What only the end of planning knows, for the plan's header: every ADQL statement sent, and
        the footprint polygons of a sector selection (`footprints`, drawn by `tessmirror report`)."""
        meta: dict[str, object] = {}
        statements = getattr(self.planner, "statements", None)
        if statements:
            meta["adql"] = [str(text) for text in statements]
        footprints = footprints_meta(self.planner)
        if footprints:
            meta["footprints"] = footprints
        return meta

    def _close_tap(self) -> None:
        """Planning is over (done, failed or cancelled): stop the TAP client's threads now."""
        close = getattr(getattr(self.planner, "tap", None), "close", None)
        if close is not None:
            close()

    async def _plan(self, writer: PlanWriter, grown: asyncio.Event) -> None:
        """Run the planner to its end, writing each page; commit the file when the last is in."""
        try:
            async for page in self.planner.pages():
                await asyncio.to_thread(writer.write, page)
                self._planned(page)
                grown.set()
            await asyncio.to_thread(writer.commit, self._final_meta())
        except BaseException:
            writer.discard()
            raise
        finally:
            grown.set()
            self._close_tap()
        log.info("plan saved: %s (%d files)", self.save_to, writer.count)
        self._completed(writer.count)


def footprints_meta(planner: object) -> list[dict[str, object]]:
    """The planner's footprint polygons as the plan header's `footprints`: one entry per region of
    each camera/CCD, ``{"name": "sector S camera C CCD D", "polygon": [ra1, dec1, ...]}``."""
    detectors = getattr(planner, "detectors", None) or []
    settings = getattr(planner, "settings", None)
    sector = getattr(getattr(settings, "selection", None), "sector", None)
    entries: list[dict[str, object]] = []
    for d in detectors:
        for region in getattr(d, "regions", []):
            if getattr(region, "shape", "POLYGON").upper() != "POLYGON":
                continue
            entries.append(
                {
                    "name": f"sector {sector} camera {d.camera} CCD {d.ccd}",
                    "polygon": [float(v) for v in region.values],
                }
            )
    return entries


def selection_fingerprint(settings: Settings) -> str:
    """Identifies what was asked for, so a saved plan is reused only for the same question."""
    blob = json.dumps({"tap": settings.tap.url, "selection": asdict(settings.selection)}, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def plan_source_for(settings: Settings, *, save: bool = True) -> PlanSource:
    """A URL list or plan file if one was given; else the saved plan; else TAP. `save`: keep the
    plan in the state directory for resuming (`tessmirror plan` only prints it)."""
    sel = settings.selection
    if sel.urls_file is not None:
        # Opened now (a missing file fails here, named) and read once: pipes and `-` work.
        items = iter_input(sel.urls_file, key="selection.urls_file", spool_dir=settings.state_dir)
        return ItemsPlan(lambda: items)
    plan_path = settings.state_dir / PLAN_FILE
    fingerprint = selection_fingerprint(settings)
    if save and plan_path.exists() and not settings.run.refresh_plan:
        meta = plan_meta(plan_path, key="plan", hint=SAVED_PLAN_HINT)
        if meta.get("selection_fingerprint") == fingerprint:
            log.info("resuming from the saved plan %s; --refresh-plan queries TAP again", plan_path)
            return ItemsPlan(
                lambda: iter_plan(plan_path, key="plan", hint=SAVED_PLAN_HINT),
                count=lambda: count_plan(plan_path, key="plan", hint=SAVED_PLAN_HINT),
            )
        log.info("the saved plan %s was made for another selection; planning again", plan_path)
    from engine.plan.planner import Planner
    from engine.plan.tap import TapClient

    tap = TapClient(settings.tap.url, settings=settings.tap)
    meta = {"selection_fingerprint": fingerprint, "tap_url": redact(settings.tap.url)}
    return TapPlan(Planner(settings, tap), plan_path if save else None, meta)


async def _created(make: Callable[[], PlanWriter]) -> PlanWriter:
    """`make()` in a thread. Cancelled meanwhile (a signal during start-up), the thread still creates
    the writer's temporary file: it is discarded when the thread ends, never left behind."""
    creating = asyncio.ensure_future(asyncio.to_thread(make))
    try:
        return await asyncio.shield(creating)
    except asyncio.CancelledError:

        def discard(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                done.result().discard()

        creating.add_done_callback(discard)
        raise


def declared_bytes(item: PlanItem) -> int:
    """What `item` will take on disk: its size, else its estimate (kB), else 0."""
    if item.size >= 0:
        return item.size
    return item.est_kb * 1024 if item.est_kb >= 0 else 0
