"""Real TESS CCD footprints on the sky, from the spacecraft pointing in the `tess-point` package.

MAST's `s_region` for an FFI observation is the CCD's *full* frame: 2136 x 2078 pixels including
the 44 leading and 44 trailing non-science columns and the rows above the science area. tess-point
works in "CCD pixels" whose origin is the first *science* pixel, so the frame's outer pixel edges are
at x = -44.5 .. 2091.5 and y = -0.5 .. 2077.5. Projected with tess-point these land within about
25 arcsec of MAST's polygons (checked against sector 1, camera 1, CCD 2 in the tests).

Footprints are cached per sector in-process (`lru_cache`): one sector's 16 CCDs take milliseconds.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from functools import lru_cache

Vertex = tuple[float, float]
CcdKey = tuple[int, int, int]  # (sector, camera, ccd)

FFI_COLUMNS = 2136  # full FFI width, collateral columns included
FFI_ROWS = 2078
LEADING_COLUMNS = 44  # non-science columns before the first science column
CAMERAS = (1, 2, 3, 4)
CCDS = (1, 2, 3, 4)

# Pixel-edge corners of the full frame in tess-point's CCD pixel coordinates, in the order MAST lists
# the polygon: (x0, y0), (x0, y1), (x1, y1), (x1, y0).
_X0, _X1 = -LEADING_COLUMNS - 0.5, FFI_COLUMNS - LEADING_COLUMNS - 0.5
_Y0, _Y1 = -0.5, FFI_ROWS - 0.5
_CORNERS: tuple[Vertex, ...] = ((_X0, _Y0), (_X0, _Y1), (_X1, _Y1), (_X1, _Y0))

# The real 2-min light-curve timestamps and spacecraft configuration ids of the first year; later
# sectors are extrapolated at 27.4 days a sector (only the names depend on them).
_LC_STAMPS = {
    1: ("2018206045859", 120),
    2: ("2018234235059", 121),
    3: ("2018263035959", 123),
    4: ("2018292075959", 124),
    5: ("2018319095959", 125),
    6: ("2018349182459", 126),
    7: ("2019006130736", 131),
    8: ("2019032160000", 136),
    9: ("2019058134432", 139),
    10: ("2019085135100", 140),
    11: ("2019112060037", 143),
    12: ("2019140104343", 144),
    13: ("2019169103026", 146),
}
# MAST's FFI observation of sector 1 is stamped 2018207052942, this long after the light curves.
_FFI_AFTER_LC = timedelta(days=1, minutes=30, seconds=43)
_STAMP_FORMAT = "%Y%j%H%M%S"


def sector_stamp(sector: int) -> tuple[datetime, int]:
    """The light-curve file timestamp and spacecraft configuration id (scid) of a sector."""
    if sector in _LC_STAMPS:
        stamp, scid = _LC_STAMPS[sector]
        return datetime.strptime(stamp, _STAMP_FORMAT), scid
    start, scid = _LC_STAMPS[13]
    base = datetime.strptime(start, _STAMP_FORMAT)
    return base + timedelta(days=27.4 * (sector - 13)), scid + 2 * (sector - 13)


def lc_stamp(sector: int) -> str:
    return sector_stamp(sector)[0].strftime(_STAMP_FORMAT)


def ffi_cadence_seconds(sector: int) -> int:
    """Seconds between FFI exposures: 30 min in sectors 1-26, 10 min in 27-55, 200 s after."""
    if sector <= 26:
        return 1800
    if sector <= 55:
        return 600
    return 200


def ffi_time(sector: int, exposure: int = 0) -> datetime:
    """Start of FFI exposure `exposure` (0-based) of a sector: the first, then one cadence apart."""
    when, _scid = sector_stamp(sector)
    return when + _FFI_AFTER_LC + timedelta(seconds=exposure * ffi_cadence_seconds(sector))


def ffi_obs_id(sector: int, camera: int, ccd: int, exposure: int = 0) -> str:
    """MAST's FFI observation id, e.g. `tess2018207052942-s0001-1-2-0120-s` (exposure 0 of sector 1)."""
    _when, scid = sector_stamp(sector)
    stamp = ffi_time(sector, exposure).strftime(_STAMP_FORMAT)
    return f"tess{stamp}-s{sector:04d}-{camera}-{ccd}-{scid:04d}-s"


def known_sectors() -> set[int]:
    from tess_stars2px import TESS_Spacecraft_Pointing_Data

    return {int(s) for s in TESS_Spacecraft_Pointing_Data.sectors}


@lru_cache(maxsize=256)
def _sector_footprints(sector: int) -> dict[CcdKey, tuple[Vertex, ...]]:
    from tess_stars2px import TESS_Spacecraft_Pointing_Data

    if sector not in known_sectors():
        raise ValueError(
            f"sector {sector} has no pointing in tess-point; use sectors between 1 and {max(known_sectors())}"
        )
    # tess-point prints (and would sys.exit) on problems; keep its chatter off our stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        pointing = TESS_Spacecraft_Pointing_Data(trySector=sector)
    fpg = pointing.fpgObjs[0]
    result: dict[CcdKey, tuple[Vertex, ...]] = {}
    for camera in CAMERAS:
        for ccd in CCDS:
            corners = []
            for x, y in _CORNERS:
                ra, dec = fpg.pix2radec_nocheck_single(camera - 1, ccd - 1, [x, y])
                corners.append((round(float(ra) % 360.0, 6), round(float(dec), 6)))
            result[(sector, camera, ccd)] = tuple(corners)
    return result


def ccd_footprint(sector: int, camera: int, ccd: int) -> tuple[Vertex, ...]:
    """The 4 corners (ra, dec in degrees) of one CCD's full frame, in MAST's order (not closed)."""
    if camera not in CAMERAS or ccd not in CCDS:
        raise ValueError(f"camera {camera} / ccd {ccd} out of range; both must be 1-4")
    return _sector_footprints(sector)[(sector, camera, ccd)]


def footprints(sectors: Iterable[int]) -> dict[CcdKey, tuple[Vertex, ...]]:
    """Every CCD footprint of the given sectors, keyed by (sector, camera, ccd)."""
    result: dict[CcdKey, tuple[Vertex, ...]] = {}
    for sector in sectors:
        result.update(_sector_footprints(int(sector)))
    return result


def s_region(vertices: Sequence[Vertex]) -> str:
    """MAST's polygon text: `POLYGON ra1 dec1 ... ra1 dec1` (closed, no frame word)."""
    closed = [*vertices, vertices[0]]
    return "POLYGON " + " ".join(f"{ra:.6f} {dec:.6f}" for ra, dec in closed)
