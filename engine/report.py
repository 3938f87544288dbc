"""`tessmirror report`: one self-contained HTML page about a mirror, from its manifest and plan.

What the page shows
-------------------
- counts: planned, verified, failed, pending files, and bytes;
- a sky plot of the footprint polygons and of every planned target, coloured by status, on a
  gnomonic (tangent-plane) projection centred on the footprint, or on a Mollweide whole-sky map when
  the points spread too far for one tangent plane; right ascension increases to the left;
- throughput over time (bytes of the verified records per time bin), with the files that needed
  retries and the failures marked per bin, and, from a run's log file (`--run-log`), each 429/503
  answer and each slow-down (runs separated by a pause of `SESSION_GAP` are told apart: the plot
  shows the last);
- a table of failures with their reasons.

Where the data comes from
-------------------------
The manifest (`<state_dir>/manifest.jsonl`) and the saved plan (`<state_dir>/plan.ecsv`). Target
positions are read from the plan's `s_ra`/`s_dec` columns (or `ra`/`dec`) and footprint polygons from
its `footprints` metadata (a list of polygons: flat ``[ra1, dec1, ra2, dec2, ...]`` lists, MAST's
``POLYGON ...`` strings, or mappings with a ``polygon`` and a ``name``). A plan without them gets a
page that says so instead of a sky plot.

Bounded memory
--------------
Both files are streamed. Per manifest record the report keeps 33 bytes in flat arrays (a 64-bit hash
of the URL, status, time, bytes, tries); the failures table and the reason counts are capped; the sky
plot keeps at most `MAX_SKY_POINTS` targets per status (every other one is dropped each time a
status's buffer fills, so the sample stays spread over the whole plan).

Untrusted text
--------------
File names, URLs and error messages came from the archive: every one is HTML-escaped (control and
bidi characters shown as ``\\u`` plus four hex digits), and the page carries a
Content-Security-Policy that allows no script at all, so a name that slipped through could still
not run. Images are embedded as data: URIs; the page needs no network.

matplotlib is imported only when the pictures are drawn (``pip install 'tessmirror[plot]'``), so
`tessmirror --help` stays fast. Without it the page is written with its tables and a note.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import datetime as _dt
import hashlib
import html
import logging
import math
import os
import re
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.exceptions import ConfigError, TessMirrorError, local_error_from_oserror
from engine.redact import redact

if TYPE_CHECKING:  # numpy and matplotlib are imported where the report is built, not at CLI start
    import numpy as np

log = logging.getLogger(__name__)

REPORT_DIR = "report"  # under the state directory, so `verify` never sees it as an unexpected file
HTML_NAME = "report.html"
SKY_PNG = "sky.png"
THROUGHPUT_PNG = "throughput.png"
PLOT_HINT = "pip install 'tessmirror[plot]' (matplotlib) for the sky and throughput pictures"

MAX_FAILURE_ROWS = 500  # rows of the per-file failures table; the reasons table counts every one
MAX_REASONS = 1000  # distinct reasons counted; the rest are counted under "other reasons"
MAX_SKY_POINTS = 20_000  # targets drawn per status
MAX_TIME_BINS = 240  # bars in the throughput plot
# A pause this long without a record separates two runs (a resume next morning, a requeued job): the
# plot shows the last run, so a week-long gap does not squeeze it into one bar.
SESSION_GAP = 1800.0
GNOMONIC_MAX_RADIUS = 60.0  # degrees from the centre; beyond that a tangent plane distorts too much

# Status codes kept per record (one byte each).
VERIFIED, FAILED, PENDING, QUARANTINED, OTHER = 0, 1, 2, 3, 4
ABSENT = 255  # a planned file with no manifest record yet
_STATUS_CODE = {"verified": VERIFIED, "failed": FAILED, "pending": PENDING, "quarantined": QUARANTINED}
COLOURS = {"verified": "#2a9d4b", "failed": "#d62728", "pending": "#8c8c8c"}

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
# A URL up to white space, without a trailing ':' ',' ';' or ')' that belongs to the sentence.
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+?(?=[:;,)]?(?:\s|$))")
_LONG_NUMBER = re.compile(r"\d{5,}")
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)[,.\d]*\s+([A-Z]+)\s+(.*)$")
_RETRY_LINE = re.compile(r"\btry \d+ failed\b")
_OVERLOAD = re.compile(r"\b(?:HTTP )?(?:429|503)\b")
_SLOWDOWN = re.compile(r"(?i)\bslow(?:ing|ed)?[ -]?down\b|\bconnection limit\b.*\bcut\b")


# -- reading ------------------------------------------------------------------------------------------
def url_key(url: str) -> int:
    """A 64-bit key for a (redacted) URL: a million of them fit in 8 MB, where the strings need 150."""
    return int.from_bytes(
        hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
    )


def identity_key(obs_id: str, filename: str, url: str) -> int:
    """The 64-bit key joining a plan row to its manifest records: the file's identity
    (`engine.manifest.file_key`, so a mirror that switched download source still matches), or the
    redacted URL where the row has no obs_id (a bare URL list)."""
    from engine.manifest import file_key

    key = file_key(obs_id, filename) if obs_id and filename else ""
    return url_key(key) if key else url_key(redact(url))


@dataclass
class Failure:
    """One file whose last manifest record is a failure."""

    name: str
    error: str
    attempts: int
    time: float
    obs_id: str = ""


@dataclass
class ManifestFacts:
    """What the report needs from the manifest, in flat arrays (see the module docstring)."""

    records: int = 0
    skipped_lines: int = 0
    keys: np.ndarray | None = None  # sorted unique URL keys
    status: np.ndarray | None = None  # last status of each key (aligned with `keys`)
    nbytes: np.ndarray | None = None  # bytes of each key's last record
    # Every record, in file order: for the time line.
    times: np.ndarray | None = None
    record_status: np.ndarray | None = None
    record_bytes: np.ndarray | None = None
    record_attempts: np.ndarray | None = None
    failures: list[Failure] = field(default_factory=list)
    failed_total: int = 0
    reasons: Counter[str] = field(default_factory=Counter)


def read_manifest(state_dir: Path) -> ManifestFacts:
    """Stream the manifest (every file of it: shards write their own) twice: flat arrays first, then
    the failures' details (capped). Which record is a file's truth is `mirrorcheck.latest_mask`'s rule,
    the same as `Manifest.load`'s: each file's last record, then the later time, then the later file."""
    import numpy as np

    from engine.manifest import Manifest
    from engine.mirrorcheck import latest_mask

    manifest = Manifest(state_dir)
    latest, _verified, per_file = latest_mask(manifest)
    keys, status, times, nbytes, attempts = array("Q"), array("B"), array("d"), array("q"), array("l")
    for entry in _counted_records(manifest, per_file):
        keys.append(identity_key(entry.obs_id, entry.path.rsplit("/", 1)[-1], entry.url))
        status.append(_STATUS_CODE.get(entry.status, OTHER))
        times.append(entry.time if math.isfinite(entry.time) else 0.0)
        nbytes.append(max(int(entry.nbytes), 0))
        attempts.append(max(int(entry.attempts), 0))
    facts = ManifestFacts(records=len(keys), skipped_lines=manifest.skipped_lines)
    all_keys = np.frombuffer(keys, dtype=np.uint64) if keys else np.zeros(0, np.uint64)
    facts.record_status = np.frombuffer(status, dtype=np.uint8) if status else np.zeros(0, np.uint8)
    facts.times = np.frombuffer(times, dtype=np.float64) if times else np.zeros(0)
    facts.record_bytes = np.frombuffer(nbytes, dtype=np.int64) if nbytes else np.zeros(0, np.int64)
    facts.record_attempts = np.asarray(attempts, dtype=np.int64)
    n = len(all_keys)
    last = np.flatnonzero(latest[:n])
    # Sorted by key for the plan's binary-search join; a key seen twice (one file recorded under two
    # spellings) keeps one record.
    unique, first = np.unique(all_keys[last], return_index=True)
    last = last[first]
    facts.keys = unique
    facts.status = facts.record_status[last]
    facts.nbytes = facts.record_bytes[last]
    failed_last = np.zeros(n, dtype=bool)
    failed_last[last[facts.status == FAILED]] = True
    facts.failed_total = int(failed_last.sum())
    if facts.failed_total:
        _collect_failures(manifest, per_file, failed_last, facts)
    return facts


def _counted_records(manifest: Any, per_file: list[int]) -> Iterator[Any]:
    """The records `latest_mask` counted, in its order: records appended to a file since (or a file
    that appeared since) are not part of this report."""
    seen = [0] * len(per_file)
    for number, entry in manifest.iter_sourced():
        if number < len(per_file) and seen[number] < per_file[number]:
            seen[number] += 1
            yield entry


def _collect_failures(
    manifest: Any, per_file: list[int], failed_last: np.ndarray, facts: ManifestFacts
) -> None:
    """The second pass: error texts of the records that are a file's last, failed record."""
    for index, entry in enumerate(_counted_records(manifest, per_file)):
        if not failed_last[index]:
            continue
        error = redact(entry.error) or "no reason recorded"
        reason = reason_of(error)
        if reason in facts.reasons or len(facts.reasons) < MAX_REASONS:
            facts.reasons[reason] += 1
        else:
            facts.reasons["other reasons"] += 1
        if len(facts.failures) < MAX_FAILURE_ROWS:
            name = entry.path.rsplit("/", 1)[-1] if entry.path else redact(entry.url)
            facts.failures.append(Failure(name, error, entry.attempts, entry.time, entry.obs_id))


