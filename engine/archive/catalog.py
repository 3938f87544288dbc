"""The local archive's truth: FFI footprints, TIC targets, their products, and MAST-shaped tables.

Everything is a pure function of (sectors, targets, cadences, seed, base_url). Targets are spread
evenly over the CCD footprints of the sector range and placed uniformly inside them; each target then
gets a 2-minute observation in *every* sector where some CCD footprint contains it, so targets in
overlaps have several sectors, as on MAST. About one (target, sector) in ten also gets a QLP
High-Level Science Product (collection 'HLSP', file ending `_llc.fits`).

The real service's shapes are set by `Shape` (from `ArchiveOptions`; docs/MAST_MODEL.md): FFI
observations per exposure (`Catalog.exposures`, jittered polygons around the middle exposure, which
is the footprint targets are placed in), FFI files (`ffigen`), ObsCore rows per product, URL forms
(`ArchiveFile.path`), NULL checksums and lengths. `Catalog.files_inside` counts the truth for any
polygon.

Each table carries every column MAST's has (the lists are in `engine.archive.columns`, as MAST spells
them); the ones not modelled here are NULL. Sizes come from `fitsgen.file_size` (arithmetic) and md5s
from `fitsgen.digest` (no FITS encoding; see that module for the cost), hashed in a small thread pool
once all rows exist.
Measured on 2 shared cores: 212,000 rows (78,000 small files) in ~11 s; the default (13 sectors,
2,000 targets, full-size files: 72,000 rows) in ~19 s, dominated by md5 over 2 MB light curves.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any
from urllib.parse import quote, unquote

import numpy as np

from engine.archive import ffigen, fitsgen
from engine.archive.columns import (
    CAOMARTIFACT_COLUMNS,
    CAOMOBSERVATION_COLUMNS,
    CAOMPLANE_COLUMNS,
    OBSCORE_COLUMNS,
    column_type,
)

# Re-exported for server.py, which declares them to TAP clients; they live in columns.py.
from engine.archive.footprints import (
    CcdKey,
    Vertex,
    ffi_cadence_seconds,
    ffi_obs_id,
    ffi_time,
    footprints,
    lc_stamp,
    s_region,
    sector_stamp,
)
from engine.archive.geometry import polygon_contains

DOWNLOAD_PATH = "/api/v0.1/Download/file"
FILES_PATH = "/files/"  # plain path URLs: {base}/files/<ArchiveFile.path>
S3_PATH = "/stpubdata/"  # the second host's bucket: {s3 base}/stpubdata/<s3_key(entry)>
URL_FORMS = ("uri", "path")
JITTER_ARCSEC = 5.0  # largest pointing offset of an FFI exposure from the middle one, per axis
MAX_EXPOSURES = 10_000
TESS_URI_PREFIX = "mast:TESS/product/"
HLSP_URI_PREFIX = "mast:HLSP/qlp/"
HLSP_FRACTION = 0.1
MJD_OF_BTJD_ZERO = 57000.0 - 0.5  # BTJD = BJD - 2457000; MJD = JD - 2400000.5


@dataclass(frozen=True, slots=True)
class ArchiveFile:
    """One downloadable file: where it is, what it is, and its exact size and md5."""

    name: str
    uri: str  # e.g. mast:TESS/product/<name>
    product: str  # lc, tp, dvt or llc
    obs_id: str
    collection: str  # TESS or HLSP
    size: int
    md5: str
    identity: fitsgen.FileIdentity
    # Where the file sits in MAST's trees, e.g. `tess/tid/s0001/0000/0000/2515/5310/<name>` or
    # `tess/ffi/s0001/2018/207/1-2/<name>` (the name percent-encoded): the path URL is
    # {base}/files/<path>, the second host's key is `s3_key(path)`.
    path: str = ""


def s3_key(path: str) -> str:
    """The bucket key of an archive path, in MAST's cloud layout (`tess/public/tid/...`)."""
    mission, _, rest = path.partition("/")
    return f"{mission}/public/{rest}" if mission == "tess" else path


@dataclass(frozen=True, slots=True)
class Exposure:
    """One FFI exposure of a CCD: its CAOM observation id, 0-based number, polygon and start time."""

    obs_id: str
    index: int
    vertices: tuple[Vertex, ...]
    stamp: str  # YYYYDDDHHMMSS, as in the obs_id


@dataclass(slots=True)
class CatalogTable:
    """One TAP table: `schema.name`, its columns (name, datatype) and its rows (tuples in that order)."""

    schema: str
    name: str
    columns: tuple[tuple[str, str], ...]
    rows: list[tuple[Any, ...]]

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"

    def column(self, name: str) -> list[Any]:
        index = [c for c, _ in self.columns].index(name)
        return [row[index] for row in self.rows]


