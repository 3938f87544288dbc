"""engine.layout: archive names are untrusted; paths must never leave the output folder."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import pytest

from engine import lock
from engine.exceptions import ConfigError, UnsafePathError
from engine.layout import (
    LAYOUTS,
    STATE_DIR_NAME,
    check_layout,
    layout_names,
    relpath_for,
    resolve_within,
    safe_filename,
    within,
)
from engine.models import PlanItem

LC = "tess2018206045859-s0001-0000000025155310-0120-s_lc.fits"
FFI = "tess2018206192942-s0001-1-1-0120-s_ffic.fits"
DVT = "tess2018206190142-s0001-s0013-0000000025155310-00106_dvt.fits"


def item(filename: str, sector: int = -1) -> PlanItem:
    return PlanItem(url=f"https://archive.example.org/{filename}", filename=filename, sector=sector)


# -- relpath_for ------------------------------------------------------------------------------------
def test_mast_layout_splits_the_tic_like_the_archive() -> None:
    assert relpath_for(item(LC), "mast") == f"tid/s0001/0000/0000/2515/5310/{LC}"


def test_declared_sector_wins_over_the_file_name() -> None:
    assert relpath_for(item(LC, sector=27), "mast") == f"tid/s0027/0000/0000/2515/5310/{LC}"
    assert relpath_for(item(LC, sector=27), "sector") == f"s0027/{LC}"


def test_dv_files_take_the_first_sector_and_their_tic() -> None:
    assert relpath_for(item(DVT), "mast") == f"tid/s0001/0000/0000/2515/5310/{DVT}"


def test_files_without_tic_fall_back_to_sector_then_misc() -> None:
    assert relpath_for(item(FFI), "mast") == f"s0001/{FFI}"
    assert relpath_for(item("readme.txt"), "mast") == "misc/readme.txt"
    assert relpath_for(item("readme.txt", sector=3), "mast") == "s0003/readme.txt"
    assert relpath_for(item("readme.txt"), "sector") == "misc/readme.txt"


def test_insane_declared_sector_is_ignored() -> None:
    assert relpath_for(item(LC, sector=123456), "sector") == f"s0001/{LC}"


def test_sector_and_flat_layouts() -> None:
    assert relpath_for(item(LC), "sector") == f"s0001/{LC}"
    assert relpath_for(item(LC), "flat") == LC


def test_unknown_layout_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        relpath_for(item(LC), "nested")
    assert info.value.key == "output.layout"
    assert "'nested'" in str(info.value)
    assert all(name in str(info.value) for name in LAYOUTS)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_relpath_refuses_hostile_file_names_in_every_layout(layout: str) -> None:
    with pytest.raises(UnsafePathError):
        relpath_for(item("../../etc/passwd"), layout)


# -- safe_filename ----------------------------------------------------------------------------------
HOSTILE = [
    "",
    ".",
    "..",
    "../x",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "..\\..\\x",
    "a\x00b",
    "a\nb",
    "evil\x1b[31m.fits",
    "tab\there",
    "del\x7f",
    "x" * 300,
    "é" * 200,  # 200 characters but 400 bytes in UTF-8
    "C:x",
    "C:",
    "file.fits:stream",
    "gpj\u202e.exe",  # right-to-left override disguising an extension
    "zero\u200bwidth",
    " leading",
    "trailing ",
    "dot.",
    "CON",
    "nul.fits",
    "bad%00name_lc.fits",  # a NUL once anything URL-decodes it
    "esc%1b[31m.fits",
    "del%7Fname.fits",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_refused(name: str) -> None:
    with pytest.raises(UnsafePathError):
        safe_filename(name)


def test_refusal_message_shows_a_truncated_repr() -> None:
    with pytest.raises(UnsafePathError) as info:
        safe_filename("a\x00" + "b" * 500)
    message = str(info.value)
    assert "'a\\x00bbb" in message
    assert "b" * 200 not in message


def test_non_string_is_refused() -> None:
    with pytest.raises(UnsafePathError):
        safe_filename(None)  # type: ignore[arg-type]


def test_ordinary_names_pass_and_are_nfc_normalised() -> None:
    assert safe_filename(LC) == LC
    assert safe_filename("-starts-with-dash.fits") == "-starts-with-dash.fits"
    decomposed = unicodedata.normalize("NFD", "café.fits")
    assert decomposed != "café.fits"
    assert safe_filename(decomposed) == "café.fits"
    assert safe_filename("x" * 255) == "x" * 255


# -- resolve_within ---------------------------------------------------------------------------------
def test_resolve_within_returns_an_absolute_path_inside_root(tmp_path: Path) -> None:
    path = resolve_within(tmp_path, f"tid/s0001/{LC}")
    assert path.is_absolute()
    assert path == tmp_path.resolve() / "tid" / "s0001" / LC


@pytest.mark.parametrize(
    "relpath", ["", "../x", "a/../../x", "/etc/passwd", "a//b", "a/./b", "a\\b", "C:/x", "a/\x00/b", "a/"]
)
def test_resolve_within_refuses_bad_relpaths(tmp_path: Path, relpath: str) -> None:
    with pytest.raises(UnsafePathError):
        resolve_within(tmp_path, relpath)


def test_resolve_within_refuses_a_directory_symlink_escape(tmp_path: Path) -> None:
    root = tmp_path / "mirror"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "tid")
    with pytest.raises(UnsafePathError) as info:
        resolve_within(root, f"tid/{LC}")
    assert "outside" in str(info.value)


def test_resolve_within_refuses_a_file_symlink_escape(tmp_path: Path) -> None:
    root = tmp_path / "mirror"
    root.mkdir()
    os.symlink("/etc/passwd", root / LC)
    with pytest.raises(UnsafePathError):
        resolve_within(root, LC)


def test_resolve_within_refuses_a_symlink_loop(tmp_path: Path) -> None:
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    with pytest.raises(UnsafePathError):
        resolve_within(tmp_path, "a/x")


def test_resolve_within_remembers_nothing_so_a_folder_swapped_later_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "mirror"
    (root / "tid" / "s0001").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    assert resolve_within(root, f"tid/s0001/{LC}") == root.resolve() / "tid" / "s0001" / LC
    (root / "tid" / "s0001").rename(root / "moved")
    os.symlink(outside, root / "tid" / "s0001")
    with pytest.raises(UnsafePathError, match="outside"):
        resolve_within(root, f"tid/s0001/{LC}")


def test_within_is_lexical_and_refuses_the_same_bad_relpaths(tmp_path: Path) -> None:
    os.symlink("/etc", tmp_path / "tid")
    assert within(tmp_path, f"tid/{LC}") == tmp_path.resolve() / "tid" / LC  # not looked at on disk
    for relpath in ("", "../x", "/etc/passwd", "a//b", "a\\b", "C:/x", "a/\x00/b"):
        with pytest.raises(UnsafePathError):
            within(tmp_path, relpath)


def test_resolve_within_allows_symlinks_that_stay_inside(tmp_path: Path) -> None:
    # Reading through them is harmless; writing is refused later, by engine.fetch.partfile.
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "alias")
    assert resolve_within(tmp_path, f"alias/{LC}") == tmp_path.resolve() / "alias" / LC


def test_resolve_within_accepts_a_root_that_is_itself_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "root-link")
    assert resolve_within(tmp_path / "root-link", LC) == (tmp_path / "real" / LC).resolve()


@pytest.mark.parametrize("name", ["100%_lc.fits", "a%20b_lc.fits", "x%zz.fits"])
def test_percent_signs_that_decode_to_printable_text_are_allowed(name: str) -> None:
    assert safe_filename(name) == name


@pytest.mark.parametrize(
    "obs_id",
    ["../../" + LC[:-8], "/abs/obs", "a\\b", "obs\x00id", "obs\nid", "x" * 256],
)
def test_relpath_refuses_a_hostile_obs_id(obs_id: str) -> None:
    with pytest.raises(UnsafePathError, match="unsafe obs_id"):
        relpath_for(PlanItem(url="https://archive.example.org/x", filename=LC, obs_id=obs_id), "mast")


def test_relpath_accepts_ordinary_obs_ids() -> None:
    for obs_id in ("", LC[:-8], "hlsp_qlp_tess_ffi_s0001-0000000025155310_tess_v01_llc"):
        relpath_for(PlanItem(url="https://archive.example.org/x", filename=LC, obs_id=obs_id), "mast")


# -- the registry -----------------------------------------------------------------------------------
def test_layout_names_list_the_registry_in_order() -> None:
    assert layout_names() == tuple(LAYOUTS)
    assert layout_names()[:3] == ("mast", "sector", "flat")
    assert all(callable(strategy) for strategy in LAYOUTS.values())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_places_every_product_kind_inside_the_output_folder(layout: str, tmp_path: Path) -> None:
    for name in (LC, FFI, DVT, "readme.txt"):
        relpath = relpath_for(item(name), layout)
        assert relpath.endswith(name)
        assert within(tmp_path, relpath).is_relative_to(tmp_path.resolve())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_receives_the_nfc_normalised_name(layout: str) -> None:
    decomposed = unicodedata.normalize("NFD", "café-s0002-x.fits")
    assert relpath_for(item(decomposed), layout).endswith(unicodedata.normalize("NFC", decomposed))


def test_check_layout_returns_the_strategy_or_names_the_key() -> None:
    assert check_layout("flat") is LAYOUTS["flat"]
    with pytest.raises(ConfigError) as info:
        check_layout(["mast"])  # type: ignore[arg-type]  # a hand-built Settings may carry anything
    assert info.value.key == "output.layout"


# -- flat-by-sector ---------------------------------------------------------------------------------
def test_flat_by_sector_puts_each_file_in_its_sector_folder() -> None:
    assert relpath_for(item(LC), "flat-by-sector") == f"s0001/{LC}"
    assert relpath_for(item(LC, sector=27), "flat-by-sector") == f"s0027/{LC}"
    assert relpath_for(item(FFI), "flat-by-sector") == f"s0001/{FFI}"
    assert relpath_for(item(DVT), "flat-by-sector") == f"s0001/{DVT}"


def test_flat_by_sector_keeps_sectorless_files_at_the_top_level() -> None:
    assert relpath_for(item("readme.txt"), "flat-by-sector") == "readme.txt"
    assert relpath_for(item("misc"), "flat-by-sector") == "misc"


@pytest.mark.parametrize("name", ["s0001", "S0042", "s9999"])
def test_flat_by_sector_refuses_a_sectorless_file_named_like_a_sector_folder(name: str) -> None:
    with pytest.raises(UnsafePathError, match="sector folder"):
        relpath_for(item(name), "flat-by-sector")
    assert relpath_for(item(name, sector=3), "flat-by-sector") == f"s0003/{name}"


@pytest.mark.parametrize("name", [STATE_DIR_NAME, ".TessMirror"])
def test_a_file_named_like_the_state_folder_is_refused_where_it_would_land_in_it(name: str) -> None:
    for layout in ("flat", "flat-by-sector"):
        with pytest.raises(UnsafePathError, match="state folder"):
            relpath_for(item(name), layout)
    # Layouts that put every file in a folder keep it (it is an ordinary name inside misc/).
    assert relpath_for(item(name), "sector") == f"misc/{name}"
    assert relpath_for(item(name), "mast") == f"misc/{name}"


def test_the_state_folder_name_is_the_one_the_run_uses() -> None:
    assert STATE_DIR_NAME == lock.STATE_DIR_NAME
