"""A real Slurm on this machine: tessmirror's job arrays and Dask modes under `sbatch` and `srun`.

tests/slurm/setup.sh installs Debian's slurmctld, slurmd, slurm-client and munge, and starts a one-node
cluster (this host, reached on 127.0.0.1, 2 CPUs, `OverSubscribe=FORCE:4`). The jobs run as root on
this node, so they reach the test's local archive on 127.0.0.1. The tests: a 4-task `sbatch --array`
of `fetch --shard K/4`; docs/HPC.md's array script word for word, one task signalled and requeued;
`run --cluster slurm` (dask-jobqueue's worker jobs); `run --cluster slurm-runner` under `srun`. They
wait on what Slurm shows (`squeue` until the job has left the queue, then `scontrol show job` for each
task's state and exit code; there is no accounting, hence no `sacct`), never on a fixed sleep.

Outside CI, the tests skip (with the reason) where Slurm cannot run: not root, or setup.sh failed
(no apt). Under CI (`CI` or `TESSMIRROR_REQUIRE_SLURM` set, as `.ci/run` does) they fail instead.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.archive import FaultPlan
from engine.exceptions import EXIT_OK
from engine.manifest import Manifest
from engine.shard import shard_of
from tests.helpers import (
    assert_mirror_matches_truth,
    assert_verified_records_are_good,
    cli_command,
    lock_files,
    manifest_lines,
    run_cli,
    spawn_cli,
    wait_until,
)
from tests.integration.test_shards import doc_block, plan_keys, plan_once, shard_manifest
from tests.integration.test_slurm_recipe import fake_cluster

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "tests" / "slurm" / "setup.sh"
TEARDOWN = ROOT / "tests" / "slurm" / "teardown.sh"
# CI must run these tests: there a missing Slurm is a failure, never a skip.
REQUIRED = bool(os.environ.get("CI") or os.environ.get("TESSMIRROR_REQUIRE_SLURM"))
SHARDS = 4
# Generous: four Python processes start on 2 shared cores; a healthy array finishes in seconds.
JOB_TIMEOUT = 240.0
# Each response capped at 30 kB/s: a task needs several seconds for its 55 kB files, so task 0 is still
# running when it is signalled after its first file, however slowly squeue answers.
SLOW = "bandwidth=30000"


def unavailable(reason: str) -> None:
    """Skip with the reason, or fail under CI, where a skip would hide a broken set-up."""
    if REQUIRED:
        pytest.fail(f"a real Slurm is required under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def slurm_answers() -> bool:
    """True when a controller answers `scontrol ping`."""
    if not shutil.which("scontrol"):
        return False
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    return ping.returncode == 0 and "UP" in ping.stdout


@pytest.fixture(scope="module")
def slurm() -> Iterator[None]:
    """A one-node Slurm, up and idle. Started by tests/slurm/setup.sh (idempotent: only checks when
    it runs already); stopped afterwards only when this fixture started it."""
    if os.geteuid() != 0:
        unavailable("needs root: tests/slurm/setup.sh installs Slurm and starts its daemons as root")
    was_up = slurm_answers()
    setup = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900)
    if setup.returncode != 0:
        last = (setup.stderr.strip() or setup.stdout.strip() or "no output").splitlines()[-1]
        unavailable(f"tests/slurm/setup.sh could not start Slurm: {last}")
    yield
    if not was_up:
        subprocess.run(["bash", str(TEARDOWN)], capture_output=True, text=True, timeout=120)


def sbatch(script: Path, cwd: Path) -> str:
    """Submit a batch script; returns its job id."""
    proc = subprocess.run(
        ["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60, cwd=cwd
    )
    assert proc.returncode == 0, f"sbatch refused the job: {proc.stderr.strip()}"
    return proc.stdout.strip().split(";")[0]


def in_queue(job: str) -> bool:
    """True while any task of the job is pending, running or completing (`squeue`)."""
    proc = subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%i %T"], capture_output=True, text=True, timeout=30
    )
    if proc.returncode != 0 and "Invalid job id" in proc.stderr:
        return False  # already purged from the controller: long gone
    assert proc.returncode == 0, f"squeue failed: {proc.stderr.strip()}"
    return bool(proc.stdout.strip())


def task_exit_codes(job: str) -> dict[int, str]:
    """Array task id -> `ExitCode` (code:signal) as the controller reports it (`scontrol show job`)."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"scontrol show job {job}: {proc.stderr.strip()}"
    codes: dict[int, str] = {}
    for line in proc.stdout.splitlines():
        task = re.search(r"\bArrayTaskId=(\d+)\b", line)
        code = re.search(r"\bExitCode=(\S+)", line)
        state = re.search(r"\bJobState=(\S+)", line)
        assert task and code and state, line
        codes[int(task.group(1))] = f"{state.group(1)} {code.group(1)}"
    return codes


