"""One mirror run: a plan source feeds a bounded queue, N workers download, one writer records.

    plan source ──pages──▶ producer ──(bounded queue)──▶ N workers ──results──▶ manifest writer
       (TAP or saved plan)     │ skips what the manifest             (adopt, else            (one task,
                               │ already holds, checks paths          Downloader.fetch)       batched fsync)
                               ▼ and free space

Memory stays bounded: the queue holds at most 2×concurrency items, and nothing per file is kept
beyond the plan table itself, one int per verified file (its size and md5, to spot a changed file)
and the compact columns of the results table.

Existing data
-------------
- The manifest is keyed by the file (obs_id + file name, see engine.manifest), not by its URL. A
  verified file whose plan row declares the same size and md5 is skipped whatever its URL is now.
- A verified file whose plan row declares another size or md5 was reprocessed by the archive: the old
  copy is hard-linked (or copied) to ``<state_dir>/superseded/<relpath>`` and the file downloaded again;
  the old bytes are never deleted.
- Verified files the plan no longer lists are *withdrawn*: counted in the summary and listed in
  ``<state_dir>/withdrawn.txt``, never deleted.
- Adoption: a file with no verified record that is already at its destination (a run killed after the
  rename and before the manifest's batch was flushed; a mirror seeded by MAST's curl scripts or aria2c
  in the same layout) is verified in place (size, md5 where declared, FITS at the run's level) and
  recorded as adopted, not downloaded; one that fails is moved to ``<state_dir>/quarantine/`` and
  downloaded. With `adopt_from` (``--adopt-from DIR``), each such file is also looked for by name in
  other trees (an astroquery/lightkurve cache ``mastDownload/TESS/<obs_id>/<file>``, a flat folder, a
  mirror in our layout), hard-linked into place (copied across file systems; the user's file is never
  moved), verified there, and recorded. All of this runs in the verify thread pool, one file per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

import aiohttp

from engine.cluster import spec_from_settings
from engine.cluster.executors import Executor, build_executor
from engine.config import validate_settings
from engine.exceptions import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    ConfigError,
    DiskFullError,
    IntegrityError,
    LocalError,
    PermissionDeniedError,
    UnsafePathError,
    local_error_from_oserror,
    os_errors,
)
from engine.fetch.autotune import DEFAULT_START, ConcurrencyTuner, TunerSettings, TuneStep
from engine.fetch.bandwidth import TokenBucket
from engine.fetch.download import Downloader
from engine.fetch.partfile import install_copy, move_under
from engine.fetch.session import DEFAULT_TOKEN_HOSTS, open_session
from engine.fetch.session import read_token as read_env_token
from engine.fetch.throttle import AdaptiveLimiter, download_workers
from engine.layout import resolve_within
from engine.manifest import KEY_PATH_PREFIX, Manifest, ManifestWriter, RunLock, file_key, unpack_record
from engine.models import Clock, FileResult, FileStatus, PlanItem, SystemClock, VerifyLevel
from engine.plan.invariants import GuardedPage, PlanGuard
from engine.plan.sources import PlanSource, TapPlan, plan_source_for
from engine.plan.table import (
    PLAN_FILE,
    remove_stale_temp_files,
)
from engine.progress import Progress, human_bytes
from engine.redact import redact, register_secret
from engine.settings import Settings
from engine.shard import parse_shard

if TYPE_CHECKING:  # planning's imports (astropy.table, pyvo) cost a second: only when planning
    from astropy.table import Table


log = logging.getLogger(__name__)
_T = TypeVar("_T")

_DROPS_LOGGED = 20  # dropped rows named in the log per page; the summary counts them all
RESULT_COLUMNS = (
    "url", "filename", "obs_id", "product", "sector", "path", "status", "action", "nbytes", "md5", "error"
)  # fmt: skip
SUPERSEDED_DIR = "superseded"  # <state_dir>/superseded/<relpath>: old copies of reprocessed files
WITHDRAWN_FILE = "withdrawn.txt"  # <state_dir>/withdrawn.txt: verified files the last full plan lacks
_WITHDRAWN_SHOWN = 10


# -- the run -----------------------------------------------------------------------------------
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
    adopted: int = 0  # found on disk (at its place or in an --adopt-from tree), verified, recorded
    changed: int = 0  # verified before, but the plan declares another size/md5: fetched again
    quarantined: int = 0  # found at its place but failing the checks: moved aside, then fetched
    withdrawn: int = 0  # verified files the (complete) plan no longer lists; kept on disk
    withdrawn_keys: list[str] = field(default_factory=list)  # the first few, for the summary

    @property
    def new(self) -> int:
        """Files downloaded that no earlier run had verified."""
        return max(self.downloaded - self.changed, 0)

    @property
    def unchanged(self) -> int:
        """Files verified by an earlier run with the same declared size and md5."""
        return self.skipped

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
            (
                item.url,
                item.filename,
                item.obs_id,
                item.product,
                item.sector,
                path,
                status,
                action,
                nbytes,
                md5,
                error,
            ),
            strict=True,
        ):
            self.cols[name].append(value)

    def table(self) -> Table:
        from astropy.table import Table

        table = Table(
            self.cols, names=RESULT_COLUMNS, dtype=[str, str, str, str, "i8", str, str, str, "i8", str, str]
        )
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
        adopt_from: Iterable[Path] = (),
        adopt_link: bool = False,
    ) -> None:
        # Settings built in Python (the API, a notebook) never passed the loader: check them here,
        # so a bad value is the same one-line ConfigError however it arrived.
        validate_settings(settings)
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
        # Trees to look in for a planned file before downloading it (`--adopt-from`), in order.
        self.adopt_from = [Path(tree).expanduser() for tree in adopt_from]
        # True (`--link`): hard-link adopted files instead of copying them (cheaper; the source tree's
        # owners can then change the mirror's copy, which `verify` would catch).
        self.adopt_link = adopt_link
        self._executor: ThreadPoolExecutor | None = None
        # Destinations the producer found empty (nothing at the path) when it queued their files:
        # `prepare_job` then has nothing to adopt, and spares those files its thread hop.
        self._nothing_at: set[Path] = set()
        # The run's session and downloader, once open: the plan-time source check uses them.
        self._session: aiohttp.ClientSession | None = None
        self._downloader: Downloader | None = None
        self._tuner: ConcurrencyTuner | None = None  # `--concurrency auto`, once the session is open
        self._plan_complete = False
        # `--shard K/N` (engine.shard): only the files this shard owns are downloaded.
        self.shard = parse_shard(settings.run.shard)
        self._lock: RunLock | None = None
        # Where the downloads run: in this process (today's pipeline) or on a Dask cluster
        # (engine/cluster/executors.py). Dask is imported only when a cluster was asked for.
        self.downloads: Executor = build_executor(spec_from_settings(settings), settings)

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
        finally:
            # Also when the run stopped before its downloads started (another run held the lock):
            # a slurm-runner allocation's other ranks wait for this driver to end them.
            await _finish(self.downloads.close())

    async def _run(self) -> RunOutcome:
        settings = self.settings
        token = read_token(settings)  # before anything: a bad token is bad input (exit 2)
        _prepare_dir(self.out_dir, "output.out_dir")
        _prepare_dir(settings.state_dir, "output.state_dir")
        shard = self.shard
        lock = RunLock(settings.state_dir, out_dir=self.out_dir, shard=shard.name if shard else None)
        self._lock = lock
        with lock:
            manifest = Manifest(settings.state_dir, shard=shard.name if shard else None)
            if shard is None:
                # Temporary plan files of a run killed mid-plan: ours to remove now that we hold the
                # folder exclusively (shards share it: one of them may be writing such a file).
                remove_stale_temp_files(settings.state_dir / PLAN_FILE)
                # A URL-keyed manifest from an earlier version: rewritten with file keys, atomically,
                # now that we hold the lock and before anything is downloaded. Shards only read it
                # (an old record gets its key when read): an upgrade needs the folder exclusively.
                if manifest.needs_upgrade():  # reads the first record only
                    await asyncio.to_thread(manifest.upgrade)
            else:
                log.info("shard %s: this process downloads only its share of the plan", shard)
            done = self._already_done(manifest)
            source = self.source or plan_source_for(settings)
            if shard is not None and isinstance(source, TapPlan):
                # N shards planning at once would ask TAP N times and write one saved plan N times.
                raise ConfigError(
                    "run.shard",
                    "a shard downloads a plan saved once beforehand, and there is none for this selection",
                    hint=f"first `tessmirror plan ... -o {settings.state_dir / PLAN_FILE}`, then "
                    f"`tessmirror fetch --input {settings.state_dir / PLAN_FILE} --shard K/N` (docs/HPC.md)",
                )
            self._watch_planning(source)
            register_secret(token)
            writer = ManifestWriter(manifest, fsync=settings.output.fsync)
            await writer.start()
            executor = ThreadPoolExecutor(max(settings.verify.workers, 1), thread_name_prefix="verify")
            self._executor = executor
            try:
                await self.downloads.start()  # a Dask cluster starts (or is joined) here
                # The token goes to MAST's host and to the TAP service's host, never to a third party.
                token_hosts = {*DEFAULT_TOKEN_HOSTS, urlsplit(settings.tap.url).hostname or ""}
                session = self.session_factory(settings.fetch, token=token, token_hosts=token_hosts)
                async with session:
                    throttle = AdaptiveLimiter(settings.fetch.connections, clock=self.clock)
                    # The bar shows the limit when 429/503 cut it (and always under auto).
                    self.progress.attach_limiter(throttle, auto=settings.fetch.auto_concurrency)
                    # The tuner measures this process's downloads; on a cluster there are none here.
                    inprocess = self.downloads.name == "inprocess"
                    self._tuner = self._make_tuner(throttle) if inprocess else None
                    extra = {"meter": self._tuner} if self._tuner is not None else {}
                    downloader = self.downloader_factory(
                        session,
                        settings.fetch,
                        settings.verify,
                        clock=self.clock,
                        throttle=throttle,
                        bandwidth=(
                            TokenBucket(settings.fetch.bandwidth_limit, clock=self.clock)
                            if settings.fetch.bandwidth_limit
                            else None
                        ),
                        executor=executor,
                        fsync=settings.output.fsync,
                        **extra,
                    )
                    self._session, self._downloader = session, downloader  # for the source check
                    await self._pipeline(source, done, downloader, writer)
                # A shard sees only its share of the plan: what the plan withdrew is for a whole run.
                if self._plan_complete and not self.outcome.interrupted and shard is None:
                    await asyncio.to_thread(self._list_withdrawn, done)
            finally:
                # Shielded: a second cancellation (a notebook's second interrupt) must not cut the
                # manifest's last batch short.
                await _finish(self.downloads.close())
                await _finish(writer.close())
                executor.shutdown(wait=False, cancel_futures=True)
                self.progress.close()
        self.outcome.results = self.results.table() if self.results is not None else None
        if self._planned_total is not None:
            self.outcome.planned = max(self.outcome.planned, self._planned_total)
        self.outcome.pending = max(
            self.outcome.planned
            - self.outcome.downloaded
            - self.outcome.adopted
            - self.outcome.skipped
            - self.outcome.failed,
            0,
        )
        return self.outcome

    def _watch_planning(self, source: PlanSource) -> None:
        """Progress counts planned files as planning finds them, not as downloads reach them."""
        self._planned_total = None
        # A shard counts its own share as it meets it: the source's count is the whole plan's.
        if not getattr(source, "reports_planning", False) or self.shard is not None:
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

    def _already_done(self, manifest: Manifest) -> dict[str, int]:
        """Files verified by earlier runs: key -> `pack_record(nbytes, md5)`. Trusted without a stat
        (parallel filesystems make a stat per file expensive), unless --recheck asks; the scan builds
        no per-entry objects."""
        done = manifest.verified()
        if not self.settings.run.recheck:
            return done
        for entry in manifest.load().values():
            if entry.key not in done:
                continue
            try:
                ok = (self.out_dir / entry.path).stat().st_size == entry.nbytes
            except OSError:
                ok = False
            if not ok:
                del done[entry.key]
                log.warning("recheck: %s is missing or changed; it will be downloaded again", entry.path)
        return done

    def _list_withdrawn(self, done: dict[str, int]) -> None:
        """Verified files the complete plan did not list: counted, and named in withdrawn.txt (never
        deleted: the archive may have withdrawn them, or the selection changed)."""
        withdrawn = sorted(key for key, packed in done.items() if packed >= 0)
        self.outcome.withdrawn = len(withdrawn)
        self.outcome.withdrawn_keys = withdrawn[:_WITHDRAWN_SHOWN]
        target = self.settings.state_dir / WITHDRAWN_FILE
        try:
            if not withdrawn:
                target.unlink(missing_ok=True)
                return
            fd, tmp = tempfile.mkstemp(prefix=f".{WITHDRAWN_FILE}.", suffix=".tmp", dir=target.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write("# verified files that the last complete plan no longer lists (kept on disk)\n")
                out.writelines(f"{key}\n" for key in withdrawn)
            os.replace(tmp, target)
        except OSError as err:  # a list for the user; the run's result does not depend on it
            log.warning("could not write %s: %s", target, err.strerror or err)
        if withdrawn:
            log.info(
                "%d verified files are no longer in the plan (withdrawn; kept): see %s",
                len(withdrawn),
                target,
            )

    # -- the pipeline -------------------------------------------------------------------------
    async def _pipeline(
        self,
        source: PlanSource,
        done: dict[str, int],
        downloader: Downloader,
        writer: ManifestWriter,
    ) -> None:
        fetch = self.settings.fetch
        n_workers = download_workers(fetch.connections)
        # The executor says how many tasks take jobs from the queue (a cluster: its batching tasks).
        n_workers = self.downloads.consumers(n_workers)
        queue: asyncio.Queue = asyncio.Queue(maxsize=2 * n_workers)
        producer = asyncio.create_task(self._produce(source, done, queue, writer, n_workers), name="plan")
        workers = [
            asyncio.create_task(work, name=f"worker-{i}")
            for i, work in enumerate(self.downloads.workers(self, queue, downloader, writer, n_workers))
        ]
        stopper = asyncio.create_task(self._stop.wait(), name="stop")
        ticker = asyncio.create_task(self._tick(), name="progress")
        helpers = [ticker]
        if self._tuner is not None:
            helpers.append(asyncio.create_task(self._tuner.run(), name="tuner"))
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
                for task in (*running, stopper, *helpers):
                    task.cancel()
                await asyncio.gather(*running, stopper, *helpers, return_exceptions=True)
                if self._tuner is not None:
                    log.info(
                        "concurrency auto: %d connections at the end, %.1f on average (cap %d)",
                        self._tuner.limit,
                        self._tuner.mean_limit(),
                        fetch.max_connections,
                    )

    def _make_tuner(self, limiter: AdaptiveLimiter) -> ConcurrencyTuner | None:
        """The tuner of `--concurrency auto`, steering `limiter`; None for a fixed number."""
        fetch = self.settings.fetch
        if not fetch.auto_concurrency:
            return None
        cap = fetch.max_connections
        settings = TunerSettings(start=min(DEFAULT_START, cap), maximum=cap)
        log.info("concurrency auto: starting at %d connections, at most %d", settings.start, cap)

        def on_step(step: TuneStep) -> None:
            log.info(
                "concurrency auto: %d -> %d connections (%s; %s/s, first byte in %.0f ms)",
                step.before,
                step.after,
                step.reason,
                human_bytes(step.rate),
                step.ttfb * 1000,
            )

        return ConcurrencyTuner(limiter, settings, clock=self.clock, on_step=on_step)

    async def _tick(self) -> None:
        """Batch logs get a line even while no file completes (a slow archive, a long stall)."""
        while True:
            await self.clock.sleep(1.0)
            self.progress.tick()

    async def _produce(
        self,
        source: PlanSource,
        done: dict[str, int],
        queue: asyncio.Queue,
        writer: ManifestWriter,
        n_workers: int,
    ) -> None:
        free = _free_bytes(self.out_dir)
        # aclosing: when the producer is cancelled, the source stops planning now, not at GC time.
        async with contextlib.aclosing(source.pages()) as pages:
            await self._produce_pages(pages, done, queue, writer, free)
        self._plan_complete = True
        if not self._source_reports:
            self.progress.plan_complete()
        for _ in range(n_workers):
            await queue.put(_DONE)

    async def _settle_source(self, sample: list[PlanItem]) -> None:
        """`--source s3|auto`: check the plan's first page against MAST's path_lookup before any of it
        is queued. `s3` refuses a mismatch (exit 2); `auto` falls back to MAST for the whole run."""
        from engine.fetch.s3 import settle_source
        from engine.fetch.sources import build_sources

        fetch = self.settings.fetch
        assert self._session is not None and self._downloader is not None  # set before the pipeline
        chosen = await settle_source(
            self._session,
            fetch.source,
            sample,
            fallback_base=self.settings.tap.url,
            timeout=self.settings.tap.request_timeout,
        )
        if chosen != fetch.source:
            self._downloader.sources = build_sources(replace(fetch, source=chosen), self.clock)

    async def _produce_pages(
        self,
        pages: AsyncIterator[list[PlanItem]],
        done: dict[str, int],
        queue: asyncio.Queue,
        writer: ManifestWriter,
        free: int,
    ) -> None:
        """Every page through the plan's invariants (`PlanGuard`: one row per destination, URLs that
        name their file, safe names), whatever the source: TAP, a saved plan or a URL list."""
        needed = 0
        guard = self._guard
        settled = self.settings.fetch.source == "mast"
        # Pages stream into downloads while later pages are planned, so a plan that does not fit would
        # be found out only after its first files had filled the disk. Once the plan passes half of
        # the free space, its files are held until its whole size is known: what already runs is then
        # at most half the free space, and the preflight refuses before the disk fills.
        held: list[tuple[PlanItem, str, Path, bool]] = []
        holding = self.shard is None and not self.settings.run.force
        async for page in pages:
            guarded = guard.admit(page)
            if self.shard is not None:
                guarded = self._own_share(guarded)
            if not settled and guarded.items:
                settled = True
                await self._settle_source([item for item, _relpath in guarded.items])
            todo: list[tuple[PlanItem, str, Path, bool]] = []
            skipped = 0
            page_bytes = 0
            for item, reason in guarded.failed:
                self.outcome.planned += 1
                key = file_key(item.obs_id, item.filename)
                if key and key in done:
                    skipped += 1  # verified by an earlier run: a later conflicting row does not undo it
                    done[key] = _seen(done[key])
                    continue
                await self._record(writer, FileResult(item, FileStatus.FAILED, error=redact(reason)))
            # A million-row resume runs this loop a million times: `file_key`, `declared_bytes`,
            # `_seen` and `_differs` are written out here (their answers; a test compares them), the
            # planned count is kept in `counted` and added to the outcome before any await (where
            # anyone else could look at it) and after the page.
            counted = 0
            md5_bits = _MD5_BITS
            for item, relpath in guarded.items:
                counted += 1
                size = item.size
                declared = size if size >= 0 else (item.est_kb * 1024 if item.est_kb >= 0 else 0)
                page_bytes += declared
                obs_id, filename = item.obs_id, item.filename
                if obs_id and filename:
                    key = f"{obs_id}/{filename}"
                else:
                    key = f"{KEY_PATH_PREFIX}{relpath}" if relpath else ""
                changed = False
                # The manifest keys files, not URLs: a new URL is the same file. Keys of `done` are
                # never "" and its values never None.
                packed = done.get(key)
                if packed is not None:
                    if packed >= 0:
                        done[key] = ~packed  # seen: listed by this plan
                    else:
                        packed = ~packed
                    if size >= 0 and size != packed >> 129:
                        changed = True
                    elif packed & 1 and item.md5:
                        md5 = ((packed >> 1) & md5_bits).to_bytes(16, "big").hex()
                        changed = item.md5 != md5 and item.md5.lower() != md5
                    if not changed:
                        skipped += 1
                        if self.results is not None:
                            self.results.add(item, "verified", "skipped", relpath, item.size, item.md5, "")
                        continue
                try:
                    dest = resolve_within(self.out_dir, relpath)
                except UnsafePathError as err:
                    self.outcome.planned += counted
                    counted = 0
                    await self._record(
                        writer, FileResult(item, FileStatus.FAILED, path=relpath, error=redact(err))
                    )
                    continue
                todo.append((item, relpath, dest, changed))
                needed += declared
            self.outcome.planned += counted
            self.outcome.merged += guarded.merged
            self.outcome.dropped += len(guarded.dropped)
            for item, reason in guarded.dropped[:_DROPS_LOGGED]:
                log.warning("dropped from the plan: %s: %s", item.filename or redact(item.url), reason)
            self.outcome.skipped += skipped
            if not self._source_reports:
                self.progress.planned_items(len(guarded.items) + len(guarded.failed), page_bytes)
            self.progress.skipped_items(skipped)
            if todo:
                # One lstat per new file, in one thread hop per page (the files with a verified record
                # are not looked at). Files already at their place (to be adopted) need no new space;
                # a file with nothing at its place needs no look before its download either.
                in_place, empty = await asyncio.to_thread(_look_in_place, todo)
                if not self.settings.run.force:
                    needed -= in_place
                if not self.adopt_from:  # otherwise the seed trees are still to be searched
                    self._nothing_at.update(empty)
            if self.shard is not None and not self.settings.run.force:
                self._check_share(needed)
            elif needed > free and not self.settings.run.force:
                raise DiskFullError(
                    f"the plan needs at least {human_bytes(needed)} but only {human_bytes(free)} is free "
                    f"on {self.out_dir}",
                    path=self.out_dir,
                    hint="free some space, choose another --out, narrow the selection, or pass --force",
                )
            if holding and (held or needed > free * HOLD_FRACTION):
                held.extend(todo)
                if len(held) <= HOLD_MAX:
                    continue
                # Memory over certainty: a plan this large on a disk this tight is checked per page.
                log.debug(
                    "free-space preflight: %d files held; releasing them before the plan ends", len(held)
                )
                todo, held, holding = held, [], False
            for job in todo:
                await queue.put(job)
        for job in held:  # the whole plan fits
            await queue.put(job)

    def _own_share(self, guarded: GuardedPage) -> GuardedPage:
        """The part of a guarded page this shard owns: by file key (`file_key` of obs_id and name, or
        the relpath), or by URL for a row refused before it had a place."""
        shard = self.shard
        assert shard is not None
        items = [
            (item, relpath)
            for item, relpath in guarded.items
            if shard.owns(file_key(item.obs_id, item.filename, relpath))
        ]
        failed = [
            (item, reason)
            for item, reason in guarded.failed
            if shard.owns(file_key(item.obs_id, item.filename) or f"url:{redact(item.url)}")
        ]
        if shard.index == 0:  # the plan-wide counts (merged, dropped rows) are told by shard 0 only
            return replace(guarded, items=items, failed=failed)
        return replace(guarded, items=items, failed=failed, dropped=[], merged=0)

    def _check_share(self, needed: int) -> None:
        """The free-space preflight of a shard: its own share against what is free now, minus what
        the other live shards of this folder declared they still need.

        Declared first, checked second (the race argument of engine.lock): of two shards checking at
        once, the later one sees the other's need. `needed` is this shard's planned bytes so far;
        what it already downloaded is taken off on both sides (it is gone from the free space too).
        """
        remaining = max(needed - self.outcome.nbytes, 0)
        lock = self._lock
        others = 0
        if lock is not None:
            lock.declare_need(remaining)
            others = lock.others_need()
        free = _free_bytes(self.out_dir)
        if remaining > free - others:
            shared = f" ({human_bytes(others)} of it declared by other shards)" if others else ""
            raise DiskFullError(
                f"shard {self.shard} needs at least {human_bytes(remaining)} but only {human_bytes(free)} is "
                f"free on {self.out_dir}{shared}",
                path=self.out_dir,
                hint="free some space, run fewer shards at once (sbatch --array=...%M), or pass --force",
            )

    async def _work(self, queue: asyncio.Queue, downloader: Downloader, writer: ManifestWriter) -> None:
        while True:
            job = await queue.get()
            if job is _DONE:
                return
            item, relpath, dest, changed = job
            try:
                result = await self.prepare_job(item, relpath, dest, changed)
                if result is None:
                    result = await downloader.fetch(item, dest, relpath)
                    if result.status is FileStatus.VERIFIED and not result.origin:
                        result.origin = "downloaded"
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
            await self.finish_job(writer, result, changed=changed)

    async def prepare_job(self, item: PlanItem, relpath: str, dest: Path, changed: bool) -> FileResult | None:
        """The driver's steps before a download, for every executor: keep the old copy of a changed
        file, or adopt a file already on disk (its result; None when it must be downloaded)."""
        if changed:
            await self._off_loop(self._supersede, item, relpath, dest)
            return None
        if dest in self._nothing_at:
            # Nothing was there when its page was looked at (moments ago, or longer for files the
            # free-space preflight held). A file put there since is replaced by a verified download
            # (the rename never follows a symlink).
            self._nothing_at.discard(dest)
            return None
        return await self._off_loop(self._adopt, item, relpath, dest)

    async def finish_job(self, writer: ManifestWriter, result: FileResult, *, changed: bool) -> None:
        """Record one file's result, wherever it was downloaded: the manifest's one writer."""
        if changed and result.status is FileStatus.VERIFIED:
            self.outcome.changed += 1
        await self._record(writer, result)

    async def _off_loop(self, func: Callable[..., _T], *args: object) -> _T:
        """Run file-system work (stat, hashing, linking) in the verify pool, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, func, *args)

    # -- existing data (in the verify pool) -------------------------------------------------------
    def _level_for(self, item: PlanItem) -> VerifyLevel:
        """The run's level; at least CHECKSUM when the plan declares an md5 (read it: it is the proof)."""
        level = VerifyLevel.parse(self.settings.verify.level)
        return max(level, VerifyLevel.CHECKSUM) if item.md5 else level

    def _adoptable(self, item: PlanItem) -> bool:
        """Whether a file found on disk can be proven to be this item: something must be declared
        (a size or an md5), or the run checks FITS files' structure and checksums."""
        from engine.verify.stream import is_fits_item

        if item.size >= 0 or item.md5:
            return True
        return VerifyLevel.parse(self.settings.verify.level) >= VerifyLevel.FITS and is_fits_item(item)

    def _verified_copy(self, item: PlanItem, relpath: str, path: Path) -> FileResult:
        """Check `path` as `item` (raises IntegrityError or OSError); the result of an adoption."""
        from engine.verify.file import check_file

        level = self._level_for(item)
        nbytes = os.lstat(path).st_size
        digest = check_file(path, size=item.size, md5=item.md5, level=level)
        return FileResult(
            item,
            FileStatus.VERIFIED,
            path=relpath,
            nbytes=nbytes,
            md5=digest,
            level=level,
            checksum_declared=bool(item.md5),
            origin="adopted",
        )

    def _adopt(self, item: PlanItem, relpath: str, dest: Path) -> FileResult | None:
        """The file already at `dest`, or found in an --adopt-from tree, verified as `item`; None when
        it must be downloaded. A file at `dest` that fails the checks is moved to the quarantine."""
        if not self._adoptable(item):
            return None
        try:
            mode = os.lstat(dest).st_mode
        except OSError:
            mode = 0
        if stat.S_ISREG(mode):
            try:
                verified = self._verified_copy(item, relpath, dest)
                log.info("adopted %s: already on disk and verified", relpath)
                return verified
            except (IntegrityError, OSError) as err:
                self._quarantine_bad(relpath, err)
        for tree in self.adopt_from:
            result = self._adopt_from_tree(tree, item, relpath, dest)
            if result is not None:
                return result
        return None

    def _quarantine_bad(self, relpath: str, err: BaseException) -> None:
        from engine.mirrorcheck import quarantine_file

        reason = getattr(err, "message", None) or getattr(err, "strerror", None) or str(err)
        moved = quarantine_file(self.out_dir, self.settings.state_dir, relpath)
        if moved is not None:
            self.outcome.quarantined += 1
            log.warning(
                "%s is on disk but fails its checks (%s): moved to %s", relpath, redact(reason), moved
            )

    def _adopt_from_tree(self, tree: Path, item: PlanItem, relpath: str, dest: Path) -> FileResult | None:
        """Copy (a reflink where the file system can) or, with `--link`, hard-link a file found in
        `tree` into place, verified there."""
        source = _seed_candidate(tree, item, relpath)
        if source is None:
            return None
        try:
            # Through the folder's descriptors (partfile), like every other write under --out.
            result = install_copy(
                self.out_dir,
                relpath,
                source,
                lambda placed: self._verified_copy(item, relpath, placed),
                link=self.adopt_link,
            )
        except UnsafePathError:
            raise
        except (IntegrityError, OSError) as err:
            reason = getattr(err, "message", None) or getattr(err, "strerror", None) or str(err)
            log.warning("not adopting %s from %s: %s", item.filename, source, redact(reason))
            return None
        log.info("adopted %s from %s", relpath, source)
        return result

    def _supersede(self, item: PlanItem, relpath: str, dest: Path) -> None:
        """Keep the old copy of a file the archive reprocessed, before the new one replaces it."""
        try:
            if not stat.S_ISREG(os.lstat(dest).st_mode):
                return
        except OSError:
            return
        try:
            # A hard link keeps the old bytes when the download renames the new file over `dest`;
            # both folders are walked by descriptor, and an older superseded copy is never replaced.
            candidate = move_under(
                self.out_dir,
                relpath,
                self.settings.state_dir,
                f"{SUPERSEDED_DIR}/{relpath}",
                keep_source=True,
            )
        except UnsafePathError:
            raise
        except OSError as err:
            raise local_error_from_oserror(err, dest, "keep the old copy under superseded/") from err
        log.info("%s changed at the archive: the old copy is kept at %s", relpath, candidate)

    async def _record(self, writer: ManifestWriter, result: FileResult) -> None:
        await writer.record(result)
        item = result.item
        if result.status is FileStatus.VERIFIED and result.origin == "adopted":
            self.outcome.adopted += 1
            action = "adopted"
        elif result.status is FileStatus.VERIFIED:
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
        if action == "adopted":
            self.progress.skipped_items(1)  # no network: counted with the files already done
        else:
            self.progress.file_done(result)

    # -- signals ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _signals(self):
        """SIGINT/SIGTERM: stop taking work, flush the manifest, exit 'interrupted'."""
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
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


