"""Plan invariants, checked on every page of a plan as it arrives, whatever the archive sent.

1. **One row per destination file.** Rows whose destination (`engine.layout.relpath_for`) was planned
   before, with a compatible declared size and md5, are *merged*: one download, the other URLs kept as
   fallbacks (`GuardedPage.fallbacks`). Rows that would put different bytes at one path (exact sizes
   or md5s that differ, or estimates that cannot describe the same file) are *failed*, with a reason
   naming both URLs; so two workers never write one path.
2. **Every URL names the file of its row.** The `uri=` value's last part, or else the URL path's last
   part, must equal `filename`; a URL for another file is never paired with this file's size or md5.
3. **Nothing vanishes silently.** A row with no URL, an unusable URL (a scheme other than http(s),
   such as `file:`, `data:`, `ftp:`; no host) or a URL that names another file is *dropped*, counted
   by reason; a name the layout refuses (`UnsafePathError`) is *failed*, with the layout's reason.

Memory stays bounded whatever the plan's size: per destination the guard keeps an 8-byte digest of
the path and one packed integer (declared size, estimate, 64 bits of the md5), about 100 bytes. The
full URL is kept only for the most recent `recent_urls` destinations, to name it in a conflict; an
older one is named by its destination. Digest collisions are negligible (1 in 10^6 at 10^7 paths).
"""

from __future__ import annotations

import hashlib
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from engine.exceptions import UnsafePathError
from engine.layout import STATE_DIR_NAME, check_layout, is_plain_name, is_plain_obs_id, relpath_for
from engine.models import PlanItem
from engine.plan.table import filename_from_url
from engine.redact import redact

# Reasons a row is dropped (the keys of `PlanGuard.dropped`).
NO_URL = "no URL"
BAD_SCHEME = "unusable URL scheme"
BAD_URL = "malformed URL"
MISMATCH = "URL names another file"
DROP_REASONS = (NO_URL, BAD_SCHEME, BAD_URL, MISMATCH)

RECENT_URLS = 100_000  # full URLs remembered for conflict messages (about 15 MB at most)
_FIELD = (1 << 40) - 1  # sizes and estimates are packed in 40 bits each (up to 1 TB; more is unknown)
_MIB = 1024 * 1024


# White space (re's \s is str.isspace, Unicode included) and control characters.
_BAD_URL_CHAR = re.compile(r"[\s\x00-\x1f\x7f]")
# The plain URLs archives send (MAST's `.../file?uri=mast:TESS/product/NAME`, a bucket's path): an
# http(s) scheme, a host name, a path and at most a `uri=` query, with no character that urlsplit,
# unquote or parse_qs would treat specially (no %, +, &, #, @, [ ], white space or controls). For
# these the slow path's urlsplit/parse_qs answer is known; a million-file plan spent half its
# resume in them. Anything else takes the slow path.
_PLAIN_URL = re.compile(
    r"[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?"
    r"(?P<path>/[A-Za-z0-9._~!$'()*,;=:/-]*)(?:\?uri=(?P<uri>[A-Za-z0-9._~!$'()*,:/-]+))?"
)

# What a plain URL holds before its last part when that part is the file name: `_PLAIN_URL` up to a
# path ending in '/' or ':', or up to `?uri=` and a value that is empty or ends in '/' or ':'. For
# such a prefix P and a name N that `is_plain_name` takes (no '/', ':' or anything else special),
# `_PLAIN_URL` takes P + N whole and names N, so `url_problem` answers None: a plan's rows share one
# prefix, and comparing it costs a fraction of the regex on every URL (the unit tests compare).
_PLAIN_URL_PREFIX = re.compile(
    r"[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?"
    r"/(?:(?:[A-Za-z0-9._~!$'()*,;=:/-]*[/:])?|[A-Za-z0-9._~!$'()*,;=:/-]*\?uri=(?:[A-Za-z0-9._~!$'()*,:/-]*[/:])?)"
)


def url_problem(item: PlanItem) -> tuple[str, str] | None:
    """Why `item` cannot be downloaded as planned: (reason key, detail), or None when its URL is usable
    and names `item.filename`. Pure: used by the guard and by tests."""
    url = item.url.strip() if isinstance(item.url, str) else ""
    if not url:
        return NO_URL, "the row has no URL"
    plain = _PLAIN_URL.fullmatch(url)
    if plain is not None:
        source = plain["uri"] or plain["path"]
        named = source.rstrip("/").rpartition("/")[2].rpartition(":")[2]  # filename_from_url's rsplits
    else:
        problem = _slow_url_problem(url)
        if problem is not None:
            return problem
        named = filename_from_url(url)
    # Equal strings are equal in NFC: normalising is only for names that differ.
    if named != item.filename and _nfc(named) != _nfc(item.filename):
        return MISMATCH, f"the URL {redact(url)!r} names {named!r}, not {item.filename!r}"
    return None


