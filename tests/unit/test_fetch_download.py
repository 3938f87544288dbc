"""Downloader.fetch against a tiny fault-injecting HTTP server on 127.0.0.1 (started per test)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from astropy.io import fits
from yarl import URL

from engine.exceptions import DiskFullError, PermissionDeniedError, UnsafeRedirectError
from engine.fetch.download import RESUME_MIN_BYTES, Downloader, PartFile
from engine.fetch.http import redirect_target as _redirect_target
from engine.fetch.session import open_session
from engine.fetch.throttle import AdaptiveLimiter
from engine.models import FileStatus, PlanItem, VerifyLevel
from engine.settings import FetchSettings, VerifySettings


# -- test data --------------------------------------------------------------------------------------
def make_fits(rows: int = 12000, seed: int = 1) -> bytes:
    """A small light-curve-shaped FITS file with CHECKSUM/DATASUM in every HDU."""
    rng = np.random.default_rng(seed)
    primary = fits.PrimaryHDU()
    primary.header["TELESCOP"] = "TESS"
    table = fits.BinTableHDU.from_columns(
        [
            fits.Column(name="TIME", format="D", array=np.arange(rows) * 0.0013888),
            fits.Column(name="PDCSAP_FLUX", format="E", array=rng.normal(1000, 5, rows)),
        ],
        name="LIGHTCURVE",
    )
    buffer = io.BytesIO()
    fits.HDUList([primary, table]).writeto(buffer, checksum=True)
    return buffer.getvalue()


FITS_BYTES = make_fits()
FITS_MD5 = hashlib.md5(FITS_BYTES).hexdigest()


def corrupt_data(data: bytes) -> bytes:
    """Flip one byte inside the table data (well past both headers): parses, but fails DATASUM."""
    corrupted = bytearray(data)
    corrupted[len(data) - 4000] ^= 0xFF
    return bytes(corrupted)


# -- the tiny archive -------------------------------------------------------------------------------
@dataclass
class Behaviour:
    """What the server does for one request (consumed in order; afterwards it serves normally)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None  # replaces the file's bytes
    announce: int | None = None  # Content-Length to announce; -1: none (chunked)
    reset_after: int | None = None  # cut the connection after this many body bytes
    stall_after: int | None = None  # go silent after this many body bytes ...
    stall_seconds: float = 0.0  # ... for this long
    ignore_range: bool = False


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


class TinyArchive:
    """Serves `files` with Range/ETag/If-Range support and scripted faults."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.script: dict[str, list[Behaviour]] = {}
        self.redirects: dict[str, str] = {}
        self.seen: list[Seen] = []
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()

    def url(self, name: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/files/{name}"

    def requests_for(self, name: str) -> list[Seen]:
        return [seen for seen in self.seen if seen.path == f"/files/{name}"]

    async def __aenter__(self) -> TinyArchive:
        app = web.Application()
        app.router.add_get("/files/{name}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.seen.append(Seen(request.path, dict(request.headers)))
        if name in self.redirects:
            raise web.HTTPFound(self.redirects[name])
        queue = self.script.get(name) or []
        behaviour = queue.pop(0) if queue else Behaviour()
        if behaviour.status != 200:
            return web.Response(status=behaviour.status, headers=behaviour.headers, text="error")
        data = self.files[name] if behaviour.body is None else behaviour.body
        etag = '"' + hashlib.md5(data).hexdigest() + '"'
        start, status = 0, 200
        headers = {"ETag": etag, **behaviour.headers}
        wanted = request.headers.get("Range", "")
        resumable = wanted.startswith("bytes=") and not behaviour.ignore_range
        if resumable and request.headers.get("If-Range", etag) == etag:
            start, status = int(wanted[6:].rstrip("-")), 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        response = web.StreamResponse(status=status, headers=headers)
        announce = len(data) - start if behaviour.announce is None else behaviour.announce
        if announce >= 0:
            response.content_length = announce
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        await self._send(request, response, memoryview(data)[start:], behaviour)
        return response

    async def _send(
        self, request: web.Request, response: web.StreamResponse, body: memoryview, b: Behaviour
    ) -> None:
        sent = 0
        while sent < len(body):
            piece = bytes(body[sent : sent + 8192])
            if b.reset_after is not None and sent + len(piece) > b.reset_after:
                await response.write(piece[: b.reset_after - sent])
                assert request.transport is not None
                request.transport.abort()
                return
            if b.stall_after is not None and sent >= b.stall_after:
                b.stall_after = None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._release.wait(), b.stall_seconds)
            try:
                await response.write(piece)
            except (ConnectionResetError, RuntimeError):
                return  # the client went away
            sent += len(piece)
        await response.write_eof()


class FakeClock:
    """Monotonic time that advances only when something sleeps; the sleeps are recorded."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def settings(**overrides: object) -> FetchSettings:
    base = dict(retries=3, backoff_initial=0.01, backoff_max=0.05, idle_timeout=5.0, chunk_size=64 * 1024)
    base.update(overrides)
    return FetchSettings(**base)  # type: ignore[arg-type]


