"""The machine refuses: a full disk, a read-only output directory or state directory, a second run.

Small tmpfs mounts stand in for a full or read-only filesystem (the tests run as root here and in CI;
they skip, saying why, where mounting is not permitted). Every case is the real CLI in a subprocess.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.archive import FaultPlan
from engine.exceptions import EXIT_INTERRUPTED, EXIT_LOCAL, EXIT_OK
from engine.manifest import MANIFEST_NAME, Manifest
from tests.helpers import (
    assert_mirror_matches_truth,
    assert_verified_records_are_good,
    run_cli,
    spawn_cli,
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
    assert "no space left" in message and str(out) in message, message
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


def test_second_run_on_the_same_output_refuses(archive, tmp_path: Path) -> None:
    arch = archive(
        sectors=(1,), targets=64, file_size="small", faults=FaultPlan.from_spec("bandwidth=150000")
    )
    out = tmp_path / "out"
    args = ["run", "--tap-url", arch.tap_url, "--sector", 1, "--out", out, "--concurrency", 2]
    first = spawn_cli(*args)
    try:
        lock = out / ".tessmirror" / "run.lock"
        for _ in range(400):
            if lock.exists() or first.poll() is not None:
                break
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended too soon"
        second = run_cli(*args)
        assert second.returncode == EXIT_LOCAL, second.stderr[-3000:]
        message = error_lines(second.stderr)
        assert f"pid {first.pid}" in message, message
        assert "Traceback" not in second.stderr
    finally:
        first.terminate()
        first.communicate(timeout=60)
    assert first.returncode == EXIT_INTERRUPTED
