"""Scenario 1 on real TCP: tessmirror against aria2c and curl through the WAN harness.

    sudo .venv/bin/python -m benchmarks.wan --out bench-wan           # 4 conditions x 3 runs, ~15 min
    sudo .venv/bin/python -m benchmarks.wan --quick --out bench-wan   # 2 conditions x 1 run, ~3 min
    .venv/bin/python -m benchmarks.wan --conditions A,C --runs 3 --out bench-wan

The harness (../shared/tools/wan, see its README) is a network namespace with a round-trip delay,
an aggregate bottleneck (tbf), a per-connection cap (TCP pacing) and nginx. For each condition this
module runs its `setup.sh` (and prints what it prints), serves the same random files to every tool,
runs each tool inside the namespace (`ip netns exec`), hashes every file each tool wrote against the
manifest's md5, and prints the suite's table plus each tool's share of the harness's model limit
(an ideal client with the same connection count: no CPU cost, one RTT between files on a kept-alive
connection, slow start once).

Where the harness cannot run (not root, no `ip netns`, no harness folder), it says why and runs
scenario 1 with the archive's own throttling knobs instead (`python -m benchmarks.run --only 1`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.measure import check_output, run_measured

REPO = Path(__file__).resolve().parent.parent
HARNESS = REPO.parent / "shared" / "tools" / "wan"
PYTHON = sys.executable
FILE_SIZE = 2_039_040  # a TESS 2-minute light curve
MAX_CONNECTIONS = 32  # the auto run's politeness cap (engine.fetch.autotune.DEFAULT_MAX_CONNECTIONS)
PEER_CONNECTIONS = 16


@dataclass(frozen=True)
class Condition:
    """One path: setup.sh's DELAY_MS (one way), RATE (tc syntax), PERCONN_RATE (nginx syntax)."""

    name: str
    delay_ms: int
    rate: str
    perconn: str
    files: int  # about 10-25 s per run at the model limit of 16 connections
    quick_files: int

    @property
    def label(self) -> str:
        rate = "no link cap" if self.rate == "0" else self.rate.replace("mbit", " Mbit/s")
        per = "no per-connection cap" if self.perconn == "0" else f"{self.perconn[:-1]} MiB/s per connection"
        return f"RTT {2 * self.delay_ms} ms, {rate}, {per}"


CONDITIONS = {
    # The harness's defaults: the link binds from 12 connections on.
    "A": Condition("A", 25, "400mbit", "4m", files=300, quick_files=120),
    # A fast long path: the link binds from 14 connections on (and this 2-core box's CPU near it).
    "B": Condition("B", 50, "1000mbit", "8m", files=450, quick_files=200),
    # A slow far archive on a thin link: the link binds from 12 connections on.
    "C": Condition("C", 75, "100mbit", "1m", files=100, quick_files=40),
    # Slower connections: the link binds from 22 connections on, so 16 leave a quarter of it idle.
    "D": Condition("D", 50, "400mbit", "2m", files=300, quick_files=120),
    # Slow connections on a fat link: 45 connections would be needed; the politeness cap binds.
    "E": Condition("E", 50, "400mbit", "1m", files=200, quick_files=80),
    # Plain loopback through the harness (not in the default set): what the box itself can do.
    "L": Condition("L", 0, "0", "0", files=400, quick_files=150),
}
DEFAULT_CONDITIONS = "A,B,C,D"
QUICK_CONDITIONS = "A,C"