_MD5_BITS = (1 << 128) - 1  # the md5 of a `pack_record` value, once shifted right by one


def _seen(packed: int) -> int:
    """Mark a verified file as listed by this plan (the packed values are >= 0 until seen)."""
    return ~packed if packed >= 0 else packed


def _differs(item: PlanItem, packed: int) -> bool:
    """Whether the plan declares other bytes (size or md5) for a file than its verified record holds.
    (`_produce_pages` holds this written out; this is the reference its test compares with.)"""
    nbytes, md5 = unpack_record(~packed if packed < 0 else packed)
    if item.size >= 0 and item.size != nbytes:
        return True
    return bool(item.md5 and md5 and item.md5.lower() != md5)


def _look_in_place(todo: list[tuple[PlanItem, str, Path, bool]]) -> tuple[int, list[Path]]:
    """What is at the new files' destinations (runs in a thread).

    Returns the declared bytes of the files already there with their declared size, and the
    destinations with nothing at them (no file, link or folder: `FileNotFoundError`).
    """
    total = 0
    empty: list[Path] = []
    for item, _relpath, dest, changed in todo:
        if changed:
            continue
        try:
            st = os.lstat(dest)
        except FileNotFoundError:
            empty.append(dest)
            continue
        except OSError:
            continue
        if item.size >= 0 and stat.S_ISREG(st.st_mode) and st.st_size == item.size:
            total += item.size
    return total, empty


