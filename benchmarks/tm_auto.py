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
import os
import sys
import time
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
    parser.add_argument(
        "--tuner",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="experiments only: a TunerSettings field for this run (e.g. start=16); repeatable",
    )
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
    overrides = _tuner_overrides(ns.tuner)
    if overrides:
        _apply_overrides(overrides)
    holder: dict[str, ConcurrencyTuner] = {}
    # process age (s) when the tuner started, at the first and the last body byte
    moments: dict[str, float] = {}
    tasks: list[asyncio.Task] = []
    # (seconds since the tuner started, bytes so far, the limit bound) every 0.25 s
    trace: list[tuple[float, int, bool]] = []

    async def watch(tuner: ConcurrencyTuner, clock) -> None:  # type: ignore[no-untyped-def]
        started = clock.monotonic()
        while True:
            await clock.sleep(0.25)
            limiter = tuner.limiter
            # The tuner's own test of a saturated sample: work waits, or nearly every slot is busy
            # (between its last byte and its rename a download holds no slot).
            bound = limiter.waiting > 0 or limiter.in_flight >= limiter.limit - max(1, limiter.limit // 8)
            trace.append((clock.monotonic() - started, tuner.received, bound))

    def downloader_factory(*args, **kwargs) -> Downloader:  # type: ignore[no-untyped-def]
        # The run made its tuner just before its Downloader (MirrorRun._make_tuner): trace it.
        tuner = run._tuner
        if tuner is not None:
            holder["tuner"] = tuner
            moments["tuner"] = process_age()
            feed = tuner.add_bytes

            def add_bytes(n: int) -> None:
                now = process_age()
                moments.setdefault("first_byte", now)
                moments["last_byte"] = now
                feed(n)

            tuner.add_bytes = add_bytes  # type: ignore[method-assign]
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
        # From the first hold: a re-probe every 30 s (a step up and back) belongs to the settled
        # state, and taking the last step instead left a long run only its last few seconds.
        holds = [s.at for s in tuner.steps if s.reason.startswith("hold")]
        report.update(steady_rate(trace, holds[0] if holds else (tuner.steps[-1].at if tuner.steps else 0.0)))
        moments["end"] = process_age()
        report["timing"] = {k: round(v, 3) for k, v in moments.items()}
        report["trace"] = [[round(t, 2), round(n / 1e6, 1), int(w)] for t, n, w in trace]
        if overrides:
            report["overrides"] = overrides
        print("tuner: " + json.dumps(report))
    return outcome.exit_code


def process_age() -> float:
    """Seconds since this process started (the kernel's start time; 10 ms resolution)."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _tuner_overrides(pairs: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key.strip()] = float(value)
    return out


def _apply_overrides(overrides: dict[str, float]) -> None:
    """Make the run's tuner (MirrorRun._make_tuner builds it) use these TunerSettings fields."""
    import dataclasses

    import engine.manager as manager
    from engine.fetch.autotune import TunerSettings

    fields = {f.name: f.type for f in dataclasses.fields(TunerSettings)}
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        raise SystemExit(f"--tuner: unknown TunerSettings field(s) {', '.join(unknown)}")

    def settings(**kwargs: object) -> TunerSettings:
        for key, value in overrides.items():
            kwargs[key] = int(value) if key in ("start", "maximum", "minimum") else value
        return TunerSettings(**kwargs)  # type: ignore[arg-type]

    manager.TunerSettings = settings  # type: ignore[assignment,misc]


def steady_rate(trace: list[tuple[float, int, bool]], settled_at: float, settle: float = 1.0) -> dict:
    """MB/s from `settle` seconds after the climb ended to the last moment work still waited at the
    limiter: the rate once settled, without the climb before it or the run's tail.
    "Waited" is the tuner's own test of a saturated sample (see ConcurrencyTuner.sample)."""
    start = settled_at + settle
    busy = [(t, n) for t, n, waiting in trace if waiting and t >= start]
    if len(busy) < 2 or busy[-1][0] - busy[0][0] < 2.0:
        return {"steady_mb_s": None, "steady_s": 0.0}
    (t0, n0), (t1, n1) = busy[0], busy[-1]
    return {"steady_mb_s": round((n1 - n0) / (t1 - t0) / 1e6, 2), "steady_s": round(t1 - t0, 1)}


if __name__ == "__main__":
    sys.exit(main())
