"""Working with what is already there, through the real CLI against the local archive: every export
format as `fetch --input`, a manifest keyed by file (a new URL is not a new file, an old URL-keyed
manifest is upgraded), files already on disk adopted (a lost manifest batch, a lightkurve cache), and
a mirror updated after the archive reprocessed and withdrew files."""

from __future__ import annotations

import json
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest

from engine.manifest import Manifest, ManifestEntry
from tests.helpers import (
    assert_mirror_matches_truth,
    cli_command,
    lc_names_in_footprint,
    md5_of,
    mirrored_files,
    run_cli,
)

pytestmark = pytest.mark.integration

FOOTPRINT = ("--sector", "1", "--camera", "1", "--ccd", "2")


def file_requests(arc) -> int:
    """GETs of files the archive answered (HEADs and TAP queries are not file transfers)."""
    return sum(1 for record in arc.request_log if record.method == "GET")


def plan_to(arc, fmt: str, path: Path) -> None:
    proc = run_cli("plan", "--tap-url", arc.tap_url, *FOOTPRINT, "--format", fmt, "-o", path)
    assert proc.returncode == 0, proc.stderr


def fetch(source: Path | str, out: Path, *, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cli_command("fetch", "--input", source, "--out", out, "--progress-interval", "0"),
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=180,
    )
    assert "Traceback" not in proc.stderr.decode(), proc.stderr.decode()
    return proc


@pytest.fixture
def footprint(archive):
    arc = archive(targets=48)
    expected = lc_names_in_footprint(arc, 1, 1, 2)
    assert len(expected) >= 3
    return arc, expected


def test_every_export_format_round_trips_through_fetch_to_byte_identical_files(footprint, tmp_path):
    arc, expected = footprint
    for fmt in ("ecsv", "csv", "votable", "urls", "aria2", "curl"):
        exported = tmp_path / f"plan-{fmt}.out"  # the name says nothing: the content decides
        plan_to(arc, fmt, exported)
        out = tmp_path / f"mirror-{fmt}"
        proc = fetch(exported, out)
        assert proc.returncode == 0, (fmt, proc.stderr.decode())
        assert_mirror_matches_truth(out, arc, expected)
        assert set(mirrored_files(out)) == expected, fmt
    # Standard input, read once: a streamed format, and a VOTable (spooled under the state dir).
    for fmt in ("aria2", "votable"):
        out = tmp_path / f"stdin-{fmt}"
        proc = fetch("-", out, stdin=(tmp_path / f"plan-{fmt}.out").read_bytes())
        assert proc.returncode == 0, (fmt, proc.stderr.decode())
        assert_mirror_matches_truth(out, arc, expected)
        assert not list((out / ".tessmirror").glob(".input.*"))  # the spooled copy was removed


def test_a_mast_style_curl_script_is_fetched(footprint, tmp_path):
    arc, expected = footprint
    script = tmp_path / "tesscurl_sector_1_lc.sh"
    lines = ["#!/bin/sh"]
    for name in sorted(expected):
        entry = arc.catalog[name]
        lines.append(f"curl -C - -L -o {name} {arc.base_url}/api/v0.1/Download/file?uri={entry.uri}")
    script.write_text("\n".join(lines) + "\n")
    out = tmp_path / "mirror"
    proc = fetch(script, out)
    assert proc.returncode == 0, proc.stderr.decode()
    assert_mirror_matches_truth(out, arc, expected)


def test_a_plan_whose_urls_moved_to_the_path_form_fetches_nothing_again(footprint, tmp_path):
    arc, expected = footprint
    plan = tmp_path / "plan.ecsv"
    plan_to(arc, "ecsv", plan)
    out = tmp_path / "mirror"
    assert fetch(plan, out).returncode == 0
    before = file_requests(arc)
    moved = plan.read_text()
    for name in expected:
        entry = arc.catalog[name]
        moved = moved.replace(
            f"{arc.base_url}/api/v0.1/Download/file?uri={entry.uri}", f"{arc.base_url}/files/{entry.path}"
        )
    assert "Download/file" not in moved
    (tmp_path / "moved.ecsv").write_text(moved)
    proc = fetch(tmp_path / "moved.ecsv", out)
    assert proc.returncode == 0, proc.stderr.decode()
    assert file_requests(arc) == before
    assert f"skipped     {len(expected)}" in proc.stderr.decode()


