"""`tessmirror report` from a synthetic manifest and plan: counts, escaping, pictures, bounded memory."""

from __future__ import annotations

import argparse
import base64
import re
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from engine import report as rep
from engine.exceptions import EXIT_USAGE, ConfigError
from engine.manifest import Manifest, ManifestEntry
from engine.redact import redact

pytest.importorskip("matplotlib")

FOOTPRINT = [89.0, -58.0, 101.0, -58.0, 103.0, -70.0, 87.0, -70.0]
HOSTILE = "tess<script>alert('x')</script>-s0001-lc.fits"


def write_plan(state: Path, rows: list[dict], *, meta: dict | None = None, positions: bool = True) -> Path:
    """An ECSV plan as the planner writes it, optionally with s_ra/s_dec columns."""
    from astropy.table import Table

    columns = {
        "url": [r["url"] for r in rows],
        "filename": [r.get("filename", r["url"].rsplit("/", 1)[-1]) for r in rows],
        "obs_id": [r.get("obs_id", "") for r in rows],
        "product": ["lc"] * len(rows),
        "sector": [1] * len(rows),
        "size": [r.get("size", 1000) for r in rows],
        "est_kb": [-1] * len(rows),
        "md5": [""] * len(rows),
        "target_name": [""] * len(rows),
    }
    if positions:
        columns["s_ra"] = [r.get("ra", 95.0) for r in rows]
        columns["s_dec"] = [r.get("dec", -64.0) for r in rows]
    table = Table(columns)
    table.meta.update(meta or {})
    state.mkdir(parents=True, exist_ok=True)
    path = state / "plan.ecsv"
    table.write(path, format="ascii.ecsv", delimiter=",", overwrite=True)
    return path


def write_manifest(state: Path, entries: list[ManifestEntry]) -> None:
    state.mkdir(parents=True, exist_ok=True)
    Manifest(state).append_entries(entries, fsync=False)


def entry(i: int, status: str = "verified", **fields) -> ManifestEntry:
    base = {
        "url": f"http://127.0.0.1/f{i}.fits",
        "path": f"tid/f{i}.fits",
        "status": status,
        "nbytes": 1000 if status == "verified" else 0,
        "attempts": 1,
        "time": 1_700_000_000.0 + i,
    }
    base.update(fields)
    return ManifestEntry(**base)


@pytest.fixture
def mirror(tmp_path):
    """A mirror of 10 planned files: 6 verified, 2 failed (one with a hostile name), 2 pending."""
    out = tmp_path / "mirror"
    state = out / ".tessmirror"
    rows = [
        {"url": f"http://127.0.0.1/f{i}.fits", "ra": 93.0 + i * 0.5, "dec": -64.0 + (i % 3)}
        for i in range(10)
    ]
    write_plan(state, rows, meta={"footprints": [{"name": "s1 cam1 ccd2", "polygon": FOOTPRINT}]})
    entries = [entry(i) for i in range(6)]
    entries.append(entry(6, "failed", path=f"tid/{HOSTILE}", error=f"HTTP 404 Not Found for '{HOSTILE}'"))
    entries.append(entry(7, "failed", error="<img src=x onerror=alert(1)> connection reset", attempts=9))
    entries.append(
        entry(0, "failed", error="an older failure", time=1_699_999_000.0)
    )  # older time, newer line
    entries.append(entry(0, "verified", time=1_700_000_100.0))  # the last record wins
    write_manifest(state, entries)
    return out, state


def build(out: Path, state: Path, **kwargs) -> tuple[rep.Report, str]:
    report = rep.build_report(out, state, **kwargs)
    return report, rep.render_html(report)


# -- counts ------------------------------------------------------------------------------------------
def test_counts_join_the_plan_to_the_last_manifest_record_of_each_url(mirror):
    out, state = mirror
    report, page = build(out, state)
    assert report.counts() == {"planned": 10, "verified": 6, "failed": 2, "pending": 2, "not in plan": 0}
    for name, value in (("planned", 10), ("verified", 6), ("failed", 2), ("pending", 2)):
        assert re.search(rf'id="count-{name}">{value}<', page), name
    assert 'id="bytes-verified">6.0 kB<' in page  # 6 files of 1000 bytes, decimal units
    assert 'id="bytes-planned">10.0 kB<' in page


