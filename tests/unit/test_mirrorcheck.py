"""engine.mirrorcheck: re-verify a whole mirror from its manifest, and repair it."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from engine.exceptions import LocalError, UsageError
from engine.manifest import Manifest, ManifestEntry
from engine.mirrorcheck import check_mirror
from engine.models import VerifyLevel

NAMES = {
    "good": "tid/s0001/0000/0000/0000/0001/tess2018206045859-s0001-0000000000000001-0120-s_lc.fits",
    "flipped": "tid/s0001/0000/0000/0000/0002/tess2018206045859-s0001-0000000000000002-0120-s_lc.fits",
    "truncated": "tid/s0001/0000/0000/0000/0003/tess2018206045859-s0001-0000000000000003-0120-s_lc.fits",
    "deleted": "tid/s0001/0000/0000/0000/0004/tess2018206045859-s0001-0000000000000004-0120-s_lc.fits",
}


def make_fits(path: Path, seed: int) -> None:
    """A small light-curve-like FITS file with CHECKSUM/DATASUM in every HDU."""
    rng = np.random.default_rng(seed)
    table = fits.BinTableHDU.from_columns(
        [
            fits.Column(name="TIME", format="D", array=np.arange(200, dtype=float)),
            fits.Column(name="PDCSAP_FLUX", format="E", array=rng.normal(1000, 5, 200).astype(np.float32)),
        ],
        name="LIGHTCURVE",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path, checksum=True)


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def build_mirror(tmp_path: Path) -> tuple[Path, Manifest, dict[str, ManifestEntry]]:
    out = tmp_path / "mirror"
    manifest = Manifest(out / ".tessmirror")
    entries = {}
    for seed, (key, rel) in enumerate(NAMES.items(), start=1):
        path = out / rel
        make_fits(path, seed)
        entries[key] = ManifestEntry(
            url=f"https://archive.example.org/{path.name}",
            path=rel,
            status="verified",
            nbytes=path.stat().st_size,
            md5=md5_of(path),
            level="fits",
            time=1.0,
        )
    manifest.append_entries(entries.values())
    return out, manifest, entries


def damage(out: Path) -> None:
    flipped = out / NAMES["flipped"]
    data = bytearray(flipped.read_bytes())
    data[-100] ^= 0x01  # inside the table data: size unchanged, md5 and DATASUM broken
    flipped.write_bytes(bytes(data))
    truncated = out / NAMES["truncated"]
    truncated.write_bytes(truncated.read_bytes()[:-2880])
    (out / NAMES["deleted"]).unlink()
    (out / "stray.fits").write_bytes(b"not ours")
    (out / NAMES["good"]).with_name("download.fits.part").write_bytes(b"in progress")


def by_path(report) -> dict[str, str]:
    return {p.path: p.kind for p in report.problems}


def test_a_clean_mirror_reports_no_problems(tmp_path: Path) -> None:
    out, manifest, _ = build_mirror(tmp_path)
    calls: list[tuple[int, int]] = []
    report = check_mirror(out, manifest, level=VerifyLevel.FITS, progress=lambda d, t: calls.append((d, t)))
    assert (report.checked, report.ok, report.problems, report.quarantined) == (4, 4, [], [])
    assert report.intact
    assert calls[0] == (0, 4)
    assert calls[-1] == (4, 4)


def test_damage_is_classified(tmp_path: Path) -> None:
    out, manifest, _ = build_mirror(tmp_path)
    damage(out)
    report = check_mirror(out, manifest, level=VerifyLevel.FITS)
    assert (report.checked, report.ok) == (4, 1)
    assert by_path(report) == {
        NAMES["flipped"]: "corrupt",
        NAMES["truncated"]: "truncated",
        NAMES["deleted"]: "missing",
        "stray.fits": "unexpected",
    }
    assert report.quarantined == []
    assert not report.intact
    assert (out / NAMES["flipped"]).exists()  # no repair: nothing moved
    assert (out / "stray.fits").exists()


def test_fits_level_finds_corruption_without_a_recorded_md5(tmp_path: Path) -> None:
    out, manifest, entries = build_mirror(tmp_path)
    manifest.append_entries([ManifestEntry(**{**_fields(entries["flipped"]), "md5": ""})])
    damage(out)
    at_fits = by_path(check_mirror(out, manifest, level=VerifyLevel.FITS))
    at_size = by_path(check_mirror(out, manifest, level=VerifyLevel.SIZE))
    assert at_fits[NAMES["flipped"]] == "corrupt"  # the FITS DATASUM caught it
    assert NAMES["flipped"] not in at_size  # a size check cannot see a flipped byte


def test_repair_quarantines_bad_files_and_marks_them_pending(tmp_path: Path) -> None:
    out, manifest, entries = build_mirror(tmp_path)
    damage(out)
    flipped_bytes = (out / NAMES["flipped"]).read_bytes()
    report = check_mirror(out, manifest, level=VerifyLevel.FITS, repair=True)

    quarantine = manifest.state_dir / "quarantine"
    assert sorted(report.quarantined) == sorted(
        [
            *(str((quarantine / NAMES[k]).resolve()) for k in ("flipped", "truncated")),
            str(quarantine / "stray.fits"),
        ]
    )
    assert (quarantine / NAMES["flipped"]).read_bytes() == flipped_bytes  # moved, never deleted
    assert not (out / NAMES["flipped"]).exists()
    assert not (out / NAMES["truncated"]).exists()
    # Unexpected files are reported and moved to the quarantine as well (never deleted).
    assert not (out / "stray.fits").exists()
    assert (quarantine / "stray.fits").read_bytes() == b"not ours"
    assert report.to_download == 3 and not report.intact  # three files must be downloaded again

    loaded = manifest.load()
    for key in ("flipped", "truncated", "deleted"):
        record = loaded[entries[key].key]
        assert record.status == "pending"
        assert record.path == NAMES[key]
        assert record.error.startswith("verify: ")
    assert loaded[entries["good"].key].status == "verified"
    assert set(manifest.verified()) == {entries["good"].key}

    # Until they are downloaded, a second check reports the pending files as missing (a repair
    # whose download failed is not a whole mirror); the quarantine (in the state dir) is not
    # "unexpected", and nothing is marked pending twice.
    lines = manifest.path.read_bytes().count(b"\n")
    again = check_mirror(out, manifest, level=VerifyLevel.FITS, repair=True)
    assert (again.checked, again.ok) == (1, 1)
    assert by_path(again) == {NAMES[k]: "missing" for k in ("flipped", "truncated", "deleted")}
    assert all("last record is 'pending'" in p.detail for p in again.problems)
    assert (again.to_download, again.intact) == (3, False)
    assert manifest.path.read_bytes().count(b"\n") == lines


def test_repair_never_overwrites_an_earlier_quarantined_copy(tmp_path: Path) -> None:
    out, manifest, _entries = build_mirror(tmp_path)
    earlier = manifest.state_dir / "quarantine" / NAMES["flipped"]
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"earlier copy")
    damage(out)
    report = check_mirror(out, manifest, level=VerifyLevel.CHECKSUM, repair=True)
    assert str(earlier.resolve().with_name(earlier.name + ".1")) in report.quarantined
    assert earlier.read_bytes() == b"earlier copy"


def test_an_unsafe_recorded_path_is_reported_and_never_touched(tmp_path: Path) -> None:
    out, manifest, _ = build_mirror(tmp_path)
    victim = tmp_path / "victim.fits"
    victim.write_bytes(b"x")
    manifest.append_entries(
        [
            ManifestEntry(
                url="https://archive.example.org/evil", path="../victim.fits", status="verified", nbytes=1
            )
        ]
    )
    report = check_mirror(out, manifest, level=VerifyLevel.SIZE, repair=True)
    assert by_path(report)["../victim.fits"] == "corrupt"
    assert victim.exists()
    assert manifest.load()["path:../victim.fits"].status == "pending"


def test_a_missing_mirror_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        check_mirror(tmp_path / "nope", Manifest(tmp_path / "nope" / ".tessmirror"), level=VerifyLevel.SIZE)


def test_workers_do_not_change_the_result(tmp_path: Path) -> None:
    out, manifest, _ = build_mirror(tmp_path)
    damage(out)
    one = check_mirror(out, manifest, level=VerifyLevel.FITS, workers=1)
    four = check_mirror(out, manifest, level=VerifyLevel.FITS, workers=4)
    assert by_path(one) == by_path(four)
    assert os.listdir(manifest.state_dir) == ["manifest.jsonl"]  # checking alone writes nothing


def _fields(entry: ManifestEntry) -> dict[str, object]:
    return {name: getattr(entry, name) for name in ManifestEntry.__slots__}


def test_only_the_last_record_of_a_url_counts(tmp_path: Path) -> None:
    out, manifest, entries = build_mirror(tmp_path)
    # The flipped file was verified, then failed: not checked, reported missing from the mirror.
    manifest.append_entries([ManifestEntry(**{**_fields(entries["flipped"]), "status": "failed"})])
    # The deleted file failed once and was verified later: the later record is the one that counts.
    manifest.append_entries(
        [ManifestEntry(**{**_fields(entries["deleted"]), "status": "verified", "time": 9.0})]
    )
    damage(out)
    report = check_mirror(out, manifest, level=VerifyLevel.FITS)
    assert report.checked == 3
    assert by_path(report) == {
        NAMES["flipped"]: "missing",
        NAMES["truncated"]: "truncated",
        NAMES["deleted"]: "missing",
        "stray.fits": "unexpected",
    }


def test_progress_is_paced_by_time_not_by_file(tmp_path: Path) -> None:
    out, manifest, _ = build_mirror(tmp_path)
    every: list[tuple[int, int]] = []
    check_mirror(
        out, manifest, level=VerifyLevel.SIZE, progress=lambda d, t: every.append((d, t)), progress_interval=0
    )
    assert every[0] == (0, 4) and every[-1] == (4, 4)
    assert [d for d, _ in every[1:-1]] == [1, 2, 3, 4]  # interval 0: after every file
    rare: list[tuple[int, int]] = []
    check_mirror(
        out,
        manifest,
        level=VerifyLevel.SIZE,
        progress=lambda d, t: rare.append((d, t)),
        progress_interval=3600,
    )
    assert rare == [(0, 4), (4, 4)]  # a long interval: only the start and the end


def test_many_unexpected_files_are_all_found(tmp_path: Path) -> None:
    out, manifest, _ = build_mirror(tmp_path)
    strays = {f"strays/{i:05d}.fits" for i in range(5000)}  # more than one lookup batch
    (out / "strays").mkdir()
    for rel in strays:
        (out / rel).write_bytes(b"")
    report = check_mirror(out, manifest, level=VerifyLevel.SIZE)
    assert report.ok == 4
    assert {p.path for p in report.problems if p.kind == "unexpected"} == strays
    assert {p.kind for p in report.problems} == {"unexpected"}


def test_repair_works_in_batches_and_ignores_its_own_records(tmp_path: Path, monkeypatch) -> None:
    import engine.mirrorcheck as mirrorcheck

    monkeypatch.setattr(mirrorcheck, "_REPAIR_BATCH", 1)  # every bad file is its own batch
    out, manifest, entries = build_mirror(tmp_path)
    damage(out)
    report = check_mirror(out, manifest, level=VerifyLevel.FITS, repair=True)
    assert (report.checked, report.ok, len(report.quarantined)) == (4, 1, 3)  # 2 bad, 1 stray
    # The pending records appended mid-check were not read back as records to judge.
    assert sorted(p.kind for p in report.problems) == ["corrupt", "missing", "truncated", "unexpected"]
    loaded = manifest.load()
    assert {url for url, e in loaded.items() if e.status == "pending"} == {
        entries[k].key for k in ("flipped", "truncated", "deleted")
    }
    assert not (manifest.state_dir / "run.lock").exists()  # the lock was released


def test_repair_refuses_while_a_run_holds_the_mirror(tmp_path: Path) -> None:
    from engine.exceptions import RunLockedError
    from engine.manifest import RunLock

    out, manifest, entries = build_mirror(tmp_path)
    damage(out)
    with RunLock(manifest.state_dir):
        with pytest.raises(RunLockedError):
            check_mirror(out, manifest, level=VerifyLevel.FITS, repair=True)
        assert (out / NAMES["flipped"]).exists()  # nothing was moved
        assert manifest.load()[entries["flipped"].key].status == "verified"
        # A caller that holds the lock itself says so.
        report = check_mirror(out, manifest, level=VerifyLevel.FITS, repair=True, lock_held=True)
    assert len(report.quarantined) == 3


def test_a_failed_download_is_reported_missing_and_repair_marks_it_for_download(tmp_path: Path) -> None:
    """The state after a `verify --repair` whose download failed: the last record says "failed"."""
    out, manifest, _ = build_mirror(tmp_path)
    failed = ManifestEntry(
        url="https://archive.example.org/failed.fits",
        path="misc/failed.fits",
        status="failed",
        error="HTTP 503 from the archive",
    )
    (out / "misc").mkdir()
    (out / "misc" / "failed.fits").write_bytes(b"left over")  # its path is expected, not "unexpected"
    manifest.append_entries([failed])

    report = check_mirror(out, manifest, level=VerifyLevel.FITS)
    assert report.checked == 4 and report.ok == 4
    assert by_path(report) == {"misc/failed.fits": "missing"}
    assert "last record is 'failed' (HTTP 503 from the archive)" in report.problems[0].detail
    assert not report.intact

    repaired = check_mirror(out, manifest, level=VerifyLevel.FITS, repair=True)
    assert not repaired.intact
    assert manifest.load()[failed.key].status == "pending"  # the CLI's repair downloads pending URLs
    assert repaired.to_download == 1
    assert (out / "misc" / "failed.fits").exists()  # never verified, not moved: the download replaces it


def test_repair_of_only_unexpected_files_moves_them_and_leaves_an_intact_mirror(tmp_path: Path) -> None:
    out, manifest, _ = build_mirror(tmp_path)
    (out / "stray.fits").write_bytes(b"not ours")
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_bytes(b"mine")
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"outside")
    (out / "link.fits").symlink_to(outside)

    found = check_mirror(out, manifest, level=VerifyLevel.SIZE)
    strays = {"stray.fits", "notes/todo.txt", "link.fits"}
    assert by_path(found) == dict.fromkeys(strays, "unexpected")
    assert not found.intact  # reported, not fixed

    report = check_mirror(out, manifest, level=VerifyLevel.SIZE, repair=True)
    assert {p.path for p in report.problems} == strays
    assert all(p.resolved for p in report.problems)
    assert report.intact and report.to_download == 0
    quarantine = manifest.state_dir / "quarantine"
    assert (quarantine / "notes" / "todo.txt").read_bytes() == b"mine"
    assert (quarantine / "link.fits").is_symlink()  # the link was moved, never followed
    assert outside.read_bytes() == b"outside"
    assert {e.status for e in manifest.load().values()} == {"verified"}  # no record changed
    again = check_mirror(out, manifest, level=VerifyLevel.SIZE)
    assert again.problems == [] and again.intact


def test_a_state_dir_elsewhere_leaves_the_output_lock_out_of_unexpected(tmp_path: Path) -> None:
    out, manifest, _ = build_mirror(tmp_path)
    elsewhere = Manifest(tmp_path / "state")
    elsewhere.append_entries(manifest.load().values())
    shutil.rmtree(manifest.state_dir)
    report = check_mirror(out, elsewhere, level=VerifyLevel.SIZE, repair=True)
    assert report.problems == [] and report.intact
    assert not (out / ".tessmirror" / "run.lock").exists()  # taken under --out, and released


def test_repair_can_leave_unexpected_files_in_place_and_then_the_mirror_is_not_intact(tmp_path: Path) -> None:
    out, manifest, _ = build_mirror(tmp_path)
    (out / "stray.fits").write_bytes(b"not ours")
    report = check_mirror(out, manifest, level=VerifyLevel.SIZE, repair=True, move_unexpected=False)
    assert by_path(report) == {"stray.fits": "unexpected"}
    assert (out / "stray.fits").read_bytes() == b"not ours"
    assert report.quarantined == [] and not report.intact and report.to_download == 0


def test_shard_manifests_are_checked_and_the_later_time_wins_across_files(tmp_path: Path) -> None:
    out, _manifest, entries = build_mirror(tmp_path)
    state = out / ".tessmirror"
    # Shard 0 failed "flipped" after the main file verified it (later time): the failure counts.
    Manifest(state, shard="shard-0-of-2").append_entries(
        [ManifestEntry(**{**_fields(entries["flipped"]), "status": "failed", "time": 5.0})]
    )
    # Shard 1 wrote an older record of "good" than the main file's: the main file's counts.
    Manifest(state, shard="shard-1-of-2").append_entries(
        [ManifestEntry(**{**_fields(entries["good"]), "status": "failed", "time": 0.5})]
    )
    # A file only a shard verified is expected and checked.
    extra = out / "s0001" / "extra.fits"
    make_fits(extra, 99)
    Manifest(state, shard="shard-1-of-2").append_entries(
        [
            ManifestEntry(
                url="https://archive.example.org/extra.fits",
                path="s0001/extra.fits",
                status="verified",
                nbytes=extra.stat().st_size,
                md5=md5_of(extra),
                level="fits",
                time=2.0,
            )
        ]
    )
    report = check_mirror(out, Manifest(state), level=VerifyLevel.FITS)
    assert report.checked == 4  # good, truncated, deleted (main) + extra (shard 1)
    assert by_path(report) == {NAMES["flipped"]: "missing"}


def test_repair_records_appended_to_the_main_file_do_not_shift_the_shard_records(tmp_path: Path) -> None:
    out, _manifest, entries = build_mirror(tmp_path)
    state = out / ".tessmirror"
    Manifest(state, shard="shard-0-of-1").append_entries(
        [ManifestEntry(**{**_fields(entries["good"]), "time": 3.0})]
    )
    damage(out)
    report = check_mirror(out, Manifest(state), level=VerifyLevel.FITS, repair=True)
    assert report.checked == 4 and report.ok == 1
    assert Manifest(state).load()[entries["flipped"].key].status == "pending"
    assert Manifest(state).load()[entries["good"].key].status == "verified"


def test_a_folder_the_walk_cannot_list_stops_verify_with_a_local_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, manifest, _ = build_mirror(tmp_path)
    real_scandir = os.scandir
    broken = out / "tid" / "s0001"

    def scandir(path):  # EIO from a failing disk: root cannot be kept out by chmod, so it is injected
        if Path(path) == broken:
            raise OSError(errno.EIO, "Input/output error")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(LocalError) as info:
        check_mirror(out, manifest, level=VerifyLevel.SIZE)
    assert str(broken) in str(info.value) and "cannot list" in str(info.value)
    assert "Input/output error" in str(info.value)


@pytest.mark.parametrize(
    "name",
    ["x_lc.fits.part", "x_lc.fits.meta.part", "x_lc.fits.part.node01.12345", "x_lc.fits.part.n1.site.org.7"],
)
def test_parts_of_any_writer_are_neither_unexpected_nor_quarantined(tmp_path: Path, name: str) -> None:
    """A download in progress or interrupted, a plain run's or a cluster worker's (NAME.part.<host>.<pid>),
    is the next run's to continue: verify does not report it, --repair does not move it."""
    out, manifest, _ = build_mirror(tmp_path)
    part = out / NAMES["good"]
    part = part.with_name(name)
    part.write_bytes(b"in progress")
    report = check_mirror(out, manifest, level=VerifyLevel.SIZE, repair=True)
    assert report.problems == [] and report.intact
    assert part.read_bytes() == b"in progress"