def _seed_candidate(tree: Path, item: PlanItem, relpath: str) -> Path | None:
    """Where a seed tree may hold `item`: our layout, flat, or the astroquery/lightkurve cache
    (`mastDownload/TESS/<obs_id>/<file>`); the first regular file (not a symlink) found."""
    name = item.filename
    places = [relpath, name]
    if item.obs_id:
        places += [
            f"mastDownload/TESS/{item.obs_id}/{name}",
            f"TESS/{item.obs_id}/{name}",
            f"{item.obs_id}/{name}",
        ]
    for place in places:
        candidate = tree / place
        try:
            if stat.S_ISREG(os.lstat(candidate).st_mode):
                return candidate
        except OSError:
            continue
    return None


HOLD_FRACTION = 0.5  # past this share of the free space, downloads wait for the plan's total
HOLD_MAX = 200_000  # ... but never more files held than this (about 100 MB of plan items)


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62  # unknown: do not refuse on a filesystem that cannot tell us


def _prepare_dir(path: Path, key: str) -> None:
    """Create a directory and prove it is writable, with a message that names it."""
    fix = "choose a directory you can write to, or fix its permissions"
    with os_errors(path, "write to", default=PermissionDeniedError, hint=fix, key=key, permission_hint=fix):
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".tessmirror-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()