def test_a_mirror_written_by_shards_is_reported_and_a_later_main_record_wins(tmp_path):
    """Shards write manifest.d/shard-K-of-N.jsonl (and no main file); a `verify --repair` afterwards
    appends to the main file: each file's truth is its latest record across the files, as for
    `tessmirror status` and `verify`."""
    out = tmp_path / "mirror"
    state = out / ".tessmirror"
    write_plan(state, [{"url": f"http://127.0.0.1/f{i}.fits"} for i in range(4)])
    shards = [Manifest(state, shard=f"shard-{k}-of-2") for k in range(2)]
    shards[0].append_entries([entry(0), entry(1, "failed", error="HTTP 500")], fsync=False)
    shards[1].append_entries([entry(2), entry(3, "failed", error="HTTP 500")], fsync=False)
    report, _page = build(out, state)
    assert report.counts() == {"planned": 4, "verified": 2, "failed": 2, "pending": 0, "not in plan": 0}
    write_manifest(state, [entry(1, time=1_800_000_000.0)])  # repaired later, in the main file
    report, _page = build(out, state)
    assert report.counts() == {"planned": 4, "verified": 3, "failed": 1, "pending": 0, "not in plan": 0}


def test_a_plan_url_with_a_token_matches_its_redacted_manifest_record(tmp_path):
    state = tmp_path / "m" / ".tessmirror"
    url = "https://archive.example.org/f.fits?token=SECRET123"
    write_plan(state, [{"url": url}])
    write_manifest(
        state, [ManifestEntry(url=redact(url), path="f.fits", status="verified", nbytes=5, time=1.0)]
    )
    report, page = build(tmp_path / "m", state)
    assert report.counts()["verified"] == 1
    assert "SECRET123" not in page


def test_manifest_urls_the_plan_does_not_name_are_counted_apart(tmp_path):
    state = tmp_path / "m" / ".tessmirror"
    write_plan(state, [{"url": "http://127.0.0.1/f0.fits"}])
    write_manifest(state, [entry(0), entry(1), entry(2)])
    report, page = build(tmp_path / "m", state)
    assert report.counts() == {"planned": 1, "verified": 1, "failed": 0, "pending": 0, "not in plan": 2}
    assert 'id="count-not-in-plan">2<' in page


def test_without_a_saved_plan_the_counts_come_from_the_manifest_and_the_page_says_so(tmp_path):
    state = tmp_path / "m" / ".tessmirror"
    write_manifest(state, [entry(0), entry(1, "failed", error="boom"), entry(2, "pending")])
    report, page = build(tmp_path / "m", state)
    assert report.counts() == {"planned": 3, "verified": 1, "failed": 1, "pending": 1}
    assert "No saved plan" in page
    assert report.sky_png is None and 'id="sky-plot"' not in page


# -- untrusted text ----------------------------------------------------------------------------------
def test_names_and_errors_from_the_archive_are_escaped_and_no_script_can_run(mirror):
    out, state = mirror
    _, page = build(out, state)
    assert "<script" not in page.lower()
    assert "<img src=x" not in page
    assert html_escaped(HOSTILE) in page  # shown, as text
    assert "&lt;img src=x onerror=alert(1)&gt; connection reset" in page
    # Defence in depth: even an unescaped tag could neither run a script nor fetch anything.
    assert "Content-Security-Policy" in page and "default-src 'none'" in page


def test_control_and_bidi_characters_from_the_archive_are_shown_as_escapes():
    assert rep._e("bidi\u202estif.cl_lc.fits\x1b[31m\x00") == "bidi\\u202estif.cl_lc.fits\\u001b[31m\\u0000"
    assert rep._e("plain é name") == "plain é name"


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_the_page_is_self_contained_with_its_pictures_inline_and_beside_it(mirror, tmp_path):
    out, state = mirror
    report = rep.build_report(out, state)
    target = rep.write_report(report, tmp_path / "rep")
    page = target.read_text(encoding="utf-8")
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in page and "<script" not in page and "@import" not in page
    for name, png in ((rep.SKY_PNG, report.sky_png), (rep.THROUGHPUT_PNG, report.throughput_png)):
        on_disk = (tmp_path / "rep" / name).read_bytes()
        assert on_disk == png and on_disk.startswith(b"\x89PNG\r\n\x1a\n")
        assert base64.b64encode(on_disk).decode() in page


