"""The benchmark's outputs: the ratios and targets, the text table, the JSON and the PNG plot."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

# The unit that counts in each download scenario: WAN and loopback are about bytes, small files about files.
RATE_KEY = {"1": "mb_s", "2": "files_s", "3": "mb_s"}
SCENARIO_TITLE = {
    "1": "1. sector mirror over a WAN (MB/s)",
    "2": "2. many small files (files/s)",
    "3": "3. unthrottled loopback (MB/s)",
}


def _is_tessmirror(row: dict) -> bool:
    return row["tool"].startswith("tessmirror")


def add_ratios(rows: list[dict]) -> None:
    """Each tessmirror row gets its rate divided by each peer's in the same scenario."""
    for row in rows:
        if not _is_tessmirror(row):
            continue
        key = RATE_KEY[row["scenario"]]
        row["vs_peers"] = {
            peer["tool"]: (row[key] / peer[key] if peer[key] else None)
            for peer in rows
            if peer["scenario"] == row["scenario"] and not _is_tessmirror(peer)
        }


def _find(rows: Iterable[dict], scenario: str, prefix: str) -> dict | None:
    return next((r for r in rows if r["scenario"] == scenario and r["tool"].startswith(prefix)), None)


def evaluate_targets(result: dict) -> list[dict]:
    """The issue's targets, each with the measured value and whether it was met."""
    rows = result["downloads"]
    targets: list[dict] = []

    def add(scenario: str, what: str, measured: float | None, goal: str, met: bool | None) -> None:
        targets.append({"scenario": scenario, "target": what, "measured": measured, "goal": goal, "met": met})

    tm1 = _find(rows, "1", "tessmirror c=") and max(
        (r for r in rows if r["scenario"] == "1" and _is_tessmirror(r)), key=lambda r: r["mb_s"]
    )
    if tm1:
        add("1", f"{tm1['tool']}: share of the link limit", tm1["x_limit"], ">= 0.90", tm1["x_limit"] >= 0.90)
        aria = _find(rows, "1", "aria2c")
        if aria:
            ratio = tm1["mb_s"] / aria["mb_s"] if aria["mb_s"] else None
            add(
                "1",
                f"{tm1['tool']} / {aria['tool']} (MB/s)",
                ratio,
                ">= 1.0",
                ratio is not None and ratio >= 1.0,
            )
    for r in rows:
        if r["scenario"] == "2" and _is_tessmirror(r):
            add(
                "2",
                f"{r['tool']}: share of concurrency / latency",
                r["x_limit"],
                ">= 0.85",
                r["x_limit"] >= 0.85,
            )
    tm3 = _find(rows, "3", "tessmirror c=") and next(
        (r for r in rows if r["scenario"] == "3" and r["tool"].endswith(" checksum")), None
    )
    if tm3:
        aria = _find(rows, "3", "aria2c")
        if aria and aria["cpu_s_per_gb"] and tm3["cpu_s_per_gb"]:
            ratio = tm3["cpu_s_per_gb"] / aria["cpu_s_per_gb"]
            add("3", f"{tm3['tool']} CPU/GB / {aria['tool']} CPU/GB", ratio, "<= 2.0", ratio <= 2.0)
        conn = tm3["connections"]
        parfive = _find(rows, "3", f"parfive c={conn}")
        if parfive and parfive["mb_s"]:
            ratio = tm3["mb_s"] / parfive["mb_s"]
            add("3", f"{tm3['tool']} / {parfive['tool']} (MB/s)", ratio, ">= 1.0", ratio >= 1.0)
    big = next((r for r in result["scale"] if r["what"] == "big plan"), None)
    small = next((r for r in result["scale"] if r["what"] == "small plan"), None)
    if big and small:
        ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
        add(
            "4",
            f"peak RSS {big['planned_files']} / {small['planned_files']} files",
            ratio,
            "<= 1.5",
            ratio <= 1.5,
        )
        add(
            "4",
            f"peak RSS, {big['planned_files']} files (MB)",
            big["peak_rss_mb"],
            "< 300",
            big["peak_rss_mb"] < 300,
        )
    resume = next((r for r in result["scale"] if r["what"].startswith("resume")), None)
    if resume:
        add(
            "4",
            f"resume start-up, {resume['manifest_entries']:,} entries (s)",
            resume["resume_wall_s"],
            "< 10",
            resume["resume_wall_s"] < 10 and resume["exit_code"] == 0,
        )
    for p in result["planning"]:
        gap = p["first_byte_after_first_page_s"]
        add(
            "5",
            "first file request after the first inventory page (s)",
            gap,
            "<= 3",
            gap is not None and gap <= 3,
        )
    return targets


