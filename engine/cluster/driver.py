"""The driver side of a Dask run: start or join the cluster, batch the queue, record what returns.

    run's queue ──▶ prep tasks (supersede/adopt, as in-process) ──▶ batches of ~200 files / ~1 GB
        ──▶ client.submit(run_batch, resources={"MAST": 1}) ── at most `jobs` on the cluster ──▶
        collector ──▶ MirrorRun.finish_job (the manifest's one writer, as for a local result)

The cluster holds at most `jobs` batches, one per lease of the run's semaphore: a batch sent beyond
that could only wait, queued on a worker behind another, where it is stranded if that worker stalls
or dies. The next batch of each job is filled on the driver meanwhile (the prep tasks wait for a
place with it), so a job that returns one gets the next at once. A partial batch goes out at once when
the queue runs dry and a job would otherwise idle, so a slow planner (TAP) never starves the workers;
a fast one fills whole batches. Memory is bounded by about 2 x jobs batches (out, and being filled),
not by the plan.

Imports Dask at module level: only `engine.cluster.executors` imports this module, once a Dask mode
was chosen and found installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import distributed
from dask.utils import parse_timedelta
from distributed import Client, Variable

from engine.cluster import ClusterSpec, import_extra
from engine.cluster.batch import (
    BatchReport,
    BatchSpec,
    WorkerView,
    run_batch,
    token_digest,
    unpack,
    worker_view,
)
from engine.exceptions import ConfigError, LocalError, TessMirrorError
from engine.fetch.session import DEFAULT_TOKEN_HOSTS, read_token
from engine.models import FileResult, FileStatus, PlanItem
from engine.redact import describe_error, redact

if TYPE_CHECKING:
    from engine.cluster.executors import RunHooks
    from engine.fetch.download import Downloader
    from engine.manifest import ManifestWriter
    from engine.settings import Settings

log = logging.getLogger(__name__)
# The schedulers this run starts (local, slurm, a slurm-runner's rank 0):
# - look for the leases of killed workers every 3 s (a dead worker's batch slot comes back sooner);
# - no work stealing. A batch is coarse (about 200 files, minutes of work) and the driver keeps only
#   `jobs` of them out, so moving queued batches between workers gains little, while each
#   move is a two-step hand-over that races with a worker's death (a class of Dask bugs that leave
#   a task "processing" nowhere), and a run must survive worker deaths. A worker that joins late
#   gets the batches sent after it joined.
SCHEDULER_CONFIG = {
    "distributed.scheduler.locks.lease-validation-interval": "3s",
    "distributed.scheduler.work-stealing": False,
}
HEALTH_SECONDS = 30.0  # with batches out and none back, look at the cluster this often
NO_WORKERS_WARN = 30.0  # batches out and no worker this long: say so (every HEALTH_SECONDS)
NO_WORKERS_GIVE_UP = 300.0  # a local cluster without a worker this long cannot recover: end the run
RESOURCE = "MAST"  # every worker has MAST=1 and every batch asks for 1: one batch per worker at a time
MAX_RESENDS = (
    3  # a batch that stopped early (lost the scheduler) has its unfinished files sent again this often
)
STOP_GRACE = 2.0  # seconds for running batches to notice a stop and return, when the run is interrupted
WORKERS_TIMEOUT = 60.0  # seconds to wait for a worker of an existing scheduler (tcp://)
RUNNER_DEATH_TIMEOUT = 60  # seconds a slurm-runner worker waits for a scheduler it cannot reach
# A worker's states of a task that has not started there (distributed.worker_state_machine).
_NOT_STARTED = frozenset({"waiting", "ready", "constrained", "fetch", "flight", "missing"})
_DASK_LOG_LEVEL = logging.CRITICAL  # Dask's own chatter (worker restarts, closed comms) stays out
_DASK_LOGGERS = ("distributed", "dask", "dask_jobqueue", "tornado")


@dataclass(slots=True)
class _Batch:
    number: int
    items: list[tuple[PlanItem, str, bool]]  # (item, relpath, changed)
    submitted: float = 0.0  # time.monotonic() when it was sent
    resent: int = 0  # how many batches before it stopped with these files unfinished


def quiet_dask_logs() -> None:
    """Keep Dask's own log lines (worker restarts, closed comms on shut-down, with their tracebacks)
    out of the run's log: what matters reaches it as tessmirror's own lines."""
    names = [name for name in logging.root.manager.loggerDict if name.split(".")[0] in _DASK_LOGGERS]
    for name in {*_DASK_LOGGERS, *names}:
        logging.getLogger(name).setLevel(_DASK_LOG_LEVEL)


def _engine_level() -> int:
    """The level this run logs `engine` at (INFO; DEBUG with -v, WARNING with -q)."""
    return logging.getLogger("engine").getEffectiveLevel()


def runner_scheduler_file(state_dir: Path) -> Path:
    """Where the ranks of one `slurm-runner` allocation meet: per job and per requeue, so a stale file
    of an earlier attempt is never read."""
    job = os.environ.get("SLURM_JOB_ID", "0")
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    return state_dir / f"dask-scheduler-{job}-{restart}.json"


def _runner_class() -> Any:
    """dask_jobqueue's SLURMRunner, imported without letting it replace our SIGINT handler (its
    module installs ``sys.exit`` on import; our handler stops the run gracefully instead)."""
    import_extra("dask_jobqueue")
    from dask_jobqueue.slurm import SLURMRunner

    return SLURMRunner


# The scheduler's HTTP server (dashboard, metrics) is never wanted: with `dashboard_address=None`
# Dask still opens it on port 8787 of the scheduler's own address, all interfaces for a runner.
# Loopback and a free port keep it off the network and keep two runs on one node apart.
DASHBOARD = "127.0.0.1:0"


def _runner_options(spec: ClusterSpec, settings: Settings) -> dict[str, Any]:
    scheduler: dict[str, Any] = {"dashboard_address": DASHBOARD}
    worker: dict[str, Any] = {
        "resources": {RESOURCE: 1},
        "nthreads": 1,
        # A worker that cannot reach the scheduler for a minute ends (its rank exits): the driver
        # may have ended the scheduler before this worker ever joined.
        "death_timeout": RUNNER_DEATH_TIMEOUT,
    }
    # The network the allocation talks over (ib0 at a site, lo in the tests): the same setting
    # `--cluster slurm` honours through dask-jobqueue (DASK_JOBQUEUE__SLURM__INTERFACE).
    interface = dask.config.get("jobqueue.slurm.interface", default=None)
    if interface:
        scheduler["interface"] = worker["interface"] = interface
    return {
        "scheduler_file": str(runner_scheduler_file(settings.state_dir)),
        "scheduler_options": scheduler,
        "worker_options": worker,
    }


def serve_runner_role(spec: ClusterSpec, settings: Settings) -> int | None:
    """In a `slurm-runner` allocation, every rank runs the same command. Rank 1 is the driver: None
    (go on and run). Rank 0 serves the scheduler and the others a worker, until the driver ends the
    cluster: then 0 (the rank's exit code). Never takes a lock or plans."""
    rank = os.environ.get("SLURM_PROCID")
    if rank is None or not os.environ.get("SLURM_JOB_ID"):
        raise ConfigError(
            "cluster.mode",
            "slurm-runner runs inside a Slurm allocation, and SLURM_PROCID/SLURM_JOB_ID are not set",
            hint="start it with srun inside sbatch -N K (one task per node, at least 3 tasks), or use "
            "--cluster slurm",
        )
    if rank == "1":
        return None
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    runner_class = _runner_class()
    quiet_dask_logs()
    if rank == "0":
        dask.config.set(SCHEDULER_CONFIG)
    role = "the Dask scheduler" if rank == "0" else "a Dask worker"
    log.info("slurm-runner: rank %s serves %s until the driver (rank 1) ends the run", rank, role)
    # SLURMRunner ends a scheduler's or worker's role by sending SIGINT to its own process; here that
    # is the end of this rank (our handler would treat it as a user's Ctrl-C).
    signal.signal(signal.SIGINT, _end_role)
    try:
        with runner_class(**_runner_options(spec, settings)):
            pass
    except SystemExit:
        pass
    except (TimeoutError, asyncio.TimeoutError) as err:
        # The driver ended the scheduler (its run stopped early) before this worker joined.
        log.info("slurm-runner: rank %s found no scheduler to join (%s); the run has ended", rank, err)
    except Exception as err:
        raise LocalError(
            f"slurm-runner rank {rank} could not serve {role}: {type(err).__name__}: {redact(str(err))}",
            hint="the driver's output (rank 1) says how the run ended",
        ) from None
    return 0


async def _scheduler_address(scheduler_file: Path) -> str:
    """The address in `scheduler_file`, once the scheduler rank (started beside this one) has written
    it whole: the scheduler writes it in place, so a reader may meet it empty or half written."""
    while True:
        try:
            # In a thread: the file is on a shared file system, which may be slow to answer.
            address = json.loads(await asyncio.to_thread(scheduler_file.read_text))["address"]
        except (OSError, ValueError, KeyError, TypeError):
            await asyncio.sleep(0.2)
            continue
        if isinstance(address, str) and address:
            return address
        await asyncio.sleep(0.2)


async def _end_runner(scheduler_file: Path) -> None:
    """Terminate the scheduler named in `scheduler_file` (its workers then end too)."""
    from distributed.core import rpc

    async with rpc(await _scheduler_address(scheduler_file)) as scheduler:
        await scheduler.terminate()


def _end_role(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


class DaskExecutor:
    """Runs a mirror's downloads as batches on a Dask cluster (module docstring)."""

    def __init__(self, spec: ClusterSpec, settings: Settings) -> None:
        self.name = spec.mode
        self.spec = spec
        self.settings = settings
        self.run_id = uuid.uuid4().hex[:12]
        self.client: Any = None
        self.cluster: Any = None
        self.runner: Any = None
        self._token = read_token(settings.fetch.token_env)
        self._preps = max(settings.verify.workers, 2)
        self._slots = asyncio.Semaphore(spec.jobs)  # batches out on the cluster (module docstring)
        self._batch: list[tuple[PlanItem, str, bool]] = []
        self._batch_bytes = 0
        self._numbers = 0
        self._outstanding = 0
        self._preps_left = self._preps
        self._done: asyncio.Queue[tuple[_Batch, BatchReport | BaseException] | None] = asyncio.Queue()
        self._futures: set[Any] = set()
        self._batch_of: dict[str, _Batch] = {}  # future key -> its batch, until recorded
        self._hooks: tuple[RunHooks | None, ManifestWriter | None] = (None, None)
        self._joined = False  # slurm-runner: this driver reached the allocation's scheduler
        self._no_workers_since: float | None = None  # monotonic time the cluster was last seen empty
        self._noted_queue = 0.0  # when the driver last said the Slurm jobs seem queued
        self._waiters: set[asyncio.Task] = set()
        self._waiter_of: dict[str, asyncio.Future] = {}  # batch key -> the task awaiting its result
        self._back_unseen: set[str] = set()  # batch keys finished on the cluster, not back, at the last look
        self._looked = time.monotonic()  # when the driver last looked at the cluster (_check_health)
        self._suspects: dict[tuple[str, str], str] = {}  # (worker, batch key) -> why, at the last look
        self._restarted: dict[str, float] = {}  # worker -> monotonic time the driver last restarted it
        self.names = {
            "pause": f"tessmirror-{self.run_id}-pause",
            "stop": f"tessmirror-{self.run_id}-stop",
            "semaphore": f"tessmirror-{self.run_id}-jobs",
        }
        # What the batches have told (for the summary and the tests).
        self.batches = 0
        self.overloads = 0
        self.taken_over = 0
        self.restarts = 0  # workers restarted because a batch of theirs had stalled
        self.batch_seconds = 0.0
        self.hosts: set[tuple[str, int]] = set()

    def consumers(self, requested: int) -> int:
        return self._preps  # the driver's prep tasks; the downloads run in the batches

    # -- starting and stopping -----------------------------------------------------------------
    async def start(self) -> None:
        spec = self.spec
        quiet_dask_logs()
        log.info("%s", spec.describe())
        try:
            await self._open()
        except TessMirrorError:
            await self.close()
            raise
        except (OSError, RuntimeError, ValueError, TimeoutError) as err:
            await self.close()
            hint = "check the --cluster options (and, for Slurm, that sbatch works here)"
            if spec.mode == "local":
                # Worker processes start by spawning Python, which imports the caller's main module
                # again: a script that calls mirror() at its top level runs itself in every worker.
                hint = (
                    "from a Python script, call mirror() under `if __name__ == '__main__':` (worker "
                    "processes import the script again); see also the --cluster options"
                )
            raise LocalError(
                f"cannot start the {spec.mode} cluster: {redact(str(err) or type(err).__name__)}", hint=hint
            ) from None
        await Variable(self.names["pause"], client=self.client).set(0.0)
        await Variable(self.names["stop"], client=self.client).set(False)
        # The jobs semaphore, registered first here (the scheduler keeps the first registration):
        # a killed worker's lease is freed after half of Dask's lease timeout (15 s by default), and
        # live workers refresh theirs every fifth of it.
        timeout = parse_timedelta(dask.config.get("distributed.scheduler.locks.lease-timeout"), "s")
        await self.client.scheduler.semaphore_register(
            name=self.names["semaphore"], max_leases=spec.jobs, lease_timeout=max(timeout / 2, 5.0)
        )
        # The workers' own lines (a part continued, a batch waiting for a lease, and with -v each retry)
        # join this log, at this log's level: a batch is otherwise silent until it returns.
        await self.client.forward_logging("engine", level=_engine_level())

    async def _open(self) -> None:
        spec = self.spec
        mode = spec.mode
        if mode in ("local", "slurm"):
            # The scheduler runs in this process: look for the leases of killed workers every 3 s.
            dask.config.set(SCHEDULER_CONFIG)
        if mode == "local":
            from distributed import LocalCluster

            self.cluster = await LocalCluster(
                n_workers=spec.jobs,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=DASHBOARD,
                resources={RESOURCE: 1},
                silence_logs=_DASK_LOG_LEVEL,
                asynchronous=True,
            )
            self.client = await Client(self.cluster, asynchronous=True)
        elif mode == "slurm":
            import_extra("dask_jobqueue")
            from dask_jobqueue import SLURMCluster

            self.cluster = await SLURMCluster(**self._slurm_options(), asynchronous=True)
            self.cluster.adapt(minimum_jobs=spec.jobs, maximum_jobs=spec.jobs)
            self.client = await Client(self.cluster, asynchronous=True)
            log.info("cluster: %d Slurm jobs submitted; batches wait until their workers start", spec.jobs)
        elif mode == "slurm-runner":
            self._joined = True
            # SLURMRunner reads the scheduler file as soon as it exists, which may be mid-write.
            address = await asyncio.wait_for(
                _scheduler_address(runner_scheduler_file(self.settings.state_dir)), 300
            )
            log.info("slurm-runner: joining the scheduler at %s", address)
            self.runner = await _runner_class()(**_runner_options(spec, self.settings), asynchronous=True)
            self.client = await Client(self.runner, asynchronous=True)
        else:
            self.client = await asyncio.wait_for(Client(spec.address, asynchronous=True), WORKERS_TIMEOUT)
            await self._check_workers()

    def _slurm_options(self) -> dict[str, Any]:
        spec = self.spec
        extra_args = ["--resources", f"{RESOURCE}=1"]
        lifetime = _lifetime(spec.walltime)
        if lifetime:  # leave before the time limit: the batch goes elsewhere, never killed mid-write
            extra_args += ["--lifetime", lifetime, "--lifetime-stagger", "2m"]
        options: dict[str, Any] = {
            "cores": spec.job_cores,
            "processes": 1,
            "memory": spec.job_memory,
            "job_name": "tessmirror",
            "worker_extra_args": extra_args,
            "job_extra_directives": list(spec.job_extra),
            "scheduler_options": {"dashboard_address": DASHBOARD},
            "log_directory": str(self.settings.state_dir / "dask-logs"),
            "silence_logs": "critical",
        }
        for key in ("queue", "account", "walltime"):
            value = getattr(spec, key)
            if value:
                options[key] = value
        return options

    async def _check_workers(self) -> None:
        """An existing scheduler must have workers with the MAST resource, or batches never start."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WORKERS_TIMEOUT
        while True:
            info = await self.client.scheduler.identity()
            workers = info.get("workers", {}).values()
            if any(RESOURCE in (w.get("resources") or {}) for w in workers):
                return
            if loop.time() > deadline:
                raise ConfigError(
                    "cluster.mode",
                    f"no worker of {self.spec.address} has the {RESOURCE} resource",
                    hint=f"start workers with `dask worker {self.spec.address} --nthreads 1 "
                    f"--resources {RESOURCE}=1`",
                )
            await asyncio.sleep(1.0)

    async def close(self) -> None:
        """Ask running batches to stop, drop what is queued, and stop what `start` started. In a
        `slurm-runner` allocation whose driver stopped before it joined (another run held the lock),
        the scheduler is ended all the same: the other ranks would wait for it until the time limit."""
        if self.spec.mode == "slurm-runner" and not self._joined:
            self._joined = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_end_runner(runner_scheduler_file(self.settings.state_dir)), 60)
        client, self.client = self.client, None
        futures = list(self._futures)  # before the waiters' cancellation forgets them
        for task in self._waiters:
            task.cancel()
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(Variable(self.names["stop"], client=client).set(True), 5)
            if futures:
                # Batches see the stop within a poll (1 s) and return what they finished; a worker
                # still inside a task would hold its shut-down for seconds.
                with contextlib.suppress(Exception):
                    await distributed.wait(futures, timeout=STOP_GRACE)
            await self._record_late(futures)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.cancel(futures), 10)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 15)
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(cluster.close(), 30)
        runner, self.runner = self.runner, None
        if runner is not None:
            try:
                await asyncio.wait_for(runner.close(), 30)
            except Exception as err:
                # The runner's close terminates the scheduler rank, and the other ranks end with it:
                # without that, every rank would wait until the allocation's time limit.
                log.debug("slurm-runner: closing: %s; ending the scheduler directly", describe_error(err))
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(_end_runner(runner_scheduler_file(self.settings.state_dir)), 30)

    async def _record_late(self, futures: list[Any]) -> None:
        """Record what the batches finished before a stop (the collector was cancelled with the
        pipeline; the manifest's writer is still open): those files are not fetched again."""
        run, writer = self._hooks
        if run is None or writer is None:
            return
        late: list[tuple[_Batch, BatchReport | BaseException]] = []
        while not self._done.empty():
            entry = self._done.get_nowait()
            if entry is not None:
                late.append(entry)
        for future in futures:
            batch = self._batch_of.get(future.key)
            if batch is not None and future.status == "finished":
                with contextlib.suppress(Exception):
                    late.append((batch, await asyncio.wait_for(future.result(), 5)))
        for batch, outcome in late:
            if isinstance(outcome, BatchReport):
                with contextlib.suppress(Exception):  # a batch's fatal error: the run is over anyway
                    await self._record(run, writer, batch, outcome, live=False)

    # -- the pipeline's side ---------------------------------------------------------------------
    def workers(
        self,
        run: RunHooks,
        queue: asyncio.Queue,
        downloader: Downloader,
        writer: ManifestWriter,
        count: int,
    ) -> list[Coroutine[Any, Any, None]]:
        self._hooks = (run, writer)
        return [*(self._prep(run, queue, writer) for _ in range(self._preps)), self._collect(run, writer)]

    async def _prep(self, run: RunHooks, queue: asyncio.Queue, writer: ManifestWriter) -> None:
        """Take jobs; do the driver's steps; add what must be downloaded to the current batch."""
        try:
            while True:
                job = await queue.get()
                if not isinstance(job, tuple):  # the producer's sentinel
                    break
                item, relpath, dest, changed = job
                try:
                    result = await run.prepare_job(item, relpath, dest, changed)
                except (LocalError, asyncio.CancelledError):
                    raise
                except Exception as err:  # a bug must cost one file, not the run (as in-process)
                    log.debug("internal error before fetching %s", item.filename, exc_info=True)
                    reason = redact(f"internal error: {err}")
                    result = FileResult(item, FileStatus.FAILED, path=relpath, error=reason)
                if result is not None:
                    await run.finish_job(writer, result, changed=changed)
                    continue
                self._batch.append((item, relpath, changed))
                self._batch_bytes += max(item.size, item.est_kb * 1024, 0)
                full = len(self._batch) >= self.spec.batch_files or self._batch_bytes >= self.spec.batch_bytes
                if full:
                    await self._submit(self._take_batch())
                elif queue.empty() and self._outstanding < self.spec.jobs:
                    await self._spread()  # a job would idle: send what there is now
        finally:
            self._preps_left -= 1
        if self._preps_left == 0:
            await self._spread()  # the plan's last files
            await self._done.put(None)  # no more batches: the collector ends when the last is in

    async def _spread(self) -> None:
        """Send the current partial batch split over the free places in flight, so that a small
        plan (or the end of a large one) runs on every job, not as one batch on one worker."""
        items = self._take_batch()
        parts = max(1, min(len(items), self.spec.jobs - self._outstanding))
        for part in range(parts):
            await self._submit(items[part::parts])

    def _take_batch(self) -> list[tuple[PlanItem, str, bool]]:
        """The current batch, taken before any await: other prep tasks go on filling a new one."""
        items, self._batch, self._batch_bytes = self._batch, [], 0
        return items

    async def _submit(self, items: list[tuple[PlanItem, str, bool]]) -> None:
        if not items:
            return
        await self._slots.acquire()
        self._outstanding += 1
        try:
            self._send(items, 0)
        except BaseException:
            self._outstanding -= 1
            self._slots.release()
            raise

    def _send(self, items: list[tuple[PlanItem, str, bool]], resent: int) -> None:
        """Submit a batch in a place in flight already taken (by `_submit`, or by the batch it resends)."""
        self._numbers += 1
        batch = _Batch(self._numbers, items, resent=resent)
        batch.submitted = time.monotonic()
        future = self.client.submit(
            run_batch,
            self._spec_for(batch),
            resources={RESOURCE: 1},
            pure=False,
            key=f"tessmirror-batch-{self.run_id}-{batch.number}",
        )
        self._futures.add(future)
        self._batch_of[future.key] = batch
        waiter = asyncio.ensure_future(self._await(future, batch))
        self._waiters.add(waiter)
        self._waiter_of[future.key] = waiter
        waiter.add_done_callback(self._waiters.discard)

    def _spec_for(self, batch: _Batch) -> BatchSpec:
        settings, spec = self.settings, self.spec
        fetch = replace(
            settings.fetch,
            concurrency=spec.job_concurrency,
            per_host=min(settings.fetch.per_host or spec.job_concurrency, spec.job_concurrency),
            # A whole-run bandwidth cap is shared evenly by the jobs.
            bandwidth_limit=(settings.fetch.bandwidth_limit / spec.jobs)
            if settings.fetch.bandwidth_limit
            else None,
        )
        hosts = {*DEFAULT_TOKEN_HOSTS}
        from urllib.parse import urlsplit

        hosts.add(urlsplit(settings.tap.url).hostname or "")
        return BatchSpec(
            run_id=self.run_id,
            number=batch.number,
            out_dir=str(Path(settings.output.out_dir).resolve()),
            fetch=fetch,
            verify=settings.verify,
            fsync=settings.output.fsync,
            items=tuple((item, relpath) for item, relpath, _changed in batch.items),
            token_env=settings.fetch.token_env,
            token_digest=token_digest(self._token),
            token_hosts=tuple(sorted(h for h in hosts if h)),
            pause_name=self.names["pause"],
            stop_name=self.names["stop"],
            semaphore_name=self.names["semaphore"],
            jobs=spec.jobs,
            log_level=_engine_level(),
        )

    async def _await(self, future: Any, batch: _Batch) -> None:
        try:
            outcome: BatchReport | BaseException = await future
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the batch's worker died too often (KilledWorker), or a bug
            outcome = err
        finally:
            self._futures.discard(future)
            self._waiter_of.pop(future.key, None)
        await self._done.put((batch, outcome))

    async def _collect(self, run: RunHooks, writer: ManifestWriter) -> None:
        """Record every batch's results as they return, through the run's one recording path."""
        closed = False
        while not (closed and self._outstanding == 0):
            entry = await self._next_outcome()
            if entry is None:
                closed = True
                continue
            batch, outcome = entry
            self._batch_of.pop(f"tessmirror-batch-{self.run_id}-{batch.number}", None)
            if isinstance(outcome, BatchReport) and outcome.stopped and outcome.fatal is None:
                left = self._unfinished(batch, outcome)
                if left and batch.resent < MAX_RESENDS:
                    # The batch lost the scheduler for a minute and ended early, while this run goes on:
                    # what it did not finish goes out again, in its place in flight.
                    log.warning(
                        "batch %d on %s stopped early (it lost the scheduler); its %d unfinished files are "
                        "sent again",
                        batch.number,
                        outcome.host,
                        len(left),
                    )
                    await self._record(run, writer, batch, outcome)
                    self._send(left, batch.resent + 1)
                    continue
            self._outstanding -= 1
            self._slots.release()
            if isinstance(outcome, BaseException):
                reason = redact(f"the batch failed on the cluster: {type(outcome).__name__}: {outcome}")[:300]
                log.warning("batch %d: %s", batch.number, reason)
                for item, relpath, changed in batch.items:
                    failed = FileResult(item, FileStatus.FAILED, path=relpath, error=reason)
                    await run.finish_job(writer, failed, changed=changed)
                continue
            await self._record(run, writer, batch, outcome)

    @staticmethod
    def _unfinished(batch: _Batch, report: BatchReport) -> list[tuple[PlanItem, str, bool]]:
        finished = {packed[0] for packed in report.results}
        return [entry for index, entry in enumerate(batch.items) if index not in finished]

    async def _next_outcome(self) -> tuple[_Batch, BatchReport | BaseException] | None:
        """The next batch back, with a look at the cluster every `HEALTH_SECONDS` (also while other
        batches come back: one stalled worker among many that return must be found too)."""
        while True:
            if time.monotonic() - self._looked >= HEALTH_SECONDS:
                self._looked = time.monotonic()
                await self._check_health()
            try:
                return await asyncio.wait_for(self._done.get(), HEALTH_SECONDS)
            except (TimeoutError, asyncio.TimeoutError):  # the same class from 3.11 on
                continue

    async def _check_health(self) -> None:
        """A run whose batches wait on a cluster without workers would wait in silence for ever (all
        of them gone: out of memory, killed, their jobs ended). Say so; a local cluster that has had
        no worker for `NO_WORKERS_GIVE_UP` cannot get one back, so the run ends there. With workers,
        look for a stalled batch (`_look_at_batches`)."""
        if self.client is None or not self._batch_of:
            return
        try:
            info = await asyncio.wait_for(self.client.scheduler.identity(n_workers=-1), 10)
        except Exception as err:  # the scheduler is busy: look again next time
            log.debug("cluster: cannot read the scheduler's state: %s", describe_error(err))
            return
        workers = len(info.get("workers") or {})
        now = time.monotonic()
        oldest = min(batch.submitted for batch in self._batch_of.values())
        log.debug(
            "cluster: %d workers; %d batches out, the oldest sent %.0f s ago",
            workers,
            len(self._batch_of),
            now - oldest,
        )
        if workers:
            self._no_workers_since = None
            stall = self.spec.stall_timeout
            if log.isEnabledFor(logging.DEBUG) or now - oldest >= min(stall, HEALTH_SECONDS * 2):
                await self._look_at_batches(now)
            return
        if self._no_workers_since is None:
            self._no_workers_since = now
        alone = now - self._no_workers_since
        if self.spec.mode == "local" and alone >= NO_WORKERS_GIVE_UP:
            raise LocalError(
                f"the local cluster has had no worker for {alone:.0f} s; {len(self._batch_of)} batches "
                "were still to run",
                hint="its worker processes died (out of memory?); run again (finished files are kept), "
                "with fewer --jobs or --job-concurrency",
            )
        if alone < NO_WORKERS_WARN:
            return
        if self.spec.mode == "slurm":  # workers come when Slurm starts their jobs: that may take hours
            if now - self._noted_queue >= 10 * HEALTH_SECONDS:
                self._noted_queue = now
                log.info("cluster: no Dask worker yet after %.0f s: the Slurm jobs are still queued?", alone)
            return
        log.warning("cluster: no Dask worker for %.0f s; %d batches wait for one", alone, len(self._batch_of))

    async def _look_at_batches(self, now: float) -> None:
        """Where each batch out is, as the scheduler and each worker see it (DEBUG lines), and the
        restart of a worker whose batch has stalled (`_stalled`): it would hold its batch, and the
        run, for ever (a hung file system call, a wedged thread); Dask runs the batch again elsewhere
        or on the restarted worker, which adopts the files already finished."""
        keys = list(self._batch_of)
        try:
            held = await asyncio.wait_for(self.client.scheduler.who_has(keys=keys), 10)
            processing = await asyncio.wait_for(self.client.processing(), 10)
            stacks = log.isEnabledFor(logging.DEBUG)
            views = await asyncio.wait_for(self.client.run(worker_view, keys, RESOURCE, stacks), 10)
        except Exception as err:  # a busy scheduler or worker is looked at next time
            log.debug("cluster: cannot look at the batches: %s", describe_error(err))
            return
        for worker, running in processing.items():
            numbers = sorted(self._batch_of[key].number for key in running if key in self._batch_of)
            log.debug("cluster: worker %s has batches %s", worker, numbers or "none")
        for worker, view in views.items():
            for line in view.lines:
                log.debug("cluster: %s: %s", worker, line)
        suspects: dict[tuple[str, str], str] = {}
        for worker, running in processing.items():
            view = views.get(worker)
            if view is not None:
                for key, why in self._stalled([key for key in running if key in self._batch_of], view, now):
                    suspects[(worker, key)] = why
        # Only what two looks in a row (HEALTH_SECONDS apart) found: a single look may catch a batch in
        # a hand-over (just sent to its worker, or just finished there and not yet reported).
        confirmed = {
            worker: why for (worker, key), why in suspects.items() if (worker, key) in self._suspects
        }
        self._suspects = suspects
        # A batch the scheduler holds as finished (in a worker's memory), two looks in a row, whose
        # result the driver never received: its waiter is stuck, so the batch goes out again.
        finished = {key for key, where in (held or {}).items() if where and key in self._batch_of}
        for key in finished & self._back_unseen:
            self._send_again(key)
        self._back_unseen = finished
        for worker, why in confirmed.items():
            if now - self._restarted.get(worker, -math.inf) >= self.spec.stall_timeout:
                self._restarted[worker] = now
                await self._restart(worker, why)

    def _send_again(self, key: str) -> None:
        """Send the batch `key` again, in its place in flight, and forget the first (see the caller)."""
        waiter = self._waiter_of.pop(key, None)
        if waiter is None or waiter.done():
            return  # it came back meanwhile
        batch = self._batch_of.pop(key)
        waiter.cancel()  # the waiter re-raises its cancellation: the batch's place stays taken
        for future in [f for f in self._futures if f.key == key]:
            self._futures.discard(future)
            with contextlib.suppress(Exception):
                future.release()
        log.warning(
            "cluster: batch %d finished on the cluster but its result never reached the driver; it is sent "
            "again",
            batch.number,
        )
        self._send(batch.items, batch.resent)

    def _stalled(self, keys: list[str], view: WorkerView, now: float) -> list[tuple[str, str]]:
        """The batches of `keys` that the worker whose `view` this is holds stalled, each with why."""
        stall = self.spec.stall_timeout
        found: list[tuple[str, str]] = []
        for key in keys:
            batch = self._batch_of[key]
            if now - batch.submitted < stall:
                continue
            quiet = view.quiet.get(batch.number)
            state = view.states.get(key)
            if quiet is not None:
                if quiet >= stall:
                    found.append((key, f"batch {batch.number} has not moved for {quiet:.0f} s"))
            elif state is None:
                found.append(
                    (key, f"batch {batch.number}, sent {now - batch.submitted:.0f} s ago, is unknown to it")
                )
            elif view.free >= 1 and state in _NOT_STARTED:
                waited = now - batch.submitted
                found.append(
                    (key, f"batch {batch.number} has waited {waited:.0f} s ({state}) on an idle worker")
                )
        return found

    async def _restart(self, worker: str, why: str) -> None:
        log.warning("cluster: %s on worker %s: restarting that worker (its batch runs again)", why, worker)
        self.restarts += 1
        try:
            outcome = await asyncio.wait_for(
                self.client.restart_workers([worker], timeout=60, raise_for_error=False), 90
            )
        except Exception as err:
            log.warning("cluster: could not restart worker %s: %s", worker, describe_error(err))
            return
        log.info(
            "cluster: worker %s: %s",
            worker,
            outcome.get(worker, outcome) if isinstance(outcome, dict) else outcome,
        )

    async def _record(
        self, run: RunHooks, writer: ManifestWriter, batch: _Batch, report: BatchReport, *, live: bool = True
    ) -> None:
        """Record what a batch finished, through the run's one recording path (`live`: the run goes
        on; False for what comes back while it stops, whose unfinished files stay pending)."""
        self.batches += 1
        self.overloads += report.overloads
        limiter = getattr(run.progress, "limiter", None)
        if limiter is not None:  # the summary's "429/503 answers" count the workers' too
            limiter.overload_events += report.overloads
            limiter.decreases += report.decreases
        self.taken_over += report.taken_over
        self.batch_seconds += report.seconds
        self.hosts.add((report.host, report.pid))
        log.debug(
            "batch %d: %d of %d files on %s (pid %d) in %.1f s",
            batch.number,
            len(report.results),
            len(batch.items),
            report.host,
            report.pid,
            report.seconds,
        )
        for packed in report.results:
            item, _relpath, changed = batch.items[packed[0]]
            await run.finish_job(writer, unpack(item, packed), changed=changed)
        if live and report.stopped and report.fatal is None and batch.resent >= MAX_RESENDS:
            # Sent MAX_RESENDS times and stopped early each time: the files fail, with the reason, rather
            # than vanish from a run that goes on (the next run fetches them).
            reason = f"its batch stopped early {batch.resent + 1} times (the workers lost the scheduler)"
            for item, relpath, changed in self._unfinished(batch, report):
                await run.finish_job(
                    writer, FileResult(item, FileStatus.FAILED, path=relpath, error=reason), changed=changed
                )
        if report.fatal is not None:
            kind, message, hint = report.fatal
            if kind == "config":
                raise ConfigError("fetch.token_env", message, hint=hint or None)
            raise LocalError(f"on {report.host}: {message}", hint=hint or None)


def _lifetime(walltime: str | None) -> str | None:
    """A worker's --lifetime: five minutes before the job's time limit (None when unknown or short)."""
    if not walltime:
        return None
    days, _, clock = walltime.rpartition("-")
    hours, minutes, seconds = (int(part) for part in clock.split(":"))
    total = (int(days) if days else 0) * 86400 + hours * 3600 + minutes * 60 + seconds
    if total < 900:
        return None
    return f"{(total - 300) // 60}m"


__all__ = ["RESOURCE", "DaskExecutor", "runner_scheduler_file", "serve_runner_role"]
