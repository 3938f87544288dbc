"""The benchmark suite at tiny sizes (`python -m benchmarks.run --smoke`): every scenario runs, every
tool's output is checked against the archive's md5s, and the outputs are written. No timings are
asserted here; the figures live in the benchmark's own output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("psutil", reason="the benchmark needs the bench extra: pip install -e '.[bench]'")
pytest.importorskip("matplotlib", reason="the benchmark needs the bench extra: pip install -e '.[bench]'")

from benchmarks.scenarios import available_peers  # after the skips: it imports psutil

REPO = Path(__file__).resolve().parents[2]
PEERS = ("parfive defaults", "parfive c=", "aria2c", "curl sequential", "requests loop")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("bench-smoke")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"the smoke suite failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads((out / "results.json").read_text()), out, done


@pytest.mark.integration
def test_every_download_scenario_runs_every_tool(smoke) -> None:
    result, _, _ = smoke
    missing_peers = available_peers()
    for scenario in ("1", "2", "3"):
        tools = [r["tool"] for r in result["downloads"] if r["scenario"] == scenario]
        assert any(t.startswith("tessmirror") for t in tools), f"scenario {scenario}: no tessmirror row"
        for peer in PEERS:
            installed = not any(peer.startswith(name) for name in missing_peers)
            if installed:
                assert any(t.startswith(peer) for t in tools), f"scenario {scenario}: {peer} did not run"
    for name, why in missing_peers.items():
        assert any(name in note for note in result["notes"]), f"{name} is missing but not reported: {why}"


@pytest.mark.integration
def test_every_tool_output_matches_the_archive(smoke) -> None:
    """The suite hashed every file each tool wrote; nothing may be missing or corrupt."""
    result, _, _ = smoke
    bad = [
        f"scenario {r['scenario']} {r['tool']}: {r['missing']} missing, {r['corrupt']} corrupt, "
        f"exit {r['exit_code']}"
        for r in result["downloads"]
        if r["missing"] or r["corrupt"] or r["ok"] != r["files"]
    ]
    assert not bad, "\n".join(bad)
    for r in result["downloads"]:
        assert r["files"] > 0 and r["bytes"] > 0
        if r["tool"].startswith("tessmirror"):
            assert r["exit_code"] == 0, r


@pytest.mark.integration
def test_scale_and_planning_scenarios_report(smoke) -> None:
    result, _, _ = smoke
    runs = {r["what"]: r for r in result["scale"]}
    small, big = runs["small plan"], runs["big plan"]
    assert big["planned_files"] > small["planned_files"] > 0
    for row in (small, big):
        assert row["peak_rss_planning_mb"] > 0 and row["peak_rss_running_mb"] > 0
        assert row["files_downloaded_in_sample"] > 0  # the fetch sample really downloaded
    resume = next(r for r in result["scale"] if r["what"].startswith("resume"))
    assert resume["exit_code"] == 0 and resume["all_skipped"]
    assert resume["manifest_entries"] == result["sizes"]["s4_manifest_entries"]
    (planning,) = result["planning"]
    # The row limit forces paging: more than one inventory page, and files requested before the last.
    assert planning["inventory_pages"] > 1
    assert planning["planned_files"] == result["sizes"]["s2_targets"]
    assert planning["first_file_request_s"] is not None
    assert planning["files_requested_before_plan_end"] > 0


@pytest.mark.integration
def test_outputs_are_written(smoke) -> None:
    result, out, done = smoke
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    assert "| scenario | tool |" in table and "| target | measured | goal | met |" in table
    assert table in done.stdout  # the same table is printed
    assert result["machine"]["nproc"] >= 1 and result["targets"]
    assert not (out / "work" / "out").exists()  # each tool's copy is removed once checked


def test_wan_model_limit_is_the_harness_model() -> None:
    """benchmarks.wan's port of compare.sh's model gives the harness README's figures (400 files,
    818.2 MB, kept-alive connections)."""
    from benchmarks.wan import Condition, model_limit

    defaults = Condition("A", 25, "400mbit", "4m", files=400, quick_files=400)
    slow = Condition("x", 25, "400mbit", "1m", files=400, quick_files=400)
    assert round(model_limit(defaults, 400, 818_200_000, 16), 1) == 46.8
    assert round(model_limit(slow, 400, 818_200_000, 16), 1) == 16.3
    assert round(model_limit(slow, 400, 818_200_000, 32), 1) == 31.3
    assert model_limit(Condition("L", 0, "0", "0", files=1, quick_files=1), 400, 818_200_000, 16) is None


def test_wan_rows_are_the_median_run_with_every_run_noted() -> None:
    from benchmarks.wan import median_rows

    def row(tool: str, mb_s: float, run: int) -> dict:
        return {
            "scenario": "WA",
            "tool": tool,
            "mb_s": mb_s,
            "ok": 3,
            "files": 3,
            "run": run,
            "connections": 16,
            "mean_connections": 16,
            "other_cpu_s": 0.0,
        }

    runs = [row("aria2c -j 16 md5", v, i) for i, v in enumerate((40.0, 30.0, 35.0))]
    runs += [row("tessmirror c=16 checksum", v, i) for i, v in enumerate((42.0, 44.0, 43.0))]
    aria, tm = median_rows(runs)
    assert (aria["mb_s"], aria["run"]) == (35.0, 2)
    assert "median of 3: 40.0, 30.0, 35.0 MB/s" in aria["note"]
    assert tm["mb_s"] == 43.0 and tm["vs_peers"] == {"aria2c -j 16 md5": 43.0 / 35.0}


@pytest.mark.integration
def test_the_auto_driver_downloads_everything_and_reports_its_count(tmp_path: Path) -> None:
    """benchmarks.tm_auto runs the engine's own `--concurrency auto`: every file arrives with its md5,
    and the count it reports stays within --max-connections."""
    import hashlib
    import os
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from benchmarks.wan import write_lists

    www = tmp_path / "www"
    www.mkdir()
    files = []
    for i in range(12):
        body = b"B" + os.urandom(50_000 + i)
        (www / f"f{i:02d}.bin").write_bytes(body)
        files.append((f"f{i:02d}.bin", len(body), hashlib.md5(body).hexdigest()))

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        lists = write_lists(tmp_path / "lists", files, f"http://127.0.0.1:{server.server_address[1]}")
        out = tmp_path / "out"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.tm_auto",
                "--input",
                str(lists["plan"]),
                "--out",
                str(out),
                "--max-connections",
                "4",
                "--no-fsync",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
    finally:
        server.shutdown()
        thread.join()
    assert done.returncode == 0, done.stdout + done.stderr
    for name, size, md5 in files:
        body = (out / name).read_bytes()
        assert len(body) == size and hashlib.md5(body).hexdigest() == md5
    tuner = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("tuner: "))[7:])
    assert 1 <= tuner["settled"] <= 4 and all(step["to"] <= 4 for step in tuner["steps"])
