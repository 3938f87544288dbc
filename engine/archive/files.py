"""The archive's file server: MAST's `/api/v0.1/Download/file?uri=...`, with faults on demand.

Files are materialised lazily: the first request for a file renders it (in a thread) into the data
directory with an atomic rename, and every request after that is a plain file. A clean answer is
aiohttp's `FileResponse` (sendfile, Range/206/416, ETag). A faulted one (see `faults.py`) is streamed
by hand so it can be slowed, cut, reset, stalled or corrupted; it keeps the same ETag and Range
rules so clients cannot tell the two apart until the fault strikes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from engine.archive import fitsgen
from engine.archive.catalog import DOWNLOAD_PATH, ArchiveFile, Catalog
from engine.archive.faults import Decision, FaultPlan

_HTML_ERROR_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>Service Unavailable</title></head>\n"
    "<body><h1>MAST is temporarily unavailable</h1><p>Please try again later.</p></body></html>\n"
)


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


class FileStore:
    """Renders catalogue files to `directory` on first use (atomically) and hands out their paths."""

    def __init__(self, catalog: Catalog, directory: Path) -> None:
        self.catalog = catalog
        self.directory = directory
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def _write(self, entry: ArchiveFile, target: Path) -> None:
        pieces = fitsgen.render(entry.identity, cadences=self.catalog.cadences, seed=self.catalog.seed)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as handle:
            for piece in pieces:
                handle.write(piece)
        os.replace(temporary, target)  # readers see no file or the whole file, never a part

    async def path(self, entry: ArchiveFile) -> Path:
        target = self.directory / entry.name
        with contextlib.suppress(FileNotFoundError):
            if target.stat().st_size == entry.size:
                return target
        async with self._locks[entry.name]:  # one render per file even under concurrent requests
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

    def __init__(self, catalog: Catalog, store: FileStore, faults: Callable[[], FaultPlan]) -> None:
        self.catalog = catalog
        self.store = store
        self._faults = faults
        self.request_log: list[RequestRecord] = []
        self.attempts: dict[str, int] = defaultdict(int)  # GETs per file name, for fault decisions
        self.closing = asyncio.Event()  # set on shutdown: stalled responses give up

    def add_routes(self, app: web.Application) -> None:
        for path in (DOWNLOAD_PATH, DOWNLOAD_PATH + "/"):  # MAST's bulk scripts use the trailing slash
            app.router.add_get(path, self.handle)  # add_get also answers HEAD
        app.on_response_prepare.append(_report_file_response)

    def _log(
        self, request: web.BaseRequest, name: str, status: int, started: float, attempt: int, fault: str
    ) -> None:
        record = RequestRecord(
            request.method, name, status, request.headers.get("Range", ""), started, attempt, fault
        )
        self.request_log.append(record)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.time()
        uri = request.query.get("uri", "")
        entry = self.catalog.lookup_uri(uri)
        if entry is None:
            name = uri.rsplit("/", 1)[-1] if uri.startswith("mast:") else ""
            self._log(request, name, 404, started, 0, "")
            return web.Response(status=404, text=f"404 Not Found: no file for uri {uri!r}\n")
        if request.method == "HEAD":
            decision, attempt = Decision(), 0
        else:
            self.attempts[entry.name] += 1
            attempt = self.attempts[entry.name]
            decision = self._faults().decide(entry.name, attempt)
        if decision.latency:
            await asyncio.sleep(decision.latency)
        if decision.status:
            self._log(
                request,
                entry.name,
                200 if decision.status == "html" else int(decision.status),
                started,
                attempt,
                decision.label,
            )
            return self._status_fault(decision)
        path = await self.store.path(entry)

        def on_sent(status: int) -> None:
            self._log(request, entry.name, status, started, attempt, decision.label)

        if not (decision.body or decision.bandwidth):
            return await self._clean(request, path, on_sent)
        return await self._stream(request, path, decision, on_sent)

    @staticmethod
    def _status_fault(decision: Decision) -> web.Response:
        if decision.status == "html":
            return web.Response(status=200, text=_HTML_ERROR_PAGE, content_type="text/html")
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
        headers = {"Content-Type": "application/fits", "Accept-Ranges": "bytes"}
        return _LoggedFileResponse(path, request, on_sent, headers=headers)

    async def _stream(
        self, request: web.Request, path: Path, decision: Decision, on_sent: Callable[[int], None]
    ) -> web.StreamResponse:
        stat = path.stat()
        size, etag = stat.st_size, _etag(stat)
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
        response.content_length = stop - start
        data = bytearray(await asyncio.to_thread(_read_range, path, start, stop))
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
        await _send(response, memoryview(data)[:cut], decision.bandwidth)

        transport = request.transport
        if decision.body == "reset" and transport is not None:
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
        self, path: Path, request: web.Request, on_sent: Callable[[int], None], **kwargs: object
    ) -> None:
        super().__init__(path, **kwargs)  # type: ignore[arg-type]
        self._request_to_serve = request
        self._on_sent = on_sent

    async def prepare(self, request: web.BaseRequest):  # type: ignore[override]
        return await super().prepare(self._request_to_serve)

    def report(self) -> None:
        self._on_sent(self.status)


async def _report_file_response(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Log a clean file answer when its headers go out (its status is final, the body not yet sent)."""
    if isinstance(response, _LoggedFileResponse):
        response.report()


def _read_range(path: Path, start: int, stop: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(start)
        return handle.read(stop - start)


async def _send(response: web.StreamResponse, data: memoryview, bandwidth: float | None) -> None:
    """Write `data`, paced to `bandwidth` bytes/s when given."""
    if not bandwidth:
        if len(data):
            await response.write(data)
        return
    chunk = max(1024, int(bandwidth / 20))  # 20 writes a second keeps the pacing smooth
    for offset in range(0, len(data), chunk):
        piece = data[offset : offset + chunk]
        await response.write(piece)
        await asyncio.sleep(len(piece) / bandwidth)


def _abort_with_rst(transport: asyncio.BaseTransport) -> None:
    """Drop the connection with a TCP reset (SO_LINGER 0), as a crashed proxy would."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]
