"""The local TAP service, driven by pyvo exactly as the engine and the MAST notebook drive MAST."""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import pyvo
import requests
from aiohttp import web
from pyvo.dal.exceptions import DALOverflowWarning, DALQueryError, DALServiceError

from engine.archive.tap import TapFaults, TapOptions, TapService
from engine.archive.tapdb import ColumnDef, TapDatabase

PREFIX = "/vo-tap/api/v0.1/caom"
FOOTPRINT = (
    "POLYGON 330.343765 -44.336318 324.663797 -33.277719 337.720578 -28.384567 344.128621 -38.561643 "
    "330.343765 -44.336318"
)
FOOTPRINT_ADQL = FOOTPRINT.removeprefix("POLYGON ").replace(" ", ", ")
FFI = "tess2018207052942-s0001-1-2-0120-s"
# (obs_id, sector, ra, dec, trgType): three light curves inside the sector-1 footprint, one outside.
OBSERVATIONS = [
    (FFI, 1, 334.0, -36.5, "FIELD"),
    ("tess2018206045859-s0001-0000000025155310-0120-s", 1, 333.0, -37.0, "OBJECT"),
    ("tess2018206045859-s0001-0000000038846515-0120-s", 1, 335.5, -35.0, "OBJECT"),
    ("tess2018234235059-s0002-0000000025155310-0121-s", 2, 333.0, -37.0, "OBJECT"),
    ("tess2018206045859-s0001-0000000099999999-0120-s", 1, 10.0, 20.0, "OBJECT"),
]


def build_db() -> TapDatabase:
    db = TapDatabase()
    db.add_table(
        "dbo",
        "caomobservation",
        [
            ColumnDef("observationID", "char", "observation id", indexed=True),
            ColumnDef("collection", "char"),
            ColumnDef("trgType", "char"),
            ColumnDef("sequenceNumber", "int", "sector"),
        ],
        [(o, "TESS", t, s) for o, s, _, _, t in OBSERVATIONS],
    )
    db.add_table(
        "ivoa",
        "obscore",
        [
            ColumnDef("obs_id", "char"),
            ColumnDef("obs_collection", "char"),
            ColumnDef("dataproduct_type", "char"),
            ColumnDef("target_name", "char"),
            ColumnDef("s_ra", "double", unit="deg", ucd="pos.eq.ra"),
            ColumnDef("s_dec", "double", unit="deg"),
            ColumnDef("s_region", "char"),
            ColumnDef("access_url", "char"),
            ColumnDef("access_estsize", "long", unit="kbyte"),
        ],
        [
            (
                o,
                "TESS",
                "image" if t == "FIELD" else "timeseries",
                o.split("-")[2].lstrip("0") if t == "OBJECT" else "",
                ra,
                dec,
                FOOTPRINT if t == "FIELD" else "",
                f"http://127.0.0.1/files/{o}{'_ffic' if t == 'FIELD' else '_lc'}.fits",
                1991,
            )
            for o, _, ra, dec, t in OBSERVATIONS
        ],
    )
    return db


class Server:
    """The TAP routes on 127.0.0.1, in a background thread with its own event loop."""

    def __init__(self, service: TapService) -> None:
        self.service = service
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        self.service.add_routes(app, PREFIX)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PREFIX}"

    def __enter__(self) -> Server:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@contextmanager
def serve(options: TapOptions | None = None) -> Iterator[Server]:
    with Server(TapService(build_db(), options or TapOptions(max_wait=2.0))) as server:
        yield server


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with serve() as running:
        yield running


@pytest.fixture(scope="module")
def tap(server: Server) -> pyvo.dal.TAPService:
    return pyvo.dal.TAPService(server.url)


NOTEBOOK_FOOTPRINT_QUERY = """
    SELECT top 1 obs_id, s_region
    FROM dbo.caomobservation JOIN ivoa.obscore on dbo.caomobservation.observationID = ivoa.obscore.obs_id
    WHERE collection = 'TESS' and trgType = 'FIELD' and
    sequenceNumber = 1 and observationID like 'tess%-s0001-1-2-%-s'
"""
NOTEBOOK_INVENTORY_QUERY = f"""
    SELECT target_name, sequenceNumber as sector, s_ra, s_dec, access_url, access_estsize, obs_id
    FROM dbo.caomobservation JOIN ivoa.obscore on dbo.caomobservation.observationID = ivoa.obscore.obs_id
    WHERE obs_collection = 'TESS' and dataproduct_type = 'timeseries'
    and access_url like '%lc.fits' and
    CONTAINS(POINT('ICRS',s_ra,s_dec),POLYGON('ICRS', {FOOTPRINT_ADQL}))=1
    ORDER BY obs_id
"""


