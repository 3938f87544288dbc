"""Plan tables: PlanItems <-> astropy Table (ECSV on disk), URL lists, and exports for other tools.

Every value in a plan came from the archive (or a user's file) and is untrusted: exports quote them
and refuse file names that are not plain names, because aria2 input files and shell scripts would
otherwise let a hostile name write elsewhere or run commands.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import itertools
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

if TYPE_CHECKING:  # astropy.table costs half a second to import: only where a Table is built
    from astropy.table import Table

from engine.exceptions import (
    ConfigError,
    UnsafePathError,
    local_error_from_oserror,
    os_errors,
)
from engine.models import PLAN_COLUMNS, PlanItem
from engine.redact import redact
from engine.settings import PRODUCT_SUFFIXES

EXPORT_FORMATS = ("ecsv", "votable", "csv", "urls", "aria2", "curl")
INPUT_HINT = (
    "give a plan exported by tessmirror (ECSV, CSV, VOTable), a URL list, an aria2 input file "
    "or a curl script"
)
# For the plan a run saved in its state directory: the fix is to plan again.
SAVED_PLAN_HINT = "the saved plan is damaged; pass --refresh-plan to query TAP again (it replaces the file)"
STDIN = "-"  # `--input -`: read the plan or URL list from standard input
PLAN_FILE = "plan.ecsv"  # the saved plan, in the state folder
_INT_COLUMNS = frozenset({"sector", "size", "est_kb"})
_FLOAT_COLUMNS = frozenset({"s_ra", "s_dec"})
_MD5 = re.compile(r"[0-9a-f]{32}")
_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f/\\]")
_SECTOR_IN_NAME = re.compile(r"-s(\d{4})-")
# Longest suffix first, so "_fast-lc.fits" is not taken for "_lc.fits".
_SUFFIXES = sorted(PRODUCT_SUFFIXES.items(), key=lambda kv: -len(kv[1]))


def product_of(filename: str) -> str:
    """The product type ("lc", "tp", ...) from a file name's suffix; "" when none matches."""
    lowered = filename.lower()
    for product, suffix in _SUFFIXES:
        if lowered.endswith(suffix):
            return product
    return ""


def sector_of(filename: str) -> int:
    """The sector from a TESS file name ('...-s0001-...'), or -1."""
    match = _SECTOR_IN_NAME.search(filename)
    return int(match.group(1)) if match else -1


def is_safe_filename(name: str) -> bool:
    """A plain file name: not empty, no separators, no control characters, not '.' or '..'."""
    return bool(name) and name not in (".", "..") and not _UNSAFE_CHARS.search(name)


def filename_from_url(url: str) -> str:
    """The file name a URL serves: the last path segment of its `uri=` value, else of its path."""
    parts = urlsplit(url)
    uris = parse_qs(parts.query).get("uri")
    source = uris[0] if uris else unquote(parts.path)
    return source.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]


# -- PlanItem <-> Table -------------------------------------------------------------------------------
def items_to_table(items: Iterable[PlanItem]) -> Table:
    """A plan table with exactly the columns PLAN_COLUMNS, one row per item."""
    rows = list(items)
    columns: dict[str, Any] = {}
    for name in PLAN_COLUMNS:
        values = [getattr(item, name) for item in rows]
        dtype = np.int64 if name in _INT_COLUMNS else np.float64 if name in _FLOAT_COLUMNS else str
        columns[name] = np.array(values, dtype=dtype)
    from astropy.table import Table

    return Table(columns, names=PLAN_COLUMNS)


def table_to_items(table: Table) -> Iterator[PlanItem]:
    """PlanItems from a plan table; masked or missing cells become the 'unknown' values."""
    missing = [name for name in ("url", "filename") if name not in table.colnames]
    if missing:
        raise ConfigError("input", f"the plan table has no {', '.join(missing)} column")
    present = [name for name in PLAN_COLUMNS if name in table.colnames]
    for row in table:
        fields: dict[str, Any] = {}
        for name in present:
            value = row[name]
            if np.ma.is_masked(value):
                continue
            fields[name] = _cell_value(name, value)
        yield PlanItem(**fields)


def _cell_value(name: str, value: Any) -> Any:
    """One table cell as the PlanItem field's type (VOTable strings may arrive as bytes)."""
    if name in _INT_COLUMNS:
        return int(value)
    if name in _FLOAT_COLUMNS:
        return _float(float(value))
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


# -- files ----------------------------------------------------------------------------------------
def save_plan(table: Table, path: Path, *, meta: Mapping[str, Any] | None = None) -> None:
    """Write `table` as an ECSV plan, atomically; `meta` (and the table's own) goes in the header."""
    writer = PlanWriter(path, meta={**table.meta, **(meta or {})})
    try:
        writer.write(table_to_items(table))
    except BaseException:
        writer.discard()
        raise
    writer.commit()


