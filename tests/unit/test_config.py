"""engine.config: TOML + CLI overrides -> validated Settings, with messages that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.config import KEYS, load_settings, parse_cone, parse_polygon, parse_sectors
from engine.exceptions import ConfigError
from engine.models import VerifyLevel
from engine.settings import PRODUCT_SUFFIXES, Settings

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config.example.toml"
SELECTED = {"selection.sector": 1}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tessmirror.toml"
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path | None, overrides: dict[str, object] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(path, overrides)
    return info.value


# -- the example file ---------------------------------------------------------------------------------
def test_example_file_loads_as_the_notebook_selection() -> None:
    settings = load_settings(EXAMPLE)
    assert settings.tap.url == "https://mast.stsci.edu/vo-tap/api/v0.1/caom"
    sel = settings.selection
    assert (sel.sector, sel.cameras, sel.ccds, sel.sectors, sel.products) == (1, [1], [2], None, ["lc"])
    assert settings.verify.level is VerifyLevel.FITS
    # Relative paths in the file are resolved against the file's folder.
    assert settings.output.out_dir == REPO / "tessmirror-data"


def test_example_file_documents_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    sections = re.split(r"(?m)^\[(\w+)\]\s*$", text)
    documented = {
        f"{section}.{key}"
        for section, body in zip(sections[1::2], sections[2::2], strict=True)
        for key in re.findall(r"(?m)^#?\s*(\w+)\s*=", body)
    }
    assert set(KEYS) <= documented, sorted(set(KEYS) - documented)


def test_keys_are_derived_from_the_settings_dataclasses() -> None:
    settings = Settings()
    for key in KEYS:
        section, name = key.split(".")
        assert hasattr(getattr(settings, section), name)
    assert "fetch.concurrency" in KEYS and "selection.polygon" in KEYS and "run.log_level" in KEYS


# -- overrides and paths ----------------------------------------------------------------------------
def test_cli_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[selection]\nsector = 3\n[fetch]\nconcurrency = 4\n")
    settings = load_settings(path, {"fetch.concurrency": 16, "selection.sector": "7", "tap.page_size": None})
    assert settings.fetch.concurrency == 16
    assert settings.selection.sector == 7
    assert settings.tap.page_size is None  # None means "flag not given"


def test_paths_resolve_against_the_file_folder_or_the_cwd(tmp_path: Path, monkeypatch) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    path = conf_dir / "c.toml"
    path.write_text('[output]\nout_dir = "data"\nstate_dir = "st"\n[selection]\nsector = 1\n')
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    settings = load_settings(path, {"selection.urls_file": "urls.txt"})
    assert settings.output.out_dir == conf_dir / "data"
    assert settings.output.state_dir == conf_dir / "st"
    assert settings.selection.urls_file == work / "urls.txt"
    absolute = load_settings(None, {"output.out_dir": str(tmp_path / "abs"), **SELECTED})
    assert absolute.output.out_dir == tmp_path / "abs"


def test_string_cli_values_are_converted() -> None:
    settings = load_settings(
        None,
        {
            "selection.sector": "1",
            "selection.cameras": "1,3",
            "selection.ccds": "1-4",
            "selection.sectors": "1,5-7",
            "selection.products": "lc,tp",
            "verify.level": "checksum",
            "output.fsync": "false",
            "fetch.bandwidth_limit": "1e6",
        },
    )
    sel = settings.selection
    assert (sel.cameras, sel.ccds, sel.sectors, sel.products) == (
        [1, 3],
        [1, 2, 3, 4],
        [1, 5, 6, 7],
        ["lc", "tp"],
    )
    assert settings.verify.level is VerifyLevel.CHECKSUM
    assert settings.output.fsync is False
    assert settings.fetch.bandwidth_limit == 1e6


def test_polygon_and_cone_from_toml_lists(tmp_path: Path) -> None:
    path = write(tmp_path, "[selection]\npolygon = [10, -5, 12, -5, 11, -3]\n")
    assert load_settings(path).selection.polygon == [10.0, -5.0, 12.0, -5.0, 11.0, -3.0]
    path = write(tmp_path, "[selection]\ncone = [1.5, 2, 0.5]\n")
    assert load_settings(path).selection.cone == (1.5, 2.0, 0.5)


# -- parsers ----------------------------------------------------------------------------------------
def test_parse_sectors() -> None:
    assert parse_sectors("all") is None
    assert parse_sectors("1,2,5-9") == [1, 2, 5, 6, 7, 8, 9]
    assert parse_sectors(" 3 , 3 ") == [3]
    for bad, words in (
        ("0", "outside 1..200"),
        ("201", "outside 1..200"),
        ("x", "'x'"),
        ("9-5", "backwards"),
    ):
        with pytest.raises(ConfigError, match=re.escape(words)) as info:
            parse_sectors(bad)
        assert info.value.key == "selection.sectors"


def test_parse_polygon_forms() -> None:
    mast = (
        "POLYGON 330.343765 -44.336318 324.663797 -33.277719 337.720578 -28.384567"
        " 344.128621 -38.561643 330.343765 -44.336318"
    )
    expected = [
        330.343765,
        -44.336318,
        324.663797,
        -33.277719,
        337.720578,
        -28.384567,
        344.128621,
        -38.561643,
    ]
    assert parse_polygon(mast) == expected  # closing vertex dropped
    assert parse_polygon(", ".join(map(str, expected))) == expected
    assert parse_polygon("POLYGON ICRS 1 2 3 4 5 6") == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("1 2 3 4 5", "odd count"),
        ("1 2 3 4", "at least 3 vertices"),
        ("1 2 3 4 1 2", "at least 3 vertices"),  # a closed triangle with only 2 distinct vertices
        ("1 95 3 4 5 6", "declination 95.0"),
        ("1 2 3 four 5 6", "'four' is not a number"),
        ("1 nan 3 4 5 6", "finite"),
    ],
)
def test_parse_polygon_rejects(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)) as info:
        parse_polygon(text)
    assert info.value.key == "selection.polygon"


def test_parse_cone() -> None:
    assert parse_cone("330.3 -44.3 0.5") == (330.3, -44.3, 0.5)
    assert parse_cone("330.3,-44.3,0.5") == (330.3, -44.3, 0.5)
    for bad, words in (
        ("1 2 0", "radius 0.0"),
        ("1 2 181", "radius 181.0"),
        ("1 2", "ra dec radius"),
        ("1 91 1", "91"),
    ):
        with pytest.raises(ConfigError, match=re.escape(words)) as info:
            parse_cone(bad)
        assert info.value.key == "selection.cone"


# -- every bad input names its key ---------------------------------------------------------------------
def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, "[fetch]\nconcurency = 3\n"))
    assert err.key == "fetch.concurency"
    assert "unknown key; did you mean fetch.concurrency?" in str(err)
    err = config_error(None, {"fetch.concurency": 3})
    assert "did you mean fetch.concurrency?" in str(err)


def test_unknown_table(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, "[fecth]\nconcurrency = 3\n"))
    assert err.key == "fecth"
    assert "unknown table; did you mean fetch?" in str(err)


def test_malformed_toml_names_line_and_column(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, "[fetch]\nconcurrency = = 3\n"))
    assert err.key == "config"
    assert "line 2" in str(err) and "column" in str(err)


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    err = config_error(missing)
    assert err.key == "config" and str(missing) in str(err) and "does not exist" in str(err)


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    err = config_error(tmp_path)  # a directory cannot be read as a file
    assert err.key == "config" and str(tmp_path) in str(err)


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        ({"fetch.concurrency": "abc"}, "fetch.concurrency", "expected a number or 'auto', got 'abc'"),
        ({"fetch.concurrency": 0}, "fetch.concurrency", "outside 1..256"),
        ({"fetch.concurrency": 257}, "fetch.concurrency", "outside 1..256"),
        ({"fetch.idle_timeout": -1}, "fetch.idle_timeout", "must be positive"),
        ({"tap.job_timeout": -5}, "tap.job_timeout", "must be positive"),
        ({"tap.poll_timeout": "soon"}, "tap.poll_timeout", "expected a number"),
        ({"tap.request_timeout": 0}, "tap.request_timeout", "must be positive"),
        ({"tap.request_timeout": "inf"}, "tap.request_timeout", "tap.request_timeout"),
        ({"tap.url": "ftp://mast/caom"}, "tap.url", "not an http(s) URL"),
        ({"tap.url": "https:" + "//"}, "tap.url", "not an http(s) URL"),
        ({"output.layout": "tree"}, "output.layout", "mast, sector, flat"),
        ({"verify.level": "paranoid"}, "verify.level", "unknown verification level"),
        ({"selection.products": "lc,ffi"}, "selection.products", "unknown product type 'ffi'"),
        ({"selection.sector": 0}, "selection.sector", "outside 1..200"),
        ({"selection.sector": 500}, "selection.sector", "outside 1..200"),
        ({"selection.cameras": "5"}, "selection.cameras", "camera 5 is outside 1..4"),
        ({"selection.ccds": [0]}, "selection.ccds", "CCD 0 is outside 1..4"),
        ({"selection.cone": "1 2 -1"}, "selection.cone", "radius"),
        ({"output.fsync": "maybe"}, "output.fsync", "expected true or false"),
        ({"run.log_level": "loud"}, "run.log_level", "unknown level"),
    ],
)
def test_bad_values_name_their_key(overrides: dict[str, object], key: str, words: str) -> None:
    err = config_error(None, {**SELECTED, **overrides})
    assert err.key == key
    assert words in str(err)


def test_unknown_product_lists_the_known_ones() -> None:
    err = config_error(None, {**SELECTED, "selection.products": ["ffi"]})
    assert all(name in str(err) for name in PRODUCT_SUFFIXES)


def test_wrong_toml_type(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, '[selection]\nsector = 1\n[fetch]\nretries = "many"\n'))
    assert err.key == "fetch.retries" and "expected an integer, got 'many'" in str(err)


def test_nothing_selected() -> None:
    err = config_error(None)
    assert err.key == "selection"
    assert (
        "nothing selected; give --sector N (with --camera/--ccd), --polygon, --cone, or --input FILE"
        in str(err)
    )
    assert load_settings(None, require_selection=False).selection.sector is None


def test_cameras_without_a_sector() -> None:
    err = config_error(None, {"selection.cameras": "1"})
    assert err.key == "selection.cameras" and "sector" in str(err)


def test_the_tap_request_timeout_is_read_from_the_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "[tap]\nrequest_timeout = 2.5\n"), SELECTED)
    assert settings.tap.request_timeout == 2.5
    assert load_settings(None, SELECTED).tap.request_timeout == 60.0  # the documented default


# -- the archive token (engine.fetch.session.read_token) ---------------------------------------------
SECRET = "s3cr3t-T0KEN-value"


@pytest.mark.parametrize(
    ("value", "words", "fix"),
    [
        (SECRET + "\r", "ends in a carriage return", "tr -d '\\r\\n'"),
        (SECRET + "\r\n", "ends in a carriage return", "tr -d '\\r\\n'"),
        (SECRET + "\n", "ends in a newline", "tr -d '\\r\\n'"),
        (SECRET + " ", "whitespace", "[:space:]"),
        ("\t" + SECRET, "whitespace", "[:space:]"),
        (SECRET[:4] + "\x07" + SECRET[4:], "control character (U+0007) at character 5", "[:cntrl:]"),
        (SECRET[:4] + " " + SECRET[4:], "space", "[:space:]"),
    ],
    ids=["cr", "crlf", "lf", "trailing-space", "leading-tab", "bell", "inner-space"],
)
def test_a_token_with_a_newline_or_control_character_is_refused_naming_the_variable_only(
    value: str, words: str, fix: str
) -> None:
    from engine.fetch.session import read_token

    with pytest.raises(ConfigError) as info:
        read_token("MAST_API_TOKEN", {"MAST_API_TOKEN": value})
    err = info.value
    assert err.key == "fetch.token_env" and err.exit_code == 2
    assert "MAST_API_TOKEN" in err.message and words in err.message
    assert err.hint is not None and fix in err.hint and "export MAST_API_TOKEN=" in err.hint
    assert SECRET not in str(err) and SECRET[:8] not in str(err)


def test_a_clean_token_is_returned_and_an_absent_one_is_none() -> None:
    from engine.fetch.session import read_token
    from engine.redact import redact

    assert read_token("MAST_API_TOKEN", {"MAST_API_TOKEN": SECRET}) == SECRET
    assert SECRET not in redact(f"Authorization: token {SECRET}")  # registered as a secret
    assert read_token("MAST_API_TOKEN", {}) is None
    assert read_token("MAST_API_TOKEN", {"MAST_API_TOKEN": ""}) is None
    assert read_token(None, {"MAST_API_TOKEN": SECRET}) is None


# -- a first day's surprises (issue 11) -------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"selection.sector": 1, "selection.cone": "10 20 1"}, "--cone"),
        ({"selection.polygon": "10 -5 12 -5 11 -3", "selection.cone": "10 20 1"}, "--polygon"),
        ({"selection.sector": 1, "selection.targets_file": "tics.txt"}, "--targets"),
    ],
)
def test_two_selections_at_once_are_refused_naming_both(overrides: dict, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, overrides)
    assert "conflicting selections" in info.value.message and named in info.value.message
    assert "only one of" in (info.value.hint or "")


def test_a_selection_in_the_file_and_another_on_the_command_line_conflict(tmp_path: Path) -> None:
    path = write(tmp_path, "[selection]\nsector = 1\n")
    with pytest.raises(ConfigError, match="conflicting selections"):
        load_settings(path, {"selection.cone": "10 20 1"})


def test_sectors_alone_is_nothing_selected_with_a_hint_about_sector() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"selection.sectors": "1"})
    assert "--sectors only filters" in info.value.message
    assert "--sector N" in (info.value.hint or "")


@pytest.mark.parametrize("cone", ["400 10 1", "-361 0 1"])
def test_a_cone_right_ascension_outside_0_360_is_refused(cone: str) -> None:
    with pytest.raises(ConfigError, match="right ascension"):
        load_settings(None, {"selection.cone": cone})


def test_a_polygon_right_ascension_of_400_is_refused() -> None:
    with pytest.raises(ConfigError, match="right ascension 400"):
        load_settings(None, {"selection.polygon": "400 0 10 0 10 10"})


def test_out_dir_from_the_file_satisfies_require_out(tmp_path: Path) -> None:
    path = write(tmp_path, '[output]\nout_dir = "mirror"\n[selection]\nsector = 1\n')
    assert load_settings(path, require_out=True).output.out_dir == tmp_path / "mirror"


def test_require_out_without_a_file_or_flag_names_the_key_and_both_fixes() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"selection.sector": 1}, require_out=True)
    assert info.value.key == "output.out_dir"
    assert "--out DIR" in (info.value.hint or "") and "[output]" in (info.value.hint or "")


def test_urls_file_dash_stays_standard_input() -> None:
    assert load_settings(None, {"selection.urls_file": "-"}).selection.urls_file == Path("-")


# -- run.shard ----------------------------------------------------------------------------------------
def test_run_shard_from_the_file_is_validated_and_normalised(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, '[run]\nshard = " 3 / 8 "\n'), SELECTED)
    assert settings.run.shard == "3/8"
    assert load_settings(None, SELECTED).run.shard is None


@pytest.mark.parametrize("value", ["8/8", "-1/2", "0/0", "1/10001", "half"])
def test_a_bad_run_shard_names_the_key(tmp_path: Path, value: str) -> None:
    err = config_error(write(tmp_path, f'[run]\nshard = "{value}"\n'), SELECTED)
    assert err.key == "run.shard" and str(err).startswith("run.shard:")
    err = config_error(None, {**SELECTED, "run.shard": value})
    assert err.key == "run.shard"


def test_settings_built_in_python_are_validated_when_a_run_is_made(tmp_path: Path) -> None:
    """The API and MirrorRun take Settings that never passed the loader; the same checks apply."""
    from engine.manager import MirrorRun
    from engine.settings import Settings

    settings = Settings()
    settings.output.out_dir = tmp_path
    settings.fetch.concurrency = 0
    with pytest.raises(ConfigError) as caught:
        MirrorRun(settings)
    assert caught.value.key == "fetch.concurrency" and "0 is outside 1..256" in str(caught.value)

    settings.fetch.concurrency = 8
    settings.output.layout = "tree"
    with pytest.raises(ConfigError) as caught:
        MirrorRun(settings)
    assert caught.value.key == "output.layout"


@pytest.mark.parametrize(
    ("flags", "cameras", "ccds"),
    [
        (["--camera", "1-3", "--ccd", "all"], [1, 2, 3], []),
        (["--camera", "2,4", "--ccd", "1-2"], [2, 4], [1, 2]),
    ],
)
def test_the_cli_reads_cameras_and_ccds_as_the_config_does_ranges_included(
    flags: list[str], cameras: list[int], ccds: list[int]
) -> None:
    from engine.cli import _settings, parse_args

    ns = parse_args(["plan", "--sector", "1", *flags])
    sel = _settings(ns, out=False).selection
    assert (sel.cameras, sel.ccds) == (cameras, ccds)


def test_help_texts_state_the_schemas_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """A default lives in the schema only: the CLI's help reads it from there."""
    from engine.cli import parse_args
    from engine.settings import Settings

    with pytest.raises(SystemExit):
        parse_args(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = Settings()
    assert f"tries per file beyond the first (default {defaults.fetch.retries})" in text
    assert f"the politeness cap of --concurrency auto (default {defaults.fetch.max_connections})" in text
    assert f"verification level (default {defaults.verify.level.name.lower()})" in text
    assert f"directory layout (default {defaults.output.layout})" in text
