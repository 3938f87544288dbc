"""The catalogue's real-MAST shapes: FFI exposures, FFI files, ObsCore rows per product, URL forms, NULLs."""

from __future__ import annotations

import hashlib
import re
import warnings
from collections import Counter, defaultdict

import numpy as np
import pytest
from astropy.io import fits

from engine.archive import ArchiveOptions, ffigen
from engine.archive.catalog import JITTER_ARCSEC, Shape, build_catalog, s3_key
from engine.archive.footprints import ffi_cadence_seconds, ffi_obs_id
from engine.archive.geometry import polygon_contains
from engine.verify.fits import verify_fits

BASE = "http://127.0.0.1:9"
FFI_OBS_ID = re.compile(r"^tess(\d{13})-s(\d{4})-([1-4])-([1-4])-(\d{4})-s$")


def _rows(catalog, key):
    table = catalog.tables[key]
    names = [name for name, _ in table.columns]
    return [dict(zip(names, row, strict=True)) for row in table.rows]


@pytest.fixture(scope="module")
def mast_catalog():
    shape = Shape(
        exposures_per_ccd=12,
        ffi_files=True,
        obscore_per_product=True,
        null_checksum_fraction=0.1,
        null_length_fraction=0.05,
    )
    return build_catalog(sectors=[1], targets=600, cadences=40, seed=3, base_url=BASE, shape=shape)


def test_default_options_have_hundreds_of_exposures_per_ccd_and_otherwise_the_first_release_shape():
    options = ArchiveOptions()
    assert options.exposures_per_ccd == 300  # MAST keeps one observation per FFI exposure
    assert not options.ffi_files and not options.obscore_per_product
    assert options.url_form == "uri" and not options.redirect_to_s3 and options.chunked_fraction == 0
    assert options.null_checksum_fraction == options.null_length_fraction == 0
    assert options.sync_timeout is None and options.async_abort_after is None and options.slow_join == 0


def test_mast_like_gives_the_real_shape_and_takes_overrides():
    options = ArchiveOptions.mast_like(sectors=(1,), exposures_per_ccd=20)
    assert options.exposures_per_ccd == 20 and tuple(options.sectors) == (1,)
    assert options.ffi_files and options.obscore_per_product and options.redirect_to_s3
    assert 0 < options.chunked_fraction < 1
    assert options.null_checksum_fraction == pytest.approx(0.1)
    assert options.null_length_fraction == pytest.approx(0.05)
    assert ArchiveOptions.mast_like().exposures_per_ccd == 300
    with pytest.raises(TypeError, match="exposure_per_ccd"):
        ArchiveOptions.mast_like(exposure_per_ccd=3)


def test_every_ccd_has_one_observation_and_obscore_image_row_per_exposure(mast_catalog):
    observations = [r for r in _rows(mast_catalog, "dbo.caomobservation") if r["trgType"] == "FIELD"]
    per_ccd = Counter(FFI_OBS_ID.match(r["observationID"]).groups()[2:4] for r in observations)
    assert len(per_ccd) == 16 and set(per_ccd.values()) == {12}
    images = [r for r in _rows(mast_catalog, "ivoa.obscore") if r["dataproduct_type"] == "image"]
    assert {r["obs_id"] for r in images} == {r["observationID"] for r in observations}
    assert all(r["obs_collection"] == "TESS" for r in images)


def test_ffi_obs_ids_are_timestamped_one_cadence_apart(mast_catalog):
    exposures = mast_catalog.exposures[(1, 1, 2)]
    assert exposures[0].obs_id == "tess2018207052942-s0001-1-2-0120-s"  # MAST's, from the notebook
    assert [e.obs_id for e in exposures] == sorted(e.obs_id for e in exposures)
    assert exposures[1].obs_id == "tess2018207055942-s0001-1-2-0120-s"  # 30 minutes later
    for e in exposures:
        assert FFI_OBS_ID.match(e.obs_id) and e.obs_id[4:17] == e.stamp


@pytest.mark.parametrize(("sector", "seconds"), [(1, 1800), (26, 1800), (27, 600), (55, 600), (56, 200)])
def test_ffi_cadence_follows_the_mission_phases(sector, seconds):
    assert ffi_cadence_seconds(sector) == seconds
    first, second = ffi_obs_id(sector, 1, 1, 0), ffi_obs_id(sector, 1, 1, 1)
    assert first != second and first[:4] == "tess"