def _slow_url_problem(url: str) -> tuple[str, str] | None:
    """`url_problem` for a URL `_PLAIN_URL` does not take: parsed by urlsplit."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as err:  # e.g. an invalid IPv6 literal or port
        return BAD_URL, f"cannot parse the URL {redact(url)!r}: {err}"
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        shown = f"{scheme}:" if scheme else "no scheme"
        return BAD_SCHEME, f"the URL {redact(url)!r} has {shown}; only http(s) is downloaded"
    if not host or _BAD_URL_CHAR.search(url):
        return BAD_URL, f"the URL {redact(url)!r} has no host or has white space or control characters"
    return None


@dataclass
class GuardedPage:
    """One page after the invariants: what to download, record as failed, and what was dropped."""

    items: list[tuple[PlanItem, str]] = field(default_factory=list)  # (item, relpath) to download
    failed: list[tuple[PlanItem, str]] = field(default_factory=list)  # (item, reason) to record
    dropped: list[tuple[PlanItem, str]] = field(default_factory=list)  # (item, reason), counted only
    merged: int = 0  # rows merged into a download planned before (on this page or an earlier one)
    # relpath -> other URLs that name the same file (on this page), in arrival order
    fallbacks: dict[str, list[str]] = field(default_factory=dict)

    @property
    def kept(self) -> list[PlanItem]:
        """The items to pass on: downloads first, then failures (so a conflict follows its original)."""
        return [item for item, _ in self.items] + [item for item, _ in self.failed]


class PlanGuard:
    """Checks pages of a plan against every destination planned so far (see the module docstring).

    Counters: `planned` (downloads admitted), `merged`, `conflicts`, `unsafe` (names the layout
    refused), `dropped` (a Counter by reason).
    """

    def __init__(self, layout: str, *, recent_urls: int = RECENT_URLS) -> None:
        check_layout(layout)  # an unknown layout fails now, by name
        self.layout = layout
        self.planned = 0
        self.merged = 0
        self.conflicts = 0
        self.unsafe = 0
        self.dropped: Counter[str] = Counter()
        self._declared: dict[int, int] = {}  # digest of relpath -> packed (md5, size, estimate)
        # The first URL of each of the newest `_recent_cap` destinations, for conflict messages: a ring
        # of digests (`_ring`, overwritten in a circle once full, `_ring_next` its oldest slot) beside
        # their URLs (`_ring_urls`). Only a merge or a conflict asks for a URL (`_recent_url`), so the
        # digest -> slot index is brought up to date then, not per row: a dict of URLs kept exact per
        # row (a deletion and an insertion each) was a fifth of a million-row resume's guard, and an
        # OrderedDict's popitem a quarter before it.
        self._recent_cap = max(0, recent_urls)
        self._ring: list[int] = []
        self._ring_urls: list[str] = []
        self._ring_next = 0  # the slot of `_ring` that holds the oldest key, once it is full
        self._added = 0  # destinations added to the ring, ever
        self._index: dict[int, int] = {}  # digest -> its slot, as of `_synced` additions (stale ones stay)
        self._synced = 0
        self._url_prefix = ""  # the last URL prefix `_PLAIN_URL_PREFIX` took (see `admit`)

    def admit(self, page: list[PlanItem]) -> GuardedPage:
        """Sort one page into downloads, failures, merges and drops, updating the counters."""
        out = GuardedPage()
        # Bound once a page: a million-row resume makes each of these a million times.
        declared, cap, digest = self._declared, self._recent_cap, _digest
        ring, ring_urls, ring_next, added = self._ring, self._ring_urls, self._ring_next, self._added
        downloads = out.items
        strategy, prefix, plain_prefix, plain_name, plain_obs_id = (
            check_layout(self.layout),
            self._url_prefix,
            _PLAIN_URL_PREFIX.fullmatch,
            is_plain_name,
            is_plain_obs_id,
        )
        try:
            for item in page:
                # The standard row, in one pass: a plain name and obs_id (which `relpath_for` takes as
                # they are) behind a plain URL prefix that names the file (so `url_problem` is None),
                # placed by the layout's strategy. Anything else, or anything the strategy or the
                # state-folder check would refuse, takes the general path, which decides as it always did.
                url, name, obs_id = item.url, item.filename, item.obs_id
                relpath = ""
                if (
                    type(url) is str
                    and type(name) is str
                    and type(obs_id) is str
                    and url.endswith(name)
                    and plain_name(name)
                    # A prefix of a plain name without a '.' is a plain obs_id (TESS's obs_ids are their
                    # files' names without the product suffix): two string calls instead of the regex.
                    and ((name.startswith(obs_id) and "." not in obs_id) or plain_obs_id(obs_id))
                ):
                    cut = len(url) - len(name)
                    # `prefix` is '' or one `_PLAIN_URL_PREFIX` took; '' is no prefix (no URL is a bare name).
                    plain = bool(prefix) and cut == len(prefix) and url.startswith(prefix)
                    if not plain and plain_prefix(url[:cut]):
                        plain, prefix = True, url[:cut]
                        self._url_prefix = prefix
                    if plain:
                        try:
                            relpath = strategy(item)
                        except UnsafePathError:
                            relpath = ""  # the general path refuses it, with its count and message
                        if relpath[:1] == "." and relpath.partition("/")[0].casefold() == STATE_DIR_NAME:
                            relpath = ""
                if not relpath:
                    relpath = self._general_relpath(out, item)
                    if not relpath:
                        continue
                key = digest(relpath)
                packed = _pack(item)
                before = declared.get(key)
                if before is None:
                    declared[key] = packed
                    if cap:  # the URL, for a conflict's message; only the newest `cap` are kept
                        if added < cap:
                            ring.append(key)
                            ring_urls.append(url)
                        else:  # the oldest makes way
                            ring[ring_next] = key
                            ring_urls[ring_next] = url
                            ring_next = ring_next + 1 if ring_next + 1 < cap else 0
                        added += 1
                    downloads.append((item, relpath))
                    continue
                disagreement = _disagreement(before, packed)
                self._ring_next, self._added = ring_next, added  # for `_recent_url`
                if disagreement:
                    self.conflicts += 1
                    first = self._recent_url(key)
                    earlier = f"{redact(first)!r}" if first else "a URL planned earlier"
                    out.failed.append(
                        (
                            item,
                            f"conflicting rows for {relpath}: {redact(item.url)!r} and {earlier} declare "
                            f"different files ({disagreement}); neither is trusted for the other",
                        )
                    )
                    continue
                self.merged += 1
                out.merged += 1
                declared[key] = _union(before, packed)
                if item.url != self._recent_url(key):
                    urls = out.fallbacks.setdefault(relpath, [])
                    if item.url not in urls:
                        urls.append(item.url)
        finally:
            # Kept in locals for the loop; stored even if a row raised (an error no check catches).
            self._ring_next, self._added = ring_next, added
            self.planned += len(downloads)
        return out

    def _recent_url(self, key: int) -> str | None:
        """The first URL of destination `key` if it is one of the newest `_recent_cap`, else None."""
        ring, cap, index = self._ring, self._recent_cap, self._index
        fresh = self._added - self._synced
        if fresh:
            # The ring's slots written since the index was last brought up to date: addition number j
            # went to slot j % cap (the ring fills 0..cap-1, then overwrites from 0).
            if fresh >= len(ring) or len(index) + fresh > 2 * cap:
                # Rebuilt from the ring: bounded memory (stale digests go), and no more work than the
                # additions since the last rebuild.
                index.clear()
                index.update((digest, slot) for slot, digest in enumerate(ring))
            else:
                for number in range(self._synced, self._added):
                    slot = number % cap
                    index[ring[slot]] = slot
            self._synced = self._added
        found = index.get(key)
        # A digest enters the ring once (`_declared` never forgets it), so the slot that the index
        # names holds it unless it was overwritten since: then it is no longer among the newest.
        return self._ring_urls[found] if found is not None and ring[found] == key else None

    def _general_relpath(self, out: GuardedPage, item: PlanItem) -> str:
        """`item`'s destination by the general checks (`url_problem`, `relpath_for`), or '' when the
        row was dropped or failed here (counted, and added to `out`)."""
        problem = url_problem(item)
        if problem is not None and problem[0] != MISMATCH:
            self._drop(out, item, *problem)
            return ""
        try:
            relpath = relpath_for(item, self.layout)
        except UnsafePathError as err:
            self.unsafe += 1
            out.failed.append((item, redact(str(err))))
            return ""
        if problem is not None:
            self._drop(out, item, *problem)
            return ""
        return relpath

    # -- reporting ------------------------------------------------------------------------------
    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def counts(self) -> dict[str, int]:
        """The counters as a flat dict (for the summary and the plan's metadata)."""
        counts = {
            "planned": self.planned,
            "merged": self.merged,
            "conflicts": self.conflicts,
            "unsafe": self.unsafe,
            "dropped": self.dropped_total,
        }
        counts.update({f"dropped: {reason}": n for reason, n in sorted(self.dropped.items())})
        return counts

    def summary_line(self) -> str:
        """One line for the run's summary, e.g. 'plan: 826 files, 826 rows merged, 2 dropped (no URL: 2)'."""
        parts = [f"plan: {self.planned} files"]
        if self.merged:
            parts.append(f"{self.merged} duplicate rows merged")
        if self.conflicts:
            parts.append(f"{self.conflicts} conflicting rows failed")
        if self.unsafe:
            parts.append(f"{self.unsafe} unsafe names failed")
        if self.dropped:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.dropped.items()))
            parts.append(f"{self.dropped_total} rows dropped ({reasons})")
        return ", ".join(parts)

    # -- internals ------------------------------------------------------------------------------
    def _drop(self, out: GuardedPage, item: PlanItem, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        out.dropped.append((item, f"{reason}: {detail}"))


def _blake2b_digest(relpath: str) -> int:
    """64 bits of BLAKE2b of `relpath`."""
    data = relpath.encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


# The guard's 8-byte digest of a destination. Python's own string hash is one where it is 64-bit
# SipHash (CPython on 64-bit platforms): as few collisions as 64 bits of BLAKE2b, keyed per process
# (so no plan can be built to collide, unless PYTHONHASHSEED is fixed), and a fifth of the cost,
# a tenth of a million-row resume's guard. Elsewhere, BLAKE2b.
_digest: Callable[[str], int] = (
    hash if sys.hash_info.width >= 64 and sys.hash_info.algorithm.startswith("siphash") else _blake2b_digest
)


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name) if isinstance(name, str) else ""


