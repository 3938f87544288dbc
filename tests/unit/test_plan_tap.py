"""engine.plan.tap against the local archive's real TAP service (engine.archive.tap) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator, Callable, Sequence

import pytest
from aiohttp import web

from engine.archive.tap import TapFaults, TapOptions, TapService
from engine.archive.tapdb import ColumnDef, TapDatabase
from engine.exceptions import TapJobError, TapTimeoutError, TapUnavailableError
from engine.plan.tap import TapClient
from engine.settings import TapSettings

pytestmark = pytest.mark.integration
PREFIX = "/caom"
FAST = TapSettings(url="http://127.0.0.1:9", poll_timeout=2.0, job_timeout=10.0, retries=3)


def char(name: str) -> ColumnDef:
    return ColumnDef(name, "char")


def number(name: str, datatype: str = "long") -> ColumnDef:
    return ColumnDef(name, datatype)


def small_db(rows: int = 5) -> TapDatabase:
    db = TapDatabase()
    db.add_table("ivoa", "things", [char("obs_id"), number("n")], [(f"o{i:03}", i) for i in range(rows)])
    return db


@contextlib.asynccontextmanager
async def serve(
    db: TapDatabase,
    *,
    options: TapOptions | None = None,
    middleware: Callable | None = None,
    services: list[TapService] | None = None,
) -> AsyncIterator[str]:
    """The archive's TapService on an aiohttp app on 127.0.0.1 with a free port; yields its base URL.

    The service object is appended to `services` when given, for its job count.
    """
    app = web.Application(middlewares=[middleware] if middleware else [])
    service = TapService(db, options or TapOptions())
    service.add_routes(app, PREFIX)
    if services is not None:
        services.append(service)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}{PREFIX}"
    finally:
        await runner.cleanup()


def html_503_first(count: int, methods: Sequence[str] = ("POST",)) -> tuple[Callable, list[str]]:
    """A middleware answering the first `count` matching requests with an HTML 503 page (pyvo #403)."""
    seen: list[str] = []

    @web.middleware
    async def middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
        if request.method in methods and request.path.endswith("/async") and len(seen) < count:
            seen.append(request.path)
            return web.Response(
                status=503, text="<html><body>Service Unavailable</body></html>", content_type="text/html"
            )
        return await handler(request)

    return middleware, seen


def client(url: str, settings: TapSettings = FAST) -> TapClient:
    return TapClient(url, settings=settings, backoff=0.01)


def test_run_returns_rows_and_overflow_flag() -> None:
    async def main() -> None:
        async with serve(small_db(5)) as url:
            tap = client(url)
            full = await tap.run("SELECT obs_id, n FROM ivoa.things ORDER BY obs_id")
            assert list(full["obs_id"]) == ["o000", "o001", "o002", "o003", "o004"]
            assert full.meta["overflow"] is False and full.meta["maxrec"] is None
            cut = await tap.run("SELECT obs_id FROM ivoa.things ORDER BY obs_id", maxrec=3)
            assert list(cut["obs_id"]) == ["o000", "o001", "o002"]
            assert cut.meta["overflow"] is True and cut.meta["maxrec"] == 3
            exact = await tap.run("SELECT obs_id FROM ivoa.things", maxrec=5)
            assert exact.meta["overflow"] is False

    asyncio.run(main())


def test_hardlimit_and_columns() -> None:
    async def main() -> None:
        async with serve(small_db(), options=TapOptions(default_maxrec=7, hard_limit=9)) as url:
            tap = client(url)
            assert await tap.hardlimit() == 9
            assert await tap.columns("ivoa.things") == {"obs_id", "n"}
            assert await tap.columns("dbo.caomartifact") is None
            assert await tap.has_columns("ivoa.things", {"OBS_ID"})
            assert not await tap.has_columns("ivoa.things", {"obs_id", "size"})

    asyncio.run(main())


def test_transient_html_503_is_retried_then_succeeds() -> None:
    async def main() -> None:
        middleware, seen = html_503_first(2)
        async with serve(small_db(3), middleware=middleware) as url:
            table = await client(url).run("SELECT obs_id FROM ivoa.things")
            assert len(table) == 3
            assert len(seen) == 2  # two refused job submissions, then the third try went through

    asyncio.run(main())


def test_503_every_time_ends_in_unavailable_after_the_retries() -> None:
    async def main() -> None:
        middleware, seen = html_503_first(100)
        async with serve(small_db(), middleware=middleware) as url:
            with pytest.raises(TapUnavailableError, match="HTTP 503") as info:
                await client(url).run("SELECT obs_id FROM ivoa.things")
            assert len(seen) == FAST.retries + 1
            assert info.value.hint == "check tap.url / --tap-url"

    asyncio.run(main())


def test_job_stuck_in_queued_times_out_fast() -> None:
    async def main() -> None:
        options = TapOptions(faults=TapFaults(queued_rate=1.0))
        settings = TapSettings(url="x", poll_timeout=0.4, job_timeout=0.6, retries=3)
        services: list[TapService] = []
        async with serve(small_db(), options=options, services=services) as url:
            with pytest.raises(TapTimeoutError, match=re.escape("still QUEUED after 0.6 s")):
                await client(url, settings).run("SELECT obs_id FROM ivoa.things")
            # Tried once more, not `retries` times: each try costs a whole job_timeout.
            assert services[0].job_count == 2

    asyncio.run(main())


def test_query_error_is_a_job_error_with_the_servers_message() -> None:
    async def main() -> None:
        async with serve(small_db()) as url:
            with pytest.raises(TapJobError, match="unknown column") as info:
                await client(url).run("SELECT nosuch FROM ivoa.things")
            assert "nosuch" in str(info.value)

    asyncio.run(main())


def test_transient_error_phase_is_retried_then_reported() -> None:
    async def main() -> None:
        options = TapOptions(faults=TapFaults(job_error_rate=1.0))
        async with serve(small_db(), options=options) as url:
            with pytest.raises(TapJobError, match="simulated service failure"):
                await client(url).run("SELECT obs_id FROM ivoa.things")

    asyncio.run(main())


def test_unreachable_url_is_unavailable() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def main() -> None:
        url = f"http://127.0.0.1:{port}/caom"
        with pytest.raises(TapUnavailableError, match="does not answer") as info:
            await client(url).run("SELECT 1 FROM ivoa.things")
        assert f"127.0.0.1:{port}" in str(info.value)
        with pytest.raises(TapUnavailableError, match="does not answer"):
            await client(url).hardlimit()

    asyncio.run(main())


def test_capabilities_that_do_not_answer_are_retried_and_a_wrong_url_is_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def main() -> None:
        with pytest.raises(TapUnavailableError, match="does not answer"):
            await client(f"http://127.0.0.1:{port}/caom").hardlimit()

    with caplog.at_level("WARNING", logger="engine.plan.tap"):
        asyncio.run(main())
    assert sum("trying again" in r.getMessage() for r in caplog.records) == FAST.retries


def test_not_a_tap_service_is_unavailable() -> None:
    async def main() -> None:
        app = web.Application()
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            url = f"http://127.0.0.1:{runner.addresses[0][1]}/nothing"
            with pytest.raises(TapUnavailableError, match="HTTP 404"):
                await client(url).run("SELECT 1 FROM ivoa.things")
            with pytest.raises(TapUnavailableError, match="is not a TAP service") as info:
                await client(url).hardlimit()
            assert "/nothing/capabilities: 404" in str(info.value)  # names the URL that was tried
        finally:
            await runner.cleanup()

    asyncio.run(main())