def test_notebook_footprint_query_async(tap: pyvo.dal.TAPService) -> None:
    table = tap.run_async(NOTEBOOK_FOOTPRINT_QUERY).to_table()
    assert list(table["obs_id"]) == [FFI]
    assert table["s_region"][0] == FOOTPRINT
    assert isinstance(table["obs_id"][0], str)


def test_notebook_inventory_query_sync_and_async_agree(tap: pyvo.dal.TAPService) -> None:
    expected = sorted(o for o, _, ra, _, t in OBSERVATIONS if t == "OBJECT" and ra > 300)
    for table in (
        tap.run_sync(NOTEBOOK_INVENTORY_QUERY).to_table(),
        tap.run_async(NOTEBOOK_INVENTORY_QUERY).to_table(),
    ):
        assert list(table["obs_id"]) == expected
        assert table.colnames == [
            "target_name",
            "sector",
            "s_ra",
            "s_dec",
            "access_url",
            "access_estsize",
            "obs_id",
        ]
        assert sorted(set(table["sector"])) == [1, 2]
        assert str(table["s_ra"].unit) == "deg"


def test_maxrec_overflow_is_seen_by_pyvo(tap: pyvo.dal.TAPService) -> None:
    query = "SELECT obs_id FROM ivoa.obscore ORDER BY obs_id"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = tap.run_async(query, maxrec=2)
    assert len(result) == 2
    assert result.query_status == "OVERFLOW"
    assert not any(issubclass(w.category, DALOverflowWarning) for w in caught)  # asked-for truncation
    complete = tap.run_sync(query, maxrec=len(OBSERVATIONS))
    assert complete.query_status == "OK"
    assert len(complete) == len(OBSERVATIONS)


def test_keyset_paging_walks_every_row_once(tap: pyvo.dal.TAPService) -> None:
    seen: list[str] = []
    last = ""
    while True:
        page = tap.run_sync(f"SELECT TOP 2 obs_id FROM ivoa.obscore WHERE obs_id > '{last}' ORDER BY obs_id")
        ids = [str(x) for x in page.to_table()["obs_id"]]
        if not ids:
            break
        seen += ids
        last = ids[-1]
    assert seen == sorted(o for o, *_ in OBSERVATIONS)


def test_count_group_by_and_case_insensitive_names(tap: pyvo.dal.TAPService) -> None:
    table = tap.run_sync(
        "SELECT SEQUENCENUMBER, COUNT(*) AS n FROM DBO.CaomObservation GROUP BY sequencenumber ORDER BY 1"
    ).to_table()
    assert list(table["sequenceNumber"]) == [1, 2]
    assert list(table["n"]) == [4, 1]


def test_csv_output(server: Server) -> None:
    response = requests.get(
        f"{server.url}/sync",
        params={"QUERY": "SELECT obs_id, s_ra FROM ivoa.obscore WHERE s_ra < 100", "FORMAT": "csv"},
        timeout=10,
    )
    assert response.headers["Content-Type"].startswith("text/csv")
    assert response.text.splitlines() == ["obs_id,s_ra", f"{OBSERVATIONS[4][0]},10.0"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("SELECT foo FROM ivoa.obscore", "unknown column 'foo'"),
        ("SELECT obs_id FROM dbo.nothere", "unknown table 'dbo.nothere'"),
        ("SELECT obs_id FROM ivoa.obscore WHERE", "syntax error"),
    ],
)
def test_bad_queries_end_in_error_with_readable_message(
    tap: pyvo.dal.TAPService, query: str, message: str
) -> None:
    with pytest.raises(DALQueryError, match=message):
        tap.run_async(query)
    with pytest.raises(DALQueryError, match=message):
        tap.run_sync(query)


