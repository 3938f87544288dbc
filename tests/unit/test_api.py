"""engine.api: the Python entry points (explicit keywords, a worker thread, the results table)."""

from __future__ import annotations

import asyncio
import inspect
import threading
from pathlib import Path

import pytest
from astropy.table import Table

import engine
from engine.api import Results, build_settings, mirror, outcome_table, plan, retry, run_in_thread
from engine.archive.faults import FaultPlan
from engine.exceptions import ConfigError
from engine.manager import RunOutcome
from tests.helpers import lc_names_in_footprint

LC = "tess2018206045859-s0001-0000000025155310-0120-s_lc.fits"


def test_the_package_exports_the_api_the_settings_and_the_exceptions():
    from engine.exceptions import ArchiveError, LocalError, TessMirrorError
    from engine.settings import Settings

    assert engine.mirror is mirror and engine.plan is plan and engine.retry is retry
    assert engine.Settings is Settings
    assert engine.TessMirrorError is TessMirrorError and engine.ConfigError is ConfigError
    assert engine.ArchiveError is ArchiveError and engine.LocalError is LocalError
    with pytest.raises(AttributeError):
        engine.no_such_thing  # noqa: B018 - the attribute access is the test


@pytest.mark.parametrize("function", [mirror, plan, retry, build_settings, engine.mirror_async])
def test_public_calls_take_explicit_keywords_and_carry_numpydoc(function):
    kinds = {p.kind for p in inspect.signature(function).parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds
    doc = inspect.getdoc(function) or ""
    assert "Returns\n    -------" in doc or "Returns\n-------" in doc


def test_an_unknown_keyword_is_a_type_error_not_silently_ignored():
    with pytest.raises(TypeError):
        mirror(sectr=1)  # type: ignore[call-arg]


def test_bad_keyword_values_raise_config_error_naming_the_key():
    with pytest.raises(ConfigError) as info:
        build_settings(sector=1, camera=5)
    assert info.value.key == "selection.cameras"


def fake_outcome(out_dir: Path) -> RunOutcome:
    rows = Table(
        {
            "url": ["http://example.org/" + LC, "http://example.org/x_dvr.pdf"],
            "filename": [LC, "x_dvr.pdf"],
            "obs_id": ["o1", "o2"],
            "path": [f"tid/s0001/{LC}", "x_dvr.pdf"],
            "status": ["verified", "failed"],
            "action": ["downloaded", "failed"],
            "nbytes": [2880, 0],
            "md5": ["ab" * 16, ""],
            "error": ["", "HTTP 404"],
        }
    )
    return RunOutcome(results=rows, planned=2, downloaded=1, failed=1, nbytes=2880)


def test_the_results_table_has_absolute_paths_tic_sector_product_and_the_counts(tmp_path):
    results = outcome_table(fake_outcome(tmp_path / "m"), tmp_path / "m")
    assert isinstance(results, Results)
    first = results[0]
    assert first["path"] == str((tmp_path / "m").resolve() / "tid" / "s0001" / LC)
    assert (first["tic"], first["sector"], first["product"], first["bytes"]) == (25155310, 1, "lc", 2880)
    assert results[1]["product"] == "dvr" and results[1]["tic"] == 0 and results[1]["sector"] == -1
    assert results.meta["out_dir"] == str((tmp_path / "m").resolve())
    assert (results.meta["planned"], results.meta["failed"], results.meta["exit_code"]) == (2, 1, 1)
    assert list(results.errors["error"]) == ["HTTP 404"] and not results.ok


def test_run_in_thread_works_inside_a_running_loop_and_raises_the_coroutines_error():
    async def answer() -> str:
        return threading.current_thread().name

    async def broken() -> None:
        raise ConfigError("x.y", "bad")

    async def cell() -> None:
        assert run_in_thread(answer) == "tessmirror-run"
        with pytest.raises(ConfigError):
            run_in_thread(broken)

    asyncio.run(cell())


def test_plan_returns_the_plan_as_a_table_and_downloads_nothing(archive):
    arc = archive(targets=24, focus=(1, 1, 2))
    expected = lc_names_in_footprint(arc, 1, 1, 2)
    table = plan(tap_url=arc.tap_url, sector=1, camera=1, ccd=2)
    assert set(table["filename"]) == expected
    assert table.meta["files"] == len(expected)
    assert table.meta["bytes"] == sum(arc.catalog[name].size for name in expected)
    assert table.meta["by_product"] == {"lc": len(expected)}
    assert any(line.startswith("files ") for line in table.meta["summary"])
    assert not any("/Download/" in str(entry) for entry in arc.request_log)


def test_retry_downloads_just_the_failures_again(archive, tmp_path):
    # Every file's first request fails; with no retries all fail, and retry() gets them all.
    arc = archive(targets=24, focus=(1, 1, 2), faults=FaultPlan.from_spec("500=1:attempts=1"))
    expected = lc_names_in_footprint(arc, 1, 1, 2)
    results = mirror(tap_url=arc.tap_url, sector=1, camera=1, ccd=2, out_dir=tmp_path / "m", retries=0)
    assert len(results.errors) == len(expected) and results.meta["exit_code"] == 1
    again = retry(results, retries=0)
    assert len(again) == len(results) and not len(again.errors)
    assert again.meta["exit_code"] == 0 and again.meta["failed"] == 0
    assert all(Path(p).is_file() for p in again["path"])
    assert set(again["status"]) == {"verified"}
