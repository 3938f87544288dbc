"""engine.manifest: the append-only manifest and its writer (the run lock: test_lock.py)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

from engine.exceptions import DiskFullError, ManifestError, PermissionDeniedError
from engine.manifest import Manifest, ManifestEntry, ManifestWriter, encode_entry, pack_record, unpack_record
from engine.models import FileResult, FileStatus, PlanItem, VerifyLevel

REPO = Path(__file__).resolve().parents[2]


def entry(n: int, status: str = "verified", **changes: object) -> ManifestEntry:
    base = ManifestEntry(
        url=f"https://archive.example.org/f{n}.fits",
        path=f"s0001/f{n}.fits",
        status=status,
        obs_id=f"obs{n}",
        nbytes=2880 * n,
        md5=f"{n:032x}",
        level="fits",
        checksum_declared=True,
        error="",
        attempts=1,
        time=1000.0 + n,
    )
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def write_lines(manifest: Manifest, *entries: ManifestEntry, tail: bytes = b"") -> None:
    manifest.state_dir.mkdir(parents=True, exist_ok=True)
    with open(manifest.path, "ab") as handle:
        for e in entries:
            handle.write(encode_entry(e))
        handle.write(tail)


async def write_with_writer(manifest: Manifest, entries: list[ManifestEntry], **kwargs: object) -> None:
    writer = ManifestWriter(manifest, **kwargs)  # type: ignore[arg-type]
    await writer.start()
    for e in entries:
        await writer.record_entry(e)
    await writer.close()


# -- reading ------------------------------------------------------------------------------------
def test_missing_manifest_loads_empty(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path / "state")
    assert manifest.load() == {}
    assert set(manifest.verified()) == set()


def test_round_trip_through_the_writer(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path / "state")
    entries = [entry(n) for n in range(1, 6)]
    asyncio.run(write_with_writer(manifest, entries))
    assert manifest.path == tmp_path / "state" / "manifest.jsonl"
    assert manifest.load() == {e.key: e for e in entries}
    assert list(manifest.iter_records()) == entries


def test_every_line_is_json_with_a_crc(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    write_lines(manifest, entry(1))
    line = json.loads(manifest.path.read_bytes())
    assert set(line) == {"crc", "rec"}
    assert line["rec"]["url"] == entry(1).url


def test_last_record_for_a_url_wins(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    write_lines(
        manifest, entry(1), entry(2), entry(1, status="failed", error="boom"), entry(2, status="pending")
    )
    write_lines(manifest, entry(2, status="verified", attempts=3))
    loaded = manifest.load()
    assert loaded[entry(1).key].status == "failed"
    assert loaded[entry(1).key].error == "boom"
    assert loaded[entry(2).key].attempts == 3
    assert set(manifest.verified()) == {entry(2).key}


def test_torn_last_line_is_ignored_and_a_new_writer_appends_cleanly(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    whole = encode_entry(entry(3))
    write_lines(manifest, entry(1), entry(2), tail=whole[: len(whole) // 2])
    assert list(manifest.load()) == [entry(1).key, entry(2).key]
    assert manifest.skipped_lines == 1

    asyncio.run(write_with_writer(manifest, [entry(4), entry(5)]))
    loaded = manifest.load()
    assert list(loaded) == [entry(n).key for n in (1, 2, 4, 5)]
    assert loaded[entry(5).key] == entry(5)
    assert manifest.skipped_lines == 1  # only the old torn line
    assert manifest.path.read_bytes().endswith(b"\n")


def test_a_line_missing_only_its_newline_is_still_whole(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    write_lines(manifest, entry(1), tail=encode_entry(entry(2)).rstrip(b"\n"))
    assert set(manifest.load()) == {entry(1).key, entry(2).key}


def test_a_line_with_a_wrong_crc_is_skipped_with_its_line_number(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = Manifest(tmp_path)
    write_lines(manifest, entry(1), entry(2), entry(3))
    lines = manifest.path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"f2.fits", b"f9.fits")  # garbled payload, CRC left as it was
    manifest.path.write_bytes(b"".join(lines))
    with caplog.at_level("WARNING", logger="engine.manifest"):
        loaded = manifest.load()
    assert set(loaded) == {entry(1).key, entry(3).key}
    assert "line 2" in caplog.text


def test_garbage_lines_of_any_shape_are_skipped(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    write_lines(manifest, entry(1), tail=b'not json\n{"crc":"zzzzzzzz","rec":{}}\n\x00\x00\x00\n\n')
    write_lines(manifest, entry(2))
    assert set(manifest.load()) == {entry(1).key, entry(2).key}
    assert manifest.skipped_lines == 3


def test_unreadable_manifest_raises_manifest_error_naming_the_path(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    manifest.path.mkdir()  # a directory where the file should be: open() fails
    with pytest.raises(ManifestError) as info:
        manifest.load()
    assert str(manifest.path) in str(info.value)
    assert info.value.hint


def test_permission_denied_reading_raises_manifest_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = Manifest(tmp_path)
    write_lines(manifest, entry(1))

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(manifest.path))

    monkeypatch.setattr("engine.manifest.open", refuse, raising=False)
    with pytest.raises(ManifestError) as info:
        manifest.load()
    assert str(manifest.path) in str(info.value)
    assert "chmod" in str(info.value)


def test_from_result_records_the_result_and_redacts_the_error() -> None:
    item = PlanItem(url="https://a.example.org/x.fits", filename="x.fits", obs_id="o1", md5="d" * 32)
    result = FileResult(
        item,
        FileStatus.FAILED,
        path="s0001/x.fits",
        nbytes=10,
        level=VerifyLevel.CHECKSUM,
        error="GET https://a.example.org/x.fits?token=sekrit99 failed",
        attempts=4,
        finished_at=5.0,
    )
    e = ManifestEntry.from_result(result)
    assert (e.url, e.path, e.status, e.obs_id, e.level, e.attempts, e.time) == (
        item.url,
        "s0001/x.fits",
        "failed",
        "o1",
        "checksum",
        4,
        5.0,
    )
    assert e.md5 == "d" * 32  # no computed md5: the declared one is kept for a later verify
    assert "sekrit99" not in e.error
    assert "sekrit99" not in encode_entry(ManifestEntry("u", error="token=sekrit99")).decode()


# -- the writer ---------------------------------------------------------------------------------
class CountingFile:
    """Wraps the real file to record every write() call."""

    def __init__(self, path: Path, writes: list[bytes]) -> None:
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115
        self._writes = writes

    def write(self, data: bytes) -> int:
        self._writes.append(bytes(data))
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()


def test_writer_writes_whole_batches_and_close_drains(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    writes: list[bytes] = []
    entries = [entry(n) for n in range(1, 8)]
    asyncio.run(
        write_with_writer(
            manifest, entries, batch=3, flush_interval=30.0, opener=lambda p: CountingFile(p, writes)
        )
    )
    assert [w.count(b"\n") for w in writes] == [3, 3, 1]
    assert all(w.endswith(b"\n") for w in writes)
    assert list(manifest.iter_records()) == entries


def test_writer_flushes_after_the_interval_without_close(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)

    async def scenario() -> list[ManifestEntry]:
        writer = ManifestWriter(manifest, batch=100, flush_interval=0.02)
        await writer.start()
        await writer.record_entry(entry(1))
        for _ in range(200):  # bounded wait for the interval flush
            await asyncio.sleep(0.01)
            if manifest.path.stat().st_size:
                break
        seen = list(manifest.iter_records())
        await writer.close()
        return seen

    assert asyncio.run(scenario()) == [entry(1)]


def test_flush_now_writes_synchronously(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)

    async def scenario() -> list[ManifestEntry]:
        writer = ManifestWriter(manifest, batch=100, flush_interval=30.0)
        await writer.start()
        for n in (1, 2):
            await writer.record_entry(entry(n))
        writer.flush_now()
        seen = list(manifest.iter_records())
        await writer.close()
        return seen

    assert asyncio.run(scenario()) == [entry(1), entry(2)]


def test_close_is_idempotent_and_recording_after_close_fails(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)

    async def scenario() -> None:
        writer = ManifestWriter(manifest)
        await writer.start()
        await writer.record(
            FileResult(PlanItem(url="https://a.example.org/y", filename="y"), FileStatus.VERIFIED)
        )
        await writer.close()
        await writer.close()
        with pytest.raises(ManifestError):
            await writer.record_entry(entry(2))

    asyncio.run(scenario())
    assert set(manifest.verified()) == {"url:https://a.example.org/y"}


def test_cancelled_close_still_flushes_everything(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    entries = [entry(n) for n in range(1, 11)]

    async def scenario() -> None:
        writer = ManifestWriter(manifest, batch=2, flush_interval=30.0)
        await writer.start()
        for e in entries:
            await writer.record_entry(e)
        closing = asyncio.create_task(writer.close())
        await asyncio.sleep(0)  # close() is now waiting for the writer task
        closing.cancel()
        await asyncio.gather(closing, return_exceptions=True)

    asyncio.run(scenario())
    assert list(manifest.iter_records()) == entries


class FullDisk:
    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None: ...

    def fileno(self) -> int:
        raise OSError(errno.EBADF, "no fd")

    def close(self) -> None: ...


def test_disk_full_raises_disk_full_error_naming_the_path(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)

    async def scenario() -> None:
        writer = ManifestWriter(manifest, batch=1, opener=lambda p: FullDisk())
        await writer.start()
        await writer.record_entry(entry(1))
        with pytest.raises(DiskFullError) as info:
            for n in range(2, 50):  # the failure surfaces on a later record() or on close()
                await writer.record_entry(entry(n))
                await asyncio.sleep(0.01)
            await writer.close()
        assert str(manifest.path) in str(info.value)
        assert info.value.path == manifest.path

    asyncio.run(scenario())


def test_close_does_not_hang_when_the_writer_died_with_a_full_queue(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)

    async def scenario() -> None:
        writer = ManifestWriter(manifest, batch=1, flush_interval=30.0, opener=lambda p: FullDisk())
        await writer.start()
        for n in range(4):  # fills the queue (4 x batch) before the writer task runs at all
            await writer.record_entry(entry(n))
        with pytest.raises(DiskFullError):
            await asyncio.wait_for(writer.close(), timeout=10)

    asyncio.run(scenario())


def test_record_does_not_hang_when_the_writer_dies_while_it_waits(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)

    async def scenario() -> None:
        writer = ManifestWriter(manifest, batch=1, flush_interval=30.0, opener=lambda p: FullDisk())
        await writer.start()
        with pytest.raises(DiskFullError):
            for n in range(50):  # no pauses: record() is blocked on a full queue when the writer fails
                await asyncio.wait_for(writer.record_entry(entry(n)), timeout=10)
        with pytest.raises(DiskFullError):
            await writer.close()

    asyncio.run(scenario())


def test_permission_denied_opening_raises_permission_denied_error(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)

    def refuse(path: Path) -> None:
        raise PermissionError(errno.EROFS, "Read-only file system", str(path))

    async def scenario() -> None:
        writer = ManifestWriter(manifest, opener=refuse)  # type: ignore[arg-type]
        with pytest.raises(PermissionDeniedError) as info:
            await writer.start()
        assert str(manifest.path) in str(info.value)

    asyncio.run(scenario())


def test_append_entries_synchronously_after_a_torn_line(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    write_lines(manifest, entry(1), tail=b'{"crc":"0000')
    assert manifest.append_entries([entry(2), entry(3)]) == 2
    assert list(manifest.load()) == [entry(1).key, entry(2).key, entry(3).key]


# -- kill -9 ------------------------------------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from engine.manifest import Manifest, ManifestEntry, ManifestWriter

    async def main(state, start):
        writer = ManifestWriter(Manifest(Path(state)), batch=7, flush_interval=0.001)
        await writer.start()
        print("ready", flush=True)
        n = start
        while True:
            url = f"https://archive.example.org/{n}"
            md5 = url[-32:].rjust(32, "0")
            error = "x" * (n % 300)
            record = ManifestEntry(url, path=f"p/{n}", status="verified", md5=md5, nbytes=n, error=error)
            await writer.record_entry(record)
            n += 1
            if n % 7 == 0:
                await asyncio.sleep(0)

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


def test_manifest_survives_kill_9_at_random_moments(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path / "state")
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rounds = 4
    seen = 0
    for round_no in range(rounds):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(manifest.state_dir), str(round_no * 10_000_000)],
            stdout=subprocess.PIPE,
            env=env,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
            # Let it write for a moment, then kill it mid-whatever.
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=rng.uniform(0.02, 0.25))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            if child.stdout:
                child.stdout.close()

        records = list(manifest.iter_records())
        assert manifest.skipped_lines <= round_no + 1  # at most one torn line per kill
        assert len(records) >= seen  # nothing written earlier was lost or damaged
        seen = len(records)
        for record in records:  # every loaded record is whole and self-consistent
            n = int(record.url.rsplit("/", 1)[1])
            assert record.path == f"p/{n}"
            assert record.nbytes == n
            assert record.error == "x" * (n % 300)
            assert record.md5 == record.url[-32:].rjust(32, "0")
    assert seen > 0


def test_the_lock_is_still_importable_from_the_manifest_module() -> None:
    from engine import lock, manifest

    assert manifest.RunLock is lock.RunLock
    assert manifest.LOCK_NAME == lock.LOCK_NAME


# -- file identity ----------------------------------------------------------------------------------
def legacy_line(n: int, **changes: object) -> bytes:
    """A record as versions before file keys wrote it: keyed by URL, no key/size/declared_md5."""
    rec = {
        "url": f"https://archive.example.org/f{n}.fits", "path": f"s0001/f{n}.fits", "status": "verified",
        "obs_id": f"obs{n}", "nbytes": 2880 * n, "md5": f"{n:032x}", "level": "fits",
        "checksum_declared": True, "error": "", "attempts": 1, "time": 1000.0 + n, **changes,
    }  # fmt: skip
    payload = json.dumps(rec, separators=(",", ":")).encode()
    return b'{"crc":"%08x","rec":%s}\n' % (zlib.crc32(payload), payload)


def test_a_record_is_keyed_by_obs_id_and_file_name_and_keeps_what_the_plan_declared(tmp_path: Path) -> None:
    item = PlanItem(
        url="https://a.example.org/x?uri=f_lc.fits", filename="f_lc.fits", obs_id="o1", size=7, md5="a" * 32
    )
    e = ManifestEntry.from_result(FileResult(item, FileStatus.VERIFIED, path="s0001/f_lc.fits", nbytes=7))
    assert (e.key, e.size, e.declared_md5) == ("o1/f_lc.fits", 7, "a" * 32)
    bare = PlanItem(url="https://a.example.org/files/g_lc.fits", filename="g_lc.fits")
    assert ManifestEntry.from_result(FileResult(bare, FileStatus.VERIFIED, path="s0001/g_lc.fits")).key == (
        "path:s0001/g_lc.fits"
    )


def test_two_urls_for_one_file_are_one_record_the_last_one_wins(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    write_lines(manifest, entry(1), entry(1, url="https://s3.example.org/f1.fits", nbytes=5))
    (only,) = manifest.load().values()
    assert (only.url, only.nbytes) == ("https://s3.example.org/f1.fits", 5)
    assert set(manifest.verified()) == {"obs1/f1.fits"}


def test_a_url_keyed_manifest_reads_as_is_and_upgrades_atomically_once(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    manifest.path.write_bytes(
        legacy_line(1) + legacy_line(2) + legacy_line(1, status="failed") + b'{"crc":"tor'
    )
    assert manifest.needs_upgrade()
    assert set(manifest.load()) == {"obs1/f1.fits", "obs2/f2.fits"}  # readable before the upgrade
    assert set(manifest.verified()) == {"obs2/f2.fits"}  # the last record of f1 says failed
    before = manifest.path.stat().st_ino
    assert manifest.upgrade() == 3
    assert manifest.path.stat().st_ino != before  # a new file renamed over the old one
    assert not manifest.needs_upgrade() and manifest.upgrade() == 0  # idempotent
    lines = manifest.path.read_bytes().splitlines()
    assert [json.loads(line)["rec"]["key"] for line in lines] == [
        "obs1/f1.fits",
        "obs2/f2.fits",
        "obs1/f1.fits",
    ]
    assert manifest.skipped_lines == 0 and list(tmp_path.iterdir()) == [manifest.path]  # no temp file


def test_an_upgrade_that_cannot_finish_leaves_the_old_manifest_whole_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = Manifest(tmp_path)
    original = legacy_line(1) + legacy_line(2)
    manifest.path.write_bytes(original)

    def full(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("engine.manifest.os.replace", full)
    with pytest.raises(DiskFullError):
        manifest.upgrade()
    assert manifest.path.read_bytes() == original
    assert list(tmp_path.iterdir()) == [manifest.path]


@pytest.mark.parametrize(
    "nbytes, md5", [(0, ""), (2880, "f" * 32), (10**12, "0123456789abcdef" * 2), (5, "xyz")]
)
def test_the_resume_packs_size_and_md5_into_one_int(nbytes: int, md5: str) -> None:
    assert unpack_record(pack_record(nbytes, md5)) == (nbytes, md5 if len(md5) == 32 else "")


def test_the_route_of_a_file_is_recorded_and_read_back(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    item = PlanItem(url="https://s3.example.org/f_lc.fits", filename="f_lc.fits", obs_id="o1")
    result = FileResult(
        item,
        FileStatus.VERIFIED,
        path="f_lc.fits",
        source="mast",
        note="s3 answered 403: fell back",
        origin="downloaded",
    )
    manifest.append_entries([ManifestEntry.from_result(result)])
    (back,) = manifest.load().values()
    assert (back.source, back.note, back.origin) == ("mast", "s3 answered 403: fell back", "downloaded")


# -- shards: several manifest files, one writer each -----------------------------------------------
def write_shard(state: Path, shard: str, *entries: ManifestEntry) -> Manifest:
    manifest = Manifest(state, shard=shard)
    manifest.path.parent.mkdir(parents=True, exist_ok=True)
    with open(manifest.path, "ab") as handle:
        for e in entries:
            handle.write(encode_entry(e))
    return manifest


def test_a_shard_writes_its_own_file_in_the_same_format(tmp_path: Path) -> None:
    state = tmp_path / ".tessmirror"
    manifest = Manifest(state, shard="shard-1-of-4")
    assert manifest.path == state / "manifest.d" / "shard-1-of-4.jsonl"
    asyncio.run(write_with_writer(manifest, [entry(1)]))
    assert Manifest(state).load()["obs1/f1.fits"].status == "verified"
    assert not (state / "manifest.jsonl").exists() and Manifest(state).exists()


def test_every_reader_reads_the_main_file_and_every_shard_file(tmp_path: Path) -> None:
    state = tmp_path / ".tessmirror"
    write_lines(Manifest(state), entry(1))
    write_shard(state, "shard-0-of-2", entry(2))
    write_shard(state, "shard-1-of-2", entry(3), entry(4, status="failed"))
    manifest = Manifest(state)
    assert set(manifest.load()) == {"obs1/f1.fits", "obs2/f2.fits", "obs3/f3.fits", "obs4/f4.fits"}
    assert set(manifest.verified()) == {"obs1/f1.fits", "obs2/f2.fits", "obs3/f3.fits"}


def test_where_two_files_disagree_the_later_time_wins(tmp_path: Path) -> None:
    state = tmp_path / ".tessmirror"
    # The main file says pending later (a verify --repair) than the shard verified it: pending wins.
    write_lines(Manifest(state), entry(1, status="pending", time=2000.0), entry(2, time=1000.0))
    # The shard verified f2 after the main file's record; f1's verification is older than the repair.
    write_shard(state, "shard-0-of-2", entry(1, time=1500.0), entry(2, status="failed", time=500.0))
    write_shard(state, "shard-1-of-2", entry(2, time=3000.0))
    manifest = Manifest(state)
    loaded = manifest.load()
    assert loaded["obs1/f1.fits"].status == "pending"
    assert loaded["obs2/f2.fits"].time == 3000.0
    assert set(manifest.verified()) == {"obs2/f2.fits"}


def test_within_one_file_the_last_line_wins_whatever_its_time(tmp_path: Path) -> None:
    state = tmp_path / ".tessmirror"
    write_shard(state, "shard-0-of-2", entry(1, time=5000.0), entry(1, status="failed", time=10.0))
    write_shard(state, "shard-1-of-2", entry(1, time=4000.0))
    # Shard 0's word is its last line (failed, t=10); shard 1's (verified, t=4000) is later.
    assert Manifest(state).load()["obs1/f1.fits"].time == 4000.0
    assert set(Manifest(state).verified()) == {"obs1/f1.fits"}


def test_equal_times_go_to_the_file_read_later(tmp_path: Path) -> None:
    state = tmp_path / ".tessmirror"
    write_lines(Manifest(state), entry(1, status="failed", time=7.0))
    write_shard(state, "shard-0-of-1", entry(1, time=7.0))
    assert Manifest(state).load()["obs1/f1.fits"].status == "verified"


def test_an_upgrade_touches_only_the_main_file(tmp_path: Path) -> None:
    state = tmp_path / ".tessmirror"
    write_shard(state, "shard-0-of-2", entry(1))
    assert not Manifest(state).needs_upgrade()
    assert Manifest(state).upgrade() == 0