class PlanWriter:
    """Streams PlanItems into an ECSV plan, page by page, so planning never holds the whole plan.

    The header comes from astropy (any ECSV reader accepts the file); rows are plain CSV. The file is
    written under a temporary name and appears at `path` only on `commit()`, so a killed run never
    leaves a partial plan that a resume would take for the whole inventory.
    """

    def __init__(self, path: Path, *, meta: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.count = 0
        header = items_to_table([])
        self._meta = {k: _redacted(v) for k, v in (meta or {}).items()}
        header.meta.update(self._meta)
        buffer = io.StringIO()
        header.write(buffer, format="ascii.ecsv", delimiter=",")
        with os_errors(self.path, "write the plan"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, self._tmp = tempfile.mkstemp(
                prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
            )
            self._handle = os.fdopen(fd, "w", encoding="utf-8", newline="")
            self._handle.write(buffer.getvalue())
            self._handle.flush()  # a PlanTail may read the rows while we write them
        # Strings quoted, numbers bare: exactly what astropy's ECSV reader expects back.
        self._rows = csv.writer(self._handle, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")

    @property
    def tmp_path(self) -> Path:
        """Where the rows are, until `commit()`."""
        return Path(self._tmp)

    def write(self, items: Iterable[PlanItem]) -> None:
        """Append rows; they are flushed, so a PlanTail can read every row counted in `count`.

        `count` grows only after the flush: a reader must never be told of a row that a full disk
        left half-written.
        """
        written = 0
        with os_errors(self.path, "write the plan"):
            for item in items:
                self._rows.writerow([getattr(item, name) for name in PLAN_COLUMNS])
                written += 1
            self._handle.flush()
            self.count += written

    def commit(self, meta: Mapping[str, Any] | None = None) -> None:
        """Give the plan its final name (atomically, fsync'ed first).

        `meta`: header entries known only now (the ADQL sent). The header is then written again,
        with the rows copied after it, because the rows were streamed out before these were known.
        """
        with os_errors(self.path, "write the plan"):
            try:
                self._handle.flush()
                if meta:
                    self._rewrite_header(meta)
                os.fsync(self._handle.fileno())
                self._handle.close()
                os.replace(self._tmp, self.path)
            except OSError:
                self.discard()
                raise

    def _rewrite_header(self, meta: Mapping[str, Any]) -> None:
        self._meta.update({k: _redacted(v) for k, v in meta.items()})
        header = items_to_table([])
        header.meta.update(self._meta)
        buffer = io.StringIO()
        header.write(buffer, format="ascii.ecsv", delimiter=",")
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with (
                os.fdopen(fd, "w", encoding="utf-8", newline="") as out,
                open(self._tmp, encoding="utf-8", newline="") as rows,
            ):
                out.write(buffer.getvalue())  # ends with the column-names line
                for line in rows:  # skip the old header and its column-names line
                    if not line.startswith("#"):
                        break
                shutil.copyfileobj(rows, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._handle.close()
        Path(self._tmp).unlink(missing_ok=True)
        self._tmp = tmp
        self._handle = open(tmp, "a", encoding="utf-8", newline="")  # noqa: SIM115 - closed by commit

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._handle.close()
        Path(self._tmp).unlink(missing_ok=True)


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value


def remove_stale_temp_files(path: Path) -> int:
    """Remove the temporary files PlanWriters for `path` left behind (a run killed mid-plan).

    Call it only while holding the run lock, when no other writer of this plan can be at work.
    Returns how many were removed.
    """
    path = Path(path)
    removed = 0
    with contextlib.suppress(OSError):
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
                removed += 1
    return removed


class PlanTail:
    """Reads, in order, the rows a PlanWriter has flushed, while it goes on writing.

    The caller knows how many rows are complete (the writer's `count` after a `write()` returned)
    and never asks for more, so a half-written row is never read. The tail keeps its own descriptor:
    the writer's rename on commit does not disturb it.
    """

    def __init__(self, writer: PlanWriter) -> None:
        self.path = writer.path
        self._handle = open(writer.tmp_path, encoding="utf-8", newline="")  # noqa: SIM115 - close()
        header, first = _plan_header(self._handle, self.path, "plan", SAVED_PLAN_HINT)
        self._rows = csv.reader(_Lines(self._handle), delimiter=header.get("delimiter", " "))
        names = next(csv.reader([first], delimiter=header.get("delimiter", " ")), [])
        self._columns = _columns(names)
        self._number = 0

    def read(self, count: int) -> list[PlanItem]:
        """The next `count` rows (all of them flushed by the writer)."""
        items = []
        for row in itertools.islice(self._rows, count):
            self._number += 1
            items.append(_row_item(row, self._columns, self.path, self._number, "plan", SAVED_PLAN_HINT))
        return items

    def close(self) -> None:
        self._handle.close()


class _Lines:
    """An iterator over a file's lines that can be resumed after reaching the current end."""

    def __init__(self, handle: TextIO) -> None:
        self.handle = handle

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self.handle.readline()
        if not line:
            raise StopIteration
        return line


def _plan_header(
    handle: Iterator[str], path: Path, key: str, hint: str = INPUT_HINT
) -> tuple[dict[str, Any], str]:
    """Reads the ECSV header lines; returns (header dict, the first line after it).

    Any fault (not text, not YAML, no datatype) is one ConfigError line with `hint`: YAML's own
    messages run over several lines and point at internals.
    """
    lines: list[str] = []
    try:
        for line in handle:
            if not line.startswith("#"):
                break
            lines.append(line[2:] if line.startswith("# ") else line[1:])
        else:
            line = ""
        return _header_from_yaml(lines), line
    except Exception as err:  # yaml raises several types for a bad header; a binary file, others
        raise ConfigError(
            key, f"{str(path)!r} is not a valid ECSV plan: {_one_line(err)}", hint=hint
        ) from None


def _one_line(err: BaseException) -> str:
    """A short, single-line reason; YAML's own messages run over several lines with a code excerpt."""
    problem = getattr(err, "problem", None)
    if problem:
        mark = getattr(err, "problem_mark", None)
        where = f" (header line {mark.line + 1})" if mark is not None else ""
        context = getattr(err, "context", None)
        text = f"{context}: {problem}{where}" if context else f"{problem}{where}"
    else:
        text = str(err)
    text = " ".join(text.split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return text or type(err).__name__


def _header_from_yaml(lines: list[str]) -> dict[str, Any]:
    """The ECSV header as a dict, read with PyYAML (as astropy does, without importing astropy.table:
    a resume must start fast). Only the keys a plan reader needs are interpreted."""
    import yaml  # an astropy dependency

    if not lines or not lines[0].startswith("%ECSV"):
        raise ValueError("no '%ECSV' line: not an ECSV file")
    header = yaml.safe_load("".join(lines[1:]))
    if not isinstance(header, dict) or "datatype" not in header:
        raise ValueError("the header has no datatype list")
    meta = header.get("meta") or {}
    if isinstance(meta, list):  # !!omap loads as a list of pairs
        meta = dict(meta)
    return {**header, "meta": meta}


def plan_meta(path: Path, *, key: str = "input", hint: str = INPUT_HINT) -> dict[str, Any]:
    """The `meta` of a saved plan, read from its header alone."""
    try:
        with open(path, encoding="utf-8") as handle:
            header, _ = _plan_header(handle, Path(path), key, hint)
    except OSError as err:
        raise ConfigError(
            key, f"cannot read the plan {str(path)!r}: {err.strerror or err}", hint=hint
        ) from None
    meta = header.get("meta") or {}
    if not isinstance(meta, dict):
        raise ConfigError(
            key, f"{str(path)!r} is not a valid ECSV plan: its meta is not a mapping", hint=hint
        )
    return dict(meta)


def iter_plan(path: Path, *, key: str = "input", hint: str = INPUT_HINT) -> Iterator[PlanItem]:
    """Stream the PlanItems of an ECSV plan, in bounded memory (a plan may hold a million rows)."""
    path = Path(path)
    try:
        handle = open(path, encoding="utf-8", newline="")  # noqa: SIM115 - closed in the finally
    except FileNotFoundError:
        raise ConfigError(key, f"the plan {str(path)!r} does not exist", hint=hint) from None
    except OSError as err:
        raise ConfigError(key, f"cannot read the plan {str(path)!r}: {err.strerror}", hint=hint) from None
    return _iter_plan_handle(handle, path, key, hint)


def count_plan(path: Path, *, key: str = "input", hint: str = INPUT_HINT) -> int:
    """How many items `iter_plan(path)` yields, for a progress total, without building them.

    A plan in PlanWriter's layout (its column-names line, then one row a line) is counted by matching
    each line with the reader's own `_STANDARD_ROW`: what it matches, `iter_plan` reads as one row. Any
    other plan, or one line it does not match, is counted by `iter_plan` itself, whose errors are
    raised. (A row whose numbers do not parse is counted here and refused by the reading.)

    Parameters
    ----------
    path : Path
        An ECSV plan (the saved plan of a run).
    key, hint : str
        What `iter_plan`'s errors name, and their fix.

    Returns
    -------
    int
        The number of rows.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            lines = iter(handle)
            header, first = _plan_header(lines, path, key, hint)
            if header.get("delimiter", " ") == "," and first.rstrip("\r\n") == _STANDARD_NAMES:
                match, longest, number = _STANDARD_ROW.fullmatch, csv.field_size_limit(), 0
                for number, line in enumerate(lines, start=1):  # noqa: B007 - read after the loop
                    if len(line) > longest or "\x00" in line or match(line) is None:
                        break
                else:
                    return number
    except (OSError, UnicodeDecodeError, ConfigError):
        pass  # `iter_plan` says what is wrong, as ever
    return sum(1 for _ in iter_plan(path, key=key, hint=hint))


def _iter_plan_handle(
    handle: TextIO, path: Path, key: str, hint: str, first_lines: Iterable[str] = ()
) -> Iterator[PlanItem]:
    """The rows of an ECSV plan open in `handle` (after `first_lines`, already read from it)."""
    try:
        lines = itertools.chain(first_lines, handle)
        header, first = _plan_header(lines, path, key, hint)
        delimiter = header.get("delimiter", " ")
        feed = _Feed(itertools.chain([first], lines))
        rows = csv.reader(feed, delimiter=delimiter)
        names = next(rows, [])
        columns = _columns(names)
        if not columns:
            raise ConfigError(key, f"the plan {str(path)!r} has no url/filename columns", hint=hint)
        if delimiter == "," and tuple(names) == PLAN_COLUMNS:
            yield from _standard_rows(feed, rows, columns, path, key, hint)
            return
        for number, row in enumerate(rows, start=1):
            yield _row_item(row, columns, path, number, key, hint)
    except (UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(key, f"cannot read the plan {str(path)!r}: {_one_line(err)}", hint=hint) from None
    finally:
        handle.close()


def _columns(names: list[str]) -> list[tuple[str, int, str]]:
    """(name, index, kind) for each plan column present, kind "i" (int), "f" (float) or "s";
    [] when url or filename is missing. Plans written before a column existed simply lack it."""
    if "url" not in names or "filename" not in names:
        return []
    return [
        (name, names.index(name), "i" if name in _INT_COLUMNS else "f" if name in _FLOAT_COLUMNS else "s")
        for name in PLAN_COLUMNS
        if name in names
    ]


def _convert(text: str, kind: str) -> Any:
    if kind == "s":
        return text
    if kind == "i":
        return int(text) if text else -1
    return _float(float(text)) if text else math.nan


def _float(value: float) -> float:
    """`value`, with every NaN as the one `math.nan` object: PlanItems then compare equal after a
    round trip (dataclass equality compares fields by identity first, and NaN != NaN)."""
    return math.nan if value != value else value


class _Feed:
    """The lines of a plan for a csv.reader, with room to hand it one line taken out meanwhile.

    The reader stops at the end of each record, so lines may be read past it between records; a line
    the fast path cannot read is put back with `push` and the reader goes on from there, over as many
    lines as that record spans (a quoted newline).
    """

    def __init__(self, lines: Iterator[str]) -> None:
        self.lines = lines
        self.pushed: str | None = None

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> str:
        line = self.pushed
        if line is None:
            return next(self.lines)
        self.pushed = None
        return line

    def push(self, line: str) -> None:
        self.pushed = line


# One row as `PlanWriter` writes it (csv.QUOTE_NONNUMERIC, the columns of PLAN_COLUMNS in order):
# strings quoted, numbers bare. Only rows whose every string field holds no quote (so no doubled
# quote to undo) and whose bare fields hold no quote, comma or line end are read by this pattern;
# what it matches, csv.reader splits into the same strings. A line with a NUL (which csv.reader
# refuses before Python 3.11) or anything else goes to csv.reader itself. (A NUL in the character
# classes would double the pattern's time: they are then no longer simple negations.)
_QUOTED = r'"([^"]*)"'
_BARE = r'([^,"\r\n]*)'
_STANDARD_ROW = re.compile(
    ",".join(_BARE if name in _INT_COLUMNS or name in _FLOAT_COLUMNS else _QUOTED for name in PLAN_COLUMNS)
    + r"\r?\n?"
)


_STANDARD_NAMES = ",".join(PLAN_COLUMNS)  # PlanWriter's column-names line, without its line end
_INTS_KEPT = 4096  # int column texts whose values `_standard_rows` remembers, at most (about 0.5 MB)

# The setters of PlanItem's slots, in PLAN_COLUMNS order (`_standard_rows` builds items with them).
_PLAN_ITEM_SETTERS = tuple(vars(PlanItem)[name].__set__ for name in PLAN_COLUMNS)


def _standard_rows(
    feed: _Feed,
    rows: Iterator[list[str]],
    columns: list[tuple[str, int, str]],
    path: Path,
    key: str,
    hint: str,
) -> Iterator[PlanItem]:
    """The data rows of a plan in PlanWriter's column order: each line matched by `_STANDARD_ROW`
    and built positionally (a million-row resume spent a third of its time in csv.reader and
    keyword construction); any other line is read by csv.reader `rows`, as before."""
    match = _STANDARD_ROW.fullmatch
    # csv.reader refuses a field longer than this (csv.Error); such a line keeps that answer.
    longest = csv.field_size_limit()
    nan = math.nan
    new_item = object.__new__
    (set_url, set_filename, set_obs_id, set_product, set_sector, set_size, set_est_kb, set_md5, set_target,
     set_ra, set_dec) = _PLAN_ITEM_SETTERS  # fmt: skip
    ints: dict[str, int] = {"": -1}  # the text of an int column -> its value ("" is unknown)
    known = ints.get
    number = 0
    # The lines underneath the feed, not the feed: a Python-level __next__ per row cost a tenth of
    # the reading. Nothing is pushed back between rows (the reader takes a pushed line at once).
    for line in feed.lines:
        number += 1
        found = match(line) if len(line) <= longest and "\x00" not in line else None
        if found is None:
            feed.push(line)
            row = next(rows, None)
            if row is None:
                return
            yield _row_item(row, columns, path, number, key, hint)
            continue
        url, filename, obs_id, product, sector, size, est_kb, md5, target, ra, dec = found.groups()
        # The int columns repeat a few texts (sectors, a product's size, its estimate): their values
        # are remembered, a dict lookup each instead of int().
        sector_value, size_value, est_value = known(sector), known(size), known(est_kb)
        try:
            if sector_value is None or size_value is None or est_value is None:
                sector_value = int(sector) if sector else -1
                size_value = int(size) if size else -1
                est_value = int(est_kb) if est_kb else -1
                if len(ints) < _INTS_KEPT:
                    ints[sector], ints[size], ints[est_kb] = sector_value, size_value, est_value
            numbers = (
                sector_value,
                size_value,
                est_value,
                nan if ra == "nan" or not ra else _float(float(ra)),
                nan if dec == "nan" or not dec else _float(float(dec)),
            )
        except ValueError:
            raise ConfigError(key, f"{str(path)!r}, data row {number}: malformed", hint=hint) from None
        # PlanItem(...) without its frozen __init__'s eleven object.__setattr__ lookups: the slots'
        # own setters, half the cost. The same object (a test compares them; PlanItem has no
        # __post_init__ to skip).
        item = new_item(PlanItem)
        set_url(item, url)
        set_filename(item, filename)
        set_obs_id(item, obs_id)
        set_product(item, product)
        set_sector(item, numbers[0])
        set_size(item, numbers[1])
        set_est_kb(item, numbers[2])
        set_md5(item, md5)
        set_target(item, target)
        set_ra(item, numbers[3])
        set_dec(item, numbers[4])
        yield item


def _row_item(
    row: list[str], columns: list[tuple[str, int, str]], path: Path, number: int, key: str, hint: str
) -> PlanItem:
    try:
        fields = {name: _convert(row[i], kind) for name, i, kind in columns}
    except (ValueError, IndexError):
        raise ConfigError(key, f"{str(path)!r}, data row {number}: malformed", hint=hint) from None
    return PlanItem(**fields)


def load_plan(path: Path, *, key: str = "input") -> Table:
    """Read an ECSV plan; an unreadable or malformed file raises ConfigError naming `key` and the path."""
    path = Path(path)
    hint = "give a plan written by tessmirror (ECSV), or a file of URLs"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(key, f"the plan {str(path)!r} does not exist", hint=hint) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(key, f"cannot read the plan {str(path)!r}: {err}", hint=hint) from None
    try:
        from astropy.table import Table

        table = Table.read(text, format="ascii.ecsv")
    except Exception as err:  # astropy raises many types for a malformed ECSV
        raise ConfigError(key, f"{str(path)!r} is not a valid ECSV plan: {err}", hint=hint) from None
    for name in _FLOAT_COLUMNS - set(table.colnames):  # a plan saved before positions were kept
        table[name] = np.full(len(table), math.nan)
    missing = [name for name in PLAN_COLUMNS if name not in table.colnames]
    if missing:
        raise ConfigError(key, f"the plan {str(path)!r} lacks the columns {', '.join(missing)}", hint=hint)
    return table[list(PLAN_COLUMNS)]


def iter_input(path: Path, *, key: str = "input", spool_dir: Path | None = None) -> Iterator[PlanItem]:
    """Every format `tessmirror plan` exports, streamed as PlanItems; the format is detected from
    the content, not the name:

    - ECSV (a ``# %ECSV`` first line) and CSV (a header line naming ``url`` and ``filename``): rows
      are streamed.
    - VOTable (XML): parsed whole by astropy; from a pipe or standard input it is first spooled to a
      temporary file in `spool_dir` (the state directory), removed once parsed.
    - URL lists, aria2 input files and curl scripts (ours, and MAST's ``tesscurl_*.sh``), all read
      line by line: a URL line; indented aria2 options after it (``out=``, ``checksum=md5=``);
      ``curl ... -o FILE URL`` lines (the destination's base name is the file; an astroquery-style
      ``mastDownload/TESS/<obs_id>/<file>`` destination also gives the obs_id). '#' comments and
      blank lines are ignored; so are other shell commands in a script (one starting ``#!``).

    The file is opened here (a missing or unreadable file fails now, named) and read once, front to
    back, as the iterator is consumed: a pipe, `/dev/stdin`, `<(...)` and `-` (standard input) work.
    """
    path = Path(path)
    if str(path) == STDIN or (path.name == STDIN and not path.exists()):
        handle = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline="")
        path = Path("<stdin>")
    else:
        try:
            handle = open(path, encoding="utf-8", newline="")  # noqa: SIM115 - closed by the iterator
        except FileNotFoundError:
            raise ConfigError(key, f"the file {str(path)!r} does not exist", hint="check --input") from None
        except OSError as err:
            raise ConfigError(
                key, f"cannot read {str(path)!r}: {err.strerror or err}", hint="check --input"
            ) from None
    return _iter_input_handle(handle, path, key, spool_dir)


def _iter_input_handle(
    handle: TextIO, path: Path, key: str, spool_dir: Path | None = None
) -> Iterator[PlanItem]:
    try:
        first = handle.readline()
    except (OSError, UnicodeDecodeError) as err:
        handle.close()
        raise ConfigError(key, f"cannot read {str(path)!r}: {_one_line(err)}", hint="check --input") from None
    first = first.lstrip("\ufeff")  # a byte-order mark from a Windows editor
    stripped = first.strip()
    if first.startswith("# %ECSV"):
        yield from _iter_plan_handle(handle, path, key, INPUT_HINT, [first])
    elif stripped.startswith("<"):
        yield from _iter_votable(handle, path, key, first, spool_dir)
    elif _csv_header(stripped):
        yield from _iter_csv(handle, path, key, first)
    else:
        yield from _iter_url_list(handle, path, key=key, first=first)


def _csv_header(line: str) -> list[str]:
    """The column names when `line` is the header of a CSV plan (naming url and filename), else []."""
    if "," not in line:
        return []
    names = next(csv.reader([line]), [])
    names = [name.strip() for name in names]
    return names if "url" in names and "filename" in names else []


def _iter_csv(handle: TextIO, path: Path, key: str, first: str) -> Iterator[PlanItem]:
    """Rows of a CSV plan (`plan --format csv`): the header names the columns, in any order."""
    try:
        columns = _columns(_csv_header(first.strip()))
        for number, row in enumerate(csv.reader(handle), start=1):
            if not row:
                continue
            yield _row_item(row, columns, path, number, key, INPUT_HINT)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(key, f"cannot read {str(path)!r}: {_one_line(err)}", hint="check --input") from None
    finally:
        handle.close()


def _iter_votable(
    handle: TextIO, path: Path, key: str, first: str, spool_dir: Path | None
) -> Iterator[PlanItem]:
    """Rows of a VOTable plan. astropy parses a VOTable whole, so a pipe is spooled to a file first."""
    spooled: Path | None = None
    try:
        source: Path
        if str(path) != "<stdin>" and _is_regular(handle):
            source = path
        else:
            spooled = _spool(handle, first, path, key, spool_dir)
            source = spooled
        handle.close()
        try:
            import warnings

            from astropy.io.votable import parse_single_table

            with warnings.catch_warnings():  # astropy warns per odd cell; the fault, if any, is raised
                warnings.simplefilter("ignore")
                table = parse_single_table(str(source)).to_table()
        except Exception as err:  # astropy raises many types for a malformed VOTable
            raise ConfigError(
                key, f"{str(path)!r} is not a valid VOTable plan: {_one_line(err)}", hint=INPUT_HINT
            ) from None
        if spooled is not None:
            spooled.unlink(missing_ok=True)
            spooled = None
        yield from table_to_items(table)
    finally:
        handle.close()
        if spooled is not None:
            spooled.unlink(missing_ok=True)


def _is_regular(handle: TextIO) -> bool:
    import stat

    try:
        return stat.S_ISREG(os.fstat(handle.fileno()).st_mode)
    except (OSError, ValueError, io.UnsupportedOperation):
        return False


def _spool(handle: TextIO, first: str, path: Path, key: str, spool_dir: Path | None) -> Path:
    """Copy what is left of a pipe (after `first`) to a private temporary file; returns its path."""
    with os_errors(Path(spool_dir or tempfile.gettempdir()), "spool the input to"):
        if spool_dir is not None:
            Path(spool_dir).mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".input.", suffix=".vot.tmp", dir=spool_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            out.write(first)
            shutil.copyfileobj(handle, out, 1 << 20)
    except (OSError, UnicodeDecodeError) as err:
        Path(name).unlink(missing_ok=True)
        if isinstance(err, UnicodeDecodeError):
            raise ConfigError(
                key, f"cannot read {str(path)!r}: {_one_line(err)}", hint="check --input"
            ) from None
        raise local_error_from_oserror(err, Path(name), "spool the input to") from err
    return Path(name)


def read_input(path: Path, *, key: str = "input") -> Table:
    """`iter_input` as a Table (for small inputs and exports)."""
    return items_to_table(iter_input(path, key=key))


_CURL_VALUE_OPTIONS = frozenset(
    {"-C", "--continue-at", "-H", "--header", "-u", "--user", "-A", "--user-agent", "-e", "--referer",
     "-m", "--max-time", "--connect-timeout", "--retry", "--retry-delay", "--retry-max-time", "-w",
     "--write-out", "-x", "--proxy", "-b", "--cookie", "-c", "--cookie-jar", "-K", "--config",
     "-d", "--data", "-r", "--range", "-z", "--time-cond", "--limit-rate", "-Y", "-y"}
)  # fmt: skip
# astroquery/lightkurve's cache layout, and MAST's bulk scripts that reproduce it.
_MAST_DOWNLOAD = re.compile(r"(?:^|/)mastDownload/[^/]+/([^/]+)/[^/]+$")


def _curl_target(text: str) -> tuple[str, str] | None:
    """(url, output path) of one `curl ...` command line ("" output: the URL's own name), or None
    when the line is not a curl command with an http(s) URL. Raises ValueError for bad quoting."""
    words = shlex.split(text, comments=True)
    if not words or words[0] not in ("curl", "/usr/bin/curl"):
        return None
    url = output = ""
    index = 1
    while index < len(words):
        word = words[index]
        if word in ("-o", "--output"):
            output = words[index + 1] if index + 1 < len(words) else ""
            index += 2
            continue
        if word.startswith("--output="):
            output = word.split("=", 1)[1]
        elif word.startswith("-o") and len(word) > 2 and not word.startswith("--"):
            output = word[2:]
        elif word in _CURL_VALUE_OPTIONS:
            index += 2
            continue
        elif word.startswith(("http://", "https://")):
            url = word
        index += 1
    return (url, output) if url else None


def _iter_url_list(handle: TextIO, path: Path, *, key: str, first: str = "") -> Iterator[PlanItem]:
    """URL lists, aria2 input files and curl scripts (see `iter_input`), one item per URL."""
    seen: set[str] = set()
    hint = "one http(s) URL a line (aria2 options indented below it), or `curl -o FILE URL` lines"
    script = first.startswith("#!")
    pending: tuple[int, str, dict[str, str]] | None = None  # (line number, url, options)
    try:
        for number, line in enumerate(itertools.chain([first] if first else [], handle), start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and pending is not None and "=" in text:
                name, _, value = text.partition("=")  # an aria2 option of the URL above
                pending[2][name.strip()] = value.strip()
                continue
            if pending is not None:
                item = _listed_item(*pending, key=key, hint=hint)
                if item.url not in seen:
                    seen.add(item.url)
                    yield item
                pending = None
            if text.startswith("curl ") or text.startswith("/usr/bin/curl "):
                script = True
                try:
                    target = _curl_target(text)
                except ValueError as err:
                    raise ConfigError(
                        key, f"line {number}: cannot parse the curl command: {err}", hint=hint
                    ) from None
                if target is None:
                    raise ConfigError(key, f"line {number}: a curl command without an http(s) URL", hint=hint)
                pending = (number, target[0], {"out": target[1]} if target[1] else {})
                continue
            url = text.split("\t", 1)[0].strip()  # aria2: TAB-separated mirrors of one file; take the first
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or re.search(r"\s", url):
                if script:
                    continue  # another shell command of a download script (cd, mkdir, echo, ...)
                raise ConfigError(key, f"line {number}: {redact(url)!r} is not an http(s) URL", hint=hint)
            pending = (number, url, {})
        if pending is not None:
            item = _listed_item(*pending, key=key, hint=hint)
            if item.url not in seen:
                yield item
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(key, f"cannot read {str(path)!r}: {_one_line(err)}", hint="check --input") from None
    finally:
        handle.close()


def _listed_item(number: int, url: str, options: dict[str, str], *, key: str, hint: str) -> PlanItem:
    """The PlanItem of one URL of a list, aria2 file or curl script (with its `out`/`checksum`)."""
    out = options.get("out", "").replace("\\", "/")
    filename = out.rstrip("/").rsplit("/", 1)[-1] if out else filename_from_url(url)
    if not is_safe_filename(filename):
        raise ConfigError(key, f"line {number}: no usable file name in {redact(url)!r}", hint=hint)
    cache = _MAST_DOWNLOAD.search(out) if out else None
    obs_id = cache.group(1) if cache and is_safe_filename(cache.group(1)) else ""
    checksum = options.get("checksum", "")
    algorithm, _, digest = checksum.partition("=")
    md5 = digest.lower() if algorithm.lower() == "md5" and _MD5.fullmatch(digest.lower()) else ""
    return PlanItem(
        url=url,
        filename=filename,
        obs_id=obs_id,
        product=product_of(filename),
        sector=sector_of(filename),
        md5=md5,
    )


# -- exports -------------------------------------------------------------------------------------
class PlanExporter:
    """Writes a plan as ecsv | votable | csv | urls | aria2 | curl, page by page.

    Every format but votable streams (bounded memory for any plan size); votable needs the whole
    table, so it is built on `close()`. aria2: per file a URL line with indented `out=` and (when
    known) `checksum=md5=` options; curl: one `curl -f -L -C - -o <file> <url>` line per file,
    shell-quoted.
    """

    def __init__(self, fmt: str, out: TextIO, *, safe_name: Callable[[str], bool] = is_safe_filename) -> None:
        self.fmt = fmt.lower()
        if self.fmt not in EXPORT_FORMATS:
            raise ConfigError(
                "format", f"unknown export format {fmt!r}", hint=f"use one of: {', '.join(EXPORT_FORMATS)}"
            )
        self.out = out
        self.safe_name = safe_name
        self._votable: list[PlanItem] = []
        self._rows = None
        if self.fmt in ("ecsv", "csv"):
            if self.fmt == "ecsv":
                buffer = io.StringIO()
                items_to_table([]).write(buffer, format="ascii.ecsv", delimiter=",")
                out.write(buffer.getvalue())
            else:
                out.write(",".join(PLAN_COLUMNS) + "\n")
            self._rows = csv.writer(out, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")

    def write(self, items: Iterable[PlanItem]) -> None:
        for item in items:
            if self.fmt == "votable":
                self._votable.append(item)
            elif self._rows is not None:
                self._rows.writerow([getattr(item, name) for name in PLAN_COLUMNS])
            else:
                self._write_line(item)

    def _write_line(self, item: PlanItem) -> None:
        url = _checked_url(item)
        if self.fmt == "urls":
            self.out.write(url + "\n")
            return
        if not self.safe_name(item.filename):
            raise UnsafePathError(
                f"refusing to export the file name {item.filename!r}: it is not a plain file name",
                hint="the archive sent an unsafe name; report it, or drop that row from the plan",
            )
        if self.fmt == "aria2":
            self.out.write(f"{url}\n  out={item.filename}\n")
            if _MD5.fullmatch(item.md5):
                self.out.write(f"  checksum=md5={item.md5}\n")
        else:
            self.out.write(f"curl -f -L -C - -o {shlex.quote(item.filename)} {shlex.quote(url)}\n")

    def close(self) -> None:
        if self.fmt == "votable":
            buffer = io.BytesIO()  # astropy's VOTable writer wants bytes
            items_to_table(self._votable).write(buffer, format="votable")
            self.out.write(buffer.getvalue().decode("utf-8"))


def export_plan(
    table: Table, fmt: str, out: TextIO, *, safe_name: Callable[[str], bool] = is_safe_filename
) -> None:
    """Write a whole plan table in one of EXPORT_FORMATS (see PlanExporter)."""
    exporter = PlanExporter(fmt, out, safe_name=safe_name)
    exporter.write(table_to_items(table))
    exporter.close()


def _checked_url(item: PlanItem) -> str:
    """Refuse URLs that are not http(s) or carry whitespace: a newline would inject lines/options."""
    parts = urlsplit(item.url)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or re.search(r"[\s\x00-\x1f\x7f]", item.url)
    ):
        raise UnsafePathError(
            f"refusing to export the URL {redact(item.url)!r} of {item.filename!r}",
            hint="only http(s) URLs without whitespace can be exported",
        )
    return item.url
