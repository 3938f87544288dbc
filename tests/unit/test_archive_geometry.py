"""Spherical containment: great-circle edges, RA wrap, either winding, circles."""

from __future__ import annotations

import numpy as np
import pytest

from engine.archive.geometry import (
    SphericalPolygon,
    angular_distance,
    circle_contains,
    parse_stc_polygon,
    polygon_contains,
)

SECTOR1_CCD = (
    "POLYGON 330.343765 -44.336318 324.663797 -33.277719 337.720578 -28.384567 344.128621 -38.561643 "
    "330.343765 -44.336318"
)


def test_parse_stc_polygon_drops_closing_vertex_and_frame() -> None:
    vertices = parse_stc_polygon(SECTOR1_CCD)
    assert vertices[0] == (330.343765, -44.336318) and len(vertices) == 4
    assert parse_stc_polygon("POLYGON ICRS 1 2 3 4 5 6") == [(1, 2), (3, 4), (5, 6)]
    with pytest.raises(ValueError, match="odd number"):
        parse_stc_polygon("POLYGON 1 2 3")
    with pytest.raises(ValueError, match="not an STC-S polygon"):
        parse_stc_polygon("CIRCLE 1 2 3")


def test_great_circle_edge_bulges_poleward_where_a_flat_test_is_wrong() -> None:
    # The edge (0, 60) -> (90, 60) is a great circle: at RA 45 it reaches dec ~67.8, so (45, 65) lies
    # outside the polygon although a flat RA/Dec test puts it inside (60 < 65 < 80).
    square = [(0, 60), (90, 60), (90, 80), (0, 80)]
    assert list(polygon_contains([45, 45, 45], [65, 70, 60.5], square)) == [False, True, False]


def test_ra_wrap_and_either_winding() -> None:
    across_zero = [(359, -1), (1, -1), (1, 1), (359, 1)]
    ra = [0, 0.5, 359.5, 2, 180]
    dec = [0, 0, 0.5, 0, 0]
    assert list(polygon_contains(ra, dec, across_zero)) == [True, True, True, False, False]
    assert list(polygon_contains(ra, dec, across_zero[::-1])) == [True, True, True, False, False]


def test_scalar_and_vector_tests_agree_on_the_sector_footprint() -> None:
    vertices = parse_stc_polygon(SECTOR1_CCD)
    rng = np.random.default_rng(5)
    ra, dec = rng.uniform(315, 355, 2000), rng.uniform(-50, -20, 2000)
    vector = polygon_contains(ra, dec, vertices)
    polygon = SphericalPolygon.from_radec(vertices)
    assert [polygon.contains_one(r, d) for r, d in zip(ra, dec, strict=True)] == list(vector)
    assert 100 < vector.sum() < 1900
    assert polygon_contains(334.0, -36.5, vertices)[0] and not polygon_contains(154.0, 36.5, vertices)[0]


def test_polygon_larger_than_a_hemisphere_is_refused() -> None:
    with pytest.raises(ValueError, match="hemisphere"):
        SphericalPolygon.from_radec([(0, 0), (120, 0), (240, 0)])


def test_circle_contains_uses_great_circle_distance() -> None:
    # At dec 80 one degree of RA is ~0.17 degrees on the sky.
    assert list(circle_contains([5, 0, 0], [80, 80, 81.5], 0, 80, 1.0)) == [True, True, False]
    assert circle_contains(359.9, 0, 0.05, 0, 0.2)[0]
    assert angular_distance(0, 0, 90, 0) == pytest.approx(90)
