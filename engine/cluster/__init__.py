"""Spreading one mirror over many processes or nodes (`tessmirror run --cluster ...`).

The driver (the process the user started) plans, holds the run lock and is the only writer of the
manifest. Executors (`engine.cluster.executors`, a registry by name) decide where the downloads run:

- ``inprocess``: today's pipeline, N asyncio workers in this process (the default, no Dask);
- ``local``: `distributed.LocalCluster`, worker processes on this machine;
- ``slurm``: `dask_jobqueue.SLURMCluster`, one Slurm job per worker (sbatch from the driver's node);
- ``slurm-runner``: `dask_jobqueue.slurm.SLURMRunner` inside one ``sbatch -N K`` allocation, for sites
  whose compute nodes cannot reach the login node;
- ``tcp://HOST:PORT``: an existing scheduler, whose workers were started with ``--resources MAST=1``.

Nothing here imports Dask: `engine.cluster.driver` and `engine.cluster.batch` do, lazily, once a
cluster was asked for. Without the ``cluster`` extra, asking for one is a one-line usage error.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.exceptions import ConfigError

if TYPE_CHECKING:
    from engine.settings import Settings

# `--cluster` values, besides a scheduler address (tcp://HOST:PORT).
CLUSTER_MODES = ("local", "slurm", "slurm-runner")
INSTALL_HINT = "pip install 'tessmirror[cluster]'"
BATCH_FILES = 200  # files per batch: enough to amortise the scheduler, small enough to spread
BATCH_BYTES = 1_000_000_000  # declared bytes per batch: a 35 MB FFI batch stays near 1 GB
STALL_TIMEOUT = 900.0  # seconds without progress after which a batch's worker is restarted
_ADDRESS_RE = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
_WALLTIME_RE = re.compile(r"^(\d{1,3}-)?\d{1,4}:[0-5]\d:[0-5]\d$")
_MEMORY_RE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B?|B)?$", re.IGNORECASE)
JOBS_MAX = 10_000  # more jobs than this is a typo
JOBS_DEFAULT = 2
JOB_CONCURRENCY_DEFAULT = 8  # per job, when --concurrency is auto (the tuner runs in-process only)


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """Where the downloads of one run go, and how many connections each place may open.

    `mode` is "inprocess" (no Dask), "local", "slurm", "slurm-runner" or "tcp" (then `address`).
    Every Dask mode runs at most `jobs` batches at once, each with `job_concurrency` connections:
    the archive sees at most ``jobs * job_concurrency`` connections from the whole run.
    """

    mode: str = "inprocess"
    address: str = ""
    jobs: int = 2
    job_concurrency: int = 8
    queue: str | None = None
    account: str | None = None
    walltime: str | None = None
    job_extra: tuple[str, ...] = ()
    job_cores: int = 2
    job_memory: str = "2GB"
    batch_files: int = BATCH_FILES
    batch_bytes: int = BATCH_BYTES
    stall_timeout: float = STALL_TIMEOUT

    @property
    def uses_dask(self) -> bool:
        return self.mode != "inprocess"

    @property
    def connections(self) -> int:
        """The most connections the whole run opens to the archive."""
        return self.jobs * self.job_concurrency

    def describe(self) -> str:
        """One line for the start of a run: where, how many jobs, the global connection cap."""
        where = self.address if self.mode == "tcp" else self.mode
        return (
            f"cluster {where}: {self.jobs} jobs x {self.job_concurrency} connections = at most "
            f"{self.connections} connections to the archive, batches of up to {self.batch_files} files"
        )


def parse_mode(text: object, key: str = "cluster.mode") -> tuple[str, str]:
    """``local``/``slurm``/``slurm-runner``/``tcp://HOST:PORT`` -> (mode, address); ConfigError
    naming `key` otherwise. None or "" is ("inprocess", "")."""
    if text is None or text == "":
        return "inprocess", ""
    hint = "give local, slurm, slurm-runner or a scheduler address such as tcp://10.0.0.5:8786"
    if not isinstance(text, str):
        raise ConfigError(key, f"{str(text)[:40]!r} is not a cluster", hint=hint)
    value = text.strip()
    if value.lower() in CLUSTER_MODES:
        return value.lower(), ""
    match = _ADDRESS_RE.match(value)
    if match is not None:
        if not 0 < int(match.group(2)) < 65536:
            raise ConfigError(key, f"{value[:80]!r}: the port must be 1 to 65535", hint=hint)
        return "tcp", value
    raise ConfigError(key, f"{value[:80]!r} is not a cluster", hint=hint)


def check_walltime(text: object, key: str = "cluster.walltime") -> str | None:
    """A Slurm time limit as HH:MM:SS (or D-HH:MM:SS); None for None or ""."""
    if text is None or text == "":
        return None
    if not isinstance(text, str) or not _WALLTIME_RE.match(text.strip()):
        raise ConfigError(key, f"{str(text)[:40]!r} is not HH:MM:SS", hint="e.g. --walltime 04:00:00")
    return text.strip()


def check_memory(text: object, key: str = "cluster.job_memory") -> str:
    """A job's memory as Dask spells it ("2GB", "4 GiB", "1500MB")."""
    if not isinstance(text, str) or not _MEMORY_RE.match(text.strip()):
        raise ConfigError(key, f"{str(text)[:40]!r} is not an amount of memory", hint='e.g. "2GB"')
    return text.strip()


