"""The MAST notebook's two queries, verbatim, through pyvo against the local archive, then downloads."""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
import pytest
import pyvo as vo
import requests
from astropy.io import fits

from engine.archive.geometry import parse_stc_polygon, polygon_contains

MAST_S1_C1_CCD2 = (
    "POLYGON 330.343765 -44.336318 324.663797 -33.277719 337.720578 -28.384567 "
    "344.128621 -38.561643 330.343765 -44.336318"
)


def _expected_light_curves(catalog, vertices) -> set[str]:
    """From the generated truth, not through TAP: TESS timeseries whose position is in the polygon."""
    table = catalog.tables["ivoa.obscore"]
    index = {name: i for i, (name, _) in enumerate(table.columns)}
    rows = [
        row
        for row in table.rows
        if row[index["obs_collection"]] == "TESS"
        and row[index["dataproduct_type"]] == "timeseries"
        and row[index["access_url"]].endswith("lc.fits")
    ]
    ra = np.array([row[index["s_ra"]] for row in rows])
    dec = np.array([row[index["s_dec"]] for row in rows])
    inside = polygon_contains(ra, dec, vertices)
    return {row[index["obs_id"]] for row, ok in zip(rows, inside, strict=True) if ok}


@pytest.mark.integration
def test_notebook_queries_return_footprint_and_every_light_curve_inside(archive):
    # Sector 28 re-observed the same field, so targets in the overlap have two sectors.
    local = archive(sectors=(1, 28), targets=320, file_size="small", seed=3)
    TAP_service = vo.dal.TAPService(local.tap_url)

    # -- the notebook, verbatim (the seed lost the second query's WHERE; the notebook has it) --
    sector = "1"
    camera = "1"
    chip = "2"
    observationIDwildcard = "tess%-s000{}-{}-{}-%-s".format(sector, camera, chip)  # noqa: UP032
    job = TAP_service.run_async(f"""
            SELECT top 1 obs_id, s_region  
            FROM dbo.caomobservation JOIN ivoa.obscore on dbo.caomobservation.observationID = ivoa.obscore.obs_id 
            WHERE collection = 'TESS' and trgType = 'FIELD' and 
            sequenceNumber = {sector} and
            observationID like '{observationIDwildcard}'
            """)  # noqa: W291, E501
    footprint_results = job.to_table()
    footprint = footprint_results["s_region"][0]
    footprintShape = footprint[0 : footprint.find(" ")]
    footprintVertices = footprint[footprint.find(" ") :].strip().replace(" ", ", ")
    job = TAP_service.run_async(
        """
            SELECT target_name, sequenceNumber as sector, s_ra, s_dec, access_url, access_estsize, obs_id 
            FROM dbo.caomobservation JOIN ivoa.obscore on dbo.caomobservation.observationID = ivoa.obscore.obs_id 
            WHERE obs_collection = 'TESS' and dataproduct_type = 'timeseries' 
            and access_url like '%lc.fits' and 
            CONTAINS(POINT('ICRS',s_ra,s_dec),{}('ICRS', {}))=1
            ORDER BY obs_id
            """.format(footprintShape, footprintVertices)  # noqa: UP032, W291, E501
    )
    TAP_results = job.to_table()

    # -- step 1: the footprint is sector 1 / camera 1 / CCD 2, where MAST has it --
    assert len(footprint_results) == 1
    assert footprint_results["obs_id"][0] == "tess2018207052942-s0001-1-2-0120-s"
    vertices = parse_stc_polygon(footprint)
    mast = parse_stc_polygon(MAST_S1_C1_CCD2)
    assert np.allclose(np.array(vertices), np.array(mast), atol=0.05)

    # -- step 2: exactly the light curves inside, in every sector, and no HLSP --
    expected = _expected_light_curves(local.catalog, vertices)
    got = [str(obs_id) for obs_id in TAP_results["obs_id"]]
    assert got == sorted(got)
    assert set(got) == expected
    assert len(got) == len(expected) > 10
    assert set(np.asarray(TAP_results["sector"]).tolist()) == {1, 28}
    assert all(str(url).endswith("_lc.fits") for url in TAP_results["access_url"])

    # -- every access_url downloads to a file matching the artifact table, with valid checksums --
    with requests.Session() as session:
        for url, est_kb in zip(TAP_results["access_url"], TAP_results["access_estsize"], strict=True):
            name = str(url).rsplit("/", 1)[-1]
            declared = local.catalog[name]
            body = session.get(str(url), timeout=10).content
            assert len(body) == declared.size
            assert abs(int(est_kb) * 1024 - declared.size) <= 1024
            assert hashlib.md5(body).hexdigest() == declared.md5
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with fits.open(io.BytesIO(body), checksum=True) as hdus:
                    assert [hdu.verify_checksum() for hdu in hdus] == [1, 1, 1]
                    assert hdus[0].header["TICID"] == int(declared.identity.tic)
    gets = [r for r in local.request_log if r.method == "GET"]
    assert len(gets) == len(got) and all(r.status == 200 for r in gets)


@pytest.mark.integration
def test_artifact_table_through_tap_matches_catalog(archive):
    local = archive(sectors=(1,), targets=16, seed=5)
    service = vo.dal.TAPService(local.tap_url)
    table = service.run_async(
        "SELECT a.productFileName, a.contentLength, a.contentChecksum, p.productID, o.observationID "
        "FROM dbo.caomobservation AS o JOIN dbo.caomplane AS p ON o.observationTID = p.observationTID "
        "JOIN dbo.caomartifact AS a ON p.planeTID = a.planeTID WHERE o.collection = 'TESS'"
    ).to_table()
    assert len(table) == sum(1 for f in local.catalog.values() if f.collection == "TESS")
    for name, length, checksum in zip(
        table["productFileName"], table["contentLength"], table["contentChecksum"], strict=True
    ):
        assert int(length) == local.catalog[str(name)].size
        assert str(checksum) == "md5:" + local.catalog[str(name)].md5
