"""engine.plan.planner: against the archive's TAP service over HTTP (marked integration) with a small
CAOM-shaped catalogue, and rule by rule against a fake TapClient that runs ADQL on a TapDatabase."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from engine.archive.tap import TapOptions
from engine.archive.tapdb import TapDatabase
from engine.exceptions import EmptySelectionError, IncompletePlanError, UnsafePathError
from engine.models import PlanItem
from engine.plan.adql import Region, inventory_query
from engine.plan.planner import Planner, _Cursor, choose_exposures, normalise_target
from engine.plan.tap import TapClient
from engine.settings import Selection, Settings, TapSettings
from tests.unit.test_plan_tap import char, number, serve

DOWNLOAD = "http://files.example.org/api/v0.1/Download/file?uri="
SIZE = 2039040
# Footprints of sector 1: camera 1 CCD 2 (RA 10..12) and camera 1 CCD 1 (RA 11..13), overlapping.
FFIS = {
    (1, 2): ("tess2018207052942-s0001-1-2-0120-s", "POLYGON 10 -6 12 -6 12 -4 10 -4 10 -6"),
    (1, 1): ("tess2018207052942-s0001-1-1-0120-s", "POLYGON 11 -6 13 -6 13 -4 11 -4 11 -6"),
}

SERVICE = "http://example.org"  # a name in error texts, never contacted


def md5_of(name: str) -> str:
    return hashlib.md5(name.encode()).hexdigest()


def target_observations() -> list[tuple[str, str, int, float]]:
    """(obs_id, target, sector, ra): 12 targets along dec -5, odd ones observed in sector 2 too."""
    rows = []
    for i in range(12):
        tic = f"{1000 + i}"
        ra = 10.1 + 0.25 * i
        rows.append((f"tess2018206045859-s0001-{tic:0>16}-0120-s", tic, 1, ra))
        if i % 2:
            rows.append((f"tess2018234235059-s0002-{tic:0>16}-0121-s", tic, 2, ra))
    rows.append(("tess2018206045859-s0001-it's-hostile-0120-s", "666", 1, 10.6))  # a quote in an obs_id
    rows.append(("tess2018206045859-s0001-0000000000009999-0120-s", "9999", 1, 50.0))  # far away
    return rows


def caom_db(*, artifacts: bool = True, bad_values: bool = False) -> TapDatabase:
    obscore, observations, planes, files = [], [], [], []
    tid = 0
    for (_cam, _ccd), (obs_id, region) in FFIS.items():
        tid += 1
        observations.append((obs_id, tid, "TESS", "FIELD", 1))
        obscore.append((obs_id, "TESS", "image", "", 11.0, -5.0, region, "", 34000))
    for obs_id, target, sector, ra in target_observations():
        tid += 1
        lc, tp = f"{obs_id}_lc.fits", f"{obs_id}_tp.fits"
        observations.append((obs_id, tid, "TESS", "OBJECT", sector))
        obscore.append(
            (obs_id, "TESS", "timeseries", target, ra, -5.0, "", f"{DOWNLOAD}mast:TESS/product/{lc}", 1991)
        )
        planes.append((tid, tid))
        for k, name in enumerate((lc, tp)):
            size, checksum = SIZE + k, f"md5:{md5_of(name)}"
            if bad_values and "it's" in obs_id:
                size, checksum = -5, "md5:not-hex"
            files.append((tid * 10 + k, tid, name, f"mast:TESS/product/{name}", size, checksum))
    # A High Level Science Product in the same place must stay out (obs_collection).
    observations.append(("hlsp_x", 999, "HLSP", "OBJECT", 1))
    obscore.append(("hlsp_x", "HLSP", "timeseries", "1", 10.5, -5.0, "", f"{DOWNLOAD}mast:HLSP/x_lc.fits", 5))
    db = TapDatabase()
    db.add_table(
        "ivoa",
        "obscore",
        [char("obs_id"), char("obs_collection"), char("dataproduct_type"), char("target_name"),
         number("s_ra", "double"), number("s_dec", "double"), char("s_region"), char("access_url"),
         number("access_estsize")],
        obscore,
    )  # fmt: skip
    db.add_table(
        "dbo",
        "caomobservation",
        [char("observationID"), number("observationTID"), char("collection"), char("trgType"),
         number("sequenceNumber", "int")],
        observations,
    )  # fmt: skip
    if artifacts:
        db.add_table("dbo", "caomplane", [number("planeTID"), number("observationTID")], planes)
        db.add_table(
            "dbo",
            "caomartifact",
            [number("artifactTID"), number("planeTID"), char("productFileName"), char("dataURI"),
             number("contentLength"), char("contentChecksum")],
            files,
        )  # fmt: skip
    return db


def expected_obs(ra_low: float, ra_high: float) -> set[str]:
    return {obs_id for obs_id, _t, _s, ra in target_observations() if ra_low <= ra <= ra_high}


def settings_for(url: str, page_size: int | None = 3, **selection: object) -> Settings:
    tap = TapSettings(url=url, page_size=page_size, poll_timeout=2.0, job_timeout=10.0, retries=1)
    return Settings(tap=tap, selection=Selection(**selection))  # type: ignore[arg-type]


async def collect(planner: Planner) -> list[list[PlanItem]]:
    return [page async for page in planner.pages()]


def run_plan(db: TapDatabase, options: TapOptions | None = None, **kwargs: object) -> tuple[Planner, list]:
    async def main() -> tuple[Planner, list]:
        async with serve(db, options=options) as url:
            settings = settings_for(url, **kwargs)  # type: ignore[arg-type]
            planner = Planner(settings, TapClient(url, settings=settings.tap, backoff=0.01))
            return planner, await collect(planner)

    return asyncio.run(main())


@pytest.mark.integration
def test_footprint_with_artifacts_pages_every_file_exactly_once() -> None:
    planner, pages = run_plan(caom_db(), sector=1, cameras=[1], ccds=[2], products=["lc", "tp"])
    items = [item for page in pages for item in page]
    assert planner.artifacts is True
    assert len(pages) > 3  # page size 3: the inventory really was paged
    wanted = expected_obs(10, 12)
    assert sorted(i.filename for i in items) == sorted(f"{o}_{p}.fits" for o in wanted for p in ("lc", "tp"))
    lc = next(i for i in items if i.filename.endswith("-0000000000001000-0120-s_lc.fits"))
    assert lc.url == f"{DOWNLOAD}mast:TESS/product/{lc.filename}"
    assert (lc.size, lc.md5, lc.product, lc.sector, lc.target_name, lc.est_kb) == (
        SIZE, md5_of(lc.filename), "lc", 1, "1000", 1991
    )  # fmt: skip
    tp = next(i for i in items if i.filename == lc.filename.replace("_lc", "_tp"))
    assert tp.url.endswith("uri=mast:TESS/product/" + tp.filename) and tp.est_kb == -1
    assert "hlsp" not in " ".join(i.url for i in items)


@pytest.mark.integration
def test_keyset_pages_split_observations_without_loss_or_duplicates() -> None:
    async def main() -> None:
        async with serve(caom_db()) as url:
            settings = settings_for(
                url, page_size=3, polygon=[10, -6, 12, -6, 12, -4, 10, -4], products=["lc", "tp"]
            )
            planner = Planner(settings, TapClient(url, settings=settings.tap, backoff=0.01))
            region = Region.polygon([10, -6, 12, -6, 12, -4, 10, -4])
            args = {
                "region": region,
                "sectors": None,
                "products": ["lc", "tp"],
                "collection": "TESS",
                "artifacts": True,
            }
            build = lambda after: inventory_query(**args, after=after)  # noqa: E731
            keys = [
                (str(r["obs_id"]), str(r["productFileName"]))
                async for t in planner._keyset_pages(build, True, 3, _Cursor())
                for r in t
            ]
            assert len(keys) == len(set(keys))  # nothing fetched twice, before any dedupe
            assert {k[0] for k in keys} == expected_obs(10, 12)
            assert len(keys) == 2 * len(expected_obs(10, 12))

    asyncio.run(main())


@pytest.mark.integration
def test_fallback_without_artifact_tables() -> None:
    planner, pages = run_plan(caom_db(artifacts=False), sector=1, cameras=[1], ccds=[2])
    items = [item for page in pages for item in page]
    assert planner.artifacts is False
    assert sorted(i.obs_id for i in items) == sorted(expected_obs(10, 12))
    assert all(i.size == -1 and i.md5 == "" and i.est_kb == 1991 and i.product == "lc" for i in items)


@pytest.mark.integration
def test_page_size_from_the_hard_limit_and_overflow_without_a_full_page() -> None:
    # No page_size: the service's hard limit (4) is the page size.
    planner, pages = run_plan(caom_db(), TapOptions(default_maxrec=4, hard_limit=4), page_size=None, sector=1,
                              cameras=[1], ccds=[2])  # fmt: skip
    assert sorted(i.obs_id for p in pages for i in p) == sorted(expected_obs(10, 12))
    # page_size above the hard limit: pages come back short but marked OVERFLOW, and paging goes on.
    planner, pages = run_plan(caom_db(), TapOptions(default_maxrec=2, hard_limit=2), page_size=50, sector=1,
                              cameras=[1], ccds=[2])  # fmt: skip
    assert sorted(i.obs_id for p in pages for i in p) == sorted(expected_obs(10, 12))
    assert len(planner.queries) > 5


@pytest.mark.integration
def test_overlapping_footprints_are_deduplicated() -> None:
    _planner, pages = run_plan(caom_db(), sector=1, cameras=[1], ccds=[1, 2])
    urls = [i.url for p in pages for i in p]
    assert len(urls) == len(set(urls))
    assert {i.obs_id for p in pages for i in p} == expected_obs(10, 13)


@pytest.mark.integration
def test_untrusted_sizes_and_checksums_become_unknown() -> None:
    _planner, pages = run_plan(caom_db(bad_values=True), polygon=[10, -6, 12, -6, 12, -4, 10, -4])
    hostile = next(i for p in pages for i in p if "it's" in i.obs_id)
    assert (hostile.size, hostile.md5) == (-1, "")


@pytest.mark.integration
def test_sectors_filter_and_cone() -> None:
    _planner, pages = run_plan(caom_db(), cone=(11.0, -5.0, 1.0), sectors=[2])
    items = [i for p in pages for i in p]
    assert items and all(i.sector == 2 for i in items)
    assert {i.obs_id for i in items} == {o for o in expected_obs(10, 12) if "-s0002-" in o}


@pytest.mark.integration
def test_missing_footprint_names_sector_camera_and_ccd() -> None:
    with pytest.raises(EmptySelectionError, match="sector 1, camera 3 ccd 4"):
        run_plan(caom_db(), sector=1, cameras=[3], ccds=[4])


@pytest.mark.integration
def test_nothing_matched_is_an_empty_selection() -> None:
    with pytest.raises(EmptySelectionError, match="the selection matched no files"):
        run_plan(caom_db(), polygon=[100, 10, 101, 10, 101, 11])


@pytest.mark.integration
def test_targets_file(tmp_path: Path) -> None:
    targets = tmp_path / "targets.txt"
    targets.write_text("# two targets\nTIC 1001\n1004\n")
    _planner, pages = run_plan(caom_db(), targets_file=targets)
    assert sorted(i.target_name for p in pages for i in p) == ["1001", "1001", "1004"]  # 1001: two sectors


@pytest.mark.integration
def test_urls_file_needs_no_tap(tmp_path: Path) -> None:
    urls = tmp_path / "urls.txt"
    urls.write_text(
        "https://example.org/a/tess-s0003-x_lc.fits\nhttps://example.org/a/tess-s0003-x_lc.fits\n"
    )
    settings = settings_for("http://127.0.0.1:9/unused", urls_file=urls)
    planner = Planner(settings, TapClient(settings.tap.url, settings=settings.tap))
    pages = asyncio.run(collect(planner))
    assert [(i.filename, i.sector, i.product) for p in pages for i in p] == [
        ("tess-s0003-x_lc.fits", 3, "lc")
    ]
    assert planner.queries == []


@pytest.mark.integration
def test_footprints_page_through_a_service_limit_of_two_rows() -> None:
    # Two CCDs' exposures asked with pages of two rows: each CCD's obs_id list is paged, never cut.
    planner, pages = run_plan(caom_db(), TapOptions(default_maxrec=2, hard_limit=2), page_size=None, sector=1,
                              cameras=[1], ccds=[1, 2])  # fmt: skip
    assert [(d.camera, d.ccd) for d in planner.detectors] == [(1, 1), (1, 2)]
    assert {i.obs_id for p in pages for i in p} == expected_obs(10, 13)


@pytest.mark.integration
def test_a_page_that_cannot_be_split_is_an_incomplete_plan() -> None:
    # A full page of one row: the next page would start at the same key, forever.
    with pytest.raises(IncompletePlanError, match="cannot be paged further") as info:
        run_plan(caom_db(), TapOptions(default_maxrec=1, hard_limit=1), page_size=None, sector=1,
                 cameras=[1], ccds=[2])  # fmt: skip
    assert "tap.page_size" in str(info.value)


@pytest.mark.integration
def test_rows_with_control_characters_in_urls_are_kept_for_the_layout_to_refuse() -> None:
    """A DEL in the declared name: the URL is percent-encoded and the row kept, so the file ends as a
    recorded failure (layout refuses the name) instead of silently vanishing from the plan."""
    from astropy.table import Table

    from engine.layout import relpath_for
    from engine.plan.planner import _artifact_items

    name = "bad\x7fname_lc.fits"
    row = Table(
        {
            "obs_id": ["tess2018206045859-s0001-0000000000000100-0120-s"],
            "access_url": [f"{DOWNLOAD}mast:TESS/product/{name}"],
            "productFileName": [name],
            "dataURI": [f"mast:TESS/product/{name}"],
            "contentLength": [SIZE],
            "contentChecksum": [f"md5:{md5_of(name)}"],
        }
    )
    (item,) = _artifact_items(row)
    assert item.filename == name
    assert "\x7f" not in item.url and "bad%7Fname" in item.url
    with pytest.raises(UnsafePathError, match="U\\+007F"):
        relpath_for(item, "mast")


# -- rule by rule, against a fake TapClient --------------------------------------------------------
# The fake runs the planner's ADQL on a TapDatabase in-process (real ADQL semantics, no HTTP), counts
# jobs in flight, and can fail chosen queries the way engine.plan.tap.TapClient.run does.
BASE = "http://files.example.org"
EXPOSURES = 11
# One target per RA along dec -5, chosen around the jittered edges of sector 1 camera 1 CCD 2:
# exposure k's polygon spans RA 10 + 0.01k .. 12 + 0.01k (k = 0..10), so with 11 exposures the
# first spans 10.00..12.00, the middle (k = 5) 10.05..12.05 and the last 10.10..12.10.
EDGE_TARGETS = {"2001": 10.02, "2002": 11.0, "2003": 12.04, "2004": 12.08, "2005": 13.5}
IN_MIDDLE = {"2002", "2003"}
IN_COMPOSITE = {"2001", "2002", "2003", "2004"}


class FakeTap:
    """Stands in for engine.plan.tap.TapClient: `run`, `hardlimit`, `columns`."""

    def __init__(self, db: TapDatabase, *, hardlimit: int | None = None, fail=None) -> None:
        self.db = db
        self.limit = hardlimit
        self.fail = fail  # query -> exception to raise (or None)
        self.sent: list[str] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def run(self, query: str, *, maxrec: int | None = None):
        self.sent.append(query)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.001)  # let other jobs start, as real jobs overlap
            error = self.fail(query) if self.fail else None
            if error is not None:
                raise error
            table, overflow = self.db.execute(query, maxrec=maxrec or 100_000)
            table.meta["overflow"] = overflow
            return table
        finally:
            self.in_flight -= 1

    async def hardlimit(self) -> int | None:
        return self.limit

    async def columns(self, table: str) -> set[str] | None:
        result, _ = self.db.execute(
            f"SELECT column_name FROM TAP_SCHEMA.columns WHERE table_name = '{table}'", maxrec=1000
        )
        return {str(n).lower() for n in result["column_name"]} or None


def exposure_id(k: int, camera: int = 1, ccd: int = 2) -> str:
    return f"tess2018207{k:06d}-s0001-{camera}-{ccd}-0120-s"


def file_url(name: str, form: str, collection: str = "TESS") -> str:
    if form == "uri":
        return f"{BASE}/api/v0.1/Download/file?uri=mast:{collection}/product/{name}"
    if form == "ftp":
        return f"ftp://ftp.example.org/{name}"
    return f"{BASE}/files/{name}"


def shapes_db(
    *,
    exposures: int = EXPOSURES,
    detectors: tuple[tuple[int, int], ...] = ((1, 2),),
    form: str = "uri",
    per_product: bool = True,
    artifacts: bool = True,
    ffi_files: bool = True,
    twin: int | None = None,
) -> TapDatabase:
    """MAST's shapes: one observation per FFI exposure (jittered s_region), one ObsCore row per product
    (lc, tp) with its own access_url in `form`, artifacts with md5:<hex>; one QLP HLSP per target.

    `twin`: a second observation of target 2002 whose light curve has the same file name, declared
    `twin` bytes longer (0: the same file again)."""
    obscore, observations, planes, files = [], [], [], []
    tid = 0

    def add_files(obs_tid: int, obs_id: str, names: list[str], collection: str, estsize: bool, **row) -> None:
        nonlocal tid
        tid += 1
        plane = tid
        planes.append((plane, obs_tid))
        for k, name in enumerate(names):
            files.append((plane * 10 + k, plane, name, f"mast:{collection}/product/{name}", SIZE + k,
                          f"md5:{md5_of(name)}"))  # fmt: skip
        for name in names if per_product else names[:1]:
            url = file_url(name, form, collection)
            obscore.append((obs_id, collection, row["kind"], row["target"], row["ra"], -5.0, row["region"],
                            url, (SIZE + names.index(name)) // 1024 if estsize else None))  # fmt: skip

    for camera, ccd in detectors:
        offset = 3.0 * (camera - 1) + 3.0 * (ccd - 2) if (camera, ccd) != (1, 2) else 0.0
        for k in range(exposures):
            tid += 1
            obs_id = exposure_id(k, camera, ccd)
            ra0 = 10 + offset + 0.01 * k
            region = f"POLYGON {ra0} -6 {ra0 + 2} -6 {ra0 + 2} -4 {ra0} -4 {ra0} -6"
            observations.append((obs_id, tid, "TESS", "FIELD", 1))
            if ffi_files:
                add_files(tid, obs_id, [f"{obs_id}_ffic.fits", f"{obs_id}_ffir.fits"], "TESS", True,
                          kind="image", target="", ra=ra0 + 1, region=region)  # fmt: skip
            else:
                obscore.append((obs_id, "TESS", "image", "", ra0 + 1, -5.0, region, None, None))
    for target, ra in EDGE_TARGETS.items():
        tid += 1
        obs_id = f"tess2018206045859-s0001-{target:0>16}-0120-s"
        observations.append((obs_id, tid, "TESS", "OBJECT", 1))
        add_files(tid, obs_id, [f"{obs_id}_lc.fits", f"{obs_id}_tp.fits"], "TESS", True,
                  kind="timeseries", target=target, ra=ra, region="")  # fmt: skip
        tid += 1
        hlsp = f"hlsp_qlp_tess_ffi_s0001-{target:0>16}_tess_v01_llc"
        observations.append((hlsp, tid, "HLSP", "OBJECT", 1))
        add_files(
            tid, hlsp, [f"{hlsp}.fits"], "HLSP", True, kind="timeseries", target=target, ra=ra, region=""
        )
    if twin is not None:
        tid += 1
        lc = "tess2018206045859-s0001-0000000000002002-0120-s_lc.fits"
        obs_id = "tess2018206045859-s0001-0000000000002002-0121-s"
        observations.append((obs_id, tid, "TESS", "OBJECT", 1))
        planes.append((tid, tid))
        md5 = md5_of(lc) if twin == 0 else md5_of("another file")
        files.append((tid * 10, tid, lc, f"mast:TESS/product/{lc}", SIZE + twin, f"md5:{md5}"))
        url = file_url(lc, form).replace(BASE, "http://mirror.example.org")
        obscore.append((obs_id, "TESS", "timeseries", "2002", 11.0, -5.0, "", url, (SIZE + twin) // 1024))
    db = TapDatabase()
    db.add_table(
        "ivoa",
        "obscore",
        [char("obs_id"), char("obs_collection"), char("dataproduct_type"), char("target_name"),
         number("s_ra", "double"), number("s_dec", "double"), char("s_region"), char("access_url"),
         number("access_estsize")],
        obscore,
    )  # fmt: skip
    db.add_table(
        "dbo",
        "caomobservation",
        [char("observationID"), number("observationTID"), char("collection"), char("trgType"),
         number("sequenceNumber", "int")],
        observations,
    )  # fmt: skip
    if artifacts:
        db.add_table("dbo", "caomplane", [number("planeTID"), number("observationTID")], planes)
        db.add_table(
            "dbo",
            "caomartifact",
            [number("artifactTID"), number("planeTID"), char("productFileName"), char("dataURI"),
             number("contentLength"), char("contentChecksum")],
            files,
        )  # fmt: skip
    return db


def fake_plan(tap: FakeTap, *, page_size: int | None = 4, layout: str = "mast", **selection: object):
    settings = settings_for("http://127.0.0.1:9/unused", page_size=page_size, **selection)
    settings.output.layout = layout
    planner = Planner(settings, tap)  # type: ignore[arg-type]
    pages = asyncio.run(collect(planner))
    return planner, [item for page in pages for item in page]


def targets_of(items: list[PlanItem]) -> set[str]:
    return {i.target_name for i in items}


def assert_clean(items: list[PlanItem]) -> None:
    """No two items share a destination, and every URL names its item's file."""
    from engine.layout import relpath_for
    from engine.plan.table import filename_from_url

    paths = [relpath_for(i, "mast") for i in items]
    assert len(paths) == len(set(paths)), "two items share one destination"
    for item in items:
        assert filename_from_url(item.url) == item.filename, (item.url, item.filename)


