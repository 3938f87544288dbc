"""The hostile file faults (redirect, overlong, lie) and the shared link cap, with raw clients."""

from __future__ import annotations

import asyncio
import hashlib
import time
from urllib.parse import urlsplit

import aiohttp
import pytest

from engine.archive.catalog import Catalog, build_catalog
from engine.archive.faults import LIE_EXTRA, OVERLONG_EXTRA, FaultPlan
from tests.unit.test_archive_files import serving


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return build_catalog(sectors=(1,), targets=4, cadences=200, seed=9)


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize(
    ("spec", "location"),
    [
        ("redirect=1", "ftp://127.0.0.1/{name}"),
        ("redirect=1:to=ftp", "ftp://127.0.0.1/{name}"),
        ("redirect=1:to=file", "file:///etc/passwd"),
    ],
)
def test_redirect_points_to_another_scheme(catalog, tmp_path, spec, location):
    async def main():
        async with serving(catalog, tmp_path, spec) as s, aiohttp.ClientSession() as client:
            async with client.get(s.url(), allow_redirects=False) as response:
                assert response.status == 302
                assert response.headers["Location"] == location.format(name=s.entry().name)
            assert (s.server.request_log[-1].status, s.server.request_log[-1].fault) == (302, "redirect")

    run(main())


def test_redirect_to_http_comes_back_and_heals_after_its_attempts(catalog, tmp_path):
    async def main():
        async with (
            serving(catalog, tmp_path, "redirect=1:to=http:attempts=1") as s,
            aiohttp.ClientSession() as client,
        ):
            async with client.get(s.url(), allow_redirects=False) as first:
                assert first.status == 302
                assert urlsplit(first.headers["Location"]).query == urlsplit(s.url()).query
            async with client.get(s.url()) as followed:  # aiohttp follows http redirects itself
                body = await followed.read()
            assert hashlib.md5(body).hexdigest() == s.entry().md5
            assert [r.status for r in s.server.request_log] == [302, 200]

    run(main())


def test_overlong_body_has_no_content_length_and_runs_past_the_file(catalog, tmp_path):
    async def main():
        async with serving(catalog, tmp_path, "overlong=1") as s, aiohttp.ClientSession() as client:
            entry = s.entry()
            async with client.get(s.url()) as response:
                assert "Content-Length" not in response.headers
                assert response.headers["Transfer-Encoding"] == "chunked"
                body = await response.read()
            assert len(body) == entry.size + OVERLONG_EXTRA
            assert hashlib.md5(body[: entry.size]).hexdigest() == entry.md5  # the file, then surplus
            async with client.get(s.url(), headers={"Range": "bytes=100-"}) as part:
                assert part.status == 206 and len(await part.read()) == entry.size - 100 + OVERLONG_EXTRA

    run(main())


async def _raw_get(port: int, target: str) -> tuple[bytes, bytes]:
    """One GET on a fresh socket: (header block, every byte after it until the server closes or idles)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    rest = bytearray()
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(1 << 16), timeout=0.5)
        except asyncio.TimeoutError:
            break  # keep-alive: the server waits for our next request
        if not chunk:
            break
        rest += chunk
    writer.close()
    return head, bytes(rest)


def test_lie_sends_more_bytes_than_its_content_length(catalog, tmp_path):
    async def main():
        async with serving(catalog, tmp_path, "lie=1") as s:
            entry = s.entry()
            parts = urlsplit(s.url())
            head, rest = await _raw_get(parts.port, f"{parts.path}?{parts.query}")
            assert head.startswith(b"HTTP/1.1 200")
            assert f"Content-Length: {entry.size}\r\n".encode() in head
            assert len(rest) == entry.size + LIE_EXTRA
            assert hashlib.md5(rest[: entry.size]).hexdigest() == entry.md5
            assert s.server.request_log[-1].fault == "lie"
            # aiohttp's client never hands over more than Content-Length bytes: with a small file the
            # surplus arrives in the same read as the headers and the whole answer is refused.
            async with aiohttp.ClientSession() as client:
                with pytest.raises(aiohttp.ClientResponseError, match="Bad status line"):
                    await _read(client, s.url())

    run(main())


def test_linkcap_is_shared_by_concurrent_downloads(catalog, tmp_path):
    rate = 200_000

    async def main():
        async with serving(catalog, tmp_path, f"linkcap={rate}") as s, aiohttp.ClientSession() as client:
            urls = [s.url("lc"), s.url("tp")]
            entries = [s.entry("lc"), s.entry("tp")]
            started = time.monotonic()
            bodies = await asyncio.gather(*(_read(client, url) for url in urls))
            elapsed = time.monotonic() - started
            for body, entry in zip(bodies, entries, strict=True):
                assert hashlib.md5(body).hexdigest() == entry.md5
            total = sum(len(b) for b in bodies)
            # Both together get at most `rate` (plus one burst): a lower bound on time, not a speed test.
            # A per-response cap would let them finish in max(len)/rate, well under total/rate.
            assert elapsed >= (total - rate / 20) / rate
            assert (total - rate / 20) / rate > 1.2 * max(len(b) for b in bodies) / rate  # the test bites

    run(main())


async def _read(client: aiohttp.ClientSession, url: str) -> bytes:
    async with client.get(url) as response:
        return await response.read()


def test_spec_parses_the_new_faults():
    plan = FaultPlan.from_spec("redirect=0.5:to=file,overlong=0.1,lie=0.2:files=*_lc.fits,linkcap=5e6")
    assert [(r.kind, r.rate, r.to) for r in plan.rules] == [
        ("redirect", 0.5, "file"),
        ("overlong", 0.1, "ftp"),
        ("lie", 0.2, "ftp"),
    ]
    assert plan.rules[2].files == "*_lc.fits" and plan.linkcap == 5e6
    assert plan.decide("x_lc.fits", 1) == plan.decide("x_lc.fits", 1)  # deterministic


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("redirect=1:to=gopher", "gopher"),
        ("500=1:to=ftp", "to= applies only to redirect"),
        ("linkcap=0", "linkcap"),
    ],
)
def test_invalid_new_fault_tokens_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        FaultPlan.from_spec(bad)