def test_failures_table_lists_each_failed_file_with_its_reason_and_tries(mirror):
    out, state = mirror
    report, page = build(out, state)
    assert report.manifest.failed_total == 2
    assert 'id="failed-total">2<' in page
    table = page.split('id="failed-files"', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == 3  # header + two files
    assert "f7.fits" in table and ">9<" in table  # attempts shown
    assert "an older failure" not in page  # f0's failure was superseded by its verified record
    reasons = page.split('id="reasons"', 1)[1].split("</table>", 1)[0]
    assert "HTTP 404 Not Found for &#x27;…&#x27;" in reasons  # the quoted name is left out of the reason


def test_reasons_leave_out_urls_quoted_names_and_long_numbers_so_one_cause_is_one_row():
    one = rep.reason_of(
        "refusing a redirect from http://127.0.0.1:3/api?uri=mast:TESS/product/tess-s0001-0000000019269707_lc.fits"
        " to ftp://127.0.0.1/tess-s0001-0000000019269707_lc.fits: only http and https are followed"
    )
    assert one == "refusing a redirect from … to …: only http and https are followed"
    assert rep.reason_of("HTTP 503 Service Unavailable") == "HTTP 503 Service Unavailable"
    assert rep.reason_of("size 2039040 != 1000") == "size … != 1000"


def test_many_failures_are_capped_in_the_table_but_every_one_is_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(rep, "MAX_FAILURE_ROWS", 5)
    state = tmp_path / "m" / ".tessmirror"
    write_manifest(state, [entry(i, "failed", error=f"HTTP 503 for 'f{i}.fits'") for i in range(40)])
    report, page = build(tmp_path / "m", state)
    assert report.manifest.failed_total == 40 and len(report.manifest.failures) == 5
    assert report.manifest.reasons == {"HTTP 503 for '…'": 40}
    assert "The first 5 of 40 failed files" in page


# -- the sky -----------------------------------------------------------------------------------------
def test_the_sky_plot_is_a_gnomonic_projection_centred_on_the_footprint(mirror):
    out, state = mirror
    report, page = build(out, state)
    assert report.sky_png is not None and report.sky_png.startswith(b"\x89PNG")
    assert report.sky_description.startswith("gnomonic")
    assert 'id="sky-plot"' in page
    assert not [n for n in report.notes if "position" in n or "footprint" in n]


def test_on_the_tangent_plane_ra_increases_to_the_left_and_dec_upwards():
    plan = rep.PlanFacts(present=True, footprints=[("ccd", FOOTPRINT)])
    plan.sky = {"verified": rep.SkySample()}
    plan.sky["verified"].add(100.0, -64.0)  # east of the centre (RA 95)
    fig, _ = rep.sky_figure(plan)
    ax = fig.axes[0]
    left, right = ax.get_xlim()
    bottom, top = ax.get_ylim()
    assert left > right and top > bottom  # xi (east) grows to the left; eta (north) up
    east = ax.transData.transform((2.0, 0.0))[0]  # xi = +2 degrees: east of the centre
    centre = ax.transData.transform((0.0, 0.0))[0]
    assert east < centre  # the greater RA is drawn left of the centre


def test_a_plan_without_positions_says_which_columns_and_metadata_are_missing(tmp_path):
    state = tmp_path / "m" / ".tessmirror"
    write_plan(state, [{"url": "http://127.0.0.1/f0.fits"}], positions=False)
    write_manifest(state, [entry(0)])
    report, page = build(tmp_path / "m", state)
    assert report.sky_png is None
    assert "no target positions (columns s_ra and s_dec)" in page
    assert "no footprint polygons (&#x27;footprints&#x27;)" in page


def test_footprints_alone_are_drawn_when_the_plan_has_no_positions(tmp_path):
    state = tmp_path / "m" / ".tessmirror"
    polygon = "POLYGON ICRS " + " ".join(map(str, FOOTPRINT))
    write_plan(state, [{"url": "http://127.0.0.1/f0.fits"}], positions=False, meta={"footprints": [polygon]})
    write_manifest(state, [entry(0)])
    report, _ = build(tmp_path / "m", state)
    assert report.sky_png is not None and report.plan.footprints[0][1] == FOOTPRINT


def test_unusable_footprints_are_named_and_skipped(tmp_path):
    polygons, problems = rep.footprints_from_meta(
        {"footprints": [FOOTPRINT, [1, 2, 3], {"name": "bad", "polygon": 7}]}
    )
    assert polygons == [("footprint 1", FOOTPRINT)]
    assert problems[0].startswith("footprint 2:") and problems[1].startswith("bad:")


def test_points_all_over_the_sky_go_on_a_mollweide_map(tmp_path):
    state = tmp_path / "m" / ".tessmirror"
    rows = [
        {"url": f"http://example.org/f{i}.fits", "ra": (i * 37.0) % 360, "dec": -80 + (i * 13) % 160}
        for i in range(60)
    ]
    write_plan(state, rows)
    write_manifest(state, [entry(0)])
    report, _ = build(tmp_path / "m", state)
    assert report.sky_description.startswith("Mollweide")


def test_gnomonic_maps_the_centre_to_the_origin_east_to_positive_xi_and_north_up():
    xi, eta = rep.gnomonic(
        np.array([95.0, 96.0, 95.0, 275.0]), np.array([-64.0, -64.0, -63.0, 64.0]), 95.0, -64.0
    )
    assert abs(xi[0]) < 1e-9 and abs(eta[0]) < 1e-9
    assert xi[1] > 0  # greater RA: positive xi, drawn on the left once the axis is inverted
    assert eta[2] > 0 and abs(xi[2]) < 1e-9
    assert np.isnan(xi[3])  # the antipode has no image on the tangent plane


def test_great_circles_are_straight_lines_on_the_gnomonic_projection():
    ra, dec = rep.great_circle_path([80.0, -50.0, 110.0, -75.0, 100.0, -55.0], steps=16)
    xi, eta = rep.gnomonic(ra[:16], dec[:16], 95.0, -64.0)  # the first edge, sampled along its arc
    cross = (xi[1:] - xi[0]) * (eta[-1] - eta[0]) - (eta[1:] - eta[0]) * (xi[-1] - xi[0])
    assert np.max(np.abs(cross)) < 1e-6


def test_mollweide_longitude_decreases_as_ra_increases():
    x = rep.mollweide_x(np.array([0.001, 90.0, 180.0, 270.0, 359.999]))
    assert np.all(np.diff(x) < 0) and abs(x[2]) < 1e-12


def test_the_sky_sample_stays_bounded_and_spread_over_the_whole_stream():
    sample = rep.SkySample(cap=1000)
    for i in range(100_000):
        sample.add(float(i), 0.0)
    assert sample.seen == 100_000 and len(sample.ra) < 1000
    assert min(sample.ra) < 1000 and max(sample.ra) > 99_000  # both ends represented


# -- time line and log -------------------------------------------------------------------------------
def test_the_timeline_sums_bytes_retries_and_failures_per_bin(tmp_path):
    state = tmp_path / "m" / ".tessmirror"
    t0 = 1_700_000_000.0
    entries = [entry(i, nbytes=1_000_000, attempts=1 + (i % 4 == 0), time=t0 + i) for i in range(100)]
    entries += [entry(200, "failed", error="x", attempts=9, time=t0 + 50), entry(300, time=0.0)]
    write_manifest(state, entries)
    facts = rep.read_manifest(state)
    line = rep.timeline(facts)
    assert line is not None and line.width == 1.0
    assert line.rate.sum() * line.width == pytest.approx(100 * 1_000_000)  # the time-0 record is left out
    assert line.retries.sum() == 25 + 8
    assert line.failures.sum() == 1


def test_a_resume_hours_later_is_a_second_run_and_the_plot_shows_the_last(tmp_path):
    state = tmp_path / "m" / ".tessmirror"
    t0 = 1_700_000_000.0
    first = [entry(i, nbytes=500, attempts=2, time=t0 + i) for i in range(30)]
    later = [entry(100 + i, nbytes=700, time=t0 + 86_400 + i) for i in range(20)]
    write_manifest(state, first + later)
    report, page = build(tmp_path / "m", state)
    line = report.timeline
    assert line is not None and line.sessions == 2 and line.width == 1.0  # not one-day bins
    assert line.rate.sum() * line.width == pytest.approx(20 * 700)
    assert (line.earlier_files, line.earlier_bytes) == (30, 30 * 500)
    assert "The manifest holds 2 runs" in page and "verified 30 files, 15.0 kB" in page
    assert 'id="retries">30<' in page  # extra tries count every run's records


def test_the_log_gives_retries_overload_answers_and_slowdowns(tmp_path):
    log_file = tmp_path / "run.log"
    log_file.write_text(
        "2026-11-28 01:00:00 INFO    tessmirror 0.1.0: starting run\n"
        "2026-11-28 01:00:05 INFO    f1.fits: try 1 failed (HTTP 429 Too Many Requests); retrying in 1.0 s\n"
        "2026-11-28 01:00:06 INFO    f2.fits: try 2 failed (connection reset); retrying in 2.0 s\n"
        "2026-11-28 01:00:07 WARNING overload: slowing down to 4 downloads in flight\n"
        "garbage line\n",
        encoding="utf-8",
    )
    events = rep.read_log(log_file)
    assert events.lines == 4
    assert len(events.retries) == 2 and len(events.overload) == 1 and len(events.slowdowns) == 1
    assert events.overload[0] == time.mktime(time.strptime("2026-11-28 01:00:05", "%Y-%m-%d %H:%M:%S"))


def test_slowdowns_from_the_log_are_drawn_on_the_throughput_plot(mirror, tmp_path):
    out, state = mirror
    log_file = tmp_path / "run.log"
    lines = [
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) + " WARNING overload: slowing down to 4"
        for when in (1_700_000_002, 1_600_000_000)  # one inside the run, one years before it
    ]
    log_file.write_text("\n".join(lines) + "\n")
    report, page = build(out, state, log_file=log_file)
    assert len(report.events.slowdowns) == 2
    assert report.throughput_png is not None and report.throughput_png.startswith(b"\x89PNG")
    assert "0 429/503 answers, 2 slow-downs" in page


