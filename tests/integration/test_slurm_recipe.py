"""The Slurm recipe of docs/HPC.md, run word for word by bash, with Slurm's signal imitated.

`#SBATCH --signal=B:TERM@120` makes Slurm send SIGTERM to the batch shell only. The test does the same:
it starts the recipe with bash, waits until tessmirror has verified files (observable progress), then
signals the bash process alone. The script must pass the signal on, collect tessmirror's own exit code
(130), take the requeue branch, and leave a clean mirror: lock released, manifest intact.

The script is taken from the document itself (the block after the `slurm-recipe` marker), so the two
cannot drift apart. Its outside world is provided by the test: HOME holds the venv `activate` file and
the TOML config, SCRATCH is a temporary folder, and PATH holds `tessmirror` (this checkout's CLI) and a
`scontrol` that records its arguments instead of requeueing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.archive import FaultPlan
from engine.manifest import MANIFEST_NAME, Manifest
from tests.helpers import assert_verified_records_are_good, lock_files, manifest_lines, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- slurm-recipe"


def recipe() -> str:
    """The bash script of docs/HPC.md's Slurm recipe."""
    text = (ROOT / "docs" / "HPC.md").read_text(encoding="utf-8")
    after = text[text.index(MARKER) :]
    match = re.search(r"```bash\n(.*?)```", after, re.DOTALL)
    assert match, "docs/HPC.md has no bash block after the slurm-recipe marker"
    return match.group(1)


def fake_cluster(tmp_path: Path, tap_url: str) -> tuple[dict[str, str], Path]:
    """HOME, SCRATCH and PATH for the recipe; returns (environment, the file scontrol writes)."""
    home = tmp_path / "home"
    (home / "tessmirror" / ".venv" / "bin").mkdir(parents=True)
    (home / "tessmirror" / ".venv" / "bin" / "activate").write_text(
        "# the test's PATH stands in for a venv\n"
    )
    (home / "tess").mkdir()
    (home / "tess" / "s1.toml").write_text(
        f'[tap]\nurl = "{tap_url}"\n\n[selection]\nsector = 1\ncameras = [1]\nccds = [2]\n\n'
        "[fetch]\nconcurrency = 2\n"
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tessmirror = bin_dir / "tessmirror"
    tessmirror.write_text(f'#!/bin/sh\ncd {ROOT}\nexec {sys.executable} -m engine.cli "$@"\n')
    requeued = tmp_path / "requeued.txt"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {requeued}\n')
    for tool in (tessmirror, scontrol):
        tool.chmod(0o755)
    env = {
        **os.environ,
        "HOME": str(home),
        "SCRATCH": str(tmp_path / "scratch"),
        "SLURM_JOB_ID": "4242",
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    }
    return env, requeued


def test_the_slurm_recipe_forwards_slurms_sigterm_and_requeues_on_130(archive, tmp_path: Path) -> None:
    arch = archive(sectors=(1,), targets=64, focus=(1, 1, 2), faults=FaultPlan.from_spec("bandwidth=100000"))
    env, requeued = fake_cluster(tmp_path, arch.tap_url)
    script = tmp_path / "tess-s1.sbatch"
    script.write_text(recipe())
    out = tmp_path / "scratch" / "tess" / "s1"
    manifest = out / ".tessmirror" / MANIFEST_NAME

    shell = subprocess.Popen(
        ["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        progressed = wait_until(lambda: manifest_lines(manifest) >= 3 or shell.poll() is not None, timeout=90)
        assert progressed and shell.poll() is None, "tessmirror made no progress under the recipe"
        shell.send_signal(signal.SIGTERM)  # Slurm's --signal=B:TERM: the batch shell only
        sent = time.monotonic()
        stdout, stderr = shell.communicate(timeout=60)
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.communicate()

    assert shell.returncode == 130, f"{stdout}\n{stderr[-3000:]}"
    assert time.monotonic() - sent < 10
    assert "tessmirror exited with 130" in stdout
    assert requeued.read_text().split() == ["requeue", "4242"], "the requeue branch ran"
    assert "Traceback" not in stderr
    assert not lock_files(out), "tessmirror stopped gracefully and released its lock"
    entries = Manifest(out / ".tessmirror").load()
    assert entries
    assert assert_verified_records_are_good(out, arch) >= 3


def test_the_slurm_recipe_exits_0_without_requeue_when_the_run_completes(archive, tmp_path: Path) -> None:
    arch = archive(sectors=(1,), targets=16, focus=(1, 1, 2))
    env, requeued = fake_cluster(tmp_path, arch.tap_url)
    script = tmp_path / "tess-s1.sbatch"
    script.write_text(recipe())
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tessmirror exited with 0" in done.stdout
    assert not requeued.exists()
