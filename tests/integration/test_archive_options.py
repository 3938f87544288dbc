"""ArchiveOptions the other suites rely on: artifacts=False and hostile_names=True, through pyvo and HTTP."""

from __future__ import annotations

import hashlib
import warnings

import pytest
import pyvo as vo
import requests

from engine.archive.catalog import HOSTILE_NAMES, HOSTILE_OBS_IDS

_FOOTPRINT = (
    "SELECT top 1 obs_id, s_region FROM dbo.caomobservation JOIN ivoa.obscore"
    " on dbo.caomobservation.observationID = ivoa.obscore.obs_id"
    " WHERE collection = 'TESS' and trgType = 'FIELD' and sequenceNumber = 1"
    " and observationID like 'tess%-s0001-1-2-%-s'"
)
_SELECT = (
    "SELECT target_name, sequenceNumber as sector, s_ra, s_dec, access_url, access_estsize, obs_id{extra}"
    " FROM dbo.caomobservation JOIN ivoa.obscore on dbo.caomobservation.observationID = ivoa.obscore.obs_id"
    "{join} WHERE obs_collection = 'TESS' and dataproduct_type = 'timeseries' and {like}"
    " and CONTAINS(POINT('ICRS',s_ra,s_dec),POLYGON('ICRS', {vertices}))=1 ORDER BY obs_id"
)


def _inventory(service: vo.dal.TAPService, *, artifacts: bool):
    """The notebook's two queries; with `artifacts`, the inventory also joins plane and artifact."""
    footprint = service.run_async(_FOOTPRINT).to_table()["s_region"][0]
    vertices = footprint[footprint.find(" ") :].strip().replace(" ", ", ")
    if artifacts:
        query = _SELECT.format(
            extra=", dbo.caomartifact.productFileName, dbo.caomartifact.contentLength",
            join=" JOIN dbo.caomplane ON dbo.caomplane.observationTID = dbo.caomobservation.observationTID"
            " JOIN dbo.caomartifact ON dbo.caomartifact.planeTID = dbo.caomplane.planeTID",
            like="dbo.caomartifact.productFileName like '%lc.fits'",
            vertices=vertices,
        )
    else:
        query = _SELECT.format(extra="", join="", like="access_url like '%lc.fits'", vertices=vertices)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # VOTable W-warnings about NULL columns are not the point here
        return service.run_async(query).to_table()


@pytest.mark.integration
def test_without_artifacts_only_observation_and_obscore_are_published(archive):
    local = archive(artifacts=False, targets=16)
    service = vo.dal.TAPService(local.tap_url)
    names = set(service.tables.keys())
    assert {"dbo.caomobservation", "ivoa.obscore"} <= names
    assert not names & {"dbo.caomplane", "dbo.caomartifact"}
    listed = service.run_sync("SELECT table_name FROM TAP_SCHEMA.tables").to_table()["table_name"]
    assert not {str(n).lower() for n in listed} & {"dbo.caomplane", "dbo.caomartifact"}
    columns = service.run_sync(
        "SELECT column_name FROM TAP_SCHEMA.columns WHERE table_name = 'dbo.caomartifact'"
    ).to_table()
    assert len(columns) == 0
    with pytest.raises(vo.dal.DALQueryError, match=r"(?i)caomartifact"):
        service.run_sync("SELECT TOP 1 productFileName FROM dbo.caomartifact")
    # The ObsCore path still works, and its files are still served with the declared bytes.
    rows = _inventory(service, artifacts=False)
    assert len(rows) > 0 and all(int(kb) > 0 for kb in rows["access_estsize"])
    url = str(rows["access_url"][0])
    entry = local.catalog[url.rsplit("/", 1)[-1]]
    assert hashlib.md5(requests.get(url, timeout=10).content).hexdigest() == entry.md5


@pytest.mark.integration
@pytest.mark.parametrize("artifacts", [True, False])
def test_hostile_names_reach_the_client_and_are_served(archive, tmp_path, artifacts):
    data_dir = tmp_path / "deep" / "archive-data"
    local = archive(hostile_names=True, targets=16, data_dir=data_dir)
    rows = _inventory(vo.dal.TAPService(local.tap_url), artifacts=artifacts)
    by_obs = {str(r["obs_id"]): r for r in rows}
    hostile = [local.catalog[name] for name in HOSTILE_NAMES]
    hostile += [f for f in local.catalog.values() if f.obs_id in HOSTILE_OBS_IDS]
    assert len(hostile) == len(HOSTILE_NAMES) + len(HOSTILE_OBS_IDS)
    for entry in hostile:
        row = by_obs[entry.obs_id]  # every hostile observation is in the notebook's footprint
        url = str(row["access_url"])
        assert url.endswith(entry.uri)  # declared as is, e.g. ...?uri=mast:TESS/product/../../escape_lc.fits
        if artifacts:
            assert str(row["productFileName"]) == entry.name
            assert int(row["contentLength"]) == entry.size
        response = requests.get(url, timeout=10)
        # The server answers (a refusal must come from the client, not a 404), with the declared bytes.
        assert response.status_code == 200, entry.name
        assert hashlib.md5(response.content).hexdigest() == entry.md5
    # The NUL arrives as a NUL once the client URL-decodes the uri= value, and the server knows it.
    assert any("%00" in name for name in HOSTILE_NAMES)
    # Nothing was written outside the archive's own data directory.
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    assert written and all(p.parts[:2] == ("deep", "archive-data") for p in written)
    assert all("/" not in p.name and ".." not in p.name for p in (data_dir.iterdir()))
