"""`tessmirror fetch --concurrency auto`, with the tuner's steps printed for the benchmarks.

    python -m benchmarks.tm_auto --input PLAN --out DIR [--max-connections 32]
                                 [--verify checksum] [--layout flat] [--no-fsync]

This builds the run exactly as the CLI does (`load_settings`, `MirrorRun` with
``fetch.concurrency = "auto"``): the engine's own tuner, limiter, worker count and Downloader meter.
It adds only a trace for the report: every 0.25 s the bytes received and whether work waited at the
limiter. At the end it prints one line ``tuner: {json}`` with the connection count the run settled
on, the time-weighted mean count, every step and the rate at the settled count, for
benchmarks/wan.py to read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from engine.cli import _run_loop
from engine.config import load_settings
from engine.exceptions import TessMirrorError
from engine.fetch.autotune import DEFAULT_MAX_CONNECTIONS, ConcurrencyTuner
from engine.fetch.download import Downloader
from engine.layout import layout_names
from engine.manager import MirrorRun, summarize
from engine.models import VerifyLevel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tm_auto", description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True, help="an ECSV plan or a URL list")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS)
    parser.add_argument("--verify", default="checksum", choices=VerifyLevel.names())
    parser.add_argument("--layout", default="flat", choices=layout_names())
    parser.add_argument("--no-fsync", action="store_true")
    ns = parser.parse_args(argv)
    try:
        settings = load_settings(
            None,
            {
                "selection.urls_file": ns.input,
                "output.out_dir": ns.out,
                "output.layout": ns.layout,
                "output.fsync": not ns.no_fsync,
                "verify.level": ns.verify,
                "fetch.concurrency": "auto",
                "fetch.max_connections": ns.max_connections,
            },
        )
    except TessMirrorError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    holder: dict[str, ConcurrencyTuner] = {}
    tasks: list[asyncio.Task] = []
    # (seconds since the tuner started, bytes so far, work waiting at the limiter) every 0.25 s
    trace: list[tuple[float, int, bool]] = []

    async def watch(tuner: ConcurrencyTuner, clock) -> None:  # type: ignore[no-untyped-def]
        started = clock.monotonic()
        while True:
            await clock.sleep(0.25)
            trace.append((clock.monotonic() - started, tuner.received, tuner.limiter.waiting > 0))

    def downloader_factory(*args, **kwargs) -> Downloader:  # type: ignore[no-untyped-def]
        # The run made its tuner just before its Downloader (MirrorRun._make_tuner): trace it.
        tuner = run._tuner
        if tuner is not None:
            holder["tuner"] = tuner
            tasks.append(asyncio.get_running_loop().create_task(watch(tuner, kwargs["clock"]), name="trace"))
        return Downloader(*args, **kwargs)

    run = MirrorRun(settings, downloader_factory=downloader_factory, collect_results=False)
    outcome = _run_loop(run.run())
    for line in summarize(outcome):
        print(line)
    tuner = holder.get("tuner")
    if tuner is not None:
        steps = [
            {
                "at": round(s.at, 2),
                "from": s.before,
                "to": s.after,
                "mb_s": round(s.rate / 1e6, 2),
                "why": s.reason,
            }
            for s in tuner.steps
        ]
        report = {"settled": tuner.limit, "mean": round(tuner.mean_limit(), 1), "steps": steps}
        report.update(steady_rate(trace, tuner.steps[-1].at if tuner.steps else 0.0))
        print("tuner: " + json.dumps(report))
    return outcome.exit_code


def steady_rate(trace: list[tuple[float, int, bool]], settled_at: float, settle: float = 1.0) -> dict:
    """MB/s from `settle` seconds after the last step to the last moment work still waited at the
    limiter: the rate at the settled count, without the climb before it or the run's tail."""
    start = settled_at + settle
    busy = [(t, n) for t, n, waiting in trace if waiting and t >= start]
    if len(busy) < 2 or busy[-1][0] - busy[0][0] < 2.0:
        return {"steady_mb_s": None, "steady_s": 0.0}
    (t0, n0), (t1, n1) = busy[0], busy[-1]
    return {"steady_mb_s": round((n1 - n0) / (t1 - t0) / 1e6, 2), "steady_s": round(t1 - t0, 1)}


if __name__ == "__main__":
    sys.exit(main())
