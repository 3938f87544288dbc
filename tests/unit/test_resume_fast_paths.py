"""The resume scan's fast paths answer exactly as the general code they bypass.

Each test feeds thousands of random inputs (mostly plain, many with one character that the fast path
must leave to the general path) to the fast path and to a reference: the general code, or the code
as it was before the fast path, and compares every answer, errors included.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import re
import unicodedata
import zlib
from collections import OrderedDict
from pathlib import Path

import pytest

from engine import layout
from engine.exceptions import ConfigError, UnsafePathError
from engine.manifest import Manifest, _legacy_key, _loads, _payload_of, encode_entry, pack_record
from engine.models import PLAN_COLUMNS, PlanItem
from engine.plan import invariants
from engine.plan.table import PlanWriter, _columns, _row_item, iter_input, iter_plan

NAME_CHARS = "abcXYZ019._-"
ODD_CHARS = ".:/\\%% \t\n\x00\x1b\x7f\u00a0\u200béÅ\u0301+~'\"," + "CONPRNAUXNULCOM1LPT9"


def _answer(call, *args):  # any callable: its result, or its error's type and text
    try:
        return "ok", call(*args)
    except (UnsafePathError, ConfigError) as err:
        return type(err).__name__, str(err)


def _random_name(rng: random.Random) -> str:
    odd = rng.random() < 0.35
    length = rng.choice([rng.randint(0, 12), rng.randint(50, 60), rng.randint(250, 258)])
    text = "".join(rng.choice(ODD_CHARS if odd and rng.random() < 0.1 else NAME_CHARS) for _ in range(length))
    if rng.random() < 0.05:
        text = rng.choice(["con", "NUL", "Com1", "lpt9", "aux", "prn"]) + rng.choice(
            ["", ".fits", ".x.y", "x"]
        )
    return text


def test_safe_filename_answers_for_plain_names_as_its_general_path_does() -> None:
    rng = random.Random(1128)
    for _ in range(60_000):
        name = _random_name(rng)
        assert _answer(layout.safe_filename, name) == _answer(layout._checked_filename, name), repr(name)


def _reference_check_obs_id(obs_id: str) -> None:
    """check_obs_id before its fast path."""
    if not isinstance(obs_id, str):
        raise UnsafePathError(f"unsafe obs_id from the archive: {layout._shown(obs_id)} (not a string)")
    bad = re.search(r"[/\\\x00-\x1f\x7f]|\.\.", obs_id)
    if bad or len(obs_id) > layout.MAX_OBS_ID_CHARS:
        why = f"contains {bad.group()!r}" if bad else f"longer than {layout.MAX_OBS_ID_CHARS} characters"
        raise UnsafePathError(
            f"unsafe obs_id from the archive: {layout._shown(obs_id)} ({why})",
            hint="the file was skipped; report the obs_id to the archive",
        )


def test_check_obs_id_answers_for_plain_obs_ids_as_before_its_fast_path() -> None:
    rng = random.Random(2811)
    for _ in range(60_000):
        obs_id = _random_name(rng)
        assert _answer(layout.check_obs_id, obs_id) == _answer(_reference_check_obs_id, obs_id), repr(obs_id)


def _reference_mast(item: PlanItem) -> str:
    """The mast layout before the TIC was matched in four parts."""
    try:
        sector = int(item.sector)
    except (TypeError, ValueError):
        sector = -1
    if not 0 <= sector <= 9999:
        found = re.search(r"-s(\d{4})-", item.filename)
        sector = int(found.group(1)) if found else -1
    if sector < 0:
        return f"misc/{item.filename}"
    tic = re.search(r"-(\d{16})-", item.filename)
    if tic is None:
        return f"s{sector:04d}/{item.filename}"
    d = tic.group(1)
    return f"tid/s{sector:04d}/{d[0:4]}/{d[4:8]}/{d[8:12]}/{d[12:16]}/{item.filename}"


def test_the_mast_layout_places_every_name_as_before() -> None:
    rng = random.Random(11)
    digits = "0123456789\u0663"  # an Arabic-Indic digit is a \d too
    for _ in range(30_000):
        tic = "".join(rng.choice(digits if rng.random() < 0.98 else "x-") for _ in range(rng.randint(14, 18)))
        sector = "".join(rng.choice("0123456789") for _ in range(rng.choice([3, 4, 4, 4, 5])))
        name = f"tess2018206045859-s{sector}-{tic}-0120-s_lc.fits"
        if rng.random() < 0.2:
            name = name.replace("-", rng.choice(["", "_", "--"]), rng.randint(0, 3))
        value = rng.choice([rng.randint(-3, 10_002), -1, "7", "x", None, True, 3.9])
        item = PlanItem(url="u", filename=name, sector=value)  # type: ignore[arg-type]
        assert layout._mast(item) == _reference_mast(item), (name, value)


def _reference_pack(item: PlanItem) -> int:
    """The guard's `_pack` before ints took a short way."""
    md5 = item.md5.lower() if isinstance(item.md5, str) else ""
    try:
        md5_bits = (1 << 64) | int(md5[:16], 16) if len(md5) == 32 else 0
    except ValueError:
        md5_bits = 0
    return (md5_bits << 80) | (invariants._field(item.size) << 40) | invariants._field(item.est_kb)