def _num(value: object, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _short(tool: str) -> str:
    return tool.replace(" (5x5 splits)", "").replace(" sequential", " seq")


def format_table(result: dict) -> str:
    """The tables as plain text (also valid Markdown)."""
    lines: list[str] = []
    head = (
        "| scenario | tool | conns | files ok/total (missing, corrupt) | wall s | MB/s | files/s | CPU s | "
        "CPU s/GB | peak RSS MB | x limit | tessmirror / peer | note |"
    )
    lines += [head, "|" + "---|" * 13]
    for r in result["downloads"]:
        vs = r.get("vs_peers") or {}
        ratios = ", ".join(f"{_short(k)} {_num(v, 2)}" for k, v in vs.items())
        lines.append(
            f"| {r['scenario']} | {r['tool']} | {r['connections']} | {r['ok']}/{r['files']} "
            f"({r['missing']}, {r['corrupt']}) | {_num(r['wall_s'])} | {_num(r['mb_s'])} | "
            f"{_num(r['files_s'])} | {_num(r['cpu_s'])} | {_num(r['cpu_s_per_gb'])} | "
            f"{_num(r['peak_rss_mb'], 0)} | {_num(r['x_limit'], 2)} | {ratios} | {r['note']} |"
        )
    if result["scale"]:
        lines += [
            "",
            "| scale (4) | planned files | plan s | peak RSS planning MB | peak RSS running MB | note |",
            "|---|---|---|---|---|---|",
        ]
        for r in result["scale"]:
            if r["what"].endswith("plan"):
                lines.append(
                    f"| {r['what']} | {r['planned_files']} | {_num(r['plan_seconds'])} | "
                    f"{_num(r['peak_rss_planning_mb'], 0)} | {_num(r['peak_rss_running_mb'], 0)} | "
                    f"fetch sample: {r['files_downloaded_in_sample']} files; first file after "
                    f"{_num(r['fetch_start_s'])} s |"
                )
            else:
                lines.append(
                    f"| {r['what']} | {r['manifest_entries']} | - | - | {_num(r['peak_rss_mb'], 0)} | "
                    f"start-up to done {_num(r['resume_wall_s'], 2)} s (manifest load alone "
                    f"{_num(r['manifest_load_s'], 2)} s); exit {r['exit_code']}, all skipped: "
                    f"{r['all_skipped']} |"
                )
    if result["planning"]:
        lines += [
            "",
            "| planning (5) | row limit | pages | files | first page s | first file request s | "
            "first byte - first page s | last page s | plan saved s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in result["planning"]:
            lines.append(
                f"| {p['tool']} | {p['tap_row_limit']} | {p['inventory_pages']} | {p['planned_files']} | "
                f"{_num(p['first_page_s'], 2)} | {_num(p['first_file_request_s'], 2)} | "
                f"{_num(p['first_byte_after_first_page_s'], 2)} | {_num(p['last_page_s'], 2)} | "
                f"{_num(p['plan_saved_s'], 2)} |"
            )
    if result.get("targets"):
        lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
        for t in result["targets"]:
            met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
            lines.append(
                f"| {t['scenario']}. {t['target']} | {_num(t['measured'], 2)} | {t['goal']} | {met} |"
            )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """One bar chart per download scenario: each tool's rate in the unit that counts there."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    scenarios = [s for s in ("1", "2", "3") if any(r["scenario"] == s for r in result["downloads"])]
    if not scenarios:
        return
    fig, axes = plt.subplots(1, len(scenarios), figsize=(6 * len(scenarios), 5), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios, strict=True):
        rows = [r for r in result["downloads"] if r["scenario"] == scenario]
        key = RATE_KEY[scenario]
        colours = ["tab:blue" if _is_tessmirror(r) else "tab:grey" for r in rows]
        ax.barh([r["tool"] for r in rows], [r[key] for r in rows], color=colours)
        limits = {r.get("limit_mb_s") if key == "mb_s" else r.get("limit_files_s") for r in rows} - {None}
        if scenario == "1" and limits:
            ax.axvline(max(limits), color="tab:red", linestyle="--", label="link limit")
            ax.legend()
        ax.set_title(SCENARIO_TITLE[scenario])
        ax.invert_yaxis()
        ax.set_xlabel(key.replace("_s", "/s").replace("mb", "MB"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> str:
    """results.json, table.md and throughput.png under `out`; returns the table text."""
    add_ratios(result["downloads"])
    result["targets"] = evaluate_targets(result)
    table = format_table(result)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "table.md").write_text(table + "\n")
    plot(result, out / "throughput.png")
    return table