def test_a_log_file_adds_its_events_to_the_page(mirror, tmp_path):
    out, state = mirror
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1_700_000_003))
    log_file = tmp_path / "run.log"
    log_file.write_text(
        f"{stamp} INFO    f3.fits: try 1 failed (HTTP 503 Service Unavailable); retrying in 1 s\n"
    )
    report, page = build(out, state, log_file=log_file)
    assert "From the log: 1 retries, 1 429/503 answers, 0 slow-downs." in page
    assert not [n for n in report.notes if "--run-log" in n]


# -- degraded and bad input --------------------------------------------------------------------------
def test_without_matplotlib_the_page_has_its_tables_and_says_how_to_get_pictures(mirror, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    out, state = mirror
    report, page = build(out, state)
    assert report.sky_png is None and report.throughput_png is None
    assert "tessmirror[plot]" in page and 'id="count-verified">6<' in page


def test_no_manifest_is_one_line_naming_the_fix_and_exit_2(tmp_path, capsys):
    code = rep.main(["--out", str(tmp_path / "nothing-here")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "no tessmirror manifest at" in err and "hint:" in err and "Traceback" not in err
    with pytest.raises(ConfigError):
        rep.build_report(tmp_path, tmp_path / ".tessmirror")


def test_a_damaged_plan_is_one_line_naming_the_fix(tmp_path, capsys):
    state = tmp_path / "m" / ".tessmirror"
    write_manifest(state, [entry(0)])
    (state / "plan.ecsv").write_text("this is not ECSV\n")
    code = rep.main(["--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "plan" in err and "--refresh-plan" in err and "Traceback" not in err


# -- the command -------------------------------------------------------------------------------------
def test_the_command_writes_under_the_state_dir_by_default_and_prints_the_page(mirror, capsys):
    out, state = mirror
    assert rep.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(state / rep.REPORT_DIR / rep.HTML_NAME)
    assert {p.name for p in (state / rep.REPORT_DIR).iterdir()} == {
        rep.HTML_NAME,
        rep.SKY_PNG,
        rep.THROUGHPUT_PNG,
    }
    assert oct((state / rep.REPORT_DIR / rep.HTML_NAME).stat().st_mode & 0o044) == oct(
        0o044
    )  # readable by others


def test_report_dir_chooses_where_and_a_planted_symlink_is_replaced_not_followed(mirror, tmp_path):
    out, _ = mirror
    where = tmp_path / "elsewhere"
    where.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (where / rep.HTML_NAME).symlink_to(victim)
    assert rep.main(["--out", str(out), "--report-dir", str(where), "--no-pictures"]) == 0
    assert victim.read_text() == "keep me"
    assert (
        not (where / rep.HTML_NAME).is_symlink()
        and "tessmirror report" in (where / rep.HTML_NAME).read_text()
    )
    assert not (where / rep.SKY_PNG).exists()  # --no-pictures


def test_add_report_command_registers_report_on_a_cli_parser(mirror):
    out, state = mirror
    parser = argparse.ArgumentParser(prog="tessmirror")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path)
    sub = parser.add_subparsers(dest="command", required=True)
    rep.add_report_command(sub, parents=[common])
    ns = parser.parse_args(["report", "--out", str(out), "--no-pictures"])
    assert ns.handler is rep.cmd_report
    assert ns.handler(ns) == 0 and (state / rep.REPORT_DIR / rep.HTML_NAME).exists()


def test_a_config_file_out_dir_is_enough(mirror, tmp_path):
    out, state = mirror
    config = tmp_path / "my.toml"
    config.write_text(f'[output]\nout_dir = "{out}"\n')
    assert rep.main(["--config", str(config), "--no-pictures"]) == 0
    assert (state / rep.REPORT_DIR / rep.HTML_NAME).exists()


# -- memory ------------------------------------------------------------------------------------------
def test_reading_a_large_manifest_keeps_a_few_dozen_bytes_per_record(tmp_path):
    state = tmp_path / "m" / ".tessmirror"
    count = 100_000
    batch = [entry(i, "failed" if i % 1000 == 0 else "verified", error="HTTP 500") for i in range(count)]
    write_manifest(state, batch)
    del batch
    tracemalloc.start()
    try:
        facts = rep.read_manifest(state)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert facts.records == count and facts.failed_total == 100
    # load() would hold 100,000 entries with their URL and path strings (tens of MB); the arrays
    # are about 33 bytes a record, plus the unique pass's temporaries.
    print(f"peak {peak / 1e6:.1f} MB for {count} records")
    assert peak < 12 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"


def test_an_empty_manifest_gives_a_page_that_says_there_is_nothing_yet(tmp_path):
    state = tmp_path / "m" / ".tessmirror"
    state.mkdir(parents=True)
    (state / "manifest.jsonl").write_bytes(b"")
    report, page = build(tmp_path / "m", state)
    assert report.counts() == {"planned": 0, "verified": 0, "failed": 0, "pending": 0}
    assert "No manifest record has a time yet" in page and "No file has failed." in page


def test_a_missing_log_file_is_one_line_and_exit_2(mirror, tmp_path, capsys):
    out, _ = mirror
    code = rep.main(["--out", str(out), "--run-log", str(tmp_path / "no.log")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "--run-log: cannot read the log" in err and "Traceback" not in err


def test_a_report_dir_that_cannot_be_made_is_this_machine_refusing_exit_4(mirror, tmp_path, capsys):
    out, _ = mirror
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code = rep.main(["--out", str(out), "--report-dir", str(blocker / "sub"), "--no-pictures"])
    err = capsys.readouterr().err
    assert code == 4 and str(blocker / "sub") in err and "Traceback" not in err
