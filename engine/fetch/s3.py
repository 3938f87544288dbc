"""The S3 source: TESS files from the public bucket `stpubdata` (AWS Open Data), MAST as the fallback.

Bytes come through the run's own aiohttp session and Downloader: an anonymous HTTPS GET per try, with
Range/If-Range for resumes, so connector limits, idle timeouts, the overload policy, retries,
verification and the manifest apply unchanged (docs/CLOUD.md says why there is no second HTTP stack).

* **Keys** (`object_key`), from the product file name [mast-facts "Cloud paths": astroquery
  mast/fpl.py and cloud.py; lightkurve's tests]: light curves and target pixel files at
  ``tess/public/tid/sNNNN/TTTT/TTTT/TTTT/TTTT/<file>`` (the 16-digit TIC in four), DV files under the
  *last* sector of ``-sAAAA-sBBBB-``, FFIs at ``tess/public/ffi/sNNNN/YYYY/DDD/C-D/<file>`` (year and
  day of year from the file's timestamp). Anything else (HLSPs, unknown names) has no key: MAST.
* **Integrity**: size and md5 from CAOM as for MAST. An ETag is an md5 only when it is exactly 32 hex
  digits (a single-part upload; multipart ETags read ``<hex>-<parts>``): then it is a second check on
  the whole file (`etag_md5`), never otherwise.
* **Fallback**: a 403 or 404 (anonymous readers get 403 for a missing key) sends that file to MAST,
  once: the file's `Route` remembers it for its remaining tries and says why. ``503 SlowDown`` is an
  ordinary overload answer (the shell's limiter halves, the retry waits).
* **Credentials**: S3 requests run none of the session's middlewares (`HttpSource.get(anonymous=)`),
  so the archive token cannot reach the bucket even when both share a host (the local archive).
* **path_lookup** (`check_cloud_paths`): MAST maps product URIs to cloud paths at
  ``GET /api/v0.1/path_lookup/?uri=...&use_cloud_path=True``; a sample of the plan is checked against
  it before S3 is used.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import aiohttp
from yarl import URL

from engine.exceptions import ConfigError, HTTPStatusError
from engine.fetch.http import Attempt, HttpSource, Reply, Source
from engine.models import PlanItem

log = logging.getLogger(__name__)

BUCKET = "stpubdata"
PREFIX = "tess/public"
FALLBACK_STATUSES = frozenset({403, 404})
PATH_LOOKUP = "/api/v0.1/path_lookup/"
LOOKUP_BATCH = 40  # URIs per path_lookup request (astroquery's get_cloud_paths)
_ERROR_BODY_MAX = 4096  # bytes of an S3 error document read to name its code

# Names are untrusted: each pattern is anchored and admits only the characters of real TESS names,
# so a key can never hold '/', '..' or anything a URL would reinterpret.
_TID = re.compile(r"^tess\d{13}-s(\d{4})-(\d{16})-\d{4}-[a-z]_(?:lc|tp|fast-lc|fast-tp)\.fits$")
_DV = re.compile(r"^tess\d{13}-s(\d{4})-s(\d{4})-(\d{16})-[0-9-]+_dv[a-z]{1,2}\.(?:fits|pdf|xml)$")
_FFI = re.compile(r"^tess(\d{4})(\d{3})\d{6}-s(\d{4})-([1-4])-([1-4])-\d{4}-[a-z]_ffi[cr]\.fits$")
_ETAG_MD5 = re.compile(r"^[0-9a-fA-F]{32}$")
_ERROR_CODE = re.compile(rb"<Code>\s*([A-Za-z]{1,64})\s*</Code>")


def _tic_dirs(tic: str) -> str:
    return "/".join(tic[i : i + 4] for i in range(0, 16, 4))


def key_for_name(name: str) -> str | None:
    """The bucket key of a TESS product file name, or None when the name is not in the bucket's layout.

    Examples
    --------
    >>> key_for_name("tess2018206045859-s0001-0000000025155310-0120-s_lc.fits")
    'tess/public/tid/s0001/0000/0000/2515/5310/tess2018206045859-s0001-0000000025155310-0120-s_lc.fits'
    """
    if match := _TID.match(name):
        sector, tic = match.groups()
        return f"{PREFIX}/tid/s{sector}/{_tic_dirs(tic)}/{name}"
    if match := _DV.match(name):
        _first, last, tic = match.groups()
        return f"{PREFIX}/tid/s{last}/{_tic_dirs(tic)}/{name}"
    if match := _FFI.match(name):
        year, day, sector, camera, ccd = match.groups()
        return f"{PREFIX}/ffi/s{sector}/{year}/{day}/{camera}-{ccd}/{name}"
    return None


def data_uri(item: PlanItem) -> str:
    """The item's CAOM dataURI: the `uri=` of a Download API URL, else ``mast:TESS/product/<name>``."""
    parts = urlsplit(item.url)
    for key, value in parse_qsl(parts.query):
        if key == "uri" and value.startswith("mast:"):
            return value
    return f"mast:TESS/product/{file_name(item)}"


