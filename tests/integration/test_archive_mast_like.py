"""The MAST-like archive through TAP (pyvo), as the planner meets it: the truth is countable."""

from __future__ import annotations

import hashlib
import urllib.request

import pytest
import pyvo

from engine.archive import ArchiveOptions, ArchiveThread

KEY = (1, 1, 2)


@pytest.fixture(scope="module")
def mast():
    options = ArchiveOptions.mast_like(
        sectors=(1,), targets=300, file_size="small", exposures_per_ccd=25, focus=KEY, url_form="path"
    )
    with ArchiveThread(options) as running:
        yield running.archive


def _adql_polygon(vertices) -> str:
    return "POLYGON('ICRS', " + ", ".join(f"{ra!r}, {dec!r}" for ra, dec in vertices) + ")"


def test_a_footprint_query_without_top_returns_every_exposure_of_the_ccd(mast):
    service = pyvo.dal.TAPService(mast.tap_url)
    query = (
        "SELECT obs_id, s_region FROM dbo.caomobservation o "
        "JOIN ivoa.obscore c ON c.obs_id = o.observationID "
        "WHERE o.collection = 'TESS' AND o.trgType = 'FIELD' AND o.sequenceNumber = 1 "
        "AND c.obs_id LIKE '%-1-2-%' AND c.dataproduct_type = 'image'"
    )
    rows = service.run_sync(query).to_table()
    exposures = mast.catalog.exposures[KEY]
    assert sorted(set(rows["obs_id"])) == [e.obs_id for e in exposures]
    assert len(rows) == 2 * len(exposures)  # one ObsCore row per product: _ffic and _ffir
    assert len(set(rows["s_region"])) == len(exposures)  # each exposure its own polygon


def test_light_curves_inside_the_middle_exposure_match_the_catalogue_count(mast):
    service = pyvo.dal.TAPService(mast.tap_url)
    middle = mast.catalog.middle_exposure(KEY)
    query = (
        "SELECT obs_id, access_url FROM ivoa.obscore WHERE obs_collection = 'TESS' "
        "AND dataproduct_type = 'timeseries' AND access_url LIKE '%_lc.fits' "
        f"AND CONTAINS(POINT('ICRS', s_ra, s_dec), {_adql_polygon(middle.vertices)}) = 1"
    )
    rows = service.run_async(query).to_table()
    expected = {entry.name for entry in mast.catalog.files_inside(middle.vertices)}
    found = [url.rsplit("/", 1)[-1] for url in rows["access_url"]]
    assert len(found) == len(set(found)) == len(expected) > 250
    assert set(found) == expected


def test_every_light_curve_observation_has_one_row_per_product(mast):
    service = pyvo.dal.TAPService(mast.tap_url)
    rows = service.run_sync(
        "SELECT obs_id, COUNT(*) AS n FROM ivoa.obscore WHERE obs_collection = 'TESS' "
        "AND dataproduct_type = 'timeseries' GROUP BY obs_id"
    ).to_table()
    assert len(rows) > 0 and set(rows["n"]) == {3}


def test_artifact_nulls_reach_the_client_and_the_rest_are_exact(mast):
    service = pyvo.dal.TAPService(mast.tap_url)
    rows = service.run_async(
        "SELECT productFileName, contentLength, contentChecksum FROM dbo.caomartifact"
    ).to_table()
    checksums = rows["contentChecksum"]
    missing = [str(v) in ("", "--") for v in checksums]
    assert 0 < sum(missing) < len(rows) / 4
    for name, checksum, gone in zip(rows["productFileName"], checksums, missing, strict=True):
        if not gone:
            assert str(checksum) == "md5:" + mast.catalog[str(name)].md5


def test_path_urls_from_tap_download_the_declared_bytes(mast):
    service = pyvo.dal.TAPService(mast.tap_url)
    rows = service.run_sync(
        "SELECT TOP 3 access_url FROM ivoa.obscore WHERE access_url LIKE '%_ffic.fits'"
    ).to_table()
    for url in rows["access_url"]:
        assert str(url).startswith(mast.base_url + "/files/tess/ffi/s0001/")
        with urllib.request.urlopen(str(url), timeout=30) as response:  # 127.0.0.1 only
            body = response.read()
        entry = mast.catalog[str(url).rsplit("/", 1)[-1]]
        assert hashlib.md5(body).hexdigest() == entry.md5 and len(body) == entry.size