def reason_of(error: str) -> str:
    """A failure's reason without the names, URLs and ids in it, so one cause groups many files."""
    text = _LONG_NUMBER.sub("…", _URL.sub("…", _QUOTED.sub("'…'", error.strip())))
    return text if len(text) <= 200 else text[:199] + "…"


@dataclass
class PlanFacts:
    """What the report needs from the plan: counts by status, bytes, sampled positions."""

    present: bool = False
    planned: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    planned_bytes: int = 0
    unknown_size: int = 0
    matched_keys: int = 0  # manifest URLs that the plan names
    has_positions: bool = False
    positioned: int = 0  # rows with a finite position
    sky: dict[str, SkySample] = field(default_factory=dict)
    footprints: list[tuple[str, list[float]]] = field(default_factory=list)
    footprint_problems: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    meta_keys: list[str] = field(default_factory=list)


class SkySample:
    """At most `cap` positions, evenly thinned over a stream of unknown length."""

    def __init__(self, cap: int = MAX_SKY_POINTS) -> None:
        self.cap = max(int(cap), 2)
        self.stride = 1
        self.seen = 0
        self.ra: list[float] = []
        self.dec: list[float] = []

    def add(self, ra: float, dec: float) -> None:
        """Offer one position; keeps every `stride`-th, halving the sample whenever it is full."""
        self.seen += 1
        if (self.seen - 1) % self.stride:
            return
        self.ra.append(ra)
        self.dec.append(dec)
        if len(self.ra) >= self.cap:
            del self.ra[1::2], self.dec[1::2]
            self.stride *= 2


_POSITION_COLUMNS = (("s_ra", "s_dec"), ("ra", "dec"))


