"""engine.plan.adql: the notebook's queries, reproduced, and safe quoting of untrusted values."""

from __future__ import annotations

import re

import pytest

from engine.plan.adql import (
    Keyset,
    Region,
    adql_number,
    adql_string,
    columns_query,
    exposures_query,
    ffi_files_query,
    footprint_query,
    inventory_query,
    observation_pattern,
    regions_query,
    sectors_query,
)

FOOTPRINT = [330.343765, -44.336318, 324.663797, -33.277719, 337.720578, -28.384567, 344.128621, -38.561643,
             330.343765, -44.336318]  # fmt: skip


def squash(text: str) -> str:
    """Whitespace and keyword case do not matter to ADQL; compare without them."""
    return re.sub(r"\s+", " ", text).strip().lower()


def test_footprint_query_is_the_notebooks_first_query() -> None:
    notebook = """
        SELECT top 1 obs_id, s_region
        FROM dbo.caomobservation JOIN ivoa.obscore on dbo.caomobservation.observationID = ivoa.obscore.obs_id
        WHERE collection = 'TESS' and trgType = 'FIELD' and
        sequenceNumber = 1 and
        observationID like 'tess%-s0001-1-2-%-s'
    """
    query = footprint_query(1, [(1, 2)])
    assert squash(query).startswith(squash(notebook))
    assert squash(query).endswith("order by obs_id")


def test_footprint_query_for_several_detectors_has_no_top() -> None:
    query = footprint_query(12, [(1, 1), (4, 4)])
    assert "TOP" not in query
    assert "observationID LIKE 'tess%-s0012-1-1-%-s' OR observationID LIKE 'tess%-s0012-4-4-%-s'" in query


