"""ADQL text builders: the MAST notebook's two queries, generalised, and keyset paging.

Pure functions; the same text is sent to MAST and to the local archive. Every value put into a query
goes through `adql_number`/`adql_string`, because obs_ids, footprints and target names come from the
archive or the user and are untrusted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from engine.settings import PRODUCT_SUFFIXES

OBSERVATION = "dbo.caomobservation"
OBSCORE = "ivoa.obscore"
PLANE = "dbo.caomplane"
ARTIFACT = "dbo.caomartifact"
# The notebook's join of the CAOM observation table (sector) with ObsCore (positions, URLs).
_OBS_JOIN = f"{OBSERVATION} JOIN {OBSCORE} ON {OBSERVATION}.observationID = {OBSCORE}.obs_id"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def adql_string(value: str) -> str:
    """A quoted ADQL string literal: single quotes doubled; control characters refused."""
    text = str(value)
    if _CONTROL.search(text):
        raise ValueError(f"refusing to put a control character into ADQL: {text!r}")
    return "'" + text.replace("'", "''") + "'"


def adql_number(value: float) -> str:
    """A finite number as an ADQL literal, at full precision and never in exponent form."""
    if isinstance(value, bool):
        raise ValueError(f"refusing to put {value!r} into ADQL: not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"refusing to put {value!r} into ADQL: not a finite number")
    if isinstance(value, int):
        return str(value)
    text = repr(number)  # the shortest text that reads back as the same float
    return format(Decimal(text), "f") if "e" in text else text


def adql_int(value: int) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"refusing to put {value!r} into ADQL: not an integer")
    return str(value)


@dataclass(frozen=True, slots=True)
class Region:
    """A sky region for CONTAINS: a polygon (ra1, dec1, ra2, dec2, ...) or a circle (ra, dec, radius)."""

    shape: str  # "POLYGON" or "CIRCLE"
    values: tuple[float, ...]

    @classmethod
    def polygon(cls, vertices: Sequence[float]) -> Region:
        if len(vertices) < 6 or len(vertices) % 2:
            raise ValueError(f"a polygon needs >= 3 ra/dec pairs, got {len(vertices)} numbers")
        return cls("POLYGON", tuple(float(v) for v in vertices))

    @classmethod
    def circle(cls, ra: float, dec: float, radius: float) -> Region:
        return cls("CIRCLE", (float(ra), float(dec), float(radius)))

    def adql(self) -> str:
        return f"{self.shape}('ICRS', {', '.join(adql_number(v) for v in self.values)})"

    def describe(self) -> str:
        return f"{self.shape.lower()} {' '.join(adql_number(v) for v in self.values)}"


def observation_pattern(sector: int, camera: int, ccd: int) -> str:
    """The notebook's observationID wildcard for one FFI: 'tess%-s0001-1-2-%-s'."""
    for name, number, high in (("sector", sector, 9999), ("camera", camera, 4), ("ccd", ccd, 4)):
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= high:
            raise ValueError(f"{name} {number!r} is outside 1..{high}")
    return f"tess%-s{sector:04}-{camera}-{ccd}-%-s"


def footprint_query(sector: int, detectors: Sequence[tuple[int, int]], *, collection: str = "TESS") -> str:
    """The notebook's first query: obs_id and s_region of the FFI observation(s) of `sector`.

    One (camera, ccd) gives the notebook's `TOP 1` query. Several are fetched in one query (no TOP):
    the caller keeps one row per (camera, ccd), read back from the obs_id.
    """
    if not detectors:
        raise ValueError("footprint_query needs at least one (camera, ccd)")
    patterns = [adql_string(observation_pattern(sector, cam, ccd)) for cam, ccd in detectors]
    top = "TOP 1 " if len(patterns) == 1 else ""
    if len(patterns) == 1:
        like = f"observationID LIKE {patterns[0]}"
    else:
        like = "(" + " OR ".join(f"observationID LIKE {p}" for p in patterns) + ")"
    return (
        f"SELECT {top}obs_id, s_region FROM {_OBS_JOIN} "
        f"WHERE collection = {adql_string(collection)} AND trgType = 'FIELD' "
        f"AND sequenceNumber = {adql_int(sector)} AND {like} ORDER BY obs_id"
    )


