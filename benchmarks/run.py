"""The benchmark suite's one command.

    .venv/bin/python -m benchmarks.run --out bench-out            # every scenario, ~15 minutes
    .venv/bin/python -m benchmarks.run --smoke --out bench-smoke  # tiny sizes: does everything run?
    .venv/bin/python -m benchmarks.run --only 1,3 --out bench-out # some scenarios

Writes OUT/results.json, OUT/table.md and OUT/throughput.png, and prints the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from benchmarks.report import write_outputs
from benchmarks.scenarios import FULL, SMOKE, Bench


def machine() -> dict:
    """What the numbers were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gb": round(mem_gb, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_avg_at_start": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("bench-out"), help="results folder (default bench-out)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that every scenario runs")
    parser.add_argument("--only", default="1,2,3,4,5", help="scenarios to run, e.g. 1,3 (default: all)")
    parser.add_argument("--keep-work", action="store_true", help="keep OUT/work (plans, logs, archive files)")
    ns = parser.parse_args(argv)
    only = {part.strip() for part in ns.only.split(",") if part.strip()}
    unknown = only - {"1", "2", "3", "4", "5"}
    if unknown:
        parser.error(f"--only: unknown scenario(s) {', '.join(sorted(unknown))}; use numbers 1-5")
    ns.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(ns.out, SMOKE if ns.smoke else FULL, say=lambda text: print(text, flush=True))
    started = time.monotonic()
    try:
        if only & {"1", "3", "4"}:
            bench.scenarios_1_3_4small(only)
        if only & {"2", "5"}:
            bench.scenarios_5_2(only)
        if "4" in only:
            bench.scenario4_big()
    finally:
        result = bench.as_dict()
        result["machine"] = machine()
        result["suite_seconds"] = time.monotonic() - started
        table = write_outputs(result, ns.out)
        if not ns.keep_work:
            shutil.rmtree(bench.work / "out", ignore_errors=True)
            for archive_dir in bench.work.glob("archive-*"):
                shutil.rmtree(archive_dir, ignore_errors=True)
    print()
    print(table)
    for note in result["notes"]:
        print(f"note: {note}")
    m = result["machine"]
    print(f"\nmachine: {m['nproc']} x {m['cpu']}, {m['memory_gb']} GB; suite {result['suite_seconds']:.0f} s")
    print(f"wrote {ns.out / 'results.json'}, {ns.out / 'table.md'}, {ns.out / 'throughput.png'}")
    bad = [r for r in result["downloads"] if r["missing"] or r["corrupt"]]
    for r in bad:
        print(
            f"incomplete output: scenario {r['scenario']} {r['tool']}: "
            f"{r['missing']} missing, {r['corrupt']} corrupt"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