def test_a_lost_manifest_batch_after_the_renames_is_adopted_same_inode_same_mtime(footprint, tmp_path):
    """What kill -9 between renaming files into place and flushing the manifest's batch leaves: the
    files whole on disk, fewer records. Made deterministic by cutting a complete manifest back."""
    arc, expected = footprint
    plan = tmp_path / "plan.ecsv"
    plan_to(arc, "ecsv", plan)
    out = tmp_path / "mirror"
    assert fetch(plan, out).returncode == 0
    manifest = out / ".tessmirror" / "manifest.jsonl"
    manifest.write_bytes(b"".join(manifest.read_bytes().splitlines(keepends=True)[:1]))
    before = {name: path.stat() for name, path in mirrored_files(out).items()}
    requests = file_requests(arc)
    proc = fetch(plan, out)
    assert proc.returncode == 0, proc.stderr.decode()
    assert file_requests(arc) == requests  # not one file fetched again
    assert f"adopted     {len(expected) - 1}" in proc.stderr.decode()
    for name, path in mirrored_files(out).items():
        now = path.stat()
        assert (now.st_ino, now.st_mtime_ns) == (before[name].st_ino, before[name].st_mtime_ns)
    entries = Manifest(out / ".tessmirror").load()
    assert len(entries) == len(expected) and {e.status for e in entries.values()} == {"verified"}
    assert {e.level for e in entries.values()} == {"fits"}


def test_an_old_url_keyed_manifest_is_upgraded_and_nothing_is_fetched_again(footprint, tmp_path):
    arc, expected = footprint
    plan = tmp_path / "plan.ecsv"
    plan_to(arc, "ecsv", plan)
    out = tmp_path / "mirror"
    assert fetch(plan, out).returncode == 0
    manifest = out / ".tessmirror" / "manifest.jsonl"
    legacy = []
    for line in manifest.read_bytes().splitlines():
        rec = json.loads(line)["rec"]
        for name in ("key", "size", "declared_md5", "origin"):  # what versions before keys wrote
            rec.pop(name, None)
        payload = json.dumps(rec, separators=(",", ":")).encode()
        legacy.append(b'{"crc":"%08x","rec":%s}\n' % (zlib.crc32(payload), payload))
    manifest.write_bytes(b"".join(legacy))
    requests = file_requests(arc)
    proc = fetch(plan, out)
    assert proc.returncode == 0, proc.stderr.decode()
    assert file_requests(arc) == requests
    lines = manifest.read_bytes().splitlines()
    assert len(lines) == len(expected)  # rewritten with keys, not appended to
    assert all(json.loads(line)["rec"]["key"].endswith(".fits") for line in lines)


def test_a_refreshed_mirror_refetches_exactly_the_reprocessed_files_keeps_old_copies_lists_withdrawn(
    footprint, tmp_path
):
    arc, expected = footprint
    out = tmp_path / "mirror"
    first = run_cli("run", "--tap-url", arc.tap_url, *FOOTPRINT, "--out", out, "--progress-interval", "0")
    assert first.returncode == 0, first.stderr
    state = out / ".tessmirror"
    manifest = Manifest(state)
    entries = {e.path.rsplit("/", 1)[-1]: e for e in manifest.load().values()}
    # The mirror holds older versions of two files (other bytes, recorded as verified then) and a file
    # the archive has since withdrawn: what the archive reprocessing two files and withdrawing one
    # looks like from the mirror's side.
    changed = sorted(expected)[:2]
    old_bytes = {}
    records = []
    for name in changed:
        path = out / entries[name].path
        old_bytes[name] = b"SIMPLE  = " + b"old version " * 300
        path.write_bytes(old_bytes[name])
        records.append(
            ManifestEntry(
                url=entries[name].url,
                path=entries[name].path,
                status="verified",
                obs_id=entries[name].obs_id,
                nbytes=len(old_bytes[name]),
                md5=md5_of(path),
                level="fits",
                key=entries[name].key,
            )
        )
    gone = out / "tid" / "s0001" / "withdrawn-s0001-0000000000000001-0120-s_lc.fits"
    gone.parent.mkdir(parents=True, exist_ok=True)
    gone.write_bytes(b"SIMPLE  = withdrawn")
    records.append(
        ManifestEntry(
            url=f"{arc.base_url}/files/gone",
            path=str(gone.relative_to(out)),
            status="verified",
            obs_id="tess-withdrawn",
            nbytes=19,
            key="tess-withdrawn/" + gone.name,
        )
    )
    manifest.append_entries(records)
    requests = len(arc.request_log)
    refresh = ("--refresh-plan", "--progress-interval", "0")
    again = run_cli("run", "--tap-url", arc.tap_url, *FOOTPRINT, "--out", out, *refresh)
    assert again.returncode == 0, again.stderr
    fetched = sorted(record.name for record in arc.request_log[requests:] if record.method == "GET")
    assert fetched == changed
    assert_mirror_matches_truth(out, arc, expected)
    for name in changed:  # the old copies are kept, never deleted
        assert (state / "superseded" / entries[name].path).read_bytes() == old_bytes[name]
    assert gone.read_bytes() == b"SIMPLE  = withdrawn"
    assert "withdrawn   1" in again.stderr and gone.name in again.stderr
    assert f"tess-withdrawn/{gone.name}" in (state / "withdrawn.txt").read_text()
    assert "changed 2" in again.stderr
    status = run_cli("status", "--out", out)
    assert "withdrawn   1" in status.stdout, status.stdout


