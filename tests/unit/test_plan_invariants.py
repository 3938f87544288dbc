"""engine.plan.invariants.PlanGuard: one row per destination, URLs that name their file, no silent drops."""

from __future__ import annotations

import tracemalloc

import pytest

from engine.exceptions import ConfigError
from engine.models import PlanItem
from engine.plan.invariants import BAD_SCHEME, BAD_URL, MISMATCH, NO_URL, PlanGuard, url_problem
from engine.plan.table import filename_from_url
from engine.redact import redact

LC = "tess2018206045859-s0001-0000000025155310-0120-s_lc.fits"
TP = LC.replace("_lc", "_tp")
URI = f"https://mast.example.org/api/v0.1/Download/file?uri=mast:TESS/product/{LC}"
PATH = f"https://archive.example.org/missions/tess/tid/s0001/0000/0000/2515/5310/{LC}"
S3 = f"https://stpubdata.example.org/tess/public/tid/s0001/0000/0000/2515/5310/{LC}"
MD5 = "0123456789abcdef0123456789abcdef"
LC_PATH = f"tid/s0001/0000/0000/2515/5310/{LC}"


def item(url: str = URI, filename: str = LC, **fields: object) -> PlanItem:
    return PlanItem(url=url, filename=filename, sector=1, **fields)  # type: ignore[arg-type]


def test_rows_naming_one_file_in_any_url_form_merge_into_one_download_with_fallbacks() -> None:
    guard = PlanGuard("mast")
    page = guard.admit([item(URI, size=2039040, md5=MD5), item(PATH, size=2039040), item(S3, est_kb=1991)])
    assert page.items == [(item(URI, size=2039040, md5=MD5), LC_PATH)]
    assert page.merged == 2 and page.fallbacks == {LC_PATH: [PATH, S3]}
    assert not page.failed and not page.dropped
    assert (guard.planned, guard.merged, guard.conflicts) == (1, 2, 0)


def test_duplicates_are_found_across_pages() -> None:
    guard = PlanGuard("mast")
    assert len(guard.admit([item(URI, size=10)]).items) == 1
    later = guard.admit([item(PATH, size=10), item(URI.replace(LC, TP), TP, size=10)])
    assert [relpath for _, relpath in later.items] == [LC_PATH.replace(LC, TP)]
    assert later.merged == 1 and later.fallbacks == {LC_PATH: [PATH]}


def test_an_exact_repeat_of_a_row_is_merged_without_a_fallback() -> None:
    page = PlanGuard("mast").admit([item(URI, size=10), item(URI, size=10)])
    assert page.merged == 1 and page.fallbacks == {}


@pytest.mark.parametrize(
    ("first", "second", "why"),
    [
        ({"size": 2039040}, {"size": 2039041}, "size 2039040 vs 2039041 bytes"),
        ({"md5": MD5}, {"md5": "f" * 32}, "md5 differs"),
        ({"est_kb": 1991}, {"size": 34 * 1024 * 1024}, "vs"),  # an estimate that cannot be this file
        ({"est_kb": 10}, {"est_kb": 5000}, "vs"),
    ],
)
def test_rows_that_would_put_different_bytes_at_one_path_fail_naming_both_urls(
    first: dict, second: dict, why: str
) -> None:
    guard = PlanGuard("mast")
    page = guard.admit([item(URI, **first), item(PATH, **second)])
    assert [i.url for i, _ in page.items] == [URI]
    ((failed, reason),) = page.failed
    assert failed.url == PATH
    assert URI in reason and PATH in reason and LC_PATH in reason and why in reason
    assert guard.conflicts == 1 and guard.merged == 0
    assert page.kept == [item(URI, **first), item(PATH, **second)]  # the original, then the failure


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"size": 2039040}, {"md5": MD5}),  # one declares a size, the other an md5: no contradiction
        ({"est_kb": 1991}, {"size": 2039040}),  # an estimate within its ceiling
        ({"est_kb": 1991}, {"est_kb": 1990}),
        ({}, {"size": 5}),
    ],
)
def test_compatible_declarations_merge(first: dict, second: dict) -> None:
    page = PlanGuard("mast").admit([item(URI, **first), item(PATH, **second)])
    assert page.merged == 1 and not page.failed


def test_what_a_merge_learns_is_kept_for_later_rows() -> None:
    guard = PlanGuard("mast")
    guard.admit([item(URI), item(PATH, md5=MD5)])  # the second row teaches the md5
    page = guard.admit([item(S3, md5="e" * 32)])
    assert page.failed and "md5 differs" in page.failed[0][1]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("", NO_URL),
        ("   ", NO_URL),
        (f"file:///etc/{LC}", BAD_SCHEME),
        (f"data:application/fits;base64,AAAA/{LC}", BAD_SCHEME),
        (f"ftp://ftp.example.org/{LC}", BAD_SCHEME),
        ("http:" + f"///{LC}", BAD_URL),  # no host at all
        (f"https://example.org/a b/{LC}", BAD_URL),
        (URI.replace(LC, TP), MISMATCH),
        (PATH.replace(LC, TP), MISMATCH),
        (f"https://example.org/{LC}?uri=mast:TESS/product/{TP}", MISMATCH),  # uri= decides, not the path
    ],
)
def test_rows_without_a_usable_url_for_their_file_are_dropped_and_counted(url: str, reason: str) -> None:
    guard = PlanGuard("mast")
    page = guard.admit([item(url, size=2039040, md5=MD5)])
    assert not page.items and not page.failed
    ((dropped, why),) = page.dropped
    assert dropped.url == url and why.startswith(reason)
    assert guard.dropped == {reason: 1} and guard.dropped_total == 1
    assert f"{reason}: 1" in guard.summary_line()


