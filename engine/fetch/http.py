"""What is HTTP-specific in one try of a download: redirects, validators, Range/If-Range, statuses.

The transfer shell (`engine.fetch.download`) owns the part file, the stream checks, retries and the
commit; it asks a *source* (`engine.fetch.sources`) to open the body of one try and gets back a
`Reply`. This module holds what every source needs, below both, so nothing points back up into the
shell (no import cycle): the status sets, `validator`, `redirect_target`, `Route` (a file's per-try
routing state), `Source` (the base every source subclasses: it owns `open`, a source writes `serve`)
and `HttpSource`, the plain http(s) source (MAST's Download API and any URL list), whose `get` and
`accept` other sources reuse.

Status handling, as before the split:

* ``206``: the body continues at the byte we asked for (checked against ``Content-Range``), else
  `ResumeRefusedError` (restart from zero);
* ``200``: the whole entity from byte zero (`Reply.restart` when we had asked for a range);
* ``416`` to a resume: `ResumeRefusedError`;
* anything else: `HTTPStatusError` with the ``Retry-After`` seconds; the shell tells the limiter
  about ``429``/``503`` (the overload policy, whichever source answered).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from yarl import URL

from engine.exceptions import ConnectionLostError, HTTPStatusError, UnsafeRedirectError
from engine.fetch.retry import parse_retry_after
from engine.models import Clock, PlanItem, SystemClock

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
OVERLOAD_STATUSES = frozenset({429, 503})
SAFE_SCHEMES = frozenset({"http", "https"})
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


class ResumeRefusedError(ConnectionLostError):
    """The server will not continue the bytes we hold: the next try starts from zero."""


def validator(headers: Mapping[str, str]) -> str | None:
    """A strong ETag, else Last-Modified: what If-Range accepts (RFC 9110 forbids weak ETags there)."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


def redirect_target(current: URL, location: str) -> URL:
    """Resolve a Location header and refuse a change of scheme other than http -> https."""
    try:
        target = current.join(URL(location))
    except (ValueError, TypeError):
        raise UnsafeRedirectError(f"refusing a malformed redirect target {location!r}") from None
    if target.scheme not in SAFE_SCHEMES:
        raise UnsafeRedirectError(
            f"refusing a redirect from {current} to {target}: only http and https are followed"
        )
    if current.scheme == "https" and target.scheme == "http":
        raise UnsafeRedirectError(f"refusing a redirect from https to http (a downgrade): {target}")
    return target


@dataclass(slots=True)
class Reply:
    """An accepted answer whose body the shell streams next."""

    response: aiohttp.ClientResponse
    total: int | None  # the entity's full length when the server announced it
    restart: bool = False  # a 200 to a ranged request: the body starts at byte zero
    validator: str | None = None  # strong ETag or Last-Modified, for a later If-Range
    md5: str = ""  # a second md5 the whole file must have (an S3 single-part ETag); "" when none


@dataclass(slots=True)
class Route:
    """Where one file's bytes come from, kept across its tries (one per `Downloader.fetch`)."""

    source: str = ""  # the source that answered the last try: "mast", "s3", "http"
    note: str = ""  # why the file did not come from the chosen source (a fallback), else ""
    fell_back: bool = False  # the chosen source refused this file once: use the fallback from now on


@dataclass(slots=True)
class Attempt:
    """One try of one file as a source sees it: the arguments of `Source.open`, kept together so a
    source can hand the try on unchanged (S3's fallback to MAST)."""

    session: aiohttp.ClientSession
    item: PlanItem
    headers: dict[str, str]  # Range/If-Range for a resume, else empty
    resumed_from: int  # the byte the body must start at (0 without a resume)
    route: Route


class Source(ABC):
    """A byte source: the shell calls `open` for each try; a source implements `serve`."""

    name: str  # what `Route.source` records for files this source served

    async def open(
        self,
        session: aiohttp.ClientSession,
        item: PlanItem,
        headers: dict[str, str],
        *,
        resumed_from: int,
        route: Route,
    ) -> Reply:
        """Open the body of one try. `headers` carries Range/If-Range for a resume (else empty)."""
        return await self.serve(Attempt(session, item, headers, resumed_from, route))

    @abstractmethod
    async def serve(self, attempt: Attempt) -> Reply:
        """Answer one try with an accepted `Reply` (or raise); set `attempt.route.source`."""


class HttpSource(Source):
    """Plain http(s): GET the item's URL, follow (and vet) redirects ourselves, judge the status.

    Parameters
    ----------
    max_redirects
        Redirect hops followed per request (each hop is checked by `redirect_target`).
    clock
        For Retry-After given as an HTTP date.
    name
        What `Route.source` records for files this source served.
    """

    def __init__(self, max_redirects: int, *, clock: Clock | None = None, name: str = "mast") -> None:
        self.max_redirects = max_redirects
        self.name = name
        self._clock = clock or SystemClock()

    async def serve(self, attempt: Attempt) -> Reply:
        """GET `item.url` and accept its answer (see the module docstring)."""
        response = await self.get(attempt.session, attempt.item.url, attempt.headers)
        reply = self.accept(response, attempt.resumed_from)
        attempt.route.source = self.name
        return reply

    async def get(
        self, session: aiohttp.ClientSession, url: str, headers: dict[str, str], *, anonymous: bool = False
    ) -> aiohttp.ClientResponse:
        """GET `url`, following at most `max_redirects` redirects ourselves so each hop is vetted.

        `anonymous`: run none of the session's middlewares, so no credential (the archive token) can
        be added to this request or any of its hops, whatever host it goes to.
        """
        current = URL(url)
        if current.scheme not in SAFE_SCHEMES:
            raise UnsafeRedirectError(f"refusing {url}: only http and https URLs are fetched")
        extra = {"middlewares": ()} if anonymous else {}
        for _ in range(self.max_redirects + 1):
            response = await session.get(current, headers=headers, allow_redirects=False, **extra)
            if response.status not in REDIRECT_STATUSES:
                return response
            location = response.headers.get("Location")
            response.release()
            if not location:
                raise HTTPStatusError(response.status, f"HTTP {response.status} redirect without a Location")
            current = redirect_target(current, location)
        raise UnsafeRedirectError(f"more than {self.max_redirects} redirects for {url}")

    def accept(self, response: aiohttp.ClientResponse, resumed_from: int) -> Reply:
        """Judge a final (non-redirect) answer; close it and raise when its body is not wanted."""
        try:
            return self._judge(response, resumed_from)
        except BaseException:
            response.close()
            raise

    def _judge(self, response: aiohttp.ClientResponse, resumed_from: int) -> Reply:
        status = response.status
        if status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != resumed_from:
                raise ResumeRefusedError(
                    f"the server resumed with Content-Range {response.headers.get('Content-Range')!r}, "
                    f"expected bytes {resumed_from}-; restarting from zero"
                )
            total = None if match.group(3) == "*" else int(match.group(3))
            return Reply(response, total, validator=validator(response.headers))
        if status == 200:
            identity = response.headers.get("Content-Encoding", "identity").lower() == "identity"
            total = response.content_length if identity else None
            return Reply(response, total, restart=resumed_from > 0, validator=validator(response.headers))
        if status == 416 and resumed_from:
            raise ResumeRefusedError("the server refused to resume (HTTP 416); restarting from zero")
        retry_after = parse_retry_after(response.headers.get("Retry-After"), now=self._clock.time())
        raise HTTPStatusError(
            status, f"HTTP {status} {response.reason or ''}".rstrip(), retry_after=retry_after
        )