def test_the_guards_packed_declaration_is_as_before_for_any_value() -> None:
    rng = random.Random(5)
    big = (1 << 40) - 1
    values = [
        -2,
        -1,
        0,
        1,
        big - 3,
        big - 2,
        big - 1,
        big,
        big + 1,
        1 << 70,
        True,
        False,
        "12",
        "x",
        None,
        2.5,
    ]
    md5s = ["", "0" * 32, "A" * 32, "g" * 32, "0x" + "1" * 30, "İ" * 16, " " + "1" * 31, "1" * 31, 7]
    for _ in range(20_000):
        item = PlanItem(
            url="u",
            filename="f",
            size=rng.choice([*values, rng.randint(0, 10**12)]),  # type: ignore[arg-type]
            est_kb=rng.choice([*values, rng.randint(0, 10**9)]),  # type: ignore[arg-type]
            md5=rng.choice([*md5s, f"{rng.getrandbits(128):032x}"]),  # type: ignore[arg-type]
        )
        assert invariants._pack(item) == _reference_pack(item), item


def test_the_guard_keys_each_destination_by_a_64_bit_digest() -> None:
    digests = {invariants._digest(f"tid/s0001/{n:016d}.fits") for n in range(100_000)}
    assert len(digests) == 100_000 and all(-(1 << 63) <= d < (1 << 64) for d in digests)
    assert invariants._blake2b_digest("a/b.fits") != invariants._blake2b_digest("a/c.fits")


def test_url_problem_compares_names_in_nfc_only_when_they_differ() -> None:
    decomposed = unicodedata.normalize("NFD", "é.fits")
    assert (
        invariants.url_problem(PlanItem(url=f"https://example.org/p/{decomposed}", filename="é.fits")) is None
    )
    assert invariants.url_problem(PlanItem(url="https://example.org/p/a.fits", filename="a.fits")) is None
    problem = invariants.url_problem(PlanItem(url="https://example.org/p/a.fits", filename="b.fits"))
    assert problem is not None and problem[0] == invariants.MISMATCH


class _ReferenceGuard(invariants.PlanGuard):
    """`PlanGuard.admit` before its one-pass fast path (`url_problem`, then `relpath_for`, per row) and
    before its ring of recent URLs (an OrderedDict)."""

    def __init__(self, layout: str, *, recent_urls: int) -> None:
        super().__init__(layout, recent_urls=recent_urls)
        self._ordered: OrderedDict[int, str] = OrderedDict()

    def admit(self, page: list[PlanItem]) -> invariants.GuardedPage:
        out = invariants.GuardedPage()
        for item in page:
            problem = invariants.url_problem(item)
            if problem is not None and problem[0] != invariants.MISMATCH:
                self._drop(out, item, *problem)
                continue
            try:
                relpath = layout.relpath_for(item, self.layout)
            except UnsafePathError as err:
                self.unsafe += 1
                out.failed.append((item, invariants.redact(str(err))))
                continue
            if problem is not None:
                self._drop(out, item, *problem)
                continue
            key = invariants._digest(relpath)
            packed = invariants._pack(item)
            before = self._declared.get(key)
            if before is None:
                self._declared[key] = packed
                if self._recent_cap:
                    if len(self._ordered) >= self._recent_cap:
                        self._ordered.popitem(last=False)
                    self._ordered[key] = item.url
                self.planned += 1
                out.items.append((item, relpath))
                continue
            disagreement = invariants._disagreement(before, packed)
            if disagreement:
                self.conflicts += 1
                first = self._ordered.get(key)
                earlier = f"{invariants.redact(first)!r}" if first else "a URL planned earlier"
                out.failed.append(
                    (
                        item,
                        f"conflicting rows for {relpath}: {invariants.redact(item.url)!r} and {earlier} "
                        f"declare different files ({disagreement}); neither is trusted for the other",
                    )
                )
                continue
            self.merged += 1
            out.merged += 1
            self._declared[key] = invariants._union(before, packed)
            if item.url != self._ordered.get(key):
                urls = out.fallbacks.setdefault(relpath, [])
                if item.url not in urls:
                    urls.append(item.url)
        return out