def test_footprint_is_the_middle_exposure_even_with_more_exposures_than_a_page() -> None:
    tap = FakeTap(shapes_db(exposures=EXPOSURES))
    planner, items = fake_plan(tap, page_size=3, sector=1, cameras=[1], ccds=[2])
    (detector,) = planner.detectors
    assert detector.exposures == EXPOSURES  # 11 obs_ids through pages of 3: nothing cut
    assert detector.chosen == [exposure_id(5)]
    assert targets_of(items) == IN_MIDDLE
    assert_clean(items)
    assert len(items) == len(IN_MIDDLE)  # one light curve each, never the tp's URL beside it


def test_middle_choice_does_not_depend_on_the_order_the_service_sends() -> None:
    ids = [exposure_id(k) for k in range(8)]
    shuffled = ids[3:] + ids[:3]
    # n // 2 of n sorted obs_ids: the later middle of an even count, as the local archive's footprint
    assert choose_exposures(shuffled, "middle") == choose_exposures(ids, "middle") == [ids[4]]
    assert choose_exposures(reversed(ids), "composite") == [ids[0], ids[4], ids[7]]
    assert choose_exposures(ids[:7], "middle") == [ids[3]]
    assert choose_exposures(ids[:1], "composite") == ids[:1]  # one exposure: one polygon