def file_name(item: PlanItem) -> str:
    """The product file name: `productFileName`, else the last part of the dataURI or URL path."""
    if item.filename:
        return item.filename
    parts = urlsplit(item.url)
    for key, value in parse_qsl(parts.query):
        if key == "uri":
            return value.rsplit("/", 1)[-1]
    return unquote(parts.path.rsplit("/", 1)[-1])


def object_key(item: PlanItem) -> str | None:
    """The bucket key for a plan item (an ``s3://stpubdata/<key>`` URL names it directly), or None."""
    if item.url.startswith("s3://"):
        parts = urlsplit(item.url)
        key = unquote(parts.path.lstrip("/"))
        if parts.netloc != BUCKET or not key or any(p in ("", ".", "..") for p in key.split("/")):
            return None
        return key
    return key_for_name(file_name(item))


def bucket_base(endpoint: str, bucket: str = BUCKET) -> str:
    """The URL prefix of the bucket's objects at `endpoint` (no trailing slash).

    Virtual-hosted when the endpoint's host starts with the bucket's name (the default,
    ``https://stpubdata.s3.us-east-1.amazonaws.com``); otherwise path-style, ``ENDPOINT/<bucket>``
    (moto, the local archive, a mirror), unless the endpoint's path already ends with the bucket.
    """
    url = URL(endpoint.rstrip("/"))
    if (url.host or "").split(".", 1)[0] == bucket or url.path.rstrip("/").endswith("/" + bucket):
        return str(url).rstrip("/")
    return f"{str(url).rstrip('/')}/{bucket}"


def etag_md5(etag: str | None) -> str:
    """The md5 an ETag states, lowercase, or "" when it states none (multipart, weak, or other)."""
    if not etag or etag.startswith("W/"):
        return ""
    value = etag.strip().strip('"')
    return value.lower() if _ETAG_MD5.match(value) else ""


async def _error_code(response: aiohttp.ClientResponse) -> str:
    """The <Code> of an S3 XML error (at most a few kB read), or ""; the response is closed."""
    try:
        body = await response.content.read(_ERROR_BODY_MAX)
    except (aiohttp.ClientError, TimeoutError):
        body = b""
    finally:
        response.close()
    match = _ERROR_CODE.search(body)
    return match.group(1).decode("ascii") if match else ""