# URL prefixes, plain and hostile: userinfo, odd schemes, no host, IPv6, encodings, queries other than
# uri=, fragments, white space and controls, unicode lookalikes, parent references, no separator.
URL_PREFIXES = [
    "https://mast.stsci.edu/api/v0.1/Download/file?uri=mast:TESS/product/",
    "http://127.0.0.1:9/api/v0.1/Download/file?uri=mast:TESS/product/",
    "HTTPS://archive.example.org:8443/tess/s0001/",
    "https://h/",
    "https://h/x:",
    "https://h/x?uri=",
    "https://h/x?uri=a:",
    "https://h/x?uri=a/b",
    "https://h/x?uri=%2e%2e/",
    "https://h/x?other=1&uri=a/",
    "https://h/x?uri=a/#",
    "https://h/a/../",
    "https://h/a/./",
    "https://h:99999/a/",
    "https://h:/a/",
    "https://user:pw@h/a/",
    "https://@h/a/",
    "https://[::1]/a/",
    "https://[::1/a/",
    "https://h/a b/",
    "https://h/a\x00/",
    "https://h/a\t/",
    " https://h/a/",
    "https://h/a/\n",
    "https://h\u2215a/",  # a division slash, not '/'
    "https://\uff48/a/",  # a fullwidth h
    "https://h/\uff0f",  # a fullwidth solidus
    "https://h/a%2F",
    "https://h/a\\",
    "https://h",
    "https:/h/a/",
    "https//h/a/",
    "http://h/a/",
    "ftp://h/a/",
    "file:///a/",
    "data:text/plain,",
    "javascript:/",
    "mast:TESS/product/",
    "//h/a/",
    "/a/",
    "",
    "https://h/" + "a" * 3000 + "/",
]


def _random_prefix(rng: random.Random) -> str:
    if rng.random() < 0.8:
        return rng.choice(URL_PREFIXES[:8] if rng.random() < 0.7 else URL_PREFIXES)
    chars = "hs:/?=uria.-_%@#&[]~+ \x00\u00e9" + "tp"
    return "".join(rng.choice(chars) for _ in range(rng.randint(0, 30)))


def _random_row(rng: random.Random, names: list[str]) -> PlanItem:
    name = rng.choice(names) if names and rng.random() < 0.3 else _random_name(rng)
    names.append(name)
    named = name
    if rng.random() < 0.1:  # a URL for another file, or a lookalike of this one
        named = rng.choice([_random_name(rng), unicodedata.normalize("NFD", name + "é"), name.upper(), ""])
    url: object = _random_prefix(rng) + named
    if rng.random() < 0.02:
        url = rng.choice([None, 7, b"https://h/a/x.fits"])
    obs_id: object = rng.choice(["tess2018206045859-s0001-0000000025155310-0120-s", "", "a_b-9"])
    if rng.random() < 0.3:
        obs_id = rng.choice(
            ["tess2018206045859-s0001-0000000025155310-0120-s", "", "a_b-9", "..", "a/b", "a\\b", "a\x00",
             "a\x1b[31m", "x" * 256, "x" * 255, "é", "a b", None, 5]
        )  # fmt: skip
    if rng.random() < 0.15:  # a prefix of the name (as TESS's obs_ids are), with its '.' if it has one
        obs_id = name[: rng.randint(0, len(name))]
    filename: object = name if rng.random() < 0.99 else rng.choice([None, 3, b"x.fits"])
    return PlanItem(
        url=url,  # type: ignore[arg-type]
        filename=filename,  # type: ignore[arg-type]
        obs_id=obs_id,  # type: ignore[arg-type]
        sector=rng.choice([-1, 0, 1, 9999, 10_000, "7", None, True]),  # type: ignore[arg-type]
        size=rng.choice([-1, 100, 101, 2_039_040]),
        est_kb=rng.choice([-1, 1, 1991, 10_000]),
        md5=rng.choice(["", "0" * 32, "1" * 32, "A" * 32]),
    )


