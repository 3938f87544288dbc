"""engine.plan.tap against the local archive's real TAP service (engine.archive.tap) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import pytest
import requests
from aiohttp import web

from engine.archive.tap import TapFaults, TapOptions, TapService
from engine.archive.tapdb import ColumnDef, TapDatabase
from engine.exceptions import TapJobError, TapTimeoutError, TapUnavailableError
from engine.plan.tap import DaemonExecutor, TapClient, TapHttpSession
from engine.settings import TapSettings
from tests.helpers import wait_until

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
        settings = TapSettings(url="http://example.org/tap", poll_timeout=0.4, job_timeout=0.6, retries=3)
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


# -- silent and broken services -------------------------------------------------------------------
QUICK = TapSettings(
    url="http://example.org/tap", poll_timeout=2.0, job_timeout=10.0, retries=1, request_timeout=0.5
)


@contextlib.contextmanager
def silent_server() -> Iterator[tuple[str, list[socket.socket]]]:
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte.

    Yields its base URL and the accepted connections (so a test can see requests arrived).
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/caom", accepted
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


def hang_on(method: str, suffix: str, release: asyncio.Event) -> Callable:
    """A middleware that holds every `method` request to a path ending in `suffix` until `release`."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
        if request.method == method and request.path.endswith(suffix):
            await release.wait()
        return await handler(request)

    return middleware


