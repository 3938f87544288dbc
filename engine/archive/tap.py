"""The local archive's TAP 1.1 service: VOSI, /sync, and /async with the UWS 1.1 job life cycle.

Shaped like MAST's CAOM TAP service so that pyvo works against it unchanged: capabilities advertise
the output limits (``TAPService.maxrec`` / ``.hardlimit``), results are VOTables whose RESOURCE ends
with ``QUERY_STATUS=OVERFLOW`` when MAXREC cut them short, and failed queries give an error VOTable.
It can also misbehave on purpose (`TapFaults`), deterministically for a seed, so the engine's
handling of real outages can be tested.

SQLite queries and VOTable encoding run in the loop's default executor, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
import itertools
import math
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from xml.sax.saxutils import escape, quoteattr

import numpy as np
from aiohttp import web
from astropy.io.votable import converters, from_table
from astropy.io.votable.tree import Info
from astropy.table import Table

from engine.archive.tapdb import AdqlError, ColumnDef, TableInfo, TapDatabase, delimited

VOTABLE_TYPE = "application/x-votable+xml"
CSV_TYPE = "text/csv;header=present"
_CSV_FORMATS = {"csv", "text/csv", "text/csv;header=present"}
_VOTABLE_FORMATS = {"", "votable", "application/x-votable+xml", "text/xml", "votable/td"}
_ACTIVE = {"PENDING", "QUEUED", "EXECUTING"}
_TERMINAL = {"COMPLETED", "ERROR", "ABORTED"}
_HTML_503 = (
    "<!DOCTYPE html><html><head><title>503 Service Unavailable</title></head><body>"
    "<h1>Service Unavailable</h1><p>The server is temporarily unable to service your request due to "
    "maintenance downtime or capacity problems. Please try again later.</p></body></html>"
)
_UWS_NS = (
    'xmlns:uws="http://www.ivoa.net/xml/UWS/v1.0" xmlns:xlink="http://www.w3.org/1999/xlink" '
    'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
)


@dataclass
class TapFaults:
    """Misbehaviour on demand. Rates are 0..1; a decision is a hash of the seed and the job number."""

    seed: int = 0
    job_error_rate: float = 0.0  # job ends in ERROR
    queued_rate: float = 0.0  # job stays QUEUED forever
    slow_poll_seconds: float = 0.0  # every job-document/phase response delayed by this
    html_503_rate: float = 0.0  # an HTML 503 page instead of the job document / result (decided per request)


@dataclass
class TapOptions:
    default_maxrec: int = 100_000
    hard_limit: int = 100_000
    max_wait: float = 30.0  # cap on UWS WAIT blocking
    faults: TapFaults = field(default_factory=TapFaults)
    # A sync query still running after this many seconds is answered HTTP 504 (MAST's gateway).
    sync_timeout: float | None = None
    # An async job still EXECUTING after this many seconds ends in ERROR with a message saying so.
    async_abort_after: float | None = None
    # Seconds a query that joins dbo.caomartifact with another table waits before it runs.
    slow_join: float = 0.0


_GATEWAY_TIMEOUT = (
    "<!DOCTYPE html><html><head><title>504 Gateway Time-out</title></head><body>"
    "<h1>504 Gateway Time-out</h1><p>The server didn't respond in time.</p></body></html>"
)
_JOINED_TABLES = re.compile(
    r"\b(caomobservation|caomplane|caomartifact|obscore|obspointing)\b", re.IGNORECASE
)


# The /examples document: MAST's notebook "Download MAST TESS Light Curves Within an FFI Footprint".
EXAMPLES = (
    (
        "ffi-footprint",
        "FFI footprint of sector 1, camera 1, CCD 2",
        "One FFI observation of the CCD and its s_region (MAST keeps one per exposure).",
        "SELECT TOP 1 c.obs_id, c.s_region FROM dbo.caomobservation AS o "
        "JOIN ivoa.obscore AS c ON c.obs_id = o.observationID "
        "WHERE o.collection = 'TESS' AND o.trgType = 'FIELD' AND o.sequenceNumber = 1 "
        "AND c.obs_id LIKE '%-s0001-1-2-%'",
    ),
    (
        "light-curves-in-footprint",
        "Light curves inside that footprint",
        "Every 2-minute light curve whose target lies in the footprint, over all sectors.",
        "SELECT obs_id, target_name, access_url, access_estsize FROM ivoa.obscore "
        "WHERE obs_collection = 'TESS' AND dataproduct_type = 'timeseries' "
        "AND access_url LIKE '%_lc.fits' AND CONTAINS(POINT('ICRS', s_ra, s_dec), "
        "POLYGON('ICRS', 330.343765, -44.336318, 324.663797, -33.277719, "
        "337.720578, -28.384567, 344.128621, -38.561643)) = 1",
    ),
)


def joins_artifacts(query: str) -> bool:
    """Whether an ADQL query reads dbo.caomartifact together with another catalogue table."""
    tables = {name.lower() for name in _JOINED_TABLES.findall(query)}
    return "caomartifact" in tables and len(tables) > 1


@dataclass
class _Job:
    number: int
    params: dict[str, str]
    phase: str = "PENDING"
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    result: bytes = b""
    result_type: str = VOTABLE_TYPE
    error: str = ""
    requests: int = 0  # documents/results served, for per-request fault decisions
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task | None = None

    @property
    def job_id(self) -> str:
        return str(self.number)


class _QueryRejected(Exception):
    """A request parameter is wrong (not the ADQL itself)."""


class TapService:
    """TAP over a `TapDatabase`; `add_routes` mounts it on an aiohttp app."""

    def __init__(self, db: TapDatabase, options: TapOptions) -> None:
        if options.hard_limit < 0 or not 0 <= options.default_maxrec <= options.hard_limit:
            raise ValueError(
                f"need 0 <= default_maxrec ({options.default_maxrec}) <= hard_limit ({options.hard_limit})"
            )
        self._db = db
        self._options = options
        self._jobs: dict[str, _Job] = {}
        self._numbers = itertools.count(1)
        self._job_count = 0
        self._prefix = ""
        self._started = time.time()

    @property
    def job_count(self) -> int:
        """Queries received so far: async jobs created plus sync queries."""
        return self._job_count

    def add_routes(self, app: web.Application, prefix: str) -> None:
        self._prefix = prefix.rstrip("/")
        p = self._prefix
        app.router.add_get(f"{p}/capabilities", self._capabilities)
        app.router.add_get(f"{p}/availability", self._availability)
        app.router.add_get(f"{p}/tables", self._tables)
        app.router.add_get(f"{p}/tables/{{name}}", self._table)
        app.router.add_get(f"{p}/examples", self._examples)
        app.router.add_route("GET", f"{p}/sync", self._sync)
        app.router.add_route("POST", f"{p}/sync", self._sync)
        app.router.add_get(f"{p}/async", self._job_list)
        app.router.add_post(f"{p}/async", self._create_job)
        app.router.add_get(f"{p}/async/{{job}}", self._job_document)
        app.router.add_post(f"{p}/async/{{job}}", self._post_job)
        app.router.add_delete(f"{p}/async/{{job}}", self._delete_job)
        app.router.add_get(f"{p}/async/{{job}}/phase", self._get_phase)
        app.router.add_post(f"{p}/async/{{job}}/phase", self._post_phase)
        app.router.add_get(f"{p}/async/{{job}}/parameters", self._parameters)
        app.router.add_post(f"{p}/async/{{job}}/parameters", self._post_parameters)
        app.router.add_get(f"{p}/async/{{job}}/results/result", self._result)
        app.router.add_get(f"{p}/async/{{job}}/error", self._error)
        for name in ("quote", "executionduration", "destruction", "owner"):
            app.router.add_get(f"{p}/async/{{job}}/{name}", self._job_scalar)
        app.on_shutdown.append(self._shutdown)

    # -- helpers ---------------------------------------------------------------------------------
    def _base_url(self, request: web.Request) -> str:
        return f"{request.scheme}://{request.host}{self._prefix}"

    def _job_url(self, request: web.Request, job: _Job) -> str:
        return f"{self._base_url(request)}/async/{job.job_id}"

    def _next_number(self) -> int:
        self._job_count += 1
        return next(self._numbers)

    def _chance(self, kind: str, number: int, request: int = 0) -> float:
        """A uniform 0..1 value fixed by (seed, kind, job number, request number)."""
        key = f"{self._options.faults.seed}:{kind}:{number}:{request}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2.0**64

    def _fault(self, kind: str, rate: float, number: int, request: int = 0) -> bool:
        return rate > 0 and self._chance(kind, number, request) < rate

    def _html_503(self, job: _Job) -> bool:
        job.requests += 1
        return self._fault("html503", self._options.faults.html_503_rate, job.number, job.requests)

    def _find_job(self, request: web.Request) -> _Job:
        job = self._jobs.get(request.match_info["job"])
        if job is None:
            raise web.HTTPNotFound(text=f"no such job: {request.match_info['job']}")
        return job

    def _set_phase(self, job: _Job, phase: str) -> None:
        job.phase = phase
        if phase == "EXECUTING":
            job.started = time.time()
        if phase in _TERMINAL:
            job.ended = time.time()
        # Wake every WAIT-blocked poll, then arm a fresh event for the next change.
        job.changed.set()
        job.changed = asyncio.Event()

    @staticmethod
    async def _params(request: web.Request) -> dict[str, str]:
        """TAP parameter names are case-insensitive; query string and form body both count."""
        params = {k.upper(): v for k, v in request.query.items()}
        if request.method == "POST" and request.can_read_body:
            form = await request.post()
            params.update({k.upper(): str(v) for k, v in form.items()})
        return params

    # -- VOSI ------------------------------------------------------------------------------------
    async def _capabilities(self, request: web.Request) -> web.Response:
        base = escape(self._base_url(request))
        opts = self._options
        duration = math.ceil(opts.async_abort_after) if opts.async_abort_after else 0
        examples = (
            '  <capability standardID="ivo://ivoa.net/std/DALI#examples">\n'
            f'    <interface xsi:type="vr:WebBrowser" xmlns:vr="http://www.ivoa.net/xml/VOResource/v1.0">'
            f'<accessURL use="full">{base}/examples</accessURL></interface>\n  </capability>\n'
        )

        def vosi(kind: str) -> str:
            return (
                f'  <capability standardID="ivo://ivoa.net/std/VOSI#{kind}">\n'
                f'    <interface xsi:type="vs:ParamHTTP" role="std"><accessURL use="full">{base}/{kind}'
                "</accessURL></interface>\n  </capability>\n"
            )

        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<vosi:capabilities xmlns:vosi="http://www.ivoa.net/xml/VOSICapabilities/v1.0" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            'xmlns:vs="http://www.ivoa.net/xml/VODataService/v1.1" '
            'xmlns:tr="http://www.ivoa.net/xml/TAPRegExt/v1.0">\n'
            '  <capability standardID="ivo://ivoa.net/std/TAP" xsi:type="tr:TableAccess">\n'
            f'    <interface xsi:type="vs:ParamHTTP" role="std" version="1.1"><accessURL use="base">{base}'
            "</accessURL></interface>\n"
            '    <dataModel ivo-id="ivo://ivoa.net/std/ObsCore#core-1.1">ObsCore-1.1</dataModel>\n'
            "    <language><name>ADQL</name>"
            '<version ivo-id="ivo://ivoa.net/std/ADQL#v2.0">2.0</version>\n'
            '      <languageFeatures type="ivo://ivoa.net/std/TAPRegExt#features-adqlgeo">'
            "<feature><form>POINT</form></feature><feature><form>CIRCLE</form></feature>"
            "<feature><form>POLYGON</form></feature><feature><form>CONTAINS</form></feature>"
            "<feature><form>DISTANCE</form></feature></languageFeatures>\n"
            "    </language>\n"
            '    <outputFormat ivo-id="ivo://ivoa.net/std/TAPRegExt#output-votable-td">'
            f"<mime>{VOTABLE_TYPE}</mime><alias>votable</alias></outputFormat>\n"
            f"    <outputFormat><mime>{CSV_TYPE}</mime><alias>csv</alias></outputFormat>\n"
            f"    <executionDuration><default>{duration}</default><hard>{duration}</hard>"
            "</executionDuration>\n"
            f'    <outputLimit><default unit="row">{opts.default_maxrec}</default>'
            f'<hard unit="row">{opts.hard_limit}</hard></outputLimit>\n'
            "  </capability>\n"
            + vosi("capabilities")
            + vosi("availability")
            + vosi("tables")
            + examples
            + "</vosi:capabilities>\n"
        )
        return web.Response(body=body.encode(), content_type="text/xml", charset="utf-8")

    async def _examples(self, request: web.Request) -> web.Response:
        """TAP 1.1 / DALI examples: the MAST notebook's two queries, as runnable ADQL."""
        parts = [
            '<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE html>\n'
            '<html xmlns="http://www.w3.org/1999/xhtml"><head><title>Examples</title></head>\n'
            '<body vocab="http://www.ivoa.net/rdf/examples#">\n<h1>Examples</h1>\n'
        ]
        for anchor, name, text, query in EXAMPLES:
            parts.append(
                f'<div typeof="example" id="{anchor}" resource="#{anchor}">\n'
                f'<h2 property="name">{escape(name)}</h2>\n<p>{escape(text)}</p>\n'
                f'<pre property="query">{escape(query)}</pre>\n</div>\n'
            )
        parts.append("</body></html>\n")
        body = "".join(parts).encode()
        return web.Response(body=body, content_type="application/xhtml+xml", charset="utf-8")

    async def _availability(self, request: web.Request) -> web.Response:
        since = _iso(self._started)
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<vosi:availability xmlns:vosi="http://www.ivoa.net/xml/VOSIAvailability/v1.0">'
            f"<vosi:available>true</vosi:available><vosi:upSince>{since}</vosi:upSince>"
            "<vosi:note>local MAST-shaped archive</vosi:note></vosi:availability>\n"
        )
        return web.Response(body=body.encode(), content_type="text/xml", charset="utf-8")

    async def _tables(self, request: web.Request) -> web.Response:
        by_schema: dict[str, list[TableInfo]] = {}
        for table in self._db.tables():
            by_schema.setdefault(table.schema, []).append(table)
        parts = [
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<vosi:tableset xmlns:vosi="http://www.ivoa.net/xml/VOSITables/v1.0" '
            'xmlns:vs="http://www.ivoa.net/xml/VODataService/v1.1" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">\n'
        ]
        for schema, tables in by_schema.items():
            parts.append(f"<schema><name>{escape(schema)}</name>\n")
            parts.extend(_vosi_table(t, self._db.foreign_keys(t.full_name)) for t in tables)
            parts.append("</schema>\n")
        parts.append("</vosi:tableset>\n")
        return web.Response(body="".join(parts).encode(), content_type="text/xml", charset="utf-8")

    async def _table(self, request: web.Request) -> web.Response:
        name = request.match_info["name"].lower()
        for table in self._db.tables():
            if table.full_name.lower() == name:
                keys = self._db.foreign_keys(table.full_name)
                body = '<?xml version="1.0" encoding="UTF-8"?>\n' + _vosi_table(table, keys, namespaces=True)
                return web.Response(body=body.encode(), content_type="text/xml", charset="utf-8")
        raise web.HTTPNotFound(text=f"no such table: {request.match_info['name']}")

    # -- sync ------------------------------------------------------------------------------------
    async def _sync(self, request: web.Request) -> web.StreamResponse:
        params = await self._params(request)
        number = self._next_number()
        faults = self._options.faults
        if self._fault("html503", faults.html_503_rate, number, 1):
            return _html_503_response()
        if self._fault("error", faults.job_error_rate, number):
            return _error_response(_simulated_error(), status=500)
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        future = loop.run_in_executor(None, self._run_query, params, cancel)
        future.add_done_callback(_consume)
        try:
            body, content_type = await asyncio.wait_for(asyncio.shield(future), self._options.sync_timeout)
        except asyncio.TimeoutError:
            # The gateway gives up; the query itself is interrupted so it frees the database.
            return web.Response(status=504, text=_GATEWAY_TIMEOUT, content_type="text/html")
        except (AdqlError, _QueryRejected) as err:
            return _error_response(str(err), status=400)
        finally:
            cancel.set()  # no-op once finished; stops the query when timed out or the client left
        return web.Response(body=body, headers={"Content-Type": content_type})

    def _run_query(self, params: dict[str, str], cancel: threading.Event | None) -> tuple[bytes, str]:
        """Validate the TAP parameters, run the query, encode the result (runs in a thread)."""
        lang = params.get("LANG", "ADQL")
        if lang.upper() not in ("ADQL", "ADQL-2.0", "ADQL-2.1"):
            raise _QueryRejected(f"LANG={lang!r} is not supported; use LANG=ADQL")
        request_type = params.get("REQUEST", "doQuery")
        if request_type.lower() != "doquery":
            raise _QueryRejected(f"REQUEST={request_type!r} is not supported; use REQUEST=doQuery")
        response_format = (params.get("RESPONSEFORMAT") or params.get("FORMAT") or "").strip().lower()
        if response_format not in _CSV_FORMATS and response_format not in _VOTABLE_FORMATS:
            raise _QueryRejected(
                f"RESPONSEFORMAT={response_format!r} is not supported; use votable (the default) or csv"
            )
        maxrec = self._maxrec(params.get("MAXREC"))
        query = params.get("QUERY", "")
        if self._options.slow_join > 0 and joins_artifacts(query):
            # The `slow_join` knob: a join with the artifact table takes this long (interruptible).
            if cancel is not None and cancel.wait(self._options.slow_join):
                raise AdqlError("the query was aborted")
            if cancel is None:
                time.sleep(self._options.slow_join)
        table, overflowed = self._db.execute(query, maxrec=maxrec, cancel=cancel)
        if response_format in _CSV_FORMATS:
            return encode_csv(table), CSV_TYPE
        return encode_votable(table, overflowed=overflowed), VOTABLE_TYPE

    def _maxrec(self, text: str | None) -> int:
        if text is None or text.strip() == "":
            return self._options.default_maxrec
        try:
            value = int(text)
        except ValueError:
            raise _QueryRejected(f"MAXREC={text!r} is not a whole number; send e.g. MAXREC=1000") from None
        if value < 0:
            raise _QueryRejected(f"MAXREC={value} is negative; send 0 or more")
        return min(value, self._options.hard_limit)

    # -- async: the UWS job life cycle -----------------------------------------------------------
    async def _job_list(self, request: web.Request) -> web.Response:
        items = "".join(
            f'<uws:jobref id="{job.job_id}" xlink:href={quoteattr(self._job_url(request, job))}>'
            f"<uws:phase>{job.phase}</uws:phase></uws:jobref>"
            for job in self._jobs.values()
        )
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<uws:jobs {_UWS_NS} version="1.1">{items}</uws:jobs>\n'
        )
        return web.Response(body=body.encode(), content_type="text/xml", charset="utf-8")

    async def _create_job(self, request: web.Request) -> web.Response:
        params = await self._params(request)
        phase = params.pop("PHASE", "").upper()
        job = _Job(number=self._next_number(), params=params)
        self._jobs[job.job_id] = job
        if phase == "RUN":  # MAST accepts PHASE=RUN at creation
            self._start(job)
        raise web.HTTPSeeOther(location=self._job_url(request, job))

    def _start(self, job: _Job) -> None:
        if job.phase == "PENDING":
            self._set_phase(job, "QUEUED")
            job.task = asyncio.get_running_loop().create_task(self._execute(job))

    async def _execute(self, job: _Job) -> None:
        faults = self._options.faults
        if self._fault("queued", faults.queued_rate, job.number):
            return  # stays QUEUED until aborted or deleted
        self._set_phase(job, "EXECUTING")
        try:
            if self._fault("error", faults.job_error_rate, job.number):
                raise AdqlError(_simulated_error())
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(None, self._run_query, job.params, job.cancel)
            future.add_done_callback(_consume)
            limit = self._options.async_abort_after
            try:
                body, content_type = await asyncio.wait_for(asyncio.shield(future), limit)
            except asyncio.TimeoutError:
                job.cancel.set()
                raise AdqlError(
                    f"query aborted: it ran longer than this service's execution limit of {limit:g} s; "
                    "split it into smaller queries (e.g. per sector) or leave out the artifact join"
                ) from None
        except (AdqlError, _QueryRejected) as err:
            outcome, job.error = "ERROR", str(err)
        except Exception as err:  # a bug here must still end the job, or clients wait forever
            outcome, job.error = "ERROR", f"internal error: {type(err).__name__}: {err}"
        else:
            outcome, job.result, job.result_type = "COMPLETED", body, content_type
        if job.phase == "EXECUTING":  # not aborted meanwhile
            self._set_phase(job, outcome)

    async def _job_document(self, request: web.Request) -> web.StreamResponse:
        job = self._find_job(request)
        wait = request.query.get("WAIT") or request.query.get("wait")
        if wait is not None and job.phase in _ACTIVE:
            await self._block(job, wait)
        await self._slow_poll()
        if self._html_503(job):
            return _html_503_response()
        return web.Response(
            body=self._uws_document(request, job).encode(), content_type="text/xml", charset="utf-8"
        )

    async def _block(self, job: _Job, wait_text: str) -> None:
        """UWS 1.1 WAIT: return on the next phase change, or after WAIT seconds (-1: the server cap)."""
        try:
            wait = float(wait_text)
        except ValueError:
            raise web.HTTPBadRequest(text=f"WAIT={wait_text!r} is not a number of seconds") from None
        if wait < 0 or math.isnan(wait):
            wait = self._options.max_wait
        wait = min(wait, self._options.max_wait)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(job.changed.wait(), timeout=wait)

    async def _slow_poll(self) -> None:
        if self._options.faults.slow_poll_seconds > 0:
            await asyncio.sleep(self._options.faults.slow_poll_seconds)

    def _uws_document(self, request: web.Request, job: _Job) -> str:
        job_url = self._job_url(request, job)
        parameters = "".join(
            f"<uws:parameter id={quoteattr(k.lower())}>{escape(v)}</uws:parameter>"
            for k, v in job.params.items()
        )
        results = ""
        if job.phase == "COMPLETED":
            href = quoteattr(f"{job_url}/results/result")
            results = f'<uws:result id="result" xlink:href={href} mime-type="{job.result_type}"/>'
        limit = self._options.async_abort_after
        duration = math.ceil(limit) if limit else 0
        # UWS 1.1: runId is not nillable; echo the client's RUNID, or leave the element out.
        run_id = f"<uws:runId>{escape(job.params['RUNID'])}</uws:runId>" if "RUNID" in job.params else ""
        error = ""
        if job.phase == "ERROR":
            error = (
                '<uws:errorSummary type="fatal" hasDetail="true">'
                f"<uws:message>{escape(job.error)}</uws:message></uws:errorSummary>"
            )
        return (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<uws:job {_UWS_NS} version="1.1">\n'
            f"<uws:jobId>{job.job_id}</uws:jobId>\n"
            f'{run_id}<uws:ownerId xsi:nil="true"/>\n'
            f"<uws:phase>{job.phase}</uws:phase>\n"
            '<uws:quote xsi:nil="true"/>\n'
            f"<uws:creationTime>{_iso(job.created)}</uws:creationTime>\n"
            f"{_time_element('startTime', job.started)}{_time_element('endTime', job.ended)}"
            f"<uws:executionDuration>{duration}</uws:executionDuration>\n"
            f"<uws:destruction>{_iso(job.created + 7 * 86400)}</uws:destruction>\n"
            f"<uws:parameters>{parameters}</uws:parameters>\n"
            f"<uws:results>{results}</uws:results>\n{error}"
            "</uws:job>\n"
        )

    async def _post_job(self, request: web.Request) -> web.Response:
        job = self._find_job(request)
        params = await self._params(request)
        if params.get("ACTION", "").upper() == "DELETE":
            return await self._delete_job(request)
        phase = params.pop("PHASE", "").upper()
        if job.phase == "PENDING":  # UWS: parameters may change until the job runs
            job.params.update({k: v for k, v in params.items() if k != "ACTION"})
        self._change_phase(job, phase)
        raise web.HTTPSeeOther(location=self._job_url(request, job))

    def _change_phase(self, job: _Job, phase: str) -> None:
        if phase == "RUN":
            self._start(job)
        elif phase == "ABORT":
            if job.phase not in _TERMINAL:
                job.cancel.set()  # interrupts a running SQLite query
                if job.task is not None and job.phase == "QUEUED":
                    job.task.cancel()
                self._set_phase(job, "ABORTED")
        elif phase:
            raise web.HTTPBadRequest(text=f"PHASE={phase!r} is not allowed; use PHASE=RUN or PHASE=ABORT")

    async def _delete_job(self, request: web.Request) -> web.Response:
        job = self._find_job(request)
        if job.phase not in _TERMINAL:
            job.cancel.set()
            if job.task is not None:
                job.task.cancel()
            self._set_phase(job, "ABORTED")
        del self._jobs[job.job_id]
        job.result = b""
        raise web.HTTPSeeOther(location=f"{self._base_url(request)}/async")

    async def _get_phase(self, request: web.Request) -> web.Response:
        job = self._find_job(request)
        await self._slow_poll()
        return web.Response(text=job.phase)

    async def _post_phase(self, request: web.Request) -> web.Response:
        job = self._find_job(request)
        params = await self._params(request)
        self._change_phase(job, params.get("PHASE", "").upper())
        raise web.HTTPSeeOther(location=self._job_url(request, job))

    async def _parameters(self, request: web.Request) -> web.Response:
        job = self._find_job(request)
        body = f'<?xml version="1.0" encoding="UTF-8"?>\n<uws:parameters {_UWS_NS}>{_uws_parameters(job)}'
        return web.Response(
            body=(body + "</uws:parameters>\n").encode(), content_type="text/xml", charset="utf-8"
        )

    async def _post_parameters(self, request: web.Request) -> web.Response:
        """UWS: parameters may be changed by POST while the job is PENDING; later they are fixed."""
        job = self._find_job(request)
        params = await self._params(request)
        if job.phase != "PENDING":
            raise web.HTTPConflict(
                text=f"job {job.job_id} is {job.phase}; parameters change only while PENDING"
            )
        job.params.update(params)
        raise web.HTTPSeeOther(location=self._job_url(request, job))

    async def _job_scalar(self, request: web.Request) -> web.Response:
        job = self._find_job(request)
        name = request.path.rsplit("/", 1)[-1]
        limit = self._options.async_abort_after
        values = {
            "quote": "",
            "executionduration": str(math.ceil(limit) if limit else 0),
            "destruction": _iso(job.created + 7 * 86400),
            "owner": "",
        }
        return web.Response(text=values[name])

    async def _result(self, request: web.Request) -> web.StreamResponse:
        job = self._find_job(request)
        if job.phase != "COMPLETED":
            raise web.HTTPNotFound(text=f"job {job.job_id} has no result: its phase is {job.phase}")
        if self._html_503(job):
            return _html_503_response()
        return web.Response(body=job.result, headers={"Content-Type": job.result_type})

    async def _error(self, request: web.Request) -> web.StreamResponse:
        job = self._find_job(request)
        if job.phase != "ERROR":
            raise web.HTTPNotFound(text=f"job {job.job_id} has no error: its phase is {job.phase}")
        return _error_response(job.error, status=200)

    async def _shutdown(self, app: web.Application) -> None:
        for job in self._jobs.values():
            job.cancel.set()
            if job.task is not None:
                job.task.cancel()


