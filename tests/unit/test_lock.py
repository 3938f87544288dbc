"""engine.lock: one run per output directory; stale locks taken over, malformed ones named."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.exceptions import EXIT_LOCAL, RunLockedError
from engine.lock import PID_MAX, RunLock
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[2]
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts outside Slurm, whatever the machine running the suite is."""
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)


def plant(directory: Path, holder: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "run.lock"
    path.write_text(holder if isinstance(holder, str) else json.dumps(holder))
    return path


def dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def test_second_acquire_refuses_naming_pid_and_host(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with RunLock(state):
        assert (state / "run.lock").exists()
        with pytest.raises(RunLockedError) as info:
            RunLock(state).acquire()
    message = str(info.value)
    assert f"pid {os.getpid()}" in message
    assert socket.gethostname() in message
    assert str(state / "run.lock") in message  # the hint names the file to remove
    assert info.value.exit_code == EXIT_LOCAL
    assert not (state / "run.lock").exists()  # released on exit


def test_the_lock_lives_under_the_output_directory_whatever_the_state_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with RunLock(tmp_path / "state-a", out_dir=out) as lock:
        assert lock.path == out / ".tessmirror" / "run.lock"
        assert lock.path.exists() and (tmp_path / "state-a" / "run.lock").exists()
        with pytest.raises(RunLockedError) as info:
            RunLock(tmp_path / "state-b", out_dir=out).acquire()
        assert str(out) in str(info.value) and f"pid {os.getpid()}" in str(info.value)
        # The refused run took nothing: its own state directory holds no lock.
        assert not (tmp_path / "state-b" / "run.lock").exists()
    assert not lock.path.exists() and not (tmp_path / "state-a" / "run.lock").exists()


def test_two_outputs_cannot_share_one_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with RunLock(state, out_dir=tmp_path / "out-a"), pytest.raises(RunLockedError):
        RunLock(state, out_dir=tmp_path / "out-b").acquire()
    # The refused run released the output lock it had taken first.
    assert not (tmp_path / "out-b" / ".tessmirror" / "run.lock").exists()


def test_the_default_state_directory_holds_a_single_lock(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with RunLock(out / ".tessmirror", out_dir=out) as lock:
        assert lock.paths == [out / ".tessmirror" / "run.lock"]


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path: Path) -> None:
    state = tmp_path / "state"
    plant(state, {"host": socket.gethostname(), "pid": dead_pid(), "started": "2020-01-01T00:00:00"})
    lock = RunLock(state)
    lock.acquire()
    holder = json.loads((state / "run.lock").read_text())
    assert holder["pid"] == os.getpid()
    lock.release()
    assert not (state / "run.lock").exists()
    assert [p.name for p in state.iterdir()] == []  # no temporary or stale files left behind


def test_a_lock_naming_our_own_pid_is_stale(tmp_path: Path) -> None:
    """A restarted container: we are pid 1 again, and so was the run that left the lock."""
    state = tmp_path / "state"
    plant(state, {"host": socket.gethostname(), "pid": os.getpid(), "started": "T0", "token": "old"})
    with RunLock(state):
        assert json.loads((state / "run.lock").read_text())["token"] != "old"


def test_a_pid_now_running_another_process_is_stale(tmp_path: Path) -> None:
    """The pid is alive, but it started later than the lock's process: the pid was reused."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc to read process start times")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = tmp_path / "state"
        holder = {"host": socket.gethostname(), "pid": sleeper.pid, "started": "T0", "pid_start": "x:1"}
        plant(state, holder)
        with RunLock(state):
            assert json.loads((state / "run.lock").read_text())["pid"] == os.getpid()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_live_process_with_its_own_start_time_keeps_its_lock(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from engine.lock import RunLock
        lock = RunLock(Path({str(tmp_path / "state")!r}))
        lock.acquire()
        print("locked", flush=True)
        sys.stdin.read()
        lock.release()
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError) as info:
            RunLock(tmp_path / "state").acquire()
        assert f"pid {child.pid}" in str(info.value)
    finally:
        child.communicate("", timeout=30)
    assert not (tmp_path / "state" / "run.lock").exists()


def test_lock_of_another_host_is_never_taken_over(tmp_path: Path) -> None:
    state = tmp_path / "state"
    plant(state, {"host": "elsewhere", "pid": 1, "started": "T0"})
    with pytest.raises(RunLockedError) as info:
        RunLock(state).acquire()
    assert "pid 1 on host elsewhere, started T0" in str(info.value)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("\x00garbage", "not JSON"),
        ('{"host": "HERE", "pid": 7', "not JSON"),  # cut short
        ("[1, 2]", "no host"),
        ('{"pid": 7}', "no host"),
        (json.dumps({"host": "HERE", "pid": 99999999999999999999}), "impossible pid"),
        (json.dumps({"host": "HERE", "pid": PID_MAX + 1}), "impossible pid"),
        (json.dumps({"host": "HERE", "pid": -5}), "impossible pid"),
        (json.dumps({"host": "HERE", "pid": 0}), "impossible pid"),
        (json.dumps({"host": "HERE", "pid": "12"}), "impossible pid"),
        (json.dumps({"host": "HERE", "pid": True}), "impossible pid"),
        (json.dumps({"host": "HERE", "pid": 1.5}), "impossible pid"),
    ],
    ids=[
        "binary",
        "truncated",
        "list",
        "nohost",
        "huge",
        "above-max",
        "negative",
        "zero",
        "string",
        "bool",
        "float",
    ],
)
def test_a_malformed_lock_is_a_clear_refusal_naming_the_file_to_delete(
    tmp_path: Path, content: str, why: str
) -> None:
    state = tmp_path / "state"
    # The lock names this machine, so no rule about other hosts can hide the check.
    path = plant(state, content.replace("HERE", socket.gethostname()))
    with pytest.raises(RunLockedError) as info:
        RunLock(state).acquire()
    assert why in info.value.message
    assert info.value.exit_code == EXIT_LOCAL
    assert info.value.hint is not None and f"delete {path}" in info.value.hint
    assert path.exists()  # never removed on a guess


def test_the_lock_records_the_slurm_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    with RunLock(tmp_path / "state") as lock:
        holder = json.loads(lock.path.read_text())
    assert holder["slurm_job_id"] == "4242" and holder["slurm_array_task_id"] == "7"


def test_a_requeued_slurm_job_takes_its_own_lock_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same job id, other host and pid, a higher restart count: the earlier run of this job is gone."""
    state = tmp_path / "state"
    plant(state, {"host": "node017", "pid": 31337, "started": "T0", "slurm_job_id": "4242"})
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with RunLock(state) as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["host"] == socket.gethostname() and holder["slurm_restart_count"] == "1"


def test_a_requeued_job_without_a_restart_count_is_known_by_its_new_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    plant(state, {"host": "node017", "pid": 31337, "started": "T0", "slurm_job_id": "4242"})
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with RunLock(state):
        pass


@pytest.mark.parametrize(
    ("theirs", "ours"),
    [
        ({"slurm_job_id": "1111"}, {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"}),  # another job
        (
            {"slurm_job_id": "4242", "slurm_array_task_id": "3"},
            {"SLURM_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "4"},
        ),
        ({}, {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"}),  # a run outside Slurm
    ],
    ids=["other-job", "other-array-task", "no-job"],
)
def test_another_slurm_job_or_task_keeps_its_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, theirs: dict[str, str], ours: dict[str, str]
) -> None:
    state = tmp_path / "state"
    plant(state, {"host": "node017", "pid": 31337, "started": "T0", **theirs})
    for name, value in ours.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RunLockedError) as info:
        RunLock(state).acquire()
    assert "node017" in str(info.value)


def test_the_same_slurm_job_still_running_keeps_its_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same job, same restart count, same host, live pid: a second step of one job, not a requeue."""
    code = "import sys; sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        state = tmp_path / "state"
        holder = {"host": socket.gethostname(), "pid": child.pid, "started": "T0", "slurm_job_id": "4242"}
        plant(state, holder)
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        with pytest.raises(RunLockedError, match="Slurm job 4242"):
            RunLock(state).acquire()
    finally:
        child.communicate(b"", timeout=30)


def test_release_leaves_a_lock_that_is_not_ours(tmp_path: Path) -> None:
    state = tmp_path / "state"
    lock = RunLock(state)
    lock.acquire()
    other = {"host": "elsewhere", "pid": 1, "started": "T0", "token": "theirs"}
    (state / "run.lock").write_text(json.dumps(other))
    lock.release()
    lock.release()
    assert json.loads((state / "run.lock").read_text()) == other


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to drop privileges"
)
def test_lock_in_a_directory_we_cannot_write_raises_permission_denied(tmp_path: Path) -> None:
    # Root ignores directory modes, so the check runs as `nobody` in a child process.
    tmp_path.chmod(0o755)
    state = tmp_path / "state"
    code = textwrap.dedent(
        f"""
        from pathlib import Path
        from engine.exceptions import PermissionDeniedError
        from engine.lock import RunLock
        try:
            RunLock(Path({str(state)!r})).acquire()
        except PermissionDeniedError as err:
            print("denied:", err)
        """
    )
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=30,
    )
    assert out.stdout.startswith("denied:"), out.stderr
    assert str(state) in out.stdout


# -- shared (shards) and exclusive -----------------------------------------------------------------
def test_two_shards_hold_the_folder_at_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    state = out / ".tessmirror"
    with RunLock(state, out_dir=out, shard="shard-0-of-2"), RunLock(state, out_dir=out, shard="shard-1-of-2"):
        assert (state / "shard-0-of-2.lock").exists() and (state / "shard-1-of-2.lock").exists()
        assert len(list((state / "run.lock.d").iterdir())) == 2
        assert not (state / "run.lock").exists()
    assert not list((state / "run.lock.d").iterdir()), "released shards leave no entry"


def test_one_shard_cannot_run_twice(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with (
        RunLock(out / ".tessmirror", out_dir=out, shard="shard-1-of-4"),
        pytest.raises(RunLockedError) as caught,
    ):
        RunLock(out / ".tessmirror", out_dir=out, shard="shard-1-of-4").acquire()
    assert f"pid {os.getpid()}" in str(caught.value)


def test_an_exclusive_run_is_refused_beside_a_shard_naming_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    state = out / ".tessmirror"
    with RunLock(state, out_dir=out, shard="shard-2-of-8"):
        with pytest.raises(RunLockedError) as caught:
            RunLock(state, out_dir=out).acquire()
        assert caught.value.exit_code == EXIT_LOCAL
        assert "shard 2/8" in str(caught.value) and f"pid {os.getpid()}" in str(caught.value)
        assert not (state / "run.lock").exists(), "the refused run took nothing"


def test_a_shard_is_refused_beside_an_exclusive_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    state = out / ".tessmirror"
    with RunLock(state, out_dir=out):
        with pytest.raises(RunLockedError) as caught:
            RunLock(state, out_dir=out, shard="shard-0-of-2").acquire()
        assert f"pid {os.getpid()}" in str(caught.value)
        assert not list((state / "run.lock.d").iterdir()), "the refused shard left no entry"
        assert not (state / "shard-0-of-2.lock").exists()


def test_the_race_where_both_created_their_files_refuses_at_least_one(tmp_path: Path) -> None:
    """Exclusive and shared each create first and look second: planted at the worst instant (both
    files exist before either looks), each sees the other."""
    out = tmp_path / "out"
    state = out / ".tessmirror"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        entry = {"host": socket.gethostname(), "pid": live.pid, "token": "x" * 32, "shard": "1/2"}
        (state / "run.lock.d").mkdir(parents=True)
        (state / "run.lock.d" / f"h.{live.pid}.xxxxxxxx").write_text(json.dumps(entry))
        with pytest.raises(RunLockedError, match="shard 1/2"):
            RunLock(state, out_dir=out).acquire()
        (state / "run.lock.d" / f"h.{live.pid}.xxxxxxxx").unlink()
        plant(state, {"host": socket.gethostname(), "pid": live.pid, "token": "y" * 32})
        with pytest.raises(RunLockedError, match=f"pid {live.pid}"):
            RunLock(state, out_dir=out, shard="shard-0-of-2").acquire()
    finally:
        live.kill()
        live.wait()


def test_a_stale_shard_entry_is_removed_and_does_not_block_a_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    state = out / ".tessmirror"
    (state / "run.lock.d").mkdir(parents=True)
    stale = state / "run.lock.d" / "h.1.deadbeef"
    stale.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "token": "z" * 32}))
    with RunLock(state, out_dir=out):
        assert not stale.exists()


def test_a_shard_declares_its_need_and_sees_the_others(tmp_path: Path) -> None:
    out = tmp_path / "out"
    state = out / ".tessmirror"
    with (
        RunLock(state, out_dir=out, shard="shard-0-of-2") as a,
        RunLock(state, out_dir=out, shard="shard-1-of-2") as b,
    ):
        a.declare_need(1000)
        b.declare_need(300)
        assert a.others_need() == 300
        assert b.others_need() == 1000


RACER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from engine.exceptions import RunLockedError
    from engine.lock import RunLock

    out, kind, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    holders = out / "holders"
    me = holders / f"{kind}.{os.getpid()}"
    held = 0
    (out / "ready" / str(os.getpid())).touch()
    while not (out / "go").exists():  # start together: the races are the point
        pass
    for i in range(rounds):
        lock = RunLock(out / ".tessmirror", out_dir=out, shard=None if kind == "x" else f"shard-{kind}-of-9")
        try:
            lock.acquire()
        except RunLockedError:
            continue
        try:
            held += 1
            me.touch()
            others = [p.name for p in holders.iterdir() if p != me]
            if kind == "x" and others or kind != "x" and any(n.startswith("x.") for n in others):
                print("overlap:", kind, others)
                sys.exit(1)
            me.unlink()
        finally:
            lock.release()
    print("held", held)
    """
)


def test_exclusive_and_shared_holders_racing_in_processes_never_overlap(tmp_path: Path) -> None:
    """Two exclusive runs and three shards hammer one folder at once: an exclusive holder never sees
    another holder, a shard never sees an exclusive one; every process gets its turn sometimes."""
    out = tmp_path / "out"
    (out / "holders").mkdir(parents=True)
    (out / "ready").mkdir()
    kinds = ["x", "x", "0", "1", "2"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(out), kind, "150"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for kind in kinds
    ]
    assert wait_until(lambda: len(list((out / "ready").iterdir())) == len(kinds), timeout=60)
    (out / "go").touch()
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (stdout, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stdout + stderr[-2000:]
    held = [int(stdout.split()[-1]) for stdout, _ in results]
    assert sum(held[:2]) > 0 and sum(held[2:]) > 0, held
    assert sum(held) < 150 * len(kinds), "they did contend: some tries were refused"
    assert not (out / ".tessmirror" / "run.lock").exists()
    assert not list((out / ".tessmirror" / "run.lock.d").iterdir())