def _sorted_out(guard: invariants.PlanGuard, page: invariants.GuardedPage) -> tuple[object, ...]:
    # `_declared` too: what the guard keeps per destination decides later rows' merges and conflicts.
    return (
        page.items,
        page.failed,
        page.dropped,
        page.merged,
        page.fallbacks,
        guard.counts(),
        guard._declared,
    )


class _CountingGuard(invariants.PlanGuard):
    """A PlanGuard that counts the rows its one pass leaves to the general checks."""

    general = 0

    def _general_relpath(self, out: invariants.GuardedPage, item: PlanItem) -> str:
        _CountingGuard.general += 1
        return super()._general_relpath(out, item)


@pytest.mark.parametrize("name", layout.layout_names())
def test_the_guards_one_pass_admits_every_row_as_the_general_checks_do(name: str) -> None:
    rng = random.Random(f"guard-{name}")
    rows, _CountingGuard.general = 0, 0
    for _ in range(40):
        cap = rng.choice([0, 1, 7, 50, 100_000])  # URLs remembered for conflicts: none, few, all
        fast, reference = _CountingGuard(name, recent_urls=cap), _ReferenceGuard(name, recent_urls=cap)
        names: list[str] = []
        for _ in range(5):  # one guard sees several pages: its remembered URL prefix carries over
            page = [_random_row(rng, names) for _ in range(rng.randint(0, 300))]
            rows += len(page)
            assert _sorted_out(fast, fast.admit(page)) == _sorted_out(reference, reference.admit(page))
    # Both paths were compared on many rows.
    assert 0.1 * rows < _CountingGuard.general < 0.9 * rows


def test_a_plain_url_prefix_before_a_plain_name_is_a_url_that_names_that_file() -> None:
    rng = random.Random(2811)
    chars = "hHtTpPsS:/?=uriUR.-_~!$'()*,;@%#&[]+ 09az\x00\u00e9"
    accepted = 0
    for _ in range(200_000):
        prefix = rng.choice(
            [
                rng.choice(URL_PREFIXES) + "".join(rng.choice(chars) for _ in range(rng.randint(0, 6))),
                "http" + "".join(rng.choice(chars) for _ in range(rng.randint(0, 25))),
            ]
        )
        if not invariants._PLAIN_URL_PREFIX.fullmatch(prefix):
            continue
        accepted += 1
        name = _random_name(rng)
        if layout.is_plain_name(name):
            assert invariants.url_problem(PlanItem(url=prefix + name, filename=name)) is None, (prefix, name)
    assert accepted > 1000


# -- the plan reader --------------------------------------------------------------------------------
CELL_CHARS = "abcXYZ019._-:/?="
ODD_CELL_CHARS = '",\r\n\x00 \\\t\u00e9'


def _random_cell(rng: random.Random, kind: str) -> object:
    if kind in ("i", "f") and rng.random() < 0.9:
        if kind == "i":
            return rng.choice([rng.randint(-5, 10**10), -1, 0])
        return rng.choice([math.nan, 263.75, -64.25, 0.0, float("inf"), 1e-300])
    odd = rng.random() < 0.15
    return "".join(
        rng.choice(ODD_CELL_CHARS if odd and rng.random() < 0.2 else CELL_CHARS)
        for _ in range(rng.randint(0, 12))
    )