# -- documents --------------------------------------------------------------------------------------
def _consume(future: asyncio.Future) -> None:
    """Retrieve a worker's outcome nobody awaits any more (a timed-out query), so it is not logged."""
    if not future.cancelled():
        future.exception()


def encode_votable(table: Table, *, overflowed: bool) -> bytes:
    """A TAP result VOTable; an OVERFLOW status follows the TABLE when MAXREC cut the result."""
    table = table.copy(copy_data=False)
    for name in table.colnames:
        if table[name].dtype.kind == "U":
            # ASCII text goes out as datatype="char", as MAST sends it; pyvo still reads str.
            with contextlib.suppress(UnicodeEncodeError):
                table[name] = table[name].astype(bytes)
    votable = from_table(table)
    resource = votable.resources[0]
    resource.type = "results"
    resource.infos.append(Info(name="QUERY_STATUS", value="OK"))
    for votable_field in votable.get_first_table().fields:
        if votable_field.datatype in ("char", "unicodeChar"):
            votable_field.arraysize = "*"
        elif votable_field.datatype == "bit" and votable_field.arraysize is None:
            # astropy writes a masked bool column as `bit`; TAP_SCHEMA declares it boolean.
            votable_field.datatype = "boolean"
            votable_field.converter = converters.get_converter(votable_field)
    buffer = io.BytesIO()
    votable.to_xml(buffer)
    body = buffer.getvalue()
    if overflowed:
        # pyvo reads the *last* QUERY_STATUS of the results RESOURCE; real services put it here.
        cut = body.rindex(b"</RESOURCE>")
        body = body[:cut] + b'<INFO name="QUERY_STATUS" value="OVERFLOW"/>\n ' + body[cut:]
    return body