def test_composite_footprint_keeps_edge_targets_and_plans_each_file_once() -> None:
    tap = FakeTap(shapes_db())
    planner, items = fake_plan(tap, sector=1, cameras=[1], ccds=[2], footprint="composite")
    assert planner.detectors[0].chosen == [exposure_id(0), exposure_id(5), exposure_id(10)]
    assert len(planner.detectors[0].regions) == 3
    assert targets_of(items) == IN_COMPOSITE
    assert_clean(items)
    assert len(items) == len(IN_COMPOSITE)
    contains = {q.split("CONTAINS", 1)[1].split(") = 1")[0] for q in planner.statements if "CONTAINS" in q}
    assert len(contains) == 3  # one CONTAINS per polygon, one polygon per query
    assert planner.guard.merged > 0  # targets inside two polygons came twice and were merged


def test_sixteen_footprint_jobs_run_concurrently_but_at_most_four_at_once() -> None:
    detectors = tuple((cam, ccd) for cam in range(1, 5) for ccd in range(1, 5))
    tap = FakeTap(shapes_db(exposures=5, detectors=detectors))
    planner, _items = fake_plan(tap, page_size=None, sector=1)
    assert [(d.camera, d.ccd) for d in planner.detectors] == list(detectors)  # in the asked order
    assert 1 < tap.most_in_flight <= 4


