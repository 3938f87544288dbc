"""engine.shard: a stable hash split of a plan by file identity, and `K/N` parsing."""

from __future__ import annotations

import random

import pytest

from engine.exceptions import EXIT_USAGE, ConfigError
from engine.manifest import file_key
from engine.shard import Shard, parse_shard, shard_of

KEYS = [file_key(f"tess2018206045859-s0001-{i:016d}-0120-s", f"f{i}_lc.fits") for i in range(500)] + [
    file_key("", "", f"flat/extra_{i}.fits") for i in range(50)
]


@pytest.mark.parametrize("count", range(1, 9))
def test_the_shards_partition_a_plan_exactly(count: int) -> None:
    shards = [Shard(k, count) for k in range(count)]
    owners = {key: [s.index for s in shards if s.owns(key)] for key in KEYS}
    assert all(len(found) == 1 for found in owners.values()), "every file in exactly one shard"
    union = {key for s in shards for key in KEYS if s.owns(key)}
    assert union == set(KEYS), "no gap"


@pytest.mark.parametrize("count", range(1, 9))
def test_shuffling_the_rows_changes_nothing(count: int) -> None:
    rows = list(KEYS)
    before = {k: [key for key in rows if shard_of(key, count) == k] for k in range(count)}
    random.Random(count).shuffle(rows)
    after = {k: sorted(key for key in rows if shard_of(key, count) == k) for k in range(count)}
    assert {k: sorted(v) for k, v in before.items()} == after


def test_the_split_is_stable_across_processes_and_versions() -> None:
    # blake2b, not Python's salted hash(): these values must never change, or a rerun shard would
    # own other files than the run it resumes.
    assert shard_of("tess-s0001/a_lc.fits", 8) == shard_of("tess-s0001/a_lc.fits", 8)
    assert [shard_of(f"k{i}", 8) for i in range(8)] == [shard_of(f"k{i}", 8) for i in range(8)]


def test_the_split_is_roughly_even() -> None:
    counts = [sum(1 for key in KEYS if shard_of(key, 4) == k) for k in range(4)]
    assert min(counts) > len(KEYS) / 4 * 0.6


@pytest.mark.parametrize(
    ("text", "expected"), [("0/1", Shard(0, 1)), ("3/8", Shard(3, 8)), (" 7 / 8 ", Shard(7, 8))]
)
def test_a_good_shard_parses(text: str, expected: Shard) -> None:
    assert parse_shard(text) == expected
    assert expected.name == f"shard-{expected.index}-of-{expected.count}"


@pytest.mark.parametrize("text", ["8/8", "-1/8", "1/0", "a/b", "3", "1/10001", "1/2/3"])
def test_a_bad_shard_is_one_line_naming_run_shard(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_shard(text)
    assert caught.value.exit_code == EXIT_USAGE
    assert str(caught.value).startswith("run.shard:") and "\n" not in str(caught.value)


def test_no_shard_is_none() -> None:
    assert parse_shard(None) is None and parse_shard("") is None