def spoil_results(how: str, release: asyncio.Event | None = None) -> tuple[Callable, list[str]]:
    """A middleware that spoils every job result: "half" (a complete answer holding half the VOTable),
    "cut" (the full Content-Length declared, half sent, the connection closed), "stall" (half sent,
    then silence until `release`) or "html" (a 200 page)."""
    spoiled: list[str] = []

    @web.middleware
    async def middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
        response = await handler(request)
        if request.method != "GET" or not request.path.endswith("/results/result"):
            return response
        spoiled.append(request.path)
        body = response.body if isinstance(response, web.Response) else b""
        assert isinstance(body, bytes) and body.startswith(b"<?xml"), "expected the archive's VOTable"
        if how == "html":
            return web.Response(text="<html><body>Oops</body></html>", content_type="text/html")
        if how == "half":
            return web.Response(body=body[: len(body) // 2], content_type=response.content_type)
        cut = web.StreamResponse(headers={"Content-Type": response.content_type})
        cut.content_length = len(body)
        await cut.prepare(request)
        await cut.write(body[: len(body) // 2])
        if how == "stall":
            assert release is not None
            await release.wait()
        assert request.transport is not None
        request.transport.close()
        return cut

    return middleware, spoiled


def test_a_service_that_never_answers_ends_in_unavailable_naming_it() -> None:
    with silent_server() as (url, accepted):

        async def main() -> None:
            with pytest.raises(TapUnavailableError) as info:
                await asyncio.wait_for(client(url, QUICK).hardlimit(), 60)
            assert "did not answer within 0.5 s" in info.value.message
            assert url in info.value.message
            with pytest.raises(TapUnavailableError, match=re.escape("did not answer within 0.5 s")):
                await asyncio.wait_for(client(url, QUICK).run("SELECT 1 FROM ivoa.things"), 60)

        asyncio.run(main())
        assert accepted, "the client never even connected"


def test_a_service_that_hangs_on_job_submission_times_out_and_is_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        release = asyncio.Event()
        services: list[TapService] = []
        async with serve(small_db(), middleware=hang_on("POST", "/async", release), services=services) as url:
            tap = client(url, QUICK)
            assert await tap.hardlimit() == TapOptions().hard_limit  # /capabilities still answers
            with pytest.raises(TapUnavailableError) as info:
                await asyncio.wait_for(tap.run("SELECT obs_id FROM ivoa.things"), 60)
            release.set()
        assert "did not answer within 0.5 s while submitting a job" in info.value.message
        assert info.value.exit_code == 3

    with caplog.at_level("WARNING", logger="engine.plan.tap"):
        asyncio.run(main())
    assert sum("trying again" in r.getMessage() for r in caplog.records) == QUICK.retries


@pytest.mark.parametrize("how", ["half", "cut", "html"])
def test_a_broken_result_is_retried_then_unavailable_never_an_internal_error(how: str) -> None:
    async def main() -> None:
        middleware, spoiled = spoil_results(how)
        async with serve(small_db(), middleware=middleware) as url:
            with pytest.raises(TapUnavailableError) as info:
                await client(url, QUICK).run("SELECT obs_id FROM ivoa.things")
        assert len(spoiled) == QUICK.retries + 1  # every try fetched a result and found it broken
        assert "sent a broken answer while fetching the result" in info.value.message
        assert url in info.value.message
        assert "\n" not in str(info.value)  # one line, whatever the parser said

    asyncio.run(main())


def test_a_broken_result_once_is_cured_by_the_retry() -> None:
    async def main() -> None:
        spoiled: list[str] = []

        @web.middleware
        async def once(request: web.Request, handler: Callable) -> web.StreamResponse:
            response = await handler(request)
            if request.path.endswith("/results/result") and not spoiled:
                spoiled.append(request.path)
                return web.Response(text="<VOTABLE><RESOURCE>", content_type="text/xml")
            return response

        async with serve(small_db(4), middleware=once) as url:
            table = await client(url, QUICK).run("SELECT obs_id FROM ivoa.things")
        assert len(table) == 4 and spoiled

    asyncio.run(main())


def test_garbage_instead_of_capabilities_is_tried_again_once_then_unavailable() -> None:
    async def main() -> None:
        seen: list[str] = []

        async def capabilities(request: web.Request) -> web.Response:
            seen.append(request.path)
            return web.Response(text="<?xml version='1.0'?><vosi:capa", content_type="text/xml")

        app = web.Application()
        app.router.add_get("/caom/capabilities", capabilities)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            url = f"http://127.0.0.1:{runner.addresses[0][1]}/caom"
            with pytest.raises(TapUnavailableError, match="bad /capabilities"):
                await client(url, FAST).hardlimit()
        finally:
            await runner.cleanup()
        assert len(seen) == 2  # one more try cures a cut answer; a wrong URL is not worth more

    asyncio.run(main())


def test_429_with_retry_after_is_retried_then_succeeds() -> None:
    async def main() -> None:
        refused: list[str] = []

        @web.middleware
        async def busy(request: web.Request, handler: Callable) -> web.StreamResponse:
            if request.method == "POST" and request.path.endswith("/async") and not refused:
                refused.append(request.path)
                return web.Response(status=429, headers={"Retry-After": "0"}, text="slow down")
            return await handler(request)

        async with serve(small_db(2), middleware=busy) as url:
            table = await client(url, QUICK).run("SELECT obs_id FROM ivoa.things")
        assert len(table) == 2 and refused

    asyncio.run(main())


def test_cancelling_a_call_returns_at_once_and_its_thread_gives_up() -> None:
    """The coroutine ends as soon as it is cancelled; the worker, blocked in a request to a silent
    service, ends when that request times out and sends nothing more."""
    settings = TapSettings(
        url="http://example.org/tap", poll_timeout=2.0, job_timeout=30.0, retries=4, request_timeout=2.0
    )
    with silent_server() as (url, accepted):
        executor = DaemonExecutor(2)

        async def main() -> None:
            tap = TapClient(url, settings=settings, executor=executor, backoff=0.01)
            task = asyncio.create_task(tap.run("SELECT 1 FROM ivoa.things"))
            assert await asyncio.to_thread(wait_until, lambda: len(accepted) >= 1, timeout=30)
            task.cancel()
            # Far below the request timeout times the tries (2 s x 5): the coroutine does not wait.
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 1.5)

        asyncio.run(main())
        threads = [t for t in threading.enumerate() if t.name.startswith("tap-")]
        assert threads and all(t.daemon for t in threads)
        assert wait_until(lambda: not any(t.is_alive() for t in threads) or _idle(executor), timeout=30)
        connections = len(accepted)
        executor.shutdown(wait=True)
        assert len(accepted) == connections, "a cancelled call must not try again"


def _idle(executor: DaemonExecutor) -> bool:
    return executor._idle == len(executor._threads)


def test_close_cancels_calls_in_flight_and_refuses_new_ones() -> None:
    with silent_server() as (url, accepted):

        async def main() -> None:
            tap = TapClient(url, settings=QUICK, backoff=0.01)
            task = asyncio.create_task(tap.run("SELECT 1 FROM ivoa.things"))
            assert await asyncio.to_thread(wait_until, lambda: len(accepted) >= 1, timeout=30)
            tap.close()
            with pytest.raises(TapJobError, match="cancelled"):
                await asyncio.wait_for(task, 30)
            with pytest.raises(TapJobError, match="closed"):
                await tap.run("SELECT 1 FROM ivoa.things")

        asyncio.run(main())


def test_every_request_gets_the_timeouts() -> None:
    seen: list[object] = []

    class Recording(TapHttpSession):
        def send(self, request, **kwargs):  # type: ignore[no-untyped-def]
            seen.append(kwargs.get("timeout"))
            raise requests.ConnectionError("recorded")

    session = Recording(7.0)
    for timeout in (None, 3, 30.0, (1.0, 40.0)):
        with pytest.raises(requests.ConnectionError):
            session.get("http://127.0.0.1:9/x", timeout=timeout)
    assert seen == [(7.0, 7.0), (7.0, 3.0), (7.0, 7.0), (1.0, 40.0)]


def test_a_result_that_stalls_halfway_times_out_naming_the_service() -> None:
    async def main() -> None:
        release = asyncio.Event()
        middleware, spoiled = spoil_results("stall", release)
        async with serve(small_db(), middleware=middleware) as url:
            try:
                with pytest.raises(TapUnavailableError) as info:
                    await asyncio.wait_for(client(url, QUICK).run("SELECT obs_id FROM ivoa.things"), 60)
            finally:
                release.set()
        assert "did not answer within 0.5 s while fetching the result" in info.value.message
        assert len(spoiled) == QUICK.retries + 1

    asyncio.run(main())


def test_capabilities_answering_503_are_retried_then_read() -> None:
    async def main() -> None:
        refused: list[str] = []

        @web.middleware
        async def unavailable_once(request: web.Request, handler: Callable) -> web.StreamResponse:
            if request.path.endswith("/capabilities") and not refused:
                refused.append(request.path)
                return web.Response(
                    status=503, text="<html>down for maintenance</html>", content_type="text/html"
                )
            return await handler(request)

        async with serve(small_db(), middleware=unavailable_once) as url:
            assert await client(url, QUICK).hardlimit() == TapOptions().hard_limit
        assert refused

    asyncio.run(main())


def test_a_call_still_queued_when_the_client_closes_fails_as_closed() -> None:
    """One worker thread, blocked on a silent service; a second call waits in the queue. close()
    drops the queued call: its caller gets "closed", not a cancellation it never asked for."""
    with silent_server() as (url, accepted):

        async def main() -> None:
            tap = TapClient(url, settings=QUICK, executor=None, backoff=0.01)
            tap._executor = DaemonExecutor(1)  # one thread, so the second call must queue
            first = asyncio.create_task(tap.run("SELECT 1 FROM ivoa.things"))
            assert await asyncio.to_thread(wait_until, lambda: len(accepted) >= 1, timeout=30)
            second = asyncio.create_task(tap.run("SELECT 2 FROM ivoa.things"))
            await asyncio.sleep(0)  # let it reach the queue
            tap.close()
            with pytest.raises(TapJobError, match="cancelled"):
                await asyncio.wait_for(first, 30)
            with pytest.raises(TapJobError, match="closed"):
                await asyncio.wait_for(second, 30)

        asyncio.run(main())
