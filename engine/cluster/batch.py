"""One batch of files, run on a Dask worker: the existing session, Downloader and checks, in an event
loop of the batch's own, writing in place under the shared output folder.

A batch returns compact results (one tuple per file it finished; the driver holds the PlanItems) and
never writes the manifest: the driver records what comes back through the same code path as a local
run. A file the batch did not finish (the run was stopped) is simply absent: still pending.

Politeness across the cluster (see `engine.cluster.driver`):

- the batch holds one lease of the run's `distributed.Semaphore` (``jobs`` leases) while it works,
  so at most ``jobs`` batches run at once whatever the number of workers, each with at most
  ``job_concurrency`` connections (its own aiohttp session and AIMD limiter);
- a 429/503 with Retry-After seen here is published to the run's pause `distributed.Variable`
  (absolute wall-clock time), and every batch polls it each `POLL_SECONDS`: the whole cluster waits,
  not only the worker that was told;
- the run's stop `Variable` ends the batch early (the driver was interrupted).

Files already at their place with their declared size and md5 (a batch rerun after its worker was
killed, which had finished some of them) are checked in place and reported as adopted, not fetched.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import stat
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.cluster.parts import ClusterPartFile, host_name
from engine.exceptions import IntegrityError, LocalError, TessMirrorError, UnsafePathError
from engine.fetch.throttle import AdaptiveLimiter, download_workers
from engine.models import FileResult, FileStatus, PlanItem, VerifyLevel
from engine.redact import redact
from engine.settings import FetchSettings, VerifySettings

log = logging.getLogger(__name__)
POLL_SECONDS = 1.0  # how often a batch reads the run's pause and stop variables
LEASE_POLL_SECONDS = 5.0  # a batch waiting for a lease looks at the stop variable this often
DRIVER_LOST_SECONDS = 60.0  # a batch that cannot reach the scheduler this long ends (driver gone)
BEAT_SECONDS = 30.0  # a running batch says how far it is this often (DEBUG, forwarded to the driver)
# One FileResult without its item: what travels back to the driver per file.
Compact = tuple[int, str, str, int, str, int, bool, str, int, float, float, str, str, str]


@dataclass(frozen=True, slots=True)
class BatchSpec:
    """Everything a worker needs for one batch (pickled to it; about 200 bytes per file)."""

    run_id: str
    number: int
    out_dir: str
    fetch: FetchSettings  # `concurrency` is the job's: connections of this batch
    verify: VerifySettings
    fsync: bool
    items: tuple[tuple[PlanItem, str], ...]  # (item, relpath under out_dir)
    token_env: str | None = None
    token_digest: str = ""  # sha256 of the driver's token ("" when it has none): never the token
    token_hosts: tuple[str, ...] = ()
    pause_name: str = ""  # distributed.Variable names; "" outside Dask (tests)
    stop_name: str = ""
    semaphore_name: str = ""
    jobs: int = 1
    log_level: int = logging.WARNING  # the driver's level for `engine`: its records are forwarded to it


@dataclass(slots=True)
class BatchReport:
    """What a batch sends back: its results, who ran it, and a fatal error if it had to stop."""

    number: int
    host: str
    pid: int
    results: list[Compact] = field(default_factory=list)
    fatal: tuple[str, str, str] | None = None  # (kind, message, hint): a LocalError or a ConfigError
    stopped: bool = False
    overloads: int = 0  # 429/503 answers this batch met
    decreases: int = 0
    taken_over: int = 0  # parts of gone writers continued
    seconds: float = 0.0


def pack(index: int, result: FileResult) -> Compact:
    """A FileResult as a tuple without its item (the driver has it, by `index`)."""
    return (
        index,
        str(result.status),
        result.path,
        result.nbytes,
        result.md5,
        int(result.level) if result.level is not None else -1,
        result.checksum_declared,
        result.error,
        result.attempts,
        result.elapsed,
        result.finished_at,
        result.origin,
        result.source,
        result.note,
    )


def unpack(item: PlanItem, packed: Compact) -> FileResult:
    """The FileResult `pack` made, with its item back."""
    (_, status, path, nbytes, md5, level, declared, error, attempts, elapsed, finished, origin, src, note) = (
        packed
    )
    return FileResult(
        item,
        FileStatus(status),
        path=path,
        nbytes=nbytes,
        md5=md5,
        level=VerifyLevel(level) if level >= 0 else None,
        checksum_declared=declared,
        error=error,
        attempts=attempts,
        elapsed=elapsed,
        finished_at=finished,
        origin=origin,
        source=src,
        note=note,
    )


def token_digest(token: str | None) -> str:
    return hashlib.sha256(token.encode()).hexdigest() if token else ""


class SharedLimiter(AdaptiveLimiter):
    """The batch's AIMD limiter, whose Retry-After pauses are shared with the whole cluster.

    `on_overload` also records the pause's end (wall clock) for the batch to publish; `pause_until`
    applies a pause another worker published.
    """

    def __init__(self, initial: int) -> None:
        super().__init__(initial)
        self.publish_until = 0.0  # wall-clock end of the latest pause seen here, to publish
        self.told = asyncio.Event()  # set by a new pause: the watcher publishes it at once

    def on_overload(self, retry_after: float | None = None) -> None:
        super().on_overload(retry_after)
        if retry_after is not None and retry_after > 0:
            self.publish_until = max(self.publish_until, time.time() + retry_after)
            self.told.set()

    def pause_until(self, wall: float) -> None:
        """Hold new requests until the wall-clock time `wall` (a pause published by any worker)."""
        remaining = wall - time.time()
        if remaining > 0:
            # The base class keeps its pause on the monotonic clock; extend it, never shorten it.
            self._paused_until = max(self._paused_until, self._clock.monotonic() + remaining)


class Control:
    """The run's pause and stop variables, read and written from the batch (blocking calls: run
    them in a thread). Without Dask (names "") nothing is shared."""

    def __init__(self, spec: BatchSpec) -> None:
        self._pause: Any = None
        self._stop: Any = None
        if spec.pause_name:
            from distributed import Variable

            self._pause = Variable(spec.pause_name)
            self._stop = Variable(spec.stop_name)

    def read(self) -> tuple[float, bool]:
        """(the published pause's end, whether the run asked to stop)."""
        if self._pause is None:
            return 0.0, False
        pause = self._pause.get(timeout=5)
        stop = self._stop.get(timeout=5)
        return float(pause or 0.0), bool(stop)

    def publish(self, until: float) -> None:
        """Extend the published pause to `until` (never shorten one another worker published)."""
        if self._pause is None:
            return
        current = float(self._pause.get(timeout=5) or 0.0)
        if until > current:
            self._pause.set(until)


@dataclass(slots=True)
class _Doing:
    """Where a batch running in this process is (read by `worker_view` from the worker's loop), and
    when it last moved: a byte received (it is the Downloader's `meter`), a file finished, a wait for
    a lease or a pause the archive asked for. The driver restarts a worker whose batch has not moved
    for `cluster.stall_timeout`."""

    number: int
    total: int
    phase: str = "starting"
    in_flight: set[str] = field(default_factory=set)  # file names being fetched now
    done: int = 0
    since: float = field(default_factory=time.monotonic)  # when it last moved, as of the last look
    received: int = 0  # answers and blocks received: counted per chunk, compared at each look
    _looked: int = 0  # `received` at the last look

    def note(self, phase: str | None = None) -> None:
        if phase is not None:
            self.phase = phase
        self.since = time.monotonic()

    # The Downloader's meter (engine.fetch.autotune.RateMeter). Called per chunk, the hottest path:
    # a count only; the clock is read when someone looks (`quiet`).
    def add_bytes(self, n: int) -> None:
        self.received += 1

    def add_first_byte(self, seconds: float) -> None:
        self.received += 1

    def quiet(self) -> float:
        """Seconds since the batch last moved (bytes are seen at the looks, every 30 s or so)."""
        if self.received != self._looked:
            self._looked = self.received
            self.since = time.monotonic()
        return time.monotonic() - self.since

    def describe(self) -> str:
        flying = ", ".join(sorted(self.in_flight)[:4]) + (" …" if len(self.in_flight) > 4 else "")
        fetching = f", fetching {flying}" if flying else ""
        quiet = self.quiet()
        return f"batch {self.number}: {self.phase}, {self.done} of {self.total} files done{fetching}; " + (
            f"last change {quiet:.0f} s ago"
        )


_DOING: dict[int, _Doing] = {}  # the batches running in this worker process, by number


@dataclass(slots=True)
class WorkerView:
    """What one worker process knows of the run's batches (`worker_view`)."""

    states: dict[str, str]  # batch key -> Dask's state of it on this worker
    free: float  # the MAST resource free here (0 while a batch runs)
    quiet: dict[int, float]  # batch number -> seconds since it last moved, for the batches running here
    lines: list[str]  # for the -v log: each running batch, then each thread's innermost frames


def worker_view(
    keys: list[str], resource: str = "MAST", stacks: bool = True, dask_worker: Any = None
) -> WorkerView:
    """What this worker process knows of the run's batch `keys`: Dask's state of each here, the free
    `resource`, how long each running batch has not moved, and the innermost frames of every thread.
    `Client.run` calls it on every worker, for the driver's look at a run whose batches stopped
    coming back."""
    states: dict[str, str] = {}
    free = 0.0
    if dask_worker is not None:
        state = dask_worker.state
        for key in keys:
            task = state.tasks.get(key)
            if task is not None:
                states[key] = str(task.state)
        free = float(state.available_resources.get(resource, 0.0))
    running = list(_DOING.values())
    lines = [doing.describe() for doing in running]
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    for ident, frame in sys._current_frames().items() if stacks else ():
        if ident == threading.get_ident():
            continue
        frames = traceback.extract_stack(frame)[-4:]
        where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
        lines.append(f"thread {names.get(ident, ident)}: {where}")
    return WorkerView(states, free, {doing.number: doing.quiet() for doing in running}, lines)


def run_batch(spec: BatchSpec) -> BatchReport:
    """Download one batch on this worker and return its compact report (the Dask task).

    Holds one lease of the run's semaphore while it works (see the module docstring).
    """
    started = time.monotonic()
    report = BatchReport(spec.number, host_name(), os.getpid())
    _log_like_the_driver(spec.log_level)
    log.debug("batch %d: %d files, on %s (pid %d)", spec.number, len(spec.items), report.host, report.pid)
    doing = _DOING[spec.number] = _Doing(spec.number, len(spec.items))
    try:
        control = Control(spec)
        lease = _lease(spec)
        doing.note("waiting for a lease")
        if lease is not None and not _acquire(lease, control, report, doing):
            report.stopped = True  # the run stopped (or its driver is gone) before a lease came
            log.info("batch %d: stopped before it started (the run stopped or its driver gone)", spec.number)
            return report
        doing.note("downloading")
        try:
            from engine.aio import new_event_loop

            loop = new_event_loop()
            try:
                loop.run_until_complete(_run(spec, report, control, doing))
            finally:
                doing.note("closing its event loop")
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()
        finally:
            if lease is not None:
                doing.note("giving back its lease")
                with contextlib.suppress(Exception):  # the scheduler may be gone (the driver was killed)
                    lease.release()
    finally:
        _DOING.pop(spec.number, None)
    report.seconds = time.monotonic() - started
    log.debug(
        "batch %d: %d of %d files done in %.1f s%s",
        spec.number,
        len(report.results),
        len(spec.items),
        report.seconds,
        f", {report.taken_over} parts of gone writers continued" if report.taken_over else "",
    )
    return report


def _log_like_the_driver(level: int) -> None:
    """Handle `engine` records at the driver's level in this worker process: the driver forwards them
    (`Client.forward_logging`) into its own log. Not propagated to the worker's root logger, whose
    last-resort handler would print the warnings a second time on the worker's stderr."""
    engine_log = logging.getLogger("engine")
    engine_log.setLevel(level)
    engine_log.propagate = False


_LEASES: dict[str, Any] = {}  # one Semaphore per run in this worker process (each has a refresh timer)


def _lease(spec: BatchSpec) -> Any:
    """The run's jobs semaphore, made once per worker process and reused by its batches."""
    if not spec.semaphore_name:
        return None
    lease = _LEASES.get(spec.semaphore_name)
    if lease is None:
        from distributed import Semaphore

        lease = _LEASES[spec.semaphore_name] = Semaphore(max_leases=spec.jobs, name=spec.semaphore_name)
    return lease


def _acquire(lease: Any, control: Control, report: BatchReport, doing: _Doing) -> bool:
    """Wait for a lease, but not past a stop of the run or the loss of its driver (every wait is
    bounded: a worker whose driver was killed must not wait for ever, and never ends otherwise)."""
    lost_since: float | None = None
    waited = time.monotonic()
    while True:
        try:
            if lease.acquire(timeout=LEASE_POLL_SECONDS):
                return True
            doing.note()  # waiting its turn is not a stall
            log.debug(
                "batch %d: waiting for one of the run's %d leases (%.0f s so far)",
                report.number,
                lease.max_leases,
                time.monotonic() - waited,
            )
            _until, stop = control.read()
            lost_since = None
        except Exception as err:
            log.debug("batch %d: waiting for a lease: %s", report.number, err)
            stop = False
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > DRIVER_LOST_SECONDS:
                return False
        if stop:
            return False


async def _run(spec: BatchSpec, report: BatchReport, control: Control, doing: _Doing) -> None:
    from engine.fetch.bandwidth import TokenBucket
    from engine.fetch.download import Downloader
    from engine.fetch.session import open_session, read_token

    try:
        token = read_token(spec.token_env)
    except TessMirrorError as err:
        report.fatal = ("config", err.message, err.hint or "")
        return
    if token_digest(token) != spec.token_digest:
        where = f"${spec.token_env}" if spec.token_env else "the token variable"
        report.fatal = (
            "config",
            f"the worker on {report.host} does not have the driver's archive token in {where}",
            f"export {spec.token_env or 'MAST_API_TOKEN'} where the workers start (sbatch passes the "
            "environment on by default)",
        )
        return
    fetch = spec.fetch
    limiter = SharedLimiter(max(fetch.connections, 1))
    verify_pool = ThreadPoolExecutor(max(spec.verify.workers, 1), thread_name_prefix="verify")
    parts: list[ClusterPartFile] = []

    def part_file(path: Path, **kwargs: Any) -> ClusterPartFile:
        part = ClusterPartFile(path, **kwargs)
        parts.append(part)  # kept only to count the parts continued (a flag each)
        return part

    try:
        async with open_session(fetch, token=token, token_hosts=spec.token_hosts) as session:
            downloader = Downloader(
                session,
                fetch,
                spec.verify,
                throttle=limiter,
                bandwidth=TokenBucket(fetch.bandwidth_limit) if fetch.bandwidth_limit else None,
                executor=verify_pool,
                fsync=spec.fsync,
                part_file=part_file,
                meter=doing,  # each byte received is progress (the driver looks for stalled batches)
            )
            try:
                await _download_all(spec, report, control, downloader, limiter, verify_pool, doing)
            finally:
                downloader.close()
    finally:
        verify_pool.shutdown(wait=False, cancel_futures=True)
        report.overloads = limiter.overload_events
        report.decreases = limiter.decreases
        report.taken_over = sum(1 for part in parts if part.taken_over)


async def _download_all(
    spec: BatchSpec,
    report: BatchReport,
    control: Control,
    downloader: Any,
    limiter: SharedLimiter,
    pool: ThreadPoolExecutor,
    doing: _Doing,
) -> None:
    out_dir = Path(spec.out_dir)
    pending = iter(enumerate(spec.items))
    level = VerifyLevel.parse(spec.verify.level)

    async def worker() -> None:
        for index, (item, relpath) in pending:
            doing.in_flight.add(item.filename)
            try:
                result = await _one(out_dir, item, relpath, level, downloader, pool)
            finally:
                doing.in_flight.discard(item.filename)
            report.results.append(pack(index, result))
            doing.done += 1
            doing.note()

    workers = [asyncio.ensure_future(worker()) for _ in range(download_workers(spec.fetch.connections))]
    watcher = asyncio.ensure_future(_watch(control, limiter, report, doing))
    try:
        running = set(workers)
        while running:
            done, _ = await asyncio.wait({*running, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                watcher.result()  # the run asked to stop: end here, the rest stays pending
                report.stopped = True
                break
            for task in done & running:
                running.discard(task)
                task.result()  # a LocalError: below
    except LocalError as err:
        report.fatal = ("local", err.message, err.hint or "")
    finally:
        for task in (*workers, watcher):
            task.cancel()
        await asyncio.gather(*workers, watcher, return_exceptions=True)
        if limiter.publish_until:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(control.publish, limiter.publish_until)


async def _watch(control: Control, limiter: SharedLimiter, report: BatchReport, doing: _Doing) -> None:
    """Apply pauses other workers published, publish ours; return when the run asks to stop. Says
    where the batch is every `BEAT_SECONDS` (DEBUG)."""
    published = 0.0
    lost_since: float | None = None
    beat = time.monotonic()
    while True:
        if time.monotonic() - beat >= BEAT_SECONDS:
            beat = time.monotonic()
            log.debug("%s", doing.describe())
        if limiter.publish_until > published:
            published = limiter.publish_until
            with contextlib.suppress(Exception):  # advisory: the local limiter pauses anyway
                await asyncio.to_thread(control.publish, published)
        try:
            until, stop = await asyncio.to_thread(control.read)
            lost_since = None
        except Exception as err:  # the scheduler is busy or gone: keep going on the local limits
            log.debug("batch %d: cannot read the run's control variables: %s", report.number, err)
            until, stop = 0.0, False
            lost_since = lost_since or time.monotonic()
            # So long without the scheduler: the driver is gone; nobody would record this batch.
            stop = time.monotonic() - lost_since > DRIVER_LOST_SECONDS
        if stop:
            return
        limiter.pause_until(until)
        if limiter.paused_for > 0:
            doing.note()  # waiting out a pause the archive asked for is not a stall
        limiter.told.clear()
        # A pause seen here wakes the watcher at once (asyncio's TimeoutError is the builtin from 3.11).
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await asyncio.wait_for(limiter.told.wait(), POLL_SECONDS)


async def _one(
    out_dir: Path,
    item: PlanItem,
    relpath: str,
    level: VerifyLevel,
    downloader: Any,
    pool: ThreadPoolExecutor,
) -> FileResult:
    """One file: checked in place if a writer already finished it, else downloaded."""
    from engine.layout import resolve_within

    try:
        dest = resolve_within(out_dir, relpath)
    except UnsafePathError as err:
        return FileResult(item, FileStatus.FAILED, path=relpath, error=redact(str(err)))
    try:
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(pool, _already_there, item, relpath, dest, level)
        if found is not None:
            return found
        result: FileResult = await downloader.fetch(item, dest, relpath)
        if result.status is FileStatus.VERIFIED and not result.origin:
            result = replace(result, origin="downloaded")
        return result
    except (LocalError, asyncio.CancelledError):
        raise
    except Exception as err:  # a bug must cost one file, not the batch
        log.debug("internal error while fetching %s", item.filename, exc_info=True)
        return FileResult(item, FileStatus.FAILED, path=relpath, error=redact(f"internal error: {err}"))


def _already_there(item: PlanItem, relpath: str, dest: Path, level: VerifyLevel) -> FileResult | None:
    """A file another writer of this batch already put in place (its worker was killed before the
    batch returned), verified as `item`; None when it must be downloaded."""
    from engine.verify.file import check_file

    if item.size < 0 or not item.md5:
        return None  # nothing declared to prove it is this item's bytes
    try:
        info = os.lstat(dest)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_size != item.size:
        return None
    level = max(level, VerifyLevel.CHECKSUM)
    try:
        digest = check_file(dest, size=item.size, md5=item.md5, level=level)
    except (IntegrityError, OSError):
        return None  # not the declared bytes: the download replaces it
    return FileResult(
        item,
        FileStatus.VERIFIED,
        path=relpath,
        nbytes=info.st_size,
        md5=digest,
        level=level,
        checksum_declared=True,
        origin="adopted",
    )


__all__ = ["BatchReport", "BatchSpec", "Compact", "SharedLimiter", "pack", "run_batch", "unpack"]