class S3Source(Source):
    """Files from the bucket at `endpoint`; MAST (`fallback`) for those without a key or refused.

    Parameters
    ----------
    endpoint
        `fetch.s3_endpoint` (see `bucket_base`).
    http
        The HTTP mechanics for the bucket's requests: its `get` (redirects vetted per hop, run
        anonymously) and `accept` (statuses, Range), so neither is written twice.
    fallback
        The source for files that are not in the bucket (MAST's Download API).
    """

    name = "s3"

    def __init__(self, endpoint: str, http: HttpSource, fallback: HttpSource) -> None:
        self.base = bucket_base(endpoint)
        self._http = http
        self._fallback = fallback
        self.fallbacks = 0  # files sent to MAST after the bucket refused them

    def url_for(self, key: str) -> str:
        """The object's URL (each key segment percent-encoded where needed)."""
        return f"{self.base}/{'/'.join(_quote(part) for part in key.split('/'))}"

    async def serve(self, attempt: Attempt) -> Reply:
        """GET the object (anonymously); on a 403/404 fall back to MAST for this file, once."""
        item, route = attempt.item, attempt.route
        key = None if route.fell_back else object_key(item)
        if key is None:
            if not route.fell_back and not route.note:
                route.note = "not in the bucket's layout; fetched from MAST"
            return await self._fallback.serve(attempt)
        response = await self._http.get(attempt.session, self.url_for(key), attempt.headers, anonymous=True)
        if response.status in FALLBACK_STATUSES:
            status = response.status
            code = await _error_code(response)
            if item.url.startswith("s3://"):
                raise HTTPStatusError(status, f"HTTP {status} {code or 'from S3'} for {key}".rstrip())
            route.fell_back = True
            route.note = f"S3 answered {status} {code or ''}".rstrip() + "; fetched from MAST"
            self.fallbacks += 1
            log.info("%s: %s", item.filename or key, route.note)
            return await self._fallback.serve(attempt)
        reply = self._http.accept(response, attempt.resumed_from)
        reply.md5 = etag_md5(response.headers.get("ETag"))
        route.source = self.name
        return reply


def _quote(segment: str) -> str:
    return quote(segment, safe="-_.~+")


# -- path_lookup -----------------------------------------------------------------------------------
@dataclass(slots=True)
class PathCheck:
    """The verdict of `check_cloud_paths` on a sample of the plan."""

    available: bool  # the archive answered path_lookup
    checked: int = 0  # items compared (both sides gave a path)
    absent: int = 0  # items MAST says are not in the cloud (they will come from MAST)
    mismatches: list[tuple[str, str, str]] = field(default_factory=list)  # (name, ours, MAST's)
    reason: str = ""  # why it is unavailable

    @property
    def ok(self) -> bool:
        """Nothing contradicts the computed keys (also true when the archive has no path_lookup)."""
        return not self.mismatches

    def raise_for_mismatch(self) -> None:
        """Refuse S3 (ConfigError on `fetch.source`, exit 2) when MAST's paths differ from ours."""
        if self.ok:
            return
        name, ours, theirs = self.mismatches[0]
        raise ConfigError(
            "fetch.source",
            f"MAST's path_lookup puts {name} at {theirs!r}, not {ours!r} "
            f"({len(self.mismatches)} of {self.checked} sampled files differ); refusing to use S3",
            hint="use --source mast (the bucket's layout changed; please report it)",
        )


def lookup_url_for(items: Sequence[PlanItem], fallback_base: str) -> str:
    """path_lookup's URL: on the host of the plan's Download API URLs, else under `fallback_base`."""
    for item in items:
        parts = urlsplit(item.url)
        if parts.scheme in ("http", "https") and "/api/v0.1/Download/" in parts.path:
            return f"{parts.scheme}://{parts.netloc}{PATH_LOOKUP}"
    parts = urlsplit(fallback_base)
    return f"{parts.scheme}://{parts.netloc}{PATH_LOOKUP}"


def normalise_cloud_path(path: str) -> str:
    """A cloud path as path_lookup may write it (``s3://stpubdata/...``, ``/stpubdata/...``,
    ``/tess/public/...``) as a bare bucket key."""
    value = path.strip()
    for prefix in (f"s3://{BUCKET}/", f"/{BUCKET}/", f"{BUCKET}/"):
        if value.startswith(prefix):
            value = value[len(prefix) :]
            break
    return value.lstrip("/")


