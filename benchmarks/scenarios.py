"""The five scenarios of issue 6, each tool run as a subprocess against the archive in its own process.

Every download row records what the tool cost (wall, CPU, peak RSS) and what it delivered: each
expected file is hashed and compared with the archive's md5, so a tool that skips or spoils work is
counted as missing/corrupt, and its MB/s counts only good bytes.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.measure import ArchiveProcess, Measured, check_output, run_measured
from engine.plan.table import export_plan, items_to_table, load_plan, table_to_items

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
TESSMIRROR = [PY, "-m", "engine.cli"]


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is. FULL is the issue's; SMOKE checks only that everything runs."""

    name: str
    # 1. WAN: full-size files, latency to the first byte, a per-connection rate and a link cap.
    s1_files: int
    s1_file_size: str | int
    s1_latency: float
    s1_bandwidth: float
    s1_linkcap: float
    s1_conn: int
    s1_sequential: int  # files given to the sequential peers
    # 2. many small files, high latency.
    s2_targets: int
    s2_cadences: int
    s2_latency: float
    s2_conns: tuple[int, ...]  # tessmirror is run at each; the peers at the last
    s2_sequential: int
    s2_parfive_default: int  # parfive at its defaults makes 6 requests a file: a subset
    # 3. unthrottled loopback.
    s3_files: int
    s3_conn: int
    # 4. scale.
    s4_targets_big: int  # with products lc,tp,dvt: three files per target
    s4_run_seconds: float  # how long the download sample runs after planning
    s4_manifest_entries: int
    # 5. planning with paging forced.
    s5_hard_limit: int


FULL = Sizes(
    name="full",
    s1_files=1000,
    s1_file_size="full",
    s1_latency=0.075,
    s1_bandwidth=3e6,
    s1_linkcap=64e6,
    s1_conn=32,
    s1_sequential=20,
    s2_targets=10_000,
    s2_cadences=150,
    s2_latency=0.1,
    s2_conns=(32, 64),
    s2_sequential=100,
    s2_parfive_default=500,
    s3_files=400,
    s3_conn=8,
    s4_targets_big=67_000,
    s4_run_seconds=10.0,
    s4_manifest_entries=1_000_000,
    s5_hard_limit=500,
)
SMOKE = Sizes(
    name="smoke",
    s1_files=24,
    s1_file_size=150,
    s1_latency=0.02,
    s1_bandwidth=2e6,
    s1_linkcap=20e6,
    s1_conn=8,
    s1_sequential=4,
    s2_targets=120,
    s2_cadences=150,
    s2_latency=0.02,
    s2_conns=(8,),
    s2_sequential=6,
    s2_parfive_default=20,
    s3_files=24,
    s3_conn=4,
    s4_targets_big=240,
    s4_run_seconds=1.0,
    s4_manifest_entries=5_000,
    s5_hard_limit=40,
)


def available_peers() -> dict[str, str]:
    """Peer name -> why it is missing (empty: present)."""
    missing = {}
    if shutil.which("aria2c") is None:
        missing["aria2c"] = "aria2c is not installed (benchmarks/setup.sh installs it)"
    if shutil.which("curl") is None:
        missing["curl"] = "curl is not installed (benchmarks/setup.sh installs it)"
    if importlib.util.find_spec("parfive") is None:
        missing["parfive"] = "parfive is not installed (pip install -e '.[bench]')"
    return missing


def _is_inventory(query: str) -> bool:
    """The planner's inventory pages, not its footprint query or its TAP_SCHEMA probe."""
    return "TAP_SCHEMA" not in query and "trgType = 'FIELD'" not in query


