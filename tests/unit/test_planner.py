"""engine.plan.planner against the archive's TAP service with a small CAOM-shaped catalogue."""

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
from engine.plan.planner import Planner, _Cursor
from engine.plan.tap import TapClient
from engine.settings import Selection, Settings, TapSettings
from tests.unit.test_plan_tap import char, number, serve

pytestmark = pytest.mark.integration
DOWNLOAD = "http://files.example.org/api/v0.1/Download/file?uri="
SIZE = 2039040
# Footprints of sector 1: camera 1 CCD 2 (RA 10..12) and camera 1 CCD 1 (RA 11..13), overlapping.
FFIS = {
    (1, 2): ("tess2018207052942-s0001-1-2-0120-s", "POLYGON 10 -6 12 -6 12 -4 10 -4 10 -6"),
    (1, 1): ("tess2018207052942-s0001-1-1-0120-s", "POLYGON 11 -6 13 -6 13 -4 11 -4 11 -6"),
}


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


def test_fallback_without_artifact_tables() -> None:
    planner, pages = run_plan(caom_db(artifacts=False), sector=1, cameras=[1], ccds=[2])
    items = [item for page in pages for item in page]
    assert planner.artifacts is False
    assert sorted(i.obs_id for i in items) == sorted(expected_obs(10, 12))
    assert all(i.size == -1 and i.md5 == "" and i.est_kb == 1991 and i.product == "lc" for i in items)


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


def test_overlapping_footprints_are_deduplicated() -> None:
    _planner, pages = run_plan(caom_db(), sector=1, cameras=[1], ccds=[1, 2])
    urls = [i.url for p in pages for i in p]
    assert len(urls) == len(set(urls))
    assert {i.obs_id for p in pages for i in p} == expected_obs(10, 13)


def test_untrusted_sizes_and_checksums_become_unknown() -> None:
    _planner, pages = run_plan(caom_db(bad_values=True), polygon=[10, -6, 12, -6, 12, -4, 10, -4])
    hostile = next(i for p in pages for i in p if "it's" in i.obs_id)
    assert (hostile.size, hostile.md5) == (-1, "")


def test_sectors_filter_and_cone() -> None:
    _planner, pages = run_plan(caom_db(), cone=(11.0, -5.0, 1.0), sectors=[2])
    items = [i for p in pages for i in p]
    assert items and all(i.sector == 2 for i in items)
    assert {i.obs_id for i in items} == {o for o in expected_obs(10, 12) if "-s0002-" in o}


def test_missing_footprint_names_sector_camera_and_ccd() -> None:
    with pytest.raises(EmptySelectionError, match="sector 1, camera 3 ccd 4"):
        run_plan(caom_db(), sector=1, cameras=[3], ccds=[4])


def test_nothing_matched_is_an_empty_selection() -> None:
    with pytest.raises(EmptySelectionError, match="the selection matched no files"):
        run_plan(caom_db(), polygon=[100, 10, 101, 10, 101, 11])


def test_targets_file(tmp_path: Path) -> None:
    targets = tmp_path / "targets.txt"
    targets.write_text("# two targets\nTIC 1001\n1004\n")
    _planner, pages = run_plan(caom_db(), targets_file=targets)
    assert sorted(i.target_name for p in pages for i in p) == ["1001", "1001", "1004"]  # 1001: two sectors


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


def test_footprints_page_through_a_service_limit_of_two_rows() -> None:
    # Two CCDs' exposures asked with pages of two rows: each CCD's obs_id list is paged, never cut.
    planner, pages = run_plan(caom_db(), TapOptions(default_maxrec=2, hard_limit=2), page_size=None, sector=1,
                              cameras=[1], ccds=[1, 2])  # fmt: skip
    assert [(d.camera, d.ccd) for d in planner.detectors] == [(1, 1), (1, 2)]
    assert {i.obs_id for p in pages for i in p} == expected_obs(10, 13)


def test_a_page_that_cannot_be_split_is_an_incomplete_plan() -> None:
    # A full page of one row: the next page would start at the same key, forever.
    with pytest.raises(IncompletePlanError, match="cannot be paged further") as info:
        run_plan(caom_db(), TapOptions(default_maxrec=1, hard_limit=1), page_size=None, sector=1,
                 cameras=[1], ccds=[2])  # fmt: skip
    assert "tap.page_size" in str(info.value)


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