def test_a_four_task_sbatch_array_of_shards_mirrors_the_plan_exactly_once(
    slurm, archive, tmp_path: Path
) -> None:
    """`sbatch --array=0-3` of `tessmirror fetch --shard K/4`: every task exits 0, every shard wrote
    its manifest with only its own files, every file was fetched once and verified, and `status` and
    `verify` of the whole mirror are clean."""
    arch = archive(sectors=(1,), targets=32)
    out = tmp_path / "mirror"
    plan = plan_once(arch, out)
    keys = plan_keys(plan)
    assert len(keys) >= 20
    logs = tmp_path / "slurm-logs"
    logs.mkdir()
    tessmirror = f"{shlex.quote(sys.executable)} -m engine.cli"
    script = tmp_path / "shards.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --job-name=tessmirror-shards\n"
        f"#SBATCH --array=0-{SHARDS - 1}\n"
        f"#SBATCH --output={logs}/%A_%a.out\n"
        "#SBATCH --time=00:10:00\n"
        f"exec {tessmirror} fetch --input {shlex.quote(str(plan))} --out {shlex.quote(str(out))}"
        f' --shard "$SLURM_ARRAY_TASK_ID/{SHARDS}" --concurrency 2\n'
    )
    job = sbatch(script, cwd=ROOT)
    try:
        left = wait_until(lambda: not in_queue(job), timeout=JOB_TIMEOUT, interval=0.5)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    task_logs = {p.name: p.read_text(errors="replace") for p in sorted(logs.iterdir())}
    assert left, f"job {job} still in the queue after {JOB_TIMEOUT:.0f}s: {task_logs}"
    assert task_exit_codes(job) == dict.fromkeys(range(SHARDS), "COMPLETED 0:0"), task_logs
    assert len(task_logs) == SHARDS and not [n for n, t in task_logs.items() if "Traceback" in t], task_logs

    # Each task wrote its own shard manifest, holding only its own files; together they are the plan.
    union: list[str] = []
    for k in range(SHARDS):
        assert shard_manifest(out, k, SHARDS).exists(), f"shard {k} of the array wrote no manifest"
        manifest = Manifest(out / ".tessmirror", shard=f"shard-{k}-of-{SHARDS}")
        own = {e.key for e in manifest._records(manifest.path) if e.status == "verified"}
        assert own and all(shard_of(key, SHARDS) == k for key in own), f"shard {k}: {sorted(own)[:3]}"
        union += own
    assert len(union) == len(set(union)), "a file verified by two tasks"
    assert set(union) == keys
    assert set(Manifest(out / ".tessmirror").verified()) == keys

    # The archive saw every file requested once: no task fetched another's share.
    gets = Counter(r.name for r in arch.request_log if r.method == "GET" and r.status in (200, 206))
    names = {key.split("/", 1)[1] for key in keys}
    assert set(gets) == names
    assert max(gets.values()) == 1, f"fetched twice: {[n for n, c in gets.items() if c > 1][:5]}"
    assert_mirror_matches_truth(out, arch, names)
    assert assert_verified_records_are_good(out, arch) == len(keys)
    assert not lock_files(out), "every task released its locks"

    status = run_cli("status", "--out", out)
    assert status.returncode == EXIT_OK, status.stderr[-2000:]
    assert (
        f"verified    {len(keys)}" in status.stdout
        and f"planned     {len(keys)} (0 still to do)" in status.stdout
    )
    verify = run_cli("verify", "--out", out, "--level", "checksum")
    assert verify.returncode == EXIT_OK, verify.stderr[-2000:]
    assert f"ok          {len(keys)}" in verify.stderr + verify.stdout


