"""engine.plan.table: plan tables round-trip, URL lists, and exports that quote hostile names."""

from __future__ import annotations

import io
import math
import os
import shlex
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from engine.exceptions import ConfigError, LocalError, UnsafePathError
from engine.models import PLAN_COLUMNS, PlanItem
from engine.plan.table import (
    SAVED_PLAN_HINT,
    PlanTail,
    PlanWriter,
    export_plan,
    filename_from_url,
    items_to_table,
    iter_input,
    iter_plan,
    load_plan,
    plan_meta,
    product_of,
    read_input,
    remove_stale_temp_files,
    save_plan,
    table_to_items,
)

LC = "tess2018206045859-s0001-0000000025155310-0120-s_lc.fits"
MD5 = "0123456789abcdef0123456789abcdef"
ITEMS = [
    PlanItem(
        url=f"https://mast.example.org/api/v0.1/Download/file?uri=mast:TESS/product/{LC}",
        filename=LC,
        obs_id="tess2018206045859-s0001-0000000025155310-0120-s",
        product="lc",
        sector=1,
        size=2039040,
        est_kb=1991,
        md5=MD5,
        target_name="25155310",
        s_ra=263.75,
        s_dec=-64.25,
    ),
    # Positions compare equal only when finite (NaN != NaN), so this row declares a position too.
    PlanItem(url="https://mast.example.org/files/b_tp.fits", filename="b_tp.fits", s_ra=0.0, s_dec=90.0),
]


def test_items_to_table_has_exactly_the_plan_columns() -> None:
    table = items_to_table(ITEMS)
    assert tuple(table.colnames) == PLAN_COLUMNS
    assert list(table_to_items(table)) == ITEMS
    assert tuple(items_to_table([]).colnames) == PLAN_COLUMNS


def test_save_and_load_round_trip_with_metadata(tmp_path: Path) -> None:
    path = tmp_path / "state" / "plan.ecsv"
    save_plan(items_to_table(ITEMS), path, meta={"query": "SELECT 1", "selection": "sector 1"})
    loaded = load_plan(path)
    assert list(table_to_items(loaded)) == ITEMS
    assert loaded.meta["query"] == "SELECT 1" and loaded.meta["selection"] == "sector 1"
    assert [p.name for p in path.parent.iterdir()] == ["plan.ecsv"]  # no temporary file left


def test_save_replaces_an_existing_plan(tmp_path: Path) -> None:
    path = tmp_path / "plan.ecsv"
    save_plan(items_to_table(ITEMS), path)
    save_plan(items_to_table(ITEMS[:1]), path)
    assert list(table_to_items(load_plan(path))) == ITEMS[:1]


def test_load_plan_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_plan(tmp_path / "missing.ecsv")
    assert info.value.key == "input"
    bad = tmp_path / "bad.ecsv"
    bad.write_text("# %ECSV 1.0\n# ---\nnot: [valid\n")
    with pytest.raises(ConfigError, match="not a valid ECSV plan"):
        load_plan(bad)
    partial = tmp_path / "partial.ecsv"
    Table({"url": ["https://example.org/a.fits"]}).write(partial, format="ascii.ecsv")
    with pytest.raises(ConfigError, match="lacks the columns filename"):
        load_plan(partial)


def test_read_input_url_list(tmp_path: Path) -> None:
    path = tmp_path / "urls.txt"
    path.write_text(
        "# light curves\n\n"
        f"https://mast.example.org/api/v0.1/Download/file?uri=mast:TESS/product/{LC}\n"
        "  https://archive.example.org/missions/tess/tid/s0002/x/tess2018-s0002-1-1_tp.fits  \n"
        f"https://mast.example.org/api/v0.1/Download/file?uri=mast:TESS/product/{LC}\n"
    )
    items = list(table_to_items(read_input(path)))
    assert [(i.filename, i.product, i.sector) for i in items] == [
        (LC, "lc", 1),
        ("tess2018-s0002-1-1_tp.fits", "tp", 2),
    ]


def test_read_input_ecsv_plan(tmp_path: Path) -> None:
    path = tmp_path / "plan.ecsv"
    save_plan(items_to_table(ITEMS), path)
    assert list(table_to_items(read_input(path))) == ITEMS


@pytest.mark.parametrize("line", ["ftp://host/a.fits", "not a url", "https://example.org/"])
def test_read_input_bad_line_names_its_number(tmp_path: Path, line: str) -> None:
    path = tmp_path / "urls.txt"
    path.write_text(f"https://example.org/a_lc.fits\n# comment\n{line}\n")
    with pytest.raises(ConfigError, match="line 3") as info:
        read_input(path)
    assert info.value.key == "input"


