"""The planner against MAST's real shapes, as a user runs it: the CLI in a subprocess against the local
archive started with `ArchiveOptions.mast_like(...)` (one CAOM observation per FFI exposure with
jittered polygons, one ObsCore row per product, both URL forms, redirects to a second host, chunked
answers, NULL checksums and lengths).

The expected files are counted from the archive's catalogue (`Catalog.files_inside`, the same
spherical test the archive placed its targets with), never through the planner's code.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.archive import ArchiveOptions, ArchiveThread, LocalArchive
from engine.layout import relpath_for
from engine.models import PlanItem
from engine.plan.table import filename_from_url, iter_plan
from tests.helpers import assert_mirror_matches_truth, mirrored_files, run_cli

pytestmark = pytest.mark.integration

EXPOSURES = 24  # per CCD: far more rows than one footprint, few enough to build quickly
TARGETS = 160  # about ten light curves per CCD of sector 1
CCDS = [(camera, ccd) for camera in (1, 2, 3, 4) for ccd in (1, 2, 3, 4)]


@pytest.fixture(scope="module", params=["uri", "path"])
def mast(request: pytest.FixtureRequest) -> Iterator[LocalArchive]:
    """The local archive shaped like MAST, in one URL form; shared by the tests of this module."""
    options = ArchiveOptions.mast_like(
        sectors=(1,),
        targets=TARGETS,
        file_size="small",
        exposures_per_ccd=EXPOSURES,
        url_form=request.param,
    )
    with ArchiveThread(options) as thread:
        yield thread.archive


def plan(archive: LocalArchive, tmp_path: Path, *args: object) -> list[PlanItem]:
    """`tessmirror plan ARGS --format ecsv -o FILE`, read back; the run must be clean."""
    out = tmp_path / "plan.ecsv"
    proc = run_cli("plan", "--tap-url", archive.tap_url, *args, "--format", "ecsv", "-o", out, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr
    return list(iter_plan(out))


def expected_names(archive: LocalArchive, ccds: list[tuple[int, int]], **kwargs: object) -> set[str]:
    """The catalogue's files inside the middle exposure's polygon of each CCD (the default footprint)."""
    catalog = archive.catalog
    assert catalog is not None
    names: set[str] = set()
    for camera, ccd in ccds:
        polygon = catalog.middle_exposure((1, camera, ccd)).vertices
        names |= {f.name for f in catalog.files_inside(polygon, **kwargs)}  # type: ignore[arg-type]
    return names


def assert_plan_is_clean(archive: LocalArchive, items: list[PlanItem]) -> None:
    """One row per destination, every URL names its file, and declared values are the catalogue's."""
    catalog = archive.catalog
    assert catalog is not None
    paths = [relpath_for(item, "mast") for item in items]
    assert len(paths) == len(set(paths)), "two rows share one destination"
    for item in items:
        assert filename_from_url(item.url) == item.filename, f"{item.url} does not name {item.filename}"
        truth = catalog[item.filename]
        assert item.md5 in ("", truth.md5), f"{item.filename}: another file's md5"
        assert item.size in (-1, truth.size), f"{item.filename}: another file's size"
        assert item.est_kb in (-1, round(truth.size / 1024)), f"{item.filename}: another file's estimate"


def test_a_whole_sector_plans_exactly_the_light_curves_inside_its_sixteen_footprints(mast, tmp_path):
    items = plan(mast, tmp_path, "--sector", "1")
    expected = expected_names(mast, CCDS)
    assert len(expected) >= 100
    assert sorted(item.filename for item in items) == sorted(expected)
    assert_plan_is_clean(mast, items)
    assert {item.product for item in items} == {"lc"}


def test_one_ccd_plans_exactly_its_light_curves_never_paired_with_another_products_url(mast, tmp_path):
    items = plan(mast, tmp_path, "--sector", "1", "--camera", "1", "--ccd", "2", "--products", "lc,tp")
    expected = expected_names(mast, [(1, 2)], products=("lc", "tp"))
    assert len(expected) >= 8
    assert sorted(item.filename for item in items) == sorted(expected)
    assert_plan_is_clean(mast, items)
    # The artifact join gave exact sizes, and md5s wherever the archive has them (some are NULL).
    assert all(item.size > 0 or item.est_kb > 0 for item in items)
    assert sum(bool(item.md5) for item in items) >= len(items) // 2


def test_the_composite_footprint_adds_the_edge_targets_of_the_first_and_last_exposures(mast, tmp_path):
    items = plan(mast, tmp_path, "--sector", "1", "--camera", "1", "--ccd", "2", "--footprint", "composite")
    catalog = mast.catalog
    exposures = catalog.exposures[(1, 1, 2)]
    expected: set[str] = set()
    for exposure in (exposures[0], catalog.middle_exposure((1, 1, 2)), exposures[-1]):
        expected |= {f.name for f in catalog.files_inside(exposure.vertices)}
    assert sorted(item.filename for item in items) == sorted(expected)
    assert_plan_is_clean(mast, items)


