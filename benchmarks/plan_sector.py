"""How long a whole-sector plan takes against the local archive shaped like MAST.

    python -m benchmarks.plan_sector [--exposures 1300] [--targets 20000] [--repeat 2]

Runs `tessmirror plan --sector 1` (all 16 CCDs) as a user would, against
`ArchiveOptions.mast_like(...)` with N FFI exposures per CCD, in both URL forms, and against the old
one-observation-per-CCD shape as a baseline. The figure is the wall time until the plan is complete,
i.e. until the total a progress bar needs is known. Every run must exit 0 and plan every light curve
inside the sixteen footprints (counted from the archive's catalogue), or the row says so.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.archive import ArchiveOptions, ArchiveThread

PLAN = [sys.executable, "-m", "engine.cli", "plan"]


def expected_files(archive) -> int:
    catalog = archive.catalog
    names = set()
    for key in catalog.exposures:
        names |= {f.name for f in catalog.files_inside(catalog.middle_exposure(key).vertices)}
    return len(names)


def time_plan(tap_url: str, out: Path) -> tuple[float, int, int]:
    """(seconds, exit code, files planned) for one `tessmirror plan --sector 1`."""
    start = time.monotonic()
    proc = subprocess.run(
        [*PLAN, "--tap-url", tap_url, "--sector", "1", "--format", "urls", "-o", str(out)],
        capture_output=True,
        text=True,
    )
    took = time.monotonic() - start
    planned = sum(1 for _ in out.open()) if out.exists() else 0
    if proc.returncode:
        print(proc.stderr[-2000:], file=sys.stderr)
    return took, proc.returncode, planned


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exposures", type=int, default=1300, help="FFI exposures per CCD (MAST: ~1,300)")
    parser.add_argument("--targets", type=int, default=20_000, help="light curves in sector 1")
    parser.add_argument("--repeat", type=int, default=2, help="plans per configuration (median shown)")
    args = parser.parse_args(argv)
    configs = [
        (
            f"{args.exposures} exposures/CCD, uri= URLs",
            {"exposures_per_ccd": args.exposures, "url_form": "uri"},
        ),
        (
            f"{args.exposures} exposures/CCD, path URLs",
            {"exposures_per_ccd": args.exposures, "url_form": "path"},
        ),
        ("1 observation/CCD (the old shape)", {"exposures_per_ccd": 1, "obscore_per_product": False}),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for label, knobs in configs:
            options = ArchiveOptions.mast_like(sectors=(1,), targets=args.targets, file_size="small", **knobs)
            built = time.monotonic()
            with ArchiveThread(options, start_timeout=1800) as thread:
                archive = thread.archive
                build_s = time.monotonic() - built
                expected = expected_files(archive)
                obscore_rows = len(archive.catalog.tables["ivoa.obscore"].rows)
                runs = [
                    time_plan(archive.tap_url, Path(scratch) / f"plan-{i}.txt") for i in range(args.repeat)
                ]
            seconds = statistics.median(r[0] for r in runs)
            ok = all(code == 0 and planned == expected for _, code, planned in runs)
            rows.append((label, obscore_rows, expected, runs[-1][2], seconds, build_s, ok))
            print(f"{label}: {seconds:.1f} s (archive built in {build_s:.1f} s)", flush=True)
    print()
    print("| archive | ObsCore rows | light curves expected | planned | time to a complete plan | correct |")
    print("|---|---|---|---|---|---|")
    for label, obscore_rows, expected, planned, seconds, _build, ok in rows:
        verdict = "yes" if ok else "NO"
        print(f"| {label} | {obscore_rows:,} | {expected:,} | {planned:,} | {seconds:.1f} s | {verdict} |")
    baseline = rows[-1][4]
    for label, *_rest, seconds, _build, _ok in rows[:-1]:
        print(f"{label}: {seconds / baseline:.2f}x the old shape's plan time")
    return 0 if all(row[-1] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