def test_product_and_filename_helpers() -> None:
    assert product_of("x_fast-lc.fits") == "fast-lc"
    assert product_of("x_lc.fits") == "lc"
    assert product_of("x_llc.fits") == ""
    assert (
        filename_from_url("https://example.org/Download/file?uri=mast:TESS/product/a_lc.fits") == "a_lc.fits"
    )
    assert filename_from_url("https://example.org/dir/b%20c_tp.fits") == "b c_tp.fits"


def export(items: list[PlanItem], fmt: str) -> str:
    out = io.StringIO()
    export_plan(items_to_table(items), fmt, out)
    return out.getvalue()


def test_export_urls_aria2_and_curl() -> None:
    assert export(ITEMS, "urls").splitlines() == [ITEMS[0].url, ITEMS[1].url]
    aria2 = export(ITEMS, "aria2").splitlines()
    assert aria2 == [
        ITEMS[0].url,
        f"  out={LC}",
        f"  checksum=md5={MD5}",
        ITEMS[1].url,
        "  out=b_tp.fits",
    ]
    curl = export(ITEMS, "curl").splitlines()
    assert shlex.split(curl[0]) == ["curl", "-f", "-L", "-C", "-", "-o", LC, ITEMS[0].url]


def test_curl_export_quotes_hostile_names() -> None:
    hostile = PlanItem(
        url="https://example.org/a?x=1&uri=$(rm${IFS}-rf${IFS}~)`id`", filename="a b;$(reboot)'_lc.fits"
    )
    line = export([hostile], "curl").strip()
    # The shell sees exactly the name and the URL as single words, nothing runs.
    assert shlex.split(line)[-3:] == ["-o", hostile.filename, hostile.url]


@pytest.mark.parametrize("name", ["../evil_lc.fits", "dir/x_lc.fits", "x\n  dir=/etc_lc.fits", "..", ""])
def test_exports_refuse_unsafe_names(name: str) -> None:
    item = PlanItem(url="https://example.org/a_lc.fits", filename=name)
    for fmt in ("aria2", "curl"):
        with pytest.raises(UnsafePathError):
            export([item], fmt)


def test_exports_refuse_urls_with_newlines() -> None:
    item = PlanItem(url="https://example.org/a_lc.fits\n  out=../../x", filename="a_lc.fits")
    with pytest.raises(UnsafePathError):
        export([item], "urls")


def test_table_exports_read_back() -> None:
    for fmt, reader in (("ecsv", "ascii.ecsv"), ("csv", "ascii.csv"), ("votable", "votable")):
        text = export(ITEMS, fmt)
        source = io.BytesIO(text.encode()) if fmt == "votable" else text
        table = Table.read(source, format=reader)
        assert list(table["url"]) == [i.url for i in ITEMS]
    with pytest.raises(ConfigError, match="unknown export format"):
        export(ITEMS, "wget")


# -- streaming plans: a tail that reads while the writer writes; inputs read once ------------------
def test_a_plan_tail_reads_every_row_as_the_writer_flushes_it(tmp_path: Path) -> None:
    hostile = PlanItem(url="https://mast.example.org/x", filename='two\nlines,"quoted"_lc.fits')
    writer = PlanWriter(tmp_path / "plan.ecsv", meta={"selection_fingerprint": "abc"})
    tail = PlanTail(writer)
    read: list[PlanItem] = []
    for page in (ITEMS, [hostile], ITEMS[:1]):
        writer.write(page)
        read += tail.read(len(page))  # exactly the rows written so far
    writer.commit()
    tail.close()
    assert read == [*ITEMS, hostile, ITEMS[0]]
    assert list(iter_plan(tmp_path / "plan.ecsv")) == read
    assert plan_meta(tmp_path / "plan.ecsv")["selection_fingerprint"] == "abc"


def test_stale_plan_temp_files_are_removed_and_nothing_else(tmp_path: Path) -> None:
    plan = tmp_path / "plan.ecsv"
    plan.write_text("kept")
    stale = [tmp_path / ".plan.ecsv.abc.tmp", tmp_path / ".plan.ecsv.x_y.tmp"]
    for path in stale:
        path.write_text("left by a kill")
    other = tmp_path / ".other.ecsv.abc.tmp"
    other.write_text("not ours")
    assert remove_stale_temp_files(plan) == 2
    assert plan.exists() and other.exists() and not any(p.exists() for p in stale)


def test_a_discarded_writer_leaves_no_file(tmp_path: Path) -> None:
    writer = PlanWriter(tmp_path / "plan.ecsv")
    writer.write(ITEMS)
    writer.discard()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["url list", "ecsv plan"])