@pytest.mark.parametrize("form", ["uri", "path"])
def test_per_product_obscore_rows_with_the_artifact_join_pair_each_file_with_its_own_url(form: str) -> None:
    tap = FakeTap(shapes_db(form=form))
    planner, items = fake_plan(tap, sector=1, cameras=[1], ccds=[2], products=["lc", "tp"])
    assert planner.artifacts is True
    assert_clean(items)
    assert sorted(i.filename for i in items) == sorted(
        f"tess2018206045859-s0001-{t:0>16}-0120-s_{p}.fits" for t in IN_MIDDLE for p in ("lc", "tp")
    )
    for item in items:
        assert item.md5 == md5_of(item.filename)
        assert item.size == (SIZE if item.product == "lc" else SIZE + 1)
        assert item.est_kb == item.size // 1024  # from the file's own ObsCore row, not the lc's
    assert planner.guard.dropped_total == 0 and planner.guard.conflicts == 0


def test_an_artifact_whose_rows_name_other_files_is_dropped_and_counted_not_paired() -> None:
    # Path URLs and one ObsCore row per observation (the lc's): the tp has no URL that names it.
    tap = FakeTap(shapes_db(form="path", per_product=False))
    planner, items = fake_plan(tap, sector=1, cameras=[1], ccds=[2], products=["lc", "tp"])
    assert {i.product for i in items} == {"lc"} and len(items) == len(IN_MIDDLE)
    assert planner.guard.dropped["URL names another file"] == len(IN_MIDDLE)
    assert_clean(items)


