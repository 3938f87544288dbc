"""The archive's file server: MAST's `/api/v0.1/Download/file?uri=...`, with faults on demand.

Three ways in, as on the real service:

* the Download API, `/api/v0.1/Download/file?uri=mast:TESS/product/<file>`: it serves the file, or,
  with `s3_base` set, answers `302 Found` with `Location` on the *second host*, the way MAST sends
  clients to `stpubdata.s3.amazonaws.com/tess/public/...`;
* plain paths, `/files/<ArchiveFile.path>` (archive.stsci.edu's `tid/sNNNN/...` and `ffi/...` trees);
* the second host (its own socket and port), `/stpubdata/<key>` in MAST's cloud key layout
  (`tess/public/tid/...`, `tess/public/ffi/sNNNN/YYYY/DDD/C-D/...`), with S3's validators: the
  ETag is the file's md5 (a single-part upload), Range and If-Range are honoured.

With `S3Shape` (the archive's `s3` option) the second host behaves like the bucket for clients that
go to it directly (`--source s3`): S3's XML errors (`NoSuchKey` 404, `AccessDenied` 403) for keys
left out of the bucket (`S3Shape.missing_fraction`/`missing_names`), multipart-style ETags
(`<hex>-<parts>`, not an md5) for `S3Shape.multipart_fraction` of the objects, the `slowdown` fault
(503 with `<Code>SlowDown</Code>`), and MAST's `path_lookup` on the API host. A file missing from
the bucket is served by the Download API itself (no redirect), as MAST serves what is not in the
cloud.

On a redirect the API counts the attempt and answers the status faults (500, 503, html, redirect,
...); the second host counts its own GETs and applies the body faults, latency and bandwidth. A file
picked by `chunked_fraction` (a coin fixed by seed and name) is always sent without Content-Length.

Files are materialised lazily: the first request for a file renders it (in a thread) into the data
directory with an atomic rename, and every request after that is a plain file. A clean answer is
aiohttp's `FileResponse` (sendfile, Range/206/416, ETag). A faulted one (see `faults.py`) is streamed
by hand so it can be slowed, cut, reset, stalled or corrupted; it keeps the same ETag and Range
rules so clients cannot tell the two apart until the fault strikes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from engine.archive.catalog import DOWNLOAD_PATH, FILES_PATH, S3_PATH, ArchiveFile, Catalog, draw, s3_key
from engine.archive.faults import LIE_EXTRA, OVERLONG_EXTRA, Decision, FaultPlan

PATH_LOOKUP_PATH = "/api/v0.1/path_lookup/"  # MAST: product URIs -> cloud paths (astroquery)
S3_ERRORS = {"NoSuchKey": 404, "AccessDenied": 403}

_HTML_ERROR_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>Service Unavailable</title></head>\n"
    "<body><h1>MAST is temporarily unavailable</h1><p>Please try again later.</p></body></html>\n"
)


@dataclass(frozen=True, slots=True)
class S3Shape:
    """How the S3-shaped host differs from a plain file server (see the module docstring)."""

    multipart_fraction: float = 0.0  # objects whose ETag is multipart-style (not their md5)
    missing_fraction: float = 0.0  # objects left out of the bucket (a coin by seed and name)
    missing_names: frozenset[str] = frozenset()  # and these file names
    missing_error: str = "NoSuchKey"  # what a missing key answers: NoSuchKey (404) or AccessDenied (403)
    path_lookup: bool = True  # serve MAST's path_lookup on the API host
    # path_lookup answers another key than the bucket's layout (a moved bucket, a changed mapping):
    # a client must notice and not trust its computed keys.
    path_lookup_disagrees: bool = False

    def __post_init__(self) -> None:
        for name in ("multipart_fraction", "missing_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} {getattr(self, name)} is not a fraction; use 0 to 1")
        if self.missing_error not in S3_ERRORS:
            raise ValueError(f"missing_error {self.missing_error!r}: use one of {', '.join(S3_ERRORS)}")


def s3_error(code: str, status: int, key: str) -> web.Response:
    """An S3 XML error document (`NoSuchKey`, `AccessDenied`, `SlowDown`)."""
    body = (
        "<?xml version='1.0' encoding='UTF-8'?>\n"
        f"<Error><Code>{code}</Code><Key>{quote(key, safe='/')}</Key></Error>\n"
    )
    return web.Response(status=status, text=body, content_type="application/xml")


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One file request the server answered (or broke on purpose)."""

    method: str
    name: str  # the file name ("" when the uri was malformed)
    status: int
    range: str  # the Range header as sent ("" when none)
    time: float  # time.time() when it arrived
    attempt: int = 0  # the file's GET count including this one (0 for HEAD and 404)
    fault: str = ""  # the injected fault(s), e.g. "503" or "reset"
    host: str = "api"  # "api" (Download API), "files" (plain paths) or "s3" (the second host)


