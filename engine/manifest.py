"""The manifest: what is done. (The run lock, who is running, lives in engine.lock.)

Why append-only JSON Lines, not SQLite
--------------------------------------
Mirrors live on NFS and Lustre. SQLite's WAL mode needs shared memory that those file systems do not
provide, and its rollback journal relies on POSIX (fcntl) locks that NFS/Lustre implement badly or not
at all. An append-only log written by ONE process (the `ManifestWriter` task; the `RunLock` keeps other
processes out) needs none of that: every batch is one `write()` of whole lines to a file opened with
O_APPEND, followed by one `fsync`.

Crash safety (kill -9 at any instant)
-------------------------------------
- Lines are only ever appended, never rewritten, so a crash can damage at most the batch being
  written: its lines are either whole or the last one is cut short.
- Each line is ``{"crc":"<crc32 hex>","rec":{...}}``; the CRC32 covers the exact bytes of the
  ``rec`` object, so a torn or garbled line is detected and skipped (with a warning naming the line
  number), never trusted. `ManifestWriter.start` ends a torn last line with a newline first, so the
  next record starts clean.
- A record is written only AFTER its file was verified and renamed to its final name (the Downloader
  returns VERIFIED only then), so a record never names a file that is not good. A crash between the
  rename and the record costs one re-download, nothing worse.
- The last record for a file wins: a re-download, a failure or `verify --repair`'s "pending" simply
  appends a newer record.

File identity
-------------
A record is keyed by the file, not by the URL it came from: ``key`` is ``<obs_id>/<file name>``
(an obs_id never holds a ``/``), or ``path:<relpath>`` (its place in the mirror) for a file listed
without an obs_id (a bare URL list, an aria2 file or a curl script). So a file whose URL changes (MAST's
``uri=`` form or its path form, another mirror, the public S3 copy) is the same file and is not fetched
again. Each record also keeps what the plan declared for the file (``size``, ``declared_md5``), so a
refreshed plan that declares other bytes for it is recognised as a changed file.

Shards: several manifest files, one writer each
-----------------------------------------------
A shard of a job array (``--shard K/N``, engine.shard) appends to its own file,
``<state_dir>/manifest.d/shard-K-of-N.jsonl``, so each file keeps exactly one writer. Every reader
reads them all: the main ``manifest.jsonl`` first, then ``manifest.d/*.jsonl`` in name order. For a
file key, each manifest file's own last record is that file's word (file order, as above); where
two files have a word, the one with the later ``time`` wins, and on equal times the file read later.
(``time`` is the wall clock at which the record's file was finished; two files only disagree when
two runs touched the same file, e.g. a shard and a later ``verify --repair``, and the later one is
the truth.) A run without ``--shard`` writes the main file, as ever.

Manifests written before keys existed (keyed by URL) are readable as they are: a record without a key
gets one from its obs_id and path. `Manifest.upgrade()` rewrites such a manifest with keys once,
atomically (a new file, fsync'ed, renamed over the old one), by the run that holds the RunLock and
before it downloads anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import logging
import math
import os
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import msgspec

from engine.exceptions import LocalError, ManifestError, local_error_from_oserror
from engine.lock import LOCK_NAME, RunLock  # re-exported: callers imported the lock from here
from engine.models import FileResult
from engine.redact import redact

_loads: Callable[[bytes], Any]
try:  # orjson parses a record ~4x faster; a million-file manifest then loads in a few seconds
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover - the stdlib parser is correct, only slower
    _loads = json.loads


# An integer orjson reads as one: int64 (orjson's uint64 range above it is left to orjson too, as
# msgspec bounds stop at int64). orjson reads a larger one as a float (10**30 + 1 as 1e30), and the
# fast decoder must not read it exactly where the general path would not.
_Count = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class _Record(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """Every field `encode_entry` writes, typed: the resume scan's fast decoder (msgspec builds no
    dict and no per-field hash lookups, about half orjson's time per record). A record with any other
    field or type is refused (`_FAST_ERRORS`) and read by `_loads` as before, so what the fast path
    accepts is exactly what `_loads` reads to the same values (ASCII lines only: `encode_entry`
    writes nothing else, and msgspec does not check the UTF-8 of the bytes it skips)."""

    url: str
    path: str = ""
    status: str = "pending"  # `_decode_entry`'s default
    obs_id: str = ""
    nbytes: _Count = 0
    md5: str = ""
    level: str = ""
    checksum_declared: bool = False
    error: str = ""
    attempts: _Count = 0
    time: float = 0.0
    key: str = ""
    size: _Count = -1
    declared_md5: str = ""
    origin: str = ""
    source: str = ""
    note: str = ""


_decode_record = msgspec.json.Decoder(_Record).decode
_FAST_ERRORS = (msgspec.DecodeError, msgspec.ValidationError)

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
SHARD_MANIFEST_DIR = "manifest.d"  # one manifest file per shard: manifest.d/shard-K-of-N.jsonl
KEY_PATH_PREFIX = "path:"  # the key of a file listed without an obs_id: its relpath in the mirror
STATUSES = ("verified", "failed", "pending", "quarantined")

# Line framing: the CRC is fixed-width hex so the payload's byte range is known without parsing.
_PREFIX_HEAD = b'{"crc":"'
_PREFIX_TAIL = b'","rec":'
_CRC_START = len(_PREFIX_HEAD)
_CRC_END = _CRC_START + 8
_PAYLOAD_START = _CRC_END + len(_PREFIX_TAIL)

# Status and level repeat on every line; sharing one string object each keeps a million entries small.
_INTERNED = {s: s for s in (*STATUSES, "size", "checksum", "fits", "")}


def file_key(obs_id: str, filename: str, relpath: str = "") -> str:
    """The identity of a file in the manifest: ``<obs_id>/<filename>``; without an obs_id,
    ``path:<relpath>``; "" when neither is known (such a record is then keyed by its URL)."""
    if obs_id and filename:
        return f"{obs_id}/{filename}"
    return f"{KEY_PATH_PREFIX}{relpath}" if relpath else ""


def _legacy_key(rec: dict, url: str) -> str:
    """The key of a record written before keys existed (keyed by URL): from its obs_id and the name of
    its path (or its URL's file name), else its path, else its URL."""
    from engine.plan.table import filename_from_url  # a light module; imported late to keep this one small

    obs_id = rec.get("obs_id", "") or ""
    path = rec.get("path", "") or ""
    name = path.rsplit("/", 1)[-1] if path else filename_from_url(url)
    return file_key(obs_id, name, path) or f"url:{url}"


def _result_key(result: FileResult) -> str:
    """The key of a result. A row refused before it had a destination (no path: the plan's guard
    failed it, e.g. a conflicting duplicate) is keyed by its URL, so its failure never shadows the
    record of the file that the row's valid twin downloaded."""
    item = result.item
    if result.path:
        key = file_key(item.obs_id, item.filename, result.path)
        if key:
            return key
    return f"url:{redact(item.url)}"


@dataclass(slots=True)
class ManifestEntry:
    """One record. For a file (its `key`), the last record in the manifest is the truth."""

    url: str
    path: str = ""  # relative to the output directory, POSIX separators
    status: str = "pending"  # one of STATUSES
    obs_id: str = ""
    nbytes: int = 0
    md5: str = ""
    level: str = ""  # "size" | "checksum" | "fits" | "" (not verified)
    checksum_declared: bool = False
    error: str = ""
    attempts: int = 0
    time: float = 0.0
    key: str = ""  # the file's identity (see `file_key`); filled from the other fields when ""
    size: int = -1  # the size the plan declared (-1: none); `nbytes` is what was verified
    declared_md5: str = ""  # the md5 the plan declared ("" : none)
    origin: str = ""  # "downloaded" | "adopted" (verified in place or copied from a seed tree) | ""
    source: str = ""  # which source served the bytes ("mast", "s3"), when the downloader says
    note: str = ""  # why not the chosen source (a fallback), when the downloader says

    def __post_init__(self) -> None:
        if not self.key:
            self.key = _legacy_key({"obs_id": self.obs_id, "path": self.path}, self.url)

    @classmethod
    def from_result(cls, result: FileResult) -> ManifestEntry:
        item = result.item
        return cls(
            # The resume key; redacted so a credential inside a URL never reaches the manifest.
            url=redact(item.url),
            path=result.path,
            status=str(result.status),
            obs_id=item.obs_id,
            nbytes=result.nbytes,
            # The computed md5, else the archive's declared one: either lets `verify` re-check later.
            md5=result.md5 or item.md5,
            level=str(result.level) if result.level is not None else "",
            checksum_declared=result.checksum_declared,
            error=redact(result.error) if result.error else "",
            attempts=result.attempts,
            time=result.finished_at,
            key=_result_key(result),
            size=item.size,
            declared_md5=item.md5,
            origin=result.origin,
            source=result.source,
            note=redact(result.note) if result.note else "",
        )


_ENTRY_FIELDS = tuple(f.name for f in fields(ManifestEntry))


def encode_entry(entry: ManifestEntry) -> bytes:
    """One manifest line (with its newline) for `entry`."""
    # A plain dict of the fields: dataclasses.asdict deep-copies every value, a fifth of a resume's
    # time for files adopted in place.
    record = {name: getattr(entry, name) for name in _ENTRY_FIELDS}
    if record["error"]:
        record["error"] = redact(record["error"])
    if not math.isfinite(record["time"]):
        record["time"] = 0.0  # NaN/inf are not JSON
    payload = json.dumps(record, separators=(",", ":")).encode("ascii")  # ensure_ascii: no newlines
    return b"%s%08x%s%s}\n" % (_PREFIX_HEAD, zlib.crc32(payload), _PREFIX_TAIL, payload)


def _payload_of(line: bytes) -> bytes | None:
    """The verified payload bytes of one line (newline stripped), or None when it is torn or garbled."""
    if not line.startswith(_PREFIX_HEAD) or line[_CRC_END:_PAYLOAD_START] != _PREFIX_TAIL:
        return None
    if not line.endswith(b"}"):
        return None
    payload = line[_PAYLOAD_START:-1]
    try:
        declared = int(line[_CRC_START:_CRC_END], 16)
    except ValueError:
        return None
    return payload if zlib.crc32(payload) == declared else None


def _decode_entry(payload: bytes) -> ManifestEntry | None:
    if payload.isascii():
        try:
            fast = _decode_record(payload)
        except _FAST_ERRORS:
            pass
        else:
            if not fast.url:
                return None
            if fast.key:  # typed already: the same values as the general path below
                return ManifestEntry(
                    fast.url,
                    fast.path,
                    _INTERNED.get(fast.status, fast.status),
                    fast.obs_id,
                    fast.nbytes,
                    fast.md5,
                    _INTERNED.get(fast.level, fast.level),
                    fast.checksum_declared,
                    fast.error,
                    fast.attempts,
                    fast.time,
                    fast.key,
                    fast.size,
                    fast.declared_md5,
                    fast.origin,
                    fast.source,
                    fast.note,
                )
    try:
        rec = _loads(payload)
        url = rec["url"]
        if not isinstance(url, str) or not url:
            return None
        status = rec.get("status", "pending")
        level = rec.get("level", "")
        key = rec.get("key") or _legacy_key(rec, url)
        if not isinstance(key, str):
            return None
        return ManifestEntry(
            url,
            rec.get("path", ""),
            _INTERNED.get(status, status),
            rec.get("obs_id", ""),
            int(rec.get("nbytes", 0)),
            rec.get("md5", ""),
            _INTERNED.get(level, level),
            bool(rec.get("checksum_declared", False)),
            rec.get("error", "") or "",
            int(rec.get("attempts", 0)),
            float(rec.get("time", 0.0)),
            key,
            int(rec.get("size", -1)),
            rec.get("declared_md5", "") or "",
            rec.get("origin", "") or "",
            rec.get("source", "") or "",
            rec.get("note", "") or "",
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


_MANIFEST_HINT = "check the file system; the manifest is append-only JSON Lines and can be inspected"


def _open_manifest(path: Path) -> BinaryIO | None:
    """`path` open for reading, or None when it does not exist (yet); ManifestError otherwise."""
    try:
        return open(path, "rb")  # the caller closes it
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ManifestError(
            f"cannot read the manifest {path}: {err.strerror or err}",
            path=path,
            hint=f"make {path} a readable file (e.g. chmod u+r), or point state_dir elsewhere",
        ) from err


@contextlib.contextmanager
def _read_errors(path: Path) -> Iterator[None]:
    """An OSError while reading `path` as ManifestError."""
    try:
        yield
    except OSError as err:
        raise ManifestError(
            f"cannot read the manifest {path}: {err.strerror or err}",
            path=path,
            hint="check the file system, then run again",
        ) from err


def _local_error(err: OSError, path: Path, verb: str) -> LocalError:
    """An OSError met when trying to `verb` `path`: ManifestError unless the errno says more."""
    return local_error_from_oserror(err, path, verb, default=ManifestError, hint=_MANIFEST_HINT)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic GC: a million new dicts/entries would trigger costly full collections, and
    manifest records hold no reference cycles."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class Manifest:
    """The manifest files of one output directory: `<state_dir>/manifest.jsonl` and, when shards
    wrote, `<state_dir>/manifest.d/*.jsonl`.

    Parameters
    ----------
    state_dir
        The state directory.
    shard
        ``"shard-K-of-N"``: this process writes `manifest.d/shard-K-of-N.jsonl` (`path`); None (the
        default) writes the main `manifest.jsonl`. Reading always reads every file.
    """

    def __init__(self, state_dir: Path, *, shard: str | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.main_path = self.state_dir / MANIFEST_NAME
        self.shard = shard
        # The file this process appends to.
        self.path = (
            self.main_path if shard is None else self.state_dir / SHARD_MANIFEST_DIR / f"{shard}.jsonl"
        )
        self.skipped_lines = 0  # torn or garbled lines met by the last read

    # -- reading ------------------------------------------------------------------------------
    def paths(self) -> list[Path]:
        """Every manifest file to read, in reading order: the main one, then the shards' by name."""
        try:
            shards = sorted(
                p
                for p in (self.state_dir / SHARD_MANIFEST_DIR).iterdir()
                if p.suffix == ".jsonl" and not p.name.startswith(".")
            )
        except FileNotFoundError:
            shards = []
        except OSError as err:
            raise _local_error(err, self.state_dir / SHARD_MANIFEST_DIR, "list") from err
        return [self.main_path, *shards]

    def exists(self) -> bool:
        """Whether any manifest file exists (a folder mirrored only by shards has no main file)."""
        return any(path.exists() for path in self.paths())

    def _lines(self, path: Path) -> Iterator[tuple[int, bytes]]:
        """(line number, line without newline) for every line; the file may not exist yet."""
        handle = _open_manifest(path)
        if handle is None:
            return
        try:
            with _read_errors(path):
                for number, line in enumerate(handle, start=1):
                    yield number, line.rstrip(b"\n")
        finally:
            handle.close()

    def _payloads(self, path: Path, *, reset: bool = True) -> Iterator[bytes]:
        if reset:
            self.skipped_lines = 0
        for number, line in self._lines(path):
            if not line:
                continue  # the newline `start()` writes after a torn line, or a hand edit
            payload = _payload_of(line)
            if payload is None:
                self.skipped_lines += 1
                log.warning("manifest %s line %d is torn or garbled; ignored", path, number)
                continue
            yield payload

    def _records(self, path: Path, *, reset: bool = True) -> Iterator[ManifestEntry]:
        for payload in self._payloads(path, reset=reset):
            entry = _decode_entry(payload)
            if entry is None:
                self.skipped_lines += 1
                log.warning("manifest %s holds a record without a URL or with bad fields; ignored", path)
                continue
            yield entry

    def iter_sourced(self) -> Iterator[tuple[int, ManifestEntry]]:
        """(file number in `paths()` order, record) for every whole record of every manifest file."""
        self.skipped_lines = 0
        for number, path in enumerate(self.paths()):
            for entry in self._records(path, reset=False):
                yield number, entry

    def iter_records(self) -> Iterator[ManifestEntry]:
        """Every whole record, file by file in `paths()` order (older ones included), streaming in
        bounded memory. With shards, the last record of a key in this stream is not necessarily its
        truth: use `load` or `verified` for that."""
        for _number, entry in self.iter_sourced():
            yield entry

    def load(self) -> dict[str, ManifestEntry]:
        """file key -> its last record (across files: the later time wins, see the module doc)."""
        entries: dict[str, ManifestEntry] = {}
        self.skipped_lines = 0
        with _no_gc():
            for number, path in enumerate(self.paths()):
                if number == 0:
                    for entry in self._records(path, reset=False):
                        entries[entry.key] = entry
                    continue
                mine: dict[str, ManifestEntry] = {}
                for entry in self._records(path, reset=False):
                    mine[entry.key] = entry
                for key, entry in mine.items():
                    current = entries.get(key)
                    if current is None or entry.time >= current.time:
                        entries[key] = entry
        return entries

    def verified(self) -> dict[str, int]:
        """file key -> `pack_record(nbytes, md5)` of the files whose last record is "verified".

        The resume fast path: no entries are built, and one int per file is what the run needs to
        tell an unchanged file from one the archive reprocessed (a new size or md5).
        """
        paths = self.paths()
        self.skipped_lines = 0
        if len(paths) == 1 or not any(path.exists() for path in paths[1:]):
            return self._verified_one(paths[0])
        # Several files: each file's last word per key, with its time; the later time wins.
        merged: dict[str, tuple[float, int]] = {}  # key -> (time, packed or -1 when not verified)
        with _no_gc():
            for path in paths:
                mine: dict[str, tuple[float, int]] = {}
                for payload in self._payloads(path, reset=False):
                    try:
                        rec = _loads(payload)
                        key = rec.get("key") or _legacy_key(rec, rec["url"])
                        packed = (
                            pack_record(int(rec.get("nbytes", 0)), rec.get("md5", "") or "")
                            if rec.get("status") == "verified"
                            else -1
                        )
                        mine[key] = (float(rec.get("time", 0.0)), packed)
                    except (ValueError, TypeError, KeyError, AttributeError):
                        self.skipped_lines += 1
                for key, word in mine.items():
                    current = merged.get(key)
                    if current is None or word[0] >= current[0]:
                        merged[key] = word
        return {key: packed for key, (_when, packed) in merged.items() if packed >= 0}

    def _verified_one(self, path: Path) -> dict[str, int]:
        """`verified()` of one file: `_payloads` and `pack_record` written out in one loop (a
        million-line manifest spent a third of its scan in the calls between them)."""
        found: dict[str, int] = {}
        loads, crc32, pop = _loads, zlib.crc32, found.pop
        head, tail, crc_start, crc_end, start = (
            _PREFIX_HEAD,
            _PREFIX_TAIL,
            _CRC_START,
            _CRC_END,
            _PAYLOAD_START,
        )
        handle = _open_manifest(path)
        if handle is None:
            return found
        fast, fast_errors = _decode_record, _FAST_ERRORS
        # `_lines`, inline too (a generator's frame per line was a fifth of the scan).
        with _no_gc(), _read_errors(path), handle:
            for number, line in enumerate(handle, start=1):
                line = line.rstrip(b"\n")
                if not line:
                    continue  # the newline `start()` writes after a torn line, or a hand edit
                payload = line[start:-1]
                try:  # `_payload_of`, inline
                    whole = (
                        line.startswith(head)
                        and line[crc_end:start] == tail
                        and line.endswith(b"}")
                        and crc32(payload) == int(line[crc_start:crc_end], 16)
                    )
                except ValueError:
                    whole = False
                if not whole:
                    self.skipped_lines += 1
                    log.warning("manifest %s line %d is torn or garbled; ignored", path, number)
                    continue
                record = None
                if payload.isascii():
                    try:
                        record = fast(payload)
                    except fast_errors:
                        record = None
                try:
                    if record is not None and record.key:
                        key, status, md5, nbytes = record.key, record.status, record.md5, record.nbytes
                    else:  # another shape (a record without a key, a hand edit): read as ever
                        rec = loads(payload)
                        url = rec["url"]
                        key = rec.get("key") or _legacy_key(rec, url)
                        status = rec.get("status")
                        md5 = rec.get("md5", "") or ""
                        nbytes = rec.get("nbytes", 0) if status == "verified" else 0
                    if status != "verified":
                        pop(key, None)
                        continue
                    nbytes = int(nbytes)
                    if nbytes < 0:
                        nbytes = 0
                    # `pack_record`, inline (its result for every input; a test compares the two).
                    try:
                        digest = int(md5, 16) if len(md5) == 32 else -1
                    except ValueError:
                        digest = -1
                    found[key] = ((nbytes << 128 | digest) << 1) | 1 if digest >= 0 else nbytes << 129
                except (ValueError, TypeError, KeyError, AttributeError):  # JSONDecodeError: a ValueError
                    self.skipped_lines += 1
        return found

    def verified_urls(self) -> set[str]:
        """The file keys whose last record is "verified" (kept for callers of the URL-keyed era)."""
        return set(self.verified())

    def needs_upgrade(self) -> bool:
        """True when the main manifest's first whole record has no key (written before keys existed;
        shard files never need it)."""
        for payload in self._payloads(self.main_path):
            try:
                return not _loads(payload).get("key")
            except (ValueError, TypeError, AttributeError):
                continue
        return False

    def upgrade(self) -> int:
        """Rewrite a URL-keyed manifest with file keys, atomically; returns the records written (0 when
        nothing needed doing). The caller must hold the RunLock: no other writer may be at work.

        Every whole record is kept, in order (torn lines are dropped, as every reader drops them). The
        new file is written beside the old one, fsync'ed, renamed over it, and the folder fsync'ed:
        a crash at any instant leaves either the old manifest or the new one, never a mix.
        """
        if not self.needs_upgrade():
            return 0
        main = self.main_path
        tmp = main.with_name(f".{main.name}.upgrade-{os.getpid()}.tmp")
        count = 0
        try:
            with open(tmp, "wb") as out:
                batch: list[bytes] = []
                for entry in self._records(main):
                    batch.append(encode_entry(entry))  # the decoded entry carries its computed key
                    count += 1
                    if len(batch) >= 4096:
                        out.write(b"".join(batch))
                        batch.clear()
                out.write(b"".join(batch))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, main)
            _fsync_dir(main.parent)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _local_error(err, main, "upgrade") from err
        log.info("manifest %s upgraded to file keys (%d records)", main, count)
        return count

    # -- writing (synchronous; for `verify --repair`, not for the run) ------------------------------
    def append_entries(self, entries: Iterable[ManifestEntry], *, fsync: bool = True) -> int:
        """Append records now, in one write. The caller must hold the RunLock. Returns the count."""
        data = b"".join(encode_entry(entry) for entry in entries)
        if not data:
            return 0
        handle = _open_append(self.path, None)
        try:
            _write_all(handle, _tail_fix(self.path) + data, self.path)
            if fsync:
                _fsync(handle, self.path)
        finally:
            handle.close()
        return data.count(b"\n")


def pack_record(nbytes: int, md5: str) -> int:
    """(verified size, md5) in one int, for the resume's per-file memory: bit 0 says an md5 is known,
    bits 1-128 hold it, the rest the size."""
    try:
        digest = int(md5, 16) if len(md5) == 32 else -1
    except ValueError:
        digest = -1
    known = digest >= 0
    return (max(int(nbytes), 0) << 129) | ((digest if known else 0) << 1) | int(known)


_MD5_BITS = (1 << 128) - 1  # a constant: the compiler does not fold an int this large


def unpack_record(packed: int) -> tuple[int, str]:
    """The (nbytes, md5) of `pack_record` ("" when no md5 was recorded)."""
    # to_bytes().hex(): the f"{...:032x}" text (lowercase, 32 digits), in two thirds of the time.
    md5 = ((packed >> 1) & _MD5_BITS).to_bytes(16, "big").hex() if packed & 1 else ""
    return packed >> 129, md5


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- low-level writing ------------------------------------------------------------------------------
Opener = Callable[[Path], BinaryIO]


def _default_opener(path: Path) -> BinaryIO:
    # Unbuffered: each batch is exactly one write() call, not whatever a buffer decides.
    return open(path, "ab", buffering=0)


def _open_append(path: Path, opener: Opener | None) -> BinaryIO:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return (opener or _default_opener)(path)
    except OSError as err:
        raise _local_error(err, path, "open") from err


def _tail_fix(path: Path) -> bytes:
    """b"\\n" when the file ends in a torn line (no newline), so the next record starts on its own line."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() == 0:
                return b""
            handle.seek(-1, os.SEEK_END)
            return b"" if handle.read(1) == b"\n" else b"\n"
    except FileNotFoundError:
        return b""
    except OSError as err:
        raise _local_error(err, path, "read") from err


def _write_all(handle: BinaryIO, data: bytes, path: Path) -> None:
    view = memoryview(data)
    try:
        while view:
            written = handle.write(view)
            if written is None:  # a non-blocking raw file; never expected for a regular file
                raise OSError(errno.EAGAIN, "write would block")
            view = view[written:]
    except OSError as err:
        raise _local_error(err, path, "write") from err


def _fsync(handle: BinaryIO, path: Path) -> None:
    try:
        handle.flush()
        os.fsync(handle.fileno())
    except OSError as err:
        raise _local_error(err, path, "sync") from err


_STOP = object()


class ManifestWriter:
    """The one writer of the manifest: an asyncio task that appends records in fsync'ed batches.

    `record()` waits when the queue is full (back-pressure on the workers, not unbounded memory).
    A batch is written when `batch` records are waiting or `flush_interval` seconds after its first
    record, in a thread, so the event loop never blocks on the disk. An I/O error stops the writer;
    the next `record()` or `close()` raises it as DiskFullError / PermissionDeniedError / ManifestError.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        fsync: bool = True,
        batch: int = 256,
        flush_interval: float = 1.0,
        opener: Opener | None = None,
    ) -> None:
        self.manifest = manifest
        self.fsync = fsync
        self.batch = max(int(batch), 1)
        self.flush_interval = max(float(flush_interval), 0.0)
        self._opener = opener
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=4 * self.batch)
        self._buffer: list[bytes] = []  # encoded lines taken from the queue, not yet written
        # Taking the buffer and writing it happen under one lock, so batches reach the file in order
        # even when close()'s flush_now() races the writer thread. Re-entrant: flush_now holds it
        # around _write_buffer, which takes it too.
        self._io_lock = threading.RLock()
        self._handle: BinaryIO | None = None
        self._task: asyncio.Task | None = None
        self._error: LocalError | None = None
        self._closed = False
        self.written = 0  # records written so far

    async def start(self) -> None:
        """Open the manifest for append (ending a torn last line first) and start the writer task."""
        if self._handle is not None or self._closed:
            return
        path = self.manifest.path

        def _open() -> BinaryIO:
            handle = _open_append(path, self._opener)
            try:
                fix = _tail_fix(path)
                if fix:
                    log.warning("manifest %s ended in a torn line (an earlier run was killed); ignored", path)
                    _write_all(handle, fix, path)
            except BaseException:
                handle.close()
                raise
            return handle

        self._handle = await asyncio.to_thread(_open)
        self._task = asyncio.create_task(self._run(), name="manifest-writer")

    async def record(self, result: FileResult) -> None:
        """Queue the record of one FileResult."""
        await self.record_entry(ManifestEntry.from_result(result))

    async def record_entry(self, entry: ManifestEntry) -> None:
        """Queue one record (waits while the queue is full)."""
        if self._error is not None:
            raise self._error
        if self._closed or self._task is None:
            raise ManifestError(
                f"the manifest writer for {self.manifest.path} is not running",
                path=self.manifest.path,
                hint="call start() before record() and do not record after close()",
            )
        if self._task.done():
            raise ManifestError(
                f"the manifest writer for {self.manifest.path} stopped unexpectedly",
                path=self.manifest.path,
                hint="this is a bug in tessmirror; the records written so far are safe",
            )
        await self._put(encode_entry(entry))

    async def _put(self, line: bytes) -> None:
        """Queue a line, waiting for room; but never wait on a writer that has died meanwhile."""
        if not self._queue.full():
            self._queue.put_nowait(line)
            return
        assert self._task is not None
        put = asyncio.ensure_future(self._queue.put(line))
        try:
            await asyncio.wait({put, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not put.done():
                put.cancel()
        if self._error is not None:
            raise self._error
        if not put.done() or put.cancelled():
            raise ManifestError(
                f"the manifest writer for {self.manifest.path} stopped unexpectedly",
                path=self.manifest.path,
                hint="this is a bug in tessmirror; the records written so far are safe",
            )

    def _take_queued(self) -> None:
        """Move everything queued into the buffer (event-loop thread only)."""
        while True:
            try:
                line = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if line is not _STOP:
                self._buffer.append(line)

    def _write_buffer(self) -> None:
        """Write and fsync the buffered lines as one batch (any thread)."""
        with self._io_lock:
            lines, self._buffer = self._buffer, []
            if not lines or self._handle is None or self._error is not None:
                return
            path = self.manifest.path
            try:
                _write_all(self._handle, b"".join(lines), path)
                if self.fsync:
                    _fsync(self._handle, path)
            except LocalError as err:
                self._error = err
                raise
            self.written += len(lines)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            line = await self._queue.get()
            if line is _STOP:
                stopping = True
            else:
                self._buffer.append(line)
                deadline = loop.time() + self.flush_interval
                # Gather a batch: more records make one fsync pay for many files.
                while len(self._buffer) < self.batch:
                    remaining = deadline - loop.time()
                    try:
                        line = (
                            self._queue.get_nowait()
                            if remaining <= 0
                            else await asyncio.wait_for(self._queue.get(), remaining)
                        )
                    except (asyncio.QueueEmpty, asyncio.TimeoutError):
                        break
                    if line is _STOP:
                        stopping = True
                        break
                    self._buffer.append(line)
            try:
                await asyncio.to_thread(self._write_buffer)
            except LocalError:
                log.error("manifest writer stopped: %s", self._error)
                return

    def flush_now(self) -> None:
        """Write and fsync everything queued, synchronously (at shutdown)."""
        try:
            # Under the lock: a batch being written in a thread must not see the buffer change under it.
            with self._io_lock:
                self._take_queued()
                self._write_buffer()
        except LocalError:
            log.error("could not flush the manifest: %s", self._error)

    async def close(self) -> None:
        """Drain the queue, write, fsync, close. Idempotent; flushes even when cancelled."""
        if self._closed:
            return
        self._closed = True
        stop: asyncio.Future | None = None
        try:
            task = self._task
            if task is not None and not task.done():
                # The queue may be full of records a dead writer will never take: wait for either.
                stop = asyncio.ensure_future(self._queue.put(_STOP))
                await asyncio.wait({stop, task}, return_when=asyncio.FIRST_COMPLETED)
                await task
        finally:
            if stop is not None and not stop.done():
                stop.cancel()
            if self._task is not None and not self._task.done():
                self._task.cancel()
            self.flush_now()
            with self._io_lock:  # waits for a write still running in a thread
                handle, self._handle = self._handle, None
            if handle is not None:
                with contextlib.suppress(OSError):
                    handle.close()
        if self._error is not None:
            raise self._error


__all__ = [
    "LOCK_NAME",
    "MANIFEST_NAME",
    "SHARD_MANIFEST_DIR",
    "STATUSES",
    "Manifest",
    "ManifestEntry",
    "ManifestWriter",
    "RunLock",
    "encode_entry",
    "file_key",
    "pack_record",
    "unpack_record",
]
