"""Fetch one file: stream it to `<dest>.part`, verify it, then rename it into place.

The hot loop (`Downloader._stream`) copies each network chunk into one preallocated block buffer and
hands whole blocks to a worker thread that updates the md5 and writes them with `os.write`. hashlib
releases the GIL on large buffers, so hashing and disk writes run beside the event loop instead of
stalling every other download; one thread hop per `chunk_size` block (not per network chunk) keeps
the overhead small, and nothing is allocated per chunk except the chunk aiohttp hands us. Measured on
2 cores (24 x 2 MB from a local server, 8 at once): threads ~200 MB/s, the same work inline on the
loop ~188 MB/s; threads also keep a slow filesystem (NFS, Lustre) from freezing the event loop.

Thread hops per file: the last block, the whole-body rules (`StreamCheck.finish`), the FITS check,
fsync and rename share one hop (`Downloader._finish`). A file too small to be resumed from an
earlier run (under `RESUME_MIN_BYTES`) opens its part in the hop of its first block, not in a hop of
its own, so a file of one block (up to `fetch.chunk_size`) costs one hop in all (it was 3-4: open,
block, check, commit): its part is created, locked, written, checked and renamed in one go. A larger
file opens (and locks) its part before its request, to find a part an earlier run left.

Resuming: one `StreamCheck` (with its running md5) and one open `.part` live across all the tries of
one `fetch` call, so a try that breaks mid-body resumes with ``Range: bytes=<have>-`` and
``If-Range: <ETag or Last-Modified>`` without re-reading anything. Without a validator a resume is
only attempted when a declared md5 will catch a spliced file; otherwise the try restarts from zero.

Across runs: at the first answer of a file of at least `RESUME_MIN_BYTES` that declares an md5, the
validator is stored beside the part (`PartFile.save_validator`, before any body byte is written). A
later run finds the part and its validator, re-hashes the kept bytes (~300 MiB/s from the page cache
on the 2-core test machine: 0.3 s for a 100 MB target pixel file, against re-downloading it) and
resumes with Range + If-Range; a 200 restarts from zero. A part without a stored validator, or for
a file without a declared md5, is restarted as before.

Sources (`engine.fetch.sources`): the shell asks the registry for the source of each item (by URL
scheme and `fetch.source`); the source opens the body of one try (redirects, statuses, Range
answers: `engine.fetch.http`; the bucket and its fallback: `engine.fetch.s3`) and hands back a
`Reply`. A 429/503 from any source goes to the limiter here; an md5 the source vouches for (an S3
single-part ETag) is checked against the whole file after the stream checks.

Verification happens before the rename: size/md5/sniff while streaming (engine.verify.stream), then
FITS structure and HDU checksums in `executor` (engine.verify.fits), in the same hop as the last
block and the rename. A failure there is an `IntegrityError`: retried from zero. Only a verified
file is fsynced and renamed to `dest`.

Every write under the output folder goes through `engine.fetch.partfile.PartFile` (directory
descriptors, O_NOFOLLOW, rename relative to the folder's descriptor): a symlink planted under --out is
refused (`UnsafePathError`, recorded as a failure), never followed.

Size caps (`StreamCheck.limit`, see engine.verify.stream): the smallest of the archive's exact size,
its estimate's ceiling, the server's Content-Length, and `fetch.max_file_size` for rows that declare
no size. A Content-Length above the cap is refused before any body byte is read; a body without one is
cut as soon as it passes the cap (one integer comparison per chunk).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from tenacity import RetryCallState
from yarl import URL

from engine.exceptions import (
    ChecksumMismatchError,
    ConnectionLostError,
    HTTPStatusError,
    IdleTimeoutError,
    IntegrityError,
    LocalError,
    TransferError,
    UnsafePathError,
    local_error_from_oserror,
)
from engine.fetch.autotune import RateMeter
from engine.fetch.bandwidth import TokenBucket
from engine.fetch.http import OVERLOAD_STATUSES, Reply, ResumeRefusedError, Route
from engine.fetch.partfile import DirCache, PartFile
from engine.fetch.retry import retrying
from engine.fetch.sources import Sources, build_sources
from engine.fetch.throttle import AdaptiveLimiter
from engine.models import Clock, FileResult, FileStatus, PlanItem, SystemClock, VerifyLevel
from engine.redact import redact
from engine.settings import FetchSettings, VerifySettings
from engine.verify.fits import verify_fits
from engine.verify.stream import StreamCheck, is_fits_item

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["Downloader", "PartFile"]
# A part left by an earlier process is kept for a resume only for files at least this large: below
# it, restarting costs less than writing the validator beside every part (one small file per file).
RESUME_MIN_BYTES = 1024 * 1024
_LOCAL_HINT = "check the output folder's file system, then run again; the manifest resumes the run"

# Block writes and md5 updates run here. Module-wide so that every Downloader shares a few threads;
# the threads start lazily and Python joins them at exit.
_IO_POOL = concurrent.futures.ThreadPoolExecutor(
    max_workers=min(32, (os.cpu_count() or 1) + 4), thread_name_prefix="tessmirror-io"
)


def _resumable(item: PlanItem) -> bool:
    """A part of this file left by an earlier run may be continued (see `RESUME_MIN_BYTES`)."""
    return max(item.size, item.est_kb * 1024) >= RESUME_MIN_BYTES


def _root_of(dest: Path, relpath: str) -> Path:
    """The output folder: `dest` without the directories `relpath` adds (dest = root/relpath)."""
    depth = relpath.count("/")
    return dest.parents[depth] if depth < len(dest.parents) else dest.parent


def local_error(exc: OSError, path: Path) -> LocalError:
    """The run-stopping LocalError a filesystem error under --out means (the project's one table:
    a full disk or quota is DiskFullError, EACCES/EPERM/EROFS PermissionDeniedError)."""
    return local_error_from_oserror(exc, path, "write", hint=_LOCAL_HINT)


@dataclass(slots=True)
class _Transfer:
    """The state of one file across its tries."""

    item: PlanItem
    part: PartFile
    check: StreamCheck
    buffer: bytearray
    dest: Path
    view: memoryview = field(init=False)
    committed: bool = False  # verified and renamed to `dest` (done in the last block's thread hop)
    opened: bool = False  # the part is open (a file that cannot be resumed opens it with its first block)
    validator: str | None = None  # ETag or Last-Modified, for If-Range
    restart: bool = False  # the bytes so far are unusable: start the next try from zero
    route: Route = field(default_factory=Route)  # which source served it, and any fallback
    saved_validator: str | None = None  # the validator stored beside the part (for a later run)
    etag_md5: str = ""  # a second md5 the whole file must have (an S3 single-part ETag)

    def __post_init__(self) -> None:
        self.view = memoryview(self.buffer)


def _open_part(t: _Transfer) -> None:
    """Open the part if it is not open yet (in an I/O thread). A file too small to be resumed from an
    earlier run opens it here, with its first block, instead of in a thread hop of its own; bytes an
    earlier run left are dropped, as `Downloader._take_over` drops them for such a file."""
    if t.opened:
        return
    t.part.open()
    t.opened = True
    if t.part.kept:
        t.part.truncate()  # also removes a stored validator: it vouched for the bytes just dropped


def _absorb_block(t: _Transfer, block: bytes | memoryview) -> None:
    """Hash, count and write one block (runs in an I/O thread; check first, so a refused block is not
    written)."""
    _open_part(t)
    t.check.feed(block)
    t.part.write(block)


def _describe(exc: BaseException, limit: int = 160) -> str:
    """A one-line, bounded description of a client error.

    aiohttp's parser errors quote the bytes it choked on (e.g. "Bad status line" followed by a FITS
    header the server wrote where a status line belongs); those must not reach the manifest or logs.
    """
    first = re.split(r"\n|\\n", str(exc), maxsplit=1)[0]  # a real newline, or an escaped one
    text = " ".join(first.replace("message='", "").split()).rstrip(":'") or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _NotFetchable(TransferError):
    """A URL no try can fetch (malformed, or a scheme no source serves)."""

    retryable = False


class Downloader:
    """Downloads and verifies one PlanItem at a time per `fetch` call; many calls may run at once.

    `fetch` never raises for a per-file problem: it returns a FAILED FileResult with the reason. It
    raises only LocalError subclasses (disk full, permissions) and asyncio.CancelledError.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        fetch: FetchSettings,
        verify: VerifySettings,
        *,
        clock: Clock | None = None,
        throttle: AdaptiveLimiter | None = None,
        bandwidth: TokenBucket | None = None,
        executor: concurrent.futures.Executor | None = None,
        fsync: bool = True,
        part_file: Callable[..., PartFile] = PartFile,
        sources: Sources | None = None,
        meter: RateMeter | None = None,
    ) -> None:
        self._session = session
        self._settings = fetch
        self._level = VerifyLevel.parse(verify.level)
        self._clock = clock or SystemClock()
        self._throttle = throttle
        self._bandwidth = bandwidth
        self._meter = meter  # --concurrency auto's tuner: body bytes and times to first byte
        self._executor = executor  # for FITS checks; None: the loop's default thread pool
        self._fsync = fsync
        self._part_file = part_file
        self._estimate_warned = False
        self._dirs = DirCache()  # descriptors of the folders files go to (never path facts)
        # Which source serves each file: from `fetch.source` and the URL's scheme (sources.py).
        self.sources = sources or build_sources(fetch, self._clock)

    def close(self) -> None:
        """Close the cached folder descriptors (also done when the Downloader is garbage collected)."""
        self._dirs.close()

    # -- the public call ---------------------------------------------------------------------------
    async def fetch(self, item: PlanItem, dest: Path, relpath: str) -> FileResult:
        """Download `item` to `dest` (already checked to lie inside the output folder)."""
        started = self._clock.monotonic()
        part = self._part_file(
            dest.with_name(dest.name + ".part"), root=_root_of(dest, relpath), cache=self._dirs
        )
        check = StreamCheck(
            item,
            self._level,
            est_tolerance=self._settings.est_size_tolerance,
            max_file_size=self._settings.max_file_size,
        )
        # A small file needs no block buffer larger than itself (the cap is its exact size or less).
        capacity = max(min(self._settings.chunk_size, check.limit), 1)
        transfer = _Transfer(item, part, check, bytearray(capacity), dest)
        attempts = 0
        try:
            try:
                part.resume = True
                if _resumable(item):
                    await self._io(part.path, part.open)
                    transfer.opened = True
                    if part.kept:
                        await self._take_over(transfer)
                # else: the part is opened in the thread hop of the first block (`_open_part`)
                async for attempt in retrying(
                    self._settings, self._clock, before_sleep=self._log_retry(item)
                ):
                    with attempt:
                        attempts += 1
                        nbytes, md5 = await self._try_once(transfer)
                if not transfer.committed:
                    await self._io(part.path, lambda: part.commit(dest, fsync=self._fsync))
                self._warn_if_off_estimate(check)
            except (TransferError, UnsafePathError) as exc:
                await self._io(part.path, part.discard)
                # An unsafe path keeps its hint (what to fix on disk), as the planner's refusals do.
                reason = str(exc) if isinstance(exc, UnsafePathError) else exc.message
                return FileResult(
                    item=item,
                    status=FileStatus.FAILED,
                    path=relpath,
                    error=redact(reason),
                    attempts=attempts,
                    elapsed=self._clock.monotonic() - started,
                    source=transfer.route.source,
                    note=transfer.route.note,
                )
        finally:
            part.close()  # no-op after commit/discard; on cancellation the .part stays for next time
        return FileResult(
            item=item,
            status=FileStatus.VERIFIED,
            path=relpath,
            nbytes=nbytes,
            md5=md5,
            level=self._level,
            checksum_declared=check.checksum_declared,
            attempts=attempts,
            elapsed=self._clock.monotonic() - started,
            # Where the bytes came from ("s3", "mast") and why not the chosen source (a fallback).
            source=transfer.route.source,
            note=transfer.route.note,
        )

    async def _take_over(self, t: _Transfer) -> None:
        """Continue a part an earlier run left, with the validator stored beside it.

        Only with a declared md5 at checksum level (it proves the spliced file whole) and for a file
        worth it; the kept bytes are re-hashed first so the md5 covers the whole file (a few hundred
        MB/s, see docs/CLOUD.md). Anything else, or bytes that already break the checks: from zero.
        """
        part, check = t.part, t.check
        if part.kept_validator and check.checksum_declared and _resumable(t.item):
            try:
                await self._io(part.path, part.replay, check.feed, len(t.buffer))
            except IntegrityError:
                pass
            else:
                t.validator = t.saved_validator = part.kept_validator
                log.info("%s: resuming a part from an earlier run at byte %d", t.item.filename, check.nbytes)
                return
        await self._restart(t)

    def _log_retry(self, item: PlanItem) -> Callable[[RetryCallState], None]:
        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            reason = redact(getattr(exc, "message", exc))
            # DEBUG: the bar and the summary count retries; a 429 storm must not scroll over the bar.
            log.debug(
                "%s: try %d failed (%s); retrying in %.1f s",
                item.filename,
                state.attempt_number,
                reason,
                wait,
            )

        return before_sleep

    # -- one try -----------------------------------------------------------------------------------
    async def _try_once(self, t: _Transfer) -> tuple[int, str]:
        try:
            headers = await self._resume_headers(t)
            if self._throttle is None:
                tail = await self._request(t, headers)
            else:
                async with self._throttle.slot():
                    tail = await self._request(t, headers)
            if self._meter is not None and tail:
                self._meter.add_bytes(tail)
            # The last block, the size/md5 rules, the FITS check, fsync and rename: one thread hop,
            # so a mirror of small files pays one hop a file (the FITS check's pool when it runs).
            fits = self._level >= VerifyLevel.FITS and is_fits_item(t.item)
            pool = self._executor if fits and self._executor is not None else _IO_POOL
            return await self._io(t.part.path, self._finish, t, tail, fits, pool=pool)
        except IntegrityError:
            t.restart = True  # a fresh copy may be right; these bytes are not
            raise

    def _finish(self, t: _Transfer, tail: int, fits: bool) -> tuple[int, str]:
        """Absorb the last `tail` bytes of the buffer, apply the whole-body rules, check the FITS
        structure, then (only if all passed) fsync and rename. Runs in a thread.

        verify_fits reads the part through its folder's descriptor (`PartFile.read_path`), so a
        folder swapped for a symlink meanwhile cannot make it read other bytes than ours.
        """
        _open_part(t)  # an empty body still leaves an (empty) part to check and rename
        if tail:
            _absorb_block(t, t.view[:tail])
        nbytes, md5 = t.check.finish()
        if t.etag_md5 and md5 and md5 != t.etag_md5:
            raise ChecksumMismatchError(
                f"{t.item.filename}: md5 {md5} does not match the ETag {t.etag_md5} the bucket sent",
                hint="the copy was corrupted in transit; it will be fetched again",
            )
        if fits:
            verify_fits(t.part.read_path())
        t.part.commit(t.dest, fsync=self._fsync)
        t.committed = True
        return nbytes, md5

    def _warn_if_off_estimate(self, check: StreamCheck) -> None:
        """A verified file whose size is far from its estimate: a warning, once per Downloader (the
        archive's estimates are rounded and sometimes stale; such a file is still good)."""
        if not check.off_estimate:
            return
        item = check.item
        if self._estimate_warned:
            log.debug("%s: %d bytes, estimate %d kB", item.filename, check.nbytes, item.est_kb)
            return
        self._estimate_warned = True
        log.warning(
            "%s: %d bytes, far from the archive's estimate of %d kB; kept (it passed its checks). "
            "Further files off their estimate are logged at DEBUG",
            item.filename,
            check.nbytes,
            item.est_kb,
        )

    async def _restart(self, t: _Transfer) -> None:
        if t.opened:
            await self._io(t.part.path, t.part.truncate)  # also drops a stored validator
        t.saved_validator = None
        t.check.reset()
        t.restart = False

    async def _resume_headers(self, t: _Transfer) -> dict[str, str]:
        """Range/If-Range for a resume, or restart from zero when resuming could splice two versions."""
        if t.restart:
            await self._restart(t)
        have = t.check.nbytes
        if not have:
            return {}
        if t.validator:
            return {"Range": f"bytes={have}-", "If-Range": t.validator}
        if t.check.checksum_declared:
            return {"Range": f"bytes={have}-"}  # the declared md5 will catch a changed file
        await self._restart(t)
        return {}

    async def _request(self, t: _Transfer, headers: dict[str, str]) -> int:
        """One request; returns how many bytes of the body's end still wait in the buffer."""
        idle = self._settings.idle_timeout
        source = self.sources.for_item(t.item)
        try:
            if source is None:
                raise _NotFetchable(f"refusing {t.item.url}: no source serves this URL's scheme")
            sent = self._clock.monotonic()
            reply = await source.open(
                self._session,
                t.item,
                headers,
                resumed_from=t.check.nbytes if headers else 0,
                route=t.route,
            )
            if self._meter is not None:
                self._meter.add_first_byte(self._clock.monotonic() - sent)
            try:
                tail = await self._receive(t, reply)
            except BaseException:
                reply.response.close()  # drop the connection: an unread or hostile body must not be reused
                raise
            reply.response.release()
            return tail
        except ResumeRefusedError:
            t.restart = True
            raise
        except HTTPStatusError as exc:
            if exc.status in OVERLOAD_STATUSES and self._throttle is not None:
                self._throttle.on_overload(exc.retry_after)
            raise
        except (aiohttp.SocketTimeoutError, aiohttp.ServerTimeoutError, TimeoutError):
            raise IdleTimeoutError(
                f"no data for {idle:g} s from {URL(t.item.url).host}",
                hint="the archive is slow or stalled; raise fetch.idle_timeout if this persists",
            ) from None
        except aiohttp.InvalidURL as exc:
            raise _NotFetchable(f"invalid URL {exc}") from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise ConnectionLostError(f"connection lost: {_describe(exc)}") from None
        except aiohttp.ClientError as exc:
            raise ConnectionLostError(f"HTTP client error: {_describe(exc)}") from None

    async def _receive(self, t: _Transfer, reply: Reply) -> int:
        if reply.restart and t.check.nbytes:  # the server ignored Range or If-Range failed
            await self._restart(t)
        t.validator = reply.validator or t.validator
        t.etag_md5 = reply.md5
        t.check.expect_total(reply.total)
        if t.validator != t.saved_validator and self._worth_keeping(t, reply.total):
            # Beside the part before any body byte: a later run may continue only bytes it vouches for.
            await self._io(t.part.path, _open_part, t)
            await self._io(t.part.path, t.part.save_validator, t.validator)
            t.saved_validator = t.validator
        tail = await self._stream(t, reply.response)
        expected = t.item.size if t.item.size >= 0 else reply.total
        if expected is not None and t.check.nbytes + tail < expected:
            # A clean end before the announced length: resumable, like a reset.
            if tail:
                await self._absorb(t, t.view[:tail])
            raise ConnectionLostError(f"the body ended after {t.check.nbytes} of {expected} bytes")
        if self._throttle is not None:
            self._throttle.on_success()
        return tail

    def _worth_keeping(self, t: _Transfer, total: int | None) -> bool:
        """Store the validator for a later run only where a resume could happen and pays."""
        if not t.validator or not t.check.checksum_declared:
            return False
        return max(t.item.size, total or 0, t.item.est_kb * 1024) >= RESUME_MIN_BYTES

    # -- the hot loop ------------------------------------------------------------------------------
    async def _stream(self, t: _Transfer, response: aiohttp.ClientResponse) -> int:
        """Copy the body into the block buffer, handing each full block to an I/O thread. Returns
        how many bytes of the last block are still in the buffer (`_finish` takes them)."""
        check, view, bandwidth = t.check, t.view, self._bandwidth
        capacity = len(view)
        limit = check.limit
        received = check.nbytes
        filled = 0
        try:
            async for chunk in response.content.iter_any():
                size = len(chunk)
                received += size
                if received > limit:  # stop reading at once: a hostile body must not fill the disk
                    check.check_running_length(received)
                if not check.sniffed:  # refuse an error page on its first bytes
                    check.sniff(chunk)
                if bandwidth is not None:
                    await bandwidth.consume(size)
                if filled + size > capacity:
                    if filled:
                        await self._absorb(t, view[:filled])
                        filled = 0
                    if size >= capacity:
                        await self._absorb(t, chunk)
                        continue
                view[filled : filled + size] = chunk
                filled += size
        except (aiohttp.ClientError, TimeoutError):
            if filled:  # the bytes before the break are good: keep them for the resume
                await self._absorb(t, view[:filled])
            raise
        return filled

    async def _absorb(self, t: _Transfer, block: bytes | memoryview) -> None:
        if self._meter is not None:
            self._meter.add_bytes(len(block))
        await self._io(t.part.path, _absorb_block, t, block)

    async def _io(
        self, path: Path, fn: Callable[..., T], *args: Any, pool: concurrent.futures.Executor = _IO_POOL
    ) -> T:
        """Run blocking file work in `pool` (the I/O pool); translate OSError into LocalError.

        On cancellation, a block already being written is waited for (briefly) so that no thread is
        still writing into the file descriptor when `fetch` closes it.
        """
        job = pool.submit(fn, *args)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            if not job.cancel():
                concurrent.futures.wait([job])
            raise
        except OSError as exc:
            raise local_error(exc, path) from exc