@dataclass(frozen=True, slots=True)
class Keyset:
    """Where the next page starts: after (or, `inclusive`, at) the key (obs_id, file name).

    The file name is "" when the artifact tables are not joined.
    """

    obs_id: str
    filename: str = ""
    inclusive: bool = False


def inventory_query(
    *,
    region: Region | None = None,
    targets: Sequence[str] | None = None,
    sectors: Sequence[int] | None = None,
    products: Sequence[str] = ("lc",),
    collection: str = "TESS",
    artifacts: bool = False,
    after: Keyset | None = None,
) -> str:
    """The notebook's second query: the products inside `region` (or of `targets`), in obs_id order.

    Without `artifacts` it is the notebook's ObsCore query (one access_url per observation). With
    `artifacts` it also joins the CAOM plane and artifact tables, one row per file, with exact size and
    checksum. `after` continues a keyset page: rows strictly after the previous page's last row.
    """
    if (region is None) == (targets is None):
        raise ValueError("give exactly one of region or targets")
    unknown = [p for p in products if p not in PRODUCT_SUFFIXES]
    if unknown or not products:
        raise ValueError(f"unknown product types {unknown}; known: {', '.join(PRODUCT_SUFFIXES)}")
    where = [
        f"obs_collection = {adql_string(collection)}",
        "dataproduct_type = 'timeseries'",
    ]
    if artifacts:
        # One LIKE per product suffix; '_' is a LIKE wildcard, so drop the suffix's leading '_' and
        # let the planner check the exact suffix of each file name.
        likes = [f"{ARTIFACT}.productFileName LIKE {adql_string('%' + _like_suffix(p))}" for p in products]
    else:
        likes = [f"access_url LIKE {adql_string('%' + _like_suffix(p))}" for p in products]
    where.append(likes[0] if len(likes) == 1 else "(" + " OR ".join(likes) + ")")
    if sectors:
        where.append(f"sequenceNumber IN ({', '.join(adql_int(s) for s in sectors)})")
    if region is not None:
        where.append(f"CONTAINS(POINT('ICRS', s_ra, s_dec), {region.adql()}) = 1")
    else:
        assert targets is not None
        if not targets:
            raise ValueError("targets is empty")
        where.append(f"target_name IN ({', '.join(adql_string(t) for t in targets)})")
    if after is not None:
        where.append(_keyset_condition(after, artifacts=artifacts))
    columns = "target_name, sequenceNumber AS sector, s_ra, s_dec, access_url, access_estsize, obs_id"
    source = _OBS_JOIN
    order = "obs_id"
    if artifacts:
        columns += (
            f", {ARTIFACT}.productFileName, {ARTIFACT}.dataURI,"
            f" {ARTIFACT}.contentLength, {ARTIFACT}.contentChecksum"
        )
        source += (
            f" JOIN {PLANE} ON {PLANE}.observationTID = {OBSERVATION}.observationTID"
            f" JOIN {ARTIFACT} ON {ARTIFACT}.planeTID = {PLANE}.planeTID"
        )
        order = f"obs_id, {ARTIFACT}.productFileName"
    return f"SELECT {columns} FROM {source} WHERE {' AND '.join(where)} ORDER BY {order}"


def _like_suffix(product: str) -> str:
    return PRODUCT_SUFFIXES[product].lstrip("_")


def _keyset_condition(after: Keyset, *, artifacts: bool) -> str:
    last = adql_string(after.obs_id)
    compare = ">=" if after.inclusive else ">"
    if not artifacts:
        return f"obs_id {compare} {last}"
    # Several artifacts share one obs_id, so a page may end inside an observation: compare the pair
    # (obs_id, file name), in the same order as ORDER BY.
    name = adql_string(after.filename)
    return f"(obs_id > {last} OR (obs_id = {last} AND {ARTIFACT}.productFileName {compare} {name}))"


def columns_query(table: str) -> str:
    """TAP_SCHEMA lookup of a table's column names (table names as the service spells them)."""
    return f"SELECT column_name FROM TAP_SCHEMA.columns WHERE table_name = {adql_string(table)}"
