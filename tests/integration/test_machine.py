"""The machine refuses: a full disk, a read-only output or state directory, a second run, a bad lock.

Small tmpfs mounts stand in for a full or read-only filesystem (the tests run as root here and in CI;
they skip, saying why, where mounting is not permitted). Every case is the real CLI in a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.archive import FaultPlan
from engine.exceptions import EXIT_INTERRUPTED, EXIT_LOCAL, EXIT_OK
from engine.manifest import MANIFEST_NAME, Manifest
from tests.helpers import (
    assert_mirror_matches_truth,
    assert_verified_records_are_good,
    manifest_lines,
    run_cli,
    spawn_cli,
    wait_until,
)

pytestmark = pytest.mark.integration


def light_curves(archive) -> set[str]:
    return {n for n, f in archive.catalog.files.items() if f.product == "lc" and f.collection == "TESS"}


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def tmpfs() -> Iterator[Callable[..., Path]]:
    """Factory: `tmpfs(path, "size=4m", "ro")` mounts a tmpfs there; all are unmounted afterwards."""
    mounted: list[Path] = []

    def mount(path: Path, *options: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        result = _mount("-t", "tmpfs", "-o", ",".join(options or ("size=4m",)), "tmpfs", str(path))
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        with contextlib.suppress(OSError):
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def error_lines(stderr: str) -> str:
    return "\n".join(line for line in stderr.splitlines() if line.startswith("tessmirror: "))


def test_full_disk_stops_with_the_path_and_resumes_after_space_is_freed(
    archive, tmpfs, tmp_path: Path
) -> None:
    arch = archive(sectors=(1,), targets=96, file_size="small")  # 96 x 55 kB: more than the 4 MB disk
    names = light_curves(arch)
    out = tmpfs(tmp_path / "disk", "size=4m") / "mirror"
    args = ["run", "--tap-url", arch.tap_url, "--sector", 1, "--out", out, "--concurrency", 4]

    # Without --force the free-space preflight refuses before the disk is touched.
    preflight = run_cli(*args)
    assert preflight.returncode == EXIT_LOCAL, preflight.stderr[-3000:]
    assert str(out) in error_lines(preflight.stderr)
    assert "--force" in error_lines(preflight.stderr)

    # With --force the disk really fills up mid-run.
    full = run_cli(*args, "--force")
    assert full.returncode == EXIT_LOCAL, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    message = error_lines(full.stderr)
    assert "no space left" in message.lower() and str(out) in message, message
    state = out / ".tessmirror"
    entries = Manifest(state).load()  # still loads
    kept = assert_verified_records_are_good(out, arch)
    assert 0 < kept < len(names)
    assert len(entries) >= kept

    # Space is freed (the filesystem grows): the same command resumes and completes.
    assert _mount("-o", "remount,size=32m", str(tmp_path / "disk")).returncode == 0
    arch.request_log.clear()
    resumed = run_cli(*args, "--force")
    assert resumed.returncode == EXIT_OK, resumed.stderr[-3000:]
    assert_mirror_matches_truth(out, arch, names)
    assert assert_verified_records_are_good(out, arch) == len(names)
    refetched = {r.name for r in arch.request_log if r.method == "GET"}
    verified_before = {Path(e.path).name for e in entries.values() if e.status == "verified"}
    assert not refetched & verified_before, "files verified before the disk filled were fetched again"


def test_read_only_output_directory_is_refused(archive, tmpfs, tmp_path: Path) -> None:
    arch = archive()
    out = tmpfs(tmp_path / "ro", "size=1m", "ro")
    result = run_cli("run", "--tap-url", arch.tap_url, "--sector", 1, "--out", out)
    assert result.returncode == EXIT_LOCAL, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    message = error_lines(result.stderr)
    assert str(out) in message and "read-only" in message, message
    assert not arch.request_log


def test_manifest_on_a_read_only_filesystem_is_refused(archive, tmpfs, tmp_path: Path) -> None:
    """The state directory (manifest, plan, lock) on a read-only mount, holding an earlier manifest."""
    arch = archive()
    state = tmp_path / "state"
    out = tmp_path / "out"
    args = ["run", "--tap-url", arch.tap_url, "--sector", 1, "--camera", 1, "--ccd", 1, "--out", out]
    first = run_cli(*args, "--state-dir", state)
    assert first.returncode == EXIT_OK, first.stderr[-3000:]
    # Make the same state directory read-only: a read-only bind mount over it.
    bound = _mount("--bind", str(state), str(state))
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount here (needs root or CAP_SYS_ADMIN): {bound.stderr.strip()}")
    try:
        assert _mount("-o", "remount,bind,ro", str(state)).returncode == 0
        before = (state / MANIFEST_NAME).read_bytes()
        result = run_cli(*args, "--state-dir", state, "--refresh-plan")
        assert result.returncode == EXIT_LOCAL, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        message = error_lines(result.stderr)
        assert str(state) in message and "read-only" in message, message
        assert (state / MANIFEST_NAME).read_bytes() == before
    finally:
        subprocess.run(["umount", "-l", str(state)], capture_output=True, check=False)


def _first_run_under_way(archive, tmp_path: Path, state_dir: Path | None = None):
    """Start a slow run and wait until it has verified a file (the manifest holds a record): the
    pipeline is running, its lock is held and its signal handlers are in place. Never timing."""
    # 64 small files at 50 kB/s each, two at a time: tens of seconds, far longer than the checks.
    arch = archive(sectors=(1,), targets=64, file_size="small", faults=FaultPlan.from_spec("bandwidth=50000"))
    out = tmp_path / "out"
    args = ["run", "--tap-url", arch.tap_url, "--sector", 1, "--out", out, "--concurrency", 2]
    first = spawn_cli(*args, *(("--state-dir", state_dir) if state_dir else ()))
    manifest = (state_dir or out / ".tessmirror") / MANIFEST_NAME
    started = wait_until(lambda: manifest_lines(manifest) >= 1 or first.poll() is not None, timeout=120)
    assert started and first.poll() is None, "the first run ended before it had verified a file"
    return first, args


def _stop(first: subprocess.Popen) -> None:
    first.terminate()
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == EXIT_INTERRUPTED, stderr[-3000:]


def test_second_run_on_the_same_output_refuses(archive, tmp_path: Path) -> None:
    first, args = _first_run_under_way(archive, tmp_path)
    try:
        second = run_cli(*args)
        assert second.returncode == EXIT_LOCAL, second.stderr[-3000:]
        message = error_lines(second.stderr)
        assert f"pid {first.pid}" in message, message
        assert "Traceback" not in second.stderr
        assert first.poll() is None, "the refused run must not disturb the first"
    finally:
        _stop(first)
    assert not (tmp_path / "out" / ".tessmirror" / "run.lock").exists(), "the lock was left behind"


def test_second_run_on_the_same_output_with_another_state_dir_refuses(archive, tmp_path: Path) -> None:
    """The lock belongs to the output directory: another --state-dir (another manifest) does not make
    a second writer of the same files acceptable."""
    first, args = _first_run_under_way(archive, tmp_path, tmp_path / "state-a")
    try:
        assert (tmp_path / "out" / ".tessmirror" / "run.lock").exists()
        second = run_cli(*args, "--state-dir", tmp_path / "state-b")
        assert second.returncode == EXIT_LOCAL, second.stderr[-3000:]
        message = error_lines(second.stderr)
        assert f"pid {first.pid}" in message and str(tmp_path / "out") in message, message
        assert not (tmp_path / "state-b" / MANIFEST_NAME).exists(), "the refused run wrote a manifest"
    finally:
        _stop(first)


def test_a_malformed_lock_is_a_clear_refusal_naming_the_file(archive, tmp_path: Path) -> None:
    arch = archive()
    out = tmp_path / "out"
    lock = out / ".tessmirror" / "run.lock"
    lock.parent.mkdir(parents=True)
    huge = json.dumps({"host": socket.gethostname(), "pid": 99999999999999999999})  # was exit 70
    for content in (huge, "not json at all"):
        lock.write_text(content)
        result = run_cli("run", "--tap-url", arch.tap_url, "--sector", 1, "--out", out)
        assert result.returncode == EXIT_LOCAL, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        message = error_lines(result.stderr)
        assert f"delete {lock}" in message, message
        assert lock.read_text() == content  # never removed on a guess
    assert not arch.request_log


def test_a_lock_left_by_a_restarted_container_is_taken_over(archive, tmp_path: Path) -> None:
    """The lock names this host and a pid now used by another process (pid 1 in a restarted
    container): its recorded start time does not match, so the run takes it over."""
    arch = archive()
    out = tmp_path / "out"
    lock = out / ".tessmirror" / "run.lock"
    lock.parent.mkdir(parents=True)
    stale = {"host": socket.gethostname(), "pid": 1, "started": "T0", "pid_start": "another-boot:1"}
    lock.write_text(json.dumps(stale))
    result = run_cli("run", "--tap-url", arch.tap_url, "--sector", 1, "--camera", 1, "--ccd", 1, "--out", out)
    assert result.returncode == EXIT_OK, result.stderr[-3000:]
    assert "stale lock" in result.stderr
    assert not lock.exists()


def test_a_requeued_slurm_job_takes_its_lock_back(archive, tmp_path: Path) -> None:
    arch = archive()
    out = tmp_path / "out"
    lock = out / ".tessmirror" / "run.lock"
    lock.parent.mkdir(parents=True)
    earlier = {"host": "node017", "pid": 4242, "started": "T0", "slurm_job_id": "777"}
    lock.write_text(json.dumps(earlier))
    args = ["run", "--tap-url", arch.tap_url, "--sector", 1, "--camera", 1, "--ccd", 1, "--out", out]
    other_job = run_cli(*args, env={"SLURM_JOB_ID": "778", "SLURM_RESTART_COUNT": "1"})
    assert other_job.returncode == EXIT_LOCAL, other_job.stderr[-3000:]
    assert "Slurm job 777" in error_lines(other_job.stderr)
    requeued = run_cli(*args, env={"SLURM_JOB_ID": "777", "SLURM_RESTART_COUNT": "1"})
    assert requeued.returncode == EXIT_OK, requeued.stderr[-3000:]
    assert "requeued" in requeued.stderr
    assert not lock.exists()