def read_plan(plan_path: Path, manifest: ManifestFacts, *, chunk: int = 65_536) -> PlanFacts:
    """Stream the saved plan, joining each row to its manifest status by URL key."""
    import numpy as np

    from engine.plan.table import SAVED_PLAN_HINT, _plan_header, plan_meta

    facts = PlanFacts()
    if not plan_path.exists():
        return facts
    facts.present = True
    meta = plan_meta(plan_path, key="plan", hint=SAVED_PLAN_HINT)
    facts.meta_keys = sorted(str(k) for k in meta)
    facts.footprints, facts.footprint_problems = footprints_from_meta(meta)
    try:
        handle = open(plan_path, encoding="utf-8", newline="")  # noqa: SIM115 - closed below
    except OSError as err:
        raise ConfigError("plan", f"cannot read the plan {str(plan_path)!r}: {err.strerror}") from None
    keys = manifest.keys if manifest.keys is not None else np.zeros(0, np.uint64)
    status = manifest.status if manifest.status is not None else np.zeros(0, np.uint8)
    matched = np.zeros(len(keys), dtype=bool)
    try:
        header, first = _plan_header(handle, plan_path, "plan", SAVED_PLAN_HINT)
        delimiter = header.get("delimiter", " ")
        rows = csv.reader(_chain_first(first, handle), delimiter=delimiter)
        names = next(rows, [])
        facts.columns = list(names)
        if "url" not in names:
            raise ConfigError("plan", f"the plan {str(plan_path)!r} has no url column", hint=SAVED_PLAN_HINT)
        i_url = names.index("url")
        i_obs = names.index("obs_id") if "obs_id" in names else None
        i_name = names.index("filename") if "filename" in names else None
        i_size = names.index("size") if "size" in names else None
        i_est = names.index("est_kb") if "est_kb" in names else None
        pos = next(
            ((names.index(a), names.index(b)) for a, b in _POSITION_COLUMNS if a in names and b in names),
            None,
        )
        facts.has_positions = pos is not None
        facts.sky = {name: SkySample() for name in ("pending", "verified", "failed")}
        batch_keys: list[int] = []
        batch_pos: list[tuple[float, float]] = []
        for number, row in enumerate(rows, start=1):
            try:
                url = row[i_url]
            except IndexError:
                raise ConfigError(
                    "plan", f"{str(plan_path)!r}, data row {number}: malformed", hint=SAVED_PLAN_HINT
                ) from None
            facts.planned += 1
            size = _int_cell(row, i_size)
            if size < 0:
                est = _int_cell(row, i_est)
                size = est * 1024 if est >= 0 else -1
            if size >= 0:
                facts.planned_bytes += size
            else:
                facts.unknown_size += 1
            obs_id = row[i_obs] if i_obs is not None and i_obs < len(row) else ""
            filename = row[i_name] if i_name is not None and i_name < len(row) else ""
            batch_keys.append(identity_key(obs_id, filename, url))
            if pos is not None:
                batch_pos.append((_float_cell(row, pos[0]), _float_cell(row, pos[1])))
            if len(batch_keys) >= chunk:
                _join_batch(batch_keys, batch_pos, keys, status, matched, facts)
                batch_keys, batch_pos = [], []
        _join_batch(batch_keys, batch_pos, keys, status, matched, facts)
    except (UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(
            "plan",
            f"cannot read the plan {str(plan_path)!r}: {' '.join(str(err).split())}",
            hint=SAVED_PLAN_HINT,
        ) from None
    finally:
        handle.close()
    facts.matched_keys = int(matched.sum())
    return facts


def _chain_first(first: str, handle: Any) -> Iterator[str]:
    yield first
    yield from handle


def _int_cell(row: list[str], index: int | None) -> int:
    if index is None or index >= len(row):
        return -1
    try:
        return int(row[index])
    except ValueError:
        return -1


def _float_cell(row: list[str], index: int) -> float:
    try:
        value = float(row[index])
    except (ValueError, IndexError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def _join_batch(
    batch_keys: list[int],
    batch_pos: list[tuple[float, float]],
    keys: np.ndarray,
    status: np.ndarray,
    matched: np.ndarray,
    facts: PlanFacts,
) -> None:
    """Look up a batch of plan rows' statuses in the manifest's sorted keys (vectorised)."""
    import numpy as np

    if not batch_keys:
        return
    wanted = np.array(batch_keys, dtype=np.uint64)
    codes = np.full(len(wanted), ABSENT, dtype=np.uint8)
    if len(keys):
        where = np.searchsorted(keys, wanted)
        where = np.minimum(where, len(keys) - 1)
        found = keys[where] == wanted
        codes[found] = status[where[found]]
        matched[where[found]] = True
    names = np.where(codes == VERIFIED, "verified", np.where(codes == FAILED, "failed", "pending"))
    facts.counts.update(names.tolist())
    for (ra, dec), name in zip(batch_pos, names.tolist(), strict=False):
        if math.isnan(ra) or math.isnan(dec) or abs(dec) > 90:
            continue
        facts.positioned += 1
        facts.sky[name].add(ra % 360.0, dec)


def footprints_from_meta(meta: dict[str, Any]) -> tuple[list[tuple[str, list[float]]], list[str]]:
    """The plan's `footprints` metadata as (name, [ra1, dec1, ...]); unusable entries are named."""
    from engine.config import parse_polygon, validate_polygon

    raw = meta.get("footprints")
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        return [], ["the plan's 'footprints' metadata is not a list"]
    polygons: list[tuple[str, list[float]]] = []
    problems: list[str] = []
    for number, item in enumerate(raw, start=1):
        name, value = f"footprint {number}", item
        if isinstance(item, dict):
            name = str(item.get("name") or name)
            value = item.get("polygon", item.get("s_region"))
        try:
            if isinstance(value, str):
                vertices = parse_polygon(value, key="plan.footprints")
            elif isinstance(value, list):
                vertices = validate_polygon([float(v) for v in value], key="plan.footprints")
            else:
                raise ConfigError("plan.footprints", "neither a vertex list nor a POLYGON string")
        except (ConfigError, TypeError, ValueError) as err:
            problems.append(f"{name}: {getattr(err, 'message', err)}")
            continue
        polygons.append((name, vertices))
    return polygons, problems


@dataclass
class LogEvents:
    """Retries, 429/503 answers and slow-downs found in a run's log file (epoch seconds)."""

    retries: list[float] = field(default_factory=list)
    overload: list[float] = field(default_factory=list)
    slowdowns: list[float] = field(default_factory=list)
    lines: int = 0


def read_log(path: Path, *, cap: int = 200_000) -> LogEvents:
    """Parse tessmirror's log lines (``YYYY-mm-dd HH:MM:SS LEVEL message``, local time).

    A retry line is ``<file>: try N failed (<reason>); retrying in ...``; a reason with HTTP 429 or
    503 is an overload answer, on which the limiter halves the downloads in flight. Lines that say
    "slow-down"/"slowing down" are slow-downs. At most `cap` events of each kind are kept.
    """
    events = LogEvents()
    try:
        handle = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed below
    except OSError as err:
        raise ConfigError(
            "--run-log",
            f"cannot read the log {str(path)!r}: {err.strerror or err}",
            hint="give the log a run wrote (its standard error, or its log file)",
        ) from None
    with handle:
        for line in handle:
            match = _LOG_LINE.match(line)
            if not match:
                continue
            events.lines += 1
            message = match.group(3)
            retry = bool(_RETRY_LINE.search(message))
            overload = retry and bool(_OVERLOAD.search(message))
            slowdown = bool(_SLOWDOWN.search(message))
            if not (retry or slowdown):
                continue
            try:
                when = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S"))
            except (ValueError, OverflowError):
                continue
            for wanted, bucket in (
                (retry, events.retries),
                (overload, events.overload),
                (slowdown, events.slowdowns),
            ):
                if wanted and len(bucket) < cap:
                    bucket.append(when)
    return events


# -- projections --------------------------------------------------------------------------------------
def _unit(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    import numpy as np

    a, d = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)], axis=-1)


