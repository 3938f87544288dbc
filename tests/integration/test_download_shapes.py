"""Downloads as MAST serves them, one shape at a time: each run ends with every file verified, at the
strongest level that file's metadata allows. And a plan whose rows collide, name the wrong file or
use unusable URLs: merged, failed and dropped, counted in the summary, never two workers on one path.

The CLI runs in a subprocess against the local archive, as a user would; the truth is the archive's
catalogue, never the planner's code.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from engine.manifest import Manifest
from tests.helpers import assert_mirror_matches_truth, lc_names_in_footprint, run_cli

pytestmark = pytest.mark.integration

SHAPE = {"sectors": (1,), "targets": 48, "file_size": "small", "focus": (1, 1, 2)}


def mirror_one_ccd(arch, tmp_path: Path, *extra: object) -> tuple[Path, object]:
    out = tmp_path / "out"
    result = run_cli(
        "run", "--tap-url", arch.tap_url, "--sector", 1, "--camera", 1, "--ccd", 2, "--out", out, *extra,
        timeout=300,
    )  # fmt: skip
    return out, result


def verified_records(out: Path) -> dict[str, dict]:
    records = {}
    for entry in Manifest(out / ".tessmirror").load().values():
        assert entry.status == "verified", f"{entry.path}: {entry.status} {entry.error}"
        records[Path(entry.path).name] = entry
    return records


def test_downloads_redirected_to_a_second_host_are_all_verified_from_that_host(archive, tmp_path):
    arch = archive(**SHAPE, redirect_to_s3=True)
    out, result = mirror_one_ccd(arch, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    names = lc_names_in_footprint(arch, 1, 1, 2)
    assert names
    assert_mirror_matches_truth(out, arch, names)
    assert set(verified_records(out)) == names
    gets = [r for r in arch.request_log if r.method == "GET" and r.name in names]
    by_host = Counter((r.host, r.status) for r in gets)
    assert by_host[("api", 302)] == len(names), by_host  # every file was redirected once...
    assert by_host[("s3", 200)] == len(names), by_host  # ...and its bytes came from the second host


def test_answers_without_content_length_are_streamed_and_verified(archive, tmp_path):
    arch = archive(**SHAPE, chunked_fraction=1.0)
    out, result = mirror_one_ccd(arch, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    names = lc_names_in_footprint(arch, 1, 1, 2)
    assert_mirror_matches_truth(out, arch, names)
    records = verified_records(out)
    assert set(records) == names
    assert all(entry.level == "fits" for entry in records.values())


def test_null_checksums_and_lengths_verify_by_fits_and_are_never_shown_as_checked(archive, tmp_path):
    arch = archive(**SHAPE, null_checksum_fraction=1.0, null_length_fraction=1.0)
    out, result = mirror_one_ccd(arch, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    names = lc_names_in_footprint(arch, 1, 1, 2)
    assert_mirror_matches_truth(out, arch, names)
    records = verified_records(out)
    assert set(records) == names
    for entry in records.values():
        assert entry.level == "fits"  # the strongest check that needs no declared md5
        assert entry.checksum_declared is False
        assert entry.md5 == arch.catalog[Path(entry.path).name].md5  # computed, and right


def test_a_plan_with_colliding_mismatched_and_unusable_rows_is_merged_failed_and_dropped(archive, tmp_path):
    """Plan rows (CSV, as `plan --format csv` writes): one file twice under two URL forms (merged), an
    ftp:// and a file:// row and a URL naming another file than its row (dropped), and a row that would
    put other bytes at the first file's path (failed, naming both URLs)."""
    arch = archive(sectors=(1,), targets=8, file_size="small", focus=(1, 1, 2))
    lcs = sorted(
        (f for f in arch.catalog.values() if f.product == "lc" and f.collection == "TESS"),
        key=lambda f: f.name,
    )
    first, second = lcs[0], lcs[1]
    base = arch.tap_url.split("/vo-tap/")[0]
    uri_url = f"{base}/api/v0.1/Download/file?uri={first.uri}"
    path_url = f"{base}/files/{first.path}"
    plan = tmp_path / "plan.csv"
    conflicting_url = f"{base}/mirror/{first.name}"  # names the file, declares other bytes
    rows = [
        "url,filename,obs_id,product,sector,size,est_kb,md5,target_name",
        f"{uri_url},{first.name},{first.obs_id},lc,1,{first.size},-1,{first.md5},",
        f"{path_url},{first.name},{first.obs_id},lc,1,{first.size},-1,{first.md5},",
        f"ftp://127.0.0.1/{second.name},{second.name},{second.obs_id},lc,1,{second.size},-1,{second.md5},",
        f"file:///etc/passwd,{second.name},{second.obs_id},lc,1,{second.size},-1,{second.md5},",
        f"{base}/files/{second.path},{first.name},{first.obs_id},lc,1,{first.size},-1,{first.md5},",
        f"{conflicting_url},{first.name},{first.obs_id},lc,1,{second.size},-1,{second.md5},",
    ]
    plan.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    result = run_cli("fetch", "--input", plan, "--out", out, timeout=300)
    text = result.stdout + result.stderr
    assert "Traceback" not in text
    assert result.returncode == 1, text[-3000:]  # some rows failed, each with its reason
    assert "merged" in text and "dropped" in text, text[-3000:]
    # The one good file arrived once, byte-identical; nothing else was written at its path.
    assert_mirror_matches_truth(out, arch, {first.name})
    gets = [r for r in arch.request_log if r.method == "GET" and r.status == 200]
    assert Counter(r.name for r in gets)[first.name] == 1, "two workers fetched one destination"
    # The conflict is recorded with both URLs named; the drops are counted by reason.
    entries = list(Manifest(out / ".tessmirror").iter_records())
    failures = [e for e in entries if e.status == "failed"]
    assert any(conflicting_url in e.error and "127.0.0.1" in e.error for e in failures), failures
    assert not list(out.rglob(second.name))