def summarize(outcome: RunOutcome) -> Iterable[str]:
    """Lines for the end-of-run summary."""
    yield f"planned     {outcome.planned}"
    yield f"downloaded  {outcome.downloaded}  ({human_bytes(outcome.nbytes)})"
    kept = "  (old copies kept under superseded/)" if outcome.changed else ""
    yield (
        f"files       new {outcome.new}, changed {outcome.changed}, unchanged {outcome.unchanged}, "
        f"withdrawn {outcome.withdrawn}{kept}"
    )
    yield f"skipped     {outcome.skipped}  (verified by an earlier run, unchanged)"
    if outcome.adopted:
        yield f"adopted     {outcome.adopted}  (already on disk, verified; not downloaded)"
    if outcome.quarantined:
        yield f"quarantined {outcome.quarantined}  (on disk but failing their checks; downloaded again)"
    if outcome.withdrawn:
        shown = ", ".join(outcome.withdrawn_keys)
        more = f", ... ({WITHDRAWN_FILE})" if outcome.withdrawn > len(outcome.withdrawn_keys) else ""
        yield f"withdrawn   {outcome.withdrawn}  (no longer in the plan; kept on disk): {shown}{more}"
    yield f"failed      {outcome.failed}"
    if outcome.merged or outcome.dropped:
        yield f"plan        {outcome.merged} duplicate rows merged, {outcome.dropped} unusable rows dropped"
    if outcome.pending:
        yield f"pending     {outcome.pending}  (run again to resume)"
    for err in outcome.errors[:10]:
        yield f"  ! {err}"
    if len(outcome.errors) > 10:
        yield f"  ... and {len(outcome.errors) - 10} more in the manifest"


__all__ = ["MirrorRun", "RunOutcome", "resource_error", "summarize"]
