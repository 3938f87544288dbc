"""The mirror pipeline end to end, as a user runs it: the real CLI in a subprocess against the local
archive, and the Python API in-process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.api import mirror_async
from engine.archive.faults import FaultPlan
from engine.manifest import Manifest
from engine.plan.table import load_plan
from tests.helpers import (
    assert_mirror_matches_truth,
    assert_verified_records_are_good,
    cli_command,
    lc_names_in_footprint,
    manifest_lines,
    mirrored_files,
    run_cli,
    spawn_cli,
    wait_until,
)

pytestmark = pytest.mark.integration

FOOTPRINT = ("--sector", "1", "--camera", "1", "--ccd", "2")


def test_a_full_run_mirrors_the_footprint_verified_against_the_artifact_table(archive, tmp_path):
    arc = archive(targets=96)
    expected = lc_names_in_footprint(arc, 1, 1, 2)
    assert len(expected) >= 4
    out = tmp_path / "mirror"
    proc = run_cli("run", "--tap-url", arc.tap_url, *FOOTPRINT, "--out", out, "--progress-interval", "0")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert_mirror_matches_truth(out, arc, expected)
    assert set(mirrored_files(out)) == expected  # nothing more than the footprint's light curves
    # The summary tells the truth, and batch output has plain progress lines instead of a bar.
    assert f"downloaded  {len(expected)}" in proc.stderr
    assert "failed      0" in proc.stderr
    assert "progress:" in proc.stderr
    # MAST's directory layout, the manifest records the level and the md5, the plan is saved.
    some = next(iter(mirrored_files(out).values()))
    assert some.relative_to(out).parts[0] == "tid"
    entries = Manifest(out / ".tessmirror").load()
    assert {e.status for e in entries.values()} == {"verified"}
    assert {e.level for e in entries.values()} == {"fits"}
    assert all(e.checksum_declared for e in entries.values())
    assert len(load_plan(out / ".tessmirror" / "plan.ecsv")) == len(expected)

    status = run_cli("status", "--out", out)
    assert status.returncode == 0 and f"verified    {len(expected)}" in status.stdout

    # Run again: nothing is fetched, TAP is not asked again, exit 0.
    before = len(arc.request_log)
    again = run_cli("run", "--tap-url", arc.tap_url, *FOOTPRINT, "--out", out)
    assert again.returncode == 0, again.stderr
    assert len(arc.request_log) == before
    assert f"skipped     {len(expected)}" in again.stderr


def test_kill_minus_nine_mid_run_then_resume_never_downloads_a_recorded_file_again(archive, tmp_path):
    # Slow responses so the kill lands mid-run: 0.15 s to first byte, a capped rate.
    arc = archive(targets=160, faults=FaultPlan.from_spec("latency=0.15,bandwidth=400000"))
    expected = lc_names_in_footprint(arc, 1, 1, 2)
    out = tmp_path / "mirror"
    args = ("run", "--tap-url", arc.tap_url, *FOOTPRINT, "--out", out, "--concurrency", "2")
    proc = spawn_cli(*args)
    manifest = out / ".tessmirror" / "manifest.jsonl"
    assert wait_until(lambda: manifest_lines(manifest) >= 3, timeout=90), "no downloads within 90 s"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL

    assert_verified_records_are_good(out, arc)
    done_before = {
        Path(e.path).name for e in Manifest(out / ".tessmirror").load().values() if e.status == "verified"
    }
    assert 3 <= len(done_before) < len(expected), "the kill should land mid-run"
    log_mark = len(arc.request_log)

    arc.faults = FaultPlan()
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert_mirror_matches_truth(out, arc, expected)
    fetched_after = {record.name for record in arc.request_log[log_mark:]}
    assert not (fetched_after & done_before), "a file recorded as complete was downloaded again"
    assert fetched_after == expected - done_before


def test_planning_at_a_low_row_limit_still_returns_the_whole_inventory(archive, tmp_path):
    arc = archive(targets=192, tap_hard_limit=3, tap_default_maxrec=3)
    expected = lc_names_in_footprint(arc, 1, 1, 2)
    assert len(expected) > 3 * 2, "the inventory must span several pages"
    plan_file = tmp_path / "plan.ecsv"
    proc = run_cli("plan", "--tap-url", arc.tap_url, *FOOTPRINT, "--format", "ecsv", "-o", plan_file)
    assert proc.returncode == 0, proc.stderr
    plan = load_plan(plan_file)
    assert sorted(plan["filename"]) == sorted(expected)  # complete, and no duplicates


def test_plan_exports_feed_other_downloaders(archive, tmp_path):
    arc = archive(targets=48)
    expected = lc_names_in_footprint(arc, 1, 1, 2)
    urls = run_cli("plan", "--tap-url", arc.tap_url, *FOOTPRINT, "--format", "urls")
    assert urls.returncode == 0, urls.stderr
    lines = [line for line in urls.stdout.splitlines() if line.strip()]
    assert len(lines) == len(expected) and all(line.startswith(arc.base_url) for line in lines)
    aria2 = run_cli("plan", "--tap-url", arc.tap_url, *FOOTPRINT, "--format", "aria2")
    md5s = {arc.catalog[name].md5 for name in expected}
    assert {line.split("md5=")[1] for line in aria2.stdout.splitlines() if "checksum=md5=" in line} == md5s

    # And the URL list goes straight back into `fetch`.
    url_file = tmp_path / "urls.txt"
    url_file.write_text("# light curves\n" + urls.stdout)
    out = tmp_path / "fetched"
    fetched = run_cli("fetch", "--input", url_file, "--out", out, "--layout", "flat")
    assert fetched.returncode == 0, fetched.stderr
    assert set(os.listdir(out)) - {".tessmirror"} == expected
    assert_mirror_matches_truth(out, arc, expected)


def test_the_python_api_returns_a_table_row_per_file(archive, tmp_path):
    arc = archive(targets=48)
    expected = lc_names_in_footprint(arc, 1, 1, 2)
    results = asyncio.run(
        mirror_async(
            tap_url=arc.tap_url, sector=1, camera=1, ccd=2, out_dir=tmp_path / "api", verify="checksum"
        )
    )
    assert sorted(results["filename"]) == sorted(expected)
    assert set(results["status"]) == {"verified"}
    assert results.meta["exit_code"] == 0 and results.meta["downloaded"] == len(expected)
    assert all((tmp_path / "api" / path).is_file() for path in results["path"])


def test_sigterm_stops_gracefully_and_the_next_run_completes(archive, tmp_path):
    arc = archive(targets=320, faults=FaultPlan.from_spec("latency=0.3"))
    expected = lc_names_in_footprint(arc, 1, 1, 2)
    out = tmp_path / "mirror"
    args = ("run", "--tap-url", arc.tap_url, *FOOTPRINT, "--out", out, "--concurrency", "2")
    proc = spawn_cli(*args)
    manifest = out / ".tessmirror" / "manifest.jsonl"
    assert wait_until(lambda: manifest_lines(manifest) >= 1, timeout=90), "no downloads within 90 s"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    lines = manifest.read_bytes().splitlines()
    assert all(json.loads(line) for line in lines)  # flushed whole
    arc.faults = FaultPlan()
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert_mirror_matches_truth(out, arc, expected)


def test_the_demo_runs_twice_and_the_second_run_resumes(tmp_path):
    import socket

    with socket.socket() as probe:  # a free port, kept by the demo across both runs
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "demo"
    args = ("demo", "--out", out, "--targets", 32, "--file-size", "small", "--port", port)
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    planned = int(first.stderr.split("planned")[1].split()[0])
    assert planned >= 32 and f"downloaded  {planned}" in first.stderr
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    assert f"skipped     {planned}" in second.stderr and "downloaded  0" in second.stderr


def test_the_demo_mirrors_from_the_archives_bucket_with_source_s3(tmp_path):
    """`demo --source s3`: the archive also serves its S3-shaped bucket, and every file comes from it."""
    out = tmp_path / "demo"
    args = ("demo", "--out", out, "--targets", 24, "--file-size", "small", "--port", 0, "--source", "s3")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    planned = int(result.stderr.split("planned")[1].split()[0])
    assert planned >= 24 and f"downloaded  {planned}" in result.stderr
    assert "source s3" in result.stderr
    check = run_cli("verify", "--out", out)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_plan_is_saved_when_planning_ends_not_when_downloads_do(archive, tmp_path):
    """Planning runs at the archive's pace: the plan file is complete while most files still wait."""
    # Every target in the footprint, and TAP pages of 20 rows: planning takes several pages, while
    # the download queue holds only 2 x concurrency files.
    arc = archive(
        targets=160,
        focus=(1, 1, 2),
        tap_hard_limit=20,
        tap_default_maxrec=20,
        faults=FaultPlan.from_spec("bandwidth=60000"),
    )
    expected = lc_names_in_footprint(arc, 1, 1, 2)
    out = tmp_path / "mirror"
    args = ("run", "--tap-url", arc.tap_url, *FOOTPRINT, "--out", out, "--concurrency", "2")
    proc = spawn_cli(*args)
    plan = out / ".tessmirror" / "plan.ecsv"
    manifest = out / ".tessmirror" / "manifest.jsonl"
    try:
        assert wait_until(lambda: plan.exists() or proc.poll() is not None, timeout=90)
        assert proc.poll() is None, "the run ended before its plan was saved"
        records_when_saved = manifest_lines(manifest)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert records_when_saved < len(expected) // 2, "the plan was held back by the downloads"
    assert len(load_plan(plan)) == len(expected)

    # Resumed after the kill while every TAP job fails: the saved plan is enough.
    arc.faults = FaultPlan.from_spec("tap_error=1")
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the saved plan" in resumed.stderr
    assert_mirror_matches_truth(out, arc, expected)


