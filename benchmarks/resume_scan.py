"""Scenario 4's resume scan on its own: how long `tessmirror fetch` takes to find nothing to do.

    .venv/bin/python -m benchmarks.resume_scan                         # 1,000,000 entries, the working tree
    .venv/bin/python -m benchmarks.resume_scan --commit HEAD --runs 3  # a clean export of a commit
    .venv/bin/python -m benchmarks.resume_scan --entries 100000

The mirror (a manifest of N verified entries and the saved plan that lists the same N files) is the
one the suite's scenario 4 builds (`benchmarks.scenarios.Bench.scenario4_resume`, the engine's own
encoder and plan writer), kept in `--out` between runs because building it takes a while. Each run is
`tessmirror fetch --input PLAN --out MIRROR` measured by wait4 (wall, CPU, peak RSS), checked to
skip every file. Before the runs, the manifest's two readers are timed in this process: `verified()`
(what the run calls) and `load()` (the suite's "manifest load").
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.measure import run_measured
from benchmarks.scenarios import FULL, Bench
from benchmarks.wan import REPO, export_commit

# The two readers timed in a fresh process that imports `engine` from the measured tree (as
# benchmarks/tm_launch.py does: the editable install's import hook is dropped first).
_READERS = """
import sys, time
from pathlib import Path
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path.insert(0, sys.argv[1])
from engine.manifest import Manifest
manifest = Manifest(Path(sys.argv[2]))
started = time.perf_counter(); verified = len(manifest.verified()); verified_s = time.perf_counter() - started
started = time.perf_counter(); loaded = len(manifest.load()); load_s = time.perf_counter() - started
print(verified, verified_s, loaded, load_s)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.resume_scan", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--entries", type=int, default=FULL.s4_manifest_entries, help="manifest entries")
    parser.add_argument("--commit", default="", help="measure this commit (a clean git archive)")
    parser.add_argument("--runs", type=int, default=1, help="runs of the resume (the median is shown)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/resume-scan"), help="work folder")
    ns = parser.parse_args(argv)
    ns.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(ns.out, dataclasses.replace(FULL, s4_manifest_entries=ns.entries), say=lambda _text: None)
    mirror = bench.work / f"s4-resume-{ns.entries}"
    plan = mirror / "plan.ecsv"
    if not ((mirror / ".tessmirror" / "manifest.jsonl").exists() and plan.exists()):
        print(f"building a {ns.entries:,}-entry mirror in {mirror} (once)", flush=True)
        bench.scenario4_resume()
    tree, note = (REPO, "the working tree")
    if ns.commit:
        tree, note = export_commit(ns.commit, ns.out / "engine-tree")
    readers = subprocess.run(
        [sys.executable, "-c", _READERS, str(tree), str(mirror / ".tessmirror")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    verified, verified_s, loaded, load_s = (
        int(readers[0]),
        float(readers[1]),
        int(readers[2]),
        float(readers[3]),
    )
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "tm_launch.py"),
        str(tree),
        "cli",
        "fetch",
        "--input",
        str(plan),
        "--out",
        str(mirror),
        "--progress-interval",
        "3600",
    ]
    runs = []
    for index in range(ns.runs):
        measured = run_measured(cmd, ns.out / "logs" / f"resume-{index}.log", timeout=1800)
        skipped = f"skipped     {ns.entries}" in measured.log.read_text(errors="replace")
        runs.append((measured.wall, measured.cpu, measured.peak_rss_mb, measured.returncode, skipped))
    wall = statistics.median(run[0] for run in runs)
    # The CPU time shows a change through another engineer's load, which stretches the wall time.
    cpu = statistics.median(run[1] for run in runs)
    print(f"resume scan, {ns.entries:,}-entry manifest; tessmirror: {note}")
    print(f"  Manifest.verified(): {verified:,} entries in {verified_s:.2f} s (what the run calls)")
    print(f"  Manifest.load():     {loaded:,} entries in {load_s:.2f} s (the suite's 'manifest load')")
    for wall_s, cpu_s, rss, code, skipped in runs:
        print(
            f"  fetch: wall {wall_s:.2f} s, CPU {cpu_s:.2f} s, peak RSS {rss:.0f} MB, exit {code}, "
            f"all skipped: {skipped}"
        )
    print(f"  median wall {wall:.2f} s (target < 10 s), median CPU {cpu:.2f} s")
    return 0 if all(run[3] == 0 and run[4] for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