@pytest.mark.parametrize("args", [(0, 1, 1), (1, 5, 1), (1, 1, 0), (True, 1, 1)])
def test_observation_pattern_rejects_bad_numbers(args: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        observation_pattern(*args)


def test_inventory_query_is_the_notebooks_second_query() -> None:
    vertices = ", ".join(str(v) for v in FOOTPRINT)
    notebook = f"""
        SELECT target_name, sequenceNumber as sector, s_ra, s_dec, access_url, access_estsize, obs_id
        FROM dbo.caomobservation JOIN ivoa.obscore on dbo.caomobservation.observationID = ivoa.obscore.obs_id
        WHERE obs_collection = 'TESS' and dataproduct_type = 'timeseries'
        and access_url like '%lc.fits' and
        CONTAINS(POINT('ICRS', s_ra, s_dec), POLYGON('ICRS', {vertices})) = 1
        ORDER BY obs_id
    """
    assert squash(inventory_query(region=Region.polygon(FOOTPRINT))) == squash(notebook)


def test_inventory_filters_sectors_products_and_cone() -> None:
    query = inventory_query(region=Region.circle(10, -5, 0.5), sectors=[1, 2], products=["lc", "fast-lc"])
    assert "sequenceNumber IN (1, 2)" in query
    assert "(access_url LIKE '%lc.fits' OR access_url LIKE '%fast-lc.fits')" in query
    assert "CONTAINS(POINT('ICRS', s_ra, s_dec), CIRCLE('ICRS', 10.0, -5.0, 0.5)) = 1" in query


def test_inventory_with_artifacts_joins_plane_and_artifact() -> None:
    query = inventory_query(region=Region.polygon(FOOTPRINT[:8]), products=["lc", "tp"], artifacts=True)
    assert "JOIN dbo.caomplane ON dbo.caomplane.observationTID = dbo.caomobservation.observationTID" in query
    assert "JOIN dbo.caomartifact ON dbo.caomartifact.planeTID = dbo.caomplane.planeTID" in query
    name = "dbo.caomartifact.productFileName"
    assert f"({name} LIKE '%lc.fits' OR {name} LIKE '%tp.fits')" in query
    for column in ("productFileName", "dataURI", "contentLength", "contentChecksum"):
        assert f"dbo.caomartifact.{column}" in query
    assert query.endswith("ORDER BY obs_id, dbo.caomartifact.productFileName")


def test_keyset_conditions_quote_a_hostile_obs_id() -> None:
    hostile = "x' OR '1'='1"
    query = inventory_query(region=Region.circle(1, 2, 3), after=Keyset(hostile))
    assert "obs_id > 'x'' OR ''1''=''1'" in query
    query = inventory_query(region=Region.circle(1, 2, 3), after=Keyset(hostile, inclusive=True))
    assert "obs_id >= 'x'' OR ''1''=''1'" in query
    query = inventory_query(region=Region.circle(1, 2, 3), artifacts=True, after=Keyset("o'1", "f'.fits"))
    assert "(obs_id > 'o''1' OR (obs_id = 'o''1' AND dbo.caomartifact.productFileName > 'f''.fits'))" in query


def test_targets_query_lists_quoted_names() -> None:
    query = inventory_query(targets=["25155310", "a'b"])
    assert "target_name IN ('25155310', 'a''b')" in query
    assert "CONTAINS" not in query


def test_inventory_argument_errors() -> None:
    with pytest.raises(ValueError):
        inventory_query()
    with pytest.raises(ValueError):
        inventory_query(region=Region.circle(1, 2, 3), products=["ffi"])


def test_literals() -> None:
    assert adql_string("it's") == "'it''s'"
    with pytest.raises(ValueError):
        adql_string("a\nb")
    assert adql_number(330.343765) == "330.343765"
    assert adql_number(1e-7) == "0.0000001"
    assert adql_number(5) == "5"
    for bad in (float("nan"), float("inf"), True):
        with pytest.raises(ValueError):
            adql_number(bad)
    assert columns_query("dbo.caomartifact") == (
        "SELECT column_name FROM TAP_SCHEMA.columns WHERE table_name = 'dbo.caomartifact'"
    )


def test_exposures_query_lists_one_ccds_obs_ids_without_a_join_and_pages_on_them() -> None:
    query = exposures_query(1, 1, 2)
    assert query == (
        "SELECT observationID FROM dbo.caomobservation WHERE collection = 'TESS' AND trgType = 'FIELD' "
        "AND sequenceNumber = 1 AND observationID LIKE 'tess%-s0001-1-2-%-s' ORDER BY observationID"
    )
    after = exposures_query(1, 1, 2, after="tess2018207052942-s0001-1-2-0120-s")
    assert "AND observationID > 'tess2018207052942-s0001-1-2-0120-s' ORDER BY observationID" in after
    assert "observationID > 'x'' OR 1=1 --'" in exposures_query(1, 1, 2, after="x' OR 1=1 --")
    with pytest.raises(ValueError):
        exposures_query(1, 5, 2)


def test_regions_query_asks_only_the_chosen_exposures() -> None:
    query = regions_query(["a", "b'c"])
    assert query == "SELECT obs_id, s_region FROM ivoa.obscore WHERE obs_id IN ('a', 'b''c') ORDER BY obs_id"
    with pytest.raises(ValueError):
        regions_query([])


def test_ffi_files_query_reads_every_exposure_of_one_ccd() -> None:
    query = ffi_files_query(1, 1, 2, products=["ffic", "ffir"], artifacts=True)
    assert "trgType = 'FIELD' AND sequenceNumber = 1 AND observationID LIKE 'tess%-s0001-1-2-%-s'" in query
    name = "dbo.caomartifact.productFileName"
    assert f"({name} LIKE '%ffic.fits' OR {name} LIKE '%ffir.fits')" in query
    # obs_collection (ObsCore's), never the bare `collection` that three joined CAOM tables share
    assert "obs_collection = 'TESS'" in query and " collection =" not in query
    assert query.endswith(f"ORDER BY obs_id, {name}")
    plain = ffi_files_query(1, 4, 4, after=Keyset("o1", inclusive=True))
    assert (
        "access_url LIKE '%ffic.fits'" in plain and "obs_id >= 'o1'" in plain and "caomartifact" not in plain
    )
    with pytest.raises(ValueError):
        ffi_files_query(1, 1, 2, products=["lc"])


def test_sectors_query_is_the_inventory_scope_without_the_join() -> None:
    query = sectors_query(region=Region.circle(10, -5, 0.5), products=["lc", "tp"], collection="HLSP")
    assert query.startswith(
        "SELECT DISTINCT sequenceNumber AS sector FROM dbo.caomobservation JOIN ivoa.obscore"
    )
    assert "obs_collection = 'HLSP'" in query and "caomartifact" not in query
    assert "(access_url LIKE '%lc.fits' OR access_url LIKE '%tp.fits')" in query
    assert "ORDER BY" not in query
