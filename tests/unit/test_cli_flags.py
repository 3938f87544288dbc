"""The CLI's flags are defined once: shared flags agree on every command, defaults come from the schema."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from engine.archive import ArchiveOptions, cli_options
from engine.cli import build_parser
from engine.layout import layout_names
from engine.models import VerifyLevel
from engine.settings import Settings


def _commands(
    parser: argparse.ArgumentParser, path: str = ""
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every (sub)command's parser, `archive serve` included, named by its words."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _commands(child, f"{path} {name}".strip())


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {name: action for action in parser._actions for name in action.option_strings}


@pytest.fixture(scope="module")
def commands() -> dict[str, dict[str, argparse.Action]]:
    return {name: _flags(parser) for name, parser in _commands(build_parser())}


def test_every_dotted_flag_names_a_key_of_the_settings_schema(commands):
    settings = Settings()
    for command, flags in commands.items():
        for flag, action in flags.items():
            if "." in action.dest:
                section, key = action.dest.split(".")
                assert hasattr(getattr(settings, section, None), key), (command, flag, action.dest)


@pytest.mark.parametrize(
    ("flag", "key"),
    [
        ("--retries", "fetch.retries"),
        ("--idle-timeout", "fetch.idle_timeout"),
        ("--token-env", "fetch.token_env"),
        ("--concurrency", "fetch.concurrency"),
        ("--max-connections", "fetch.max_connections"),
        ("--progress-interval", "run.progress_interval"),
        ("--verify", "verify.level"),
        ("--layout", "output.layout"),
    ],
)
def test_help_shows_the_schema_default_of_the_flags_key(commands, flag, key):
    section, name = key.split(".")
    value = getattr(getattr(Settings(), section), name)
    shown = (
        value.name.lower() if hasattr(value, "name") else f"{value:g}" if isinstance(value, float) else value
    )
    action = commands["run"][flag]
    assert action.dest == key
    assert action.help.endswith(f"(default {shown})")


@pytest.mark.parametrize(
    "flag", ["--retries", "--concurrency", "--max-connections", "--no-fsync", "--token-env"]
)
def test_a_flag_shared_by_run_fetch_and_verify_parses_the_same_way_on_each(commands, flag):
    seen = {
        command: (commands[command][flag].dest, commands[command][flag].type, commands[command][flag].metavar)
        for command in ("run", "fetch", "verify")
    }
    assert len(set(seen.values())) == 1, seen


def test_verify_level_choices_come_from_the_enum_on_every_command(commands):
    names = list(VerifyLevel.names())
    assert list(commands["run"]["--verify"].choices) == names
    assert list(commands["fetch"]["--verify"].choices) == names
    assert list(commands["verify"]["--level"].choices) == names
    assert commands["verify"]["--level"].dest == commands["run"]["--verify"].dest == "verify.level"


def test_layout_choices_come_from_the_layout_registry(commands):
    assert list(commands["run"]["--layout"].choices) == list(layout_names())


def test_verify_repair_words_its_token_flag_without_a_default(commands):
    assert commands["verify"]["--token-env"].help == "environment variable holding an archive token"
    assert commands["run"]["--token-env"].help.startswith("environment variable holding an archive token (")


def test_logging_flags_after_the_command_do_not_undo_those_before_it():
    from engine.cli import parse_args

    ns = parse_args(["-q", "--log-level", "DEBUG", "status", "--out", "x"])
    assert ns.quiet is True and getattr(ns, "run.log_level") == "DEBUG"
    assert parse_args(["status", "-v", "--out", "x"]).verbose is True


def test_the_demo_keeps_its_own_out_default_and_port(commands):
    from engine.cli import DEMO_OUT, DEMO_PORT

    ns = build_parser().parse_args(["demo"])
    assert str(getattr(ns, "output.out_dir")) == DEMO_OUT and ns.port == DEMO_PORT
    assert commands["demo"]["--out"].dest == commands["run"]["--out"].dest


def test_archive_shape_fields_are_read_from_the_shape_flags():
    parser = argparse.ArgumentParser()
    cli_options.add_archive_arguments(parser)
    group = next(g for g in parser._action_groups if g.title and g.title.startswith("MAST's shapes"))
    dests = [action.dest for action in group._group_actions if action.dest != "mast_like"]
    assert list(cli_options._SHAPE_FIELDS) == dests
    fields = set(ArchiveOptions.__dataclass_fields__)
    assert set(dests) <= fields


def test_archive_shape_flags_default_to_not_given_so_mast_like_stands():
    parser = argparse.ArgumentParser()
    cli_options.add_archive_arguments(parser)
    ns = parser.parse_args(["--mast-like", "--chunked", "0.5"])
    assert all(getattr(ns, name) is None for name in cli_options._SHAPE_FIELDS if name != "chunked_fraction")
    options = cli_options.archive_options_from_args(ns)
    assert options.chunked_fraction == 0.5
    assert options.exposures_per_ccd == ArchiveOptions.mast_like().exposures_per_ccd


def test_a_flag_variant_changes_only_what_it_names():
    base = cli_options.flag("--level", type=int, metavar="N", help="how many")
    other = base.variant(names=("--depth",), help="how deep")
    parser = argparse.ArgumentParser()
    base.add(parser)
    other.add(parser)
    flags = _flags(parser)
    assert (flags["--level"].help, flags["--depth"].help) == ("how many", "how deep")
    assert flags["--level"].type is flags["--depth"].type is int
    assert flags["--depth"].metavar == "N"


def test_adopt_from_given_once_does_not_leak_into_the_next_parse():
    # the flag tables are built once per process, so their list default must never collect values
    from engine.cli import parse_args

    first = parse_args(["fetch", "--input", "-", "--adopt-from", "/a"])
    second = parse_args(["fetch", "--input", "-"])
    assert [str(p) for p in first.adopt_from] == ["/a"] and second.adopt_from == []


# Flags one command words its own way (a `variant(help=...)` or `report`'s own flags); every other
# flag whose dest is a settings key must read its help from the schema. (`--out` on run, fetch and
# demo adds to the schema's words, so its help still starts with them.)
_WORDED_BY_THE_COMMAND = {
    ("plan", "--progress-interval"),
    ("verify", "--level"),
    ("verify", "--no-fsync"),
    ("demo", "--source"),
    ("status", "--out"),
    ("verify", "--out"),
    ("report", "--out"),
    ("report", "--state-dir"),
}


def _field_metadata(key: str):
    import dataclasses

    section, name = key.split(".")
    table = type(getattr(Settings(), section))
    return next(each.metadata for each in dataclasses.fields(table) if each.name == name)


def test_a_settings_key_flag_takes_its_help_and_metavar_from_the_fields_metadata(commands):
    checked = set()
    worded = set()
    for command, flags in commands.items():
        for flag, action in flags.items():
            if "." not in action.dest or action.help == argparse.SUPPRESS:
                continue
            metadata = _field_metadata(action.dest)
            assert metadata.get("help"), (action.dest, "has a flag but no help in its field's metadata")
            if not action.help.startswith(metadata["help"]):
                worded.add((command, flag))
                continue
            checked.add((command, flag))
            if "metavar" in metadata:
                assert action.metavar == metadata["metavar"], (command, flag)
    # the override list names exactly the flags a command words itself, so it cannot go stale
    assert worded == _WORDED_BY_THE_COMMAND
    assert ("run", "--retries") in checked and ("run", "--tap-url") in checked
    assert commands["run"]["--retries"].help == "tries per file beyond the first (default 8)"