def test_plan_temp_files_left_by_a_kill_are_removed_at_the_next_start(archive, tmp_path):
    arc = archive(targets=32)
    out = tmp_path / "mirror"
    state = out / ".tessmirror"
    state.mkdir(parents=True)
    stale = state / ".plan.ecsv.k1ll3d.tmp"
    stale.write_text("# %ECSV 1.0\n")
    result = run_cli("run", "--tap-url", arc.tap_url, *FOOTPRINT, "--out", out)
    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    assert (state / "plan.ecsv").exists()


def test_input_from_a_pipe_is_read_once_and_streamed(archive, tmp_path):
    """`--input -` and `--input /dev/stdin`: the URL list arrives through a pipe, read once."""
    arc = archive(targets=32)
    plan = tmp_path / "plan.ecsv"
    exported = run_cli("plan", "--tap-url", arc.tap_url, *FOOTPRINT, "--format", "urls", "-o", plan)
    assert exported.returncode == 0, exported.stderr
    urls = plan.read_text()
    for name, source in (("dash", "-"), ("devstdin", "/dev/stdin")):
        out = tmp_path / name
        proc = subprocess.run(
            cli_command("fetch", "--input", source, "--out", out),
            input=urls,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"planned     {len(urls.split())}" in proc.stderr, proc.stderr[-2000:]
        assert len(mirrored_files(out)) == len(urls.split())


def test_an_interrupt_in_the_python_api_cancels_the_run_cleanly(archive, tmp_path):
    """The API installs no handlers: Ctrl-C in `mirror()` cancels the run, flushes, releases the lock."""
    arc = archive(targets=64, focus=(1, 1, 2), faults=FaultPlan.from_spec("bandwidth=100000"))
    out = tmp_path / "api"
    # The interpreter a user presses Ctrl-C in has Python's own SIGINT handler. A process started in
    # the background by a non-interactive shell (`bash .ci/run &`) inherits SIGINT ignored, and so
    # would this child: the signal never reached it, and `mirror` ran to its end (exit 5).
    script = (
        "import signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from engine import mirror\n"
        "try:\n"
        f"    mirror(tap_url={arc.tap_url!r}, sector=1, camera=1, ccd=2,\n"
        f"           out_dir={str(out)!r}, concurrency=2)\n"
        "except KeyboardInterrupt:\n"
        "    print('KeyboardInterrupt reached the caller', flush=True)\n"
        "    sys.exit(0)\n"
        "sys.exit(5)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    manifest = out / ".tessmirror" / "manifest.jsonl"
    try:
        assert wait_until(lambda: manifest_lines(manifest) >= 2 or proc.poll() is not None, timeout=90)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert "KeyboardInterrupt reached the caller" in stdout
    assert not list(out.rglob("run.lock")), "the lock is released"
    recorded = assert_verified_records_are_good(out, arc)
    assert 2 <= recorded < len(lc_names_in_footprint(arc, 1, 1, 2))  # the run was cut short