def array_tasks(job: str) -> dict[int, dict[str, str]]:
    """Array task id -> its JobState, ExitCode and Restarts, as the controller reports them."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"scontrol show job {job}: {proc.stderr.strip()}"
    tasks: dict[int, dict[str, str]] = {}
    for line in proc.stdout.splitlines():
        fields = dict(re.findall(r"\b(ArrayTaskId|JobState|ExitCode|Restarts)=(\S+)", line))
        if "ArrayTaskId" in fields:
            tasks[int(fields.pop("ArrayTaskId"))] = fields
    return tasks


def running_tasks(job: str) -> int:
    """How many tasks of the array run now (`squeue`)."""
    squeue = ["squeue", "-h", "-j", job, "-t", "RUNNING", "-o", "%i"]
    proc = subprocess.run(squeue, capture_output=True, text=True, timeout=30)
    return len(proc.stdout.split()) if proc.returncode == 0 else 0


def batch_shell_pid(task: str) -> int:
    """The pid of a running task's batch shell on this node."""
    raw = subprocess.run(["squeue", "-h", "-j", task, "-o", "%A"], capture_output=True, text=True, timeout=30)
    assert raw.returncode == 0 and raw.stdout.strip(), f"squeue -j {task}: {raw.stderr.strip()}"
    pids = subprocess.run(
        ["scontrol", "listpids", raw.stdout.strip()], capture_output=True, text=True, timeout=30
    )
    assert pids.returncode == 0, f"scontrol listpids: {pids.stderr.strip()}"
    for row in pids.stdout.splitlines()[1:]:
        pid, _job, step, local_id, *_ = [*row.split(), "", "", ""]
        if step == "batch" and local_id == "0":
            return int(pid)
    raise AssertionError(f"no batch shell for {task}: {pids.stdout}")


