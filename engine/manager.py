"""One mirror run: a plan source feeds a bounded queue, N workers download, one writer records.

    plan source ──pages──▶ producer ──(bounded queue)──▶ N workers ──results──▶ manifest writer
       (TAP or saved plan)     │ skips what the manifest             (Downloader.fetch)      (one task,
                               │ already holds, checks paths                                  batched fsync)
                               ▼ and free space

Memory stays bounded: the queue holds at most 2×concurrency items, and nothing per file is kept
beyond the plan table itself and the compact columns of the results table.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import itertools
import json
import logging
import os
import shutil
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

import aiohttp

from engine.exceptions import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    DiskFullError,
    LocalError,
    PermissionDeniedError,
    UnsafePathError,
)
from engine.fetch.bandwidth import TokenBucket
from engine.fetch.download import Downloader
from engine.fetch.session import DEFAULT_TOKEN_HOSTS, open_session
from engine.fetch.session import read_token as read_env_token
from engine.fetch.throttle import AdaptiveLimiter
from engine.layout import resolve_within
from engine.manifest import Manifest, ManifestWriter, RunLock
from engine.models import Clock, FileResult, FileStatus, PlanItem, SystemClock
from engine.plan.invariants import PlanGuard
from engine.plan.table import (
    SAVED_PLAN_HINT,
    PlanTail,
    PlanWriter,
    iter_input,
    iter_plan,
    plan_meta,
    remove_stale_temp_files,
    table_to_items,
)
from engine.progress import Progress, human_bytes
from engine.redact import redact, register_secret
from engine.settings import Settings

if TYPE_CHECKING:  # planning's imports (astropy.table, pyvo) cost a second: only when planning
    from astropy.table import Table

    from engine.plan.planner import Planner

log = logging.getLogger("tessmirror")

PLAN_FILE = "plan.ecsv"
_DROPS_LOGGED = 20  # dropped rows named in the log per page; the summary counts them all
RESULT_COLUMNS = ("url", "filename", "obs_id", "path", "status", "action", "nbytes", "md5", "error")


# -- plan sources -------------------------------------------------------------------------------
class PlanSource(Protocol):
    def pages(self) -> AsyncIterator[list[PlanItem]]: ...


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

    async def pages(self) -> AsyncIterator[list[PlanItem]]:
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
            self.on_page(len(page), sum(_declared_bytes(item) for item in page))

    def _completed(self, total: int) -> None:
        self.total = total
        if self.on_complete is not None:
            self.on_complete(total)

    async def pages(self) -> AsyncIterator[list[PlanItem]]:
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
        writer = await asyncio.to_thread(PlanWriter, self.save_to, meta=self.meta)
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
                    page = await asyncio.to_thread(tail.read, count)
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
                await asyncio.gather(planning, return_exceptions=True)
            tail.close()

    def _final_meta(self) -> dict[str, object]:
        """What only the end of planning knows, for the plan's header: every ADQL statement sent."""
        statements = getattr(self.planner, "statements", None)
        return {"adql": [str(text) for text in statements]} if statements else {}

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
        items = iter_input(sel.urls_file, key="selection.urls_file")
        return ItemsPlan(lambda: items)
    plan_path = settings.state_dir / PLAN_FILE
    fingerprint = selection_fingerprint(settings)
    if save and plan_path.exists() and not settings.run.refresh_plan:
        meta = plan_meta(plan_path, key="plan", hint=SAVED_PLAN_HINT)
        if meta.get("selection_fingerprint") == fingerprint:
            log.info("resuming from the saved plan %s; --refresh-plan queries TAP again", plan_path)
            return ItemsPlan(
                lambda: iter_plan(plan_path, key="plan", hint=SAVED_PLAN_HINT),
                count=lambda: sum(1 for _ in iter_plan(plan_path, key="plan", hint=SAVED_PLAN_HINT)),
            )
        log.info("the saved plan %s was made for another selection; planning again", plan_path)
    from engine.plan.planner import Planner
    from engine.plan.tap import TapClient

    tap = TapClient(settings.tap.url, settings=settings.tap)
    meta = {"selection_fingerprint": fingerprint, "tap_url": redact(settings.tap.url)}
    return TapPlan(Planner(settings, tap), plan_path if save else None, meta)


