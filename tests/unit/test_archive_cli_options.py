"""`archive serve` flags -> ArchiveOptions: defaults, --mast-like with overrides, bad values named."""

from __future__ import annotations

import argparse

import pytest

from engine.archive import ArchiveOptions
from engine.archive.cli_options import add_archive_arguments, archive_options_from_args
from engine.exceptions import ConfigError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_archive_arguments(parser)
    return parser.parse_args(list(argv))


def test_no_flags_give_the_archive_defaults():
    options = archive_options_from_args(parse())
    default = ArchiveOptions()
    assert list(options.sectors) == list(default.sectors)
    assert options.targets == 2000 and options.file_size == "full" and options.port == 0
    for name in ("exposures_per_ccd", "ffi_files", "obscore_per_product", "url_form", "redirect_to_s3"):
        assert getattr(options, name) == getattr(default, name)
    assert options.tap_hard_limit == options.tap_default_maxrec == 100_000


def test_existing_serve_flags_map_onto_their_fields():
    ns = parse(
        "--port", "8123", "--sectors", "1,3-4", "--targets", "50", "--file-size", "120", "--seed", "7",
        "--hard-limit", "5000", "--focus", "1,1,2", "--no-artifacts", "--hostile-names",
        "--faults", "500=0.2,seed=3",
    )  # fmt: skip
    options = archive_options_from_args(ns)
    assert options.port == 8123 and list(options.sectors) == [1, 3, 4] and options.targets == 50
    assert options.file_size == 120 and options.seed == 7 and options.focus == (1, 1, 2)
    assert options.tap_hard_limit == 5000 and options.tap_default_maxrec == 5000
    assert options.artifacts is False and options.hostile_names is True
    assert options.faults.seed == 3 and options.faults.rules[0].kind == "500"


def test_new_knobs_map_onto_their_fields():
    ns = parse(
        "--exposures", "40", "--ffi-files", "--ffi-size", "full", "--obscore-per-product",
        "--url-form", "path",
        "--redirect-s3", "--chunked", "0.25", "--null-checksums", "0.1", "--null-lengths", "0.05",
        "--sync-timeout", "60", "--async-abort", "600", "--slow-join", "2",
    )  # fmt: skip
    options = archive_options_from_args(ns)
    assert (options.exposures_per_ccd, options.ffi_files, options.ffi_file_size) == (40, True, "full")
    assert options.obscore_per_product and options.url_form == "path" and options.redirect_to_s3
    assert (options.chunked_fraction, options.null_checksum_fraction, options.null_length_fraction) == (
        0.25,
        0.1,
        0.05,
    )
    assert (options.sync_timeout, options.async_abort_after, options.slow_join) == (60.0, 600.0, 2.0)


def test_mast_like_flag_gives_the_real_shape_and_other_flags_override_it():
    options = archive_options_from_args(parse("--mast-like", "--exposures", "1300", "--no-redirect-s3"))
    assert options.exposures_per_ccd == 1300 and options.redirect_to_s3 is False
    assert options.ffi_files and options.obscore_per_product and options.null_checksum_fraction == 0.1


def test_extra_fields_win_over_flags():
    options = archive_options_from_args(parse("--sectors", "1-13"), sectors=(1,), focus=(1, 1, 2))
    assert tuple(options.sectors) == (1,) and options.focus == (1, 1, 2)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--chunked", "1.5"], "--chunked"),
        (["--null-checksums", "x"], "--null-checksums"),
        (["--exposures", "0"], "--exposures"),
        (["--exposures", "10001"], "--exposures"),
        (["--sync-timeout", "0"], "--sync-timeout"),
        (["--focus", "1,2"], "--focus"),
        (["--ffi-size", "huge"], "--ffi-size"),
    ],
)
def test_bad_flag_values_are_config_errors_naming_the_flag(argv, flag):
    with pytest.raises(ConfigError) as caught:
        parse(*argv)
    assert caught.value.key == flag


@pytest.mark.parametrize(
    ("argv", "flag"), [(["--sectors", "5-2"], "--sectors"), (["--faults", "bogus=1"], "--faults")]
)
def test_bad_sectors_or_faults_are_config_errors_naming_the_flag(argv, flag):
    with pytest.raises(ConfigError) as caught:
        archive_options_from_args(parse(*argv))
    assert caught.value.key == flag


def test_the_flag_limits_agree_with_the_catalogue():
    from engine.archive import catalog, cli_options

    assert cli_options.MAX_EXPOSURES == catalog.MAX_EXPOSURES
    assert cli_options.URL_FORMS == catalog.URL_FORMS


def test_building_the_parser_imports_nothing_heavy():
    import subprocess
    import sys

    code = (
        "import argparse, sys\n"
        "from engine.archive.cli_options import add_archive_arguments\n"
        "add_archive_arguments(argparse.ArgumentParser())\n"
        "print(sorted(m for m in ('aiohttp', 'numpy', 'astropy') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
