"""ADQL text builders: the MAST notebook's two queries, generalised, and keyset paging.

Pure functions; the same text is sent to MAST and to the local archive. Every value put into a query
goes through `adql_number`/`adql_string`, because obs_ids, footprints and target names come from the
archive or the user and are untrusted.

MAST keeps one CAOM observation per FFI *exposure* (about 1,300 per sector/camera/CCD at a 30-minute
cadence, up to about 10,000 at 200 s). So the footprint is found in two small steps that cannot
overflow: `exposures_query` lists one CCD's exposure obs_ids (short rows, keyset-paged), the planner
chooses among them in Python, and `regions_query` fetches only the chosen exposures' `s_region`.
ADQL (TAP 1.0) has TOP and ORDER BY but no OFFSET, so "the middle row" cannot be asked for directly.
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

    Kept as the notebook wrote it, for reference and for users who rerun it. The planner does not use
    it: with one observation per exposure, `TOP 1` without a deterministic choice picks an arbitrary
    exposure, and without `TOP` it returns every exposure (see `exposures_query`).
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


def exposures_query(sector: int, camera: int, ccd: int, *, after: str | None = None) -> str:
    """The obs_ids of every FFI exposure of one sector/camera/CCD, in obs_id order (keyset-paged).

    Only `dbo.caomobservation` is read: short rows, no join, and no row per product.
    """
    pattern = adql_string(observation_pattern(sector, camera, ccd))
    where = [
        "collection = 'TESS'",
        "trgType = 'FIELD'",
        f"sequenceNumber = {adql_int(sector)}",
        f"observationID LIKE {pattern}",
    ]
    if after is not None:
        where.append(f"observationID > {adql_string(after)}")
    return f"SELECT observationID FROM {OBSERVATION} WHERE {' AND '.join(where)} ORDER BY observationID"


def regions_query(obs_ids: Sequence[str]) -> str:
    """The `s_region` of the given observations (ObsCore may hold one row per product of each)."""
    if not obs_ids:
        raise ValueError("regions_query needs at least one obs_id")
    listed = ", ".join(adql_string(o) for o in obs_ids)
    return f"SELECT obs_id, s_region FROM {OBSCORE} WHERE obs_id IN ({listed}) ORDER BY obs_id"


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

    Without `artifacts` it is the notebook's ObsCore query (one access_url per ObsCore row). With
    `artifacts` it also joins the CAOM plane and artifact tables, one row per (file, ObsCore row), with
    exact size and checksum; the planner keeps, for each file, only a URL that names that file.
    `after` continues a keyset page: rows strictly after (or at) the previous page's last key.
    """
    where = _scope_where(
        region=region,
        targets=targets,
        sectors=sectors,
        collection=collection,
        products=products,
        artifacts=artifacts,
    )
    return _select(where, artifacts=artifacts, after=after)


def ffi_files_query(
    sector: int,
    camera: int,
    ccd: int,
    *,
    products: Sequence[str] = ("ffic",),
    artifacts: bool = False,
    after: Keyset | None = None,
) -> str:
    """The FFI files (`_ffic.fits`, `_ffir.fits`) of every exposure of one sector/camera/CCD.

    With `artifacts` the files come from `dbo.caomartifact` (exact sizes and md5s), else from the
    exposures' ObsCore rows. Same columns and keyset order as `inventory_query`.
    """
    wrong = [p for p in products if p not in ("ffic", "ffir")]
    if wrong or not products:
        raise ValueError(f"ffi_files_query plans ffic/ffir only, not {wrong or 'nothing'}")
    where = [
        "obs_collection = 'TESS'",
        "trgType = 'FIELD'",
        f"sequenceNumber = {adql_int(sector)}",
        f"observationID LIKE {adql_string(observation_pattern(sector, camera, ccd))}",
        _products_where(products, artifacts=artifacts),
    ]
    return _select(where, artifacts=artifacts, after=after)


def sectors_query(
    *,
    region: Region | None = None,
    targets: Sequence[str] | None = None,
    sectors: Sequence[int] | None = None,
    products: Sequence[str] = ("lc",),
    collection: str = "TESS",
) -> str:
    """The sectors an (ObsCore-only) inventory would cover: how a join that timed out is split."""
    where = _scope_where(
        region=region,
        targets=targets,
        sectors=sectors,
        collection=collection,
        products=products,
        artifacts=False,
    )
    # No ORDER BY: with DISTINCT some services accept only selected names there; the caller sorts.
    return f"SELECT DISTINCT sequenceNumber AS sector FROM {_OBS_JOIN} WHERE {' AND '.join(where)}"


def _scope_where(
    *,
    region: Region | None,
    targets: Sequence[str] | None,
    sectors: Sequence[int] | None,
    collection: str,
    products: Sequence[str],
    artifacts: bool,
) -> list[str]:
    if (region is None) == (targets is None):
        raise ValueError("give exactly one of region or targets")
    where = [
        f"obs_collection = {adql_string(collection)}",
        "dataproduct_type = 'timeseries'",
        _products_where(products, artifacts=artifacts),
    ]
    if sectors:
        where.append(f"sequenceNumber IN ({', '.join(adql_int(s) for s in sectors)})")
    if region is not None:
        where.append(f"CONTAINS(POINT('ICRS', s_ra, s_dec), {region.adql()}) = 1")
    else:
        assert targets is not None
        if not targets:
            raise ValueError("targets is empty")
        where.append(f"target_name IN ({', '.join(adql_string(t) for t in targets)})")
    return where


def _products_where(products: Sequence[str], *, artifacts: bool) -> str:
    unknown = [p for p in products if p not in PRODUCT_SUFFIXES]
    if unknown or not products:
        raise ValueError(f"unknown product types {unknown}; known: {', '.join(PRODUCT_SUFFIXES)}")
    # One LIKE per product suffix; '_' is a LIKE wildcard, so drop the suffix's leading '_' and let the
    # planner check the exact suffix of each file name. '%lc.fits' also matches QLP's '_llc.fits'.
    column = f"{ARTIFACT}.productFileName" if artifacts else "access_url"
    likes = [f"{column} LIKE {adql_string('%' + _like_suffix(p))}" for p in products]
    return likes[0] if len(likes) == 1 else "(" + " OR ".join(likes) + ")"


def _select(where: list[str], *, artifacts: bool, after: Keyset | None) -> str:
    if after is not None:
        where = [*where, _keyset_condition(after, artifacts=artifacts)]
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