def test_a_join_that_times_out_is_retried_sector_by_sector_with_smaller_pages() -> None:
    from engine.exceptions import TapTimeoutError

    def fail(query: str):
        joined = "caomartifact" in query and "CONTAINS" in query
        if joined and "sequenceNumber IN" not in query:
            return TapTimeoutError("the TAP job was still EXECUTING after 600 s")
        return None

    tap = FakeTap(shapes_db(), fail=fail)
    planner, items = fake_plan(tap, page_size=None, sector=1, cameras=[1], ccds=[2], products=["lc", "tp"])
    assert planner.artifacts is True and planner.join_fallback == ""
    assert any("sequenceNumber IN (1)" in q and "caomartifact" in q for q in planner.statements)
    assert all(i.md5 == md5_of(i.filename) for i in items) and len(items) == 2 * len(IN_MIDDLE)
    assert planner.guard.merged == 0


def test_a_join_that_keeps_failing_falls_back_to_obscore_with_one_warning(caplog) -> None:
    from engine.exceptions import TapJobError

    def fail(query: str):
        if "caomartifact" in query and "TAP_SCHEMA" not in query:
            return TapJobError(f"the TAP job at {SERVICE}/async/1 ended ABORTED: execution time exceeded")
        return None

    tap = FakeTap(shapes_db(), fail=fail)
    with caplog.at_level("WARNING"):
        planner, items = fake_plan(
            tap, page_size=None, sector=1, cameras=[1], ccds=[2], footprint="composite"
        )
    warnings = [r for r in caplog.records if "artifact join" in r.getMessage()]
    assert len(warnings) == 1 and "ObsCore only" in warnings[0].getMessage()
    assert planner.artifacts is False and "ABORTED" in planner.join_fallback
    assert targets_of(items) == IN_COMPOSITE
    assert all(i.md5 == "" and i.size == -1 and i.est_kb > 0 for i in items)
    assert_clean(items)
    # Once given up, the next polygons are planned from ObsCore at once: no join is tried for them.
    first, *others = (r.adql() for r in planner.detectors[0].regions)
    assert any("caomartifact" in q and first in q for q in tap.sent)
    assert not any("caomartifact" in q and r in q for q in tap.sent for r in others)


