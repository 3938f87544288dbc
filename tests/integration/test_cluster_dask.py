"""`tessmirror run --cluster local`: one mirror spread over Dask worker processes on 127.0.0.1.

Each test runs the real CLI (the driver) in a subprocess, with a `distributed.LocalCluster` of 2 worker
processes (host 127.0.0.1, no dashboard), against the local archive or a counting file server. They
check what the issue asks: a full run verified; a worker killed with SIGKILL mid-batch (its batch is
rescheduled, nothing lost or corrupt); the driver killed and the run resumed from the manifest; the
global connection cap (jobs x job-concurrency) at the server; and a 429 pausing every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import signal
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from astropy.io import fits

from engine.archive.faults import FaultPlan
from engine.manifest import Manifest
from tests.helpers import (
    WatchedCli,
    assert_mirror_matches_truth,
    assert_verified_records_are_good,
    file_server,
    lc_names_in_footprint,
    manifest_lines,
    run_cli,
    stacks_of,
    wait_until,
)

pytest.importorskip("distributed", reason="the cluster extra: pip install '.[cluster]' (CI installs it)")
pytestmark = pytest.mark.integration

PART_RE = re.compile(r"\.part\.(?P<host>[^/]+)\.(?P<pid>\d+)$")


def cluster_config(tmp_path: Path, **cluster: object) -> Path:
    """A config file with a [cluster] table (batch sizes have no flag). A batch that does not move
    for a minute has its worker restarted (`run_watched` reports it as a warning of the test run)."""
    path = tmp_path / "cluster.toml"
    cluster = {"stall_timeout": 60, **cluster}
    lines = ["[cluster]"] + [f"{key} = {json.dumps(value)}" for key, value in cluster.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def parts_under(out_dir: Path) -> list[Path]:
    """Every part file (any writer's) left under the output folder."""
    return [p for p in out_dir.rglob("*") if ".part" in p.name and ".tessmirror" not in p.parts]


def no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, text[-3000:]


def run_args(archive, out_dir: Path, config: Path, *extra: object) -> list[object]:
    return [
        "run",
        "--sector", 1, "--camera", 1, "--ccd", 2,
        "--tap-url", archive.tap_url,
        "--out", out_dir,
        "--config", config,
        "--cluster", "local", "--jobs", 2, "--job-concurrency", 2,
        *extra,
    ]  # fmt: skip


def gets(archive) -> Counter[str]:
    """File name -> GET requests answered for it (whole files and ranges)."""
    return Counter(r.name for r in archive.request_log if r.method == "GET" and r.name)


# -- a full run ---------------------------------------------------------------------------------
def test_a_full_run_on_two_local_workers_is_verified_and_leaves_no_parts(archive, tmp_path: Path) -> None:
    arch = archive(targets=30, focus=(1, 1, 2))
    names = lc_names_in_footprint(arch, 1, 1, 2)
    out = tmp_path / "out"
    config = cluster_config(tmp_path, batch_files=6)
    result = run_watched(*run_args(arch, out, config))
    assert result.proc.returncode == 0, result.stderr[-3000:]
    no_traceback(result.stderr, result.stdout)
    assert "2 jobs x 2 connections = at most 4 connections" in result.stderr
    assert_mirror_matches_truth(out, arch, names)
    assert assert_verified_records_are_good(out, arch) == len(names)
    assert parts_under(out) == []
    assert max(gets(arch).values()) == 1  # every file fetched exactly once
    again = run_cli(*run_args(arch, out, config), timeout=240)  # a rerun skips everything
    assert again.returncode == 0, again.stderr[-3000:]
    assert sum(gets(arch).values()) == len(names)


# -- a worker killed mid-batch ------------------------------------------------------------------
def test_a_worker_killed_mid_batch_has_its_batch_rescheduled_and_nothing_is_lost(
    archive, tmp_path: Path
) -> None:
    # Files of 1.1 MB (large enough to be resumed across writers) at 250 kB/s per response: a kill
    # lands in the middle of a transfer.
    arch = archive(targets=12, focus=(1, 1, 2), file_size=11_000, faults=FaultPlan(bandwidth=250_000))
    names = lc_names_in_footprint(arch, 1, 1, 2)
    out = tmp_path / "out"
    config = cluster_config(tmp_path, batch_files=3)
    # -v: the workers' lines (each try, each lease wait, each part continued) join the driver's log, so
    # a failure here shows what the rescheduled batch was doing.
    cli = WatchedCli(*run_args(arch, out, config, "-v"))

    def a_part() -> Path | None:
        """A worker's part with bytes in it: its validator is stored, so it can be continued."""
        for path in parts_under(out):
            if PART_RE.search(path.name) and not path.name.endswith(".meta.part"):
                with contextlib.suppress(OSError):
                    if path.stat().st_size > 0:
                        return path
        return None

    assert wait_until(lambda: a_part() is not None or cli.proc.poll() is not None, timeout=120)
    part = a_part()
    assert part is not None and cli.proc.poll() is None, cli.stderr[-3000:]
    victim = int(PART_RE.search(part.name)["pid"])  # type: ignore[index]
    assert victim != cli.proc.pid  # a worker, not the driver
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    if not wait_until(lambda: cli.proc.poll() is not None, timeout=240):
        story = what_happened_since(arch, killed_at, victim)  # while the driver's workers are its own
        try:
            cli.finish(timeout=1, shown=12000)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{story}") from None
    code, _ = cli.finish(timeout=30)
    assert code == 0, cli.stderr[-3000:]
    no_traceback(cli.stderr, cli.stdout)
    report_stalls(cli.stderr)
    assert_mirror_matches_truth(out, arch, names)
    assert assert_verified_records_are_good(out, arch) == len(names)
    assert parts_under(out) == []  # the killed writer's parts were continued, none left behind
    twice = sorted(name for name, count in gets(arch).items() if count > 1)
    resumed = {r.name for r in arch.request_log if r.method == "GET" and r.range}
    print(
        f"files requested twice after the worker kill: {len(twice)} of {len(names)}, resumed with Range: "
        f"{len(resumed)}"
    )
    assert 1 <= len(twice) <= 3  # the killed batch's files at most (batch_files = 3)
    assert part.name.split(".part.")[0] in resumed  # the part we saw was continued, not restarted


def what_happened_since(archive, since: float, victim: int) -> str:
    """For a failure message: the file requests the archive saw after `since`, and the processes."""
    import psutil

    lines = [f"the worker killed: pid {victim}; file requests since the kill:"]
    for r in archive.request_log:
        if r.time >= since:
            lines.append(f"  +{r.time - since:6.1f} s {r.method} {r.name} {r.status} {r.range!r} {r.fault}")
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            lines.append(f"  process {proc.pid} {proc.status()}: {' '.join(proc.cmdline())[:160]}")
    return "\n".join(lines)


# -- the driver killed, then resumed --------------------------------------------------------------
def test_the_driver_killed_resumes_from_the_manifest_when_run_again(archive, tmp_path: Path) -> None:
    import psutil

    arch = archive(targets=20, focus=(1, 1, 2), faults=FaultPlan(bandwidth=40_000))
    names = lc_names_in_footprint(arch, 1, 1, 2)
    out = tmp_path / "out"
    config = cluster_config(tmp_path, batch_files=4)
    cli = WatchedCli(*run_args(arch, out, config))
    manifest = out / ".tessmirror" / "manifest.jsonl"
    assert wait_until(lambda: manifest_lines(manifest) >= 4 or cli.proc.poll() is not None, timeout=120)
    assert cli.proc.poll() is None, cli.stderr[-3000:]
    workers = psutil.Process(cli.proc.pid).children(recursive=True)
    cli.proc.send_signal(signal.SIGKILL)
    cli.finish(timeout=30)
    killed_at = time.time()
    before = {
        e.path.rsplit("/", 1)[-1]
        for e in Manifest(out / ".tessmirror").load().values()
        if e.status == "verified"
    }
    assert before and before < names
    # The driver's workers end without it (they lose their scheduler), rather than mirror on alone.
    gone = wait_until(lambda: not any(w.is_running() and w.status() != "zombie" for w in workers), timeout=60)
    for worker in workers:  # never leave a stray process behind, whatever the assertion says
        if worker.is_running():
            worker.kill()
    assert gone, "worker processes outlived the killed driver by a minute"
    again = run_cli(*run_args(arch, out, config), timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    no_traceback(again.stderr, again.stdout)
    assert_mirror_matches_truth(out, arch, names)
    assert assert_verified_records_are_good(out, arch) == len(names)
    assert parts_under(out) == []
    after = {r.name for r in arch.request_log if r.method == "GET" and r.time > killed_at}
    assert not (after & before), f"verified before the kill, requested again: {sorted(after & before)}"


# -- the global limit and the shared pause, at a counting server ----------------------------------
def small_fits() -> bytes:
    buffer = io.BytesIO()
    fits.PrimaryHDU(np.arange(100, dtype=np.int16)).writeto(buffer, checksum=True)
    return buffer.getvalue()


@dataclass
class Census:
    """What the server saw: requests in flight (and the most at once), and every request's arrival."""

    in_flight: int = 0
    most_in_flight: int = 0
    arrivals: list[tuple[float, str, int]] = field(default_factory=list)  # (time, name, status)


@contextmanager
def counting_server(
    body: bytes, *, delay: float, throttle: dict[str, float] | None = None, hang: set[str] | None = None
) -> Iterator[tuple[str, Census]]:
    """A file server on 127.0.0.1 (free port): each answer takes `delay` s; the first request for a
    name in `throttle` is answered 429 with that Retry-After (seconds); the first for a name in `hang`
    is never answered."""
    census = Census()
    throttled = dict(throttle or {})
    hanging = set(hang or ())

    async def handler(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name in hanging:
            hanging.discard(name)
            census.arrivals.append((time.time(), name, 0))
            # No answer until the client goes away (its worker is restarted).
            while request.transport is not None and not request.transport.is_closing():
                await asyncio.sleep(0.2)
            return web.Response(status=499)
        retry_after = throttled.pop(name, None)
        census.arrivals.append((time.time(), name, 429 if retry_after is not None else 200))
        if retry_after is not None:
            return web.Response(status=429, headers={"Retry-After": f"{retry_after:g}"}, text="slow down\n")
        census.in_flight += 1
        census.most_in_flight = max(census.most_in_flight, census.in_flight)
        try:
            await asyncio.sleep(delay)
        finally:
            census.in_flight -= 1
        return web.Response(body=body, content_type="application/fits")

    with file_server(handler) as base:
        yield base, census


def run_watched(
    *args: object, timeout: float = 240, census: Census | None = None, stalls: bool = False
) -> WatchedCli:
    """The CLI with -v, to its end: the workers' lines join its log and, while no batch comes back,
    the driver says where each batch is, so a run that hangs fails with the story of its last minutes
    (and every thread's stack, and what the counting server saw). A worker restarted for a stalled
    batch that the test did not cause (`stalls`) is reported as a warning of the test session, with
    the driver's look at the batches before it: a defect to find, shown even when the run recovers."""
    cli = WatchedCli(*args, "-v")
    try:
        cli.finish(timeout=timeout, shown=12000)
    except AssertionError as err:
        if census is None:
            raise
        now = time.time()
        seen = [f"+{t - now:.1f} s {name} {status}" for t, name, status in census.arrivals[-20:]]
        raise AssertionError(
            f"{err}\n-- the server: {len(census.arrivals)} requests, {census.in_flight} in flight; the last "
            f"(seconds before now): {', '.join(seen)}\n-- this test's own process (the server's thread) --\n"
            f"{stacks_of(os.getpid(), children=False)}"
        ) from None
    if not stalls:
        report_stalls(cli.stderr)
    return cli


def report_stalls(log: str) -> None:
    """A worker restarted for a stalled batch, as a warning of the test session (see `run_watched`)."""
    lines = log.splitlines()
    restarts = [i for i, line in enumerate(lines) if "restarting that worker" in line]
    if restarts:
        before = "\n".join(lines[max(0, restarts[0] - 60) : restarts[0] + 1])
        warnings.warn(f"a batch stalled and its worker was restarted:\n{before}", UserWarning, stacklevel=3)


def fetch_args(base: str, tmp_path: Path, count: int, config: Path, jobs: int, per_job: int) -> list[object]:
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"{base}/files/f{i:03d}.fits\n" for i in range(count)))
    return [
        "fetch", "--input", urls, "--out", tmp_path / "out", "--config", config,
        "--concurrency", 8,  # the in-process figure: a cluster run must not use it per job
        "--cluster", "local", "--jobs", jobs, "--job-concurrency", per_job,
    ]  # fmt: skip


def test_the_archive_never_sees_more_than_jobs_times_job_concurrency_connections(tmp_path: Path) -> None:
    config = cluster_config(tmp_path, batch_files=6)
    with counting_server(small_fits(), delay=0.5) as (base, census):
        result = run_watched(*fetch_args(base, tmp_path, 48, config, jobs=2, per_job=3), census=census)
    assert result.proc.returncode == 0, result.stderr[-3000:]
    no_traceback(result.stderr)
    print(f"peak connections {census.most_in_flight}, cap 2 x 3 = 6")
    assert census.most_in_flight <= 6
    assert census.most_in_flight == 6  # both workers at their full share at once: the cap is the bound
    assert len(list((tmp_path / "out").rglob("*.fits"))) == 48


def test_a_429_seen_by_one_worker_pauses_every_worker(tmp_path: Path) -> None:
    retry_after = 6.0
    config = cluster_config(tmp_path, batch_files=4)
    with counting_server(small_fits(), delay=0.2, throttle={"f014.fits": retry_after}) as (base, census):
        # Enough files that one worker alone would still be busy long after the 429 (10 files/s).
        result = run_watched(*fetch_args(base, tmp_path, 120, config, jobs=2, per_job=2), census=census)
    assert result.proc.returncode == 0, result.stderr[-3000:]
    no_traceback(result.stderr)
    assert len(list((tmp_path / "out").rglob("*.fits"))) == 120
    told = next(t for t, _name, status in census.arrivals if status == 429)
    # The other worker hears of the pause within a poll (1 s) of its publication; requests already
    # under way finish. From then until the Retry-After has passed, nobody starts a request.
    quiet_from, quiet_to = told + 2.0, told + retry_after - 0.5
    during = [(round(t - told, 2), name) for t, name, _status in census.arrivals if quiet_from < t < quiet_to]
    print(f"requests {quiet_from - told:.1f}-{quiet_to - told:.1f} s after the 429: {during}")
    assert during == []
    assert any(t > quiet_to for t, _n, _s in census.arrivals)  # and the run went on afterwards


def test_a_batch_that_stalls_has_its_worker_restarted_and_the_run_finishes(tmp_path: Path) -> None:
    """One request is never answered, and no timeout of the transfer ends it (idle timeout 1 hour):
    its batch stops moving. After `cluster.stall_timeout` the driver restarts that worker, says so,
    and the batch runs again: every file arrives and the run exits 0."""
    config = cluster_config(tmp_path, batch_files=4, stall_timeout=20)
    with config.open("a") as fh:
        fh.write("[fetch]\nidle_timeout = 3600\n")
    with counting_server(small_fits(), delay=0.2, hang={"f005.fits"}) as (base, census):
        args = fetch_args(base, tmp_path, 12, config, jobs=2, per_job=2)
        result = run_watched(*args, census=census, stalls=True)
    assert result.proc.returncode == 0, result.stderr[-3000:]
    no_traceback(result.stderr)
    said = [line for line in result.stderr.splitlines() if "restarting that worker" in line]
    print(said)
    assert len(said) == 1 and "WARNING" in said[0] and "has not moved for" in said[0], result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.fits")) == [f"f{i:03d}.fits" for i in range(12)]
    assert [name for _t, name, _s in census.arrivals].count("f005.fits") == 2  # hung once, then answered


def test_the_python_api_mirrors_on_a_local_cluster(archive, tmp_path: Path) -> None:
    """`mirror(..., cluster="local", jobs=2, job_concurrency=2)`: the same run as the CLI's, from
    Python (its own loop in a worker thread), every file verified."""
    import subprocess
    import sys

    arch = archive(targets=12, focus=(1, 1, 2))
    names = lc_names_in_footprint(arch, 1, 1, 2)
    out = tmp_path / "out"
    script = (
        "from engine import mirror\n"
        f"results = mirror(tap_url={arch.tap_url!r}, sector=1, camera=1, ccd=2, out_dir={str(out)!r},\n"
        "                 cluster='local', jobs=2, job_concurrency=2, progress=False)\n"
        "print('verified', sum(1 for status in results['status'] if status == 'verified'))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    no_traceback(done.stderr)
    assert f"verified {len(names)}" in done.stdout, done.stdout + done.stderr[-2000:]
    assert_mirror_matches_truth(out, arch, names)
    assert assert_verified_records_are_good(out, arch) == len(names)
    assert parts_under(out) == []


# -- the runner mode's ranks, without Slurm -------------------------------------------------------
def test_slurm_runner_ranks_serve_scheduler_driver_and_workers_from_one_command(
    archive, tmp_path: Path
) -> None:
    """What `srun -n 4 tessmirror run ... --cluster slurm-runner` starts, with the environment srun
    sets (SLURM_PROCID, SLURM_NTASKS, SLURM_JOB_ID): rank 0 the scheduler, rank 1 the driver, ranks
    2-3 workers; every rank exits 0 once the driver is done. (tests/integration/test_slurm.py runs it
    under a real Slurm.)"""
    arch = archive(targets=12, focus=(1, 1, 2))
    names = lc_names_in_footprint(arch, 1, 1, 2)
    out = tmp_path / "out"
    config = cluster_config(tmp_path)
    args = [a if a != "local" else "slurm-runner" for a in run_args(arch, out, config, "-v")]
    ranks = [
        WatchedCli(*args, env={"SLURM_PROCID": str(rank), "SLURM_NTASKS": "4", "SLURM_JOB_ID": "4242"})
        for rank in range(4)
    ]
    try:
        codes = [rank.finish(timeout=180)[0] for rank in ranks]
    except AssertionError as err:  # a rank still running: what every rank said, the driver's with -v
        told = "\n".join(f"-- rank {n}:\n{rank.stderr[-6000:]}" for n, rank in enumerate(ranks))
        raise AssertionError(f"{err}\n{told}") from None
    finally:
        for rank in ranks:
            if rank.proc.poll() is None:
                rank.proc.kill()
    assert codes == [0, 0, 0, 0], "\n".join(rank.stderr[-1500:] for rank in ranks)
    no_traceback(*(rank.stderr for rank in ranks))
    assert "planned" in ranks[1].stdout + ranks[1].stderr  # the driver's summary; the others serve
    assert "serves the Dask scheduler" in ranks[0].stderr and "serves a Dask worker" in ranks[2].stderr
    assert_mirror_matches_truth(out, arch, names)
    assert assert_verified_records_are_good(out, arch) == len(names)


# -- without the extra ------------------------------------------------------------------------------
def test_a_cluster_without_dask_installed_is_one_line_naming_the_fix(tmp_path: Path) -> None:
    broken = tmp_path / "site"
    (broken / "distributed").mkdir(parents=True)
    (broken / "distributed" / "__init__.py").write_text("raise ImportError('no Dask here')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(broken), os.environ.get("PYTHONPATH", "")])}
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/files/a.fits\n")
    result = run_cli("fetch", "--input", urls, "--out", tmp_path / "out", "--cluster", "local", env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("tessmirror: error: cluster.mode: --cluster local needs Dask"), lines
    assert "pip install 'tessmirror[cluster]'" in lines[-1]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


# -- an existing scheduler ------------------------------------------------------------------------------
@dataclass
class DaskProcesses:
    """A `dask scheduler` and its `dask worker --resources MAST=1` processes on 127.0.0.1."""

    address: str
    scheduler_file: Path
    workers: list = field(default_factory=list)  # subprocess.Popen of each worker started

    def add_worker(self) -> None:
        import subprocess
        import sys

        self.workers.append(
            subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                 str(self.scheduler_file), "--host", "127.0.0.1", "--nthreads", "1", "--resources", "MAST=1",
                 "--no-dashboard", "--no-nanny"],
                env={**os.environ, "DASK_LOGGING__DISTRIBUTED": "error"},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip


@contextmanager
def dask_scheduler_with_workers(tmp_path: Path, workers: int) -> Iterator[DaskProcesses]:
    """`dask scheduler` and `workers` workers on 127.0.0.1. Every process is stopped afterwards."""
    import subprocess
    import sys

    scheduler_file = tmp_path / "scheduler.json"
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
         "--no-dashboard", "--scheduler-file", str(scheduler_file)],
        env={**os.environ, "DASK_LOGGING__DISTRIBUTED": "error"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    dask = DaskProcesses("", scheduler_file)
    try:
        assert wait_until(scheduler_file.exists, timeout=60), "the scheduler did not start"
        for _ in range(workers):
            dask.add_worker()
        dask.address = json.loads(scheduler_file.read_text())["address"]
        yield dask
    finally:
        for proc in [*reversed(dask.workers), scheduler]:
            proc.terminate()
        for proc in [*dask.workers, scheduler]:
            try:
                proc.wait(timeout=30)
            except Exception:
                proc.kill()
                proc.wait()


def test_an_existing_scheduler_runs_at_most_jobs_batches_whatever_its_worker_count(tmp_path: Path) -> None:
    """`--cluster tcp://...` with 2 MAST workers but --jobs 1: the run's semaphore lets one batch at a
    time work, so the archive sees at most 1 x job-concurrency connections."""
    config = cluster_config(tmp_path, batch_files=4)
    with (
        dask_scheduler_with_workers(tmp_path, workers=2) as dask,
        counting_server(small_fits(), delay=0.3) as (base, census),
    ):
        address = dask.address
        args = fetch_args(base, tmp_path, 24, config, jobs=1, per_job=3)
        args[args.index("local")] = address
        result = run_watched(*args, census=census)
    assert result.proc.returncode == 0, result.stderr[-3000:]
    no_traceback(result.stderr)
    assert f"cluster {address}: 1 jobs x 3 connections = at most 3 connections" in result.stderr
    print(f"peak connections {census.most_in_flight} with 2 workers, cap 1 x 3 = 3")
    assert census.most_in_flight == 3
    assert len(list((tmp_path / "out").rglob("*.fits"))) == 24


def test_a_run_whose_only_worker_died_says_so_and_goes_on_when_a_worker_joins(tmp_path: Path) -> None:
    """`--cluster tcp://...` whose one worker is killed mid-run: the driver does not wait in silence
    (a warning names the empty cluster), and a worker started later finishes every file."""
    config = cluster_config(tmp_path, batch_files=4)
    with (
        dask_scheduler_with_workers(tmp_path, workers=1) as dask,
        counting_server(small_fits(), delay=1.0) as (base, census),
    ):
        args = fetch_args(base, tmp_path, 16, config, jobs=1, per_job=2)
        args[args.index("local")] = dask.address
        cli = WatchedCli(*args)
        assert wait_until(lambda: census.arrivals or cli.proc.poll() is not None, timeout=120)
        assert cli.proc.poll() is None, cli.stderr[-3000:]
        dask.workers[0].kill()
        said = "no Dask worker for"
        assert wait_until(lambda: said in cli.stderr or cli.proc.poll() is not None, timeout=150)
        assert cli.proc.poll() is None, cli.stderr[-3000:]
        dask.add_worker()
        code, _ = cli.finish(timeout=240, shown=12000)
    assert code == 0, cli.stderr[-3000:]
    no_traceback(cli.stderr)
    warning = next(line for line in cli.stderr.splitlines() if "no Dask worker for" in line)
    print(warning)
    assert "WARNING" in warning and "batches wait for one" in warning
    assert len(list((tmp_path / "out").rglob("*.fits"))) == 16