def _random_plan_text(rng: random.Random, rows: int) -> str:
    """Rows as PlanWriter writes them, and some as another writer or a hand edit might."""
    out = io.StringIO()
    quoted = csv.writer(out, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")
    kinds = [kind for _name, _index, kind in _columns(list(PLAN_COLUMNS))]
    for _ in range(rows):
        cells = [_random_cell(rng, kind) for kind in kinds]
        roll = rng.random()
        if roll < 0.8:
            quoted.writerow(cells)
        elif roll < 0.85:
            csv.writer(out, lineterminator=rng.choice(["\n", "\r\n", "\r"])).writerow(
                cells
            )  # minimal quoting
        elif roll < 0.9:
            quoted.writerow(cells[: rng.randint(0, 10)] + (["extra"] if rng.random() < 0.5 else []))
        elif roll < 0.95:
            line = io.StringIO()
            csv.writer(line, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n").writerow(cells)
            text = line.getvalue()
            cut = rng.randint(0, len(text))
            out.write(text[:cut] + rng.choice(['"', ",", "", "x", "\n", '""', " "]) + text[cut:])
        else:
            quoted.writerow([*cells[:4], rng.choice(["1.5", "x", "", " 7"]), *cells[5:]])
    return out.getvalue()


def _reference_rows(path: Path) -> list[object]:
    """iter_plan before its fast path: every data row through csv.reader and `_row_item`."""
    answers: list[object] = []
    with open(path, encoding="utf-8", newline="") as handle:
        lines = iter(handle)
        for line in lines:
            if not line.startswith("#"):
                break
        rows = csv.reader([line, *lines], delimiter=",")
        columns = _columns(next(rows))
        try:
            for number, row in enumerate(rows, start=1):
                answers.append(_row_item(row, columns, path, number, "input", "hint"))
        except ConfigError as err:
            answers.append(str(err))
        except csv.Error as err:
            answers.append(f"csv: {err}")
    return answers


def _fast_rows(path: Path) -> list[object]:
    answers: list[object] = []
    try:
        for item in iter_plan(path, key="input", hint="hint"):
            answers.append(item)
    except ConfigError as err:
        text = str(err)
        answers.append(f"csv: {text.split(': ', 2)[-1]}" if "cannot read the plan" in text else text)
    return answers


def _header(path: Path) -> str:
    writer = PlanWriter(path)
    writer.commit()
    return path.read_text(encoding="utf-8")


@pytest.mark.parametrize("seed", range(40))
def test_the_plan_readers_fast_path_reads_every_row_as_csv_reader_does(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    header = _header(tmp_path / "empty.ecsv")
    path = tmp_path / "plan.ecsv"
    path.write_text(header + _random_plan_text(rng, 400), encoding="utf-8", newline="")
    reference, fast = _reference_rows(path), _fast_rows(path)
    assert len(fast) == len(reference)
    for mine, theirs in zip(fast, reference, strict=True):
        if isinstance(theirs, str) and theirs.startswith("csv: "):
            assert isinstance(mine, str) and mine.startswith("csv: ")  # the same csv.Error, reworded
        else:
            assert mine == theirs


@pytest.mark.parametrize("seed", range(10))
def test_the_plan_readers_fast_path_reads_every_number_text_as_csv_reader_does(
    tmp_path: Path, seed: int
) -> None:
    # Rows quoted as PlanWriter quotes them whose bare cells hold other texts int() and float() take,
    # or none: no row is malformed, so every row is compared (the test above stops at the first
    # malformed one). The int columns' texts repeat, as they do in a plan.
    rng = random.Random(seed)
    kinds = [kind for _name, _index, kind in _columns(list(PLAN_COLUMNS))]
    texts = {
        "i": ["", " 7", "-0", "+3", "1_000", "\u0663", "-1", "2039040", "1991", "0"],
        "f": ["", "nan", "inf", "1e5", "-0", " 7", "1_0.5", "263.75"],
    }
    lines = []
    for _ in range(2_000):
        cells = [
            rng.choice(texts[kind]) if kind in texts else f'"{rng.choice(["", "a", "b.fits", "o-1"])}"'
            for kind in kinds
        ]
        lines.append(",".join(cells) + "\n")
    path = tmp_path / "plan.ecsv"
    path.write_text(_header(tmp_path / "empty.ecsv") + "".join(lines), encoding="utf-8")
    reference, fast = _reference_rows(path), _fast_rows(path)
    assert len(reference) == 2_000 and all(isinstance(row, PlanItem) for row in reference)
    assert fast == reference


def _items_or_error(call, path: Path) -> object:
    try:
        return call(path)
    except ConfigError as err:
        return str(err)


@pytest.mark.parametrize("seed", range(30))
def test_counting_a_plan_gives_the_number_of_rows_it_reads(tmp_path: Path, seed: int) -> None:
    # PlanWriter's plans (some with a quoted line end or a NUL in a row, which only csv.reader reads),
    # and random ones; a plan that reads has as many rows as the count, one that fails fails the count
    # the same way unless only a row's number was malformed (counted, and refused by the reading).
    from engine.plan.table import count_plan

    rng = random.Random(seed)
    path = tmp_path / "plan.ecsv"
    writer = PlanWriter(path)
    odd = ["", "a", "b\nc", "d\r\ne", "f\x00g", 'h"i', "j,k", "é"]
    writer.write(
        PlanItem(
            url=f"https://h/{n}{rng.choice(odd) if rng.random() < 0.01 else ''}",
            filename=f"{n}.fits",
            target_name=rng.choice(odd) if rng.random() < 0.01 else "t",
            size=rng.choice([-1, 5, 2039040]),
        )
        for n in range(rng.choice([0, 1, 300]))
    )
    writer.commit()
    read = _items_or_error(lambda p: len(list(iter_plan(p))), path)
    assert read == _items_or_error(count_plan, path) and isinstance(read, int)
    text = _header(tmp_path / "empty.ecsv") + _random_plan_text(rng, 60)
    path.write_text(rng.choice([text, text.replace("\n", "\r\n"), text[: rng.randrange(len(text))]]))
    read, counted = (
        _items_or_error(lambda p: len(list(iter_plan(p))), path),
        _items_or_error(count_plan, path),
    )
    if isinstance(read, int) or not isinstance(counted, int):
        assert counted == read
    else:
        assert "malformed" in str(read)


def test_a_field_past_csvs_size_limit_still_fails_the_plan(tmp_path: Path) -> None:
    header = _header(tmp_path / "empty.ecsv")
    path = tmp_path / "plan.ecsv"
    url = "https://example.org/" + "a" * csv.field_size_limit() + "/x.fits"
    row = f'"{url}","x.fits","","",-1,-1,-1,"","",nan,nan\n'
    path.write_text(header + row, encoding="utf-8")
    with pytest.raises(ConfigError, match="field larger than field limit"):
        list(iter_plan(path))


def test_a_plan_given_as_input_reads_through_the_same_fast_path(tmp_path: Path) -> None:
    rng = random.Random(99)
    header = _header(tmp_path / "empty.ecsv")
    path = tmp_path / "plan.ecsv"
    rows = [
        PlanItem(
            url=f"https://example.org/p/{n}.fits",
            filename=f"{n}.fits",
            sector=n,
            size=n * 10,
            md5=f"{n:032x}",
        )
        for n in range(rng.randint(50, 90))
    ]
    writer = PlanWriter(path)
    writer.write(rows)
    writer.commit()
    assert header.splitlines()[-1] == path.read_text().splitlines()[len(header.splitlines()) - 1]
    assert list(iter_input(path)) == rows == list(iter_plan(path))


def test_the_fast_path_builds_plan_items_in_plan_column_order() -> None:
    # It sets PlanItem's slots directly: a __post_init__ (a check) would be skipped, and a new field
    # would be left unset. Either change must come with a change of `_standard_rows`.
    assert not hasattr(PlanItem, "__post_init__")
    assert PLAN_COLUMNS == (
        "url", "filename", "obs_id", "product", "sector", "size", "est_kb", "md5", "target_name",
        "s_ra", "s_dec",
    )  # fmt: skip


# -- the manifest's resume scan -------------------------------------------------------------------
def _reference_verified(path: Path) -> tuple[dict[str, int], int]:
    """Manifest.verified() of one file before its loop was written out: (found, skipped lines)."""
    found: dict[str, int] = {}
    skipped = 0
    for line in path.read_bytes().split(b"\n"):
        if not line:
            continue
        payload = _payload_of(line)
        if payload is None:
            skipped += 1
            continue
        try:
            rec = _loads(payload)
            url = rec["url"]
            key = rec.get("key") or _legacy_key(rec, url)
            if rec.get("status") == "verified":
                found[key] = pack_record(int(rec.get("nbytes", 0)), rec.get("md5", "") or "")
            else:
                found.pop(key, None)
        except (ValueError, TypeError, KeyError, AttributeError):
            skipped += 1
    return found, skipped


def _framed(record: object) -> bytes:
    payload = json.dumps(record, separators=(",", ":")).encode()
    return b'{"crc":"%08x","rec":%s}\n' % (zlib.crc32(payload), payload)


def test_the_resume_scan_of_one_manifest_answers_as_before(tmp_path: Path) -> None:
    from engine.manifest import ManifestEntry

    rng = random.Random(3)
    lines: list[bytes] = []
    for n in range(5_000):
        key = f"obs{rng.randint(0, 300)}/f{rng.randint(0, 3)}.fits"
        roll = rng.random()
        if roll < 0.6:
            entry = ManifestEntry(
                url=f"https://example.org/{n}",
                path=f"p/{n}",
                status=rng.choice(["verified", "verified", "failed", "pending"]),
                nbytes=rng.choice([0, -5, 2039040, 10**13]),
                md5=rng.choice(["", "0" * 32, f"{rng.getrandbits(128):032x}", "Z" * 32, "abc"]),
                key=key,
            )
            lines.append(encode_entry(entry))
        elif roll < 0.75:  # written by other versions or by hand
            record = {
                "url": rng.choice([f"https://example.org/{n}", "", 5]),
                "status": "verified",
                "obs_id": "o",
                "path": rng.choice(["", f"s/{n}.fits"]),
                "key": rng.choice([key, "", None, 7]),
                "nbytes": rng.choice([1, "12", "x", None, 2.5]),
                "md5": rng.choice(["", None, 3, "1" * 32]),
            }
            lines.append(_framed({k: v for k, v in record.items() if rng.random() < 0.9}))
        elif roll < 0.85:
            lines.append(_framed(rng.choice([[1, 2], "text", None, {"status": "verified"}])))
        else:  # torn, garbled or blank
            line = encode_entry(ManifestEntry(url=f"https://example.org/{n}", status="verified", key=key))
            cut = rng.randint(0, len(line) - 1)
            lines.append(
                rng.choice([line[:cut] + b"\n", line[:cut] + b"X" + line[cut + 1 :], b"\n", b"{}\n"])
            )
    state = tmp_path / ".tessmirror"
    state.mkdir()
    manifest_path = state / "manifest.jsonl"
    manifest_path.write_bytes(b"".join(lines) + b'{"crc":"0000')  # a torn last line too
    manifest = Manifest(state)
    found, skipped = _reference_verified(manifest_path)
    assert manifest.verified() == found
    assert manifest.skipped_lines == skipped and skipped > 0 and found


def test_unpack_record_spells_the_md5_as_before() -> None:
    from engine.manifest import unpack_record

    rng = random.Random(8)
    for _ in range(20_000):
        nbytes, md5 = rng.randint(0, 10**13), f"{rng.getrandbits(rng.choice([8, 64, 127, 128])):032x}"
        packed = pack_record(nbytes, rng.choice([md5, md5.upper(), "", "x" * 32]))
        expected = f"{(packed >> 1) & ((1 << 128) - 1):032x}" if packed & 1 else ""
        assert unpack_record(packed) == (packed >> 129, expected)


def test_only_a_dot_casefolds_to_a_leading_dot_so_relpath_for_may_skip_the_casefold() -> None:
    import sys

    leading = [c for c in range(sys.maxunicode + 1) if chr(c).casefold()[:1] in (".", "") and c != 0x2E]
    assert leading == []
    item = PlanItem(url="u", filename=".TessMirror", sector=-1)
    with pytest.raises(UnsafePathError, match="state folder"):
        layout.relpath_for(item, "flat")


@pytest.mark.parametrize("field", ["nbytes", "size", "attempts"])
def test_a_count_past_64_bits_reads_as_the_general_decoder_reads_it(
    tmp_path: Path, field: str, monkeypatch
) -> None:
    # orjson reads an integer outside int64/uint64 as a float (10**30 + 1 as 1e30): the typed fast
    # decoder must leave such a record to it rather than read the exact integer.
    import msgspec

    from engine import manifest as manifest_module
    from engine.manifest import ManifestEntry

    state = tmp_path / ".tessmirror"
    state.mkdir()
    lines = []
    for n, value in enumerate(
        [2**63 - 1, 2**63, 2**64 - 1, 2**64 + 1, 10**30 + 1, -(2**63), -(2**63) - 1, -(10**30) - 1]
    ):
        record = json.loads(
            encode_entry(ManifestEntry(url=f"u{n}", status="verified", md5="0" * 32, key=f"o/{n}"))[24:-2]
        )
        record[field] = value
        lines.append(_framed(record))
    (state / "manifest.jsonl").write_bytes(b"".join(lines))
    fast = (Manifest(state).verified(), Manifest(state).load())

    def refuse(_payload: bytes) -> object:
        raise msgspec.DecodeError("refused: the general path only")

    monkeypatch.setattr(manifest_module, "_decode_record", refuse)
    assert fast == (Manifest(state).verified(), Manifest(state).load())
