"""Spherical geometry for the local archive's ADQL: points in polygons and circles on the sky.

Polygon edges are great-circle arcs, as ADQL defines them, so a flat RA/Dec test is not good enough
near long edges at high |dec|. All work is done on unit vectors, which makes RA wrap-around (a polygon
crossing RA = 0/360) a non-issue.

Containment uses the winding number of the boundary around the point, measured as the sum of the
azimuth changes of the edges seen from the point. A closed curve inside an open hemisphere winds once
around every point of the region it encloses and zero times around every other point of that
hemisphere. Restricting the test to the polygon's bounding cap therefore selects the *smaller* of the
two regions the boundary defines, whatever the vertex winding order, which is what real services do
for footprints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike

from engine.models import is_number

# Slack on the bounding-cap test, in cosine units (~1e-7 rad), so points on a vertex are not lost.
_CAP_SLACK = 1e-12


def _unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    ra = np.radians(ra_deg)
    dec = np.radians(dec_deg)
    cos_dec = np.cos(dec)
    return np.stack([cos_dec * np.cos(ra), cos_dec * np.sin(ra), np.sin(dec)], axis=-1)


def parse_stc_polygon(text: str) -> list[tuple[float, float]]:
    """Vertices (ra, dec) of an STC-S polygon such as MAST's ``s_region``.

    Accepts ``POLYGON ra1 dec1 ra2 dec2 ...`` with an optional frame word (``POLYGON ICRS ...``). A
    closing vertex equal to the first is dropped.
    """
    words = text.replace(",", " ").split()
    if not words or words[0].upper() != "POLYGON":
        raise ValueError(f"not an STC-S polygon: {text[:80]!r}; expected 'POLYGON ra1 dec1 ra2 dec2 ...'")
    words = words[1:]
    if words and not is_number(words[0]):
        words = words[1:]  # the frame (ICRS, J2000, ...); every frame is taken as ICRS here
    try:
        numbers = [float(word) for word in words]
    except ValueError:
        raise ValueError(f"STC-S polygon has a non-numeric coordinate: {text[:80]!r}") from None
    if len(numbers) % 2:
        raise ValueError(f"STC-S polygon has an odd number of coordinates ({len(numbers)}): {text[:80]!r}")
    return _clean_vertices(list(zip(numbers[0::2], numbers[1::2], strict=True)))


def _clean_vertices(vertices: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Drop consecutive duplicates and the closing vertex; require a real polygon."""
    cleaned: list[tuple[float, float]] = []
    for ra, dec in vertices:
        vertex = (float(ra), float(dec))
        if not -90.0 <= vertex[1] <= 90.0:
            raise ValueError(f"polygon vertex declination {vertex[1]} is outside [-90, 90]")
        if not cleaned or not _same_point(cleaned[-1], vertex):
            cleaned.append(vertex)
    if len(cleaned) > 1 and _same_point(cleaned[0], cleaned[-1]):
        cleaned.pop()
    if len(cleaned) < 3:
        raise ValueError(f"a polygon needs at least 3 distinct vertices, got {len(cleaned)}")
    return cleaned