@dataclass(slots=True)
class Catalog(Mapping[str, ArchiveFile]):
    """The generated truth; a mapping file name -> ArchiveFile, plus the TAP tables."""

    seed: int
    cadences: int
    sectors: tuple[int, ...]
    footprints: dict[CcdKey, tuple[Vertex, ...]]
    files: dict[str, ArchiveFile]
    tables: dict[str, CatalogTable]
    by_uri: dict[str, ArchiveFile] = field(default_factory=dict)
    # Per CCD, its FFI exposures in obs_id (= time) order. The middle one, `exposures[key][n // 2]`,
    # has exactly the CCD's footprint `footprints[key]`, the polygon targets were placed in.
    exposures: dict[CcdKey, list[Exposure]] = field(default_factory=dict)
    by_path: dict[str, ArchiveFile] = field(default_factory=dict)
    ffi_dims: tuple[int, int] = ffigen.SMALL_DIMS

    def __getitem__(self, name: str) -> ArchiveFile:
        return self.files[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def lookup_uri(self, uri: str) -> ArchiveFile | None:
        return self.by_uri.get(uri)

    def lookup_path(self, path: str) -> ArchiveFile | None:
        """The file at an archive path (`ArchiveFile.path`), percent-encoded or not."""
        return self.by_path.get(path) or self.by_path.get(quote(unquote(path), safe="/"))

    def middle_exposure(self, key: CcdKey) -> Exposure:
        """The exposure whose polygon is the CCD's footprint: number n // 2 of n, in obs_id order."""
        exposures = self.exposures[key]
        return exposures[len(exposures) // 2]

    def files_inside(
        self, vertices: Sequence[Vertex], *, products: Sequence[str] = ("lc",), collection: str = "TESS"
    ) -> list[ArchiveFile]:
        """Files of `products` in `collection` whose target position lies inside the polygon.

        Independent of the TAP service (positions from the files' identities, the same spherical
        test as placement), so a test can count the truth for any footprint, e.g.
        `catalog.files_inside(catalog.middle_exposure((1, 1, 2)).vertices)`.
        """
        chosen = [f for f in self.files.values() if f.product in products and f.collection == collection]
        if not chosen:
            return []
        ra = np.array([f.identity.ra for f in chosen])
        dec = np.array([f.identity.dec for f in chosen])
        inside = polygon_contains(ra, dec, tuple(vertices))
        return [f for f, keep in zip(chosen, inside, strict=True) if keep]

    def render(self, identity: fitsgen.FileIdentity) -> Iterable[bytes]:
        """The bytes of a file, in pieces (FFIs are streamed, never held whole)."""
        if identity.product in ffigen.FFI_PRODUCTS:
            return ffigen.render(identity, dims=self.ffi_dims, seed=self.seed)
        return fitsgen.render(identity, cadences=self.cadences, seed=self.seed)


class _Columns:
    """Column-wise row builder: only modelled columns are filled, the rest become NULL."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.values: dict[str, list[Any]] = {}
        self.count = 0

    def add(self, **values: Any) -> None:
        for key in values:
            if key not in self.values:
                if key not in self.names:
                    raise KeyError(f"no column {key!r} in this table")
                self.values[key] = [None] * self.count
        for key, column in self.values.items():
            column.append(values.get(key))
        self.count += 1

    def rows(self) -> list[tuple[Any, ...]]:
        columns = [self.values.get(name) or repeat(None, self.count) for name in self.names]
        return list(zip(*columns, strict=False))


# -- target placement ------------------------------------------------------------------------------
def _unit(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    ra_r, dec_r = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(dec_r) * np.cos(ra_r), np.cos(dec_r) * np.sin(ra_r), np.sin(dec_r)], axis=-1)


def _cap(vertices: tuple[Vertex, ...]) -> tuple[np.ndarray, float]:
    """Centre unit vector and cos(radius) of a cap that holds the polygon."""
    corners = _unit(np.array([v[0] for v in vertices]), np.array([v[1] for v in vertices]))
    centre = corners.sum(axis=0)
    centre /= np.linalg.norm(centre)
    return centre, float(np.min(corners @ centre))


def _sample_in_polygon(rng: np.random.Generator, vertices: tuple[Vertex, ...], count: int) -> np.ndarray:
    """`count` points (ra, dec) uniform on the sphere inside the polygon (rejection from its cap)."""
    centre, cos_radius = _cap(vertices)
    # An orthonormal frame around the centre, to rotate cap samples onto it.
    helper = np.array([0.0, 0.0, 1.0]) if abs(centre[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    east = np.cross(helper, centre)
    east /= np.linalg.norm(east)
    north = np.cross(centre, east)
    found: list[np.ndarray] = []
    total = 0
    while total < count:
        batch = max(64, int((count - total) * 1.8))
        z = rng.uniform(cos_radius, 1.0, batch)
        phi = rng.uniform(0.0, 2 * np.pi, batch)
        s = np.sqrt(1.0 - z * z)
        vec = np.outer(z, centre) + np.outer(s * np.cos(phi), east) + np.outer(s * np.sin(phi), north)
        ra = np.degrees(np.arctan2(vec[:, 1], vec[:, 0])) % 360.0
        dec = np.degrees(np.arcsin(np.clip(vec[:, 2], -1.0, 1.0)))
        inside = polygon_contains(ra, dec, vertices)
        points = np.column_stack([ra[inside], dec[inside]])
        found.append(points)
        total += len(points)
    return np.concatenate(found)[:count]


@dataclass(frozen=True, slots=True)
class Target:
    tic: int
    ra: float
    dec: float
    tessmag: float


def place_targets(
    fps: Mapping[CcdKey, tuple[Vertex, ...]], targets: int, rng: np.random.Generator
) -> list[Target]:
    """`targets` TIC targets spread evenly over the footprints, uniform inside each."""
    keys = sorted(fps)
    per_ccd = np.full(len(keys), targets // len(keys))
    per_ccd[: targets % len(keys)] += 1
    points = [_sample_in_polygon(rng, fps[key], int(n)) for key, n in zip(keys, per_ccd, strict=True) if n]
    coords = np.concatenate(points) if points else np.zeros((0, 2))
    tics = np.sort(rng.choice(400_000_000, size=len(coords), replace=False)) + 1_000_000
    order = rng.permutation(len(coords))  # TIC ids unrelated to sky position
    mags = rng.uniform(5.0, 13.5, len(coords))
    return [
        Target(int(tics[i]), round(float(coords[j, 0]), 6), round(float(coords[j, 1]), 6), float(mags[i]))
        for i, j in enumerate(order)
    ]


def target_sectors(
    fps: Mapping[CcdKey, tuple[Vertex, ...]], ras: np.ndarray, decs: np.ndarray
) -> dict[int, list[tuple[int, int, int]]]:
    """For each target index, the (sector, camera, ccd) it is seen on: one CCD per sector at most."""
    vectors = _unit(ras, decs)
    seen: dict[tuple[int, int], tuple[int, int, int]] = {}
    for key in sorted(fps):
        centre, cos_radius = _cap(fps[key])
        near = np.nonzero(vectors @ centre >= cos_radius - 1e-9)[0]  # cheap prefilter
        if not len(near):
            continue
        inside = near[polygon_contains(ras[near], decs[near], fps[key])]
        for index in inside.tolist():
            seen.setdefault((index, key[0]), key)
    result: dict[int, list[tuple[int, int, int]]] = {}
    for (index, _sector), key in sorted(seen.items()):
        result.setdefault(index, []).append(key)
    return result


# -- the catalogue ----------------------------------------------------------------------------------
def lc_obs_id(sector: int, tic: int) -> str:
    _when, scid = sector_stamp(sector)
    return f"tess{lc_stamp(sector)}-s{sector:04d}-{tic:016d}-{scid:04d}-s"


def dvt_name(sector: int, tic: int) -> str:
    return f"tess{lc_stamp(sector)}-s{sector:04d}-s{sector:04d}-{tic:016d}-{100 + sector:05d}_dvt.fits"


def hlsp_obs_id(sector: int, tic: int) -> str:
    return f"hlsp_qlp_tess_ffi_s{sector:04d}-{tic:016d}_tess_v01_llc"


def download_url(base_url: str, uri: str) -> str:
    return f"{base_url}{DOWNLOAD_PATH}?uri={uri}"


def _small_region(ra: float, dec: float, half: float = 0.032) -> str:
    """A target's aperture (about 11 pixels square) as a closed MAST polygon."""
    scale = half / max(np.cos(np.radians(dec)), 1e-3)
    corners = [
        (ra - scale, dec - half),
        (ra - scale, dec + half),
        (ra + scale, dec + half),
        (ra + scale, dec - half),
    ]
    return s_region([((r % 360.0), max(-90.0, min(90.0, d))) for r, d in corners])


def tid_path(sector: int, tic: int, name: str) -> str:
    """MAST's tree for light curves and pixel files: `tess/tid/s0001/0000/0000/2515/5310/<name>`."""
    digits = f"{tic:016d}"
    parts = "/".join(digits[i : i + 4] for i in range(0, 16, 4))
    return f"tess/tid/s{sector:04d}/{parts}/{quote(name, safe='')}"


def ffi_path(sector: int, camera: int, ccd: int, stamp: str, name: str) -> str:
    """MAST's tree for FFIs: `tess/ffi/s0001/2018/207/1-2/<name>` (year and day of the exposure)."""
    return f"tess/ffi/s{sector:04d}/{stamp[:4]}/{stamp[4:7]}/{camera}-{ccd}/{quote(name, safe='')}"


def hlsp_path(sector: int, tic: int, name: str) -> str:
    digits = f"{tic:016d}"
    parts = "/".join(digits[i : i + 4] for i in range(0, 16, 4))
    return f"hlsp/qlp/s{sector:04d}/{parts}/{quote(name, safe='')}"


def draw(seed: int, kind: str, name: str) -> float:
    """A uniform 0..1 value fixed by (seed, kind, name): the archive's deterministic coin."""
    text = f"{seed}\0{kind}\0{name}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") / 2**64


def jitter(seed: int, key: CcdKey, count: int) -> np.ndarray:
    """Pointing offsets (arcsec, ra*cos(dec) and dec) of `count` exposures; zero for number count // 2."""
    rng = np.random.default_rng([seed, *key, 3571])
    offsets = rng.uniform(-JITTER_ARCSEC, JITTER_ARCSEC, (count, 2))
    offsets[count // 2] = 0.0
    return offsets


def _shift(vertices: tuple[Vertex, ...], offset: np.ndarray) -> tuple[Vertex, ...]:
    if not offset.any():
        return vertices
    shifted = []
    for ra, dec in vertices:
        d_ra = offset[0] / 3600.0 / max(np.cos(np.radians(dec)), 1e-3)
        new_dec = max(-90.0, min(90.0, dec + offset[1] / 3600.0))
        shifted.append((round(float((ra + d_ra) % 360.0), 6), round(float(new_dec), 6)))
    return tuple(shifted)


@dataclass(frozen=True)
class Shape:
    """How the catalogue's rows are shaped (the ArchiveOptions knobs that change the tables)."""

    exposures_per_ccd: int = 1
    ffi_files: bool = False
    ffi_dims: tuple[int, int] = ffigen.SMALL_DIMS
    obscore_per_product: bool = False
    url_form: str = "uri"
    null_checksum_fraction: float = 0.0
    null_length_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.exposures_per_ccd <= MAX_EXPOSURES:
            raise ValueError(
                f"exposures_per_ccd {self.exposures_per_ccd} is out of range; use 1-{MAX_EXPOSURES}"
            )
        if self.url_form not in URL_FORMS:
            raise ValueError(f"url_form {self.url_form!r} is not valid; use one of {', '.join(URL_FORMS)}")
        for name in ("null_checksum_fraction", "null_length_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} {getattr(self, name)} is not a fraction; use 0 to 1")


class _Builder:
    def __init__(self, *, seed: int, cadences: int, base_url: str, shape: Shape | None = None) -> None:
        self.seed, self.cadences, self.base_url = seed, cadences, base_url
        self.shape = shape or Shape()
        self.observations = _Columns(CAOMOBSERVATION_COLUMNS)
        self.planes = _Columns(CAOMPLANE_COLUMNS)
        self.artifacts = _Columns(CAOMARTIFACT_COLUMNS)
        self.obscore = _Columns(OBSCORE_COLUMNS)
        self.files: dict[str, ArchiveFile] = {}
        self.pending: list[tuple[str, str, str, str, int, fitsgen.FileIdentity, str]] = []
        self.exposures: dict[CcdKey, list[Exposure]] = {}
        self.next_tid = 1000 + (seed % 1000) * 1_000_000  # distinct, deterministic ids per seed

    def tid(self) -> int:
        self.next_tid += 1
        return self.next_tid

    def url(self, uri: str, path: str) -> str:
        """The access_url of a file in the chosen form: MAST's Download API, or a plain path."""
        if self.shape.url_form == "path":
            return f"{self.base_url}{FILES_PATH}{path}"
        return download_url(self.base_url, uri)

    def observation(
        self, *, obs_id: str, collection: str, trg_type: str, sector: int, name: str, ra: float, dec: float
    ) -> int:
        tid = self.tid()
        self.observations.add(
            id=tid,
            observationTID=tid,
            observationID=obs_id,
            collection=collection,
            trgType=trg_type,
            sequenceNumber=sector,
            trgName=name,
            trgposRA=ra,
            trgPosDec=dec,
            intent="science",
            type="FFI" if trg_type == "FIELD" else "timeseries",
            obsType="observation",
            algName="exposure",
            insName="Photometer",
            tlsName="TESS",
            prpProject="TESS",
            statusCode=0,
        )
        return tid

    def obscore_row(
        self,
        *,
        obs_id: str,
        collection: str,
        product_type: str,
        name: str,
        ra: float,
        dec: float,
        region: str,
        sector: int,
        url: str | None,
        est_kb: int | None,
        tid: int,
        exposure: int | None = None,
    ) -> None:
        """One ivoa.obscore row; `exposure` (an FFI's number) narrows the times to that exposure."""
        start, stop = fitsgen.sector_times(sector)
        exptime = 120.0 if product_type == "timeseries" else 1800.0
        if exposure is not None:
            cadence = ffi_cadence_seconds(sector)
            start += exposure * cadence / 86400.0
            stop, exptime = start + cadence / 86400.0, 0.8 * cadence  # 80%: the deadtime correction
        self.obscore.add(
            obs_id=obs_id,
            obs_collection=collection,
            dataproduct_type=product_type,
            target_name=name,
            s_ra=ra,
            s_dec=dec,
            s_region=region,
            access_url=url,
            access_estsize=est_kb,
            access_format="image/fits" if url else None,
            calib_level=3 if product_type == "timeseries" else 2,
            facility_name="TESS",
            instrument_name="Photometer",
            t_min=start + MJD_OF_BTJD_ZERO,
            t_max=stop + MJD_OF_BTJD_ZERO,
            t_exptime=exptime,
            em_min=6.0e-7,
            em_max=1.0e-6,
            objID=tid,
            obs_publisher_did=f"ivo://mast.stsci.edu/{collection.lower()}?{obs_id}",
            obs_release_date="2019-01-01 00:00:00",
        )

    def plane(
        self, *, obs_tid: int, product_id: str, level: int, product_type: str, collection: str, **extra: Any
    ) -> int:
        """Add one dbo.caomplane row of observation `obs_tid`; returns its planeTID."""
        plane_tid = self.tid()
        self.planes.add(
            id=plane_tid,
            planeTID=plane_tid,
            observationTID=obs_tid,
            observationUUID=f"{obs_tid:032x}",
            productID=product_id,
            calibrationLevel=level,
            dataProductType=product_type,
            collection=collection,
            statusCode=0,
            **extra,
        )
        return plane_tid

    def planes_with_files(
        self,
        *,
        obs_tid: int,
        obs_id: str,
        collection: str,
        uri_prefix: str,
        files: Iterable[tuple[fitsgen.FileIdentity, str]],
        obscore_row: Callable[..., None],
    ) -> None:
        """A plane with one file for each (identity, archive path), then the observation's ObsCore
        rows: one per file, or the first file's only, as `Shape.obscore_per_product` says."""
        rows = []
        for identity, path in files:
            size = self.plane_with_file(
                obs_tid=obs_tid,
                obs_id=obs_id,
                collection=collection,
                identity=identity,
                uri_prefix=uri_prefix,
                path=path,
            )
            rows.append((self.url(uri_prefix + identity.name, path), round(size / 1024)))
        for url, est_kb in rows if self.shape.obscore_per_product else rows[:1]:
            obscore_row(url=url, est_kb=est_kb)

    def plane_with_file(
        self,
        *,
        obs_tid: int,
        obs_id: str,
        collection: str,
        identity: fitsgen.FileIdentity,
        uri_prefix: str,
        path: str,
        name: str | None = None,
    ) -> int:
        """Add a plane and its artifact; returns the file size. The md5 is filled in by `finish`.

        `name` is the declared file name when it differs from the content's (`identity.name`).
        """
        name = identity.name if name is None else name
        image = identity.product in ffigen.FFI_PRODUCTS
        plane_tid = self.plane(
            obs_tid=obs_tid,
            product_id=f"{obs_id}_{identity.product}",
            level=(2 if identity.product == "ffic" else 1) if image else 3,
            product_type="image" if image else "timeseries",
            collection=collection,
        )
        if image:
            size = ffigen.ffi_size(identity.product, self.shape.ffi_dims)
        else:
            size = fitsgen.file_size(identity.product, self.cadences)
        uri = uri_prefix + name
        artifact_tid = self.tid()
        self.artifacts.add(
            id=artifact_tid,
            artifactTID=artifact_tid,
            planeTID=plane_tid,
            planeUUID=f"{plane_tid:032x}",
            collection=collection,
            contentChecksum=None,  # filled in by finish()
            contentLength=size,
            contentType="application/fits",
            dataURI=uri,
            productFileName=name,
            productType="SCIENCE",
            releaseType="data",
            statusCode=0,
        )
        self.pending.append((name, uri, obs_id, collection, size, identity, path))
        return size

    def finish(self) -> None:
        """Compute every file's md5 (threads: hashlib releases the GIL on big buffers) and record it.

        FFIs go by (CCD, product) group: one pass over the shared prefix, then one trailer a file.
        Then the NULLs of `null_checksum_fraction` / `null_length_fraction` are put in, by a coin
        fixed by (seed, file name); the truth in `files` keeps the real values.
        """

        def md5_of(identity: fitsgen.FileIdentity) -> str:
            return fitsgen.digest(identity, cadences=self.cadences, seed=self.seed)[1]

        def ffi_md5s(group: list[fitsgen.FileIdentity]) -> list[str]:
            return ffigen.md5s(group, dims=self.shape.ffi_dims, seed=self.seed)

        identities = [p[5] for p in self.pending]
        ordinary = [i for i, identity in enumerate(identities) if identity.product not in ffigen.FFI_PRODUCTS]
        groups: dict[tuple, list[int]] = {}
        for i, identity in enumerate(identities):
            if identity.product in ffigen.FFI_PRODUCTS:
                groups.setdefault(
                    (identity.sector, identity.camera, identity.ccd, identity.product), []
                ).append(i)
        md5s: list[str] = [""] * len(identities)
        workers = min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers, thread_name_prefix="archive-md5") as pool:
            if len(ordinary) > 256 and workers > 1:
                found = pool.map(md5_of, [identities[i] for i in ordinary], chunksize=64)
            else:
                found = map(md5_of, [identities[i] for i in ordinary])
            for i, md5 in zip(ordinary, found, strict=True):
                md5s[i] = md5
            indices = list(groups.values())
            for members, found_group in zip(
                indices, pool.map(ffi_md5s, [[identities[i] for i in m] for m in indices]), strict=True
            ):
                for i, md5 in zip(members, found_group, strict=True):
                    md5s[i] = md5
        checksums = self.artifacts.values["contentChecksum"]
        lengths = self.artifacts.values["contentLength"]
        shape = self.shape
        for row, ((name, uri, obs_id, collection, size, identity, path), md5) in enumerate(
            zip(self.pending, md5s, strict=True)
        ):
            # artifact rows were added in the same order as `pending`
            nulled = (
                shape.null_checksum_fraction
                and draw(self.seed, "null-checksum", name) < shape.null_checksum_fraction
            )
            checksums[row] = None if nulled else f"md5:{md5}"
            if (
                shape.null_length_fraction
                and draw(self.seed, "null-length", name) < shape.null_length_fraction
            ):
                lengths[row] = None
            product = identity.product
            self.files[name] = ArchiveFile(name, uri, product, obs_id, collection, size, md5, identity, path)
        self.pending.clear()

    def ffi(self, key: CcdKey, vertices: tuple[Vertex, ...]) -> None:
        """The CCD's FFI exposures: one CAOM observation (and ObsCore row or rows) each."""
        sector, camera, ccd = key
        count = self.shape.exposures_per_ccd
        centre, _ = _cap(vertices)
        ra0 = float(np.degrees(np.arctan2(centre[1], centre[0])) % 360.0)
        dec0 = float(np.degrees(np.arcsin(centre[2])))
        name = f"TESS FFI Sector {sector} Camera {camera} CCD {ccd}"
        exposures = self.exposures.setdefault(key, [])
        for index, offset in enumerate(jitter(self.seed, key, count)):
            obs_id = ffi_obs_id(sector, camera, ccd, index)
            polygon = _shift(vertices, offset)
            stamp = ffi_time(sector, index).strftime("%Y%j%H%M%S")
            exposures.append(Exposure(obs_id, index, polygon, stamp))
            ra = round(float((ra0 + offset[0] / 3600.0 / max(np.cos(np.radians(dec0)), 1e-3)) % 360.0), 6)
            dec = round(float(dec0 + offset[1] / 3600.0), 6)
            self._ffi_exposure(key, obs_id, index, polygon, stamp, name, ra, dec)

    def _ffi_exposure(
        self,
        key: CcdKey,
        obs_id: str,
        index: int,
        polygon: tuple[Vertex, ...],
        stamp: str,
        name: str,
        ra: float,
        dec: float,
    ) -> None:
        sector, camera, ccd = key
        region = s_region(polygon)
        tid = self.observation(
            obs_id=obs_id, collection="TESS", trg_type="FIELD", sector=sector, name=name, ra=ra, dec=dec
        )
        # The observation's ObsCore row; each call adds its url and est_kb.
        obscore_row = functools.partial(
            self.obscore_row,
            obs_id=obs_id,
            collection="TESS",
            product_type="image",
            name=name,
            ra=ra,
            dec=dec,
            region=region,
            sector=sector,
            tid=tid,
            # One observation per CCD (the first release's shape) spans the sector; one per exposure its own.
            exposure=index if self.shape.exposures_per_ccd > 1 else None,
        )
        if not self.shape.ffi_files:
            obscore_row(url=None, est_kb=None)
            self.plane(
                obs_tid=tid,
                product_id=obs_id,
                level=2,
                product_type="image",
                collection="TESS",
                posBoundsSTCS=region,
            )
            return
        files = []
        for product in ffigen.FFI_PRODUCTS:  # the calibrated image first: the ObsCore row when only one
            file_name = f"{obs_id}_{product}.fits"
            # tic carries the exposure number into the file's EXPOSURE header (there is no target).
            identity = fitsgen.FileIdentity(file_name, product, index, sector, camera, ccd, ra, dec)
            files.append((identity, ffi_path(sector, camera, ccd, stamp, file_name)))
        self.planes_with_files(
            obs_tid=tid,
            obs_id=obs_id,
            collection="TESS",
            uri_prefix=TESS_URI_PREFIX,
            files=files,
            obscore_row=obscore_row,
        )

    def light_curve(self, target: Target, key: CcdKey) -> None:
        """The target's 2-minute TESS observation in this sector: light curve, target pixels, DV."""
        sector = key[0]
        obs_id = lc_obs_id(sector, target.tic)
        dvt = dvt_name(sector, target.tic)
        names = (("lc", f"{obs_id}_lc.fits"), ("tp", f"{obs_id}_tp.fits"), ("dvt", dvt))
        files = [(product, name, tid_path(sector, target.tic, name)) for product, name in names]
        self._target_observation(target, key, obs_id, "TESS", TESS_URI_PREFIX, files)

    def hlsp(self, target: Target, key: CcdKey) -> None:
        """The target's QLP light curve in this sector (collection HLSP, one `_llc.fits` file)."""
        sector = key[0]
        obs_id = hlsp_obs_id(sector, target.tic)
        name = f"{obs_id}.fits"
        files = [("llc", name, hlsp_path(sector, target.tic, name))]
        self._target_observation(target, key, obs_id, "HLSP", HLSP_URI_PREFIX, files)

    def _target_observation(
        self,
        target: Target,
        key: CcdKey,
        obs_id: str,
        collection: str,
        uri_prefix: str,
        files: Sequence[tuple[str, str, str]],
    ) -> None:
        """One observation of `target`: a plane with one file per (product, file name, archive path),
        and its ObsCore rows (one per product, or the first product's only, as `Shape` says)."""
        sector, camera, ccd = key
        name = str(target.tic)
        position = (target.ra, target.dec, target.tessmag)
        tid = self.observation(
            obs_id=obs_id,
            collection=collection,
            trg_type="OBJECT",
            sector=sector,
            name=name,
            ra=target.ra,
            dec=target.dec,
        )
        obscore_row = functools.partial(
            self.obscore_row,
            obs_id=obs_id,
            collection=collection,
            product_type="timeseries",
            name=name,
            ra=target.ra,
            dec=target.dec,
            region=_small_region(target.ra, target.dec),
            sector=sector,
            tid=tid,
        )
        self.planes_with_files(
            obs_tid=tid,
            obs_id=obs_id,
            collection=collection,
            uri_prefix=uri_prefix,
            files=[
                (fitsgen.FileIdentity(file, product, target.tic, sector, camera, ccd, *position), path)
                for product, file, path in files
            ],
            obscore_row=obscore_row,
        )


# -- hostile names (the `hostile_names` option) ------------------------------------------------------
# File names as the archive declares them (productFileName, and the last part of dataURI/access_url),
# each on its own TESS light-curve observation inside the notebook's footprint. A safe client refuses
# every one. What survives TAP: VOTable is XML 1.0, which cannot carry NUL or C0 controls other than
# TAB/LF/CR (astropy drops a NUL silently; \x01 makes the document unparseable). So the NUL is
# declared percent-encoded, `%00`, which becomes a NUL once the client URL-unquotes the uri= value;
# DEL (\x7f) and a bidi override (U+202E) are controls that do pass through XML unchanged.
HOSTILE_NAMES: tuple[str, ...] = (
    "../../escape_lc.fits",  # traversal
    "/tmp/abs_lc.fits",  # absolute path
    "bad%00name_lc.fits",  # NUL after URL-unquoting
    "bad\x7fname_lc.fits",  # a control character (DEL) that XML allows
    "bidi\u202estif.cl_lc.fits",  # a bidi override (shows as `bidi...lc.fits` reversed)
    "tess" + "x" * 288 + "_lc.fits",  # 300 characters: longer than NAME_MAX (255)
)
# Observations whose obs_id is hostile (their file name is ordinary), one per entry.
HOSTILE_OBS_IDS: tuple[str, ...] = ("../../tess2018206045859-s0001-0000000000000666-0120-s",)
_HOSTILE_TIC_BASE = 100  # TIC ids far below the generated ones (>= 1,000,000), so never a clash


def hostile_key(fps: Mapping[CcdKey, tuple[Vertex, ...]], focus: CcdKey | None) -> CcdKey:
    """Where hostile entries go: the focus CCD, else the notebook's (1, 1, 2), else the first footprint."""
    if focus is not None:
        return focus
    return (1, 1, 2) if (1, 1, 2) in fps else min(fps)


def _add_hostile(builder: _Builder, fps: Mapping[CcdKey, tuple[Vertex, ...]], key: CcdKey, seed: int) -> None:
    """Light-curve observations with hostile names inside footprint `key` (see HOSTILE_NAMES)."""
    rng = np.random.default_rng([seed, 4099])  # its own stream: the ordinary targets do not move
    count = len(HOSTILE_NAMES) + len(HOSTILE_OBS_IDS)
    points = _sample_in_polygon(rng, fps[key], count)
    sector, camera, ccd = key
    entries = [(lc_obs_id(sector, _HOSTILE_TIC_BASE + i), name) for i, name in enumerate(HOSTILE_NAMES)]
    for j, obs_id in enumerate(HOSTILE_OBS_IDS):
        ordinary = lc_obs_id(sector, _HOSTILE_TIC_BASE + len(HOSTILE_NAMES) + j)
        entries.append((obs_id, f"{ordinary}_lc.fits"))
    for i, ((obs_id, name), (ra, dec)) in enumerate(zip(entries, points, strict=True)):
        tic = _HOSTILE_TIC_BASE + i
        ra, dec = round(float(ra), 6), round(float(dec), 6)
        tid = builder.observation(
            obs_id=obs_id, collection="TESS", trg_type="OBJECT", sector=sector, name=str(tic), ra=ra, dec=dec
        )
        # The bytes are an ordinary light curve stored under a plain name (`identity.name`); only the
        # declared name is hostile, so the server can answer it and the client's refusal is what stops it.
        identity = fitsgen.FileIdentity(f"hostile-{i:02d}_lc.fits", "lc", tic, sector, camera, ccd, ra, dec)
        path = tid_path(sector, tic, name)
        size = builder.plane_with_file(
            obs_tid=tid,
            obs_id=obs_id,
            collection="TESS",
            identity=identity,
            uri_prefix=TESS_URI_PREFIX,
            path=path,
            name=name,
        )
        builder.obscore_row(
            obs_id=obs_id,
            collection="TESS",
            product_type="timeseries",
            name=str(tic),
            ra=ra,
            dec=dec,
            region=_small_region(ra, dec),
            sector=sector,
            url=builder.url(TESS_URI_PREFIX + name, path),
            est_kb=round(size / 1024),
            tid=tid,
        )


def _table(schema: str, name: str, columns: _Columns) -> CatalogTable:
    return CatalogTable(schema, name, tuple((c, column_type(c)) for c in columns.names), columns.rows())


def build_catalog(
    *,
    sectors: Iterable[int] = range(1, 14),
    targets: int = 40_000,
    cadences: int = fitsgen.SMALL_CADENCES,
    seed: int = 0,
    base_url: str = "http://127.0.0.1:0",
    focus: CcdKey | None = None,
    hostile_names: bool = False,
    shape: Shape | None = None,
) -> Catalog:
    """Generate the whole archive for these options (deterministic).

    `focus=(sector, camera, ccd)` places every target inside that one footprint (they still get light
    curves in every other sector whose footprint holds them); `hostile_names` adds the observations
    of HOSTILE_NAMES and HOSTILE_OBS_IDS; `shape` sets FFI exposures, FFI files, ObsCore rows per
    product, the URL form and NULLs in the artifact table (see `Shape`; the default is one FFI
    observation per CCD, one ObsCore row per observation, Download API URLs, no NULLs).

    Targets are placed uniformly inside the CCD footprints `footprints[key]`, which are the polygons
    of each CCD's *middle* exposure (`Catalog.middle_exposure`); the other exposures are shifted by up
    to JITTER_ARCSEC, so a target within a few arcsec of an edge can fall outside some of them.
    """
    sector_list = tuple(sorted({int(s) for s in sectors}))
    if not sector_list:
        raise ValueError("sectors is empty; give at least one TESS sector, e.g. range(1, 14)")
    if targets < 0:
        raise ValueError(f"targets must be >= 0, got {targets}")
    fps = footprints(sector_list)
    if focus is not None:
        focus = (int(focus[0]), int(focus[1]), int(focus[2]))
        if focus not in fps:
            raise ValueError(
                f"focus {focus} is not a footprint of sectors {list(sector_list)}; give a (sector, camera,"
                " ccd) with the sector in `sectors`, cameras and CCDs 1-4"
            )
    rng = np.random.default_rng([seed, 7919])
    placed = place_targets({focus: fps[focus]} if focus else fps, targets, rng)
    ras = np.array([t.ra for t in placed])
    decs = np.array([t.dec for t in placed])
    seen = target_sectors(fps, ras, decs)
    hlsp_draw = rng.random(sum(len(keys) for keys in seen.values()))

    builder = _Builder(seed=seed, cadences=cadences, base_url=base_url.rstrip("/"), shape=shape)
    for key in sorted(fps):
        builder.ffi(key, fps[key])
    draw = 0
    for index in sorted(seen):
        for key in seen[index]:
            builder.light_curve(placed[index], key)
            if hlsp_draw[draw] < HLSP_FRACTION:
                builder.hlsp(placed[index], key)
            draw += 1
    if hostile_names:
        _add_hostile(builder, fps, hostile_key(fps, focus), seed)
    builder.finish()
    tables = {
        "dbo.caomobservation": _table("dbo", "caomobservation", builder.observations),
        "dbo.caomplane": _table("dbo", "caomplane", builder.planes),
        "dbo.caomartifact": _table("dbo", "caomartifact", builder.artifacts),
        "ivoa.obscore": _table("ivoa", "obscore", builder.obscore),
    }
    return Catalog(
        seed=seed,
        cadences=cadences,
        sectors=sector_list,
        footprints=fps,
        files=builder.files,
        tables=tables,
        by_uri=_by_uri(builder.files.values()),
        exposures=builder.exposures,
        by_path={entry.path: entry for entry in builder.files.values()},
        ffi_dims=builder.shape.ffi_dims,
    )


def _by_uri(files: Iterable[ArchiveFile]) -> dict[str, ArchiveFile]:
    """uri -> file, under the uri as declared and as a client sends it back once URL-decoded
    (e.g. `%00` arrives as a NUL), so the server answers both spellings."""
    found: dict[str, ArchiveFile] = {}
    for entry in files:
        found[entry.uri] = entry
        found.setdefault(unquote(entry.uri), entry)
    return found