def test_a_mismatched_url_never_lends_the_file_its_size_or_md5() -> None:
    guard = PlanGuard("mast")
    # The tp's URL beside the lc's size: dropped, so the real lc row (later) is not a conflict.
    first = guard.admit([item(URI.replace(LC, TP), LC, size=1, md5="a" * 32)])
    second = guard.admit([item(URI, LC, size=2039040, md5=MD5)])
    assert first.dropped and not first.items
    assert second.items and not second.failed and guard.conflicts == 0


@pytest.mark.parametrize(
    "name", ["../../escape_lc.fits", "/tmp/abs_lc.fits", "bad\x7fname_lc.fits", "x" * 300]
)
def test_unsafe_names_are_failures_with_the_layouts_reason(name: str) -> None:
    guard = PlanGuard("mast")
    url = f"https://example.org/f?uri=mast:TESS/product/{name}".replace("\x7f", "%7F")  # as planned
    page = guard.admit([item(url, name)])
    ((failed, reason),) = page.failed
    assert failed.filename == name and "unsafe file name" in reason
    assert guard.unsafe == 1 and guard.planned == 0 and not page.dropped


def test_layouts_decide_what_one_destination_is() -> None:
    s1 = item(URI, size=1)
    s2 = PlanItem(url=f"https://example.org/sector2/{LC}", filename=LC, sector=2, size=1)
    # Same file name, two sectors: two destinations under mast and sector, one under flat.
    assert PlanGuard("mast").admit([s1, s2]).merged == 0
    assert PlanGuard("flat").admit([s1, s2]).merged == 1
    with pytest.raises(ConfigError, match=r"output\.layout"):
        PlanGuard("nested")


def test_url_problem_accepts_percent_encoding_and_nfc() -> None:
    assert url_problem(item(URI.replace("mast:TESS/product/", "mast%3ATESS%2Fproduct%2F"))) is None
    decomposed = "e\u0301_lc.fits"  # é as e + combining accent (NFD), as a macOS client writes it
    assert url_problem(PlanItem(url="https://example.org/\u00e9_lc.fits", filename=decomposed)) is None


def test_a_conflict_long_after_the_first_row_names_it_by_destination() -> None:
    guard = PlanGuard("flat", recent_urls=2)
    guard.admit([item(URI, size=1)])
    guard.admit([item(f"https://example.org/{n}_lc.fits", f"{n}_lc.fits") for n in range(3)])
    ((_, reason),) = guard.admit([item(PATH, size=2)]).failed
    assert "a URL planned earlier" in reason and PATH in reason and LC in reason


def test_counts_for_the_summary() -> None:
    guard = PlanGuard("mast")
    guard.admit([item(URI, size=1), item(PATH, size=1), item(S3, size=2), item(""), item("ftp://x/y", "y")])
    assert guard.counts() == {
        "planned": 1,
        "merged": 1,
        "conflicts": 1,
        "unsafe": 0,
        "dropped": 2,
        "dropped: no URL": 1,
        "dropped: unusable URL scheme": 1,
    }
    assert guard.summary_line() == (
        "plan: 1 files, 1 duplicate rows merged, 1 conflicting rows failed, "
        "2 rows dropped (no URL: 1, unusable URL scheme: 1)"
    )


def test_memory_per_destination_is_a_digest_not_an_item() -> None:
    guard = PlanGuard("flat", recent_urls=0)
    items = [
        PlanItem(url=f"https://example.org/f{i:07d}_lc.fits", filename=f"f{i:07d}_lc.fits", size=i, md5=MD5)
        for i in range(50_000)
    ]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for start in range(0, len(items), 1000):
        guard.admit(items[start : start + 1000])
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert guard.planned == 50_000
    assert used / 50_000 < 200  # bytes per destination: a digest and a packed int, not the item


def _reference_url_problem(item: PlanItem) -> tuple[str, str] | None:
    """url_problem without its fast path: urlsplit and parse_qs decide everything."""
    from engine.plan import invariants

    url = item.url.strip()
    if not url:
        return invariants.NO_URL, "the row has no URL"
    problem = invariants._slow_url_problem(url)
    if problem is not None:
        return problem
    named = filename_from_url(url)
    if invariants._nfc(named) != invariants._nfc(item.filename):
        return invariants.MISMATCH, f"the URL {redact(url)!r} names {named!r}, not {item.filename!r}"
    return None


def test_the_fast_path_for_plain_urls_answers_as_urlsplit_and_parse_qs_do() -> None:
    """200,000 random URLs, most of them plain, many with one character urlsplit, unquote or
    parse_qs treat specially: the guard's answer is the reference's, for every one."""
    import random

    rng = random.Random(20261128)
    plain = "abcXYZ0189._~-!$'()*,;=:/"
    special = "%+&#@[]? \t\n\x00\x7f\u00a0\u2028éURI=uri"
    heads = ["https://mast.stsci.edu", "http://127.0.0.1:8080", "HTTPS://Host.Example.org", "ftp://h", "https://",
             "https://h:99999", "s3://bucket", "https://user@h", "https://[::1]"]  # fmt: skip
    for _ in range(200_000):
        body = "".join(
            rng.choice(plain if rng.random() < 0.93 else special) for _ in range(rng.randint(0, 24))
        )
        query = rng.choice(["", "?uri=mast:TESS/product/", "?uri=", "?URI=x/", "?a=1&uri=", "?uri=a%2Fb/"])
        name = "".join(rng.choice(plain) for _ in range(rng.randint(1, 8)))
        url = f"{rng.choice(heads)}/{body}{query}{name}"
        filename = name if rng.random() < 0.7 else filename_from_url(url)
        item = PlanItem(url=url, filename=filename)
        assert url_problem(item) == _reference_url_problem(item), url
