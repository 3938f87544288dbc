"""The Dask driver's bookkeeping, with a stand-in for the Dask client (no cluster): what it does with a
batch that comes back stopped early while the run goes on."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("distributed", reason="the cluster extra: pip install '.[cluster]' (CI installs it)")

from engine.cluster import ClusterSpec
from engine.cluster.batch import BatchReport, BatchSpec, pack
from engine.cluster.driver import MAX_RESENDS, DaskExecutor
from engine.models import FileResult, FileStatus, PlanItem
from engine.settings import Settings


class FakeFuture:
    """What `client.submit` returns, resolved at once with the batch's report."""

    def __init__(self, key: str, report: BatchReport) -> None:
        self.key = key
        self.status = "finished"
        self._report = report

    def __await__(self):
        async def result() -> BatchReport:
            return self._report

        return result().__await__()


class FakeClient:
    """Runs each submitted batch with `answer(spec, call number)` instead of on a worker."""

    def __init__(self, answer: Callable[[BatchSpec, int], BatchReport]) -> None:
        self.answer = answer
        self.specs: list[BatchSpec] = []

    def submit(self, fn: Any, spec: BatchSpec, *, key: str, **_options: Any) -> FakeFuture:
        self.specs.append(spec)
        return FakeFuture(key, self.answer(spec, len(self.specs)))


class FakeRun:
    """The run's hooks: every file needs a download; results are kept."""

    def __init__(self, tmp_path: Path) -> None:
        self.settings = Settings()
        self.out_dir = tmp_path
        self.progress = None
        self.results: list[FileResult] = []

    async def prepare_job(self, item, relpath, dest, changed) -> None:
        return None

    async def finish_job(self, writer, result: FileResult, *, changed: bool) -> None:
        self.results.append(result)


def report_of(spec: BatchSpec, finish: int, *, stopped: bool) -> BatchReport:
    """The first `finish` files of the batch verified; `stopped`: it ended early, the rest unfinished."""
    report = BatchReport(spec.number, host="node7", pid=42, stopped=stopped)
    for index, (item, relpath) in enumerate(spec.items[:finish]):
        report.results.append(pack(index, FileResult(item, FileStatus.VERIFIED, path=relpath, nbytes=1)))
    return report


def run_driver(tmp_path: Path, files: int, answer: Callable[[BatchSpec, int], BatchReport]):
    settings = Settings()
    settings.output.out_dir = tmp_path
    executor = DaskExecutor(ClusterSpec(mode="local", jobs=1, job_concurrency=2, batch_files=files), settings)
    client = FakeClient(answer)
    executor.client = client
    run = FakeRun(tmp_path)

    async def main() -> None:
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(files):
            item = PlanItem(url=f"https://archive.example/f{i}.fits", filename=f"f{i}.fits")
            await queue.put((item, f"f{i}.fits", tmp_path / f"f{i}.fits", False))
        for _ in range(executor.consumers(1)):
            await queue.put(None)
        await asyncio.wait_for(asyncio.gather(*executor.workers(run, queue, None, None, 1)), 30)  # type: ignore[arg-type]

    asyncio.run(main())
    return run, client


def test_a_batch_that_stopped_early_while_the_run_goes_on_has_its_unfinished_files_sent_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def answer(spec: BatchSpec, call: int) -> BatchReport:
        # The first batch loses the scheduler after 2 of its 5 files; the one sent again finishes.
        return (
            report_of(spec, 2, stopped=True) if call == 1 else report_of(spec, len(spec.items), stopped=False)
        )

    with caplog.at_level(logging.WARNING, logger="engine"):
        run, client = run_driver(tmp_path, 5, answer)
    assert sorted(r.item.filename for r in run.results) == [f"f{i}.fits" for i in range(5)]
    assert all(r.status is FileStatus.VERIFIED for r in run.results)
    assert [len(spec.items) for spec in client.specs] == [5, 3]
    assert [item.filename for item, _ in client.specs[1].items] == ["f2.fits", "f3.fits", "f4.fits"]
    assert "its 3 unfinished files are sent again" in caplog.text


def test_files_whose_batch_keeps_stopping_early_fail_with_the_reason_instead_of_vanishing(
    tmp_path: Path,
) -> None:
    # Every batch finishes one file and stops: the first and each one sent again.
    run, client = run_driver(tmp_path, 6, lambda spec, call: report_of(spec, 1, stopped=True))
    assert len(client.specs) == MAX_RESENDS + 1
    assert sorted(r.item.filename for r in run.results) == [f"f{i}.fits" for i in range(6)]  # each once
    failed = [r for r in run.results if r.status is FileStatus.FAILED]
    assert len(failed) == 6 - (MAX_RESENDS + 1)
    assert all("stopped early" in r.error for r in failed)


def executor_with_batches(tmp_path: Path, ages: dict[int, float], stall: float = 100.0):
    """A driver whose batches 1.. were sent `ages[n]` seconds before `now` (1000.0)."""
    from engine.cluster.driver import _Batch

    settings = Settings()
    settings.output.out_dir = tmp_path
    executor = DaskExecutor(ClusterSpec(mode="local", jobs=2, stall_timeout=stall), settings)
    keys = {}
    for number, age in ages.items():
        key = f"tessmirror-batch-{executor.run_id}-{number}"
        executor._batch_of[key] = _Batch(number, [], submitted=1000.0 - age)
        keys[number] = key
    executor._numbers = max(ages, default=0)  # as if the driver had sent them
    return executor, keys