def check_job_extra(key: str, raw: Any) -> list[str]:
    """`cluster.job_extra`: sbatch directives (``--qos=debug``), a TOML list or repeated flags."""
    values = [raw] if isinstance(raw, str) else raw
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise ConfigError(key, f"expected a list of sbatch options, got {str(raw)[:60]!r}", hint=_EXTRA_HINT)
    for value in values:
        if not value.startswith("-") or any(c in value for c in "\n\r\0"):
            raise ConfigError(key, f"{value[:60]!r} is not an sbatch option", hint=_EXTRA_HINT)
    return list(values)


_EXTRA_HINT = 'e.g. --job-extra=--qos=debug, or job_extra = ["--qos=debug"] in [cluster]'


def default_jobs(mode: str) -> int:
    """`cluster.jobs` when not given: under slurm-runner every rank but the scheduler's and the
    driver's is a worker (SLURM_NTASKS - 2, at least 1); otherwise 2."""
    if mode == "slurm-runner":
        tasks = os.environ.get("SLURM_NTASKS", "")
        if tasks.isdigit() and int(tasks) > 2:
            return min(int(tasks) - 2, JOBS_MAX)
        return 1
    return JOBS_DEFAULT


def spec_from_settings(settings: Settings) -> ClusterSpec:
    """The validated `[cluster]` table (and the flags) as a ClusterSpec."""
    cluster = settings.cluster
    mode, address = parse_mode(cluster.mode)
    fetch = settings.fetch
    default = fetch.concurrency if isinstance(fetch.concurrency, int) else JOB_CONCURRENCY_DEFAULT
    return ClusterSpec(
        mode=mode,
        address=address,
        jobs=cluster.jobs if cluster.jobs is not None else default_jobs(mode),
        job_concurrency=cluster.job_concurrency or default,
        queue=cluster.queue,
        account=cluster.account,
        walltime=cluster.walltime,
        job_extra=tuple(cluster.job_extra),
        job_cores=cluster.job_cores,
        job_memory=cluster.job_memory,
        batch_files=cluster.batch_files,
        batch_bytes=cluster.batch_bytes,
        stall_timeout=cluster.stall_timeout,
    )


def validate_settings(settings: Settings) -> None:
    """Check the `[cluster]` table; ConfigError naming the key. Also refuses a cluster beside
    `--shard` (two ways to split one run) and a missing extra (one line naming the fix)."""
    cluster = settings.cluster
    mode, _ = parse_mode(cluster.mode)
    cluster.validate()  # the table's own fields (the section checks them when built, and again here)
    if mode == "inprocess":
        return
    if settings.run.shard is not None:
        raise ConfigError(
            "run.shard",
            f"--shard and --cluster {cluster.mode} are two ways to split one run; choose one",
            hint="--cluster spreads one run over a Dask cluster; --shard K/N is for plain job arrays",
        )
    require_extra(mode)


def import_extra(name: str) -> None:
    """Import `name` of the cluster extra. dask_jobqueue sets a SIGINT handler when first imported
    (its runner module): it replaces the caller's (the CLI's graceful stop, a notebook's interrupt),
    which is put back here, and Python allows it only in the main thread. The Python API imports it
    there (`engine.api.mirror`) before its worker thread starts; a first import in another thread is
    refused with the fix.

    Raises
    ------
    ImportError
        `name` is not installed (or half installed).
    engine.exceptions.ConfigError
        A first import of dask_jobqueue outside the main thread.
    """
    if sys.modules.get(name) is not None:
        return  # imported already (a None entry is a blocked import: import_module raises)
    if threading.current_thread() is not threading.main_thread():
        if name == "dask_jobqueue":
            raise ConfigError(
                "cluster.mode",
                "dask-jobqueue can only be loaded first from the main thread (it sets a signal handler)",
                hint="import dask_jobqueue in the main thread before the thread that runs the mirror starts",
            )
        importlib.import_module(name)
        return
    before = signal.getsignal(signal.SIGINT)
    try:
        importlib.import_module(name)
    finally:
        if before is not None:
            signal.signal(signal.SIGINT, before)


def _importable(name: str) -> bool:
    """Whether `name` imports (a half-installed package fails here, not later with a traceback)."""
    try:
        import_extra(name)
    except ImportError:
        return False
    return True


def require_extra(mode: str, key: str = "cluster.mode") -> None:
    """Raise a one-line ConfigError (exit 2) naming the fix when `mode` needs a package that is missing."""
    if mode == "inprocess":
        return
    needed = ["distributed"] + (["dask_jobqueue"] if mode.startswith("slurm") else [])
    missing = [name for name in needed if not _importable(name)]
    if missing:
        shown = "dask-jobqueue" if missing == ["dask_jobqueue"] else "Dask (dask[distributed])"
        raise ConfigError(key, f"--cluster {mode} needs {shown}, which is not installed: {INSTALL_HINT}")


__all__ = [
    "BATCH_BYTES",
    "BATCH_FILES",
    "CLUSTER_MODES",
    "INSTALL_HINT",
    "JOBS_MAX",
    "ClusterSpec",
    "check_job_extra",
    "check_memory",
    "check_walltime",
    "import_extra",
    "parse_mode",
    "require_extra",
    "spec_from_settings",
    "validate_settings",
]