def test_error_phase_and_error_document(server: Server) -> None:
    job = pyvo.dal.AsyncTAPJob.create(server.url, "SELECT foo FROM ivoa.obscore")
    job.run().wait(timeout=10)
    assert job.phase == "ERROR"
    error = requests.get(f"{job.url}/error", timeout=10)
    assert 'value="ERROR"' in error.text and "unknown column 'foo'" in error.text


def test_tables_maxrec_hardlimit(tap: pyvo.dal.TAPService) -> None:
    assert tap.maxrec == 100_000 and tap.hardlimit == 100_000
    names = list(tap.tables.keys())
    assert {"dbo.caomobservation", "ivoa.obscore", "TAP_SCHEMA.columns"} <= set(names)
    columns = [c.name for c in tap.tables["dbo.caomobservation"].columns]
    assert columns == ["observationID", "collection", "trgType", "sequenceNumber"]
    described = tap.run_sync(
        "SELECT column_name, datatype, indexed FROM TAP_SCHEMA.columns "
        "WHERE table_name = 'dbo.caomobservation'"
    ).to_table()
    assert dict(zip(described["column_name"], described["indexed"], strict=True))["observationID"] == 1


def test_create_with_phase_run_redirect_and_delete(server: Server) -> None:
    created = requests.post(
        f"{server.url}/async", data={"QUERY": "SELECT TOP 1 obs_id FROM ivoa.obscore", "PHASE": "RUN"},
        allow_redirects=False, timeout=10,
    )  # fmt: skip
    assert created.status_code == 303
    job_url = created.headers["Location"]
    assert job_url.startswith(f"http://127.0.0.1:{server.port}{PREFIX}/async/")
    document = requests.get(job_url, params={"WAIT": "-1"}, timeout=10).text
    assert "<uws:phase>COMPLETED</uws:phase>" in document and f"{job_url}/results/result" in document
    assert requests.delete(job_url, allow_redirects=False, timeout=10).status_code == 303
    assert requests.get(job_url, timeout=10).status_code == 404


def test_fault_job_error() -> None:
    with (
        serve(TapOptions(faults=TapFaults(job_error_rate=1.0))) as server,
        pytest.raises(DALQueryError, match="simulated"),
    ):
        pyvo.dal.TAPService(server.url).run_async("SELECT obs_id FROM ivoa.obscore")


def test_fault_stays_queued_after_wait_then_abort() -> None:
    with serve(TapOptions(max_wait=0.2, faults=TapFaults(queued_rate=1.0))) as server:
        job = pyvo.dal.AsyncTAPJob.create(server.url, "SELECT obs_id FROM ivoa.obscore")
        job.run()
        document = requests.get(job.url, params={"WAIT": "5"}, timeout=10).text  # capped at max_wait
        assert "<uws:phase>QUEUED</uws:phase>" in document
        job.abort()
        assert job.phase == "ABORTED"


def test_fault_slow_poll_delays_job_document() -> None:
    with serve(TapOptions(faults=TapFaults(slow_poll_seconds=0.3))) as server:
        job = pyvo.dal.AsyncTAPJob.create(server.url, "SELECT obs_id FROM ivoa.obscore")
        started = time.monotonic()
        assert job.phase == "PENDING"
        assert time.monotonic() - started >= 0.3


def test_fault_html_503_every_request() -> None:
    with serve(TapOptions(faults=TapFaults(html_503_rate=1.0))) as server:
        created = requests.post(f"{server.url}/async", data={"QUERY": "SELECT 1"}, timeout=10)
        assert created.status_code == 503
        assert created.headers["Content-Type"].startswith("text/html")
        with pytest.raises(DALServiceError):
            pyvo.dal.TAPService(server.url).run_async("SELECT obs_id FROM ivoa.obscore")


def test_fault_rates_are_deterministic_for_a_seed() -> None:
    def outcomes(seed: int) -> list[bool]:
        service = TapService(TapDatabase(), TapOptions(faults=TapFaults(seed=seed, job_error_rate=0.5)))
        return [service._fault("error", 0.5, n) for n in range(1, 41)]

    assert outcomes(7) == outcomes(7)
    assert outcomes(7) != outcomes(8)
    assert 5 < sum(outcomes(7)) < 35