def item_for(
    archive: TinyArchive, name: str, data: bytes, *, declare: bool = True, **fields: object
) -> PlanItem:
    declared = {"size": len(data), "md5": hashlib.md5(data).hexdigest()} if declare else {}
    declared.update(fields)
    return PlanItem(url=archive.url(name), filename=name, **declared)  # type: ignore[arg-type]


Scenario = Callable[[TinyArchive, Downloader, FakeClock], Awaitable[None]]


def run(scenario: Scenario, *, fetch: FetchSettings | None = None, level: VerifyLevel = VerifyLevel.FITS,
        limiter: bool = False, **downloader_options: object) -> None:  # fmt: skip
    """Start the archive and a session, build a Downloader on a fake clock, and run `scenario`."""

    async def main() -> None:
        clock = FakeClock()
        fetch_settings = fetch or settings()
        async with TinyArchive() as archive, open_session(fetch_settings) as session:
            throttle = AdaptiveLimiter(4, clock=clock) if limiter else None
            downloader = Downloader(
                session, fetch_settings, VerifySettings(level=level), clock=clock, throttle=throttle,
                **downloader_options,  # type: ignore[arg-type]
            )  # fmt: skip
            await scenario(archive, downloader, clock)

    asyncio.run(main())


# -- the tests ---------------------------------------------------------------------------------------
def test_clean_download_verifies_and_lands_at_dest(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.files["a_lc.fits"] = FITS_BYTES
        dest = tmp_path / "s0001" / "a_lc.fits"
        result = await downloader.fetch(item_for(archive, "a_lc.fits", FITS_BYTES), dest, "s0001/a_lc.fits")
        assert result.status is FileStatus.VERIFIED, result.error
        assert dest.read_bytes() == FITS_BYTES
        assert not dest.with_name("a_lc.fits.part").exists()
        assert (result.nbytes, result.md5, result.attempts) == (len(FITS_BYTES), FITS_MD5, 1)
        assert result.level is VerifyLevel.FITS and result.checksum_declared
        assert result.path == "s0001/a_lc.fits"

    run(scenario)


def test_reset_mid_body_resumes_with_range_and_if_range(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.files["r_lc.fits"] = FITS_BYTES
        archive.script["r_lc.fits"] = [Behaviour(reset_after=20_000)]
        dest = tmp_path / "r_lc.fits"
        result = await downloader.fetch(item_for(archive, "r_lc.fits", FITS_BYTES), dest, "r_lc.fits")
        assert result.status is FileStatus.VERIFIED, result.error
        assert dest.read_bytes() == FITS_BYTES
        first, second = archive.requests_for("r_lc.fits")
        assert "Range" not in first.headers
        resumed_at = int(second.headers["Range"].removeprefix("bytes=").rstrip("-"))
        assert 0 < resumed_at <= 20_000
        assert second.headers["If-Range"] == '"' + FITS_MD5 + '"'
        assert result.attempts == 2 and result.md5 == FITS_MD5

    run(scenario)


def test_server_ignoring_range_restarts_from_zero(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.files["i_lc.fits"] = FITS_BYTES
        archive.script["i_lc.fits"] = [Behaviour(reset_after=30_000), Behaviour(ignore_range=True)]
        dest = tmp_path / "i_lc.fits"
        result = await downloader.fetch(item_for(archive, "i_lc.fits", FITS_BYTES), dest, "i_lc.fits")
        assert result.status is FileStatus.VERIFIED, result.error
        assert dest.read_bytes() == FITS_BYTES
        assert "Range" in archive.requests_for("i_lc.fits")[1].headers

    run(scenario)


def test_503_with_retry_after_waits_at_least_that_long(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.files["b_lc.fits"] = FITS_BYTES
        archive.script["b_lc.fits"] = [Behaviour(status=503, headers={"Retry-After": "7"})]
        result = await downloader.fetch(item_for(archive, "b_lc.fits", FITS_BYTES), tmp_path / "b", "b")
        assert result.status is FileStatus.VERIFIED, result.error
        assert result.attempts == 2
        assert max(clock.sleeps) >= 7.0

    run(scenario, limiter=True)


def test_429_with_http_date_retry_after_is_honoured(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.files["d_lc.fits"] = FITS_BYTES
        # The fake clock's Unix time is 1_700_001_000; ask for 12 s later as an HTTP-date.
        when = "Tue, 14 Nov 2023 22:30:12 GMT"  # == 1_700_001_012
        archive.script["d_lc.fits"] = [Behaviour(status=429, headers={"Retry-After": when})]
        result = await downloader.fetch(item_for(archive, "d_lc.fits", FITS_BYTES), tmp_path / "d", "d")
        assert result.status is FileStatus.VERIFIED, result.error
        assert max(clock.sleeps) >= 12.0

    run(scenario)


def test_404_fails_at_once_with_the_reason(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.script["gone_lc.fits"] = [Behaviour(status=404)]
        dest = tmp_path / "gone_lc.fits"
        result = await downloader.fetch(item_for(archive, "gone_lc.fits", FITS_BYTES), dest, "gone_lc.fits")
        assert result.status is FileStatus.FAILED
        assert result.error == "HTTP 404 Not Found"
        assert len(archive.requests_for("gone_lc.fits")) == 1 and result.attempts == 1
        assert not dest.exists() and not dest.with_name("gone_lc.fits.part").exists()

    run(scenario)


def test_wrong_md5_fails_after_every_retry_and_leaves_nothing(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.files["m_lc.fits"] = FITS_BYTES
        item = item_for(archive, "m_lc.fits", FITS_BYTES, md5="0" * 32)
        dest = tmp_path / "m_lc.fits"
        result = await downloader.fetch(item, dest, "m_lc.fits")
        assert result.status is FileStatus.FAILED
        assert "does not match the archive's " + "0" * 32 in result.error
        assert len(archive.requests_for("m_lc.fits")) == 3 + 1 == result.attempts
        assert not dest.exists() and not dest.with_name("m_lc.fits.part").exists()

    run(scenario)


def test_html_error_page_with_200_is_refused_on_its_first_bytes(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        page = b"<!DOCTYPE html><html><body>Service unavailable</body></html>" + b" " * 200_000
        # The page stalls after its first bytes: only an early refusal avoids the idle timeout.
        archive.script["h_lc.fits"] = [Behaviour(body=page, stall_after=8192, stall_seconds=30)]
        item = item_for(archive, "h_lc.fits", FITS_BYTES, declare=False)
        result = await downloader.fetch(item, tmp_path / "h", "h")
        assert result.status is FileStatus.FAILED
        assert "web page" in result.error
        assert result.attempts == 1

    run(scenario, fetch=settings(retries=0))


def test_body_past_the_declared_size_is_cut_and_refused(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        huge = FITS_BYTES + b"\0" * 20_000_000
        # No Content-Length: only the declared size can stop it; the stall proves we stopped early.
        archive.script["x_lc.fits"] = [Behaviour(body=huge, announce=-1, stall_after=len(FITS_BYTES) + 65536,
                                                 stall_seconds=30)]  # fmt: skip
        dest = tmp_path / "x_lc.fits"
        result = await downloader.fetch(item_for(archive, "x_lc.fits", FITS_BYTES), dest, "x_lc.fits")
        assert result.status is FileStatus.FAILED
        assert f"runs past {len(FITS_BYTES)} bytes" in result.error
        assert not dest.exists() and not dest.with_name("x_lc.fits.part").exists()

    run(scenario, fetch=settings(retries=0))


def test_content_length_contradicting_the_archive_is_refused_before_reading(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.files["c_lc.fits"] = FITS_BYTES + b"\0" * 2880
        item = item_for(archive, "c_lc.fits", FITS_BYTES)
        result = await downloader.fetch(item, tmp_path / "c", "c")
        assert result.status is FileStatus.FAILED
        assert (
            f"announces {len(FITS_BYTES) + 2880} bytes but the archive declares {len(FITS_BYTES)}"
            in result.error
        )

    run(scenario, fetch=settings(retries=0))


def test_truncated_fits_is_refused_at_fits_level(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        truncated = FITS_BYTES[:5000]
        archive.files["t_lc.fits"] = truncated
        item = item_for(archive, "t_lc.fits", truncated, declare=False)
        result = await downloader.fetch(item, tmp_path / "t_lc.fits", "t_lc.fits")
        assert result.status is FileStatus.FAILED
        assert "not a whole number of 2880-byte FITS blocks" in result.error

    run(scenario, fetch=settings(retries=0))


def test_corrupt_hdu_checksum_fails_at_fits_level(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.files["k_lc.fits"] = corrupt_data(FITS_BYTES)
        item = item_for(archive, "k_lc.fits", FITS_BYTES, declare=False)
        result = await downloader.fetch(item, tmp_path / "k_lc.fits", "k_lc.fits")
        assert result.status is FileStatus.FAILED
        assert "HDU 1 (LIGHTCURVE) fails its CHECKSUM" in result.error

    run(scenario, fetch=settings(retries=0))


def test_corrupt_hdu_checksum_passes_at_checksum_level_without_declared_md5(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        corrupted = corrupt_data(FITS_BYTES)
        archive.files["k_lc.fits"] = corrupted
        item = item_for(archive, "k_lc.fits", FITS_BYTES, declare=False)
        result = await downloader.fetch(item, tmp_path / "k_lc.fits", "k_lc.fits")
        assert result.status is FileStatus.VERIFIED, result.error
        assert result.level is VerifyLevel.CHECKSUM
        assert result.checksum_declared is False
        assert result.md5 == hashlib.md5(corrupted).hexdigest()

    run(scenario, level=VerifyLevel.CHECKSUM)


def test_idle_timeout_fires_on_a_stall_and_the_retry_succeeds(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.files["s_lc.fits"] = FITS_BYTES
        archive.script["s_lc.fits"] = [Behaviour(stall_after=16384, stall_seconds=5)]
        dest = tmp_path / "s_lc.fits"
        result = await downloader.fetch(item_for(archive, "s_lc.fits", FITS_BYTES), dest, "s_lc.fits")
        assert result.status is FileStatus.VERIFIED, result.error
        assert result.attempts == 2
        assert dest.read_bytes() == FITS_BYTES

    run(scenario, fetch=settings(idle_timeout=0.5))


def test_idle_timeout_reason_is_recorded_when_tries_run_out(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.files["z_lc.fits"] = FITS_BYTES
        archive.script["z_lc.fits"] = [Behaviour(stall_after=0, stall_seconds=5)]
        result = await downloader.fetch(item_for(archive, "z_lc.fits", FITS_BYTES), tmp_path / "z", "z")
        assert result.status is FileStatus.FAILED
        assert result.error.startswith("no data for 0.3 s")

    run(scenario, fetch=settings(idle_timeout=0.3, retries=0))


def test_redirect_to_ftp_is_refused_without_retry(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.redirects["f_lc.fits"] = "ftp://127.0.0.1/f_lc.fits"
        result = await downloader.fetch(item_for(archive, "f_lc.fits", FITS_BYTES), tmp_path / "f", "f")
        assert result.status is FileStatus.FAILED
        assert "only http and https are followed" in result.error
        assert len(archive.requests_for("f_lc.fits")) == 1

    run(scenario)


def test_https_to_http_redirect_is_a_downgrade() -> None:
    with pytest.raises(UnsafeRedirectError, match="downgrade"):
        _redirect_target(URL("https://mast.stsci.edu/a"), "http://mast.stsci.edu/b")
    assert _redirect_target(URL("http://a.example.org/x/y"), "/z") == URL("http://a.example.org/z")
    assert _redirect_target(URL("http://a.example.org/x"), "https://b.example.org/x").scheme == "https"


def test_redirects_are_followed_and_the_token_stays_on_the_archive_host(tmp_path: Path) -> None:
    async def main() -> None:
        async with TinyArchive() as archive:
            archive.files["real_lc.fits"] = FITS_BYTES
            # Same server, but "localhost" is another host name than the archive's 127.0.0.1.
            archive.redirects["alias_lc.fits"] = archive.url("real_lc.fits", host="localhost")
            fetch = settings()
            async with open_session(fetch, token="sekrit-token-123", token_hosts=["127.0.0.1"]) as session:
                downloader = Downloader(session, fetch, VerifySettings(), clock=FakeClock())
                item = item_for(archive, "alias_lc.fits", FITS_BYTES)
                result = await downloader.fetch(item, tmp_path / "alias_lc.fits", "alias_lc.fits")
            assert result.status is FileStatus.VERIFIED, result.error
            (first,) = archive.requests_for("alias_lc.fits")
            (second,) = archive.requests_for("real_lc.fits")
            assert first.headers["Authorization"] == "token sekrit-token-123"
            assert "Authorization" not in second.headers
            assert first.headers["User-Agent"].startswith("tessmirror/")

    asyncio.run(main())


def test_too_many_redirects_fail(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.redirects["loop_lc.fits"] = archive.url("loop_lc.fits")
        result = await downloader.fetch(item_for(archive, "loop_lc.fits", FITS_BYTES), tmp_path / "l", "l")
        assert result.status is FileStatus.FAILED
        assert "more than 2 redirects" in result.error
        assert len(archive.requests_for("loop_lc.fits")) == 3

    run(scenario, fetch=settings(max_redirects=2))


class FullDisk(PartFile):
    def write(self, data: bytes | memoryview) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


class ReadOnly(PartFile):
    def open(self) -> None:
        raise OSError(errno.EROFS, "Read-only file system")


def test_disk_full_stops_the_run_with_the_path(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.files["n_lc.fits"] = FITS_BYTES
        dest = tmp_path / "n_lc.fits"
        with pytest.raises(
            DiskFullError, match=r"no space left on the device to write .*n_lc\.fits\.part"
        ) as info:
            await downloader.fetch(item_for(archive, "n_lc.fits", FITS_BYTES), dest, "n_lc.fits")
        assert info.value.path == dest.with_name("n_lc.fits.part")
        assert not dest.exists()

    run(scenario, part_file=FullDisk)


def test_read_only_output_is_a_permission_error(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.files["o_lc.fits"] = FITS_BYTES
        with pytest.raises(PermissionDeniedError, match=r"o_lc\.fits\.part"):
            await downloader.fetch(item_for(archive, "o_lc.fits", FITS_BYTES), tmp_path / "o_lc.fits", "o")
        assert not (tmp_path / "o_lc.fits").exists()

    run(scenario, part_file=ReadOnly)


def test_a_resumable_file_opens_its_part_before_any_request(tmp_path: Path) -> None:
    """A file large enough to be resumed from an earlier run opens its part (where a kept part and its
    validator are found) before the request; a small one opens it with its first block instead."""
    big = FITS_BYTES * (RESUME_MIN_BYTES // len(FITS_BYTES) + 1)

    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.files["p_lc.fits"] = big
        with pytest.raises(PermissionDeniedError, match=r"p_lc\.fits\.part"):
            await downloader.fetch(item_for(archive, "p_lc.fits", big), tmp_path / "p_lc.fits", "p")
        assert archive.seen == []

    run(scenario, part_file=ReadOnly, level=VerifyLevel.CHECKSUM)


def test_cancellation_propagates_and_leaves_nothing_at_dest(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.files["q_lc.fits"] = FITS_BYTES
        archive.script["q_lc.fits"] = [Behaviour(stall_after=16384, stall_seconds=30)]
        dest = tmp_path / "q_lc.fits"
        task = asyncio.create_task(downloader.fetch(item_for(archive, "q_lc.fits", FITS_BYTES), dest, "q"))
        while not archive.seen:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not dest.exists()

    run(scenario)


def test_size_level_skips_md5_and_fits_checks(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        corrupted = corrupt_data(FITS_BYTES)
        archive.files["v_lc.fits"] = corrupted
        item = item_for(archive, "v_lc.fits", FITS_BYTES)  # declares the *good* md5
        result = await downloader.fetch(item, tmp_path / "v_lc.fits", "v_lc.fits")
        assert result.status is FileStatus.VERIFIED, result.error
        assert result.md5 == "" and not result.checksum_declared

    run(scenario, level=VerifyLevel.SIZE)


def test_bandwidth_cap_is_consumed_per_chunk(tmp_path: Path) -> None:
    from engine.fetch.bandwidth import TokenBucket

    async def main() -> None:
        clock = FakeClock()
        bucket = TokenBucket(10_000, burst=5_000, clock=clock)
        fetch = settings()
        async with TinyArchive() as archive, open_session(fetch) as session:
            archive.files["w_lc.fits"] = FITS_BYTES
            downloader = Downloader(session, fetch, VerifySettings(), clock=clock, bandwidth=bucket)
            result = await downloader.fetch(item_for(archive, "w_lc.fits", FITS_BYTES), tmp_path / "w", "w")
        assert result.status is FileStatus.VERIFIED, result.error
        # The burst goes at once, the rest at 10 kB/s of (fake) time.
        assert sum(clock.sleeps) == pytest.approx((len(FITS_BYTES) - 5_000) / 10_000, rel=1e-6)

    asyncio.run(main())


def test_client_error_descriptions_are_one_bounded_line() -> None:
    from engine.fetch.download import _describe

    raw = "400, message='Bad status line:\\n  Expected HTTP/:\\n\\n  b\\'SIMPLE  =   T / conforms\\''"
    assert _describe(ValueError(raw)) == "400, Bad status line"
    assert _describe(ValueError("first\nsecond")) == "first"
    assert len(_describe(ValueError("x" * 1000))) == 160
    assert _describe(ValueError("")) == "ValueError"


# -- size caps ----------------------------------------------------------------------------------------
class CountingPart(PartFile):
    """Records the most bytes the .part ever held (checked after every write)."""

    largest = 0

    def write(self, data: bytes | memoryview) -> None:
        super().write(data)
        CountingPart.largest = max(CountingPart.largest, os.fstat(self._fd).st_size)


def test_content_length_above_the_estimate_ceiling_is_refused_before_any_body_byte(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        CountingPart.largest = 0
        # A 53 kB estimate, a server announcing 30 MB. The server sends its headers and then waits:
        # a client that read any body first would hit the idle timeout instead of this refusal.
        archive.script["e_lc.fits"] = [
            Behaviour(
                body=FITS_BYTES + b"\0" * (31_457_280 - len(FITS_BYTES)), stall_after=0, stall_seconds=30
            )
        ]
        item = item_for(archive, "e_lc.fits", FITS_BYTES, declare=False, est_kb=53)
        dest = tmp_path / "e_lc.fits"
        result = await downloader.fetch(item, dest, "e_lc.fits")
        assert result.status is FileStatus.FAILED
        assert (
            "announces 31457280 bytes, more than the" in result.error and "estimate of 53 kB" in result.error
        )
        assert CountingPart.largest == 0
        assert not dest.exists() and not dest.with_name("e_lc.fits.part").exists()

    run(scenario, fetch=settings(retries=0), part_file=CountingPart)


def test_a_row_without_any_size_stops_at_max_file_size_on_a_chunked_body(tmp_path: Path) -> None:
    cap = 3 * 65536

    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        CountingPart.largest = 0
        huge = FITS_BYTES + b"\0" * 20_000_000
        archive.script["u_lc.fits"] = [
            Behaviour(body=huge, announce=-1, stall_after=cap + 65536, stall_seconds=30)
        ]
        item = PlanItem(url=archive.url("u_lc.fits"), filename="u_lc.fits")  # a URL-list row: no size
        dest = tmp_path / "u_lc.fits"
        result = await downloader.fetch(item, dest, "u_lc.fits")
        assert result.status is FileStatus.FAILED
        assert f"runs past {cap} bytes, the most fetch.max_file_size allows" in result.error
        assert 0 < CountingPart.largest <= cap
        assert not dest.exists() and not dest.with_name("u_lc.fits.part").exists()

    run(scenario, fetch=settings(retries=0, max_file_size=cap), part_file=CountingPart)


def test_a_row_without_any_size_is_refused_when_content_length_exceeds_max_file_size(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.files["m_lc.fits"] = FITS_BYTES
        result = await downloader.fetch(PlanItem(url=archive.url("m_lc.fits"), filename="m_lc.fits"),
                                        tmp_path / "m_lc.fits", "m_lc.fits")  # fmt: skip
        assert result.status is FileStatus.FAILED
        assert "fetch.max_file_size" in result.error

    run(scenario, fetch=settings(retries=0, max_file_size=100_000))


def test_a_body_off_its_estimate_but_within_the_ceiling_is_kept_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        for name in ("f1_lc.fits", "f2_lc.fits"):
            archive.files[name] = FITS_BYTES
            # An estimate of 1 kB for a ~150 kB file: far off, but under the 1 MiB-and-more ceiling.
            item = item_for(archive, name, FITS_BYTES, declare=False, est_kb=1, md5=FITS_MD5)
            result = await downloader.fetch(item, tmp_path / name, name)
            assert result.status is FileStatus.VERIFIED, result.error
            assert (tmp_path / name).read_bytes() == FITS_BYTES

    with caplog.at_level("DEBUG", logger="engine.fetch.download"):
        run(scenario)
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "estimate" in r.getMessage()]
    assert len(warnings) == 1 and "f1_lc.fits" in warnings[0].getMessage()
    assert any("f2_lc.fits" in r.getMessage() for r in caplog.records if r.levelname == "DEBUG")


# -- a hostile output folder ---------------------------------------------------------------------------
def test_a_planted_part_symlink_is_not_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    out = tmp_path / "out"
    (out / "s0001").mkdir(parents=True)
    (out / "s0001" / "p_lc.fits.part").symlink_to(victim)

    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.files["p_lc.fits"] = FITS_BYTES
        dest = out / "s0001" / "p_lc.fits"
        result = await downloader.fetch(item_for(archive, "p_lc.fits", FITS_BYTES), dest, "s0001/p_lc.fits")
        assert result.status is FileStatus.VERIFIED, result.error
        assert not dest.is_symlink() and dest.read_bytes() == FITS_BYTES

    run(scenario)
    assert victim.read_bytes() == b"precious"


def test_a_folder_symlinked_outside_is_a_one_line_failure_and_nothing_lands_there(tmp_path: Path) -> None:
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "s0001").symlink_to(sentinel)

    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.files["y_lc.fits"] = FITS_BYTES
        dest = out / "s0001" / "y_lc.fits"
        result = await downloader.fetch(item_for(archive, "y_lc.fits", FITS_BYTES), dest, "s0001/y_lc.fits")
        assert result.status is FileStatus.FAILED
        assert "it is a symlink" in result.error and "\n" not in result.error
        assert "never writes through a symlink" in result.error  # the hint: what to fix
        # A small file opens its part with its first block, so its one request has been made.
        assert len(archive.seen) <= 1

    run(scenario)
    assert list(sentinel.iterdir()) == []


def test_a_folder_symlinked_outside_fails_a_resumable_file_before_any_request(tmp_path: Path) -> None:
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "s0001").symlink_to(sentinel)

    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.files["z_lc.fits"] = BIG_BYTES
        dest = out / "s0001" / "z_lc.fits"
        result = await downloader.fetch(item_for(archive, "z_lc.fits", BIG_BYTES), dest, "s0001/z_lc.fits")
        assert result.status is FileStatus.FAILED
        assert "it is a symlink" in result.error and "\n" not in result.error
        assert archive.seen == []

    run(scenario)
    assert list(sentinel.iterdir()) == []


def test_two_downloads_to_one_destination_never_interleave(tmp_path: Path) -> None:
    """A resumable file holds its locked part from before its request: a second writer is refused."""

    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.files["d_lc.fits"] = BIG_BYTES
        archive.script["d_lc.fits"] = [Behaviour(stall_after=16384, stall_seconds=2)]
        dest = tmp_path / "s0001" / "d_lc.fits"
        item = item_for(archive, "d_lc.fits", BIG_BYTES)
        first = asyncio.create_task(downloader.fetch(item, dest, "s0001/d_lc.fits"))
        while not archive.seen:  # the first download holds its .part
            await asyncio.sleep(0.01)
        second = await downloader.fetch(item, dest, "s0001/d_lc.fits")
        assert second.status is FileStatus.FAILED
        assert "another download is writing this file" in second.error
        result = await first
        assert result.status is FileStatus.VERIFIED, result.error
        assert dest.read_bytes() == BIG_BYTES

    run(scenario)


def test_two_downloads_of_a_small_file_to_one_destination_leave_it_whole(tmp_path: Path) -> None:
    """A small file takes its part's lock only in the one thread hop that writes, checks and renames
    it, so two writers take turns: each renames a whole, verified copy, never a mix."""

    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.files["e_lc.fits"] = FITS_BYTES
        archive.script["e_lc.fits"] = [Behaviour(stall_after=4096, stall_seconds=1)]
        dest = tmp_path / "s0001" / "e_lc.fits"
        item = item_for(archive, "e_lc.fits", FITS_BYTES)
        results = await asyncio.gather(*(downloader.fetch(item, dest, "s0001/e_lc.fits") for _ in range(2)))
        for result in results:
            assert result.status in (FileStatus.VERIFIED, FileStatus.FAILED)
            if result.status is FileStatus.FAILED:
                assert "another download is writing this file" in result.error
        assert FileStatus.VERIFIED in {result.status for result in results}
        assert dest.read_bytes() == FITS_BYTES
        assert not dest.with_name("e_lc.fits.part").exists()

    run(scenario)


# -- parts left by an earlier run -----------------------------------------------------------------
BIG_BYTES = make_fits(rows=120_000, seed=5)  # above RESUME_MIN_BYTES: worth resuming across runs
BIG_MD5 = hashlib.md5(BIG_BYTES).hexdigest()


async def _kill_mid_body(archive: TinyArchive, name: str, dest: Path, fetch: FetchSettings) -> int:
    """Start a download that stalls mid-body, cancel it once bytes are on disk (as a killed run
    leaves them), and return the part's size."""
    archive.script[name] = [Behaviour(stall_after=700_000, stall_seconds=60)]
    part = dest.with_name(dest.name + ".part")
    async with open_session(fetch) as session:
        downloader = Downloader(session, fetch, VerifySettings(), fsync=False)
        task = asyncio.create_task(downloader.fetch(item_for(archive, name, BIG_BYTES), dest, name))
        for _ in range(3000):  # up to 30 s for the first bytes to reach the part
            if part.exists() and part.stat().st_size >= 512 * 1024:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        downloader.close()
    return part.stat().st_size


def test_a_part_from_a_killed_run_is_resumed_with_range_and_if_range(tmp_path: Path) -> None:
    async def main() -> None:
        fetch = settings()
        async with TinyArchive() as archive:
            archive.files["big_tp.fits"] = BIG_BYTES
            dest = tmp_path / "big_tp.fits"
            kept = await _kill_mid_body(archive, "big_tp.fits", dest, fetch)
            assert 0 < kept < len(BIG_BYTES) and (tmp_path / "big_tp.fits.meta.part").exists()
            async with open_session(fetch) as session:  # a new run: new session, new Downloader
                downloader = Downloader(session, fetch, VerifySettings(), fsync=False)
                result = await downloader.fetch(
                    item_for(archive, "big_tp.fits", BIG_BYTES), dest, "big_tp.fits"
                )
                downloader.close()
            assert result.status is FileStatus.VERIFIED, result.error
            assert result.md5 == BIG_MD5  # the md5 covers the kept bytes too (re-hashed)
            assert dest.read_bytes() == BIG_BYTES
            resumed = archive.requests_for("big_tp.fits")[-1]
            assert resumed.headers["Range"] == f"bytes={kept}-"
            assert resumed.headers["If-Range"] == f'"{BIG_MD5}"'
            assert sorted(p.name for p in tmp_path.iterdir()) == ["big_tp.fits"]  # no part, no sidecar

    asyncio.run(main())


def test_a_200_to_the_resume_of_a_killed_runs_part_restarts_from_zero(tmp_path: Path) -> None:
    async def main() -> None:
        fetch = settings()
        async with TinyArchive() as archive:
            archive.files["big_tp.fits"] = BIG_BYTES
            dest = tmp_path / "big_tp.fits"
            await _kill_mid_body(archive, "big_tp.fits", dest, fetch)
            archive.script["big_tp.fits"] = [Behaviour(ignore_range=True)]  # the whole file, 200
            async with open_session(fetch) as session:
                downloader = Downloader(session, fetch, VerifySettings(), fsync=False)
                result = await downloader.fetch(
                    item_for(archive, "big_tp.fits", BIG_BYTES), dest, "big_tp.fits"
                )
                downloader.close()
            assert result.status is FileStatus.VERIFIED, result.error
            assert result.attempts == 1 and dest.read_bytes() == BIG_BYTES
            assert "Range" in archive.requests_for("big_tp.fits")[-1].headers

    asyncio.run(main())


def test_a_part_without_a_declared_md5_is_restarted_not_resumed(tmp_path: Path) -> None:
    async def main() -> None:
        fetch = settings()
        async with TinyArchive() as archive:
            archive.files["big_tp.fits"] = BIG_BYTES
            dest = tmp_path / "big_tp.fits"
            dest.with_name("big_tp.fits.part").write_bytes(BIG_BYTES[:300_000])
            dest.with_name("big_tp.fits.meta.part").write_text(f'{{"validator": "\\"{BIG_MD5}\\""}}')
            async with open_session(fetch) as session:
                downloader = Downloader(session, fetch, VerifySettings(level=VerifyLevel.SIZE), fsync=False)
                item = item_for(
                    archive, "big_tp.fits", BIG_BYTES, declare=False, est_kb=len(BIG_BYTES) // 1024
                )
                result = await downloader.fetch(item, dest, "big_tp.fits")
                downloader.close()
            assert result.status is FileStatus.VERIFIED, result.error
            assert "Range" not in archive.requests_for("big_tp.fits")[-1].headers
            assert dest.read_bytes() == BIG_BYTES

    asyncio.run(main())


def test_a_small_file_stores_no_validator_beside_its_part(tmp_path: Path) -> None:
    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        archive.files["s_lc.fits"] = FITS_BYTES
        archive.script["s_lc.fits"] = [Behaviour(reset_after=20_000)]
        result = await downloader.fetch(
            item_for(archive, "s_lc.fits", FITS_BYTES), tmp_path / "s_lc.fits", "s"
        )
        assert result.status is FileStatus.VERIFIED, result.error
        assert sorted(p.name for p in tmp_path.iterdir()) == ["s_lc.fits"]

    run(scenario)
