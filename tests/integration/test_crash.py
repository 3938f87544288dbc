"""Crashes: SIGKILL at random moments and resume; a torn manifest; SIGTERM and SIGINT.

Every run is the real CLI in a subprocess. After each kill the test checks what a user would rely on:
the manifest loads, and no file it calls verified is missing or corrupt. The final run completes and
the mirror is byte-identical to the archive's truth.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

from engine.archive import FaultPlan
from engine.exceptions import EXIT_INTERRUPTED, EXIT_OK
from engine.manifest import MANIFEST_NAME, Manifest
from tests.helpers import (
    WatchedCli,
    assert_mirror_matches_truth,
    assert_verified_records_are_good,
    lock_files,
    manifest_lines,
    run_cli,
    spawn_cli,
    wait_until,
)

pytestmark = pytest.mark.integration

KILL_ROUNDS = 10
# Each response is paced so a run lasts several seconds: kills land in planning, mid-body, mid-rename
# and mid-manifest-write alike.
PACED = "bandwidth=150000"


def light_curves(archive) -> set[str]:
    return {n for n, f in archive.catalog.files.items() if f.product == "lc" and f.collection == "TESS"}


def cli_args(arch, out: Path) -> list[object]:
    return ["run", "--tap-url", arch.tap_url, "--sector", 1, "--out", out, "--concurrency", 4]


def wait_for_records(manifest_path: Path, proc: subprocess.Popen, at_least: int, timeout: float = 60) -> None:
    """Block until the manifest holds `at_least` lines (downloads are under way)."""

    def ready() -> bool:
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1][-2000:]}"
        return manifest_lines(manifest_path) >= at_least

    assert wait_until(ready, timeout=timeout), f"no {at_least} manifest records within {timeout} s"


def kill_after_progress(cli: WatchedCli, out: Path, trigger: str, rng: random.Random) -> bool:
    """Wait for the observable progress `trigger` names, then SIGKILL; False if the run ended first.

    start-up: the start banner; plan: the saved plan file; records: the manifest grew by 1-6 lines.
    """
    state = out / ".tessmirror"
    before = manifest_lines(state / MANIFEST_NAME)
    ended = lambda: cli.proc.poll() is not None  # noqa: E731 - read at each poll
    if trigger == "start-up":
        reached = wait_until(lambda: cli.saw("starting run") or ended(), timeout=90)
    elif trigger == "plan":
        reached = wait_until(
            lambda: (state / "plan.ecsv").exists() or cli.proc.poll() is not None, timeout=90
        )
    else:
        grow = rng.randint(1, 6)
        reached = wait_until(
            lambda: manifest_lines(state / MANIFEST_NAME) >= before + grow or ended(),
            timeout=90,
        )
    assert reached, f"no {trigger} progress within 90 s:\n{cli.stderr[-3000:]}"
    if cli.proc.poll() is not None:
        return False
    cli.signal(signal.SIGKILL)
    return True


def test_kill_and_resume_in_a_loop(archive, tmp_path: Path) -> None:
    """SIGKILL in every phase, each kill after observable progress, never after a lucky sleep."""
    arch = archive(sectors=(1,), targets=160, file_size="small", faults=FaultPlan.from_spec(PACED))
    names = light_curves(arch)
    out = tmp_path / "out"
    rng = random.Random(int(os.environ.get("TESSMIRROR_KILL_SEED", "20240611")))
    # Most rounds kill mid-download (that is where progress is kept); some in start-up and planning.
    triggers = ["records"] * (KILL_ROUNDS - 3) + ["start-up", "plan", "start-up"]
    rng.shuffle(triggers)
    verified_after: list[int] = []
    kills = 0
    for trigger in triggers:
        cli = WatchedCli(*cli_args(arch, out))
        kills += kill_after_progress(cli, out, trigger, rng)
        cli.finish(timeout=60)
        # After every kill: the manifest loads and every record it calls verified is a good file.
        Manifest(out / ".tessmirror").load()
        verified_after.append(assert_verified_records_are_good(out, arch))
    assert kills >= KILL_ROUNDS - 2, "the runs finished before they could be killed: slow them down"
    assert verified_after[-1] > 0, "no progress was kept across the kills"

    final = run_cli(*cli_args(arch, out), timeout=180)
    assert final.returncode == EXIT_OK, final.stderr[-3000:]
    assert_mirror_matches_truth(out, arch, names)
    assert assert_verified_records_are_good(out, arch) == len(names)
    assert not list(out.rglob("*.part"))
    assert not list((out / ".tessmirror").glob(".plan.ecsv.*.tmp")), "plan temp files are cleaned up"


def test_torn_last_manifest_record_is_ignored_on_resume(archive, tmp_path: Path) -> None:
    """A manifest whose last record was cut mid-write: the CLI resumes, warns, and completes."""
    arch = archive(sectors=(1,), targets=40, file_size="small")
    names = light_curves(arch)
    out = tmp_path / "out"
    first = run_cli(*cli_args(arch, out))
    assert first.returncode == EXIT_OK, first.stderr[-3000:]
    manifest = out / ".tessmirror" / MANIFEST_NAME
    data = manifest.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    manifest.write_bytes(data[: last_start + (len(data) - last_start) // 2])  # half of the last line
    assert Manifest(out / ".tessmirror").load(), "a torn manifest still loads"
    arch.request_log.clear()

    second = run_cli(*cli_args(arch, out))

    assert second.returncode == EXIT_OK, second.stderr[-3000:]
    assert "torn or garbled" in second.stderr
    # The file whose record was torn is on disk and good: it is verified in place and adopted, never
    # fetched again; every other one is trusted from the manifest.
    assert not [r for r in arch.request_log if r.method == "GET"]
    assert "adopted     1" in second.stderr
    assert_mirror_matches_truth(out, arch, names)
    assert assert_verified_records_are_good(out, arch) == len(names)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_gracefully_and_the_next_run_resumes(archive, tmp_path: Path, signum: int) -> None:
    arch = archive(sectors=(1,), targets=64, file_size="small", faults=FaultPlan.from_spec(PACED))
    names = light_curves(arch)
    out = tmp_path / "out"
    manifest = out / ".tessmirror" / MANIFEST_NAME
    proc = spawn_cli(*cli_args(arch, out))
    wait_for_records(manifest, proc, at_least=5)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "run the same command again to resume" in stderr
    assert not lock_files(out), "a graceful stop releases the lock"
    done = {
        Path(e.path).name for e in Manifest(out / ".tessmirror").load().values() if e.status == "verified"
    }
    assert 0 < len(done) < len(names)
    assert assert_verified_records_are_good(out, arch) == len(done)
    arch.request_log.clear()

    resumed = run_cli(*cli_args(arch, out), timeout=120)

    assert resumed.returncode == EXIT_OK, resumed.stderr[-3000:]
    fetched = {r.name for r in arch.request_log if r.method == "GET"}
    assert not fetched & done, f"verified files were downloaded again: {sorted(fetched & done)[:3]}"
    assert fetched == names - done
    assert_mirror_matches_truth(out, arch, names)
