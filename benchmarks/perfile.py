"""CPU per file and MB/s on real TCP, per verify level, with and without fsync (issue 15).

    .venv/bin/python -m benchmarks.perfile small --commit HEAD   # 2,000 FITS of 11,520 B, RTT 100 ms
    .venv/bin/python -m benchmarks.perfile big --commit HEAD     # 300 FITS of 2,039,040 B, loopback
    .venv/bin/python -m benchmarks.perfile small --levels fits --fsync on --runs 3

Both go through the WAN harness (../shared/tools/wan; root) in a namespace of their own (`tmpf`,
port 8092, /tmp/tmpf), so neither a colleague's `tmwan` nor `benchmarks.wan`'s `tmbench` is torn
down. `small` is scenario 2 on real TCP: RTT 100 ms, a 1000 Mbit/s link, no per-connection cap,
2,000 real FITS files (a primary HDU and a binary table, CHECKSUM and DATASUM on both: the `fits`
level does its whole work), `--conns 64`. `big` is the unthrottled case: plain loopback through the
harness, 300 SPOC-shaped 2 MB light curves rendered by the local archive's generator, 8 connections.

Every run is `tessmirror fetch --input PLAN --concurrency N --per-host N --verify LEVEL --layout
flat [--no-fsync]` in a fresh folder, from a clean `git archive` of `--commit` (default: the working
tree), measured by wait4 (CPU s = user + system of the process). Every file is hashed against its
md5 afterwards. **CPU ms/file** is the run's CPU over the files; **net of start-up** subtracts the CPU
of a one-file run of the same command (imports, plan read, session; the median of three per level),
so the figure is what each further file costs. **MB/s net of start-up** divides the bytes by the
run's wall time less that one-file run's (its start-up and, through the harness, one file's round
trips), the rate once files flow (for `small`, the fraction of
concurrency / latency is also shown so, in brackets). `--peers` adds `curl -Z --parallel-max N`
(no checks at all).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.measure import check_output, run_measured
from benchmarks.wan import REPO, Condition, Harness, _idle_ticks, export_commit, model_limit

PYTHON = sys.executable
SMALL_SIZE = 4 * 2880  # 11,520 bytes: a primary header, a table header, two blocks of table data
BIG_CADENCES = 0  # 0: the generator's full 2-minute sector (2,039,040 bytes)


@dataclass(frozen=True)
class Setup:
    name: str
    condition: Condition
    files: int
    conns: int
    kind: str  # "small" | "big"


SETUPS = {
    "small": Setup(
        "small", Condition("S", 50, "1000mbit", "0", files=2000, quick_files=500), 2000, 64, "small"
    ),
    "big": Setup("big", Condition("L", 0, "0", "0", files=300, quick_files=100), 300, 8, "big"),
}
HARNESS = Harness(ns="tmpf", port=8092, qnum=11, state=Path("/tmp/tmpf"))


# -- the files ------------------------------------------------------------------------------------
def _small_fits(index: int) -> bytes:
    """11,520 bytes of valid FITS, different for every index, with CHECKSUM and DATASUM on each HDU."""
    import numpy as np
    from astropy.io import fits

    rng = np.random.default_rng(index)
    column = fits.Column(name="FLUX", format="E", array=rng.random(1400).astype(np.float32))
    hdul = fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns([column])])
    buffer = io.BytesIO()
    hdul.writeto(buffer, checksum=True)
    data = buffer.getvalue()
    assert len(data) == SMALL_SIZE, len(data)
    return data


def _big_fits(index: int) -> bytes:
    from engine.archive.fitsgen import FileIdentity, full_cadences, render_bytes

    tic = 100_000_000 + index
    name = f"tess2018206045859-s0001-{tic:016d}-0120-s_lc.fits"
    identity = FileIdentity(name, "lc", tic, 1, 1, 1, 30.0 + index / 1000, -60.0)
    return render_bytes(identity, cadences=BIG_CADENCES or full_cadences(), seed=index)


def make_files(docroot: Path, count: int, kind: str) -> list[tuple[str, int, str]]:
    """(name, size, md5) of `count` FITS files in `docroot/kind` (reused when already there)."""
    folder = docroot / kind
    folder.mkdir(parents=True, exist_ok=True)
    index_path = folder / "bench-index.json"
    known: dict[str, list] = json.loads(index_path.read_text()) if index_path.exists() else {}
    files = []
    for i in range(count):
        name = f"tess2018206045859-s0001-{100_000_000 + i:016d}-0120-s_lc.fits"
        path = folder / name
        entry = known.get(name)
        if entry and path.exists() and path.stat().st_size == entry[0]:
            files.append((name, entry[0], entry[1]))
            continue
        data = _small_fits(i) if kind == "small" else _big_fits(i)
        path.write_bytes(data)
        known[name] = [len(data), hashlib.md5(data).hexdigest()]
        files.append((name, *known[name]))
    index_path.write_text(json.dumps(known))
    return files


def write_plan(path: Path, files: list[tuple[str, int, str]], base_url: str) -> Path:
    from engine.models import PlanItem
    from engine.plan.table import PlanWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = PlanWriter(path)
    writer.write(PlanItem(url=f"{base_url}/{n}", filename=n, size=s, md5=m) for n, s, m in files)
    writer.commit()
    return path


def _median_startup(runs: list[dict]) -> dict:
    """The one-file run with the median wall time (a start-up figure steadier than one run's)."""
    return sorted(runs, key=lambda row: row["wall_s"])[len(runs) // 2]


# -- one run --------------------------------------------------------------------------------------
def tessmirror_cmd(engine: Path, plan: Path, out: Path, conns: int, level: str, fsync: bool) -> list[str]:
    return [
        PYTHON,
        str(REPO / "benchmarks" / "tm_launch.py"),
        str(engine),
        "cli",
        "fetch",
        "--input",
        str(plan),
        "--out",
        str(out),
        "--concurrency",
        str(conns),
        "--per-host",
        str(conns),
        "--verify",
        level,
        "--layout",
        "flat",
        "--progress-interval",
        "3600",
        *([] if fsync else ["--no-fsync"]),
    ]


def run_one(cmd: list[str], files: list[tuple[str, int, str]], work: Path, label: str) -> dict:
    out = work / "out" / label
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [part if part != "@OUT@" else str(out) for part in cmd]
    tck = os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count() or 1
    server0, idle0 = HARNESS.server_ticks(), _idle_ticks()
    measured = run_measured(
        [*HARNESS.exec_prefix(), *cmd], work / "logs" / f"{label}.log", cwd=out, timeout=900
    )
    server1, idle1 = HARNESS.server_ticks(), _idle_ticks()
    check = check_output(out, {n: (s, m) for n, s, m in files}, [n for n, _, _ in files])
    shutil.rmtree(out, ignore_errors=True)
    busy = max(ncpu * measured.wall - (idle1 - idle0) / tck, 0.0)
    server_cpu = (server1 - server0) / tck
    return {
        "label": label,
        "files": check.expected,
        "ok": check.ok,
        "bad": len(check.missing) + len(check.corrupt),
        "bytes": check.nbytes,
        "wall_s": measured.wall,
        "cpu_s": measured.cpu,
        "peak_rss_mb": measured.peak_rss_mb,
        "exit": measured.returncode,
        "other_cpu_s": max(busy - measured.cpu - server_cpu, 0.0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perfile", description=__doc__.splitlines()[0])
    parser.add_argument(
        "setup", choices=sorted(SETUPS), help="small: scenario 2 on real TCP; big: 2 MB on loopback"
    )
    parser.add_argument(
        "--commit", default="", help="measure this commit (a clean git archive); default: the tree"
    )
    parser.add_argument(
        "--baseline", default="", help="also measure this commit, interleaved run by run (before/after)"
    )
    parser.add_argument("--levels", default="size,checksum,fits", help="verify levels (default all three)")
    parser.add_argument("--fsync", default="on,off", help="on, off or on,off (default)")
    parser.add_argument("--runs", type=int, default=1, help="repeats of each run; the median is shown")
    parser.add_argument("--files", type=int, default=0, help="file count (default: the setup's)")
    parser.add_argument("--conns", type=int, default=0, help="connections (default: the setup's)")
    parser.add_argument("--peers", action="store_true", help="also run curl -Z --parallel-max N")
    parser.add_argument("--out", type=Path, default=Path("/tmp/tmpf-bench"), help="work folder")
    ns = parser.parse_args(argv)
    setup = SETUPS[ns.setup]
    nfiles = ns.files or setup.files
    conns = ns.conns or setup.conns
    why = HARNESS.unavailable()
    if why:
        print(f"perfile: {why}; this benchmark needs the WAN harness", file=sys.stderr)
        return 2
    work: Path = ns.out / setup.name
    work.mkdir(parents=True, exist_ok=True)
    engine, engine_note = (REPO, "the working tree")
    if ns.commit:
        engine, engine_note = export_commit(ns.commit, work / "engine-tree")
    trees = [("", engine)]
    if ns.baseline:
        base_tree, base_note = export_commit(ns.baseline, work / "baseline-tree")
        trees = [(f"[{base_note}] ", base_tree), (f"[{engine_note}] ", engine)]
    base_url = f"http://127.0.0.1:{HARNESS.port}/{setup.kind}"
    print(f"files: {nfiles} x {setup.kind} FITS in {HARNESS.docroot / setup.kind}", flush=True)
    started = time.monotonic()
    files = make_files(HARNESS.docroot, nfiles, setup.kind)
    print(f"  ready in {time.monotonic() - started:.1f} s", flush=True)
    plan = write_plan(work / "plan.ecsv", files, base_url)
    one = write_plan(work / "plan-one.ecsv", files[:1], base_url)
    cond = setup.condition
    print(HARNESS.setup(cond), flush=True)
    levels = [lv.strip() for lv in ns.levels.split(",") if lv.strip()]
    fsyncs = [part.strip() == "on" for part in ns.fsync.split(",") if part.strip()]
    rows = []
    try:
        for level in levels:
            startups = {
                tag: _median_startup(
                    [
                        run_one(
                            tessmirror_cmd(tree, one, Path("@OUT@"), conns, level, True),
                            files[:1],
                            work,
                            f"one-{level}{'-base' if tree != engine else ''}",
                        )
                        for _ in range(3)
                    ]
                )
                for tag, tree in trees
            }
            for fsync in fsyncs:
                runs: dict[str, list[dict]] = {tag: [] for tag, _ in trees}
                for r in range(ns.runs):
                    for tag, tree in trees:  # interleaved: a change in the box's load hits both alike
                        base = "-base" if tree != engine else ""
                        label = f"{level}-{'fsync' if fsync else 'nofsync'}-{r}{base}"
                        cmd = tessmirror_cmd(tree, plan, Path("@OUT@"), conns, level, fsync)
                        runs[tag].append(run_one(cmd, files, work, label))
                for tag, _ in trees:
                    mine = sorted(runs[tag], key=lambda row: row["cpu_s"])  # the median run by CPU
                    row = dict(mine[len(mine) // 2])
                    row.update(
                        tool=f"{tag}tessmirror c={conns} {level}" + ("" if fsync else " no-fsync"),
                        startup_cpu_s=startups[tag]["cpu_s"],
                        startup_wall_s=startups[tag]["wall_s"],
                        cpu_runs=[round(x["cpu_s"], 2) for x in runs[tag]],
                        mb_runs=[round(x["bytes"] / x["wall_s"] / 1e6, 1) for x in runs[tag]],
                    )
                    rows.append(row)
        if ns.peers:
            cfg = work / "curl.cfg"
            cfg.write_text("".join(f'url = "{base_url}/{n}"\n' for n, _, _ in files))
            cmd = ["curl", "-sSf", "-Z", "--parallel-max", str(conns), "--remote-name-all", "-K", str(cfg)]
            row = run_one(cmd, files, work, "curlZ")
            row.update(
                tool=f"curl -Z --parallel-max {conns}",
                startup_cpu_s=0.0,
                startup_wall_s=0.0,
                cpu_runs=[row["cpu_s"]],
            )
            rows.append(row)
    finally:
        print(HARNESS.teardown(), flush=True)
    latency = 2 * cond.delay_ms / 1000
    nbytes = sum(s for _, s, _ in files)
    limit = model_limit(cond, nfiles, nbytes, conns)
    print()
    print(f"{setup.name}: {nfiles} files, {cond.label}, {conns} connections; tessmirror: {engine_note}")
    columns = (
        "tool",
        "ok/files",
        "wall s",
        "files/s",
        "MB/s",
        "MB/s net of start-up",
        "x limit",
        "CPU s",
        "CPU ms/file",
        "net of start-up ms/file",
        "start-up CPU s",
        "peak RSS MB",
        "other CPU s",
    )
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        ok, wall = row["ok"], row["wall_s"]
        net = (row["cpu_s"] - row["startup_cpu_s"]) / max(ok - 1, 1) * 1000
        mb_s = row["bytes"] / wall / 1e6
        # The same bytes over the run's wall less the median one-file run's (interpreter, imports,
        # plan read, session): the rate once files flow, which a longer run approaches.
        steady = wall - row["startup_wall_s"]
        mb_net = f"{row['bytes'] / steady / 1e6:.1f}" if steady > 0 else "-"
        # small files: files/s against concurrency / latency (the figure); else MB/s / model
        if latency and setup.kind == "small":
            x = f"{ok / wall / (conns / latency):.2f}"
            if steady > 0:
                x += f" ({ok / steady / (conns / latency):.2f} net)"
        else:
            x = f"{mb_s / limit:.2f}" if limit else "-"
        cells = (
            row["tool"],
            f"{ok}/{row['files']}",
            f"{wall:.2f}",
            f"{ok / wall:.0f}",
            f"{mb_s:.1f}",
            mb_net,
            x,
            f"{row['cpu_s']:.2f}",
            f"{row['cpu_s'] / max(ok, 1) * 1000:.2f}",
            f"{net:.2f}",
            f"{row['startup_cpu_s']:.2f}",
            f"{row['peak_rss_mb']:.0f}",
            f"{row['other_cpu_s']:.1f}",
        )
        print("| " + " | ".join(cells) + " |")
    print("CPU s of each run: " + "; ".join(f"{row['tool']}: {row['cpu_runs']}" for row in rows))
    print("MB/s of each run: " + "; ".join(f"{row['tool']}: {row.get('mb_runs', '-')}" for row in rows))
    (work / "results.json").write_text(json.dumps({"rows": rows, "engine": engine_note}, indent=1))
    if any(row["bad"] or row["exit"] for row in rows):
        print("some run missed files or failed; see the logs under", work / "logs")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