def test_a_fallback_after_some_pages_does_not_plan_rows_twice() -> None:
    from engine.exceptions import TapJobError

    def fail(query: str):
        # The first joined page works; every later joined page (it has a keyset condition) fails.
        if "caomartifact" in query and "obs_id >" in query:
            return TapJobError(f"the TAP job at {SERVICE}/async/2 ended ABORTED: timeout")
        return None

    tap = FakeTap(shapes_db(), fail=fail)
    _planner, items = fake_plan(tap, page_size=3, sector=1, cameras=[1], ccds=[2], footprint="composite")
    assert targets_of(items) == IN_COMPOSITE and len(items) == len(IN_COMPOSITE)
    assert any(i.md5 for i in items) and any(not i.md5 for i in items)  # joined first, ObsCore after
    assert_clean(items)


def test_a_query_fault_is_never_retried() -> None:
    from engine.exceptions import TapJobError

    fault = TapJobError(f"the TAP service at {SERVICE} could not run the query: unknown column 'dataURI'")
    tap = FakeTap(
        shapes_db(), fail=lambda q: fault if "caomartifact" in q and "TAP_SCHEMA" not in q else None
    )
    with pytest.raises(TapJobError, match="unknown column"):
        fake_plan(tap, sector=1, cameras=[1], ccds=[2])
    assert sum("caomartifact" in q and "TAP_SCHEMA" not in q for q in tap.sent) == 1


