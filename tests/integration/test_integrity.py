"""Integrity, end to end: every corruption the archive can inject is caught at the level that can see
it and never reaches its final name; `tessmirror verify` finds damage in a finished mirror and
`--repair` restores it; a service without the artifact table works from `access_estsize`; a non-FITS
body is refused on its first bytes.

Every case runs the real CLI in a subprocess against the local archive (or, for bodies the archive
cannot send, a small hostile server on 127.0.0.1) and checks the request log, the output folder and
the manifest against the archive's truth.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from aiohttp import web

from engine.archive import FaultPlan
from engine.manifest import Manifest, ManifestEntry
from engine.models import PlanItem
from engine.plan.table import items_to_table, load_plan, save_plan, table_to_items
from tests.helpers import assert_mirror_matches_truth, md5_of, mirrored_files, run_cli

pytestmark = pytest.mark.integration

# Retries wait a few milliseconds, not the default second: the tests count tries, not seconds.
FAST_RETRIES = "[fetch]\nbackoff_initial = 0.01\nbackoff_max = 0.05\n"


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "fast.toml"
    path.write_text(FAST_RETRIES)
    return path


def _plan(archive, tmp_path: Path) -> tuple[Path, list[PlanItem]]:
    """`tessmirror plan` for sector 1 / camera 1 / CCD 2, saved as ECSV; returns (path, items)."""
    path = tmp_path / "plan.ecsv"
    done = run_cli("plan", "--tap-url", archive.tap_url, "--sector", 1, "--camera", 1, "--ccd", 2, "-o", path)
    assert done.returncode == 0, done.stderr
    items = sorted(table_to_items(load_plan(path)), key=lambda item: item.filename)
    assert len(items) >= 2, "the footprint should hold a few light curves"
    return path, items


def _fetch(plan: Path, out: Path, config: Path, *args: object):
    return run_cli("fetch", "--config", config, "--input", plan, "--out", out, "--no-fsync", *args)


def _records(out: Path) -> dict[str, ManifestEntry]:
    """File name -> its last manifest record."""
    return {Path(e.path).name: e for e in Manifest(out / ".tessmirror").load().values()}


def _part_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*.part") if ".tessmirror" not in p.parts]


def _requests_by_file(log, start: int = 0) -> dict[str, list]:
    by_file: dict[str, list] = {}
    for record in log[start:]:
        if record.method == "GET":
            by_file.setdefault(record.name, []).append(record)
    return by_file


# -- corruption in transit ------------------------------------------------------------------------
def test_each_corruption_is_caught_before_the_final_name_and_a_retry_fixes_it(
    archive, tmp_path: Path
) -> None:
    arch = archive(targets=64)
    config = _config(tmp_path)
    plan, items = _plan(arch, tmp_path)
    assert len(items) >= 4
    wrong, short, html, clean = (item.filename for item in items[:4])
    assert all(item.size > 0 and item.md5 for item in items), "the artifact join declares size and md5"
    out = tmp_path / "out"

    # 1. Every try is spoilt, no retries: each file fails with the reason of the level that saw it.
    arch.faults = FaultPlan.from_spec(f"wrong=1:files={wrong},short=1:files={short},html=1:files={html}")
    done = _fetch(plan, out, config, "--retries", 0)
    assert done.returncode == 1, done.stderr
    records = _records(out)
    size = arch.catalog[wrong].size
    assert "md5" in records[wrong].error and "does not match" in records[wrong].error  # checksum level
    assert f"of {size} bytes" in records[short].error  # size: the body ended before Content-Length
    assert f"announces 161 bytes but the archive declares {size}" in records[html].error  # on the headers
    assert {records[n].status for n in (wrong, short, html)} == {"failed"}
    assert records[clean].status == "verified"
    # Nothing spoilt reached a final name, and no .part is left behind.
    assert set(mirrored_files(out)) == {clean}
    assert _part_files(out) == []
    requests = _requests_by_file(arch.request_log)
    for name, fault in ((wrong, "wrong"), (short, "short"), (html, "html")):
        assert [r.fault for r in requests[name]] == [fault]  # one try each, and the fault struck

    # 2. Only the first try of each file is spoilt: one retry fixes every file.
    start = len(arch.request_log)
    arch.faults = FaultPlan.from_spec(
        f"wrong=1:files={wrong}:attempts=1,short=1:files={short}:attempts=1,html=1:files={html}:attempts=1"
    )
    done = _fetch(plan, out, config, "--retries", 1, "-v")  # retry lines are DEBUG
    assert done.returncode == 0, done.stderr
    assert "does not match the archive's" in done.stderr  # the retry log names the failed check
    assert_mirror_matches_truth(out, arch, {item.filename for item in items})
    requests = _requests_by_file(arch.request_log, start)
    for name, fault in ((wrong, "wrong"), (short, "short"), (html, "html")):
        assert [(r.attempt, r.fault) for r in requests[name]] == [(1, fault), (2, "")]
    assert clean not in requests  # verified by the first run: not fetched again
    for name, record in _records(out).items():
        assert (record.status, record.level, record.checksum_declared) == ("verified", "fits", True)
        assert record.md5 == arch.catalog[name].md5 == md5_of(out / record.path)
    assert _part_files(out) == []


def test_without_an_artifact_table_only_the_fits_level_catches_flipped_bytes(archive, tmp_path: Path) -> None:
    """No contentLength/contentChecksum: sizes come from access_estsize, no md5 is declared, and a
    right-sized body with flipped bytes (the `wrong` fault) can only be caught by the FITS checksums."""
    arch = archive(targets=64, artifacts=False)
    config = _config(tmp_path)
    plan, items = _plan(arch, tmp_path)
    assert all(item.size == -1 and item.md5 == "" and item.est_kb > 0 for item in items)  # estsize only
    wrong, html = items[0].filename, items[1].filename
    truth = {item.filename: arch.catalog[item.filename] for item in items}
    spec = f"wrong=1:files={wrong},html=1:files={html}"

    # At level checksum nothing can tell: the md5 is computed, but there is none to compare with.
    arch.faults = FaultPlan.from_spec(spec)
    at_checksum = tmp_path / "checksum"
    done = _fetch(plan, at_checksum, config, "--retries", 0, "--verify", "checksum")
    records = _records(at_checksum)
    accepted = at_checksum / records[wrong].path
    assert records[wrong].status == "verified" and records[wrong].level == "checksum"
    assert md5_of(accepted) != truth[wrong].md5  # the corrupt copy got through...
    assert records[wrong].checksum_declared is False  # ...and the manifest does not claim an md5 check
    assert records[wrong].md5 == md5_of(accepted)  # the md5 recorded is the one computed
    # The HTML page is refused at every level, on its first bytes.
    assert records[html].status == "failed" and "web page" in records[html].error
    assert done.returncode == 1

    # At level fits (the default) the HDU checksum catches it; nothing reaches its final name.
    arch.faults = FaultPlan.from_spec(spec)
    at_fits = tmp_path / "fits"
    done = _fetch(plan, at_fits, config, "--retries", 0)
    assert done.returncode == 1, done.stderr
    records = _records(at_fits)
    assert records[wrong].status == "failed"
    assert "fails its CHECKSUM" in records[wrong].error
    assert records[html].status == "failed" and "web page" in records[html].error
    assert wrong not in mirrored_files(at_fits) and html not in mirrored_files(at_fits)
    assert _part_files(at_fits) == []

    # A retry fixes both, and every record says honestly what was checked.
    arch.faults = FaultPlan.from_spec(f"wrong=1:files={wrong}:attempts=1,html=1:files={html}:attempts=1")
    done = _fetch(plan, at_fits, config, "--retries", 1)
    assert done.returncode == 0, done.stderr
    assert_mirror_matches_truth(at_fits, arch, set(truth))
    for name, record in _records(at_fits).items():
        assert (record.status, record.level, record.checksum_declared) == ("verified", "fits", False)
        assert record.md5 == truth[name].md5  # computed while streaming


# -- a finished mirror ----------------------------------------------------------------------------
def test_verify_finds_damage_and_repair_restores_the_mirror(archive, tmp_path: Path) -> None:
    arch = archive(targets=64)
    out = tmp_path / "mirror"
    config = _config(tmp_path)
    footprint = ("--tap-url", arch.tap_url, "--sector", 1, "--camera", 1, "--ccd", 2)
    done = run_cli("run", "--config", config, *footprint, "--out", out, "--no-fsync")
    assert done.returncode == 0, done.stderr
    records = _records(out)
    assert len(records) >= 4
    for name, record in records.items():  # the manifest records the level and the md5 computed
        assert (record.status, record.level, record.checksum_declared) == ("verified", "fits", True)
        assert record.md5 == arch.catalog[name].md5

    flipped, truncated, deleted = sorted(records)[:3]
    data = bytearray((out / records[flipped].path).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, inside the LIGHTCURVE table: the size is unchanged
    (out / records[flipped].path).write_bytes(bytes(data))
    cut = (out / records[truncated].path).read_bytes()[: arch.catalog[truncated].size // 2]
    (out / records[truncated].path).write_bytes(cut)
    (out / records[deleted].path).unlink()

    done = run_cli("verify", "--config", config, "--out", out)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    for name, kind in ((flipped, "corrupt"), (truncated, "truncated"), (deleted, "missing")):
        assert any(line.split()[:2] == [kind, records[name].path] for line in lines), (name, done.stderr)
    assert sum(line.split()[0] in ("corrupt", "truncated", "missing") for line in lines if line.strip()) == 3

    start = len(arch.request_log)
    done = run_cli("verify", "--config", config, "--out", out, "--repair", "--no-fsync")
    assert done.returncode == 0, done.stderr
    assert_mirror_matches_truth(out, arch, set(records))
    quarantine = out / ".tessmirror" / "quarantine"
    assert (quarantine / records[flipped].path).read_bytes() == bytes(data)  # moved aside, never deleted
    assert (quarantine / records[truncated].path).read_bytes() == cut
    assert sorted(r.name for r in arch.request_log[start:] if r.method == "GET") == sorted(
        (flipped, truncated, deleted)
    )  # only the bad files were fetched again
    assert {r.status for r in _records(out).values()} == {"verified"}

    done = run_cli("verify", "--config", config, "--out", out)
    assert done.returncode == 0, done.stderr


# -- bodies that are not FITS ---------------------------------------------------------------------
HUGE = 256 * 1024 * 1024  # what the hostile server would send if nobody stopped it


class HostileServer:
    """Answers every download with a body that is not FITS, and counts the bytes it got out."""

    CHUNK = 64 * 1024

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}
        self.finished: dict[str, bool] = {}
        self.base_url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._runner: web.AppRunner | None = None

    async def _endless(self, request: web.Request, start: bytes, status: int, content_type: str):
        name = request.match_info["name"]
        response = web.StreamResponse(status=status)  # no Content-Length: chunked, no size to check
        response.content_type = content_type
        await response.prepare(request)
        self.sent[name], self.finished[name] = 0, False
        filler = b" " * (self.CHUNK - len(start))
        try:
            while self.sent[name] < HUGE:
                await response.write(start + filler if self.sent[name] == 0 else b" " * self.CHUNK)
                self.sent[name] += self.CHUNK
            await response.write_eof()
            self.finished[name] = True
        except (ConnectionError, RuntimeError):  # the client hung up
            pass
        return response

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name.startswith("html"):
            return await self._endless(request, b"<!DOCTYPE html><html><body>busy", 200, "text/html")
        if name.startswith("json"):
            return await self._endless(request, b'{"error": "try later"', 200, "application/json")
        if name.startswith("error"):
            return await self._endless(request, b"<html><body>Internal error", 500, "text/html")
        self.sent[name], self.finished[name] = 0, True
        return web.Response(status=200, body=b"", content_type="application/fits")  # empty

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            app = web.Application()
            app.router.add_get("/files/{name}", self.handle)
            self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            port = self._runner.addresses[0][1]
            self.base_url = f"http://127.0.0.1:{port}"

        self._loop.run_until_complete(start())
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> HostileServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def test_a_non_fits_body_is_refused_on_its_first_bytes(tmp_path: Path) -> None:
    names = ("html-page_lc.fits", "json-doc_lc.fits", "error-page_lc.fits", "empty_lc.fits")
    with HostileServer() as server:
        items = [PlanItem(url=f"{server.base_url}/files/{name}", filename=name) for name in names]
        plan = tmp_path / "plan.ecsv"
        save_plan(items_to_table(items), plan)
        out = tmp_path / "out"
        done = run_cli(
            "fetch", "--input", plan, "--out", out, "--layout", "flat", "--retries", 0, "--no-fsync"
        )
    assert done.returncode == 1, done.stderr
    records = _records(out)
    assert "web page or JSON" in records["html-page_lc.fits"].error  # status 200, sniffed
    assert "web page or JSON" in records["json-doc_lc.fits"].error
    assert "HTTP 500" in records["error-page_lc.fits"].error  # an error status: refused before its body
    assert "empty body" in records["empty_lc.fits"].error
    assert {r.status for r in records.values()} == {"failed"}
    assert mirrored_files(out) == {} and _part_files(out) == []
    # The client hung up after the first bytes: the server got out only what the socket buffers
    # hold, a sliver of the 256 MiB it would have sent.
    for name in ("html-page_lc.fits", "json-doc_lc.fits", "error-page_lc.fits"):
        assert not server.finished[name]
        assert server.sent[name] < HUGE // 16, (name, server.sent[name])
