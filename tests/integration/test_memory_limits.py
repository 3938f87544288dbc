"""Tight memory limits, as on a login node: a run under `ulimit -v` either succeeds or stops cleanly.

Measured on the 2-core test machine for a 60-file run (full-size light curves) against the local
archive: peak RSS about 105 MB; address space (VmPeak) 1.1 GB with glibc's default malloc arenas and
about 0.41 GB with two (the CLI now caps them itself unless MALLOC_ARENA_MAX is set). The lowest
`ulimit -v` that passed was 375,000 kB; below it the run stops with exit 4 and one line.

Each case runs the real CLI with RLIMIT_AS set in the child only (the archive runs in this process,
unlimited) and asserts: exit 0, or exit 4 with one error line; never an abort (134), a signal death
or a hang; the manifest loads; the lock is released; no traceback.
"""

from __future__ import annotations

import os
import resource
import subprocess
from pathlib import Path

import pytest

from engine.exceptions import EXIT_LOCAL, EXIT_OK
from engine.manifest import MANIFEST_NAME, Manifest
from tests.helpers import cli_command, lock_files

pytestmark = pytest.mark.integration

FOOTPRINT = ("--sector", "1", "--camera", "1", "--ccd", "2")
HANG_BOUND = 240  # seconds: far beyond the 2 s such a run takes; reaching it means a hang


def run_limited(args: list[object], limit_kb: int, env: dict[str, str] | None = None):
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_kb * 1024, limit_kb * 1024))

    return subprocess.run(
        cli_command(*args),
        capture_output=True,
        text=True,
        timeout=HANG_BOUND,
        env={**os.environ, **(env or {})},
        preexec_fn=limit,  # only setrlimit, in the child
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def archive60(tmp_path_factory: pytest.TempPathFactory):
    from engine.archive import ArchiveOptions, ArchiveThread

    with ArchiveThread(
        ArchiveOptions(sectors=(1,), targets=60, file_size="full", focus=(1, 1, 2))
    ) as running:
        yield running.archive


@pytest.mark.parametrize(
    ("limit_kb", "arenas"),
    [
        (200_000, None),
        (300_000, None),
        (350_000, "2"),
        (450_000, None),
        (1_500_000, None),
        (1_500_000, "2"),
    ],
    ids=["200MB", "300MB", "350MB-arenas2", "450MB", "1.5GB", "1.5GB-arenas2"],
)
def test_a_run_under_a_memory_limit_succeeds_or_stops_with_exit_4_and_one_line(
    archive60, tmp_path: Path, limit_kb: int, arenas: str | None
) -> None:
    out = tmp_path / "out"
    env = {"MALLOC_ARENA_MAX": arenas} if arenas else {}
    result = run_limited(["run", "--tap-url", archive60.tap_url, *FOOTPRINT, "--out", out], limit_kb, env)

    assert result.returncode in (EXIT_OK, EXIT_LOCAL), f"exit {result.returncode}:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr and "Fatal Python error" not in result.stderr
    assert not lock_files(out), "the lock is released"
    state = out / ".tessmirror"
    if (state / MANIFEST_NAME).exists():
        Manifest(state).load()
    if result.returncode == EXIT_LOCAL:
        errors = [line for line in result.stderr.splitlines() if line.startswith("tessmirror: error:")]
        assert len(errors) == 1, result.stderr[-3000:]
        assert "memory" in errors[0] or "thread" in errors[0]
    else:
        assert "downloaded  60" in result.stderr
    if limit_kb >= 450_000:
        assert result.returncode == EXIT_OK, "450 MB of address space is enough for this run"


def test_a_run_stopped_by_the_memory_limit_resumes_when_the_limit_is_lifted(
    archive60, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["run", "--tap-url", archive60.tap_url, *FOOTPRINT, "--out", out]
    run_limited(args, 300_000)
    resumed = run_limited(args, 1_500_000)
    assert resumed.returncode == EXIT_OK, resumed.stderr[-3000:]
    entries = Manifest(out / ".tessmirror").load()
    assert sum(e.status == "verified" for e in entries.values()) == 60
