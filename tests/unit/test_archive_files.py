"""The file server (HEAD, GET, Range, If-Range, 404) and every fault, on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from engine.archive.catalog import Catalog, build_catalog
from engine.archive.faults import FaultPlan
from engine.archive.files import FileServer, FileStore


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return build_catalog(sectors=(1,), targets=4, cadences=200, seed=9)


class Running:
    def __init__(self, server: FileServer, base: str, catalog: Catalog) -> None:
        self.server, self.base, self.catalog = server, base, catalog
        self.plan = FaultPlan()

    def url(self, product: str = "lc") -> str:
        entry = next(f for f in self.catalog.values() if f.product == product)
        return f"{self.base}/api/v0.1/Download/file?uri={entry.uri}"

    def entry(self, product: str = "lc"):
        return next(f for f in self.catalog.values() if f.product == product)


@contextlib.asynccontextmanager
async def serving(catalog: Catalog, directory, spec: str = "") -> AsyncIterator[Running]:
    holder: list[FaultPlan] = [FaultPlan.from_spec(spec)]
    server = FileServer(catalog, FileStore(catalog, directory), lambda: holder[0])
    app = web.Application()
    server.add_routes(app)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    running = Running(server, f"http://127.0.0.1:{port}", catalog)
    try:
        yield running
    finally:
        server.closing.set()
        await runner.cleanup()


def run(coro):
    return asyncio.run(coro)


def test_head_and_get_serve_the_declared_file(catalog, tmp_path):
    async def main():
        async with serving(catalog, tmp_path) as s, aiohttp.ClientSession() as client:
            entry = s.entry()
            async with client.head(s.url()) as head:
                assert head.status == 200
                assert int(head.headers["Content-Length"]) == entry.size
                assert await head.read() == b""
            async with client.get(s.url()) as get:
                body = await get.read()
                assert get.status == 200 and get.headers["ETag"]
            assert len(body) == entry.size and hashlib.md5(body).hexdigest() == entry.md5
            assert (tmp_path / entry.name).stat().st_size == entry.size  # materialised once, on disk
            assert [(r.method, r.name, r.status) for r in s.server.request_log] == [
                ("HEAD", entry.name, 200),
                ("GET", entry.name, 200),
            ]

    run(main())


def test_range_if_range_and_416(catalog, tmp_path):
    async def main():
        async with serving(catalog, tmp_path) as s, aiohttp.ClientSession() as client:
            size = s.entry().size
            async with client.get(s.url()) as full:
                whole, etag = await full.read(), full.headers["ETag"]
            async with client.get(s.url(), headers={"Range": "bytes=100-199"}) as part:
                assert part.status == 206
                assert part.headers["Content-Range"] == f"bytes 100-199/{size}"
                assert await part.read() == whole[100:200]
            async with client.get(s.url(), headers={"Range": "bytes=-10"}) as tail:
                assert tail.status == 206 and await tail.read() == whole[-10:]
            async with client.get(s.url(), headers={"Range": "bytes=100-", "If-Range": etag}) as same:
                assert same.status == 206 and await same.read() == whole[100:]
            async with client.get(s.url(), headers={"Range": "bytes=100-", "If-Range": '"stale"'}) as stale:
                assert stale.status == 200 and await stale.read() == whole
            async with client.get(s.url(), headers={"Range": f"bytes={size}-"}) as beyond:
                assert beyond.status == 416 and beyond.headers["Content-Range"] == f"bytes */{size}"
            assert s.server.request_log[1].range == "bytes=100-199"

    run(main())


def test_unknown_and_malformed_uris_are_404(catalog, tmp_path):
    async def main():
        async with serving(catalog, tmp_path) as s, aiohttp.ClientSession() as client:
            for query in ("?uri=mast:TESS/product/nope_lc.fits", "?uri=garbage", ""):
                async with client.get(f"{s.base}/api/v0.1/Download/file{query}") as response:
                    assert response.status == 404
            async with client.get(s.url().replace("/file?", "/file/?")) as slash:  # MAST bulk-script form
                assert slash.status == 200

    run(main())


async def _get(client: aiohttp.ClientSession, url: str, **kwargs) -> tuple[int, dict, bytes]:
    async with client.get(url, **kwargs) as response:
        return response.status, dict(response.headers), await response.read()


@pytest.mark.parametrize("code", [500, 502])
def test_server_errors(catalog, tmp_path, code):
    async def main():
        async with serving(catalog, tmp_path, f"{code}=1") as s, aiohttp.ClientSession() as client:
            status, _headers, _body = await _get(client, s.url())
            assert status == code
            assert s.server.request_log[-1].fault == str(code)

    run(main())


@pytest.mark.parametrize("code", [429, 503])
def test_throttling_answers_carry_retry_after(catalog, tmp_path, code):
    async def main():
        async with (
            serving(catalog, tmp_path, f"{code}=1:retry_after=7") as s,
            aiohttp.ClientSession() as client,
        ):
            status, headers, _body = await _get(client, s.url())
            assert status == code and headers["Retry-After"] == "7"

    run(main())


def test_html_page_with_status_200(catalog, tmp_path):
    async def main():
        async with serving(catalog, tmp_path, "html=1") as s, aiohttp.ClientSession() as client:
            status, headers, body = await _get(client, s.url())
            assert status == 200 and body.startswith(b"<") and "text/html" in headers["Content-Type"]

    run(main())


def test_wrong_bytes_keep_the_size_but_not_the_md5(catalog, tmp_path):
    async def main():
        async with serving(catalog, tmp_path, "wrong=1") as s, aiohttp.ClientSession() as client:
            status, _headers, body = await _get(client, s.url())
            assert status == 200 and len(body) == s.entry().size
            assert hashlib.md5(body).hexdigest() != s.entry().md5

    run(main())


def test_short_body_ends_before_content_length(catalog, tmp_path):
    async def main():
        async with serving(catalog, tmp_path, "short=1") as s, aiohttp.ClientSession() as client:
            received = bytearray()
            with pytest.raises(aiohttp.ClientPayloadError):
                async with client.get(s.url()) as response:
                    assert int(response.headers["Content-Length"]) == s.entry().size
                    async for chunk in response.content.iter_any():
                        received += chunk
            assert 0 < len(received) < s.entry().size

    run(main())


def test_reset_mid_body_raises_a_client_error(catalog, tmp_path):
    async def main():
        async with serving(catalog, tmp_path, "reset=1") as s, aiohttp.ClientSession() as client:
            with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientOSError)):
                await _get(client, s.url())
            assert s.server.request_log[-1].fault == "reset"

    run(main())


def test_stall_sends_some_bytes_then_stops(catalog, tmp_path):
    async def main():
        async with (
            serving(catalog, tmp_path, "stall=1:after=1000:for=60") as s,
            aiohttp.ClientSession() as client,
            client.get(s.url()) as response,
        ):
            first = await response.content.readexactly(1000)
            assert len(first) == 1000
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(response.content.read(1), timeout=0.3)

    run(main())


def test_latency_delays_the_first_byte(catalog, tmp_path):
    async def main():
        async with serving(catalog, tmp_path, "latency=0.3") as s, aiohttp.ClientSession() as client:
            started = time.monotonic()
            status, _headers, _body = await _get(client, s.url())
            assert status == 200 and time.monotonic() - started >= 0.3

    run(main())


def test_bandwidth_cap_paces_the_body(catalog, tmp_path):
    async def main():
        async with serving(catalog, tmp_path, "bandwidth=100000") as s, aiohttp.ClientSession() as client:
            started = time.monotonic()
            status, _headers, body = await _get(client, s.url())
            assert status == 200 and hashlib.md5(body).hexdigest() == s.entry().md5
            # The server sleeps len/rate after each write: a lower bound, not a speed measurement.
            assert time.monotonic() - started >= (len(body) - 5000) / 100_000

    run(main())


def test_attempt_limited_fault_heals_on_retry_and_unlimited_one_does_not(catalog, tmp_path):
    async def main():
        async with serving(catalog, tmp_path, "wrong=1:attempts=1") as s, aiohttp.ClientSession() as client:
            md5s = [hashlib.md5((await _get(client, s.url()))[2]).hexdigest() for _ in range(2)]
            assert md5s[0] != s.entry().md5 and md5s[1] == s.entry().md5
            assert [r.attempt for r in s.server.request_log] == [1, 2]
        async with serving(catalog, tmp_path, "wrong=1:attempts=0") as s, aiohttp.ClientSession() as client:
            md5s = [hashlib.md5((await _get(client, s.url()))[2]).hexdigest() for _ in range(3)]
            assert all(md5 != s.entry().md5 for md5 in md5s)

    run(main())


def test_fault_limited_by_file_glob(catalog, tmp_path):
    async def main():
        async with (
            serving(catalog, tmp_path, "500=1:files=*_tp.fits") as s,
            aiohttp.ClientSession() as client,
        ):
            assert (await _get(client, s.url("tp")))[0] == 500
            assert (await _get(client, s.url("lc")))[0] == 200

    run(main())


def test_fault_decisions_are_deterministic_and_follow_the_rate():
    plan = FaultPlan.from_spec("500=0.3,seed=7")
    names = [f"file{i}_lc.fits" for i in range(2000)]
    first = [plan.decide(name, 1).status for name in names]
    assert first == [FaultPlan.from_spec("seed=7,500=0.3").decide(name, 1).status for name in names]
    assert 0.25 < first.count("500") / len(names) < 0.35
    other_seed = [FaultPlan.from_spec("500=0.3,seed=8").decide(name, 1).status for name in names]
    assert other_seed != first


def test_spec_parses_every_kind_and_tap_faults():
    plan = FaultPlan.from_spec(
        "500=0.2,429=0.1:retry_after=2,reset=0.2,latency=0.05,bandwidth=2000000,seed=7,"
        "stall=0.1:after=10:for=5,tap_error=0.5,tap_queued=0.1,tap_html503=0.2,tap_slow=1.5"
    )
    assert plan.seed == 7 and plan.latency == 0.05 and plan.bandwidth == 2_000_000
    assert [(r.kind, r.rate) for r in plan.rules] == [
        ("500", 0.2),
        ("429", 0.1),
        ("reset", 0.2),
        ("stall", 0.1),
    ]
    assert plan.rules[1].retry_after == 2 and plan.rules[3].after == 10 and plan.rules[3].stall_seconds == 5
    tap = plan.tap_faults()
    assert (tap.seed, tap.job_error_rate, tap.queued_rate, tap.html_503_rate, tap.slow_poll_seconds) == (
        7,
        0.5,
        0.1,
        0.2,
        1.5,
    )


@pytest.mark.parametrize("bad", ["500=2", "bogus=1", "500=x", "500=0.1:foo=1", "latency", "bandwidth=0"])
def test_invalid_spec_names_the_bad_token(bad):
    with pytest.raises(ValueError, match=bad.split(":")[0].split("=")[0]):
        FaultPlan.from_spec(f"seed=1,{bad}")


@pytest.mark.integration
def test_local_archive_serves_files_and_swaps_faults(archive):
    import requests

    local = archive(targets=8)
    entry = next(f for f in local.catalog.values() if f.product == "lc")
    url = f"{local.base_url}/api/v0.1/Download/file?uri={entry.uri}"
    assert local.tap_url == local.base_url + "/vo-tap/api/v0.1/caom"
    assert hashlib.md5(requests.get(url, timeout=10).content).hexdigest() == entry.md5
    local.faults = FaultPlan.from_spec("503=1:retry_after=3")
    response = requests.get(url, timeout=10)
    assert response.status_code == 503 and response.headers["Retry-After"] == "3"
    assert [r.status for r in local.request_log] == [200, 503]
