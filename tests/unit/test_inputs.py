"""`fetch --input`: every format `tessmirror plan` exports, and MAST's curl scripts, read back as the
same files; the format is told from the content, never from the file name."""

from __future__ import annotations

import io
import math
import re
import sys
from pathlib import Path

import pytest

from engine.exceptions import ConfigError
from engine.models import PlanItem
from engine.plan.table import EXPORT_FORMATS, PlanExporter, iter_input

BASE = "https://mast.example.org/api/v0.1/Download/file?uri=mast:TESS/product/"
OBS = "tess2018206045859-s0001-0000000025155310-0120-s"
NAMES = [f"tess2018206045859-s0001-00000000251553{n:02d}-0120-s_lc.fits" for n in (10, 11, 12)]
ITEMS = [
    PlanItem(
        url=BASE + name,
        filename=name,
        obs_id=OBS,
        product="lc",
        sector=1,
        size=2039040 + n,
        est_kb=1991,
        md5=f"{n:032x}",
        target_name="25155310",
        s_ra=263.75,
        s_dec=-64.25,
    )
    for n, name in enumerate(NAMES)
]


def export(tmp_path: Path, fmt: str, items: list[PlanItem] = ITEMS) -> Path:
    path = tmp_path / f"plan.{fmt}.txt"  # a name that says nothing: detection is by content
    with open(path, "w", encoding="utf-8", newline="") as out:
        exporter = PlanExporter(fmt, out)
        exporter.write(items)
        exporter.close()
    return path


@pytest.mark.parametrize("fmt", ["ecsv", "csv", "votable"])
def test_table_exports_read_back_as_the_very_same_items(tmp_path: Path, fmt: str) -> None:
    assert list(iter_input(export(tmp_path, fmt))) == ITEMS


@pytest.mark.parametrize("fmt", ["urls", "aria2", "curl"])
def test_line_exports_read_back_with_url_name_and_what_the_format_carries(tmp_path: Path, fmt: str) -> None:
    got = list(iter_input(export(tmp_path, fmt)))
    assert [(i.url, i.filename, i.product, i.sector) for i in got] == [
        (i.url, i.filename, "lc", 1) for i in ITEMS
    ]
    # aria2 carries the md5 (checksum=md5=); a URL list and a curl line carry none.
    assert [i.md5 for i in got] == ([i.md5 for i in ITEMS] if fmt == "aria2" else ["", "", ""])


def test_every_export_format_is_covered() -> None:
    assert set(EXPORT_FORMATS) == {"ecsv", "csv", "votable", "urls", "aria2", "curl"}


def test_an_aria2_file_out_names_the_file_and_tab_separated_mirrors_use_the_first(tmp_path: Path) -> None:
    path = tmp_path / "input.txt"
    path.write_text(
        f"# aria2c -i input.txt\n{ITEMS[0].url}\thttps://mirror.example.org/{NAMES[0]}\n"
        f"  out={NAMES[0]}\n  checksum=MD5={'AB' * 16}\n\n{ITEMS[1].url}\n\tout=sub/{NAMES[1]}\n"
    )
    got = list(iter_input(path))
    assert [(i.url, i.filename, i.md5) for i in got] == [
        (ITEMS[0].url, NAMES[0], "ab" * 16),
        (ITEMS[1].url, NAMES[1], ""),  # out= with a folder: the base name is the file
    ]


def test_a_mast_curl_script_is_read_with_its_shebang_and_other_shell_lines_ignored(tmp_path: Path) -> None:
    # The shape of MAST's tesscurl_sector_1_lc.sh (plus the odd command a user adds).
    mast = "https://mast.stsci.edu/api/v0.1/Download/file/?uri=mast:TESS/product/"
    script = tmp_path / "tesscurl_sector_1_lc.sh"
    script.write_text(
        "#!/bin/sh\nset -e\ncd /data/tess\n"
        + "".join(f"curl -C - -L -o {name} {mast}{name}\n" for name in NAMES)
        + f"curl --create-dirs -L --output './mastDownload/TESS/{OBS}/{NAMES[0]}' '{mast}{NAMES[0]}x'\n"
    )
    got = list(iter_input(script))
    assert [(i.url, i.filename, i.obs_id) for i in got[:3]] == [(mast + n, n, "") for n in NAMES]
    # An astroquery-style destination also tells the obs_id.
    assert (got[3].filename, got[3].obs_id) == (NAMES[0], OBS)


def test_a_curl_line_without_a_url_or_with_broken_quoting_names_its_line(tmp_path: Path) -> None:
    for text, expected in (
        ("curl -o x.fits\n", "line 1: a curl command without an http(s) URL"),
        ("#!/bin/sh\ncurl -o 'x.fits https://example.org/x.fits\n", "line 2: cannot parse the curl command"),
    ):
        path = tmp_path / "bad.sh"
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(expected)) as info:
            list(iter_input(path, key="selection.urls_file"))
        assert "\n" not in info.value.message and info.value.key == "selection.urls_file"


def test_a_url_list_line_that_is_not_a_url_is_still_refused_outside_a_script(tmp_path: Path) -> None:
    path = tmp_path / "urls.txt"
    path.write_text(f"{ITEMS[0].url}\ncd /data\n")
    with pytest.raises(ConfigError, match="line 2: 'cd /data' is not an http"):
        list(iter_input(path))


def test_a_hostile_out_name_is_refused_not_followed(tmp_path: Path) -> None:
    path = tmp_path / "input.txt"
    path.write_text(f"{ITEMS[0].url}\n  out=..\n")
    with pytest.raises(ConfigError, match="line 1: no usable file name"):
        list(iter_input(path))


def test_a_csv_plan_with_its_columns_in_another_order_and_without_positions(tmp_path: Path) -> None:
    path = tmp_path / "plan.csv"
    path.write_text(f'filename,size,url\n"{NAMES[0]}",12,"{ITEMS[0].url}"\n')
    (item,) = iter_input(path)
    assert (item.filename, item.size, item.url) == (NAMES[0], 12, ITEMS[0].url)
    assert math.isnan(item.s_ra) and item.obs_id == ""


def test_a_bad_csv_row_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "plan.csv"
    path.write_text(f'url,filename,size\n"{ITEMS[0].url}","{NAMES[0]}",many\n')
    with pytest.raises(ConfigError, match="data row 1: malformed"):
        list(iter_input(path))


def test_a_broken_votable_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "plan.xml"
    path.write_text('<?xml version="1.0"?>\n<VOTABLE><RESOURCE><TABLE><oops')
    with pytest.raises(ConfigError, match="is not a valid VOTable plan") as info:
        list(iter_input(path))
    assert "\n" not in info.value.message


def _stdin_from(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


@pytest.mark.parametrize("fmt", ["ecsv", "csv", "aria2", "curl"])
def test_standard_input_is_read_once_in_any_streamed_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    _stdin_from(monkeypatch, export(tmp_path, fmt).read_bytes())
    assert [i.filename for i in iter_input(Path("-"))] == NAMES


def test_a_votable_from_a_pipe_is_spooled_in_the_state_dir_and_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _stdin_from(monkeypatch, export(tmp_path, "votable").read_bytes())
    spool = tmp_path / "state"
    items = iter_input(Path("-"), spool_dir=spool)
    assert list(items) == ITEMS
    assert spool.is_dir() and list(spool.iterdir()) == []  # the spooled copy is gone
