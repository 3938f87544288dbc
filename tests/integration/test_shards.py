"""A Slurm job array without Slurm: plan once, then `fetch --shard K/4` in 4 processes at once.

What a user of `sbatch --array=0-3` relies on (docs/HPC.md): every file is downloaded exactly once
across the shards, the shards' manifests together are the plan, `status` and `verify` see them all,
an unsharded run is refused while a shard works, and a shard killed with SIGKILL resumes only its own
remaining files.
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from engine.archive import FaultPlan
from engine.exceptions import EXIT_LOCAL, EXIT_OK, EXIT_USAGE
from engine.manifest import Manifest, file_key
from engine.plan.table import iter_plan
from engine.shard import shard_of
from tests.helpers import (
    assert_mirror_matches_truth,
    assert_verified_records_are_good,
    lock_files,
    manifest_lines,
    run_cli,
    spawn_cli,
    wait_until,
)
from tests.integration.test_slurm_recipe import fake_cluster

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

SHARDS = 4
# Paced so the shards overlap in time and a kill lands mid-run.
PACED = "bandwidth=150000"


def plan_once(arch, out: Path) -> Path:
    plan = out / ".tessmirror" / "plan.ecsv"
    plan.parent.mkdir(parents=True)
    proc = run_cli("plan", "--tap-url", arch.tap_url, "--sector", 1, "--format", "ecsv", "-o", plan)
    assert proc.returncode == EXIT_OK, proc.stderr[-2000:]
    return plan


def shard_args(plan: Path, out: Path, k: int, n: int = SHARDS) -> list[object]:
    return ["fetch", "--input", plan, "--out", out, "--shard", f"{k}/{n}", "--concurrency", 2]


def shard_manifest(out: Path, k: int, n: int = SHARDS) -> Path:
    return out / ".tessmirror" / "manifest.d" / f"shard-{k}-of-{n}.jsonl"


def plan_keys(plan: Path) -> set[str]:
    return {file_key(i.obs_id, i.filename) for i in iter_plan(plan, key="plan")}


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    _out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_four_shards_at_once_mirror_the_plan_exactly_once(archive, tmp_path: Path) -> None:
    arch = archive(sectors=(1,), targets=48, file_size="small", faults=FaultPlan.from_spec(PACED))
    out = tmp_path / "mirror"
    plan = plan_once(arch, out)
    keys = plan_keys(plan)
    assert len(keys) >= 40
    procs = [spawn_cli(*shard_args(plan, out, k)) for k in range(SHARDS)]
    try:
        # A run without --shard beside live shards: refused (exit 4) naming a shard. Started only once a
        # shard has observably made progress (a record in its manifest), never after a sleep.
        assert wait_until(
            lambda: any(manifest_lines(shard_manifest(out, k)) >= 1 for k in range(SHARDS)), timeout=120
        ), "no shard recorded a file"
        alive = [k for k, p in enumerate(procs) if p.poll() is None]
        assert alive, "every shard ended before the exclusive run could be tried"
        refused = run_cli("fetch", "--input", plan, "--out", out)
        assert refused.returncode == EXIT_LOCAL, refused.stderr[-2000:]
        assert "shard" in refused.stderr and "is using" in refused.stderr
        results = [finish(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for k, (code, err) in enumerate(results):
        assert code == EXIT_OK, f"shard {k}: {err[-2000:]}"

    # Each shard's manifest holds exactly its own files; together they are the plan.
    per_shard = [Manifest(out / ".tessmirror", shard=f"shard-{k}-of-{SHARDS}") for k in range(SHARDS)]
    union: list[str] = []
    for k, manifest in enumerate(per_shard):
        own = {e.key for e in manifest._records(manifest.path)}
        assert own, f"shard {k} wrote nothing"
        assert all(shard_of(key, SHARDS) == k for key in own), f"shard {k} recorded another shard's file"
        union += own
    assert len(union) == len(set(union)), "a file recorded by two shards"
    assert set(union) == keys
    assert not (out / ".tessmirror" / "manifest.jsonl").exists(), "shards never write the main manifest"

    # Every file GET'ed exactly once across the shards (200 answers only; the archive serves no faults).
    gets = Counter(r.name for r in arch.request_log if r.method == "GET" and r.status in (200, 206))
    assert set(gets) == {key.split("/", 1)[1] for key in keys}
    assert max(gets.values()) == 1, f"fetched twice: {[n for n, c in gets.items() if c > 1][:5]}"
    assert_mirror_matches_truth(out, arch, {key.split("/", 1)[1] for key in keys})
    assert assert_verified_records_are_good(out, arch) == len(keys)

    status = run_cli("status", "--out", out)
    assert status.returncode == EXIT_OK, status.stderr[-2000:]
    assert f"files       {len(keys)}" in status.stdout and f"verified    {len(keys)}" in status.stdout
    assert f"planned     {len(keys)} (0 still to do)" in status.stdout
    verify = run_cli("verify", "--out", out, "--level", "checksum")
    assert verify.returncode == EXIT_OK, verify.stderr[-2000:]
    assert f"ok          {len(keys)}" in verify.stderr + verify.stdout

    # A later unsharded run reads every manifest: nothing left to fetch.
    before = len(arch.request_log)
    again = run_cli("fetch", "--input", plan, "--out", out)
    assert again.returncode == EXIT_OK, again.stderr[-2000:]
    assert not [r for r in arch.request_log[before:] if r.method == "GET"]


def test_a_killed_shard_resumes_only_its_own_remaining_files(archive, tmp_path: Path) -> None:
    arch = archive(sectors=(1,), targets=48, file_size="small", faults=FaultPlan.from_spec(PACED))
    out = tmp_path / "mirror"
    plan = plan_once(arch, out)
    keys = plan_keys(plan)
    mine = {key for key in keys if shard_of(key, 2) == 1}
    proc = spawn_cli(*shard_args(plan, out, 1, 2))
    try:
        assert wait_until(
            lambda: manifest_lines(shard_manifest(out, 1, 2)) >= 2 or proc.poll() is not None, timeout=120
        )
        assert proc.poll() is None, f"the shard ended before the kill: {proc.communicate()[1][-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done_before = set(Manifest(out / ".tessmirror").verified())
    assert done_before and done_before < mine
    log_mark = len(arch.request_log)
    # The rerun takes over the dead shard's lock (its pid is gone) and fetches the rest of its share.
    code, err = finish(spawn_cli(*shard_args(plan, out, 1, 2)))
    assert code == EXIT_OK, err[-2000:]
    fetched = {r.name for r in arch.request_log[log_mark:] if r.method == "GET" and r.status in (200, 206)}
    names = {key.split("/", 1)[1] for key in mine - done_before}
    assert fetched == names, "the rerun fetched exactly its own remaining files"
    assert set(Manifest(out / ".tessmirror").verified()) == mine
    # The other shard's files were never touched.
    assert not {key.split("/", 1)[1] for key in keys - mine} & {r.name for r in arch.request_log}


def test_a_bad_shard_is_one_line_naming_run_shard(tmp_path: Path) -> None:
    plan = tmp_path / "urls.txt"
    plan.write_text("http://127.0.0.1:9/a_lc.fits\n")
    proc = run_cli("fetch", "--input", plan, "--out", tmp_path / "m", "--shard", "4/4")
    assert proc.returncode == EXIT_USAGE
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert any("run.shard" in line for line in lines) and "Traceback" not in proc.stderr


# -- the recipe of docs/HPC.md, word for word ---------------------------------------------------------
def doc_block(marker: str) -> str:
    text = (ROOT / "docs" / "HPC.md").read_text(encoding="utf-8")
    after = text[text.index(f"<!-- {marker}") :]
    match = re.search(r"```bash\n(.*?)```", after, re.DOTALL)
    assert match, f"docs/HPC.md has no bash block after the {marker} marker"
    return match.group(1)


def test_the_array_recipe_of_the_docs_mirrors_everything_and_requeues_an_interrupted_task(
    archive, tmp_path: Path
) -> None:
    """`sbatch --array=0-7%4` imitated: the plan block once, then the array script as tasks 0-7, at
    most 4 at once; task 0 gets Slurm's SIGTERM mid-run, requeues itself as <array job>_0, and its
    rerun finishes the share."""
    arch = archive(sectors=(1,), targets=48, focus=(1, 1, 2), faults=FaultPlan.from_spec(PACED))
    env, requeued = fake_cluster(tmp_path, arch.tap_url)
    out = tmp_path / "scratch" / "tess" / "s1"
    planned = subprocess.run(
        ["bash", "-c", doc_block("slurm-array-plan")], env=env, capture_output=True, text=True, timeout=120
    )
    assert planned.returncode == EXIT_OK, planned.stderr[-2000:]
    keys = plan_keys(out / ".tessmirror" / "plan.ecsv")
    script = tmp_path / "tess-s1-array.sbatch"
    script.write_text(doc_block("slurm-array-recipe"))
    count = int(re.search(r"--array=0-(\d+)%(\d+)", script.read_text()).group(1)) + 1
    throttle = int(re.search(r"--array=0-\d+%(\d+)", script.read_text()).group(1))
    assert (count, throttle) == (8, 4)

    def task(k: int) -> subprocess.Popen:
        task_env = {
            **env,
            "SLURM_ARRAY_JOB_ID": "4242",
            "SLURM_ARRAY_TASK_ID": str(k),
            "SLURM_JOB_ID": str(5000 + k),
        }
        return subprocess.Popen(
            ["bash", str(script)], env=task_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    codes: dict[int, int] = {}
    running: dict[int, subprocess.Popen] = {}
    waiting = list(range(count))
    try:
        while len(running) < throttle:
            k = waiting.pop(0)
            running[k] = task(k)
        # Slurm's --signal=B:TERM to task 0's batch shell, once that shard has recorded a file.
        assert wait_until(
            lambda: manifest_lines(shard_manifest(out, 0, count)) >= 1 or running[0].poll() is not None,
            timeout=120,
        )
        assert running[0].poll() is None, "task 0 ended before Slurm's signal"
        running[0].send_signal(signal.SIGTERM)
        while running or waiting:
            for k, proc in list(running.items()):
                if proc.poll() is not None:
                    stdout, stderr = proc.communicate()
                    assert "Traceback" not in stderr, stderr[-2000:]
                    codes.setdefault(k, proc.returncode)
                    del running[k]
                    if proc.returncode == 130:
                        assert f"tessmirror shard {k} exited with 130" in stdout
                        waiting.append(k)  # what `scontrol requeue` does: the task runs again
            while waiting and len(running) < throttle:
                k = waiting.pop(0)
                running[k] = task(k)
            wait_until(
                lambda: any(p.poll() is not None for p in running.values()) or not running, timeout=180
            )
    finally:
        for proc in running.values():
            proc.kill()
            proc.communicate()
    assert set(codes) == set(range(count)) and all(c in (0, 130) for c in codes.values()), codes
    assert codes[0] == 130, "task 0 was interrupted and requeued"
    assert requeued.read_text().split() == ["requeue", "4242_0"], "the task, not the whole array"
    union = set()
    for k in range(count):
        manifest = Manifest(out / ".tessmirror", shard=f"shard-{k}-of-{count}")
        union |= {e.key for e in manifest._records(manifest.path) if e.status == "verified"}
    assert union == keys
    assert set(Manifest(out / ".tessmirror").verified()) == keys
    assert not lock_files(out), "every task released its locks"
    assert not list((out / ".tessmirror" / "run.lock.d").iterdir())
