"""One mirror on 1, 2 and 4 local Dask workers, and the scheduler's overhead per batch.

    python -m benchmarks.cluster [--files 48] [--per-connection 2e6] [--job-concurrency 2]

Each configuration runs `tessmirror run --cluster local --jobs W --job-concurrency C` (the driver in a
subprocess, as a user would) against the local archive, into a fresh folder, and must exit 0 with
every file verified. The archive caps every response at `--per-connection` bytes/s: that cap stands
in for each node's own NIC or WAN limit, which one 2-core machine cannot show (all workers share its
loopback and CPU). With the same per-worker concurrency, a cluster that scales shows an aggregate
rate close to W x C x per-connection.

The aggregate rate is the plan's bytes over the download window: from the archive's first file
request to the manifest's last record (so cluster start-up and planning are not counted; they are
printed apart as the whole run's wall time).

The overhead per batch is measured on its own: empty batches (no files) through the same
`run_batch` task on a LocalCluster of 2 workers, one at a time: submit, the worker's semaphore lease
and control-variable reads, the result back. A real batch (200 files) pays it once.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.archive import ArchiveOptions, ArchiveThread
from engine.archive.faults import FaultPlan
from engine.manifest import Manifest

CLI = [sys.executable, "-m", "engine.cli"]


def mirror_once(archive, out: Path, workers: int, per_job: int) -> tuple[float, float, int, int]:
    """(aggregate MB/s over the download window, whole-run seconds, files, exit code)."""
    first_request = len(archive.request_log)
    started = time.monotonic()
    proc = subprocess.run(
        [
            *CLI, "run", "--sector", "1", "--camera", "1", "--ccd", "2", "--tap-url", archive.tap_url,
            "--out", str(out), "--cluster", "local", "--jobs", str(workers),
            "--job-concurrency", str(per_job), "-q",
        ],
        capture_output=True,
        text=True,
    )  # fmt: skip
    wall = time.monotonic() - started
    if proc.returncode:
        print(proc.stderr[-2000:], file=sys.stderr)
    entries = [e for e in Manifest(out / ".tessmirror").load().values() if e.status == "verified"]
    gets = [r.time for r in archive.request_log[first_request:] if r.method == "GET" and r.name]
    if not entries or not gets:
        return 0.0, wall, len(entries), proc.returncode
    window = max(e.time for e in entries) - min(gets)
    nbytes = sum(e.nbytes for e in entries)
    return nbytes / window / 1e6, wall, len(entries), proc.returncode


async def batch_overhead(samples: int) -> float:
    """Mean seconds per empty batch through the scheduler (LocalCluster, 2 workers)."""
    from engine.cluster import ClusterSpec
    from engine.cluster.batch import run_batch
    from engine.cluster.driver import RESOURCE, DaskExecutor, _Batch
    from engine.settings import Settings

    settings = Settings()
    settings.fetch.token_env = None
    executor = DaskExecutor(ClusterSpec(mode="local", jobs=2, job_concurrency=2), settings)
    await executor.start()
    try:
        spec = executor._spec_for(_Batch(0, []))
        await executor.client.submit(run_batch, spec, resources={RESOURCE: 1}, pure=False)  # warm up
        started = time.monotonic()
        for _ in range(samples):
            await executor.client.submit(run_batch, spec, resources={RESOURCE: 1}, pure=False)
        return (time.monotonic() - started) / samples
    finally:
        await executor.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=48, help="full-size light curves (2 MB each)")
    parser.add_argument("--per-connection", type=float, default=2e6, help="bytes/s per response")
    parser.add_argument("--job-concurrency", type=int, default=2, help="connections per worker")
    parser.add_argument("--workers", default="1,2,4", help="worker counts to run")
    parser.add_argument("--samples", type=int, default=40, help="empty batches for the overhead")
    args = parser.parse_args(argv)
    options = ArchiveOptions(
        sectors=(1,),
        targets=args.files,
        focus=(1, 1, 2),
        exposures_per_ccd=24,
        file_size="full",
        faults=FaultPlan(bandwidth=args.per_connection),
    )
    thread = ArchiveThread(options)
    archive = thread.start()
    print(
        f"archive: {args.files} light curves, each response capped at {args.per_connection / 1e6:g} MB/s "
        "(standing in for each node's own limit; one 2-core machine has no per-node NIC to show)"
    )
    print(f"{'workers':>7} {'conns':>5} {'ideal MB/s':>10} {'MB/s':>6} {'run s':>6} {'files':>5} exit")
    code = 0
    try:
        for workers in (int(w) for w in args.workers.split(",")):
            with tempfile.TemporaryDirectory(prefix="tm-cluster-bench-") as tmp:
                rate, wall, files, exit_code = mirror_once(
                    archive, Path(tmp) / "out", workers, args.job_concurrency
                )
            conns = workers * args.job_concurrency
            ideal = conns * args.per_connection / 1e6
            print(f"{workers:>7} {conns:>5} {ideal:>10.1f} {rate:>6.1f} {wall:>6.1f} {files:>5} {exit_code}")
            code = code or exit_code
    finally:
        thread.stop()
    overhead = asyncio.run(batch_overhead(args.samples))
    print(
        f"scheduler overhead per batch: {overhead * 1000:.0f} ms (empty batches, LocalCluster of 2 workers)"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
