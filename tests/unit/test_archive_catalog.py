"""The generated catalogue: footprints against MAST, determinism, MAST's columns, exact sizes and md5s."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from engine.archive import fitsgen
from engine.archive.catalog import build_catalog, lc_obs_id
from engine.archive.columns import TABLE_COLUMNS
from engine.archive.footprints import ccd_footprint, ffi_obs_id, footprints, s_region
from engine.archive.geometry import parse_stc_polygon, polygon_contains

MAST_S1_C1_CCD2 = [
    (330.343765, -44.336318),
    (324.663797, -33.277719),
    (337.720578, -28.384567),
    (344.128621, -38.561643),
]


def _separation_deg(a: tuple[float, float], b: tuple[float, float]) -> float:
    ra1, dec1, ra2, dec2 = np.radians([a[0], a[1], b[0], b[1]])
    cos = np.sin(dec1) * np.sin(dec2) + np.cos(dec1) * np.cos(dec2) * np.cos(ra1 - ra2)
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


@pytest.fixture(scope="module")
def small_catalog():
    return build_catalog(sectors=(1, 28), targets=96, cadences=40, seed=11, base_url="http://127.0.0.1:9")


def _rows_as_dicts(catalog, key: str) -> list[dict]:
    table = catalog.tables[key]
    names = [name for name, _ in table.columns]
    return [dict(zip(names, row, strict=True)) for row in table.rows]


def test_sector1_camera1_ccd2_footprint_matches_mast_at_every_corner_in_order():
    vertices = ccd_footprint(1, 1, 2)
    assert len(vertices) == 4
    for ours, mast in zip(vertices, MAST_S1_C1_CCD2, strict=True):
        assert _separation_deg(ours, mast) < 0.05


def test_s_region_is_mast_form_closed_without_frame():
    text = s_region(ccd_footprint(1, 1, 2))
    assert text.startswith("POLYGON 3")
    numbers = text.split()[1:]
    assert len(numbers) == 10 and numbers[:2] == numbers[-2:]
    assert parse_stc_polygon(text) == [tuple(map(float, numbers[i : i + 2])) for i in range(0, 8, 2)]


def test_ffi_obs_id_follows_mast():
    assert ffi_obs_id(1, 1, 2) == "tess2018207052942-s0001-1-2-0120-s"
    assert lc_obs_id(1, 261136679) == "tess2018206045859-s0001-0000000261136679-0120-s"


def test_unknown_sector_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="sector 100000"):
        footprints([100000])


def test_catalog_is_deterministic_for_a_seed_and_differs_for_another():
    first = build_catalog(sectors=(1,), targets=20, cadences=30, seed=1)
    again = build_catalog(sectors=(1,), targets=20, cadences=30, seed=1)
    other = build_catalog(sectors=(1,), targets=20, cadences=30, seed=2)
    assert {n: (f.size, f.md5) for n, f in first.items()} == {n: (f.size, f.md5) for n, f in again.items()}
    assert first.tables["ivoa.obscore"].rows == again.tables["ivoa.obscore"].rows
    assert set(first) != set(other)
    assert first.tables["ivoa.obscore"].rows != other.tables["ivoa.obscore"].rows


# Columns the engine's ADQL names (engine/plan/adql.py), spelled as MAST's TAP_SCHEMA spells them: an
# independent check on the shared lists, which the catalogue and this test both read.
ENGINE_COLUMNS = {
    "dbo.caomobservation": {"observationID", "observationTID", "sequenceNumber", "collection", "trgType"},
    "dbo.caomplane": {"planeTID", "observationTID"},
    "dbo.caomartifact": {"planeTID", "productFileName", "contentLength", "contentChecksum", "dataURI"},
    "ivoa.obscore": {"obs_id", "s_region", "access_url", "access_estsize", "obs_collection", "target_name"},
}


@pytest.mark.parametrize("key", sorted(ENGINE_COLUMNS))
def test_the_columns_the_engine_queries_are_spelled_as_mast_spells_them(key):
    assert ENGINE_COLUMNS[key] <= set(TABLE_COLUMNS[key])


@pytest.mark.parametrize("key", sorted(TABLE_COLUMNS))
def test_every_seed_column_exists_with_the_same_spelling(small_catalog, key):
    table = small_catalog.tables[key]
    assert table.qualified_name == key
    assert tuple(name for name, _ in table.columns) == TABLE_COLUMNS[key]
    assert all(len(row) == len(TABLE_COLUMNS[key]) for row in table.rows)


def test_artifact_length_and_md5_equal_the_real_bytes(small_catalog):
    artifacts = _rows_as_dicts(small_catalog, "dbo.caomartifact")
    assert len(artifacts) == len(small_catalog) > 0
    for row in artifacts:
        entry = small_catalog[row["productFileName"]]
        body = fitsgen.render_bytes(entry.identity, cadences=small_catalog.cadences, seed=small_catalog.seed)
        assert row["contentLength"] == len(body)
        assert row["contentChecksum"] == "md5:" + hashlib.md5(body).hexdigest()
        assert row["dataURI"].endswith("/" + row["productFileName"])


def test_join_keys_connect_the_four_tables(small_catalog):
    observations = _rows_as_dicts(small_catalog, "dbo.caomobservation")
    planes = _rows_as_dicts(small_catalog, "dbo.caomplane")
    artifacts = _rows_as_dicts(small_catalog, "dbo.caomartifact")
    obscore = _rows_as_dicts(small_catalog, "ivoa.obscore")
    observation_tids = {row["observationTID"] for row in observations}
    plane_tids = {row["planeTID"] for row in planes}
    assert all(row["observationTID"] in observation_tids for row in planes)
    assert all(row["planeTID"] in plane_tids for row in artifacts)
    assert {row["obs_id"] for row in obscore} == {row["observationID"] for row in observations}
    ffis = [row for row in observations if row["trgType"] == "FIELD"]
    assert len(ffis) == 2 * 16 and {row["sequenceNumber"] for row in ffis} == {1, 28}


def test_light_curve_rows_point_at_their_files(small_catalog):
    name_form = re.compile(r"^tess\d{13}-s\d{4}-\d{16}-\d{4}-s_lc\.fits$")
    rows = [r for r in _rows_as_dicts(small_catalog, "ivoa.obscore") if r["obs_collection"] == "TESS"]
    light_curves = [r for r in rows if r["dataproduct_type"] == "timeseries"]
    assert light_curves
    for row in light_curves:
        prefix = "http://127.0.0.1:9/api/v0.1/Download/file?uri=mast:TESS/product/"
        assert row["access_url"] == prefix + row["obs_id"] + "_lc.fits"
        name = row["access_url"].rsplit("/", 1)[-1]
        assert name_form.match(name)
        entry = small_catalog[name]
        assert row["access_estsize"] == round(entry.size / 1024)  # ObsCore: kB
        assert {p for p in ("lc", "tp", "dvt")} <= {
            f.product for f in small_catalog.values() if f.obs_id == row["obs_id"]
        }
    images = [r for r in rows if r["dataproduct_type"] == "image"]
    assert all(r["s_region"].startswith("POLYGON ") for r in images)


def test_hlsp_rows_match_lc_fits_but_are_not_tess(small_catalog):
    hlsp = [r for r in _rows_as_dicts(small_catalog, "ivoa.obscore") if r["obs_collection"] == "HLSP"]
    assert hlsp, "some targets should have a high-level science product"
    assert all(r["access_url"].endswith("llc.fits") for r in hlsp)  # LIKE '%lc.fits' matches them
    collections = {
        r["observationID"]: r["collection"] for r in _rows_as_dicts(small_catalog, "dbo.caomobservation")
    }
    assert all(collections[r["obs_id"]] == "HLSP" for r in hlsp)


def test_targets_get_a_light_curve_in_every_sector_whose_footprint_contains_them(small_catalog):
    rows = [
        r
        for r in _rows_as_dicts(small_catalog, "ivoa.obscore")
        if r["obs_collection"] == "TESS" and r["dataproduct_type"] == "timeseries"
    ]
    sectors_of: dict[str, set[int]] = {}
    position: dict[str, tuple[float, float]] = {}
    for row in rows:
        sectors_of.setdefault(row["target_name"], set()).add(int(row["obs_id"].split("-")[1][1:]))
        position[row["target_name"]] = (row["s_ra"], row["s_dec"])
    names = sorted(position)
    ra = np.array([position[n][0] for n in names])
    dec = np.array([position[n][1] for n in names])
    expected: dict[str, set[int]] = {n: set() for n in names}
    for (sector, _camera, _ccd), vertices in small_catalog.footprints.items():
        for name, inside in zip(names, polygon_contains(ra, dec, vertices), strict=True):
            if inside:
                expected[name].add(sector)
    assert sectors_of == expected
    assert any(len(s) == 2 for s in sectors_of.values()), "sector 28 re-observes sector 1's field"


def test_bad_options_are_value_errors():
    with pytest.raises(ValueError, match="sectors"):
        build_catalog(sectors=[], targets=1, cadences=10)
    with pytest.raises(ValueError, match="-5"):
        build_catalog(sectors=[1], targets=-5, cadences=10)
