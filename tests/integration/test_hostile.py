"""Hostile or broken archive data, and tokens: each is refused or recorded as a failure, never trusted.

The local archive serves hostile names (`hostile_names=True`), redirects to other schemes, bodies
past their declared size and Content-Lengths that lie. A token given through the environment must
never appear in the logs, the manifest, the saved plan or an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

import pytest

from engine.archive import FaultPlan
from engine.archive.catalog import DOWNLOAD_PATH, HOSTILE_NAMES, HOSTILE_OBS_IDS
from engine.fetch.download import Downloader, PartFile
from engine.fetch.session import open_session
from engine.manifest import Manifest
from engine.models import FileStatus, PlanItem
from engine.settings import FetchSettings, VerifySettings
from tests.helpers import (
    assert_mirror_matches_truth,
    assert_verified_records_are_good,
    run_cli,
    spawn_cli,
    wait_until,
)

pytestmark = pytest.mark.integration

# The CCD where the archive puts its hostile entries (catalog.hostile_key: the notebook's CCD).
CCD = ("--sector", "1", "--camera", "1", "--ccd", "2")


def light_curves(archive, ccd: tuple[int, int, int] | None = None) -> set[str]:
    names = {n for n, f in archive.catalog.files.items() if f.product == "lc" and f.collection == "TESS"}
    if ccd is None:
        return names
    ident = archive.catalog.files
    return {n for n in names if (ident[n].identity.camera, ident[n].identity.ccd) == ccd[1:]}


def entries_by_name(out: Path) -> dict[str, object]:
    return {e.url.rsplit("/", 1)[-1]: e for e in Manifest(out / ".tessmirror").load().values()}


def run_ccd(arch, out: Path, *extra: object, env: dict[str, str] | None = None):
    return run_cli("run", "--tap-url", arch.tap_url, *CCD, "--out", out, "--retries", 2, *extra, env=env)


def test_hostile_names_are_refused_and_recorded(archive, tmp_path: Path) -> None:
    arch = archive(hostile_names=True)
    sandbox = tmp_path / "a" / "b"
    out = sandbox / "out"
    absolute_target = Path("/tmp/abs_lc.fits")
    existed = absolute_target.exists()

    result = run_ccd(arch, out)

    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    entries = Manifest(out / ".tessmirror").load().values()
    failed = [e for e in entries if e.status == "failed"]
    assert len(failed) == len(HOSTILE_NAMES) + len(HOSTILE_OBS_IDS)
    assert all("unsafe" in e.error for e in failed), [e.error for e in failed]
    refused = " ".join(e.error for e in failed)
    for name in (*HOSTILE_NAMES, *HOSTILE_OBS_IDS):
        assert repr(name)[:40] in refused, f"no recorded refusal for {name[:60]!r}"
    # Nothing was written outside --out: not beside it, not two levels up, not at the absolute path.
    outside = [
        p for p in tmp_path.rglob("*") if out not in (p, *p.parents) and p not in (out.parent, sandbox)
    ]
    assert not [p for p in outside if p.is_file()], outside
    assert absolute_target.exists() == existed
    assert not any(arch.request_log[i].name in HOSTILE_NAMES for i in range(len(arch.request_log)))
    # The ordinary files of that CCD are all there.
    verified = [e for e in entries if e.status == "verified"]
    assert verified and assert_verified_records_are_good(out, arch) == len(verified)


def test_redirect_to_another_scheme_is_refused_once(archive, tmp_path: Path) -> None:
    arch = archive()
    names = sorted(light_curves(arch, (1, 1, 2)))
    to_ftp, to_file = names[0], names[1]
    arch.faults = FaultPlan.from_spec(f"redirect=1:files={to_ftp}:to=ftp,redirect=1:files={to_file}:to=file")
    out = tmp_path / "out"

    result = run_ccd(arch, out)

    assert result.returncode == 1, result.stderr[-3000:]
    entries = entries_by_name(out)
    for name, scheme in ((to_ftp, "ftp://"), (to_file, "file://")):
        assert entries[name].status == "failed"
        assert "refusing a redirect" in entries[name].error and scheme in entries[name].error
        assert sum(r.name == name for r in arch.request_log) == 1, "an unsafe redirect is not retried"
    assert_mirror_matches_truth(out, arch, set(names) - {to_ftp, to_file})


def test_overlong_body_is_capped_at_the_declared_size(archive, tmp_path: Path) -> None:
    """A body with no Content-Length that runs past the declared size: refused as soon as it passes
    the size, and the .part never grows past the declared size (checked on every write)."""
    arch = archive(faults=FaultPlan.from_spec("overlong=1"))
    entry = arch.catalog.files[sorted(light_curves(arch, (1, 1, 2)))[0]]
    item = PlanItem(
        url=f"{arch.base_url}{DOWNLOAD_PATH}?uri={entry.uri}",
        filename=entry.name,
        size=entry.size,
        md5=entry.md5,
    )
    largest: list[int] = [0]

    class MeasuredPart(PartFile):
        def write(self, data: bytes | memoryview) -> None:
            super().write(data)
            largest[0] = max(largest[0], self.path.stat().st_size)

    async def fetch():
        fetch_settings = FetchSettings(retries=1, backoff_initial=0.01, backoff_max=0.02, chunk_size=16384)
        async with open_session(fetch_settings) as session:
            downloader = Downloader(session, fetch_settings, VerifySettings(), part_file=MeasuredPart)
            return await downloader.fetch(item, tmp_path / entry.name, entry.name)

    result = asyncio.run(fetch())

    assert result.status is FileStatus.FAILED
    assert "runs past" in result.error and str(entry.size) in result.error
    assert largest[0] <= entry.size
    assert not (tmp_path / entry.name).exists() and not (tmp_path / f"{entry.name}.part").exists()


def test_overlong_and_lying_bodies_through_the_cli(archive, tmp_path: Path) -> None:
    """Through the CLI: an overlong body fails with its reason; a lying Content-Length either ends in a
    verified, byte-identical file or in a failure with a one-line reason (no raw bytes in it)."""
    arch = archive()
    names = sorted(light_curves(arch, (1, 1, 2)))
    overlong, lying = names[0], set(names[1:])
    arch.faults = FaultPlan.from_spec(f"overlong=1:files={overlong},lie=1")
    out = tmp_path / "out"

    result = run_ccd(arch, out)

    assert result.returncode == 1, result.stderr[-3000:]
    entries = entries_by_name(out)
    assert entries[overlong].status == "failed" and "runs past" in entries[overlong].error
    for name in lying:
        entry = entries[name]
        if entry.status == "failed":
            assert "\n" not in entry.error and "SIMPLE" not in entry.error, entry.error
            assert len(entry.error) < 400
    assert assert_verified_records_are_good(out, arch) == sum(entries[n].status == "verified" for n in lying)
    assert "SIMPLE  =" not in result.stderr


def test_token_never_leaks(archive, tmp_path: Path) -> None:
    secret = "tm-SECRET-7f3a9c1e55d2"
    url_secret = "tm-URLSECRET-0b8e2d4c"
    arch = archive()
    names = sorted(light_curves(arch, (1, 1, 2)))
    arch.faults = FaultPlan.from_spec(f"500=0.3,wrong=1:files={names[0]}")
    env = {"MAST_API_TOKEN": secret}
    out = tmp_path / "out"

    planned = run_ccd(arch, out, "--log-level", "DEBUG", env=env)
    assert planned.returncode == 1, planned.stderr[-3000:]

    # A URL list whose URLs carry a token in their query, one of them missing (a 404 with its URL).
    urls = [
        f"{arch.base_url}{DOWNLOAD_PATH}?uri=mast:TESS/product/{n}&token={url_secret}" for n in names[1:4]
    ]
    urls.append(f"{arch.base_url}{DOWNLOAD_PATH}?uri=mast:TESS/product/missing_lc.fits&token={url_secret}")
    url_list = tmp_path / "urls.txt"
    url_list.write_text("\n".join(urls) + "\n")
    fetched_out = tmp_path / "fetched"
    fetched = run_cli(
        "fetch", "--input", url_list, "--out", fetched_out, "--log-level", "DEBUG", "--retries", 1, env=env
    )
    assert fetched.returncode == 1, fetched.stderr[-3000:]
    assert "404" in fetched.stderr

    texts = {"run stderr": planned.stderr, "fetch stderr": fetched.stderr}
    for root in (out, fetched_out):
        for path in (root / ".tessmirror").rglob("*"):
            if path.is_file():
                texts[str(path)] = path.read_text(errors="replace")
    status = run_cli("status", "--out", out, env=env)
    texts["status"] = status.stdout + status.stderr
    assert (out / ".tessmirror" / "plan.ecsv").exists() and (out / ".tessmirror" / "manifest.jsonl").exists()
    for where, text in texts.items():
        assert secret not in text, f"the environment token leaked into {where}"
    # A token inside a URL: masked in logs, error messages and the manifest (which keys records by the
    # redacted URL), and a second run still recognises the verified files without fetching them again.
    assert url_secret not in fetched.stderr
    manifest_text = (fetched_out / ".tessmirror" / "manifest.jsonl").read_text()
    assert url_secret not in manifest_text and "token=***" in manifest_text
    before = len(arch.request_log)
    again = run_cli("fetch", "--input", url_list, "--out", fetched_out, "--retries", 1, env=env)
    assert again.returncode == 1 and url_secret not in again.stderr
    assert {r.name for r in arch.request_log[before:]} == {"missing_lc.fits"}


# -- size caps a server cannot lift ---------------------------------------------------------------------
HUGE_ANNOUNCED = 31_457_280  # 30 MB announced for a row the cap allows far less
CAP = 1_048_576  # fetch.max_file_size in these tests


class CapProbeServer:
    """A server on 127.0.0.1 (free port, own thread) that tries to lift the cap two ways:

    `/files/huge_lc.fits` announces a Content-Length of 30 MB and then holds its body back until the
    test ends (a client that waited for the body would stall); `/files/endless_lc.fits` sends a
    FITS-looking body forever, slowly, with no Content-Length. `sent` counts body bytes written.
    """

    def __init__(self) -> None:
        self.sent = {"huge_lc.fits": 0, "endless_lc.fits": 0}
        self.ended = threading.Event()  # the endless handler stopped (the client hung up)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._release: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/files/{name}"

    def __enter__(self) -> CapProbeServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)

    async def _start(self) -> None:
        from aiohttp import web

        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_get("/files/huge_lc.fits", self._huge)
        app.router.add_get("/files/endless_lc.fits", self._endless)
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _stop(self) -> None:
        assert self._release is not None
        self._release.set()
        await self._runner.cleanup()

    async def _huge(self, request):
        from aiohttp import web

        response = web.StreamResponse(headers={"Content-Type": "application/fits"})
        response.content_length = HUGE_ANNOUNCED
        await response.prepare(request)
        assert self._release is not None
        await self._release.wait()
        return response

    async def _endless(self, request):
        from aiohttp import web

        response = web.StreamResponse(headers={"Content-Type": "application/fits"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        block = b"SIMPLE  =                    T" + b" " * (65_536 - 30)
        try:
            while True:
                await response.write(block)
                self.sent["endless_lc.fits"] += len(block)
                block = bytes(65_536)
                await asyncio.sleep(0.01)  # slowly, so the test can watch the .part grow
        except (ConnectionResetError, RuntimeError, asyncio.CancelledError):
            pass
        finally:
            self.ended.set()
        return response


def test_a_server_cannot_lift_the_size_cap(tmp_path: Path) -> None:
    """URL-list rows declare no size, so fetch.max_file_size caps them: a Content-Length above it is
    refused before any body byte, and an endless chunked body stops at the cap (the .part, watched
    while it grows, never exceeds it)."""
    config = tmp_path / "tessmirror.toml"
    config.write_text(f"[fetch]\nmax_file_size = {CAP}\n")
    out = tmp_path / "out"
    part = out / "misc" / "endless_lc.fits.part"
    largest = [0]
    with CapProbeServer() as server:
        urls = tmp_path / "urls.txt"
        urls.write_text(f"{server.url('huge_lc.fits')}\n{server.url('endless_lc.fits')}\n")
        process = spawn_cli(
            "fetch", "--input", urls, "--out", out, "--config", config, "--retries", 0, "--idle-timeout", 60
        )

        def watch() -> bool:
            with contextlib.suppress(FileNotFoundError):
                largest[0] = max(largest[0], part.stat().st_size)
            return process.poll() is not None

        try:
            assert wait_until(watch, timeout=120, interval=0.002), "the run did not end"
            _, stderr = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert server.ended.wait(30), "the endless body was still being read after the run"
        sent = dict(server.sent)

    assert process.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    entries = entries_by_name(out)
    huge, endless = entries["huge_lc.fits"], entries["endless_lc.fits"]
    assert huge.status == "failed" and endless.status == "failed"
    assert (
        f"announces {HUGE_ANNOUNCED} bytes, more than the {CAP} bytes fetch.max_file_size allows"
        in huge.error
    )
    assert sent["huge_lc.fits"] == 0  # refused on the header: the server never got to send a byte
    assert f"runs past {CAP} bytes, the most fetch.max_file_size allows" in endless.error
    assert 0 < largest[0] <= CAP, largest[0]
    assert not part.exists() and not (out / "misc" / "endless_lc.fits").exists()
    assert sent["endless_lc.fits"] < 64 * CAP  # it stopped: not a runaway read