def test_a_batch_is_stalled_only_when_it_has_not_moved_for_the_stall_timeout(tmp_path: Path) -> None:
    from engine.cluster.batch import WorkerView

    executor, keys = executor_with_batches(tmp_path, {1: 500.0, 2: 500.0, 3: 50.0})

    def why(view: WorkerView, *numbers: int) -> list[str]:
        return [reason for _key, reason in executor._stalled([keys[n] for n in numbers], view, now=1000.0)]

    # Batch 1 runs and moved 10 s ago; batch 2 waits behind it on a busy worker: nothing stalled.
    busy = WorkerView({keys[1]: "executing", keys[2]: "constrained"}, free=0.0, quiet={1: 10.0}, lines=[])
    assert why(busy, 1, 2) == []
    # Batch 1 has not moved for 150 s: stalled.
    assert why(WorkerView({keys[1]: "executing"}, free=0.0, quiet={1: 150.0}, lines=[]), 1) == [
        "batch 1 has not moved for 150 s"
    ]
    # Batch 2 waits on a worker with its resource free and nothing running: stranded.
    idle = WorkerView({keys[2]: "constrained"}, free=1.0, quiet={}, lines=[])
    assert why(idle, 2) == ["batch 2 has waited 500 s (constrained) on an idle worker"]
    # Batch 2 just finished there (not yet reported to the scheduler): not stalled.
    assert why(WorkerView({keys[2]: "memory"}, free=1.0, quiet={}, lines=[]), 2) == []
    # The scheduler says the worker has batch 2, the worker does not know it.
    blank = WorkerView({}, free=1.0, quiet={}, lines=[])
    assert "unknown to it" in why(blank, 2)[0]
    # A batch sent less than the stall timeout ago is never judged.
    assert why(blank, 3) == []


class LookingClient:
    """The scheduler's and the workers' answers for `_look_at_batches`; restarts and submissions are
    recorded."""

    def __init__(self, processing: dict[str, list[str]], views: dict, held: dict | None = None) -> None:
        self._processing, self._views = processing, views
        self.restarted: list[list[str]] = []
        self.submitted: list[BatchSpec] = []

        class Scheduler:
            async def who_has(self, keys: list[str]) -> dict:
                return {key: where for key, where in (held or {}).items() if key in keys}

        self.scheduler = Scheduler()

    def submit(self, fn: Any, spec: BatchSpec, *, key: str, **_options: Any) -> FakeFuture:
        self.submitted.append(spec)
        return FakeFuture(key, BatchReport(spec.number, host="node7", pid=42))

    async def processing(self) -> dict[str, list[str]]:
        return self._processing

    async def run(self, fn: Any, *args: Any) -> dict:
        return self._views

    async def restart_workers(self, workers: list[str], **_options: Any) -> dict[str, str]:
        self.restarted.append(workers)
        return dict.fromkeys(workers, "OK")


def test_a_worker_is_restarted_only_when_two_looks_in_a_row_find_its_batch_stalled(tmp_path: Path) -> None:
    from engine.cluster.batch import WorkerView

    executor, keys = executor_with_batches(tmp_path, {1: 500.0})
    stuck = WorkerView({keys[1]: "executing"}, free=0.0, quiet={1: 150.0}, lines=[])
    client = LookingClient({"tcp://w1": [keys[1]]}, {"tcp://w1": stuck})
    executor.client = client

    asyncio.run(executor._look_at_batches(1000.0))
    assert client.restarted == []  # one look: it may be a hand-over
    asyncio.run(executor._look_at_batches(1030.0))
    assert client.restarted == [["tcp://w1"]] and executor.restarts == 1
    asyncio.run(executor._look_at_batches(1060.0))
    asyncio.run(executor._look_at_batches(1090.0))
    assert client.restarted == [["tcp://w1"]]  # not again within the stall timeout (100 s)


def test_a_batch_finished_on_the_cluster_whose_result_never_came_back_is_sent_again(tmp_path: Path) -> None:
    executor, keys = executor_with_batches(tmp_path, {1: 500.0})
    batch = executor._batch_of[keys[1]]
    batch.items = [(PlanItem(url="https://archive.example/a.fits", filename="a.fits"), "a.fits", False)]
    client = LookingClient({}, {}, held={keys[1]: ["tcp://w1"]})
    executor.client = client

    async def looks() -> asyncio.Future:
        stuck: asyncio.Future = asyncio.get_running_loop().create_future()  # a waiter that never returns
        executor._waiter_of[keys[1]] = stuck
        await executor._look_at_batches(1000.0)
        assert client.submitted == []  # one look: it may be on its way
        await executor._look_at_batches(1030.0)
        return stuck

    stuck = asyncio.run(looks())
    assert stuck.cancelled()
    assert [item.filename for item, _ in client.submitted[0].items] == ["a.fits"]
    assert keys[1] not in executor._batch_of and len(executor._batch_of) == 1  # the new batch only