def _same_point(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[1] == b[1] and ((a[0] - b[0]) % 360.0 == 0.0 or abs(a[1]) == 90.0)


@dataclass(frozen=True)
class SphericalPolygon:
    """A polygon prepared for repeated containment tests."""

    vertices: np.ndarray  # (n, 3) unit vectors
    center: np.ndarray  # (3,) unit vector of the bounding cap
    cap_cos: float  # cosine of the bounding cap's radius

    @classmethod
    def from_radec(cls, vertices: Sequence[tuple[float, float]]) -> SphericalPolygon:
        cleaned = _clean_vertices(vertices)
        vectors = _unit_vectors(np.array([v[0] for v in cleaned]), np.array([v[1] for v in cleaned]))
        center = vectors.sum(axis=0)
        norm = np.linalg.norm(center)
        cap_cos = float(np.min(vectors @ (center / norm))) if norm > 1e-9 else -1.0
        # The winding test is only unambiguous for a boundary inside an open hemisphere.
        if norm <= 1e-9 or cap_cos <= 1e-9:
            raise ValueError(
                f"polygon {cleaned} does not fit in a hemisphere; split it into smaller polygons"
            )
        return cls(vectors, center / norm, cap_cos)

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Bool per unit vector in ``points`` (shape (m, 3))."""
        inside = points @ self.center >= self.cap_cos - _CAP_SLACK
        candidates = points[inside]
        if len(candidates):
            inside[inside] = np.abs(self._winding(candidates)) > math.pi
        return inside

    def _winding(self, points: np.ndarray) -> np.ndarray:
        """Total azimuth swept by the boundary as seen from each point (±2π inside, 0 outside)."""
        total = np.zeros(len(points))
        n = len(self.vertices)
        for i in range(n):
            a = self.vertices[i]
            b = self.vertices[(i + 1) % n]
            # Angle between the projections of a and b on the tangent plane at each point.
            sin_part = points @ np.cross(a, b)
            cos_part = float(a @ b) - (points @ a) * (points @ b)
            total += np.arctan2(sin_part, cos_part)
        return total

    def contains_one(self, ra_deg: float, dec_deg: float) -> bool:
        """Scalar version of `contains`, cheap enough to call once per SQLite row."""
        ra = math.radians(ra_deg)
        dec = math.radians(dec_deg)
        cos_dec = math.cos(dec)
        x, y, z = cos_dec * math.cos(ra), cos_dec * math.sin(ra), math.sin(dec)
        cx, cy, cz = self.center
        if x * cx + y * cy + z * cz < self.cap_cos - _CAP_SLACK:
            return False  # most rows of an all-sky table end here
        # Plain floats: numpy's per-call overhead would dominate for one point.
        total = 0.0
        for (ax, ay, az), (bx, by, bz), (nx, ny, nz), ab in self._edges:
            pa = x * ax + y * ay + z * az
            pb = x * bx + y * by + z * bz
            total += math.atan2(x * nx + y * ny + z * nz, ab - pa * pb)
        return abs(total) > math.pi

    @property
    def _edges(self) -> list[tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...], float]]:
        edges = self.__dict__.get("_edge_cache")
        if edges is None:
            n = len(self.vertices)
            edges = []
            for i in range(n):
                a, b = self.vertices[i], self.vertices[(i + 1) % n]
                edges.append(
                    (
                        tuple(map(float, a)),
                        tuple(map(float, b)),
                        tuple(map(float, np.cross(a, b))),
                        float(a @ b),
                    )
                )
            object.__setattr__(self, "_edge_cache", edges)  # frozen dataclass: cache by hand
        return edges


@lru_cache(maxsize=256)
def prepared_polygon(vertices: tuple[tuple[float, float], ...]) -> SphericalPolygon:
    """A cached `SphericalPolygon`; the same footprint is tested against every row of a query."""
    return SphericalPolygon.from_radec(vertices)


def polygon_contains(ra: ArrayLike, dec: ArrayLike, vertices: Sequence[tuple[float, float]]) -> np.ndarray:
    """Bool per point: is (ra, dec) inside the spherical polygon (the smaller region it bounds)?"""
    ra_arr = np.atleast_1d(np.asarray(ra, dtype=float))
    dec_arr = np.atleast_1d(np.asarray(dec, dtype=float))
    polygon = prepared_polygon(tuple((float(r), float(d)) for r, d in vertices))
    return polygon.contains(_unit_vectors(ra_arr, dec_arr).reshape(-1, 3)).reshape(
        np.broadcast_shapes(ra_arr.shape, dec_arr.shape)
    )


def circle_contains(ra: ArrayLike, dec: ArrayLike, ra0: float, dec0: float, radius_deg: float) -> np.ndarray:
    """Bool per point: is (ra, dec) within `radius_deg` (great-circle distance) of (ra0, dec0)?"""
    if not radius_deg >= 0:
        raise ValueError(f"circle radius must be >= 0 degrees, got {radius_deg}")
    return np.atleast_1d(angular_distance(ra, dec, ra0, dec0) <= radius_deg)


def angular_distance(ra1: ArrayLike, dec1: ArrayLike, ra2: ArrayLike, dec2: ArrayLike) -> np.ndarray:
    """Great-circle distance in degrees (haversine, accurate at small separations)."""
    a1, d1, a2, d2 = (np.radians(np.asarray(v, dtype=float)) for v in (ra1, dec1, ra2, dec2))
    hav = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((a2 - a1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(hav, 0.0, 1.0))))


def angular_distance_one(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    """Scalar `angular_distance`, for per-row SQLite calls."""
    ra1, dec1, ra2, dec2 = map(math.radians, (ra1, dec1, ra2, dec2))
    hav = math.sin((dec2 - dec1) / 2) ** 2 + math.cos(dec1) * math.cos(dec2) * math.sin((ra2 - ra1) / 2) ** 2
    return math.degrees(2 * math.asin(math.sqrt(min(1.0, max(0.0, hav)))))