def encode_csv(table: Table) -> bytes:
    """CSV with a header line; missing values are empty fields."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(table.colnames)
    columns = []
    for name in table.colnames:
        column = table[name]
        values = column.tolist() if not hasattr(column, "mask") else np.ma.asarray(column).tolist()
        columns.append(values)
    for row in zip(*columns, strict=True):
        writer.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in row])
    return out.getvalue().encode()


def error_votable(message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<VOTABLE version="1.4" xmlns="http://www.ivoa.net/xml/VOTable/v1.3">\n'
        ' <RESOURCE type="results">\n'
        f'  <INFO name="QUERY_STATUS" value="ERROR">{escape(message)}</INFO>\n'
        " </RESOURCE>\n</VOTABLE>\n"
    ).encode()


def _error_response(message: str, *, status: int) -> web.Response:
    return web.Response(status=status, body=error_votable(message), headers={"Content-Type": VOTABLE_TYPE})


def _html_503_response() -> web.Response:
    return web.Response(status=503, text=_HTML_503, content_type="text/html", headers={"Retry-After": "1"})


def _simulated_error() -> str:
    return "simulated service failure (fault injection: job_error_rate); the job can be retried"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _uws_parameters(job: _Job) -> str:
    return "".join(
        f"<uws:parameter id={quoteattr(k.lower())}>{escape(v)}</uws:parameter>" for k, v in job.params.items()
    )


def _time_element(name: str, timestamp: float | None) -> str:
    if timestamp is None:
        return f'<uws:{name} xsi:nil="true"/>\n'
    return f"<uws:{name}>{_iso(timestamp)}</uws:{name}>\n"


def _vosi_table(
    table: TableInfo, keys: Sequence[tuple[str, str, list[tuple[str, str]]]] = (), *, namespaces: bool = False
) -> str:
    ns = (
        ' xmlns:vs="http://www.ivoa.net/xml/VODataService/v1.1" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
        if namespaces
        else ""
    )
    columns = "".join(_vosi_column(c) for c in table.columns)
    description = f"<description>{escape(table.description)}</description>" if table.description else ""
    foreign = "".join(_vosi_key(target, text, pairs) for target, text, pairs in keys)
    return (
        f'<table type="table"{ns}><name>{escape(table.full_name)}</name>{description}\n{columns}{foreign}'
        "</table>\n"
    )


def _vosi_key(target: str, description: str, pairs: list[tuple[str, str]]) -> str:
    columns = "".join(
        f"<fkColumn><fromColumn>{escape(f)}</fromColumn><targetColumn>{escape(t)}</targetColumn></fkColumn>"
        for f, t in pairs
    )
    text = f"<description>{escape(description)}</description>" if description else ""
    return f"<foreignKey><targetTable>{escape(target)}</targetTable>{columns}{text}</foreignKey>\n"


def _vosi_column(column: ColumnDef) -> str:
    arraysize = ' arraysize="*"' if column.datatype == "char" else ""
    parts = [f"<name>{escape(delimited(column.name))}</name>"]
    if column.description:
        parts.append(f"<description>{escape(column.description)}</description>")
    if column.unit:
        parts.append(f"<unit>{escape(column.unit)}</unit>")
    if column.ucd:
        parts.append(f"<ucd>{escape(column.ucd)}</ucd>")
    if column.utype:
        parts.append(f"<utype>{escape(column.utype)}</utype>")
    parts.append(f'<dataType xsi:type="vs:VOTableType"{arraysize}>{column.datatype}</dataType>')
    if column.indexed:
        parts.append("<flag>indexed</flag>")
    return f"<column>{''.join(parts)}</column>\n"