def test_the_array_recipe_of_the_docs_runs_under_sbatch_and_a_signalled_task_requeues_itself(
    slurm, archive, tmp_path: Path
) -> None:
    """docs/HPC.md's array script, word for word, submitted with sbatch: 8 tasks, at most 4 running
    at once (`%4`). Task 0 gets SIGTERM in its batch shell only (`scancel --batch`, what
    `--signal=B:TERM` does), forwards it, sees tessmirror exit 130 and requeues itself with the real
    `scontrol requeue`; its second run finishes the share."""
    arch = archive(sectors=(1,), targets=48, focus=(1, 1, 2), faults=FaultPlan.from_spec(SLOW))
    env, _ = fake_cluster(tmp_path, arch.tap_url)
    (tmp_path / "bin" / "scontrol").unlink()  # this time Slurm's own scontrol requeues the task
    out = tmp_path / "scratch" / "tess" / "s1"
    planned = subprocess.run(
        ["bash", "-c", doc_block("slurm-array-plan")], env=env, capture_output=True, text=True, timeout=120
    )
    assert planned.returncode == EXIT_OK, planned.stderr[-2000:]
    keys = plan_keys(out / ".tessmirror" / "plan.ecsv")
    script = tmp_path / "tess-s1-array.sbatch"
    script.write_text(doc_block("slurm-array-recipe"))
    logs = tmp_path / "logs"  # sbatch's default slurm-%A_%a.out lands in the submitting folder
    logs.mkdir()
    submitted = subprocess.run(
        ["sbatch", "--parsable", str(script)], env=env, cwd=logs, capture_output=True, text=True, timeout=60
    )
    assert submitted.returncode == 0, f"sbatch refused the docs' script: {submitted.stderr.strip()}"
    job = submitted.stdout.strip().split(";")[0]
    most_running = 0

    def progressed() -> bool:
        nonlocal most_running
        most_running = max(most_running, running_tasks(job))
        return manifest_lines(shard_manifest(out, 0, 8)) >= 1 or not in_queue(f"{job}_0")

    try:
        assert wait_until(progressed, timeout=JOB_TIMEOUT, interval=0.2), "task 0 recorded no file"
        assert in_queue(f"{job}_0"), "task 0 ended before Slurm's signal"
        # Slurm's --signal=B:TERM: SIGTERM to the batch shell alone, never to tessmirror. Sent to the
        # shell's pid (`scontrol listpids`: the batch step's task 0) rather than with `scancel --batch`,
        # which retries for up to a minute when the controller is busy and would then signal the task's
        # next run as well.
        os.kill(batch_shell_pid(f"{job}_0"), signal.SIGTERM)

        def finished() -> bool:
            nonlocal most_running
            most_running = max(most_running, running_tasks(job))
            return not in_queue(job)

        # Generous: the requeued task waits out the credential lifetime (15 s here) before it restarts.
        left = wait_until(finished, timeout=JOB_TIMEOUT, interval=0.5)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    task_logs = {p.name: p.read_text(errors="replace") for p in sorted(logs.iterdir())}
    assert left, f"array {job} still queued after {JOB_TIMEOUT:.0f}s: {task_logs}"
    tasks = array_tasks(job)
    assert {k: (t["JobState"], t["ExitCode"]) for k, t in tasks.items()} == dict.fromkeys(
        range(8), ("COMPLETED", "0:0")
    ), task_logs
    assert tasks[0]["Restarts"] == "1", f"task 0 was not requeued: {tasks[0]}"
    assert all(tasks[k]["Restarts"] == "0" for k in range(1, 8)), "only the signalled task requeued"
    assert 1 <= most_running <= 4, f"{most_running} tasks ran at once under %4"
    assert not [name for name, text in task_logs.items() if "Traceback" in text], task_logs
    # The requeued run (its log replaces the first run's) resumed: it skipped what the first verified.
    rerun = task_logs[f"slurm-{job}_0.out"]
    assert "tessmirror shard 0 exited with 0" in rerun, rerun[-2000:]
    skipped = re.search(r"^skipped\s+(\d+)\s+\(verified by an earlier run", rerun, re.MULTILINE)
    assert skipped and int(skipped.group(1)) >= 1, rerun[-2000:]

    union: set[str] = set()
    for k in range(8):
        manifest = Manifest(out / ".tessmirror", shard=f"shard-{k}-of-8")
        union |= {e.key for e in manifest._records(manifest.path) if e.status == "verified"}
    assert union == keys
    assert set(Manifest(out / ".tessmirror").verified()) == keys
    assert_mirror_matches_truth(out, arch, {key.split("/", 1)[1] for key in keys})
    assert not lock_files(out), "every task released its locks"
    assert not list((out / ".tessmirror" / "run.lock.d").iterdir())


# -- Dask on Slurm: `--cluster slurm` (dask-jobqueue's SLURMCluster) and `--cluster slurm-runner` -------
DASK_JOBS = 2
# dask-jobqueue's scheduler and workers on the loopback interface: the test's cluster reaches nothing
# but 127.0.0.1 (on a real cluster the site's interface, e.g. ib0, goes here).
LOOPBACK = {"DASK_JOBQUEUE__SLURM__INTERFACE": "lo"}


def jobs_writing_to(folder: Path) -> dict[str, str]:
    """Job id -> state of every job the controller remembers whose output goes under `folder`."""
    proc = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    jobs: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        stdout = re.search(r"\bStdOut=(\S+)", line)
        if stdout and stdout.group(1).startswith(str(folder)):
            jobs[re.search(r"\bJobId=(\d+)", line).group(1)] = re.search(r"\bJobState=(\S+)", line).group(1)
    return jobs


def batches_run(log: str) -> list[tuple[int, str, int]]:
    """(files done, host, pid) of every batch the driver recorded (its DEBUG lines, with -v)."""
    found = re.findall(r"batch \d+: (\d+) of \d+ files on (\S+) \(pid (\d+)\)", log)
    return [(int(done), host, int(pid)) for done, host, pid in found]