@dataclass(frozen=True)
class Harness:
    """Names for one harness instance: kept apart from the README's default `tmwan`, so a colleague
    using the harness by hand is not torn down by a benchmark run."""

    directory: Path = HARNESS
    ns: str = "tmbench"
    port: int = 8090
    qnum: int = 9
    state: Path = Path("/tmp/tmbench")

    @property
    def docroot(self) -> Path:
        return self.state / "www"

    def env(self, condition: Condition | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(NS=self.ns, PORT=str(self.port), QNUM=str(self.qnum), STATE=str(self.state))
        env["DOCROOT"] = str(self.docroot)
        if condition is not None:
            env.update(DELAY_MS=str(condition.delay_ms), RATE=condition.rate, PERCONN_RATE=condition.perconn)
        return env

    def unavailable(self) -> str | None:
        """Why the harness cannot run here, or None."""
        if not (self.directory / "setup.sh").is_file():
            return f"no WAN harness at {self.directory}"
        if os.geteuid() != 0:
            return "the WAN harness needs root (network namespaces, iptables, tc)"
        if shutil.which("ip") is None:
            return "`ip` (iproute2) is not installed"
        return None

    def setup(self, condition: Condition) -> str:
        done = subprocess.run(
            ["bash", str(self.directory / "setup.sh")],
            env=self.env(condition),
            capture_output=True,
            text=True,
            timeout=900,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise RuntimeError(f"setup.sh failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done.stdout.strip()

    def teardown(self) -> str:
        done = subprocess.run(
            ["bash", str(self.directory / "teardown.sh")],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        return (done.stdout + done.stderr).strip()

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def tcp_counters(self) -> tuple[int, int]:
        """(connections accepted, segments retransmitted) in the namespace so far."""
        text = subprocess.run(
            [*self.exec_prefix(), "cat", "/proc/net/snmp"], capture_output=True, text=True, timeout=30
        ).stdout
        rows = [line.split() for line in text.splitlines() if line.startswith("Tcp:")]
        if len(rows) < 2:
            return 0, 0
        values = dict(zip(rows[0][1:], rows[1][1:], strict=False))
        return int(values.get("PassiveOpens", 0)), int(values.get("RetransSegs", 0))

    def server_ticks(self) -> int:
        """CPU ticks used so far by the harness's own processes (nginx, the delay line)."""
        pids = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True).stdout.split()
        total = 0
        for pid in pids:
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                if comm not in ("nginx", "nfqdelay"):
                    continue
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
            except (OSError, IndexError, ValueError):
                continue
        return total


# -- the files ------------------------------------------------------------------------------------
def make_files(docroot: Path, count: int, base_url: str, *, seed: int = 1) -> list[tuple[str, int, str]]:
    """`count` files of FILE_SIZE ± 10 % random bytes in `docroot` (reused when already there).

    The bytes are random, like the harness's mkfiles.sh, except the first one: tessmirror refuses a
    body that starts like a web page or JSON ('<', '{', '[' after whitespace), as an archive's error
    page does, so no file may start that way by chance (1 in 85 would). Returns (name, size, md5).
    """
    import hashlib
    import random

    docroot.mkdir(parents=True, exist_ok=True)
    index = docroot / "bench-index.json"
    rng = random.Random(seed)
    sizes = [int(FILE_SIZE * (1 + 0.1 * (2 * rng.random() - 1))) for _ in range(count)]
    known: dict[str, list] = {}
    if index.exists():
        known = json.loads(index.read_text())
    files: list[tuple[str, int, str]] = []
    for i, size in enumerate(sizes):
        name = f"b{i:05d}.bin"
        path = docroot / name
        entry = known.get(name)
        if entry and entry[0] == size and path.exists() and path.stat().st_size == size:
            files.append((name, size, entry[1]))
            continue
        body = bytearray(os.urandom(size))
        body[0] = 0x42  # 'B': not markup, not whitespace
        path.write_bytes(body)
        md5 = hashlib.md5(body).hexdigest()
        known[name] = [size, md5]
        files.append((name, size, md5))
    index.write_text(json.dumps(known))
    return files


def write_lists(work: Path, files: list[tuple[str, int, str]], base_url: str) -> dict[str, Path]:
    """The same files in each tool's input format: an ECSV plan with sizes and md5s (tessmirror),
    an aria2 input file with checksum lines, a URL list (curl)."""
    from engine.models import PlanItem
    from engine.plan.table import PlanWriter

    work.mkdir(parents=True, exist_ok=True)
    paths = {"plan": work / "plan.ecsv", "aria2": work / "aria2.txt", "urls": work / "urls.txt"}
    writer = PlanWriter(paths["plan"])
    writer.write(PlanItem(url=f"{base_url}/{n}", filename=n, size=s, md5=m) for n, s, m in files)
    writer.commit()
    paths["aria2"].write_text(
        "".join(f"{base_url}/{n}\n  out={n}\n  checksum=md5={m}\n" for n, s, m in files)
    )
    paths["urls"].write_text("".join(f"{base_url}/{n}\n" for n, _, _ in files))
    return paths


# -- the model limit (a port of compare.sh's `model`, keep-alive case) ---------------------------
def _bytes_per_s(rate: str) -> float:
    """tc syntax (400mbit) to bytes/s; 0 means no cap (inf)."""
    text = rate.strip().lower()
    digits = "".join(ch for ch in text if ch.isdigit() or ch == ".") or "0"
    number = float(digits)
    unit = text[len(digits) :]
    number *= {"kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8}.get(unit, 1 / 8)
    return number or math.inf


def _nginx_bytes(size: str) -> float:
    """nginx size syntax (4m = 4 MiB) to bytes/s; 0 means no cap (inf)."""
    text = size.strip().lower()
    mult = {"k": 1024, "m": 1024**2, "g": 1024**3}.get(text[-1:], 1)
    number = float(text.rstrip("kmg") or 0) * mult
    return number or math.inf


def model_limit(condition: Condition, nfiles: int, nbytes: int, conns: int, mss: int = 1460) -> float | None:
    """MB/s an ideal client reaches with `conns` kept-alive connections (compare.sh's model, K=1):
    every connection works through its share of the files back to back, 1 RTT between files, slow
    start from a 10-segment window once; the pipe (payload share of RATE) bounds the total."""
    rtt = 2 * condition.delay_ms / 1000
    seg = (mss if mss > 0 else 65495) - 12
    pipe = _bytes_per_s(condition.rate)
    if pipe != math.inf:
        pipe *= seg / (seg + 66 + 33)
    per_conn = _nginx_bytes(condition.perconn)
    stream = min(per_conn, pipe)
    if stream == math.inf:
        return None

    def xfer(size: float, rate: float) -> float:
        t = sent = 0.0
        window = 10.0 * seg
        while window < rate * rtt and sent + window < size:
            sent += window
            t += rtt
            window *= 2
        return t + (size - sent) / rate

    size = nbytes / nfiles
    per_chain = math.ceil(nfiles / conns)
    chain = rtt + per_chain * (rtt + size / stream) + xfer(size, stream) - size / stream
    total = max(nbytes / pipe, chain)
    return nbytes / total / 1e6


# -- the tools ------------------------------------------------------------------------------------
def tool_commands(
    lists: dict[str, Path],
    out: Path,
    *,
    no_fsync: bool,
    engine: Path = REPO,
    variants: tuple[str, ...] = (),
) -> dict[str, tuple[list[str], int]]:
    """Tool name -> (command, connections it opens). Run in `out`, inside the namespace.

    tessmirror runs from the source tree `engine` (see benchmarks/tm_launch.py)."""
    launch = [PYTHON, str(REPO / "benchmarks" / "tm_launch.py"), str(engine)]
    tm = [*launch, "cli"]
    fsync = ["--no-fsync"] if no_fsync else []
    n = PEER_CONNECTIONS
    auto = [
        *launch,
        "auto",
        "--input",
        str(lists["plan"]),
        "--out",
        str(out),
        "--max-connections",
        str(MAX_CONNECTIONS),
        "--verify",
        "checksum",
        "--layout",
        "flat",
        *fsync,
    ]
    # Experiments: the auto run again with some TunerSettings changed, e.g. "start=16,window_min=1".
    extra = {
        f"tessmirror auto [{spec}] checksum": (
            [*auto, *(arg for pair in spec.split(",") for arg in ("--tuner", pair))],
            MAX_CONNECTIONS,
        )
        for spec in variants
    }
    return {
        f"tessmirror c={n} checksum": (
            [
                *tm,
                "fetch",
                "--input",
                str(lists["plan"]),
                "--out",
                str(out),
                "--concurrency",
                str(n),
                "--per-host",
                str(n),
                "--verify",
                "checksum",
                "--layout",
                "flat",
                "--progress-interval",
                "5",
                *fsync,
            ],
            n,
        ),
        "tessmirror auto checksum": (auto, MAX_CONNECTIONS),
        **extra,
        f"aria2c -j {n} md5": (
            [
                "aria2c",
                "-i",
                str(lists["aria2"]),
                "-d",
                str(out),
                "-j",
                str(n),
                "-x",
                "1",
                "--check-integrity=true",
                "--file-allocation=none",
                "--allow-overwrite=true",
                "--auto-file-renaming=false",
                "--console-log-level=warn",
                "--summary-interval=0",
                "--download-result=hide",
            ],
            n,
        ),
        f"curl -Z --parallel-max {n}": (
            [
                "curl",
                "-sSf",
                "-Z",
                "--parallel-max",
                str(n),
                "--remote-name-all",
                "-K",
                str(lists["curlcfg"]),
            ],
            n,
        ),
    }


def export_commit(rev: str, dest: Path) -> tuple[Path, str]:
    """`git archive REV` unpacked into `dest` (replaced); returns it and a note naming the commit."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.Popen(["git", "archive", sha], cwd=REPO, stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {sha} failed")
    return dest.resolve(), f"commit {sha}"


def _tuner_line(log: Path) -> dict | None:
    try:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("tuner: "):
                return json.loads(line[len("tuner: ") :])
    except (OSError, ValueError):
        pass
    return None


def _idle_ticks() -> int:
    with open("/proc/stat") as handle:
        fields = handle.readline().split()
    return int(fields[4]) + int(fields[5])


def run_tool(
    harness: Harness,
    condition: Condition,
    tool: str,
    lists: dict[str, Path],
    files: list[tuple[str, int, str]],
    work: Path,
    run_index: int,
    *,
    no_fsync: bool,
    engine: Path,
    variants: tuple[str, ...] = (),
) -> dict:
    """One run of one tool into a fresh folder; every file hashed against the manifest, then removed."""
    out = work / "out" / f"{tool.replace(' ', '_').replace('=', '')}-{run_index}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd, conns = tool_commands(lists, out, no_fsync=no_fsync, engine=engine, variants=variants)[tool]
    tck = os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count() or 1
    accepted0, retrans0 = harness.tcp_counters()
    server0, idle0 = harness.server_ticks(), _idle_ticks()
    measured = run_measured(
        [*harness.exec_prefix(), *cmd],
        work / "logs" / f"{condition.name}-{out.name}.log",
        cwd=out,
        timeout=600,
    )
    server1, idle1 = harness.server_ticks(), _idle_ticks()
    accepted1, retrans1 = harness.tcp_counters()
    truth = {n: (s, m) for n, s, m in files}
    check = check_output(out, truth, [n for n, _, _ in files])
    shutil.rmtree(out, ignore_errors=True)
    busy = max(ncpu * measured.wall - (idle1 - idle0) / tck, 0.0)
    server_cpu = (server1 - server0) / tck
    tuner = _tuner_line(measured.log) if "auto" in tool else None
    settled = tuner["settled"] if tuner else conns
    nbytes = sum(s for _, s, _ in files)
    limit = model_limit(condition, len(files), nbytes, settled)
    mb_s = check.nbytes / measured.wall / 1e6
    return {
        "scenario": f"W{condition.name}",
        "condition": condition.label,
        "tool": tool,
        "run": run_index,
        "connections": settled,
        "mean_connections": tuner["mean"] if tuner else conns,
        "tuner_steps": tuner["steps"] if tuner else None,
        "tuner_timing": tuner.get("timing") if tuner else None,
        # auto: MB/s at the settled count, from 1 s after the last step until the plan ran dry
        "steady_mb_s": tuner.get("steady_mb_s") if tuner else None,
        "steady_s": tuner.get("steady_s") if tuner else None,
        "steady_x_limit": (tuner["steady_mb_s"] / limit)
        if tuner and tuner.get("steady_mb_s") and limit
        else None,
        "files": check.expected,
        "ok": check.ok,
        "missing": len(check.missing),
        "corrupt": len(check.corrupt),
        "bytes": check.nbytes,
        "wall_s": measured.wall,
        "mb_s": mb_s,
        "files_s": check.ok / measured.wall,
        "cpu_s": measured.cpu,
        "cpu_s_per_gb": measured.cpu / (check.nbytes / 1e9) if check.nbytes else None,
        "peak_rss_mb": measured.peak_rss_mb,
        "limit_mb_s": limit,
        "x_limit": mb_s / limit if limit else None,
        "tcp_conns": accepted1 - accepted0,
        "retrans": retrans1 - retrans0,
        "server_cpu_s": server_cpu,
        "other_cpu_s": max(busy - measured.cpu - server_cpu, 0.0),
        "box_cpu_pct": 100 * busy / measured.wall,
        "exit_code": measured.returncode,
        "note": "",
    }


def median_rows(runs: list[dict]) -> list[dict]:
    """Per (condition, tool): the run with the median MB/s, noting every run's rate."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in runs:
        groups.setdefault((row["scenario"], row["tool"]), []).append(row)
    rows = []
    for group in groups.values():
        ordered = sorted(group, key=lambda r: r["mb_s"])
        chosen = (
            dict(ordered[(len(ordered) - 1) // 2]) if len(ordered) % 2 else dict(ordered[len(ordered) // 2])
        )
        chosen["runs"] = len(group)
        chosen["mb_s_runs"] = [round(r["mb_s"], 1) for r in group]
        chosen["all_md5_ok"] = all(r["ok"] == r["files"] for r in group)
        notes = []
        if len(group) > 1:
            notes.append(
                f"median of {len(group)}: " + ", ".join(f"{v:.1f}" for v in chosen["mb_s_runs"]) + " MB/s"
            )
        if chosen["tool"].startswith("tessmirror auto"):
            notes.append(
                f"settled at {chosen['connections']} (time-weighted mean {chosen['mean_connections']})"
            )
            if chosen.get("steady_mb_s"):
                notes.append(
                    f"settled: {chosen['steady_mb_s']:.1f} MB/s over {chosen['steady_s']:.0f} s = "
                    f"{_num(chosen['steady_x_limit'], 2)} x limit"
                )
        if chosen["other_cpu_s"] > 3:
            notes.append(f"other load {chosen['other_cpu_s']:.0f} CPU s")
        chosen["note"] = "; ".join(notes)
        rows.append(chosen)
    for row in rows:
        if row["tool"].startswith("tessmirror"):
            row["vs_peers"] = {
                peer["tool"]: row["mb_s"] / peer["mb_s"] if peer["mb_s"] else None
                for peer in rows
                if peer["scenario"] == row["scenario"] and not peer["tool"].startswith("tessmirror")
            }
    return rows


def evaluate(rows: list[dict], conditions: list[Condition]) -> list[dict]:
    """Issue 15's WAN targets, where the link (not the politeness cap) binds."""
    targets = []
    for cond in conditions:
        auto = next((r for r in rows if r["scenario"] == f"W{cond.name}" and "auto" in r["tool"]), None)
        if auto is None:
            continue
        pipe = _bytes_per_s(cond.rate)
        link_binds = pipe != math.inf and MAX_CONNECTIONS * _nginx_bytes(cond.perconn) >= pipe
        where = f"W{cond.name} ({cond.label})"
        if not link_binds:
            targets.append(
                {
                    "target": f"{where}: the politeness cap or the CPU binds; no target",
                    "measured": None,
                    "goal": "-",
                    "met": None,
                }
            )
            continue
        targets.append(
            {
                "target": f"{where}: auto, share of the model limit at its count (whole run, climb included)",
                "measured": auto["x_limit"],
                "goal": ">= 0.90",
                "met": auto["x_limit"] is not None and auto["x_limit"] >= 0.90,
            }
        )
        steady = auto.get("steady_x_limit")
        targets.append(
            {
                "target": f"{where}: auto, the same once settled (its last count, until the plan ran dry)",
                "measured": steady,
                "goal": ">= 0.90",
                "met": None if steady is None else steady >= 0.90,
            }
        )
        peers = [
            r for r in rows if r["scenario"] == auto["scenario"] and not r["tool"].startswith("tessmirror")
        ]
        if peers:
            best = max(peers, key=lambda r: r["mb_s"])
            ratio = auto["mb_s"] / best["mb_s"] if best["mb_s"] else None
            targets.append(
                {
                    "target": f"{where}: auto / best peer ({best['tool']})",
                    "measured": ratio,
                    "goal": ">= 1.05",
                    "met": ratio is not None and ratio >= 1.05,
                }
            )
        targets.append(
            {
                "target": f"{where}: every md5 right in every run (auto)",
                "measured": None,
                "goal": "all",
                "met": auto["all_md5_ok"],
            }
        )
    return targets


def _num(value: object, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(rows: list[dict], targets: list[dict], conditions: list[Condition]) -> str:
    """The suite's download table, plus the model limit, TCP connections and the box's other load."""
    lines = [f"- W{c.name}: {c.label}" for c in conditions]
    lines += [
        "",
        "| scenario | tool | conns | files ok/total (missing, corrupt) | wall s | MB/s | files/s | CPU s | "
        "CPU s/GB | peak RSS MB | model limit MB/s | x limit | TCP conns | other CPU s | tessmirror / peer | "
        "note |",
        "|" + "---|" * 16,
    ]
    for r in rows:
        vs = r.get("vs_peers") or {}
        ratios = ", ".join(f"{k} {_num(v, 2)}" for k, v in vs.items())
        lines.append(
            f"| {r['scenario']} | {r['tool']} | {r['connections']} | {r['ok']}/{r['files']} "
            f"({r['missing']}, {r['corrupt']}) | {_num(r['wall_s'])} | {_num(r['mb_s'])} | "
            f"{_num(r['files_s'])} | {_num(r['cpu_s'])} | {_num(r['cpu_s_per_gb'])} | "
            f"{_num(r['peak_rss_mb'], 0)} | {_num(r['limit_mb_s'])} | {_num(r['x_limit'], 2)} | "
            f"{r['tcp_conns']} | {_num(r['other_cpu_s'])} | {ratios} | {r['note']} |"
        )
    if targets:
        lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
        for t in targets:
            met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
            lines.append(f"| {t['target']} | {_num(t['measured'], 2)} | {t['goal']} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wan", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("bench-wan"), help="results folder (default bench-wan)"
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"conditions {QUICK_CONDITIONS}, fewer files, 1 run"
    )
    parser.add_argument("--conditions", help=f"some of {','.join(CONDITIONS)} (default {DEFAULT_CONDITIONS})")
    parser.add_argument("--runs", type=int, help="runs per tool and condition (default 3; --quick 1)")
    parser.add_argument("--tools", help="only tools whose name contains one of these words, e.g. auto,aria2c")
    parser.add_argument("--files", type=int, help="files per condition (default: the condition's own count)")
    parser.add_argument(
        "--no-fsync", action="store_true", help="tessmirror without fsync (the peers never fsync)"
    )
    parser.add_argument(
        "--commit",
        help="measure tessmirror as of this commit (a clean `git archive` export), not the working tree",
    )
    parser.add_argument(
        "--auto-variant",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="experiments: also run auto with these TunerSettings changed (benchmarks.tm_auto --tuner)",
    )
    parser.add_argument("--harness", type=Path, default=HARNESS, help=f"the WAN harness (default {HARNESS})")
    parser.add_argument(
        "--no-fallback", action="store_true", help="fail instead of using the archive's knobs"
    )
    ns = parser.parse_args(argv)
    names = (ns.conditions or (QUICK_CONDITIONS if ns.quick else DEFAULT_CONDITIONS)).upper().split(",")
    unknown = [n for n in names if n.strip() not in CONDITIONS]
    if unknown:
        parser.error(f"--conditions: unknown {', '.join(unknown)}; use some of {','.join(CONDITIONS)}")
    conditions = [CONDITIONS[n.strip()] for n in names]
    runs = ns.runs if ns.runs is not None else (1 if ns.quick else 3)
    if runs < 1:
        parser.error(f"--runs {runs}: must be at least 1")
    if ns.files is not None and ns.files < 1:
        parser.error(f"--files {ns.files}: must be at least 1")
    harness = Harness(directory=ns.harness)
    ns.out.mkdir(parents=True, exist_ok=True)
    why = harness.unavailable()
    if why is not None:
        print(f"the WAN harness cannot run here: {why}", flush=True)
        if ns.no_fallback:
            return 3
        print("falling back to scenario 1 with the archive's knobs (python -m benchmarks.run --only 1)")
        from benchmarks.run import main as run_main

        return run_main(
            ["--only", "1", "--out", str(ns.out / "fallback")] + (["--smoke"] if ns.quick else [])
        )
    engine, engine_note = REPO, "the working tree"
    if ns.commit:
        engine, engine_note = export_commit(ns.commit, ns.out / "engine")
    print(f"tessmirror from {engine_note} ({engine})", flush=True)
    started = time.monotonic()
    base_url = f"http://127.0.0.1:{harness.port}"

    def file_count(c: Condition) -> int:
        return ns.files or (c.quick_files if ns.quick else c.files)

    count = max(file_count(c) for c in conditions)
    print(f"making {count} files in {harness.docroot} ...", flush=True)
    all_files = make_files(harness.docroot, count, base_url)
    work = ns.out / "work"
    result: dict = {
        "engine": engine_note,
        "conditions": [asdict(c) for c in conditions],
        "setup": {},
        "runs": [],
        "load_avg_at_start": os.getloadavg(),
    }
    try:
        for cond in conditions:
            files = all_files[: file_count(cond)]
            print(f"\n== W{cond.name}: {cond.label}; {len(files)} files; setup.sh says:", flush=True)
            text = harness.setup(cond)
            print(text, flush=True)
            result["setup"][cond.name] = text
            lists = write_lists(work / cond.name, files, base_url)
            lists["curlcfg"] = work / cond.name / "curl.cfg"
            lists["curlcfg"].write_text("".join(f'url = "{base_url}/{n}"\n' for n, _, _ in files))
            tools = list(tool_commands(lists, work, no_fsync=ns.no_fsync, variants=tuple(ns.auto_variant)))
            if ns.tools:
                words = [w.strip() for w in ns.tools.split(",") if w.strip()]
                tools = [t for t in tools if any(w in t for w in words)]
            for index in range(runs):
                for tool in tools:  # interleaved, so a change in the box's load hits every tool alike
                    row = run_tool(
                        harness,
                        cond,
                        tool,
                        lists,
                        files,
                        work,
                        index,
                        no_fsync=ns.no_fsync,
                        engine=engine,
                        variants=tuple(ns.auto_variant),
                    )
                    result["runs"].append(row)
                    print(
                        f"W{cond.name} run {index + 1}/{runs} {tool}: {row['mb_s']:.1f} MB/s, "
                        f"{row['ok']}/{row['files']} md5 ok, x limit {_num(row['x_limit'], 2)}, "
                        f"conns {row['connections']}, TCP {row['tcp_conns']}, exit {row['exit_code']}, "
                        f"other CPU {row['other_cpu_s']:.1f} s",
                        flush=True,
                    )
    finally:
        print(harness.teardown(), flush=True)
    rows = median_rows(result["runs"])
    targets = evaluate(rows, conditions)
    result.update(
        rows=rows, targets=targets, suite_seconds=time.monotonic() - started, load_avg_at_end=os.getloadavg()
    )
    table = format_table(rows, targets, conditions)
    (ns.out / "wan-results.json").write_text(json.dumps(result, indent=1, default=str))
    (ns.out / "wan-table.md").write_text(table + "\n")
    print()
    print(table)
    print(
        f"\nsuite {result['suite_seconds']:.0f} s; load average at start {result['load_avg_at_start']}, "
        f"at end {result['load_avg_at_end']}"
    )
    print(f"wrote {ns.out / 'wan-results.json'} and {ns.out / 'wan-table.md'}")
    bad = [r for r in result["runs"] if r["ok"] != r["files"]]
    for r in bad:
        print(
            f"incomplete output: {r['scenario']} {r['tool']} run {r['run']}: {r['missing']} missing, "
            f"{r['corrupt']} corrupt, exit {r['exit_code']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