@pytest.mark.parametrize(
    ("given", "stored"),
    [("TIC 0025155310", "25155310"), ("tic25155310", "25155310"), ("0025155310", "25155310"),
     ("TIC-25155310", "25155310"), ("25155310", "25155310"), ("WASP-18", "WASP-18"), (" 0 ", "0")],
)  # fmt: skip
def test_tic_ids_are_normalised_as_mast_stores_them(given: str, stored: str) -> None:
    assert normalise_target(given) == stored


def test_targets_that_match_nothing_are_listed_in_one_warning(tmp_path: Path, caplog) -> None:
    targets = tmp_path / "targets.txt"
    targets.write_text("TIC 0000000000002002\ntic2003\n0000099999  # not in the archive\nTIC 42\n2002\n")
    tap = FakeTap(shapes_db())
    with caplog.at_level("WARNING"):
        planner, items = fake_plan(tap, targets_file=targets)
    assert targets_of(items) == {"2002", "2003"}
    assert "target_name IN ('2002', '2003', '99999', '42')" in " ".join(planner.statements)
    assert planner.unmatched_targets == ["42", "99999"]
    (warning,) = [r.getMessage() for r in caplog.records if "matched no file" in r.getMessage()]
    assert warning.startswith("2 of 4 targets") and warning.endswith("42, 99999")


@pytest.mark.parametrize("artifacts", [True, False])
def test_ffic_plans_every_exposures_full_frame_image(artifacts: bool) -> None:
    tap = FakeTap(shapes_db(artifacts=artifacts))
    planner, items = fake_plan(tap, page_size=4, sector=1, cameras=[1], ccds=[2], products=["ffic"])
    assert sorted(i.filename for i in items) == [f"{exposure_id(k)}_ffic.fits" for k in range(EXPOSURES)]
    assert all(i.product == "ffic" and i.sector == 1 for i in items)
    assert all((i.md5 == md5_of(i.filename)) is artifacts for i in items)
    assert_clean(items)
    assert not any("CONTAINS" in q for q in planner.statements)  # no light-curve inventory asked


def test_ffi_products_need_a_sector_footprint() -> None:
    from engine.exceptions import ConfigError

    with pytest.raises(ConfigError, match=r"selection\.products: ffic"):
        fake_plan(FakeTap(shapes_db()), polygon=[10, -6, 12, -6, 12, -4], products=["ffic"])


def test_hlsp_collection_plans_qlp_light_curves_with_lc_selected() -> None:
    tap = FakeTap(shapes_db())
    planner, items = fake_plan(tap, sector=1, cameras=[1], ccds=[2], collection="HLSP")
    assert sorted(i.filename for i in items) == sorted(
        f"hlsp_qlp_tess_ffi_s0001-{t:0>16}_tess_v01_llc.fits" for t in IN_MIDDLE
    )
    assert all(i.product == "lc" and i.md5 == md5_of(i.filename) for i in items)
    # The footprint still comes from TESS's FFI exposures, not from the HLSP collection.
    assert any("collection = 'TESS'" in q and "trgType = 'FIELD'" in q for q in planner.statements)


