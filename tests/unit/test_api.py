"""engine.api: the Python entry points (shared typed keywords, a worker thread, the results table)."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
import threading
import typing
from pathlib import Path

import pytest
from astropy.table import Table

import engine
from engine import api
from engine.api import Results, build_settings, mirror, outcome_table, plan, retry, run_in_thread
from engine.archive.faults import FaultPlan
from engine.exceptions import ConfigError
from engine.manager import RunOutcome
from engine.settings import Settings
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


def test_every_public_name_resolves_to_the_object_of_the_module_that_defines_it():
    from engine import api, exceptions, settings

    for name in engine.__all__:
        value = getattr(engine, name)
        if name != "__version__":
            home = {"engine.api": api, "engine.exceptions": exceptions, "engine.settings": settings}
            assert getattr(home[value.__module__], name) is value, name
    assert sorted(dir(engine)) == sorted(engine.__all__)


def test_an_exception_from_the_package_does_not_load_the_api():
    script = (
        "import sys, engine\n"
        "engine.ConfigError, engine.Settings\n"
        "assert 'engine.api' not in sys.modules, 'the API was loaded'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


PUBLIC_CALLS = [mirror, engine.mirror_async, plan, engine.plan_async, retry, build_settings]
OPTIONS = {
    mirror: "MirrorOptions",
    engine.mirror_async: "MirrorOptions",
    plan: "PlanOptions",
    engine.plan_async: "PlanOptions",
    retry: "FetchOptions",
    build_settings: "MirrorOptions",
}


@pytest.mark.parametrize("function", PUBLIC_CALLS, ids=lambda f: f.__name__)
def test_public_calls_take_the_shared_keywords_as_typed_options_and_carry_numpydoc(function):
    parameters = list(inspect.signature(function).parameters.values())
    options = parameters[-1]
    assert options.kind is inspect.Parameter.VAR_KEYWORD
    assert options.annotation == f"Unpack[{OPTIONS[function]}]"  # PEP 692: type checkers and IDEs
    assert all(p.kind is not p.POSITIONAL_OR_KEYWORD for p in parameters[1:])  # keyword-only after
    doc = inspect.getdoc(function) or ""
    for section in ("Parameters", "Returns", "Raises"):
        assert f"\n{section}\n{'-' * len(section)}\n" in doc, section
    assert "**options" in doc and OPTIONS[function] in doc


def test_each_keyword_is_declared_once_with_the_configuration_key_it_sets():
    hints = typing.get_type_hints(api.MirrorOptions, include_extras=True)
    assert set(api.KEYWORDS) == set(hints) and len(hints) == 34
    assert api.KEYWORDS["camera"] == api.KEYWORDS["cameras"] == "selection.cameras"
    assert (api.KEYWORDS["verify"], api.KEYWORDS["tap_url"]) == ("verify.level", "tap.url")
    assert set(api.PlanOptions.__optional_keys__) | set(api.FetchOptions.__optional_keys__) < set(hints)
    defaults = Settings()
    for name, key in api.KEYWORDS.items():
        section, field = key.split(".")
        assert hasattr(getattr(defaults, section), field), (name, key)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: mirror(sectr=1),
            "mirror() got an unexpected keyword argument 'sectr'; did you mean 'sector'?",
        ),
        (lambda: plan(camra=1), "plan() got an unexpected keyword argument 'camra'; did you mean 'camera'?"),
        (lambda: mirror(progres=False), "did you mean 'progress'?"),
        (lambda: build_settings(out_dri="x"), "did you mean 'out_dir'?"),
        (lambda: retry(Results(), retrys=2), "retry() got an unexpected keyword argument 'retrys'"),
        (lambda: plan(out_dir="x"), "'out_dir' is a keyword of mirror() and build_settings()"),
        (lambda: asyncio.run(engine.mirror_async(sectr=1)), "mirror_async() got an unexpected keyword"),
        (lambda: asyncio.run(engine.plan_async(sectr=1)), "did you mean 'sector'?"),
        (lambda: build_settings(zzz=1), "'zzz'; help(build_settings) lists the keywords"),
    ],
)
def test_an_unknown_keyword_is_a_type_error_naming_it_and_the_nearest_known_one(call, message):
    with pytest.raises(TypeError) as info:
        call()
    assert message in str(info.value)


def test_an_unknown_keyword_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(TypeError, match="'sectr'"):
        mirror(sector=1, sectr=1, out_dir=tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_the_keywords_reach_the_settings_as_on_the_command_line(tmp_path):
    settings = build_settings(
        sector=3,
        camera=2,
        ccds=(1, 4),
        sectors="1-3",
        products=("lc", "tp"),
        out_dir=tmp_path,
        concurrency=4,
        retries=0,
        verify="size",
        force=True,
        footprint="composite",
    )
    selection = settings.selection
    assert (selection.sector, selection.cameras, selection.ccds) == (3, [2], [1, 4])
    assert selection.products == ["lc", "tp"] and selection.footprint == "composite"
    assert (settings.fetch.concurrency, settings.fetch.retries, settings.verify.level.name) == (4, 0, "SIZE")
    assert settings.run.force is True and settings.output.out_dir == tmp_path


def test_camera_wins_over_cameras_and_none_means_not_given():
    assert build_settings(sector=1, camera=2, cameras=[3]).selection.cameras == [2]
    assert build_settings(sector=1, cameras=[3], camera=2).selection.cameras == [2]
    assert build_settings(sector=1, camera=None, cameras=[3]).selection.cameras == [3]
    assert build_settings(sector=1, tap_url=None).tap.url == Settings().tap.url


def test_the_cluster_keywords_reach_the_cluster_table(tmp_path):
    settings = build_settings(
        sector=1, out_dir=tmp_path, cluster="local", jobs=3, job_concurrency=2, walltime="01:00:00"
    )
    cluster = settings.cluster
    assert (cluster.mode, cluster.jobs, cluster.job_concurrency) == ("local", 3, 2)
    assert cluster.walltime == "01:00:00"
    with pytest.raises(ConfigError) as info:
        build_settings(sector=1, cluster="local", jobs=0)
    assert info.value.key == "cluster.jobs"


def test_slurm_runner_from_python_is_refused_with_the_command_to_run_instead(tmp_path):
    with pytest.raises(ConfigError) as info:
        mirror(sector=1, out_dir=tmp_path / "m", cluster="slurm-runner", progress=False)
    assert info.value.key == "cluster.mode" and "srun tessmirror run" in (info.value.hint or "")
    assert not (tmp_path / "m").exists()  # refused before anything ran


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
