"""The executor registry: where a run's downloads happen, by name.

``inprocess`` is today's pipeline (N asyncio workers taking jobs from the run's queue). The Dask
executors (``local``, ``slurm``, ``slurm-runner``, ``tcp``) live in `engine.cluster.driver` and are
imported only when chosen, so `import engine` never imports Dask.

An executor gives the run's pipeline the coroutines that consume its queue (`workers`) and how many
of them there are (`consumers`: the producer ends the queue with that many sentinels); the run says
how many in-process workers it would start (`fetch.connections`, a few more under the tuner). The run
(`engine.manager.MirrorRun`) offers them `RunHooks`: its worker loop, the driver-side steps before a
download (keeping a superseded copy, adopting a file already on disk) and the one recording path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from engine.cluster import ClusterSpec, require_extra

if TYPE_CHECKING:
    from engine.fetch.download import Downloader
    from engine.manifest import ManifestWriter
    from engine.models import FileResult, PlanItem
    from engine.progress import Progress
    from engine.settings import Settings


class RunHooks(Protocol):
    """What an executor may use of the run that owns it (engine.manager.MirrorRun)."""

    settings: Settings
    out_dir: Path
    progress: Progress

    async def _work(self, queue: asyncio.Queue, downloader: Downloader, writer: ManifestWriter) -> None:
        """The in-process worker loop: take jobs from `queue` until the sentinel, fetch, record."""
        ...

    async def prepare_job(self, item: PlanItem, relpath: str, dest: Path, changed: bool) -> FileResult | None:
        """The driver's steps before a download: keep a superseded copy, or adopt a file already on
        disk (then its result; None when the file must be downloaded)."""
        ...

    async def finish_job(self, writer: ManifestWriter, result: FileResult, *, changed: bool) -> None:
        """Record one file's result (manifest, counts, progress): the one path for every executor."""
        ...


class Executor(Protocol):
    """Runs the downloads of one run (see the module docstring)."""

    name: str

    def consumers(self, requested: int) -> int:
        """How many coroutines of `workers` take jobs from the queue (one sentinel each), given the
        number of in-process workers the run would start."""
        ...

    async def start(self) -> None:
        """Start (or join) the place where downloads run; log what it is."""
        ...

    def workers(
        self,
        run: RunHooks,
        queue: asyncio.Queue,
        downloader: Downloader,
        writer: ManifestWriter,
        count: int,
    ) -> list[Coroutine[Any, Any, None]]:
        """The coroutines the pipeline runs beside its producer (`count` of them take jobs from the
        queue, as `consumers` said); they end after the sentinels."""
        ...

    async def close(self) -> None:
        """Stop what `start` started (idempotent; also after a failed or cancelled run)."""
        ...


class InProcessExecutor:
    """Today's pipeline: as many asyncio workers in this process as the run asks for, no Dask."""

    name = "inprocess"

    def __init__(self, spec: ClusterSpec, settings: Settings) -> None:
        self.spec = spec

    def consumers(self, requested: int) -> int:
        return max(requested, 1)

    async def start(self) -> None:
        return None

    def workers(
        self,
        run: RunHooks,
        queue: asyncio.Queue,
        downloader: Downloader,
        writer: ManifestWriter,
        count: int,
    ) -> list[Coroutine[Any, Any, None]]:
        return [run._work(queue, downloader, writer) for _ in range(count)]

    async def close(self) -> None:
        return None


def _dask(spec: ClusterSpec, settings: Settings) -> Executor:
    require_extra(spec.mode)  # one line naming the fix, before anything is imported
    from engine.cluster.driver import DaskExecutor

    return DaskExecutor(spec, settings)


# name -> factory(spec, settings). The Dask entries import Dask only when called.
EXECUTORS: dict[str, Callable[[ClusterSpec, Settings], Executor]] = {
    "inprocess": InProcessExecutor,
    "local": _dask,
    "slurm": _dask,
    "slurm-runner": _dask,
    "tcp": _dask,
}


def build_executor(spec: ClusterSpec, settings: Settings) -> Executor:
    """The executor for `spec.mode` (a key of `EXECUTORS`)."""
    return EXECUTORS[spec.mode](spec, settings)


__all__ = ["EXECUTORS", "Executor", "InProcessExecutor", "RunHooks", "build_executor"]