def test_ffic_for_one_ccd_plans_every_exposures_image_and_a_run_verifies_them(mast, tmp_path):
    items = plan(mast, tmp_path, "--sector", "1", "--camera", "1", "--ccd", "2", "--products", "ffic")
    expected = {f"{e.obs_id}_ffic.fits" for e in mast.catalog.exposures[(1, 1, 2)]}
    assert len(expected) == EXPOSURES
    assert sorted(item.filename for item in items) == sorted(expected)
    assert_plan_is_clean(mast, items)
    out = tmp_path / "ffi"
    args = ("--sector", "1", "--camera", "1", "--ccd", "2", "--products", "ffic")
    proc = run_cli(
        "run", "--tap-url", mast.tap_url, *args, "--out", out, "--progress-interval", "0", timeout=240
    )
    assert proc.returncode == 0, proc.stderr
    assert_mirror_matches_truth(out, mast, expected)
    assert set(mirrored_files(out)) == expected


def test_a_run_of_the_one_ccd_plan_verifies_every_file(mast, tmp_path):
    expected = expected_names(mast, [(1, 2)])
    out = tmp_path / "mirror"
    args = ("--sector", "1", "--camera", "1", "--ccd", "2")
    proc = run_cli(
        "run", "--tap-url", mast.tap_url, *args, "--out", out, "--progress-interval", "0", timeout=240
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"downloaded  {len(expected)}" in proc.stderr and "failed      0" in proc.stderr
    assert_mirror_matches_truth(out, mast, expected)
    assert set(mirrored_files(out)) == expected


def test_hlsp_collection_plans_the_qlp_light_curves_inside_the_footprint(mast, tmp_path):
    items = plan(mast, tmp_path, "--sector", "1", "--camera", "1", "--ccd", "2", "--collection", "HLSP")
    expected = expected_names(mast, [(1, 2)], products=("llc",), collection="HLSP")
    assert sorted(item.filename for item in items) == sorted(expected)
    assert all(item.filename.endswith("_llc.fits") and item.product == "lc" for item in items)
    assert_plan_is_clean(mast, items)


def test_targets_with_padded_tic_ids_are_found_and_unknown_ones_are_named(mast, tmp_path):
    catalog = mast.catalog
    some = sorted(catalog.files_inside(catalog.middle_exposure((1, 1, 2)).vertices), key=lambda f: f.name)[:2]
    tics = [f.identity.tic for f in some]
    targets = tmp_path / "targets.txt"
    targets.write_text(f"TIC {tics[0]:016d}\ntic{tics[1]}\n0000000000000007\n")
    out = tmp_path / "plan.ecsv"
    proc = run_cli("plan", "--tap-url", mast.tap_url, "--targets", targets, "--sectors", "1", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(item.filename for item in iter_plan(out)) == sorted(f.name for f in some)
    assert "1 of 3 targets matched no file" in proc.stderr and proc.stderr.count("matched no file") == 1
    assert ": 7" in proc.stderr


def test_a_join_the_service_aborts_is_split_then_planned_from_obscore_with_one_warning(tmp_path):
    # Every query that joins dbo.caomartifact takes 3 s and the service aborts jobs after 1 s, as MAST
    # aborts long joins: the sector-by-sector retry fails too, and planning falls back to ObsCore.
    options = ArchiveOptions.mast_like(
        sectors=(1,), targets=64, file_size="small", exposures_per_ccd=8, slow_join=3.0, async_abort_after=1.0
    )
    config = tmp_path / "tessmirror.toml"
    config.write_text("[tap]\npoll_timeout = 1.0\njob_timeout = 20.0\nretries = 0\n")
    with ArchiveThread(options) as thread:
        archive = thread.archive
        out = tmp_path / "plan.ecsv"
        args = ("--sector", "1", "--camera", "1", "--ccd", "2", "--format", "ecsv", "-o", out)
        proc = run_cli("plan", "--config", config, "--tap-url", archive.tap_url, *args, timeout=240)
        assert proc.returncode == 0, proc.stderr
        warnings = [
            line for line in proc.stderr.splitlines() if "artifact join" in line and "WARNING" in line
        ]
        assert len(warnings) == 1 and "planning from ObsCore only" in warnings[0], proc.stderr
        assert "sector by sector" in proc.stderr  # the smaller pieces were tried first
        items = list(iter_plan(out))
        assert sorted(item.filename for item in items) == sorted(expected_names(archive, [(1, 2)]))
        assert all(item.md5 == "" and item.size == -1 and item.est_kb > 0 for item in items)
        assert_plan_is_clean(archive, items)