def sky_centre(ra: np.ndarray, dec: np.ndarray) -> tuple[float, float, float] | None:
    """(ra0, dec0, radius): the mean direction of the points and the largest angle from it (degrees)."""
    import numpy as np

    if len(ra) == 0:
        return None
    vectors = _unit(ra, dec)
    mean = vectors.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    if norm < 1e-9:
        return 0.0, 0.0, 180.0
    mean /= norm
    ra0 = math.degrees(math.atan2(mean[1], mean[0])) % 360.0
    dec0 = math.degrees(math.asin(max(-1.0, min(1.0, mean[2]))))
    radius = float(np.degrees(np.arccos(np.clip(vectors @ mean, -1.0, 1.0))).max())
    return ra0, dec0, radius


def gnomonic(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Tangent-plane coordinates (degrees) about (ra0, dec0); xi grows with RA (east), eta north.

    Great circles project to straight lines, so a polygon's edges are exactly its straight sides.
    Points 90 degrees or more from the centre have no image: NaN.
    """
    import numpy as np

    a, d = np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))
    a0, d0 = math.radians(ra0), math.radians(dec0)
    cos_c = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(a - a0)
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = np.cos(d) * np.sin(a - a0) / cos_c
        eta = (np.cos(d0) * np.sin(d) - np.sin(d0) * np.cos(d) * np.cos(a - a0)) / cos_c
    behind = cos_c <= 1e-6
    xi, eta = np.degrees(xi), np.degrees(eta)
    xi[behind] = np.nan
    eta[behind] = np.nan
    return xi, eta


def mollweide_x(ra: np.ndarray | Sequence[float]) -> np.ndarray:
    """matplotlib's mollweide longitude (radians) with RA 180 in the middle, increasing to the left."""
    import numpy as np

    return np.radians(180.0 - (np.asarray(ra, float) % 360.0))


def great_circle_path(vertices: Sequence[float], steps: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """The closed polygon with each edge sampled along its great circle (for curved projections)."""
    import numpy as np

    ras, decs = np.asarray(vertices[0::2], float), np.asarray(vertices[1::2], float)
    points = _unit(ras, decs)
    out = []
    for i in range(len(points)):
        p, q = points[i], points[(i + 1) % len(points)]
        angle = math.acos(max(-1.0, min(1.0, float(p @ q))))
        for t in np.linspace(0.0, 1.0, steps, endpoint=False):
            if angle < 1e-12:
                out.append(p)
                continue
            out.append((math.sin((1 - t) * angle) * p + math.sin(t * angle) * q) / math.sin(angle))
    out.append(points[0])
    arr = np.array(out)
    dec = np.degrees(np.arcsin(np.clip(arr[:, 2], -1, 1)))
    ra = np.degrees(np.arctan2(arr[:, 1], arr[:, 0])) % 360.0
    return ra, dec


# -- pictures -----------------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Any:
    """A Figure on the Agg canvas, without pyplot (no global backend state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _nice_step(extent: float, target: int = 6) -> float:
    for step in (0.25, 0.5, 1, 2, 5, 10, 15, 30, 45, 60, 90):
        if extent / step <= target:
            return float(step)
    return 90.0


def draw_sky(plan: PlanFacts) -> tuple[bytes, str] | None:
    """The sky picture (PNG bytes, the projection's description), or None with nothing to draw."""
    drawn = sky_figure(plan)
    if drawn is None:
        return None
    fig, description = drawn
    return _png(fig), description


def sky_figure(plan: PlanFacts) -> tuple[Any, str] | None:
    """The sky plot as a matplotlib Figure and the projection's description; None: nothing to draw."""
    import numpy as np

    ras: list[float] = []
    decs: list[float] = []
    for _, vertices in plan.footprints:
        ras.extend(vertices[0::2])
        decs.extend(vertices[1::2])
    for positions in plan.sky.values():
        ras.extend(positions.ra)
        decs.extend(positions.dec)
    shown = sum(len(positions.ra) for positions in plan.sky.values())
    centre = sky_centre(np.asarray(ras, float), np.asarray(decs, float))
    if centre is None:
        return None
    ra0, dec0, radius = centre
    fig = _figure(7.5, 6.4)
    if radius <= GNOMONIC_MAX_RADIUS:
        ax = fig.add_subplot()
        description = f"gnomonic (tangent-plane) projection centred on RA {ra0:.2f}°, Dec {dec0:+.2f}°"
        _graticule(ax, ra0, dec0, radius)
        for name, vertices in plan.footprints:
            x, y = gnomonic(
                np.append(vertices[0::2], vertices[0]), np.append(vertices[1::2], vertices[1]), ra0, dec0
            )
            ax.plot(x, y, color="#1f4e9c", lw=1.6, zorder=3)
            ax.text(
                np.nanmean(x[:-1]), np.nanmax(y), name, color="#1f4e9c", fontsize=8, ha="center", va="bottom"
            )
        for status in ("pending", "verified", "failed"):
            sample = plan.sky.get(status)
            if sample is None or not sample.ra:
                continue
            x, y = gnomonic(np.asarray(sample.ra), np.asarray(sample.dec), ra0, dec0)
            ax.scatter(
                x,
                y,
                s=_marker_size(shown, status),
                c=COLOURS[status],
                label=_legend(status, sample),
                zorder=4 if status == "failed" else 2,
                linewidths=0,
            )
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlabel("ξ, degrees (RA increases to the left)")
        ax.set_ylabel("η, degrees (north up)")
    else:
        ax = fig.add_subplot(projection="mollweide")
        description = "Mollweide whole-sky projection, RA 180° in the middle, increasing to the left"
        for _, vertices in plan.footprints:
            ra, dec = great_circle_path(vertices)
            x, y = mollweide_x(ra), np.radians(dec)
            breaks = np.where(np.abs(np.diff(x)) > math.pi)[0] + 1
            for part_x, part_y in zip(np.split(x, breaks), np.split(y, breaks), strict=True):
                ax.plot(part_x, part_y, color="#1f4e9c", lw=1.2, zorder=3)
        for status in ("pending", "verified", "failed"):
            sample = plan.sky.get(status)
            if sample is None or not sample.ra:
                continue
            ax.scatter(
                mollweide_x(sample.ra),
                np.radians(sample.dec),
                s=_marker_size(shown, status),
                c=COLOURS[status],
                label=_legend(status, sample),
                zorder=4 if status == "failed" else 2,
                linewidths=0,
            )
        ticks = np.radians(np.arange(-150, 181, 30))
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{(180 - round(math.degrees(t))) % 360:.0f}°" for t in ticks], fontsize=7)
        ax.grid(True, color="#cccccc", lw=0.5)
        ax.set_xlabel("RA (increases to the left), Dec")
    ax.set_title("Footprint and planned targets by status", fontsize=11)
    if any(s.ra for s in plan.sky.values()):
        ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    return fig, description


def _marker_size(count: int, status: str) -> float:
    """One size for every status (from the number of points drawn); failures a little larger."""
    size = max(3.0, min(20.0, 12_000.0 / max(count, 1)))
    return float(size * 2.0 if status == "failed" else size)


def _legend(status: str, sample: SkySample) -> str:
    shown = len(sample.ra)
    return (
        f"{status} ({sample.seen:,})"
        if shown == sample.seen
        else f"{status} ({shown:,} of {sample.seen:,} shown)"
    )


def _graticule(ax: Any, ra0: float, dec0: float, radius: float) -> None:
    """Lines of constant RA and Dec through the plotted area, labelled, in light grey."""
    import numpy as np

    span = max(radius * 1.3, 0.5)
    near_pole = abs(dec0) + span >= 89.0
    ra_span = 180.0 if near_pole else min(180.0, span / max(math.cos(math.radians(dec0)), 0.05))
    dec_lo, dec_hi = max(-89.9, dec0 - span), min(89.9, dec0 + span)
    dec_step = _nice_step(dec_hi - dec_lo)
    ra_step = _nice_step(2 * ra_span)
    ra_values = np.arange(math.floor((ra0 - ra_span) / ra_step) * ra_step, ra0 + ra_span + ra_step, ra_step)
    dec_values = np.arange(math.ceil(dec_lo / dec_step) * dec_step, dec_hi + 1e-9, dec_step)
    dense_dec = np.linspace(dec_lo, dec_hi, 120)
    dense_ra = np.linspace(ra0 - ra_span, ra0 + ra_span, 240)
    style = {"color": "#bbbbbb", "lw": 0.6, "zorder": 1}
    for ra in ra_values:
        x, y = gnomonic(np.full_like(dense_dec, ra), dense_dec, ra0, dec0)
        ax.plot(x, y, **style)
        inside = np.isfinite(x) & (np.hypot(x, y) <= span)
        if inside.any():
            # The line's point farthest out: near a pole every RA line starts at the centre.
            k = int(np.nanargmax(np.where(inside, np.hypot(x, y), -1.0)))
            ax.text(x[k], y[k], f"{ra % 360:g}°", fontsize=7, color="#888888", ha="center", va="top")
    for dec in dec_values:
        x, y = gnomonic(dense_ra, np.full_like(dense_ra, dec), ra0, dec0)
        ax.plot(x, y, **style)
        inside = np.isfinite(x) & (np.hypot(x, y) <= span)
        if inside.any():
            k = np.flatnonzero(inside)[-1]
            ax.text(x[k], y[k], f"{dec:+g}°", fontsize=7, color="#888888", ha="left", va="center")
    ax.set_xlim(span, -span)  # east (RA increasing) to the left, as on the sky seen from inside
    ax.set_ylim(-span, span)


@dataclass
class Timeline:
    """The manifest's records binned in time (UTC)."""

    start: float
    width: float
    rate: np.ndarray  # bytes per second in each bin (verified records)
    files: np.ndarray
    retries: np.ndarray  # tries beyond the first, summed over the records finishing in the bin
    failures: np.ndarray
    sessions: int = 1  # runs told apart by a pause of SESSION_GAP or more; the bins show the last
    earlier_files: int = 0  # verified records of the earlier sessions
    earlier_bytes: int = 0

    @property
    def mean_rate(self) -> float:
        seconds = len(self.rate) * self.width
        return float(self.rate.sum() * self.width / seconds) if seconds else 0.0


def _bin_width(span: float) -> float:
    for width in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400):
        if span / width <= MAX_TIME_BINS:
            return float(width)
    return float(math.ceil(span / MAX_TIME_BINS / 86400) * 86400)


def timeline(facts: ManifestFacts) -> Timeline | None:
    """Bin the records with a known time; None when none has one."""
    import numpy as np

    times, record_status = facts.times, facts.record_status
    record_bytes, record_attempts = facts.record_bytes, facts.record_attempts
    if times is None or record_status is None or record_bytes is None or record_attempts is None:
        return None  # no manifest was read
    known = times > 0
    if not known.any():
        return None
    t = times[known]
    status = record_status[known]
    nbytes = record_bytes[known]
    attempts = record_attempts[known]
    ordered = np.sort(t)
    pauses = np.flatnonzero(np.diff(ordered) >= SESSION_GAP)
    sessions, earlier_files, earlier_bytes = len(pauses) + 1, 0, 0
    if len(pauses):
        last_start = ordered[pauses[-1] + 1]
        earlier = (t < last_start) & (status == VERIFIED)
        earlier_files, earlier_bytes = int(earlier.sum()), int(nbytes[earlier].sum())
        keep = t >= last_start
        t, status, nbytes, attempts = t[keep], status[keep], nbytes[keep], attempts[keep]
    start = math.floor(float(t.min()))
    width = _bin_width(max(float(t.max()) - start, 1.0))
    bins = math.floor((float(t.max()) - start) / width) + 1
    index = np.minimum(((t - start) // width).astype(np.int64), bins - 1)
    verified = status == VERIFIED
    rate = np.bincount(index[verified], weights=nbytes[verified], minlength=bins) / width
    files = np.bincount(index[verified], minlength=bins)
    retries = np.bincount(index, weights=np.maximum(attempts - 1, 0), minlength=bins)
    failures = np.bincount(index[status == FAILED], minlength=bins)
    return Timeline(
        float(start), width, rate, files, retries, failures, sessions, earlier_files, earlier_bytes
    )


def draw_throughput(line: Timeline, events: LogEvents | None) -> bytes:
    """Throughput (MB/s) above, retries/failures/overload answers per bin below; slow-downs as lines."""
    import numpy as np
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    utc = _dt.timezone.utc
    edges = [_dt.datetime.fromtimestamp(line.start + i * line.width, utc) for i in range(len(line.rate) + 1)]
    fig = _figure(9.0, 5.2)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    top.stairs(line.rate / 1e6, edges, fill=True, color="#4c78a8", alpha=0.85, label="verified bytes")
    top.set_ylabel("MB/s")
    top.set_title(f"Throughput ({_human_width(line.width)} bins, UTC)", fontsize=11)
    centres = [e + (edges[1] - edges[0]) / 2 for e in edges[:-1]]
    bottom.bar(
        centres,
        line.retries,
        width=(edges[1] - edges[0]) * 0.9,
        color="#f28e2b",
        label="retries (extra tries)",
    )
    failed = np.flatnonzero(line.failures)
    if len(failed):
        bottom.scatter(
            [centres[i] for i in failed],
            line.failures[failed],
            marker="x",
            color=COLOURS["failed"],
            zorder=3,
            label="failures",
        )
    if events is not None and events.overload:
        counts = _count_in_bins(events.overload, line)
        hit = np.flatnonzero(counts)
        bottom.scatter(
            [centres[i] for i in hit],
            counts[hit],
            marker="v",
            color="#7b3294",
            zorder=3,
            label="429/503 answers (log)",
        )
    if events is not None and events.slowdowns:
        end = line.start + len(line.rate) * line.width
        shown = [w for w in sorted(events.slowdowns) if line.start <= w <= end][:200]
        for k, when in enumerate(shown):
            stamp = _dt.datetime.fromtimestamp(when, utc)
            for ax in (top, bottom):
                ax.axvline(
                    stamp,
                    color="#7b3294",
                    lw=0.8,
                    ls="--",
                    alpha=0.7,
                    label="slow-down (log)" if k == 0 and ax is top else None,
                )
    bottom.set_ylabel("per bin")
    for ax in (top, bottom):
        ax.grid(True, color="#e5e5e5", lw=0.6)
    locator = AutoDateLocator()
    bottom.xaxis.set_major_locator(locator)
    bottom.xaxis.set_major_formatter(ConciseDateFormatter(locator, tz=utc))
    top.legend(loc="upper right", fontsize=8)
    handles, _ = bottom.get_legend_handles_labels()
    if handles:
        bottom.legend(loc="upper right", fontsize=8)
    return _png(fig)


def _count_in_bins(times: list[float], line: Timeline) -> np.ndarray:
    import numpy as np

    t = np.asarray(times, float)
    index = ((t - line.start) // line.width).astype(np.int64)
    keep = (index >= 0) & (index < len(line.rate))
    return np.bincount(index[keep], minlength=len(line.rate))


def _human_width(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:g} s"
    if seconds < 3600:
        return f"{seconds / 60:g} min"
    if seconds < 86400:
        return f"{seconds / 3600:g} h"
    return f"{seconds / 86400:g} d"


# -- the page -----------------------------------------------------------------------------------------
@dataclass
class Report:
    """Everything the page shows, gathered; `build_report` makes one."""

    out_dir: Path
    state_dir: Path
    manifest: ManifestFacts
    plan: PlanFacts
    events: LogEvents | None = None
    sky_png: bytes | None = None
    sky_description: str = ""
    throughput_png: bytes | None = None
    timeline: Timeline | None = None
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """planned, verified, failed, pending (and manifest entries the plan does not name)."""
        m = self.manifest
        status: np.ndarray | list[int] = m.status if m.status is not None else []
        if self.plan.present:
            counts = {
                "planned": self.plan.planned,
                "verified": self.plan.counts.get("verified", 0),
                "failed": self.plan.counts.get("failed", 0),
                "pending": self.plan.counts.get("pending", 0),
            }
            counts["not in plan"] = max(len(status) - self.plan.matched_keys, 0)
            return counts
        codes = Counter(int(c) for c in status)
        return {
            "planned": len(status),
            "verified": codes.get(VERIFIED, 0),
            "failed": codes.get(FAILED, 0),
            "pending": len(status) - codes.get(VERIFIED, 0) - codes.get(FAILED, 0),
        }

    def verified_bytes(self) -> int:
        m = self.manifest
        if m.status is None or m.nbytes is None:
            return 0
        return int(m.nbytes[m.status == VERIFIED].sum())


def build_report(
    out_dir: Path, state_dir: Path, *, log_file: Path | None = None, pictures: bool = True
) -> Report:
    """Read the manifest, the plan and (optionally) a log file, and draw the pictures.

    Parameters
    ----------
    out_dir
        The mirror's output directory (named on the page).
    state_dir
        Where `manifest.jsonl` and `plan.ecsv` are.
    log_file
        A run's log (``--run-log``) for 429/503 answers and slow-downs; None: the manifest only.
    pictures
        Draw the PNGs (needs matplotlib); False, or matplotlib missing, gives a page without them.

    Returns
    -------
    Report
        The gathered facts and the PNG bytes; `render_html` turns it into the page.
    """
    from engine.manifest import MANIFEST_NAME, Manifest

    if not Manifest(state_dir).exists():  # the main file, or only shards' files (manifest.d/)
        raise ConfigError(
            "output.out_dir",
            f"no tessmirror manifest at {state_dir / MANIFEST_NAME}",
            hint="give the --out of an earlier `tessmirror run` (or its --state-dir)",
        )
    manifest = read_manifest(state_dir)
    from engine.plan.table import PLAN_FILE

    plan = read_plan(state_dir / PLAN_FILE, manifest)
    report = Report(out_dir, state_dir, manifest, plan)
    if log_file is not None:
        report.events = read_log(log_file)
    report.timeline = timeline(manifest)
    _explain(report)
    if pictures:
        try:
            import matplotlib  # noqa: F401 - only to learn whether it is there
        except ImportError:
            report.notes.append(f"No pictures: matplotlib is not installed; {PLOT_HINT}.")
            log.warning("matplotlib is not installed: the report has no pictures; %s", PLOT_HINT)
            return report
        drawn = draw_sky(plan) if (plan.footprints or plan.positioned) else None
        if drawn is not None:
            report.sky_png, report.sky_description = drawn
        if report.timeline is not None:
            report.throughput_png = draw_throughput(report.timeline, report.events)
    return report


def _explain(report: Report) -> None:
    """Notes on what the data could not show, each saying which input would fix it."""
    plan, notes = report.plan, report.notes
    if not plan.present:
        notes.append(
            "No saved plan (plan.ecsv) in the state directory (a `fetch --input` run keeps none): the "
            "counts come from the manifest alone, and there is nothing to place on the sky."
        )
    else:
        if not plan.has_positions:
            notes.append(
                "The plan has no target positions (columns s_ra and s_dec), so the targets cannot be "
                f"placed on the sky. Plan columns: {', '.join(plan.columns)}."
            )
        elif plan.positioned < plan.planned:
            notes.append(f"{plan.planned - plan.positioned:,} planned files have no usable position.")
        if not plan.footprints:
            notes.append(
                "The plan's metadata has no footprint polygons ('footprints'), so no footprint is drawn. "
                f"Metadata keys: {', '.join(plan.meta_keys) or 'none'}."
            )
        notes.extend(f"Footprint skipped: {problem}" for problem in plan.footprint_problems)
        if plan.unknown_size:
            notes.append(
                f"{plan.unknown_size:,} planned files declare no size; the planned bytes leave them out."
            )
    if report.manifest.skipped_lines:
        notes.append(f"{report.manifest.skipped_lines:,} torn or garbled manifest lines were ignored.")
    if report.timeline is None:
        notes.append("No manifest record has a time yet: there is no throughput to show.")
    if report.events is None:
        notes.append(
            "Slow-downs (the limit cut on 429/503 answers) are not in the manifest; give the run's log "
            "with --run-log to mark them."
        )
    elif not report.events.lines:
        notes.append("The log file holds no tessmirror log lines.")


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
.meta{color:#666;margin-top:0}.cards{display:flex;flex-wrap:wrap;gap:.8em;margin:1em 0}
.card{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;min-width:8em;background:#fafafa}
.card .n{font-size:1.5em;font-weight:600}.card .l{color:#666;font-size:.85em}
.verified .n{color:#2a9d4b}.failed .n{color:#d62728}.pending .n{color:#777}
img{max-width:100%;height:auto;border:1px solid #eee}
table.list{border-collapse:collapse;width:100%;font-size:.9em}
table.list th,table.list td{border-bottom:1px solid #eee;padding:.3em .5em;text-align:left;vertical-align:top}
table.list td.num,table.list th.num{text-align:right;white-space:nowrap}
td.name{font-family:ui-monospace,Menlo,Consolas,monospace;word-break:break-all}
.note{background:#fff8e1;border-left:4px solid #f0c040;padding:.4em .8em;margin:.4em 0}
.caption{color:#555;font-size:.9em}
"""


# Control characters and the invisible bidi/format characters that make a name read as another one
# (U+202E turns `gpj.exe` into `exe.jpg`): shown as \u escapes (four hex digits), never passed to the browser.
_INVISIBLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def _e(value: object) -> str:
    """HTML-escape anything from the archive or the file system (quotes too: it may land in an attribute)."""
    text = _INVISIBLE.sub(lambda m: f"\\u{ord(m.group()):04x}", str(value))
    return html.escape(text, quote=True)


def _utc(epoch: float) -> str:
    if not epoch or not math.isfinite(epoch):
        return ""
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def human_bytes(n: float) -> str:
    """Decimal units, as the rest of tessmirror prints them."""
    from engine.progress import human_bytes as _human

    return _human(n)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_html(report: Report, *, generated: float | None = None) -> str:
    """The page: one HTML document with inline CSS and data: images, no script, no external resource."""
    import numpy as np

    from engine import __version__

    counts = report.counts()
    planned_bytes = report.plan.planned_bytes if report.plan.present else None
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # No script may run and nothing may be fetched, whatever a hostile name managed to smuggle in.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>tessmirror report: {_e(report.out_dir)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>tessmirror report</h1>",
        f'<p class="meta">mirror <code>{_e(report.out_dir)}</code>'
        f" · state <code>{_e(report.state_dir)}</code>"
        f" · generated {_e(_utc(generated if generated is not None else time.time()))} UTC"
        f" · tessmirror {_e(__version__)}</p>",
        '<section id="counts"><h2>Counts</h2><div class="cards">',
    ]
    for name, value in counts.items():
        css = name if name in COLOURS else "other"
        slug = name.replace(" ", "-")
        parts.append(
            f'<div class="card {css}"><div class="n" id="count-{slug}">{value:,}</div>'
            f'<div class="l">{_e(name)}</div></div>'
        )
    parts.append(
        '<div class="card"><div class="n" id="bytes-verified">'
        f"{_e(human_bytes(report.verified_bytes()))}</div>"
        '<div class="l">verified bytes</div></div>'
    )
    if planned_bytes is not None:
        parts.append(
            f'<div class="card"><div class="n" id="bytes-planned">{_e(human_bytes(planned_bytes))}</div>'
            '<div class="l">planned bytes</div></div>'
        )
    parts.append(
        f'</div><p class="caption">{report.manifest.records:,} manifest records; the last record of a '
        "URL is its status. Pending: planned and not yet verified or failed.</p></section>"
    )
    parts.append('<section id="sky"><h2>Sky</h2>')
    if report.sky_png is not None:
        parts.append(
            '<img id="sky-plot" alt="sky plot of the footprint and the planned targets" '
            f'src="{_data_uri(report.sky_png)}"><p class="caption">{_e(report.sky_description)}. '
            "Green: verified, red: failed, grey: pending.</p>"
        )
    else:
        parts.append('<p class="note">No sky plot: see the notes below.</p>')
    parts.append("</section>")
    parts.append('<section id="throughput"><h2>Throughput</h2>')
    if report.throughput_png is not None:
        line = report.timeline
        assert line is not None
        parts.append(
            f'<img id="throughput-plot" alt="throughput over time" src="{_data_uri(report.throughput_png)}">'
            '<p class="caption">Bytes of the files verified in each '
            f"{_e(_human_width(line.width))} bin, from "
            f"{_e(_utc(line.start))} UTC; mean {_e(human_bytes(line.mean_rate))}/s over the span. Below: "
            "extra tries of the files finishing in each bin, failures"
            + (", and 429/503 answers and slow-downs from the log." if report.events is not None else ".")
            + "</p>"
        )
    else:
        parts.append('<p class="note">No throughput plot: see the notes below.</p>')
    if report.timeline is not None and report.timeline.sessions > 1:
        line = report.timeline
        parts.append(
            f'<p id="sessions">The manifest holds {line.sessions} runs (pauses of '
            f"{_e(_human_width(SESSION_GAP))} or more without a record); the plot shows the last. "
            f"The earlier runs verified {line.earlier_files:,} files, "
            f"{_e(human_bytes(line.earlier_bytes))}.</p>"
        )
    if report.timeline is not None:
        attempts = report.manifest.record_attempts
        retries = int(np.maximum(attempts - 1, 0).sum()) if attempts is not None else 0
        parts.append(f'<p>Extra tries recorded in the manifest: <span id="retries">{retries:,}</span>.')
        if report.events is not None:
            parts.append(
                f" From the log: {len(report.events.retries):,} retries, {len(report.events.overload):,} "
                f"429/503 answers, {len(report.events.slowdowns):,} slow-downs."
            )
        parts.append("</p>")
    parts.append("</section>")
    parts.extend(_failures_html(report.manifest))
    if report.notes:
        parts.append('<section id="notes"><h2>Notes</h2>')
        parts.extend(f'<p class="note">{_e(note)}</p>' for note in report.notes)
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _failures_html(m: ManifestFacts) -> list[str]:
    parts = [f'<section id="failures"><h2>Failures (<span id="failed-total">{m.failed_total:,}</span>)</h2>']
    if not m.failed_total:
        parts.append("<p>No file has failed.</p></section>")
        return parts
    parts.append(
        '<table class="list" id="reasons"><thead><tr><th>reason</th>'
        '<th class="num">files</th></tr></thead><tbody>'
    )
    for reason, count in m.reasons.most_common():
        parts.append(f'<tr><td>{_e(reason)}</td><td class="num">{count:,}</td></tr>')
    parts.append("</tbody></table>")
    shown = len(m.failures)
    if shown < m.failed_total:
        parts.append(f"<p>The first {shown:,} of {m.failed_total:,} failed files:</p>")
    parts.append(
        '<table class="list" id="failed-files"><thead><tr><th>file</th><th>error</th>'
        '<th class="num">tries</th><th class="num">when (UTC)</th></tr></thead><tbody>'
    )
    for f in m.failures:
        parts.append(
            f'<tr><td class="name">{_e(f.name)}</td><td>{_e(f.error)}</td>'
            f'<td class="num">{f.attempts}</td><td class="num">{_e(_utc(f.time))}</td></tr>'
        )
    parts.append("</tbody></table></section>")
    return parts


# -- writing ------------------------------------------------------------------------------------------
def _write_atomic(path: Path, data: bytes) -> None:
    """Write under a fresh temporary name (O_EXCL: never through a planted symlink), then rename."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise local_error_from_oserror(err, path.parent, "write in") from err
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 would hide the page from others
            handle.write(data)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise local_error_from_oserror(err, path, "write") from err


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_report(report: Report, report_dir: Path) -> Path:
    """Write report.html (with the pictures inside) and the PNGs next to it; returns the HTML's path."""
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise local_error_from_oserror(err, report_dir, "create") from err
    for name, png in ((SKY_PNG, report.sky_png), (THROUGHPUT_PNG, report.throughput_png)):
        if png is not None:
            _write_atomic(report_dir / name, png)
    target = report_dir / HTML_NAME
    _write_atomic(target, render_html(report).encode("utf-8"))
    return target


# -- the command --------------------------------------------------------------------------------------
def add_report_command(subparsers: Any, *, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add `report` to the CLI's subparsers (`parents`: the shared --config/--log-level parser)."""
    p = subparsers.add_parser(
        "report",
        parents=list(parents),
        help="write an HTML report (sky plot, throughput, failures) of a mirror",
        description="Write a self-contained HTML page about a mirror, from its manifest and saved plan: "
        "counts, a sky plot of the footprint and targets by status, throughput over time, failures.",
    )
    _add_report_arguments(p)
    p.set_defaults(handler=cmd_report)


def _add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", dest="output.out_dir", type=Path, metavar="DIR", help="the mirror's output directory"
    )
    p.add_argument(
        "--state-dir",
        dest="output.state_dir",
        type=Path,
        metavar="DIR",
        help="its manifest and plan, if not DIR/.tessmirror",
    )
    p.add_argument(
        "--report-dir",
        type=Path,
        metavar="DIR",
        help=f"where to write {HTML_NAME} and the PNGs (default: STATE_DIR/{REPORT_DIR})",
    )
    p.add_argument(
        # Not --log-file: that names the log this command itself writes, in every subcommand.
        "--run-log",
        dest="report_run_log",
        type=Path,
        metavar="FILE",
        help="a run's log, to mark 429/503 answers and slow-downs on the throughput plot",
    )
    p.add_argument(
        "--no-pictures", action="store_true", help="tables only; do not draw (no matplotlib needed)"
    )


def cmd_report(ns: argparse.Namespace) -> int:
    """`tessmirror report`: build the page, write it, print its path on standard output."""
    from engine.config import load_settings
    from engine.exceptions import EXIT_OK

    overrides = {k: v for k, v in vars(ns).items() if "." in k and v is not None}
    if overrides.get("output.out_dir") is None and getattr(ns, "config", None) is None:
        raise ConfigError(
            "output.out_dir", "no mirror given", hint="give --out DIR, the output directory of a run"
        )
    settings = load_settings(getattr(ns, "config", None), overrides, require_selection=False)
    state_dir = settings.state_dir
    report_dir = ns.report_dir if ns.report_dir is not None else state_dir / REPORT_DIR
    report = build_report(
        settings.output.out_dir, state_dir, log_file=ns.report_run_log, pictures=not ns.no_pictures
    )
    target = write_report(report, Path(report_dir))
    log.info("report written: %s", target)
    print(target, flush=True)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser for `python -m engine.report` (the same flags as `tessmirror report`)."""
    p = argparse.ArgumentParser(prog="tessmirror report", description="Write an HTML report of a mirror.")
    p.add_argument("--config", type=Path, help="TOML configuration file (see config.example.toml)")
    _add_report_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m engine.report ...`: the report without the rest of the CLI; exit codes as tessmirror's."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return cmd_report(build_parser().parse_args(argv))
    except TessMirrorError as err:
        print(f"tessmirror: error: {redact(err.message)}", file=sys.stderr)
        if err.hint:
            print(f"tessmirror: hint: {redact(err.hint)}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