class Bench:
    """Runs the scenarios and collects their rows (see benchmarks/report.py for the table)."""

    def __init__(self, out: Path, sizes: Sizes, *, say: Callable[[str], None] = print) -> None:
        self.out = out
        self.work = out / "work"
        self.sizes = sizes
        self.say = say
        self.rows: list[dict] = []  # download rows (scenarios 1-3)
        self.scale: list[dict] = []  # scenario 4
        self.planning: list[dict] = []  # scenario 5
        self.notes: list[str] = []
        self.missing = available_peers()
        for peer, why in self.missing.items():
            self.notes.append(f"{peer} skipped: {why}")
        self.work.mkdir(parents=True, exist_ok=True)

    # -- helpers ------------------------------------------------------------------------------------
    def _archive(self, key: str, **options: object) -> ArchiveProcess:
        data = self.work / f"archive-{key}"
        shutil.rmtree(data, ignore_errors=True)
        arc = ArchiveProcess({**options, "data_dir": str(data)}, self.work / "logs" / f"archive-{key}.log")
        self.say(f"[archive {key}] up in {arc.start_seconds:.1f} s at {arc.base_url}")
        return arc

    def _plan(self, arc: ArchiveProcess, path: Path, *extra: str) -> tuple[list, Measured]:
        """`tessmirror plan` against the archive: the same file list every tool gets."""
        path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [*TESSMIRROR, "plan", "--sector", "1", "--tap-url", arc.tap_url, *extra, "-o", str(path)]
        m = run_measured(cmd, self.work / "logs" / f"plan-{path.stem}.log")
        if m.returncode != 0:
            raise RuntimeError(f"tessmirror plan failed (exit {m.returncode}); see {m.log}")
        return list(table_to_items(load_plan(path))), m

    def _truth(self, arc: ArchiveProcess, key: str) -> dict[str, tuple[int, str]]:
        path = self.work / f"truth-{key}.json"
        arc.command(cmd="truth", path=str(path), product="lc")
        return {name: (size, md5) for name, (size, md5) in json.loads(path.read_text()).items()}

    def _lists(self, items: Sequence, key: str) -> dict[str, Path]:
        """The same files as a plan (ECSV), a URL<TAB>name list, an aria2 input file, a curl script."""
        base = self.work / "lists"
        base.mkdir(parents=True, exist_ok=True)
        table = items_to_table(items)
        paths = {k: base / f"{key}.{k}" for k in ("ecsv", "tsv", "aria2", "sh")}
        table.write(paths["ecsv"], format="ascii.ecsv", overwrite=True)
        paths["tsv"].write_text("".join(f"{i.url}\t{i.filename}\n" for i in items))
        with open(paths["aria2"], "w") as out:
            export_plan(table, "aria2", out)
        text = io.StringIO()
        export_plan(table, "curl", text)  # one `curl -f -L -C - -o NAME URL` a file, like MAST's scripts
        paths["sh"].write_text('cd "$1" || exit 2\n' + text.getvalue())
        return paths

    def _download(
        self,
        scenario: str,
        tool: str,
        cmd: list[str],
        out_dir: Path,
        items: Sequence,
        truth: dict[str, tuple[int, str]],
        *,
        connections: int,
        limit_mb_s: float | None = None,
        limit_files_s: float | None = None,
        note: str = "",
    ) -> dict:
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        m = run_measured(cmd, self.work / "logs" / f"s{scenario}-{tool.replace(' ', '_')}.log")
        names = [i.filename for i in items]
        check = check_output(out_dir, truth, names)
        gb = check.nbytes / 1e9
        row = {
            "scenario": scenario,
            "tool": tool,
            "connections": connections,
            "files": len(names),
            "ok": check.ok,
            "missing": len(check.missing),
            "corrupt": len(check.corrupt),
            "bytes": check.nbytes,
            "wall_s": m.wall,
            "mb_s": check.nbytes / 1e6 / m.wall,
            "files_s": check.ok / m.wall,
            "cpu_s": m.cpu,
            "cpu_s_per_gb": m.cpu / gb if gb else None,
            "peak_rss_mb": m.peak_rss_mb,
            "exit_code": m.returncode,
            "limit_mb_s": limit_mb_s,
            "limit_files_s": limit_files_s,
            "note": note,
        }
        if limit_mb_s:
            row["x_limit"] = row["mb_s"] / limit_mb_s
        elif limit_files_s:
            row["x_limit"] = row["files_s"] / limit_files_s
        else:
            row["x_limit"] = None
        self.rows.append(row)
        self.say(
            f"  s{scenario} {tool:<34} {m.wall:7.1f} s {row['mb_s']:8.1f} MB/s {row['files_s']:8.1f} files/s "
            f"cpu {m.cpu:6.1f} s rss {m.peak_rss_mb:6.0f} MB ok {check.ok}/{len(names)} "
            f"missing {len(check.missing)} corrupt {len(check.corrupt)} exit {m.returncode}"
        )
        shutil.rmtree(out_dir, ignore_errors=True)  # disk: each tool's copy goes once checked
        return row

    def _tessmirror(self, plan: Path, out: Path, conn: int, level: str, *extra: str) -> list[str]:
        return [
            *TESSMIRROR,
            "fetch",
            "--input",
            str(plan),
            "--out",
            str(out),
            "--concurrency",
            str(conn),
            "--per-host",
            str(conn),
            "--verify",
            level,
            "--progress-interval",
            "3600",
            *extra,
        ]

    def _peers(
        self,
        scenario: str,
        lists: dict[str, Path],
        items: Sequence,
        truth: dict,
        conn: int,
        *,
        seq_lists: tuple[dict[str, Path], Sequence] | None = None,
        parfive_default: tuple[dict[str, Path], Sequence] | None = None,
        limit: Callable[[int], dict],
        seq_note: str = "",
        parfive_note: str = "",
    ) -> None:
        """parfive (defaults and at `conn`), aria2c at `conn`, sequential curl and requests."""
        out = self.work / "out"
        if "parfive" not in self.missing:
            plist, pitems = parfive_default or (lists, items)
            self._download(
                scenario,
                "parfive defaults (5x5 splits)",
                [PY, "-m", "benchmarks.peer_parfive", str(plist["tsv"]), str(out)],
                out,
                pitems,
                truth,
                connections=25,
                note=parfive_note,
                **limit(25),
            )
            self._download(
                scenario,
                f"parfive c={conn} splits=1",
                [
                    PY,
                    "-m",
                    "benchmarks.peer_parfive",
                    str(lists["tsv"]),
                    str(out),
                    "--max-conn",
                    str(conn),
                    "--max-splits",
                    "1",
                ],
                out,
                items,
                truth,
                connections=conn,
                **limit(conn),
            )
        if "aria2c" not in self.missing:
            self._download(
                scenario,
                f"aria2c -j {conn} md5",
                [
                    "aria2c",
                    "-i",
                    str(lists["aria2"]),
                    "-d",
                    str(out),
                    "-j",
                    str(conn),
                    "-x",
                    "1",
                    "--file-allocation=none",
                    "--check-integrity=true",
                    "--auto-file-renaming=false",
                    "--allow-overwrite=true",
                    "--console-log-level=warn",
                    "--summary-interval=0",
                    "--download-result=hide",
                ],
                out,
                items,
                truth,
                connections=conn,
                **limit(conn),
            )
        slist, sitems = seq_lists or (lists, items)
        if "curl" not in self.missing:
            self._download(
                scenario,
                "curl sequential",
                ["bash", str(slist["sh"]), str(out)],
                out,
                sitems,
                truth,
                connections=1,
                note=seq_note,
                **limit(1),
            )
        self._download(
            scenario,
            "requests loop",
            [PY, "-m", "benchmarks.peer_requests", str(slist["tsv"]), str(out)],
            out,
            sitems,
            truth,
            connections=1,
            note=seq_note,
            **limit(1),
        )

    # -- scenario 1 and 3 (and the small half of 4) share one archive of full-size files --------------
    def scenarios_1_3_4small(self, only: set[str]) -> None:
        s = self.sizes
        arc = self._archive("full", sectors=[1], targets=s.s1_files, file_size=s.s1_file_size)
        with arc:
            arc.command(cmd="warm", product="lc")
            items, _ = self._plan(arc, self.work / "lists" / "s1-plan.ecsv")
            items = items[: s.s1_files]
            truth = self._truth(arc, "full")
            lists = self._lists(items, "s1")
            seq = items[: s.s1_sequential]
            seq_lists = self._lists(seq, "s1-seq")
            if "1" in only:
                self.scenario1(arc, items, lists, truth, (seq_lists, seq))
            if "3" in only:
                self.scenario3(arc, items[: s.s3_files], truth)
            if "4" in only:  # two products of the same targets: 2,000 files in the full suite
                self.scenario4_plan_rss(arc, "small", ["--products", "lc,tp"])

    def scenario1(self, arc: ArchiveProcess, items, lists, truth, seq) -> None:
        s = self.sizes
        self.say(f"[1] sector mirror over a WAN: {len(items)} files")
        spec = f"latency={s.s1_latency:g},bandwidth={s.s1_bandwidth:g},linkcap={s.s1_linkcap:g}"
        arc.command(cmd="faults", spec=spec)
        netem = "available but not used" if netem_available() else "not available in this kernel"
        self.notes.append(
            f"scenario 1 shaping: the archive's knobs ({spec}), per response latency and rate and one "
            f"shared link cap; tc netem is {netem}, so there is no real delay on the wire"
        )
        link = s.s1_linkcap / 1e6

        def limit(conn: int) -> dict:
            return {"limit_mb_s": link}

        out = self.work / "out"
        # At checksum level, like aria2c's md5; scenario 3 shows what each level costs.
        self._download(
            "1",
            f"tessmirror c={s.s1_conn} checksum",
            self._tessmirror(lists["ecsv"], out, s.s1_conn, "checksum"),
            out,
            items,
            truth,
            connections=s.s1_conn,
            limit_mb_s=link,
        )
        self._peers(
            "1",
            lists,
            items,
            truth,
            s.s1_conn,
            seq_lists=seq,
            limit=limit,
            seq_note=f"first {len(seq[1])} files only (1 connection, {s.s1_bandwidth / 1e6:g} MB/s at most)",
        )
        arc.command(cmd="faults", spec="")

    def scenario3(self, arc: ArchiveProcess, items, truth) -> None:
        s = self.sizes
        self.say(f"[3] unthrottled loopback: {len(items)} files")
        arc.command(cmd="faults", spec="")
        lists = self._lists(items, "s3")
        out = self.work / "out"
        for level in ("size", "checksum", "fits"):
            self._download(
                "3",
                f"tessmirror c={s.s3_conn} {level}",
                self._tessmirror(lists["ecsv"], out, s.s3_conn, level),
                out,
                items,
                truth,
                connections=s.s3_conn,
            )
        self._download(
            "3",
            f"tessmirror c={s.s3_conn} checksum no-fsync",
            self._tessmirror(lists["ecsv"], out, s.s3_conn, "checksum", "--no-fsync"),
            out,
            items,
            truth,
            connections=s.s3_conn,
            note="--no-fsync: the peers do not fsync either",
        )
        self._peers("3", lists, items, truth, s.s3_conn, limit=lambda conn: {})

    # -- scenarios 2 and 5 share an archive of many small files with TAP paging forced --------------
    def scenarios_5_2(self, only: set[str]) -> None:
        s = self.sizes
        arc = self._archive(
            "small",
            sectors=[1],
            targets=s.s2_targets,
            file_size=s.s2_cadences,
            tap_hard_limit=s.s5_hard_limit,
            tap_default_maxrec=s.s5_hard_limit,
        )
        with arc:
            arc.command(cmd="warm", product="lc")
            plan = self.scenario5(arc)  # scenario 2 downloads the plan this run made
            if "2" in only:
                items = list(table_to_items(load_plan(plan)))
                self.scenario2(arc, items, self._truth(arc, "small"))

    def scenario5(self, arc: ArchiveProcess) -> Path:
        """`tessmirror run` from nothing: when the first inventory page, the first file request and
        the plan's end reach the archive (the archive's clock, same machine). Stopped once the plan
        is saved; its plan is scenario 2's."""
        s = self.sizes
        self.say(f"[5] planning: TAP row limit {s.s5_hard_limit}")
        out = self.work / "s5-run"
        shutil.rmtree(out, ignore_errors=True)
        saved = out / ".tessmirror" / "plan.ecsv"
        plan_saved: list[float] = []

        def stop_when(elapsed: float) -> bool:
            if not plan_saved and saved.exists():
                plan_saved.append(elapsed)
            return bool(plan_saved) and elapsed > plan_saved[0] + 0.5

        arc.command(cmd="events", path=str(self.work / "events-before-s5.json"))  # start clean
        cmd = [
            *TESSMIRROR,
            "run",
            "--sector",
            "1",
            "--tap-url",
            arc.tap_url,
            "--out",
            str(out),
            "--concurrency",
            "8",
            "--progress-interval",
            "3600",
        ]
        started = time.time()
        m = run_measured(cmd, self.work / "logs" / "s5-run.log", stop_when=stop_when)
        events_path = self.work / "events-s5.json"
        arc.command(cmd="events", path=str(events_path))
        events = json.loads(events_path.read_text())
        pages = [t for t, kind, what, _ in events if kind == "tap_result" and _is_inventory(what)]
        files = [t for t, kind, _, _ in events if kind == "file"]
        if not saved.exists():
            raise RuntimeError(f"scenario 5: the run saved no plan (exit {m.returncode}); see {m.log}")
        plan = self.work / "lists" / "s5-plan.ecsv"
        shutil.copyfile(saved, plan)
        row = {
            "scenario": "5",
            "tool": "tessmirror run",
            "tap_row_limit": s.s5_hard_limit,
            "inventory_pages": len(pages),
            "planned_files": len(load_plan(plan)),
            "first_page_s": pages[0] - started if pages else None,
            "first_file_request_s": files[0] - started if files else None,
            "first_byte_after_first_page_s": (files[0] - pages[0]) if pages and files else None,
            "last_page_s": pages[-1] - started if pages else None,
            "plan_saved_s": plan_saved[0] if plan_saved else None,
            "files_requested_before_plan_end": sum(1 for t in files if pages and t < pages[-1]),
            "peak_rss_mb": m.peak_rss_mb,
        }
        self.planning.append(row)
        self.say(f"  s5 {_brief(row)}")
        shutil.rmtree(out, ignore_errors=True)
        return plan

    def scenario2(self, arc: ArchiveProcess, items, truth) -> None:
        s = self.sizes
        self.say(f"[2] many small files: {len(items)} files, latency {s.s2_latency:g} s")
        arc.command(cmd="faults", spec=f"latency={s.s2_latency:g}")
        lists = self._lists(items, "s2")
        out = self.work / "out"

        def limit(conn: int) -> dict:
            return {"limit_files_s": conn / s.s2_latency}

        for conn in s.s2_conns:
            self._download(
                "2",
                f"tessmirror c={conn} fits",
                self._tessmirror(lists["ecsv"], out, conn, "fits"),
                out,
                items,
                truth,
                connections=conn,
                **limit(conn),
            )
        seq = items[: s.s2_sequential]
        pf = items[: s.s2_parfive_default]
        self._peers(
            "2",
            lists,
            items,
            truth,
            s.s2_conns[-1],
            seq_lists=(self._lists(seq, "s2-seq"), seq),
            parfive_default=(self._lists(pf, "s2-parfive"), pf),
            limit=limit,
            seq_note=f"first {len(seq)} files only",
            parfive_note=f"first {len(pf)} files only (6 requests a file: a HEAD-like GET, then 5 ranges)",
        )
        arc.command(cmd="faults", spec="")

    # -- scenario 4 -------------------------------------------------------------------------------------
    def scenario4_plan_rss(self, arc: ArchiveProcess, label: str, products: list[str]) -> None:
        """Peak RSS of `tessmirror plan` (planning alone), then of `tessmirror fetch` on that plan over
        a download sample of `s4_run_seconds` from its first verified file, then SIGTERM.

        Planning and downloading are measured apart because in `tessmirror run` they overlap: the
        bounded queue holds the planner back until the download catches up, so a 200,000-file run
        plans for as long as it downloads."""
        s = self.sizes
        plan = self.work / "lists" / f"s4-{label}.ecsv"
        _, planned_m = self._plan(arc, plan, *products)
        planned = len(load_plan(plan))
        out = self.work / f"s4-{label}"
        shutil.rmtree(out, ignore_errors=True)
        manifest = out / ".tessmirror" / "manifest.jsonl"
        first: list[float] = []

        def stop_when(elapsed: float) -> bool:
            if not first and manifest.exists() and manifest.stat().st_size:
                first.append(elapsed)
            return bool(first) and elapsed > first[0] + s.s4_run_seconds

        cmd = self._tessmirror(plan, out, 8, "checksum", "--no-fsync")
        m = run_measured(cmd, self.work / "logs" / f"s4-fetch-{label}.log", stop_when=stop_when)
        row = {
            "scenario": "4",
            "what": f"{label} plan",
            "planned_files": planned,
            "plan_seconds": planned_m.wall,
            "peak_rss_planning_mb": planned_m.peak_rss_mb,
            "fetch_start_s": first[0] if first else None,
            "files_downloaded_in_sample": _manifest_lines(manifest),
            "peak_rss_running_mb": m.peak_rss_mb,
            "peak_rss_mb": max(planned_m.peak_rss_mb, m.peak_rss_mb),
            "exit_code": m.returncode,
        }
        self.scale.append(row)
        self.say(f"  s4 {_brief(row)}")
        shutil.rmtree(out, ignore_errors=True)

    def scenario4_big(self) -> None:
        s = self.sizes
        self.say(f"[4] scale: {3 * s.s4_targets_big} files planned (archive build first)")
        arc = self._archive("scale", sectors=[1], targets=s.s4_targets_big, file_size=s.s1_file_size)
        with arc:
            self.scenario4_plan_rss(arc, "big", ["--products", "lc,tp,dvt"])
        self.scenario4_resume()

    def scenario4_resume(self) -> None:
        """A mirror whose manifest holds N verified entries, and its saved plan: how long until
        `tessmirror fetch` has decided there is nothing to do."""
        from engine.manifest import Manifest, ManifestEntry, encode_entry
        from engine.models import PlanItem
        from engine.plan.table import save_plan

        n = self.sizes.s4_manifest_entries
        self.say(f"[4] resume start-up with a {n:,}-entry manifest")
        mirror = self.work / f"s4-resume-{n}"
        plan = mirror / "plan.ecsv"
        manifest = mirror / ".tessmirror" / "manifest.jsonl"
        if not (plan.exists() and manifest.exists()):  # kept between runs: building it takes a while
            shutil.rmtree(mirror, ignore_errors=True)
            manifest.parent.mkdir(parents=True)
            items = []
            for i in range(n):
                tic = 100_000_000 + i
                name = f"tess2018206045859-s0001-{tic:016d}-0120-s_lc.fits"
                items.append(
                    PlanItem(
                        url=f"http://127.0.0.1:9/api/v0.1/Download/file?uri=mast:TESS/product/{name}",
                        filename=name,
                        obs_id=name.removesuffix("_lc.fits"),
                        product="lc",
                        sector=1,
                        size=2_039_040,
                        est_kb=1991,
                        md5=f"{i:032x}",
                        target_name=str(tic),
                    )
                )
            with open(manifest.with_suffix(".tmp"), "wb") as handle:
                for item in items:
                    entry = ManifestEntry(
                        url=item.url,
                        path=f"flat/{item.filename}",
                        status="verified",
                        obs_id=item.obs_id,
                        nbytes=item.size,
                        md5=item.md5,
                        level="fits",
                        attempts=1,
                        time=1.7e9,
                    )
                    handle.write(encode_entry(entry))
            save_plan(items_to_table(items), plan)
            manifest.with_suffix(".tmp").rename(manifest)
            del items
        started = time.perf_counter()
        loaded = len(Manifest(manifest.parent).load())
        load_s = time.perf_counter() - started
        cmd = [
            *TESSMIRROR,
            "fetch",
            "--input",
            str(plan),
            "--out",
            str(mirror),
            "--progress-interval",
            "3600",
        ]
        m = run_measured(cmd, self.work / "logs" / "s4-resume.log")
        log_text = m.log.read_text(errors="replace")
        row = {
            "scenario": "4",
            "what": f"resume, {n:,}-entry manifest",
            "manifest_entries": loaded,
            "manifest_load_s": load_s,
            "resume_wall_s": m.wall,
            "peak_rss_mb": m.peak_rss_mb,
            "exit_code": m.returncode,
            "all_skipped": f"skipped     {n}" in log_text,
        }
        self.scale.append(row)
        self.say(f"  s4 {_brief(row)}")

    def as_dict(self) -> dict:
        return {
            "sizes": asdict(self.sizes),
            "downloads": self.rows,
            "scale": self.scale,
            "planning": self.planning,
            "notes": self.notes,
        }


def _brief(row: dict) -> str:
    return json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})


def _manifest_lines(path: Path) -> int:
    try:
        with open(path, "rb") as handle:
            return sum(1 for _ in handle)
    except FileNotFoundError:
        return 0


_NETEM: bool | None = None


def netem_available() -> bool:
    """Whether this kernel has tc's netem qdisc (tried on a throwaway dummy link, then removed)."""
    global _NETEM
    if _NETEM is None:
        import subprocess

        _NETEM = False
        if shutil.which("tc") and shutil.which("ip"):
            dev = "tmbench0"
            try:
                made = subprocess.run(["ip", "link", "add", dev, "type", "dummy"], capture_output=True)
                if made.returncode == 0:
                    tried = subprocess.run(
                        ["tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", "1ms"],
                        capture_output=True,
                    )
                    _NETEM = tried.returncode == 0
            finally:
                subprocess.run(["ip", "link", "del", dev], capture_output=True)
    return _NETEM