def _field(value: int) -> int:
    """A size or estimate as a 40-bit field: 0 for unknown (negative, or too large to be real)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        return 0
    return number + 1 if 0 <= number < _FIELD - 1 else 0


def _pack(item: PlanItem) -> int:
    md5 = item.md5
    # int(x, 16) reads either case; lower() matters only where it can change the length (non-ASCII).
    md5 = (md5 if md5.isascii() else md5.lower()) if isinstance(md5, str) else ""
    try:
        md5_bits = (1 << 64) | int(md5[:16], 16) if len(md5) == 32 else 0
    except ValueError:
        md5_bits = 0
    # A plan's own ints in range take the short way; anything else is `_field`'s.
    size, est_kb = item.size, item.est_kb
    size_bits = size + 1 if type(size) is int and 0 <= size < _FIELD - 1 else _field(size)
    est_bits = est_kb + 1 if type(est_kb) is int and 0 <= est_kb < _FIELD - 1 else _field(est_kb)
    return (md5_bits << 80) | (size_bits << 40) | est_bits


def _unpack(packed: int) -> tuple[int, int, int]:
    """(md5 bits or 0, size + 1 or 0, estimate in kB + 1 or 0)."""
    return packed >> 80, (packed >> 40) & _FIELD, packed & _FIELD


def _union(old: int, new: int) -> int:
    """What is known of one file from two agreeing rows: the first's values, gaps filled by the second."""
    (md5_a, size_a, est_a), (md5_b, size_b, est_b) = _unpack(old), _unpack(new)
    return ((md5_a or md5_b) << 80) | ((size_a or size_b) << 40) | (est_a or est_b)


def _estimates_disagree(low: int, high: int) -> bool:
    """Two byte counts, at least one an estimate, that cannot describe one file: the larger is past the
    estimate's ceiling, max(2 x smaller, smaller + 1 MiB)."""
    low, high = min(low, high), max(low, high)
    return high > max(2 * low, low + _MIB)


def _disagreement(old: int, new: int) -> str:
    """'' when two rows may describe the same file, else what differs."""
    (md5_a, size_a, est_a), (md5_b, size_b, est_b) = _unpack(old), _unpack(new)
    if md5_a and md5_b and md5_a != md5_b:
        return "md5 differs"
    if size_a and size_b:
        return f"size {size_a - 1} vs {size_b - 1} bytes" if size_a != size_b else ""
    bytes_a = size_a - 1 if size_a else (est_a - 1) * 1024 if est_a else -1
    bytes_b = size_b - 1 if size_b else (est_b - 1) * 1024 if est_b else -1
    if bytes_a >= 0 and bytes_b >= 0 and _estimates_disagree(bytes_a, bytes_b):
        return f"about {bytes_a} vs {bytes_b} bytes"
    return ""
