"""The S3 source through the Downloader: anonymous GETs, the ETag check, fallback to MAST once,
SlowDown through the limiter, the source registry, and path_lookup's verdicts."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from astropy.io import fits

from engine.exceptions import ConfigError
from engine.fetch.download import Downloader
from engine.fetch.http import Attempt, HttpSource, Reply, Route, Source
from engine.fetch.s3 import S3Source, check_cloud_paths, key_for_name, lookup_url_for, settle_source
from engine.fetch.session import open_session
from engine.fetch.sources import build_sources
from engine.fetch.throttle import AdaptiveLimiter
from engine.models import FileStatus, PlanItem
from engine.settings import FetchSettings, VerifySettings

NAMES = [f"tess2018206045859-s0001-{tic:016d}-0120-s_lc.fits" for tic in (25155310, 25155311, 25155312)]
HLSP = "hlsp_qlp_tess_ffi_s0001-0000000025155310_tess_v01_llc.fits"
TOKEN = "s3cr3t-token-value"


def make_fits(seed: int, rows: int = 2000) -> bytes:
    rng = np.random.default_rng(seed)
    table = fits.BinTableHDU.from_columns(
        [fits.Column(name="FLUX", format="E", array=rng.normal(1000, 5, rows))], name="LIGHTCURVE"
    )
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(buffer, checksum=True)
    return buffer.getvalue()


@dataclass
class Hit:
    route: str  # "s3" or "mast"
    name: str
    headers: dict[str, str]


@dataclass
class Bucket:
    """One port, two routes as on the local archive: /stpubdata/<key> (S3) and MAST's Download API."""

    files: dict[str, bytes] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)  # names the bucket does not hold
    error: str = "NoSuchKey"  # what a missing key answers
    etags: dict[str, str] = field(default_factory=dict)  # overrides of the md5 ETag
    slowdowns: int = 0  # answer this many S3 GETs with 503 SlowDown first
    mast_failures: int = 0  # answer this many MAST GETs with 500 first
    lookup_answer: str = ""  # path_lookup's path for every URI ("" for the computed key)
    hits: list[Hit] = field(default_factory=list)
    port: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def item(self, name: str, *, md5: bool = True) -> PlanItem:
        data = self.files[name]
        return PlanItem(
            url=f"{self.base}/api/v0.1/Download/file?uri=mast:TESS/product/{name}",
            filename=name,
            product="lc",
            sector=1,
            size=len(data),
            md5=hashlib.md5(data).hexdigest() if md5 else "",
        )

    def hits_on(self, route: str, name: str | None = None) -> list[Hit]:
        return [h for h in self.hits if h.route == route and (name is None or h.name == name)]

    async def s3(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["key"].rsplit("/", 1)[-1]
        self.hits.append(Hit("s3", name, dict(request.headers)))
        if self.slowdowns:
            self.slowdowns -= 1
            return web.Response(status=503, text="<Error><Code>SlowDown</Code></Error>")
        if name in self.missing or name not in self.files or key_for_name(name) != request.match_info["key"]:
            status = 403 if self.error == "AccessDenied" else 404
            return web.Response(status=status, text=f"<Error><Code>{self.error}</Code></Error>")
        data = self.files[name]
        etag = self.etags.get(name, hashlib.md5(data).hexdigest())
        return web.Response(body=data, headers={"ETag": f'"{etag}"'})

    async def mast(self, request: web.Request) -> web.StreamResponse:
        name = request.query.get("uri", "").rsplit("/", 1)[-1]
        self.hits.append(Hit("mast", name, dict(request.headers)))
        if self.mast_failures:
            self.mast_failures -= 1
            return web.Response(status=500, text="busy")
        return web.Response(body=self.files[name], headers={"ETag": '"mast-1"'})

    async def lookup(self, request: web.Request) -> web.Response:
        answer = {}
        for uri in request.query.getall("uri", []):
            name = uri.rsplit("/", 1)[-1]
            path = self.lookup_answer or f"/{key_for_name(name)}"
            answer[uri] = {"path": None if name in self.missing else path}
        return web.json_response(answer)


@contextlib.asynccontextmanager
async def serving(state: Bucket) -> AsyncIterator[Bucket]:
    app = web.Application()
    app.router.add_get("/stpubdata/{key:.*}", state.s3)
    app.router.add_get("/api/v0.1/Download/file", state.mast)
    app.router.add_get("/api/v0.1/path_lookup/", state.lookup)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield state
    finally:
        await runner.cleanup()


@pytest.fixture
def bucket() -> Bucket:
    """The bucket's state; `run` serves it for the duration of one scenario."""
    return Bucket(files={name: make_fits(i) for i, name in enumerate([*NAMES, HLSP])})


def run(state: Bucket, scenario: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        async with serving(state):
            await scenario()

    asyncio.run(main())


def settings(bucket: Bucket, source: str = "s3", **overrides: object) -> FetchSettings:
    values: dict[str, object] = dict(retries=3, backoff_initial=0.01, backoff_max=0.02, idle_timeout=10)
    values.update(overrides)
    return FetchSettings(source=source, s3_endpoint=bucket.base, **values)  # type: ignore[arg-type]


async def fetch_all(
    bucket: Bucket, tmp_path: Path, items: list[PlanItem], fetch: FetchSettings, **kwargs: object
) -> list:
    async with open_session(fetch, token=TOKEN, token_hosts=["127.0.0.1"]) as session:
        downloader = Downloader(session, fetch, VerifySettings(), fsync=False, **kwargs)  # type: ignore[arg-type]
        try:
            return [await downloader.fetch(i, tmp_path / i.filename, i.filename) for i in items]
        finally:
            downloader.close()


def test_source_s3_fetches_every_file_from_the_bucket_and_none_from_mast(
    bucket: Bucket, tmp_path: Path
) -> None:
    async def scenario() -> None:
        items = [bucket.item(name) for name in NAMES]
        results = await fetch_all(bucket, tmp_path, items, settings(bucket))
        assert [r.status for r in results] == [FileStatus.VERIFIED] * 3
        assert all((tmp_path / n).read_bytes() == bucket.files[n] for n in NAMES)
        assert len(bucket.hits_on("s3")) == 3 and bucket.hits_on("mast") == []

    run(bucket, scenario)


def test_the_mast_token_reaches_mast_but_never_the_bucket_on_the_same_host(
    bucket: Bucket, tmp_path: Path
) -> None:
    async def scenario() -> None:
        bucket.missing.add(NAMES[0])  # one file comes from MAST, so both routes see a request
        items = [bucket.item(name) for name in NAMES]
        results = await fetch_all(bucket, tmp_path, items, settings(bucket))
        assert all(r.status is FileStatus.VERIFIED for r in results)
        assert bucket.hits_on("s3") and all("Authorization" not in h.headers for h in bucket.hits_on("s3"))
        assert [h.headers.get("Authorization") for h in bucket.hits_on("mast")] == [f"token {TOKEN}"]

    run(bucket, scenario)


@pytest.mark.parametrize("error", ["NoSuchKey", "AccessDenied"])
def test_a_key_missing_from_the_bucket_falls_back_to_mast_once(
    bucket: Bucket, tmp_path: Path, error: str
) -> None:
    async def scenario() -> None:
        bucket.missing.add(NAMES[1])
        bucket.error = error
        items = [bucket.item(name) for name in NAMES]
        fetch = settings(bucket)
        async with open_session(fetch) as session:
            downloader = Downloader(session, fetch, VerifySettings(), fsync=False)
            results = [await downloader.fetch(i, tmp_path / i.filename, i.filename) for i in items]
            downloader.close()
        assert all(r.status is FileStatus.VERIFIED for r in results)
        assert [h.name for h in bucket.hits_on("mast")] == [NAMES[1]]
        assert len(bucket.hits_on("s3", NAMES[1])) == 1
        assert isinstance(downloader.sources.chosen, S3Source) and downloader.sources.chosen.fallbacks == 1

    run(bucket, scenario)


def test_after_a_fallback_the_files_later_tries_go_to_mast_without_asking_the_bucket_again(
    bucket: Bucket, tmp_path: Path
) -> None:
    async def scenario() -> None:
        bucket.missing.add(NAMES[0])
        bucket.mast_failures = 2  # MAST's first two answers fail: the file needs three tries there
        results = await fetch_all(bucket, tmp_path, [bucket.item(NAMES[0])], settings(bucket))
        assert results[0].status is FileStatus.VERIFIED and results[0].attempts == 3
        assert len(bucket.hits_on("s3", NAMES[0])) == 1  # asked once, never again after its 404
        assert len(bucket.hits_on("mast", NAMES[0])) == 3

    run(bucket, scenario)


def test_an_hlsp_file_goes_to_mast_without_asking_the_bucket(bucket: Bucket, tmp_path: Path) -> None:
    async def scenario() -> None:
        results = await fetch_all(bucket, tmp_path, [bucket.item(HLSP)], settings(bucket))
        assert results[0].status is FileStatus.VERIFIED
        assert bucket.hits_on("s3") == [] and [h.name for h in bucket.hits_on("mast")] == [HLSP]

    run(bucket, scenario)


def test_source_mast_never_asks_the_bucket(bucket: Bucket, tmp_path: Path) -> None:
    async def scenario() -> None:
        results = await fetch_all(bucket, tmp_path, [bucket.item(NAMES[0])], settings(bucket, "mast"))
        assert results[0].status is FileStatus.VERIFIED
        assert bucket.hits_on("s3") == [] and len(bucket.hits_on("mast")) == 1

    run(bucket, scenario)


def test_an_md5_etag_that_contradicts_the_bytes_fails_the_file(bucket: Bucket, tmp_path: Path) -> None:
    async def scenario() -> None:
        bucket.etags[NAMES[0]] = "0" * 32
        item = bucket.item(NAMES[0], md5=False)  # no declared md5: the ETag is the only md5 check
        results = await fetch_all(bucket, tmp_path, [item], settings(bucket, retries=0))
        assert results[0].status is FileStatus.FAILED
        assert "ETag" in results[0].error and not (tmp_path / NAMES[0]).exists()

    run(bucket, scenario)


def test_a_multipart_etag_is_not_taken_for_an_md5(bucket: Bucket, tmp_path: Path) -> None:
    async def scenario() -> None:
        bucket.etags[NAMES[0]] = "0" * 32 + "-2"
        results = await fetch_all(bucket, tmp_path, [bucket.item(NAMES[0], md5=False)], settings(bucket))
        assert results[0].status is FileStatus.VERIFIED

    run(bucket, scenario)


def test_slowdown_goes_through_the_overload_policy_and_the_file_still_arrives(
    bucket: Bucket, tmp_path: Path
) -> None:
    async def scenario() -> None:
        bucket.slowdowns = 1
        limiter = AdaptiveLimiter(8)
        results = await fetch_all(
            bucket, tmp_path, [bucket.item(NAMES[0])], settings(bucket), throttle=limiter
        )
        assert results[0].status is FileStatus.VERIFIED
        assert limiter.overload_events == 1 and limiter.limit == 4
        assert bucket.hits_on("mast") == []  # a SlowDown is not a reason to leave the bucket

    run(bucket, scenario)


def test_the_registry_picks_a_source_per_choice_and_per_scheme() -> None:
    mast = build_sources(FetchSettings(source="mast"))
    assert isinstance(mast.chosen, HttpSource)
    cloud = build_sources(FetchSettings(source="auto"))
    assert isinstance(cloud.chosen, S3Source)
    s3_item = PlanItem(url=f"s3://stpubdata/{key_for_name(NAMES[0])}", filename=NAMES[0])
    assert isinstance(mast.for_item(s3_item), S3Source)
    assert mast.for_item(PlanItem(url="ftp://example.org/x", filename="x")) is None
    unknown = FetchSettings()
    unknown.source = "gopher"  # past the settings' own check: the registry refuses it too
    with pytest.raises(ValueError, match=r"unknown fetch\.source"):
        build_sources(unknown)


def test_a_new_source_writes_only_serve_and_open_hands_it_the_whole_try() -> None:
    seen: list[Attempt] = []

    class Recorder(Source):
        name = "recorder"

        async def serve(self, attempt: Attempt) -> Reply:
            seen.append(attempt)
            attempt.route.source = self.name
            return Reply(response=None, total=7)  # type: ignore[arg-type]  # no body is read here

    session, item, route = object(), PlanItem(url="http://example.org/x.fits", filename="x.fits"), Route()
    headers = {"Range": "bytes=5-", "If-Range": '"v1"'}
    reply = asyncio.run(Recorder().open(session, item, headers, resumed_from=5, route=route))  # type: ignore[arg-type]
    assert reply.total == 7 and route.source == "recorder"
    assert [(a.session, a.item, a.headers, a.resumed_from, a.route) for a in seen] == [
        (session, item, headers, 5, route)
    ]
    with pytest.raises(TypeError, match="abstract"):
        Source()  # type: ignore[abstract]  # a source without serve cannot be built


def test_path_lookup_agreeing_with_the_computed_keys_passes(bucket: Bucket) -> None:
    async def scenario() -> None:
        items = [bucket.item(name) for name in NAMES]
        async with open_session(FetchSettings()) as session:
            verdict = await check_cloud_paths(session, items, lookup_url=lookup_url_for(items, bucket.base))
        assert verdict.available and verdict.checked == 3 and verdict.ok
        verdict.raise_for_mismatch()

    run(bucket, scenario)


def test_path_lookup_contradicting_a_key_refuses_s3_with_a_named_error(bucket: Bucket) -> None:
    async def scenario() -> None:
        async def wrong(request: web.Request) -> web.Response:
            return web.json_response(
                {u: {"path": "/tess/public/elsewhere/x"} for u in request.query.getall("uri")}
            )

        app = web.Application()
        app.router.add_get("/api/v0.1/path_lookup/", wrong)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with open_session(FetchSettings()) as session:
                verdict = await check_cloud_paths(
                    session,
                    [bucket.item(NAMES[0])],
                    lookup_url=f"http://127.0.0.1:{port}/api/v0.1/path_lookup/",
                )
        finally:
            await runner.cleanup()
        assert not verdict.ok and verdict.mismatches[0][0] == NAMES[0]
        with pytest.raises(ConfigError, match="refusing to use S3"):
            verdict.raise_for_mismatch()

    run(bucket, scenario)


def test_an_archive_without_path_lookup_is_said_once_and_the_computed_keys_are_used(
    bucket: Bucket, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with open_session(FetchSettings()) as session:
            verdict = await check_cloud_paths(
                session, [bucket.item(NAMES[0])], lookup_url=f"{bucket.base}/no/such/path_lookup/"
            )
        assert not verdict.available and verdict.ok
        assert sum("no path_lookup" in r.getMessage() for r in caplog.records) == 1

    run(bucket, scenario)


def test_path_lookup_checks_at_most_the_first_forty_items(bucket: Bucket) -> None:
    async def scenario() -> None:
        items = [bucket.item(NAMES[0])] * 100
        async with open_session(FetchSettings()) as session:
            verdict = await check_cloud_paths(session, items, lookup_url=lookup_url_for(items, bucket.base))
        assert verdict.checked == 40

    run(bucket, scenario)


def test_settle_source_keeps_s3_on_agreement_and_auto_falls_back_to_mast_on_a_mismatch(
    bucket: Bucket,
) -> None:
    async def scenario() -> None:
        items = [bucket.item(name) for name in NAMES]
        async with open_session(FetchSettings()) as session:
            assert await settle_source(session, "s3", items, fallback_base=bucket.base) == "s3"
            assert await settle_source(session, "auto", items, fallback_base=bucket.base) == "auto"
            assert await settle_source(session, "mast", items, fallback_base="http://127.0.0.1:1") == "mast"
            elsewhere = [PlanItem(url=f"{bucket.base}/files/x", filename=NAMES[0])]
            # An archive without path_lookup (404): the computed keys are used, the choice kept.
            assert await settle_source(session, "s3", elsewhere, fallback_base=f"{bucket.base}/x") == "s3"
        bucket.lookup_answer = "/tess/public/elsewhere/x"
        async with open_session(FetchSettings()) as session:
            assert await settle_source(session, "auto", items, fallback_base=bucket.base) == "mast"
            with pytest.raises(ConfigError, match="refusing to use S3"):
                await settle_source(session, "s3", items, fallback_base=bucket.base)

    run(bucket, scenario)


def test_an_s3_url_is_read_from_the_bucket_and_a_missing_one_fails_without_a_fallback(
    bucket: Bucket, tmp_path: Path
) -> None:
    async def scenario() -> None:
        present, absent = NAMES[0], NAMES[1]
        bucket.missing.add(absent)
        items = [
            PlanItem(url=f"s3://stpubdata/{key_for_name(name)}", filename=name, size=len(bucket.files[name]))
            for name in (present, absent)
        ]
        results = await fetch_all(bucket, tmp_path, items, settings(bucket, "mast"))
        assert [r.status for r in results] == [FileStatus.VERIFIED, FileStatus.FAILED]
        assert "404" in results[1].error and bucket.hits_on("mast") == []
        assert (tmp_path / present).read_bytes() == bucket.files[present]

    run(bucket, scenario)