def test_exposure_polygons_jitter_by_arcseconds_around_the_middle_footprint(mast_catalog):
    key = (1, 1, 2)
    exposures = mast_catalog.exposures[key]
    middle = mast_catalog.middle_exposure(key)
    assert middle is exposures[len(exposures) // 2]
    assert middle.vertices == mast_catalog.footprints[key]
    base = np.array(mast_catalog.footprints[key])
    distinct = set()
    for exposure in exposures:
        vertices = np.array(exposure.vertices)
        d_dec = np.abs(vertices[:, 1] - base[:, 1]) * 3600
        d_ra = np.abs(vertices[:, 0] - base[:, 0]) * 3600 * np.cos(np.radians(base[:, 1]))
        assert d_dec.max() <= JITTER_ARCSEC + 0.01 and d_ra.max() <= JITTER_ARCSEC + 0.01
        distinct.add(exposure.vertices)
    assert len(distinct) == len(exposures), "every exposure has its own polygon"
    regions = {r["obs_id"]: r["s_region"] for r in _rows(mast_catalog, "ivoa.obscore")}
    assert regions[exposures[0].obs_id] != regions[middle.obs_id]


def test_jitter_is_deterministic_for_a_seed():
    shape = Shape(exposures_per_ccd=5)
    one = build_catalog(sectors=[1], targets=16, cadences=20, seed=4, shape=shape)
    two = build_catalog(sectors=[1], targets=16, cadences=20, seed=4, shape=shape)
    other = build_catalog(sectors=[1], targets=16, cadences=20, seed=5, shape=shape)
    assert one.exposures == two.exposures
    assert one.exposures[(1, 1, 2)][0].vertices != other.exposures[(1, 1, 2)][0].vertices


def test_obscore_per_product_gives_one_row_per_file_with_the_same_obs_id(mast_catalog):
    rows = _rows(mast_catalog, "ivoa.obscore")
    by_obs: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_obs[row["obs_id"]].append(row)
    files_of = defaultdict(set)
    for entry in mast_catalog.values():
        files_of[entry.obs_id].add(entry.name)
    for obs_id, group in by_obs.items():
        names = {r["access_url"].rsplit("/", 1)[-1] for r in group}
        assert names == files_of[obs_id] and len(group) == len(names)
        for row in group:
            entry = mast_catalog[row["access_url"].rsplit("/", 1)[-1]]
            assert row["access_estsize"] == round(entry.size / 1024)  # kB, rounded
        kind = "image" if group[0]["dataproduct_type"] == "image" else "timeseries"
        assert {r["dataproduct_type"] for r in group} == {kind}
    light_curve_groups = [g for g in by_obs.values() if g[0]["obs_collection"] == "TESS" and len(g) == 3]
    assert light_curve_groups
    for group in light_curve_groups:
        suffixes = sorted(r["access_url"].rsplit("_", 1)[-1] for r in group)
        assert suffixes == ["dvt.fits", "lc.fits", "tp.fits"]
    ffi_groups = [g for g in by_obs.values() if g[0]["dataproduct_type"] == "image"]
    assert ffi_groups and all(len(g) == 2 for g in ffi_groups)


def test_url_form_path_points_at_mast_trees_and_uri_form_at_the_download_api():
    path_form = build_catalog(
        sectors=[1], targets=16, cadences=20, base_url=BASE, shape=Shape(url_form="path", ffi_files=True)
    )
    rows = [r for r in _rows(path_form, "ivoa.obscore") if r["access_url"]]
    for row in rows:
        name = row["access_url"].rsplit("/", 1)[-1]
        entry = path_form[name]
        assert row["access_url"] == f"{BASE}/files/{entry.path}"
    lc = next(e for e in path_form.values() if e.product == "lc")
    digits = f"{lc.identity.tic:016d}"
    assert lc.path == (f"tess/tid/s0001/{digits[:4]}/{digits[4:8]}/{digits[8:12]}/{digits[12:]}/{lc.name}")
    assert s3_key(lc.path).startswith("tess/public/tid/s0001/")
    ffic = next(e for e in path_form.values() if e.product == "ffic")
    assert re.match(
        r"^tess/ffi/s0001/2018/\d{3}/[1-4]-[1-4]/tess\d{13}-s0001-[1-4]-[1-4]-0120-s_ffic\.fits$", ffic.path
    )
    uri_form = build_catalog(sectors=[1], targets=16, cadences=20, base_url=BASE)
    urls = [r["access_url"] for r in _rows(uri_form, "ivoa.obscore") if r["access_url"]]
    assert urls and all(u.startswith(f"{BASE}/api/v0.1/Download/file?uri=mast:") for u in urls)


def test_null_checksums_and_lengths_come_at_their_fractions_and_the_rest_are_exact(mast_catalog):
    artifacts = _rows(mast_catalog, "dbo.caomartifact")
    total = len(artifacts)
    assert total > 2000
    no_md5 = sum(r["contentChecksum"] is None for r in artifacts)
    no_length = sum(r["contentLength"] is None for r in artifacts)
    assert 0.07 * total < no_md5 < 0.13 * total
    assert 0.03 * total < no_length < 0.07 * total
    for row in artifacts:
        entry = mast_catalog[row["productFileName"]]
        if row["contentChecksum"] is not None:
            assert row["contentChecksum"] == f"md5:{entry.md5}"
        if row["contentLength"] is not None:
            assert row["contentLength"] == entry.size


def test_shape_rejects_bad_values_naming_them():
    with pytest.raises(ValueError, match="exposures_per_ccd 0"):
        Shape(exposures_per_ccd=0)
    with pytest.raises(ValueError, match="exposures_per_ccd 10001"):
        Shape(exposures_per_ccd=10_001)
    with pytest.raises(ValueError, match="url_form 'ftp'"):
        Shape(url_form="ftp")
    with pytest.raises(ValueError, match=r"null_checksum_fraction 1\.5"):
        Shape(null_checksum_fraction=1.5)
    with pytest.raises(ValueError, match="ffi_file_size 'huge'"):
        ffigen.ffi_dims("huge")


def test_ffi_files_are_valid_fits_with_checksums_and_the_declared_size_and_md5(mast_catalog, tmp_path):
    ffis = [e for e in mast_catalog.values() if e.product in ("ffic", "ffir")]
    assert Counter(e.product for e in ffis) == {"ffic": 16 * 12, "ffir": 16 * 12}
    for entry in (ffis[0], ffis[1], ffis[-1]):
        body = b"".join(mast_catalog.render(entry.identity))
        assert len(body) == entry.size and len(body) % 2880 == 0
        assert hashlib.md5(body).hexdigest() == entry.md5
        path = tmp_path / entry.name
        path.write_bytes(body)
        verify_fits(path)  # every CHECKSUM and DATASUM holds
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with fits.open(path, checksum=True) as hdus:
                assert hdus[0].header["SECTOR"] == 1
                assert hdus[-1].header["OBS_ID"] == entry.obs_id
    md5s = {e.md5 for e in ffis}
    assert len(md5s) == len(ffis), "every exposure's file has its own bytes"


def test_full_size_ffis_are_about_35_mb_and_small_ones_a_few_blocks():
    assert 34_000_000 < ffigen.ffi_size("ffic", ffigen.ffi_dims("full")) < 36_000_000
    assert (
        ffigen.ffi_size("ffic", ffigen.ffi_dims("small")) == 6 * 2880
    )  # primary, 2 x (header, data), trailer


def test_files_inside_counts_light_curves_by_position_for_any_polygon():
    catalog = build_catalog(sectors=[1], targets=200, cadences=20, seed=2, focus=(1, 1, 2))
    middle = catalog.middle_exposure((1, 1, 2)).vertices
    inside = catalog.files_inside(middle)
    sector1 = {e.name for e in catalog.values() if e.product == "lc" and e.identity.sector == 1}
    assert {e.name for e in inside if e.identity.sector == 1} == sector1  # focus: every target is inside
    assert all(e.product == "lc" and e.collection == "TESS" for e in inside)
    far = ((10.0, 10.0), (10.0, 11.0), (11.0, 11.0), (11.0, 10.0))
    assert catalog.files_inside(far) == []
    ras = np.array([e.identity.ra for e in inside])
    decs = np.array([e.identity.dec for e in inside])
    assert polygon_contains(ras, decs, middle).all()