def test_a_lightkurve_cache_seeds_a_mirror_with_no_file_request_and_a_bad_file_is_quarantined(
    footprint, tmp_path
):
    arc, expected = footprint
    plan = tmp_path / "plan.ecsv"
    plan_to(arc, "ecsv", plan)
    donor = tmp_path / "donor"
    assert fetch(plan, donor).returncode == 0
    obs_of = {e.path.rsplit("/", 1)[-1]: e.obs_id for e in Manifest(donor / ".tessmirror").load().values()}
    cache = tmp_path / "home" / ".lightkurve" / "cache"
    for name, path in mirrored_files(donor).items():  # astroquery/lightkurve's layout
        seed = cache / "mastDownload" / "TESS" / obs_of[name] / name
        seed.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, seed)
    names = sorted(expected)
    corrupt_seed = next(cache.rglob(names[0]))
    data = bytearray(corrupt_seed.read_bytes())
    data[-1] ^= 0xFF
    corrupt_seed.write_bytes(bytes(data))
    next(cache.rglob(names[1])).unlink()  # not in the cache: a damaged copy in place must be fetched
    out = tmp_path / "mirror"
    # A file already at its place in the mirror but damaged: quarantined, then fetched.
    bad_in_place = out / mirrored_files(donor)[names[1]].relative_to(donor)
    bad_in_place.parent.mkdir(parents=True, exist_ok=True)
    bad_in_place.write_bytes(b"SIMPLE  = truncated")

    requests = len(arc.request_log)
    proc = subprocess.run(
        cli_command("fetch", "--input", plan, "--out", out, "--adopt-from", cache, "--no-fsync"),
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    fetched = sorted(record.name for record in arc.request_log[requests:] if record.method == "GET")
    assert fetched == sorted(names[:2])  # the corrupt seed and the damaged file only
    assert f"adopted     {len(expected) - 2}" in proc.stderr, proc.stderr[-2000:]
    assert "downloaded  2" in proc.stderr, proc.stderr[-2000:]
    assert "quarantined 1" in proc.stderr, proc.stderr[-2000:]
    assert_mirror_matches_truth(out, arc, expected)
    assert (out / ".tessmirror" / "quarantine" / bad_in_place.relative_to(out)).read_bytes() == (
        b"SIMPLE  = truncated"
    )
    assert corrupt_seed.read_bytes() == bytes(data)  # the user's cache is never changed or moved
    adopted = mirrored_files(out)[names[2]]
    assert adopted.stat().st_ino != next(cache.rglob(names[2])).stat().st_ino  # a copy, not a link
    assert len(list(cache.rglob("*.fits"))) == len(expected) - 1


def test_adopt_from_with_link_hard_links_the_found_files(footprint, tmp_path):
    """`--link`: the mirror's files share the cache's inodes (no extra space), and are verified."""
    arc, expected = footprint
    plan = tmp_path / "plan.ecsv"
    plan_to(arc, "ecsv", plan)
    donor = tmp_path / "donor"
    assert fetch(plan, donor).returncode == 0
    out = tmp_path / "mirror"
    requests = len(arc.request_log)
    proc = run_cli("fetch", "--input", plan, "--out", out, "--adopt-from", donor, "--link")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [r for r in arc.request_log[requests:] if r.method == "GET"]
    donor_files = mirrored_files(donor)
    for name, path in mirrored_files(out).items():
        assert path.stat().st_ino == donor_files[name].stat().st_ino
    assert_mirror_matches_truth(out, arc, expected)
