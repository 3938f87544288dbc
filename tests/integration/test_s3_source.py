"""`tessmirror run` from the local archive's S3-shaped bucket: every file verified from the bucket,
and with some keys left out, a fallback to MAST's Download API for exactly those (request logs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import assert_mirror_matches_truth, lc_names_in_footprint, mirrored_files, run_cli

pytestmark = pytest.mark.integration

FOOTPRINT = ("--sector", "1", "--camera", "1", "--ccd", "2")


def config(tmp_path: Path, source: str, endpoint: str) -> Path:
    # The --source/--s3-endpoint flags are the lead's to wire; the config keys work already.
    path = tmp_path / "tessmirror.toml"
    path.write_text(f'[fetch]\nsource = "{source}"\ns3_endpoint = "{endpoint}"\n')
    return path


@pytest.mark.parametrize("how", ["config", "flags"])
def test_source_s3_verifies_every_file_with_no_file_request_on_the_mast_route(archive, tmp_path, how):
    arc = archive(targets=96, s3=True, s3_multipart_fraction=0.3)
    expected = lc_names_in_footprint(arc, 1, 1, 2)
    assert len(expected) >= 4
    out = tmp_path / "mirror"
    if how == "config":
        choice: tuple[object, ...] = ("--config", config(tmp_path, "s3", arc.s3_url), "run")
    else:
        choice = ("run", "--source", "s3", "--s3-endpoint", arc.s3_url)
    proc = run_cli(
        *choice, "--tap-url", arc.tap_url, *FOOTPRINT, "--out", out, "--progress-interval", "0"
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert_mirror_matches_truth(out, arc, expected)
    assert set(mirrored_files(out)) == expected
    assert [r for r in arc.request_log if r.host == "api"] == []  # nothing from the Download API
    from_bucket = {r.name for r in arc.request_log if r.host == "s3" and r.status == 200}
    assert from_bucket == expected


def test_source_auto_falls_back_to_mast_for_exactly_the_keys_missing_from_the_bucket(archive, tmp_path):
    probe = archive(targets=96)
    missing = set(sorted(lc_names_in_footprint(probe, 1, 1, 2))[:3])
    arc = archive(targets=96, s3=True, s3_missing_names=tuple(missing), s3_missing_error="AccessDenied")
    expected = lc_names_in_footprint(arc, 1, 1, 2)
    assert missing <= expected
    out = tmp_path / "mirror"
    proc = run_cli(
        "--config", config(tmp_path, "auto", arc.s3_url), "run", "--tap-url", arc.tap_url, *FOOTPRINT,
        "--out", out, "--progress-interval", "0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert_mirror_matches_truth(out, arc, expected)
    assert {r.name for r in arc.request_log if r.host == "api"} == missing
    refused = [r for r in arc.request_log if r.host == "s3" and r.status == 403]
    assert sorted(r.name for r in refused) == sorted(missing)  # each asked of the bucket once
    assert {r.name for r in arc.request_log if r.host == "s3" and r.status == 200} == expected - missing


def test_source_s3_refuses_a_bucket_whose_path_lookup_disagrees_before_any_download(archive, tmp_path):
    """MAST's path_lookup names other keys than tessmirror computes: `--source s3` stops at plan time
    with one line (exit 2), before a single file request."""
    arc = archive(targets=48, s3=True, path_lookup_disagrees=True)
    proc = run_cli(
        "run", "--source", "s3", "--s3-endpoint", arc.s3_url, "--tap-url", arc.tap_url, *FOOTPRINT,
        "--out", tmp_path / "mirror", "--progress-interval", "0",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "path_lookup" in proc.stderr
    assert not [r for r in arc.request_log if r.method == "GET"]


def test_source_auto_uses_mast_for_the_run_when_path_lookup_disagrees(archive, tmp_path):
    arc = archive(targets=48, s3=True, path_lookup_disagrees=True)
    expected = lc_names_in_footprint(arc, 1, 1, 2)
    out = tmp_path / "mirror"
    proc = run_cli(
        "run", "--source", "auto", "--s3-endpoint", arc.s3_url, "--tap-url", arc.tap_url, *FOOTPRINT,
        "--out", out, "--progress-interval", "0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "downloading from MAST" in proc.stderr
    assert_mirror_matches_truth(out, arc, expected)
    assert not [r for r in arc.request_log if r.host == "s3"]
    assert {r.name for r in arc.request_log if r.host == "api" and r.status == 200} == expected


def test_an_archive_without_path_lookup_keeps_the_computed_keys_and_says_so_once(archive, tmp_path):
    arc = archive(targets=48, s3=True, path_lookup=False)
    expected = lc_names_in_footprint(arc, 1, 1, 2)
    out = tmp_path / "mirror"
    proc = run_cli(
        "run", "--source", "s3", "--s3-endpoint", arc.s3_url, "--tap-url", arc.tap_url, *FOOTPRINT,
        "--out", out, "--progress-interval", "0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("path_lookup") == 1, proc.stderr[-3000:]
    assert_mirror_matches_truth(out, arc, expected)
    assert {r.name for r in arc.request_log if r.host == "s3" and r.status == 200} == expected
