"""Catalogue options: focus (all targets in one footprint), hostile_names, and the artifact-less database."""

from __future__ import annotations

from urllib.parse import unquote

import numpy as np
import pytest

from engine.archive.catalog import HOSTILE_NAMES, HOSTILE_OBS_IDS, TESS_URI_PREFIX, build_catalog
from engine.archive.geometry import polygon_contains
from engine.archive.server import load_database


def _light_curves(catalog):
    return [f for f in catalog.values() if f.product == "lc" and f.collection == "TESS"]


def test_focus_puts_every_target_in_that_footprint():
    catalog = build_catalog(sectors=(1, 28), targets=60, cadences=50, seed=5, focus=(1, 1, 2))
    curves = _light_curves(catalog)
    targets = {(f.identity.tic, f.identity.ra, f.identity.dec) for f in curves}
    assert len(targets) == 60
    ra = np.array([t[1] for t in targets])
    dec = np.array([t[2] for t in targets])
    assert polygon_contains(ra, dec, catalog.footprints[(1, 1, 2)]).all()
    assert all(f.identity.camera == 1 and f.identity.ccd == 2 for f in curves if f.identity.sector == 1)
    # Sector 28 looked at the same sky: targets seen there keep their light curves in it.
    assert {f.identity.sector for f in curves} == {1, 28}


def test_focus_outside_the_sectors_is_refused_by_name():
    with pytest.raises(ValueError, match=r"focus \(2, 1, 2\)"):
        build_catalog(sectors=(1,), targets=4, cadences=50, focus=(2, 1, 2))


def test_hostile_names_are_declared_consistently():
    catalog = build_catalog(sectors=(1,), targets=8, cadences=50, seed=2, hostile_names=True)
    artifacts = catalog.tables["dbo.caomartifact"]
    declared = dict(zip(artifacts.column("productFileName"), artifacts.column("contentLength"), strict=True))
    vertices = catalog.footprints[(1, 1, 2)]
    for name in HOSTILE_NAMES:
        entry = catalog[name]
        assert entry.uri == TESS_URI_PREFIX + name and declared[name] == entry.size
        assert entry.identity.name != name and "/" not in entry.identity.name  # stored under a plain name
        assert catalog.lookup_uri(entry.uri) is entry
        assert catalog.lookup_uri(unquote(entry.uri)) is entry  # as the server receives it
        assert polygon_contains([entry.identity.ra], [entry.identity.dec], vertices)[0]
    assert catalog.lookup_uri(TESS_URI_PREFIX + "bad\x00name_lc.fits") is catalog["bad%00name_lc.fits"]
    assert len(max(HOSTILE_NAMES, key=len)) == 300
    assert {f.obs_id for f in catalog.values()} >= set(HOSTILE_OBS_IDS)
    # The ordinary catalogue is the same with or without them.
    plain = build_catalog(sectors=(1,), targets=8, cadences=50, seed=2)
    extra = set(catalog) - set(plain)
    assert {catalog[n].md5 for n in plain} == {plain[n].md5 for n in plain}
    assert len(extra) == len(HOSTILE_NAMES) + len(HOSTILE_OBS_IDS)


def test_database_without_artifact_tables():
    catalog = build_catalog(sectors=(1,), targets=4, cadences=50)
    tables = {f"{t.schema}.{t.name}".lower() for t in load_database(catalog, artifacts=False).tables()}
    assert "ivoa.obscore" in tables and "dbo.caomobservation" in tables
    assert not tables & {"dbo.caomplane", "dbo.caomartifact"}
    full = {f"{t.schema}.{t.name}".lower() for t in load_database(catalog).tables()}
    assert {"dbo.caomplane", "dbo.caomartifact"} <= full
