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

import importlib.util
import re
from dataclasses import dataclass

from engine.exceptions import ConfigError

# `--cluster` values, besides a scheduler address (tcp://HOST:PORT).
CLUSTER_MODES = ("local", "slurm", "slurm-runner")
INSTALL_HINT = "pip install 'tessmirror[cluster]'"
BATCH_FILES = 200  # files per batch: enough to amortise the scheduler, small enough to spread
BATCH_BYTES = 1_000_000_000  # declared bytes per batch: a 35 MB FFI batch stays near 1 GB
_ADDRESS_RE = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
_WALLTIME_RE = re.compile(r"^(\d{1,3}-)?\d{1,4}:[0-5]\d:[0-5]\d$")
_MEMORY_RE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B?|B)?$", re.IGNORECASE)


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


def require_extra(mode: str, key: str = "cluster.mode") -> None:
    """Raise a one-line ConfigError (exit 2) naming the fix when `mode` needs a package that is missing."""
    if mode == "inprocess":
        return
    needed = ["distributed"] + (["dask_jobqueue"] if mode.startswith("slurm") else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        shown = "dask-jobqueue" if missing == ["dask_jobqueue"] else "Dask (dask[distributed])"
        raise ConfigError(key, f"--cluster {mode} needs {shown}, which is not installed: {INSTALL_HINT}")


__all__ = [
    "BATCH_BYTES",
    "BATCH_FILES",
    "CLUSTER_MODES",
    "INSTALL_HINT",
    "ClusterSpec",
    "check_memory",
    "check_walltime",
    "parse_mode",
    "require_extra",
]