def read_token(settings: Settings) -> str | None:
    """The archive token from `fetch.token_env`, checked before anything starts.

    A token with a carriage return (a file saved on Windows), a newline, other whitespace or a control
    character can never authenticate: `engine.fetch.session.read_token` refuses it (exit 2, naming
    the variable, never the value) before the run takes its lock or creates a folder.
    """
    return read_env_token(settings.fetch.token_env)


class ResourceExhaustedError(LocalError):
    """Memory or threads ran out (a MemoryError, or "can't start new thread"): this machine refused."""


def resource_error(err: BaseException) -> ResourceExhaustedError | None:
    """The one-line LocalError (exit 4) for a MemoryError or a failed thread start; else None."""
    if isinstance(err, MemoryError):
        return ResourceExhaustedError(
            "out of memory: the process reached its memory or address-space limit (ulimit -v)",
            hint="raise the limit, set MALLOC_ARENA_MAX=2, or lower --concurrency; run again to resume",
        )
    if isinstance(err, OSError) and err.errno == errno.ENOMEM:
        return ResourceExhaustedError(
            f"out of memory: {err.strerror} (the process reached its memory or address-space limit)",
            hint="raise `ulimit -v`, set MALLOC_ARENA_MAX=2, or lower --concurrency; run again to resume",
        )
    if isinstance(err, RuntimeError) and "can't start new thread" in str(err):
        return ResourceExhaustedError(
            "cannot start a thread: the process reached a thread, memory or address-space limit",
            hint="raise `ulimit -u` or `ulimit -v`, set MALLOC_ARENA_MAX=2, or lower --concurrency",
        )
    return None


# -- the outcome --------------------------------------------------------------------------------
@dataclass
class RunOutcome:
    results: Table | None = None  # one row per file (the Python API); None when not collected
    planned: int = 0
    downloaded: int = 0
    skipped: int = 0
    failed: int = 0
    pending: int = 0
    nbytes: int = 0
    interrupted: bool = False
    errors: list[str] = field(default_factory=list)
    merged: int = 0  # duplicate rows for a file already planned: one download (PlanGuard)
    dropped: int = 0  # rows with no usable URL, or a URL naming another file (PlanGuard)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_PARTIAL if (self.failed or self.pending) else EXIT_OK


class _ResultColumns:
    """Compact per-file columns for the results table (no FileResult objects kept around)."""

    def __init__(self) -> None:
        self.cols: dict[str, list] = {name: [] for name in RESULT_COLUMNS}

    def add(
        self, item: PlanItem, status: str, action: str, path: str, nbytes: int, md5: str, error: str
    ) -> None:
        for name, value in zip(
            RESULT_COLUMNS,
            (item.url, item.filename, item.obs_id, path, status, action, nbytes, md5, error),
            strict=True,
        ):
            self.cols[name].append(value)

    def table(self) -> Table:
        from astropy.table import Table

        table = Table(self.cols, names=RESULT_COLUMNS, dtype=[str, str, str, str, str, str, "i8", str, str])
        return table


# -- the run ------------------------------------------------------------------------------------
_DONE = object()


