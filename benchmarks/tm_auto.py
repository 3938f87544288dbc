"""`tessmirror fetch` with `--concurrency auto`, wired from outside the engine for the benchmarks.

    python -m benchmarks.tm_auto --input PLAN --out DIR [--max-connections 32] [--start 8]
                                 [--verify checksum] [--layout flat] [--no-fsync]

The engine's CLI does not take `--concurrency auto` yet (the wiring into engine/manager.py,
engine/cli.py and engine/settings.py is the lead's; see the report of the change that added
engine/fetch/autotune.py). This driver builds the same run the CLI would (`load_settings`,
`MirrorRun`) and adds exactly that wiring through MirrorRun's injection points:

* a few more workers than max connections (``fetch.concurrency``), ``fetch.per_host`` = max
  connections, and the AdaptiveLimiter, steered by a ConcurrencyTuner, bounds the requests in
  flight;
* the Downloader feeds the tuner the body bytes as they are written (``_absorb``) and the time from
  sending each request to its response headers (``_open``).

At the end it prints one line ``tuner: {json}`` with the connection count it settled on, the
time-weighted mean count and every step, for benchmarks/wan.py to read.
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
from engine.fetch.autotune import DEFAULT_MAX_CONNECTIONS, DEFAULT_START, ConcurrencyTuner, TunerSettings
from engine.fetch.download import Downloader
from engine.manager import MirrorRun, summarize


class TunedDownloader(Downloader):
    """A Downloader that reports bytes and times to first byte to a ConcurrencyTuner."""

    tuner: ConcurrencyTuner

    async def _absorb(self, t, block) -> None:  # type: ignore[no-untyped-def]
        self.tuner.add_bytes(len(block))
        await super()._absorb(t, block)

    async def _open(self, url, headers):  # type: ignore[no-untyped-def]
        started = self._clock.monotonic()
        response = await super()._open(url, headers)
        self.tuner.add_first_byte(self._clock.monotonic() - started)
        return response


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tm_auto", description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True, help="an ECSV plan or a URL list")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS)
    parser.add_argument("--start", type=int, default=DEFAULT_START)
    parser.add_argument("--verify", default="checksum", choices=("size", "checksum", "fits"))
    parser.add_argument("--layout", default="flat", choices=("mast", "sector", "flat"))
    parser.add_argument("--no-fsync", action="store_true")
    ns = parser.parse_args(argv)
    cap = ns.max_connections
    try:
        tuning = TunerSettings(start=ns.start, maximum=cap)
    except ValueError as err:
        parser.error(str(err))
    try:
        settings = load_settings(
            None,
            {
                "selection.urls_file": ns.input,
                "output.out_dir": ns.out,
                "output.layout": ns.layout,
                "output.fsync": not ns.no_fsync,
                "verify.level": ns.verify,
                # A few more workers than connections, so work waits at the limiter whenever there
                # is work (the tuner judges only windows where the limit was the bound).
                "fetch.concurrency": cap + max(2, cap // 4),
                "fetch.per_host": cap,
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
        downloader = TunedDownloader(*args, **kwargs)
        tuner = ConcurrencyTuner(kwargs["throttle"], tuning, clock=kwargs["clock"])
        downloader.tuner = tuner
        holder["tuner"] = tuner
        loop = asyncio.get_running_loop()
        tasks.append(loop.create_task(tuner.run(), name="tuner"))
        tasks.append(loop.create_task(watch(tuner, kwargs["clock"]), name="tuner-trace"))
        return downloader

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