async def check_cloud_paths(
    session: aiohttp.ClientSession,
    items: Iterable[PlanItem],
    *,
    lookup_url: str,
    sample: int = LOOKUP_BATCH,
    timeout: float = 60.0,
) -> PathCheck:
    """Compare the computed keys of up to `sample` items (the plan's first page) with MAST's.

    One ``GET lookup_url?uri=...&use_cloud_path=True`` per 40 URIs; the answer maps each URI to
    ``{"path": ...}`` (null when MAST has no cloud copy). A 404 means the archive has no
    path_lookup (another TAP service): said once in the log, and the computed keys are used.

    Parameters
    ----------
    session
        Any aiohttp session (the run's: the token may go to MAST's API host).
    items
        The plan, in order; only the first `sample` items with a computed key are checked.
    lookup_url
        From `lookup_url_for`.
    sample, timeout
        How many items; seconds for each request.

    Returns
    -------
    PathCheck
        Call `raise_for_mismatch` to refuse S3 on a contradiction.
    """
    chosen: list[tuple[str, str, str]] = []  # (uri, name, our key)
    for item in items:
        if len(chosen) >= sample:
            break
        key = object_key(item)
        if key is not None:
            chosen.append((data_uri(item), file_name(item), key))
    verdict = PathCheck(available=True)
    limit = aiohttp.ClientTimeout(total=timeout)
    for start in range(0, len(chosen), LOOKUP_BATCH):
        batch = chosen[start : start + LOOKUP_BATCH]
        params = [("uri", uri) for uri, _, _ in batch] + [("use_cloud_path", "True")]
        try:
            async with session.get(lookup_url, params=params, timeout=limit) as response:
                if response.status == 404:
                    log.warning("the archive has no path_lookup (HTTP 404); using the computed S3 keys")
                    return PathCheck(available=False, reason="HTTP 404")
                if response.status != 200:
                    return _unavailable(f"HTTP {response.status}")
                answer = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return _unavailable(type(exc).__name__)
        if not isinstance(answer, dict):
            return _unavailable("the answer is not a JSON object")
        for uri, name, ours in batch:
            entry = answer.get(uri)
            theirs = entry.get("path") if isinstance(entry, dict) else None
            if not isinstance(theirs, str) or not theirs:
                verdict.absent += 1
                continue
            verdict.checked += 1
            if normalise_cloud_path(theirs) != ours:
                verdict.mismatches.append((name, ours, normalise_cloud_path(theirs)))
    return verdict


def _unavailable(reason: str) -> PathCheck:
    log.warning("path_lookup could not be read (%s); using the computed S3 keys", reason)
    return PathCheck(available=False, reason=reason)


async def settle_source(
    session: aiohttp.ClientSession,
    source: str,
    items: Sequence[PlanItem],
    *,
    fallback_base: str,
    timeout: float = 60.0,
) -> str:
    """The source a run should use after checking a sample of its plan (the first page) at plan time.

    ``mast`` is returned unchanged without a request. For ``s3`` a path_lookup that contradicts the
    computed keys raises `ConfigError` (exit 2); for ``auto`` it returns ``"mast"`` (with a warning),
    and so does a path_lookup that cannot be read. An archive without path_lookup keeps the choice.

    Parameters
    ----------
    session
        The run's session (path_lookup is on MAST's API host, which may receive the token).
    source
        `fetch.source`.
    items
        The plan's first page (at most `LOOKUP_BATCH` items are checked).
    fallback_base
        Where path_lookup is when no item is a Download API URL (the TAP service's URL).
    timeout
        Seconds for each path_lookup request.
    """
    if source == "mast":
        return source
    verdict = await check_cloud_paths(
        session, items, lookup_url=lookup_url_for(items, fallback_base), timeout=timeout
    )
    if source == "s3":
        verdict.raise_for_mismatch()
        return source
    if not verdict.ok:
        name, ours, theirs = verdict.mismatches[0]
        log.warning(
            "source auto: MAST's path_lookup puts %s at %r, not %r; downloading from MAST", name, theirs, ours
        )
        return "mast"
    if not verdict.available and verdict.reason != "HTTP 404":
        log.warning("source auto: path_lookup failed (%s); downloading from MAST", verdict.reason)
        return "mast"
    return source
