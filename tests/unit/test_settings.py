"""The schema validates itself: every section of `Settings` checks its values when it is built."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from engine.config import load_settings, validate_settings
from engine.exceptions import ConfigError
from engine.models import VerifyLevel
from engine.settings import (
    AUTO,
    ClusterSettings,
    FetchSettings,
    OutputSettings,
    RunSettings,
    Selection,
    Settings,
    TapSettings,
    VerifySettings,
)

SECTIONS: dict[str, type] = {
    "tap": TapSettings,
    "selection": Selection,
    "output": OutputSettings,
    "fetch": FetchSettings,
    "verify": VerifySettings,
    "run": RunSettings,
    "cluster": ClusterSettings,
}

# (dotted key, a bad value of the right type, words the error says): the loader gives the same line.
BAD_VALUES: list[tuple[str, Any, str]] = [
    ("tap.page_size", 0, "0 is below the minimum 1"),
    ("tap.retries", -1, "-1 is below the minimum 0"),
    ("tap.poll_timeout", 0.0, "timeout 0.0 must be positive"),
    ("tap.job_timeout", -5.0, "timeout -5.0 must be positive"),
    ("tap.request_timeout", 0.0, "timeout 0.0 must be positive"),
    ("selection.sector", 0, "sector 0 is outside 1..200"),
    ("selection.sectors", [1, 201], "sector 201 is outside 1..200"),
    ("selection.cameras", [5], "camera 5 is outside 1..4"),
    ("selection.ccds", [0], "CCD 0 is outside 1..4"),
    ("selection.polygon", [10.0, -5.0, 12.0, -5.0], "a polygon needs at least 3 vertices, got 2"),
    ("selection.cone", (10.0, 95.0, 1.0), "declination 95.0 is outside -90..90"),
    ("selection.products", ["lc", "movie"], "unknown product type 'movie'"),
    ("selection.footprint", "edge", "unknown footprint 'edge'"),
    ("selection.collection", " ", "must not be empty"),
    ("output.layout", "tree", "unknown layout 'tree'"),
    ("fetch.connect_timeout", 0.0, "timeout 0.0 must be positive"),
    ("fetch.idle_timeout", -1.0, "timeout -1.0 must be positive"),
    ("fetch.concurrency", 0, "0 is outside 1..256"),
    ("fetch.concurrency", 257, "257 is outside 1..256"),
    ("fetch.max_connections", 0, "0 is outside 1..256"),
    ("fetch.per_host", 0, "0 is below the minimum 1"),
    ("fetch.chunk_size", 1000, "1000 is below the minimum 1024"),
    ("fetch.chunk_size", 128 * 1024 * 1024, "is above the maximum 67108864 (64 MiB)"),
    ("fetch.max_file_size", 0, "0 is below the minimum 1"),
    ("fetch.retries", -1, "-1 is below the minimum 0"),
    ("fetch.max_redirects", -1, "-1 is below the minimum 0"),
    ("fetch.backoff_initial", -1.0, "-1.0 is below the minimum 0"),
    ("fetch.backoff_max", 0.5, "0.5 is below the minimum 1.0"),
    ("fetch.est_size_tolerance", -0.1, "-0.1 is below the minimum 0"),
    ("fetch.bandwidth_limit", 0.0, "must be positive bytes/s"),
    ("verify.workers", 0, "0 is below the minimum 1"),
    ("run.progress_interval", -1.0, "-1.0 is below the minimum 0"),
    ("run.log_level", "LOUD", "unknown level 'LOUD'"),
    ("run.shard", "4/4", "K must be 0 to N-1"),
    ("cluster.mode", "kubernetes", "is not a cluster"),
    ("cluster.jobs", 0, "0 is outside 1..10000"),
    ("cluster.job_concurrency", 0, "0 is outside 1..256"),
    ("cluster.walltime", "four hours", "is not HH:MM:SS"),
    ("cluster.job_memory", "lots", "is not an amount of memory"),
    ("cluster.job_extra", ["qos=debug"], "is not an sbatch option"),
    ("cluster.job_cores", 0, "0 must be at least 1"),
    ("cluster.batch_files", 0, "0 must be at least 1"),
    ("cluster.batch_bytes", 0, "0 must be positive"),
]


def build(key: str, value: Any) -> object:
    section, name = key.split(".", 1)
    return SECTIONS[section](**{name: value})


@pytest.mark.parametrize("cls", list(SECTIONS.values()), ids=lambda cls: cls.__name__)
def test_every_section_builds_from_its_defaults_and_they_pass_its_check_again(cls: type) -> None:
    section = cls()
    section.validate()
    assert section == cls()


def test_the_default_settings_pass_the_whole_settings_check() -> None:
    validate_settings(Settings())


@pytest.mark.parametrize(("key", "value", "words"), BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_a_bad_value_given_to_a_section_constructor_raises_config_error_naming_its_key(
    key: str, value: Any, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        build(key, value)
    assert caught.value.key == key
    assert words in str(caught.value)
    assert caught.value.hint  # the fix, not only the fault


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("tap.page_size", 0),
        ("fetch.retries", -1),
        ("fetch.concurrency", 0),
        ("fetch.chunk_size", 1000),
        ("verify.workers", 0),
        ("run.log_level", "LOUD"),
        ("cluster.jobs", 0),
        ("selection.footprint", "edge"),
    ],
)
def test_the_constructor_says_what_the_toml_loader_says(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as by_hand:
        build(key, value)
    with pytest.raises(ConfigError) as loaded:
        load_settings(None, {key: value}, require_selection=False)
    assert str(by_hand.value) == str(loaded.value)
    assert by_hand.value.hint == loaded.value.hint


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("fetch", "fetch.retries", -1),
        ("fetch", "fetch.concurrency", 1000),
        ("tap", "tap.retries", -2),
        ("run", "run.shard", "9"),
        ("cluster", "cluster.batch_files", 0),
        ("selection", "selection.products", []),
    ],
)
def test_dataclasses_replace_with_a_bad_value_raises_config_error_naming_its_key(
    section: str, key: str, value: Any
) -> None:
    with pytest.raises(ConfigError) as caught:
        dataclasses.replace(getattr(Settings(), section), **{key.split(".", 1)[1]: value})
    assert caught.value.key == key


def test_a_value_of_the_wrong_type_raises_config_error_naming_its_key() -> None:
    with pytest.raises(ConfigError, match=r"^fetch\.retries: expected an integer, got '3'$"):
        FetchSettings(retries="3")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^verify\.workers: expected an integer, got True$"):
        VerifySettings(workers=True)
    with pytest.raises(ConfigError, match=r"^output\.fsync: expected true or false, got 'no'$"):
        OutputSettings(fsync="no")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^tap\.poll_timeout: expected a finite number, got nan$"):
        TapSettings(poll_timeout=float("nan"))
    with pytest.raises(ConfigError, match=r"^fetch: expected a FetchSettings"):
        Settings(fetch=None)  # type: ignore[arg-type]


def test_auto_concurrency_and_the_cluster_drivers_per_job_fetch_settings_stay_valid() -> None:
    fetch = FetchSettings(concurrency=AUTO, bandwidth_limit=1e6)
    assert fetch.auto_concurrency and fetch.connections == fetch.max_connections
    per_job = dataclasses.replace(fetch, concurrency=8, per_host=8, bandwidth_limit=1e6 / 3)
    assert per_job.connections == 8


def test_an_int_is_accepted_for_a_float_field_and_a_str_path_becomes_a_path(tmp_path: Path) -> None:
    assert TapSettings(poll_timeout=2).poll_timeout == 2
    output = OutputSettings(out_dir=str(tmp_path))  # type: ignore[arg-type]
    assert output.out_dir == tmp_path
    assert Settings(output=output).state_dir == tmp_path / ".tessmirror"


def test_construction_normalizes_as_the_loader_does() -> None:
    assert RunSettings(log_level="debug").log_level == "DEBUG"
    assert RunSettings(shard="1/4").shard == "1/4"
    assert VerifySettings(level="size").level is VerifyLevel.SIZE  # type: ignore[arg-type]
    closed = Selection(polygon=[10.0, -5.0, 12.0, -5.0, 11.0, -3.0, 10.0, -5.0])
    assert closed.polygon == [10.0, -5.0, 12.0, -5.0, 11.0, -3.0]
    assert Selection(products=["LC", "lc", "tp"]).products == ["lc", "tp"]
    assert Selection(cone=[330.3, -44.3, 0.5]).cone == (330.3, -44.3, 0.5)  # type: ignore[arg-type]
    cluster = ClusterSettings(walltime=" 04:00:00 ", job_memory=" 4GB")
    assert (cluster.walltime, cluster.job_memory) == ("04:00:00", "4GB")


def test_urls_and_the_source_are_checked_when_built() -> None:
    with pytest.raises(ConfigError, match=r"^tap\.url: 'x' is not an http\(s\) URL with a host"):
        TapSettings(url="x")
    with pytest.raises(ConfigError, match=r"^fetch\.source: unknown source 'gopher' "):
        FetchSettings(source="gopher")
    with pytest.raises(ConfigError, match=r"^fetch\.s3_endpoint: 'ftp://x' is not an http\(s\) URL"):
        FetchSettings(s3_endpoint="ftp://x")


def test_checks_across_sections_wait_for_the_whole_settings_check() -> None:
    # A second region builds (one section cannot see the other region's flag) ...
    selection = Selection(sector=1, cone=(10.0, 5.0, 1.0))
    # ... and the whole-settings check, which every run makes, refuses it with the loader's words.
    with pytest.raises(ConfigError, match=r"conflicting selections"):
        validate_settings(Settings(selection=selection))


def test_a_value_changed_after_construction_is_caught_by_the_whole_settings_check() -> None:
    settings = Settings()
    settings.fetch.retries = -1
    with pytest.raises(ConfigError, match=r"^fetch\.retries: -1 is below the minimum 0 "):
        validate_settings(settings)
    settings.fetch.retries = 3
    settings.run.log_level = "warning"
    validate_settings(settings)
    assert settings.run.log_level == "WARNING"