def assert_mirrored_once(arch, out: Path, keys: set[str]) -> None:
    """The manifest verifies every planned file; the archive served each file exactly once."""
    assert set(Manifest(out / ".tessmirror").verified()) == keys
    gets = Counter(r.name for r in arch.request_log if r.method == "GET" and r.status in (200, 206))
    names = {key.split("/", 1)[1] for key in keys}
    assert set(gets) == names
    assert max(gets.values()) == 1, f"fetched twice: {[n for n, c in gets.items() if c > 1][:5]}"
    assert_mirror_matches_truth(out, arch, names)
    assert assert_verified_records_are_good(out, arch) == len(keys)
    assert not lock_files(out), "the driver released its lock"
    assert not [p for p in out.rglob("*.part*") if ".tessmirror" not in p.parts], "a part file left behind"
    status = run_cli("status", "--out", out)
    assert status.returncode == EXIT_OK, status.stderr[-2000:]
    assert f"verified    {len(keys)}" in status.stdout


def test_cluster_slurm_downloads_in_two_slurm_jobs_and_mirrors_every_file_once(
    slurm, archive, tmp_path: Path
) -> None:
    """`run --cluster slurm --jobs 2`: dask-jobqueue submits two worker jobs with sbatch (each asks
    for --mem: the node's RealMemory must cover it), the batches run in them, the driver alone writes
    the manifest, and the jobs leave the queue when the run ends."""
    arch = archive(sectors=(1,), targets=32)
    keys = plan_keys(plan_once(arch, tmp_path / "expected"))
    out = tmp_path / "mirror"
    driver = spawn_cli(
        "run", "-v", "--tap-url", arch.tap_url, "--sector", 1, "--out", out,
        "--cluster", "slurm", "--jobs", DASK_JOBS, "--job-concurrency", 2, "--walltime", "00:10:00",
        env=LOOPBACK,
    )  # fmt: skip
    try:
        _stdout, stderr = driver.communicate(timeout=JOB_TIMEOUT)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    assert driver.returncode == EXIT_OK, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert f"{DASK_JOBS} jobs x 2 connections = at most 4 connections" in stderr
    # Every file came back from a batch that ran in a worker, never in the driver's process.
    batches = batches_run(stderr)
    assert sum(done for done, _host, _pid in batches) == len(keys), stderr[-3000:]
    assert driver.pid not in {pid for _done, _host, pid in batches}
    jobs = jobs_writing_to(out)
    assert len(jobs) == DASK_JOBS, f"expected {DASK_JOBS} worker jobs, the controller knows {jobs}"
    assert wait_until(lambda: not any(in_queue(j) for j in jobs), timeout=60, interval=0.5), (
        f"worker jobs still queued after the run: {jobs_writing_to(out)}"
    )
    assert_mirrored_once(arch, out, keys)
    assert not (out / ".tessmirror" / "manifest.d").exists(), "the driver is the only manifest writer"


def test_cluster_slurm_runner_under_srun_mirrors_every_file_once(slurm, archive, tmp_path: Path) -> None:
    """`srun --overcommit -n 4 tessmirror run --cluster slurm-runner`: rank 0 serves the scheduler,
    rank 1 drives the run, ranks 2 and 3 are its workers; srun exits 0 and nothing prints a traceback."""
    arch = archive(sectors=(1,), targets=32)
    keys = plan_keys(plan_once(arch, tmp_path / "expected"))
    out = tmp_path / "mirror"
    command = [
        "srun", "--overcommit", "-n", "4", "--time", "00:10:00", "--job-name", "tessmirror-runner",
        *cli_command("run", "-v", "--tap-url", arch.tap_url, "--sector", 1, "--out", out,
                     "--cluster", "slurm-runner", "--job-concurrency", 2),
    ]  # fmt: skip
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **LOOPBACK},
    )
    both = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_OK, both[-3000:]
    assert "Traceback" not in both, both[-3000:]
    # The allocation talked over loopback only: the scheduler the ranks shared was on 127.0.0.1.
    addresses = set(re.findall(r"tcp://([^:/\s]+):", both))
    assert addresses == {"127.0.0.1"}, (addresses, both[-3000:])
    # Rank 0 served the scheduler, ranks 2 and 3 the workers, and the batches ran on the workers.
    assert "rank 0 serves the Dask scheduler" in both
    assert "rank 2 serves a Dask worker" in both and "rank 3 serves a Dask worker" in both
    assert sum(done for done, _host, _pid in batches_run(both)) == len(keys), both[-3000:]
    assert_mirrored_once(arch, out, keys)