class MirrorRun:
    """Runs one mirror into `settings.output.out_dir`. Use `await MirrorRun(...).run()`."""

    def __init__(
        self,
        settings: Settings,
        source: PlanSource | None = None,
        *,
        clock: Clock | None = None,
        progress: Progress | None = None,
        session_factory: Callable[..., aiohttp.ClientSession] = open_session,
        downloader_factory: Callable[..., Downloader] = Downloader,
        handle_signals: bool = True,
        collect_results: bool = True,
    ) -> None:
        self.settings = settings
        self.source = source
        self.clock = clock or SystemClock()
        self.progress = progress or Progress(interval=settings.run.progress_interval, clock=self.clock)
        self.session_factory = session_factory
        self.downloader_factory = downloader_factory
        self.handle_signals = handle_signals
        self.out_dir = settings.output.out_dir
        # The per-file results table is for the Python API; the CLI prints counts and keeps nothing per file.
        self.results = _ResultColumns() if collect_results else None
        self.outcome = RunOutcome()
        self._stop = asyncio.Event()
        self._planned_total: int | None = None
        self._source_reports = False  # the plan source reports planning to `progress` itself
        self._guard = PlanGuard(settings.output.layout)

    # -- entry --------------------------------------------------------------------------------
    async def run(self) -> RunOutcome:
        """Plan (or read the plan), download, record; returns the counts (and the results table).

        Raises TessMirrorError subclasses for problems with the whole run. A MemoryError or a failed
        thread start becomes ResourceExhaustedError (exit 4) after the manifest was flushed and the
        lock released. Cancelling the task (the Python API, a notebook's interrupt) stops the run the
        same way and re-raises CancelledError.
        """
        try:
            return await self._run()
        except (MemoryError, RuntimeError, OSError) as err:
            resource = resource_error(err)
            if resource is None:
                raise
            raise resource from None

    async def _run(self) -> RunOutcome:
        settings = self.settings
        token = read_token(settings)  # before anything: a bad token is bad input (exit 2)
        _prepare_dir(self.out_dir, "output.out_dir")
        _prepare_dir(settings.state_dir, "output.state_dir")
        with RunLock(settings.state_dir, out_dir=self.out_dir):
            # Temporary plan files of a run killed mid-plan: ours to remove now that we hold the lock.
            remove_stale_temp_files(settings.state_dir / PLAN_FILE)
            manifest = Manifest(settings.state_dir)
            done = self._already_done(manifest)
            source = self.source or plan_source_for(settings)
            self._watch_planning(source)
            register_secret(token)
            writer = ManifestWriter(manifest, fsync=settings.output.fsync)
            await writer.start()
            executor = ThreadPoolExecutor(max(settings.verify.workers, 1), thread_name_prefix="verify")
            try:
                # The token goes to MAST's host and to the TAP service's host, never to a third party.
                token_hosts = {*DEFAULT_TOKEN_HOSTS, urlsplit(settings.tap.url).hostname or ""}
                session = self.session_factory(settings.fetch, token=token, token_hosts=token_hosts)
                async with session:
                    downloader = self.downloader_factory(
                        session,
                        settings.fetch,
                        settings.verify,
                        clock=self.clock,
                        throttle=AdaptiveLimiter(settings.fetch.concurrency, clock=self.clock),
                        bandwidth=(
                            TokenBucket(settings.fetch.bandwidth_limit, clock=self.clock)
                            if settings.fetch.bandwidth_limit
                            else None
                        ),
                        executor=executor,
                        fsync=settings.output.fsync,
                    )
                    await self._pipeline(source, done, downloader, writer)
            finally:
                # Shielded: a second cancellation (a notebook's second interrupt) must not cut the
                # manifest's last batch short.
                await _finish(writer.close())
                executor.shutdown(wait=False, cancel_futures=True)
                self.progress.close()
        self.outcome.results = self.results.table() if self.results is not None else None
        if self._planned_total is not None:
            self.outcome.planned = max(self.outcome.planned, self._planned_total)
        self.outcome.pending = max(
            self.outcome.planned - self.outcome.downloaded - self.outcome.skipped - self.outcome.failed, 0
        )
        return self.outcome

    def _watch_planning(self, source: PlanSource) -> None:
        """Progress counts planned files as planning finds them, not as downloads reach them."""
        self._planned_total = None
        if not getattr(source, "reports_planning", False):
            return
        self._source_reports = True

        def on_complete(total: int) -> None:
            self._planned_total = total
            self.progress.plan_complete()
            # Rows the planner's own guard merged or dropped never reach the producer: count them here.
            guard = getattr(getattr(source, "planner", None), "guard", None)
            if guard is not None:
                self.outcome.merged += int(getattr(guard, "merged", 0))
                self.outcome.dropped += int(getattr(guard, "dropped_total", 0))

        source.on_page = self.progress.planned_items
        source.on_complete = on_complete

    def _already_done(self, manifest: Manifest) -> set[str]:
        """URLs verified by earlier runs. Trusted without a stat (parallel filesystems make a stat per
        file expensive), unless --recheck asks; the scan builds no per-entry objects."""
        if not self.settings.run.recheck:
            return manifest.verified_urls()
        done: set[str] = set()
        for entry in manifest.load().values():
            if entry.status != FileStatus.VERIFIED.value:
                continue
            try:
                ok = (self.out_dir / entry.path).stat().st_size == entry.nbytes
            except OSError:
                ok = False
            if ok:
                done.add(entry.url)
            else:
                log.warning("recheck: %s is missing or changed; it will be downloaded again", entry.path)
        return done

    # -- the pipeline -------------------------------------------------------------------------
    async def _pipeline(
        self,
        source: PlanSource,
        done: set[str],
        downloader: Downloader,
        writer: ManifestWriter,
    ) -> None:
        n_workers = self.settings.fetch.concurrency
        queue: asyncio.Queue = asyncio.Queue(maxsize=2 * n_workers)
        producer = asyncio.create_task(self._produce(source, done, queue, writer, n_workers), name="plan")
        workers = [
            asyncio.create_task(self._work(queue, downloader, writer), name=f"worker-{i}")
            for i in range(n_workers)
        ]
        stopper = asyncio.create_task(self._stop.wait(), name="stop")
        ticker = asyncio.create_task(self._tick(), name="progress")
        running: set[asyncio.Task] = {producer, *workers}
        with self._signals():
            try:
                while running:
                    finished, _ = await asyncio.wait({*running, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    if stopper in finished:
                        self.outcome.interrupted = True
                        log.warning("interrupted: stopping; the manifest keeps every verified file")
                        break
                    for task in finished:
                        running.discard(task)
                        if task.exception() is not None:
                            raise task.exception()  # type: ignore[misc]
            finally:
                for task in (*running, stopper, ticker):
                    task.cancel()
                await asyncio.gather(*running, stopper, ticker, return_exceptions=True)

    async def _tick(self) -> None:
        """Batch logs get a line even while no file completes (a slow archive, a long stall)."""
        while True:
            await self.clock.sleep(1.0)
            self.progress.tick()

    async def _produce(
        self,
        source: PlanSource,
        done: set[str],
        queue: asyncio.Queue,
        writer: ManifestWriter,
        n_workers: int,
    ) -> None:
        free = _free_bytes(self.out_dir)
        # aclosing: when the producer is cancelled, the source stops planning now, not at GC time.
        async with contextlib.aclosing(source.pages()) as pages:
            await self._produce_pages(pages, done, queue, writer, free)
        if not self._source_reports:
            self.progress.plan_complete()
        for _ in range(n_workers):
            await queue.put(_DONE)

    async def _produce_pages(
        self,
        pages: AsyncIterator[list[PlanItem]],
        done: set[str],
        queue: asyncio.Queue,
        writer: ManifestWriter,
        free: int,
    ) -> None:
        """Every page through the plan's invariants (`PlanGuard`: one row per destination, URLs that
        name their file, safe names), whatever the source: TAP, a saved plan or a URL list."""
        needed = 0
        guard = self._guard
        async for page in pages:
            guarded = guard.admit(page)
            todo: list[tuple[PlanItem, str, Path]] = []
            skipped = 0
            page_bytes = 0
            for item, reason in guarded.failed:
                self.outcome.planned += 1
                if done and redact(item.url) in done:
                    skipped += 1  # verified by an earlier run: a later conflicting row does not undo it
                    continue
                await self._record(writer, FileResult(item, FileStatus.FAILED, error=redact(reason)))
            for item, relpath in guarded.items:
                self.outcome.planned += 1
                declared = _declared_bytes(item)
                page_bytes += declared
                if done and redact(item.url) in done:  # the manifest keys URLs redacted
                    skipped += 1
                    if self.results is not None:
                        self.results.add(item, "verified", "skipped", relpath, item.size, item.md5, "")
                    continue
                try:
                    dest = resolve_within(self.out_dir, relpath)
                except UnsafePathError as err:
                    await self._record(
                        writer, FileResult(item, FileStatus.FAILED, path=relpath, error=redact(err))
                    )
                    continue
                todo.append((item, relpath, dest))
                needed += declared
            self.outcome.merged += guarded.merged
            self.outcome.dropped += len(guarded.dropped)
            for item, reason in guarded.dropped[:_DROPS_LOGGED]:
                log.warning("dropped from the plan: %s: %s", item.filename or redact(item.url), reason)
            self.outcome.skipped += skipped
            if not self._source_reports:
                self.progress.planned_items(len(guarded.items) + len(guarded.failed), page_bytes)
            self.progress.skipped_items(skipped)
            if needed > free and not self.settings.run.force:
                raise DiskFullError(
                    f"the plan needs at least {human_bytes(needed)} but only {human_bytes(free)} is free "
                    f"on {self.out_dir}",
                    path=self.out_dir,
                    hint="free some space, choose another --out, narrow the selection, or pass --force",
                )
            for job in todo:
                await queue.put(job)

    async def _work(self, queue: asyncio.Queue, downloader: Downloader, writer: ManifestWriter) -> None:
        while True:
            job = await queue.get()
            if job is _DONE:
                return
            item, relpath, dest = job
            try:
                result = await downloader.fetch(item, dest, relpath)
            except (LocalError, asyncio.CancelledError):
                raise
            except Exception as err:  # a bug must cost one file, not the night's run
                resource = resource_error(err)
                if resource is not None:  # the machine, not this file: stop the run (exit 4)
                    raise resource from None
                log.exception("internal error while fetching %s", item.filename)
                result = FileResult(
                    item, FileStatus.FAILED, path=relpath, error=redact(f"internal error: {err}")
                )
            await self._record(writer, result)

    async def _record(self, writer: ManifestWriter, result: FileResult) -> None:
        await writer.record(result)
        item = result.item
        if result.status is FileStatus.VERIFIED:
            self.outcome.downloaded += 1
            self.outcome.nbytes += result.nbytes
            action = "downloaded"
        else:
            self.outcome.failed += 1
            action = "failed"
            if len(self.outcome.errors) < 50:
                self.outcome.errors.append(f"{item.filename or item.url}: {result.error}")
            log.warning("failed: %s: %s", item.filename or item.url, result.error)
        if self.results is not None:
            self.results.add(
                item, str(result.status), action, result.path, result.nbytes, result.md5, result.error
            )
        self.progress.file_done(result)

    # -- signals ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _signals(self):
        """SIGINT/SIGTERM: stop taking work, flush the manifest, exit 'interrupted'."""
        loop = asyncio.get_running_loop()
        installed: list[int] = []
        if self.handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, self.stop)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass  # not the main thread, or no signals here: the caller stops us instead
        try:
            yield
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    def stop(self) -> None:
        self._stop.set()


# -- helpers ------------------------------------------------------------------------------------
async def _finish(closing: Awaitable[None]) -> None:
    """Await `closing` to its end even if this task is cancelled meanwhile (then re-raise)."""
    task = asyncio.ensure_future(closing)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


def _declared_bytes(item: PlanItem) -> int:
    if item.size >= 0:
        return item.size
    return item.est_kb * 1024 if item.est_kb >= 0 else 0


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62  # unknown: do not refuse on a filesystem that cannot tell us


def _prepare_dir(path: Path, key: str) -> None:
    """Create a directory and prove it is writable, with a message that names it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".tessmirror-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except PermissionError as err:
        raise PermissionDeniedError(
            f"cannot write to {path} ({key}): {err.strerror}",
            path=path,
            hint="choose a directory you can write to, or fix its permissions",
        ) from None
    except OSError as err:
        if err.errno == 30:  # EROFS
            raise PermissionDeniedError(
                f"{path} ({key}) is on a read-only filesystem", path=path, hint="choose a writable directory"
            ) from None
        if err.errno == 28:  # ENOSPC
            raise DiskFullError(f"no space left on the device holding {path} ({key})", path=path) from None
        raise PermissionDeniedError(f"cannot use {path} ({key}): {err}", path=path) from None


def summarize(outcome: RunOutcome) -> Iterable[str]:
    """Lines for the end-of-run summary."""
    yield f"planned     {outcome.planned}"
    yield f"downloaded  {outcome.downloaded}  ({human_bytes(outcome.nbytes)})"
    yield f"skipped     {outcome.skipped}  (verified by an earlier run)"
    yield f"failed      {outcome.failed}"
    if outcome.merged or outcome.dropped:
        yield f"plan        {outcome.merged} duplicate rows merged, {outcome.dropped} unusable rows dropped"
    if outcome.pending:
        yield f"pending     {outcome.pending}  (run again to resume)"
    for err in outcome.errors[:10]:
        yield f"  ! {err}"
    if len(outcome.errors) > 10:
        yield f"  ... and {len(outcome.errors) - 10} more in the manifest"


__all__ = ["MirrorRun", "PlanSource", "RunOutcome", "TablePlan", "TapPlan", "plan_source_for"]