class FileStore:
    """Renders catalogue files to `directory` on first use (atomically) and hands out their paths."""

    def __init__(self, catalog: Catalog, directory: Path) -> None:
        self.catalog = catalog
        self.directory = directory
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def _write(self, entry: ArchiveFile, target: Path) -> None:
        pieces = self.catalog.render(entry.identity)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as handle:
            for piece in pieces:
                handle.write(piece)
        os.replace(temporary, target)  # readers see no file or the whole file, never a part

    async def path(self, entry: ArchiveFile) -> Path:
        # The on-disk name is the identity's (always a plain generated name), never `entry.name`: a
        # hostile catalogue name like `../../x_lc.fits` must not steer where the archive writes.
        target = self.directory / entry.identity.name
        with contextlib.suppress(FileNotFoundError):
            if target.stat().st_size == entry.size:
                return target
        async with self._locks[entry.identity.name]:  # one render per file even under concurrent requests
            with contextlib.suppress(FileNotFoundError):
                if target.stat().st_size == entry.size:
                    return target
            await asyncio.to_thread(self._write, entry, target)
        return target


def _etag(stat: os.stat_result) -> str:
    """The same entity tag aiohttp's FileResponse sends, so faulted and clean answers agree."""
    return f"{stat.st_mtime_ns:x}-{stat.st_size:x}"


def _if_range_allows(request: web.BaseRequest, etag: str, mtime: float) -> bool:
    """RFC 9110 If-Range: honour Range only if the validator still matches (ETag or date)."""
    value = request.headers.get("If-Range")
    if value is None:
        return True
    value = value.strip()
    if value.startswith(('"', "W/")):
        return not value.startswith("W/") and value.strip('"') == etag
    when = request.if_range
    return when is not None and int(mtime) <= when.timestamp()