def test_input_from_a_pipe_is_read_once(tmp_path: Path, kind: str) -> None:
    """A FIFO can be read only once: the sniffing and the reading must share one pass."""
    fifo = tmp_path / "input"
    os.mkfifo(fifo)
    if kind == "url list":
        text = "# comment\n" + "".join(item.url + "\n" for item in ITEMS)
    else:
        buffer = io.StringIO()
        export_plan(items_to_table(ITEMS), "ecsv", buffer)
        text = buffer.getvalue()

    def feed() -> None:
        with open(fifo, "w") as handle:
            handle.write(text)

    feeder = threading.Thread(target=feed)
    feeder.start()
    items = list(iter_input(fifo))
    feeder.join(timeout=10)
    assert [item.url for item in items] == [item.url for item in ITEMS]


def test_input_dash_reads_standard_input(monkeypatch: pytest.MonkeyPatch) -> None:
    data = io.BytesIO("".join(item.url + "\n" for item in ITEMS).encode())
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(data))
    assert [item.url for item in iter_input(Path("-"))] == [item.url for item in ITEMS]


def test_a_missing_input_fails_when_opened_not_when_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        iter_input(tmp_path / "nope.txt")


@pytest.mark.parametrize(
    "content",
    [
        "# %ECSV 1.0\n# ---\n# datatype:\n# - {name: url, datatype: string\n",
        "# %ECSV 1.0\n# ---\n# meta: [1, 2\n",
        "# not ecsv at all\n",
        "\udcff\udcfe",
    ],
    ids=["unclosed mapping", "unclosed list", "no ECSV line", "not UTF-8"],
)
def test_a_broken_plan_header_is_one_line_naming_the_file_with_the_hint(tmp_path: Path, content: str) -> None:
    plan = tmp_path / "plan.ecsv"
    plan.write_bytes(content.encode("utf-8", "surrogateescape"))
    for call in (lambda: plan_meta(plan, key="plan", hint=SAVED_PLAN_HINT), lambda: list(iter_plan(plan))):
        with pytest.raises(ConfigError) as caught:
            call()
        assert "\n" not in caught.value.message and "plan.ecsv" in caught.value.message
    with pytest.raises(ConfigError) as caught:
        plan_meta(plan, key="plan", hint=SAVED_PLAN_HINT)
    assert "--refresh-plan" in (caught.value.hint or "")


def test_commit_with_late_metadata_rewrites_the_header_and_keeps_every_row(tmp_path: Path) -> None:
    writer = PlanWriter(tmp_path / "plan.ecsv", meta={"selection_fingerprint": "abc"})
    tail = PlanTail(writer)
    writer.write(ITEMS * 3)
    assert len(tail.read(6)) == 6
    statements = ["SELECT a FROM ivoa.obscore WHERE x = 'it''s'", "SELECT b\nFROM dbo.caomartifact"]
    writer.commit({"adql": statements})
    tail.close()
    meta = plan_meta(tmp_path / "plan.ecsv")
    assert meta["adql"] == statements and meta["selection_fingerprint"] == "abc"
    assert list(iter_plan(tmp_path / "plan.ecsv")) == ITEMS * 3
    assert len(load_plan(tmp_path / "plan.ecsv")) == 6
    assert [p.name for p in tmp_path.iterdir()] == ["plan.ecsv"]


def test_positions_are_float64_columns_and_survive_every_table_round_trip(tmp_path: Path) -> None:
    table = items_to_table(ITEMS)
    assert table["s_ra"].dtype == np.float64 and table["s_dec"].dtype == np.float64
    path = tmp_path / "plan.ecsv"
    save_plan(table, path)
    assert [(i.s_ra, i.s_dec) for i in iter_plan(path)] == [(263.75, -64.25), (0.0, 90.0)]
    assert [(i.s_ra, i.s_dec) for i in table_to_items(load_plan(path))] == [(263.75, -64.25), (0.0, 90.0)]


def test_an_unknown_position_is_nan_and_a_plan_saved_before_positions_still_loads(tmp_path: Path) -> None:
    item = PlanItem(url="https://mast.example.org/files/c_lc.fits", filename="c_lc.fits")
    path = tmp_path / "plan.ecsv"
    save_plan(items_to_table([item]), path)
    (back,) = iter_plan(path)
    assert back == item and math.isnan(back.s_ra) and math.isnan(back.s_dec)
    old = tmp_path / "old.ecsv"  # written before s_ra/s_dec existed
    table = items_to_table([item])
    table.remove_columns(["s_ra", "s_dec"])
    table.write(old, format="ascii.ecsv", delimiter=",")
    assert list(iter_plan(old)) == [item]
    assert math.isnan(load_plan(old)["s_ra"][0])


def test_a_plan_that_cannot_be_created_is_a_local_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "not-a-folder").write_text("a file where the plan's folder should be")
    plan = tmp_path / "not-a-folder" / "plan.ecsv"
    with pytest.raises(LocalError) as info:
        PlanWriter(plan)
    assert str(info.value).startswith(f"cannot write the plan {plan}: ")
    assert info.value.path == plan and info.value.exit_code == 4