def test_every_statement_sent_is_kept_in_order_without_repeats(caplog) -> None:
    tap = FakeTap(shapes_db())
    with caplog.at_level("DEBUG", logger="engine.plan.planner"):
        planner, _items = fake_plan(tap, page_size=3, sector=1, cameras=[1], ccds=[2], products=["lc", "tp"])
    sent = [q for q in tap.sent if "TAP_SCHEMA" not in q]
    assert planner.statements == list(dict.fromkeys(sent))
    logged = {
        r.getMessage().removeprefix("ADQL: ") for r in caplog.records if r.getMessage().startswith("ADQL: ")
    }
    assert logged == set(planner.statements)


def test_a_url_list_goes_through_the_same_invariants(tmp_path: Path) -> None:
    urls = tmp_path / "urls.txt"
    a = "tess2018206045859-s0001-0000000000002002-0120-s_lc.fits"
    urls.write_text(f"{file_url(a, 'uri')}\n{file_url(a, 'path')}\n")
    settings = settings_for("http://127.0.0.1:9/unused", urls_file=urls)
    planner = Planner(settings, FakeTap(shapes_db()))  # type: ignore[arg-type]
    items = [i for p in asyncio.run(collect(planner)) for i in p]
    assert [i.url for i in items] == [file_url(a, "uri")]
    assert planner.guard.merged == 1 and planner.statements == []


@pytest.mark.parametrize("form", ["uri", "path"])
def test_the_same_file_offered_by_two_observations_is_one_download(form: str, caplog) -> None:
    with caplog.at_level("DEBUG", logger="engine.plan.planner"):
        planner, items = fake_plan(FakeTap(shapes_db(form=form, twin=0)), sector=1, cameras=[1], ccds=[2])
    assert len(items) == len(IN_MIDDLE) and planner.guard.merged == 1
    assert_clean(items)
    # The other observation's URL is kept as a fallback of the one download, not lost.
    offered = [r.getMessage() for r in caplog.records if "also offered at" in r.getMessage()]
    assert len(offered) == 1 and "mirror.example.org" in offered[0]


def test_rows_that_would_put_different_bytes_at_one_path_are_passed_on_once_as_a_failure() -> None:
    planner, items = fake_plan(FakeTap(shapes_db(twin=7)), page_size=None, sector=1, cameras=[1], ccds=[2])
    lc = "tess2018206045859-s0001-0000000000002002-0120-s_lc.fits"
    twins = [i for i in items if i.filename == lc]
    assert [i.size for i in twins] == [SIZE, SIZE + 7]  # the first planned, then its conflict
    assert planner.guard.conflicts == 1 and planner.guard.planned == len(IN_MIDDLE)
    # Passed on so the run records it; a guard there fails it again, naming both URLs.
    from engine.plan.invariants import PlanGuard

    again = PlanGuard("mast").admit(twins)
    ((failed, reason),) = again.failed
    assert failed is twins[1] and twins[0].url in reason and twins[1].url in reason


def test_a_service_that_stops_answering_is_not_split_or_replanned() -> None:
    from engine.exceptions import TapUnavailableError

    down = TapUnavailableError(f"the TAP service at {SERVICE} does not answer")
    tap = FakeTap(shapes_db(), fail=lambda q: down if "caomartifact" in q and "TAP_SCHEMA" not in q else None)
    with pytest.raises(TapUnavailableError):
        fake_plan(tap, sector=1, cameras=[1], ccds=[2])
    assert sum("caomartifact" in q for q in tap.sent) == 1


def test_a_refused_query_is_a_query_fault() -> None:
    from engine.exceptions import TapJobError, TapTimeoutError
    from engine.plan.planner import _is_query_fault

    assert _is_query_fault(TapJobError(f"the TAP service at {SERVICE} refused the query (HTTP 400): bad"))
    assert _is_query_fault(TapJobError(f"the TAP service at {SERVICE} could not run the query: syntax error"))
    assert not _is_query_fault(TapJobError(f"the TAP service at {SERVICE} could not run the query: timeout"))
    assert not _is_query_fault(TapJobError(f"the TAP job at {SERVICE}/table/1 ended ABORTED: column scan"))
    assert not _is_query_fault(TapTimeoutError("the TAP job was still EXECUTING after 600 s"))


@pytest.mark.parametrize("artifacts", [True, False])
def test_a_selection_whose_every_row_is_unusable_says_what_was_dropped(artifacts: bool) -> None:
    settings = settings_for("http://127.0.0.1:9/unused", page_size=4, sector=1, cameras=[1], ccds=[2])
    planner = Planner(settings, FakeTap(shapes_db(form="ftp", artifacts=artifacts)))  # type: ignore[arg-type]
    dropped: list[str] = []

    async def consume() -> None:
        async for page in planner.pages():
            assert page == [] and planner.last_page is not None  # yielded so its drops can be read
            dropped.extend(item.url for item, _ in planner.last_page.dropped)

    with pytest.raises(EmptySelectionError, match=r"2 rows were dropped: unusable URL scheme: 2"):
        asyncio.run(consume())
    assert len(dropped) == 2 and all(url.startswith("ftp://") for url in dropped)