class FileServer:
    """The aiohttp handlers for file downloads; `request_log` records every answer."""

    def __init__(
        self,
        catalog: Catalog,
        store: FileStore,
        faults: Callable[[], FaultPlan],
        *,
        chunked_fraction: float = 0.0,
        s3_base: Callable[[], str] | None = None,
        redirect: bool | None = None,
        s3: S3Shape | None = None,
    ) -> None:
        """`s3_base`: the second host's base URL (once bound). `redirect` (default: whether there is
        a second host) sends the API's downloads there with a 302. `s3`: the bucket's shape."""
        if not 0.0 <= chunked_fraction <= 1.0:
            raise ValueError(f"chunked_fraction {chunked_fraction} is not a fraction; use 0 to 1")
        self.catalog = catalog
        self.store = store
        self._faults = faults
        self.chunked_fraction = chunked_fraction
        self._s3_base = s3_base
        self.redirect = s3_base is not None if redirect is None else redirect and s3_base is not None
        self.s3 = s3 or S3Shape()
        self.request_log: list[RequestRecord] = []
        self.attempts: dict[str, int] = defaultdict(int)  # GETs per file name, for fault decisions
        self.s3_attempts: dict[str, int] = defaultdict(int)  # GETs per file name on the second host
        self.closing = asyncio.Event()  # set on shutdown: stalled responses give up
        self._link: LinkBucket | None = None
        self._by_key = {s3_key(entry.path): entry for entry in catalog.values() if entry.path}

    def add_routes(self, app: web.Application) -> None:
        for path in (DOWNLOAD_PATH, DOWNLOAD_PATH + "/"):  # MAST's bulk scripts use the trailing slash
            app.router.add_get(path, self.handle)  # add_get also answers HEAD
        app.router.add_get(FILES_PATH + "{tail:.*}", self.handle_path)
        if self._s3_base is not None and self.s3.path_lookup:
            app.router.add_get(PATH_LOOKUP_PATH, self.handle_path_lookup)
        app.on_response_prepare.append(_report_file_response)

    def add_s3_routes(self, app: web.Application) -> None:
        """The second host's one route (mount it on its own application and socket)."""
        app.router.add_get(S3_PATH + "{key:.*}", self.handle_s3)

    def s3_url(self, entry: ArchiveFile) -> str:
        assert self._s3_base is not None
        return f"{self._s3_base()}{S3_PATH}{s3_key(entry.path)}"

    def in_bucket(self, entry: ArchiveFile) -> bool:
        """Whether the bucket holds this file (the `missing_*` knobs leave some out)."""
        if not entry.path or entry.name in self.s3.missing_names:
            return False
        fraction = self.s3.missing_fraction
        return not (fraction > 0 and draw(self.catalog.seed, "s3missing", entry.name) < fraction)

    def s3_etag(self, entry: ArchiveFile) -> str:
        """S3's ETag: the md5 (a single-part upload), or `<hex>-<parts>` for a multipart one."""
        fraction = self.s3.multipart_fraction
        if fraction > 0 and draw(self.catalog.seed, "multipart", entry.name) < fraction:
            parts = max(2, -(-entry.size // (8 * 1024 * 1024)))
            return f"{hashlib.md5(bytes.fromhex(entry.md5), usedforsecurity=False).hexdigest()}-{parts}"
        return entry.md5

    async def handle_path_lookup(self, request: web.Request) -> web.Response:
        """MAST's `path_lookup`: each `uri` -> {"path": its cloud path, or null when not in the cloud}."""
        answer: dict[str, dict[str, str | None]] = {}
        for uri in request.query.getall("uri", [])[:1000]:
            entry = self.catalog.lookup_uri(uri)
            path = s3_key(entry.path) if entry is not None and self.in_bucket(entry) else None
            if path and self.s3.path_lookup_disagrees:
                path = path.replace("tess/public/", "tess/public/moved/", 1)
            answer[uri] = {"path": f"/{path}" if path else None}
        return web.json_response(answer)

    def chunked(self, entry: ArchiveFile) -> bool:
        """Whether this file is always sent without Content-Length (fixed by seed and name)."""
        fraction = self.chunked_fraction
        return fraction > 0 and draw(self.catalog.seed, "chunked", entry.name) < fraction

    def _log(
        self,
        request: web.BaseRequest,
        name: str,
        status: int,
        started: float,
        attempt: int,
        fault: str,
        host: str = "api",
    ) -> None:
        record = RequestRecord(
            request.method, name, status, request.headers.get("Range", ""), started, attempt, fault, host
        )
        self.request_log.append(record)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The Download API: the file itself, or a 302 to the second host when redirects are on."""
        started = time.time()
        uri = request.query.get("uri", "")
        entry = self.catalog.lookup_uri(uri)
        if entry is None:
            name = uri.rsplit("/", 1)[-1] if uri.startswith("mast:") else ""
            self._log(request, name, 404, started, 0, "")
            return web.Response(status=404, text=f"404 Not Found: no file for uri {uri!r}\n")
        if not self.redirect or not self.in_bucket(entry):
            return await self._serve(request, entry, started, "api")
        attempt, decision = 0, Decision()
        if request.method != "HEAD":
            self.attempts[entry.name] += 1
            attempt = self.attempts[entry.name]
            decision = self._faults().decide(entry.name, attempt)
        if decision.status:
            response = self._status_fault(decision, request, entry)
        else:
            location = self.s3_url(entry)
            response = web.Response(
                status=302, text=f"302 Found: {location}\n", headers={"Location": location}
            )
        self._log(request, entry.name, response.status, started, attempt, decision.status or "")
        return response

    async def handle_path(self, request: web.Request) -> web.StreamResponse:
        """Plain path URLs, `/files/<path>`: served directly (no redirect), like archive.stsci.edu."""
        started = time.time()
        raw = request.raw_path.split("?", 1)[0]
        entry = self.catalog.lookup_path(raw[len(FILES_PATH) :])
        if entry is None:
            self._log(request, raw.rsplit("/", 1)[-1], 404, started, 0, "", "files")
            return web.Response(status=404, text=f"404 Not Found: no file at {raw!r}\n")
        return await self._serve(request, entry, started, "files")

    async def handle_s3(self, request: web.Request) -> web.StreamResponse:
        """The second host: S3-style keys, S3's ETag, S3's XML errors, body faults and `slowdown`."""
        started = time.time()
        raw = request.raw_path.split("?", 1)[0][len(S3_PATH) :]
        entry = self._by_key.get(raw) or self._by_key.get(quote(unquote(raw), safe="/"))
        if entry is None or not self.in_bucket(entry):
            code = "NoSuchKey" if entry is None else self.s3.missing_error
            name = entry.name if entry is not None else unquote(raw.rsplit("/", 1)[-1])
            self._log(request, name, S3_ERRORS[code], started, 0, code, "s3")
            return s3_error(code, S3_ERRORS[code], unquote(raw))
        return await self._serve(request, entry, started, "s3")

    async def _serve(
        self, request: web.Request, entry: ArchiveFile, started: float, host: str
    ) -> web.StreamResponse:
        """Answer with the file's bytes (or the faults due for this attempt) on one of the hosts."""
        s3 = host == "s3"
        counter = self.s3_attempts if s3 else self.attempts
        if request.method == "HEAD":
            decision, attempt = Decision(), 0
        else:
            counter[entry.name] += 1
            attempt = counter[entry.name]
            decision = self._faults().decide(entry.name, attempt, statuses=not s3, s3=s3)
        if decision.latency:
            await asyncio.sleep(decision.latency)
        if decision.status == "slowdown":
            response = s3_error("SlowDown", 503, s3_key(entry.path))
            self._log(request, entry.name, 503, started, attempt, "slowdown", host)
            return response
        if decision.status:
            response = self._status_fault(decision, request, entry)
            self._log(request, entry.name, response.status, started, attempt, decision.label, host)
            return response
        path = await self.store.path(entry)

        def on_sent(status: int) -> None:
            self._log(request, entry.name, status, started, attempt, decision.label, host)

        link = self._link_bucket()
        chunked = self.chunked(entry)
        etag = self.s3_etag(entry) if s3 else None
        # A HEAD has no body to spoil or throttle: always the clean answer.
        if (
            not s3
            and not chunked
            and (request.method == "HEAD" or not (decision.body or decision.bandwidth or link))
        ):
            return await self._clean(request, path, on_sent)
        if request.method == "HEAD":
            decision = Decision()
        return await self._stream(request, path, decision, on_sent, link, etag=etag, chunked=chunked)

    def _link_bucket(self) -> LinkBucket | None:
        """The shared bucket for the current plan's `linkcap` (rebuilt when the rate changes)."""
        rate = self._faults().linkcap
        if not rate:
            self._link = None
        elif self._link is None or self._link.rate != rate:
            self._link = LinkBucket(rate)
        return self._link

    @staticmethod
    def _status_fault(decision: Decision, request: web.Request, entry: ArchiveFile) -> web.Response:
        if decision.status == "html":
            return web.Response(status=200, text=_HTML_ERROR_PAGE, content_type="text/html")
        if decision.status == "redirect":
            location = {
                "ftp": f"ftp://127.0.0.1/{entry.identity.name}",
                "file": "file:///etc/passwd",
                "http": str(request.url),  # the same download again: a new attempt (or a loop)
            }[decision.redirect_to]
            return web.Response(status=302, text=f"302 Found: {location}\n", headers={"Location": location})
        status = int(decision.status or 500)
        headers = {}
        if status in (429, 503):
            headers["Retry-After"] = f"{decision.retry_after:g}"
        reason = {500: "Internal Server Error", 502: "Bad Gateway", 429: "Too Many Requests"}
        text = f"{status} {reason.get(status, 'Service Unavailable')}\n"
        return web.Response(status=status, text=text, headers=headers)

    async def _clean(
        self, request: web.Request, path: Path, on_sent: Callable[[int], None]
    ) -> web.StreamResponse:
        stat = path.stat()
        if not _if_range_allows(request, _etag(stat), stat.st_mtime) and "Range" in request.headers:
            # aiohttp only understands date validators in If-Range; drop Range for a stale ETag.
            headers = request.headers.copy()
            del headers["Range"]
            request = request.clone(headers=headers)
        response_headers = {"Content-Type": "application/fits", "Accept-Ranges": "bytes"}
        return _LoggedFileResponse(path, request, on_sent, headers=response_headers)

    async def _stream(
        self,
        request: web.Request,
        path: Path,
        decision: Decision,
        on_sent: Callable[[int], None],
        link: LinkBucket | None = None,
        *,
        etag: str | None = None,
        chunked: bool = False,
    ) -> web.StreamResponse:
        """Send the file (or its asked range) by hand: faults, pacing, S3's ETag, chunked encoding."""
        stat = path.stat()
        size, etag = stat.st_size, etag or _etag(stat)
        start, stop = 0, size
        response = web.StreamResponse()
        response.headers["Accept-Ranges"] = "bytes"
        response.content_type = "application/fits"
        response.etag = etag
        response.last_modified = stat.st_mtime
        if "Range" in request.headers and _if_range_allows(request, etag, stat.st_mtime):
            try:
                asked = request.http_range
            except ValueError:
                asked = None
            if asked is None or (asked.start is not None and asked.start >= size):
                response.set_status(416)
                response.headers["Content-Range"] = f"bytes */{size}"
                await response.prepare(request)
                on_sent(416)
                return response
            if asked.start is not None:
                if asked.start < 0:
                    start = max(0, size + asked.start)
                else:
                    start, stop = asked.start, min(asked.stop if asked.stop is not None else size, size)
                response.set_status(206)
                response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        if request.method == "HEAD":
            if not chunked:
                response.content_length = stop - start
            await response.prepare(request)
            on_sent(response.status)
            await response.write_eof()
            return response
        if decision.body is None:
            # Clean bytes (the second host, a chunked file, or only paced): streamed from the file a
            # piece at a time, so a 35 MB FFI is never held whole.
            if chunked:
                response.enable_chunked_encoding()
            else:
                response.content_length = stop - start
            await response.prepare(request)
            on_sent(response.status)
            for offset in range(start, stop, _PIECE):
                piece = await asyncio.to_thread(_read_range, path, offset, min(stop, offset + _PIECE))
                await _send(response, memoryview(piece), decision.bandwidth, link)
            await response.write_eof()
            return response
        data = bytearray(await asyncio.to_thread(_read_range, path, start, stop))
        if decision.body == "overlong":
            # No Content-Length at all (chunked): nothing but the client's own cap ends the body early.
            response.enable_chunked_encoding()
            data += _filler(OVERLONG_EXTRA)
        elif chunked and decision.body != "lie":  # a `lie` needs its (understated) Content-Length
            response.enable_chunked_encoding()  # as dynamically generated answers come: no length
        else:
            response.content_length = stop - start
        await response.prepare(request)
        on_sent(response.status)  # logged once the headers are out, before the body (and its fault)

        cut = len(data)
        if decision.body in ("reset", "short"):
            cut = len(data) // 2
        elif decision.body == "stall":
            cut = min(decision.stall_after, max(0, len(data) - 1))
        elif decision.body == "wrong" and data:
            middle = len(data) // 2  # flipped in the middle: the size stays right, the md5 does not
            data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
        tail = b""
        if decision.body == "lie" and len(data) > 1:
            # aiohttp clips a body at its Content-Length, so the last bytes and the surplus go straight
            # onto the socket, in one write: the client reads them together, as from a lying server.
            cut = max(1, len(data) - 4096)
            tail = bytes(data[cut:]) + _filler(LIE_EXTRA)
        await _send(response, memoryview(data)[:cut], decision.bandwidth, link)

        transport = request.transport
        if tail and transport is not None:
            if link is not None:
                await link.take(len(tail))
            transport.write(tail)
            await response.write_eof()
        elif decision.body == "reset" and transport is not None:
            _abort_with_rst(transport)
        elif decision.body == "short" and transport is not None:
            transport.close()
        elif decision.body == "stall":
            await self._stall(request, decision.stall_seconds)
            if request.transport is not None:
                request.transport.close()
        else:
            await response.write_eof()
        return response

    async def _stall(self, request: web.Request, seconds: float) -> None:
        """Go silent until `seconds` pass, the client leaves, or the archive shuts down."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.closing.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self.closing.wait(), timeout=min(0.2, max(0.0, deadline - time.monotonic()))
                )


class _LoggedFileResponse(web.FileResponse):
    """A FileResponse prepared against a given request (e.g. one without Range) that reports its status."""

    def __init__(
        self, path: Path, request: web.Request, on_sent: Callable[[int], None], **kwargs: Any
    ) -> None:
        super().__init__(path, **kwargs)
        self._request_to_serve = request
        self._on_sent = on_sent

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        return await super().prepare(self._request_to_serve)

    def report(self) -> None:
        self._on_sent(self.status)


async def _report_file_response(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Log a clean file answer when its headers go out (its status is final, the body not yet sent)."""
    if isinstance(response, _LoggedFileResponse):
        response.report()


_PIECE = 1 << 20  # bytes read from disk per write of a clean streamed answer


def _read_range(path: Path, start: int, stop: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(start)
        return handle.read(stop - start)


class LinkBucket:
    """One token bucket shared by every response: the whole server's byte rate (the `linkcap` fault).

    Each writer takes tokens for its chunk before writing it; a writer that finds the bucket short
    waits for the deficit to refill. The lock makes waiters queue in turn, so concurrent responses
    share the rate fairly and together never exceed it (beyond one burst of `rate / 20` bytes).
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1024.0, rate / 20)
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    @property
    def chunk(self) -> int:
        """Write size: one burst, so each take is one refill of at most 50 ms."""
        return int(self.burst)

    async def take(self, nbytes: int) -> None:
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= nbytes
            if self._tokens < 0:
                # Sleep off the debt while holding the lock: the next writer waits behind it. The
                # debt stays booked against the stamp taken above, so the next take refills from
                # there: time the sleep overshoots is credited, and the long-run rate is the cap.
                await asyncio.sleep(-self._tokens / self.rate)


def _filler(size: int) -> bytes:
    """Surplus bytes for `overlong`/`lie`: obviously not FITS, so a hex dump shows what happened."""
    pattern = b"TESSMIRROR-ARCHIVE-SURPLUS-BYTES\n"
    return (pattern * (size // len(pattern) + 1))[:size]


async def _send(
    response: web.StreamResponse, data: memoryview, bandwidth: float | None, link: LinkBucket | None = None
) -> None:
    """Write `data`, paced to `bandwidth` bytes/s (this response) and `link` (all responses) when given."""
    if not bandwidth and link is None:
        if len(data):
            await response.write(data)
        return
    chunk = max(1024, int(bandwidth / 20)) if bandwidth else 1 << 20  # 20 writes a second: smooth pacing
    if link is not None:
        chunk = min(chunk, link.chunk)
    for offset in range(0, len(data), chunk):
        piece = data[offset : offset + chunk]
        if link is not None:
            await link.take(len(piece))
        await response.write(piece)
        if bandwidth:
            await asyncio.sleep(len(piece) / bandwidth)


def _abort_with_rst(transport: asyncio.Transport) -> None:
    """Drop the connection with a TCP reset (SO_LINGER 0), as a crashed proxy would."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
