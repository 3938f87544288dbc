"""Whole-mirror verification: `tessmirror verify --out DIR [--level ...] [--repair]`.

Every file whose last manifest record is "verified" is checked again on disk (size, md5, FITS
checksums, as deep as `level` asks) in a small thread pool. Records are grouped by file (the
manifest's key: obs_id + file name, see engine.manifest), not by URL. A file whose last record is not
"verified" (failed, pending: e.g. a `--repair` whose download failed) is reported as "missing": the
mirror does not hold it. Files under the mirror that no record names are reported as "unexpected".

With `repair=True` each bad file is moved aside to `<state_dir>/quarantine/<relpath>` (never deleted:
it may be the only copy someone has) and the file gets a "pending" record, so the next run downloads
it again; unexpected files are moved to the quarantine too. `MirrorReport.intact` then says whether
the mirror matches its manifest without a download (the CLI exits 0 when it does, 1 when not).

With `repair=True` the check takes the output's RunLock (the manifest has one writer at a time, and
a run must not write files while they are moved), unless the caller says it holds it already.

Memory is bounded for mirrors of millions of files: no per-file Python objects are kept. The first
pass over the manifest keeps a 16-byte digest of each record's key (to find each file's last record)
and one byte for its status; the second pass streams the last records into a bounded pool of checks
and keeps a 16-byte digest of each expected path, sorted, for the search for unexpected files. Bad
files are repaired in batches as they are found, so only the problems themselves (the report) grow
with the damage. Progress is reported every `progress_interval` seconds, not per file.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from engine import verify
from engine.exceptions import (
    IntegrityError,
    NotFitsError,
    SizeMismatchError,
    UnsafePathError,
    UsageError,
    local_error_from_oserror,
    os_errors,
)
from engine.fetch.partfile import move_under
from engine.layout import resolve_within
from engine.lock import STATE_DIR_NAME, RunLock
from engine.manifest import Manifest, ManifestEntry
from engine.models import VerifyLevel
from engine.redact import redact
from engine.verify.fits import FITS_BLOCK

log = logging.getLogger(__name__)
# A download in progress or interrupted: `NAME.part`, `NAME.meta.part`, and the cluster executor's
# per-writer `NAME.part.<host>.<pid>` (engine/cluster/parts.py). Never reported as unexpected, never
# quarantined: the next run continues them.
_PART_NAME = re.compile(r"\.part(?:\.[^/]+\.[0-9]+)?$")

QUARANTINE_DIR = "quarantine"
_READER_HINT = "run verify as a user who can read the whole mirror"
PROBLEM_KINDS = ("missing", "truncated", "corrupt", "unexpected")
_DIGEST_BYTES = 16  # blake2b-128: a collision among even 10^9 names has odds of ~10^-21
_REPAIR_BATCH = 256  # bad files marked pending (one manifest write + fsync) and moved at a time
_LOOKUP_BATCH = 4096  # walked files looked up in the expected set at once


@dataclass(slots=True)
class MirrorProblem:
    kind: str  # one of PROBLEM_KINDS
    path: str  # relative to the mirror root, POSIX separators
    url: str  # "" for unexpected files
    detail: str
    resolved: bool = False  # fixed by the check itself (an unexpected file moved to the quarantine)


@dataclass(slots=True)
class MirrorReport:
    """What `check_mirror` found and did.

    `intact` is the verdict: True when the mirror now matches its manifest, i.e. nothing was wrong,
    or (with repair) the only problems were unexpected files, now in the quarantine. False means
    files must be downloaded again (`to_download` of them are marked pending).
    """

    checked: int = 0  # files the manifest says are verified, checked again
    ok: int = 0
    problems: list[MirrorProblem] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)  # where files were moved (absolute paths)
    # URLs whose last record says "pending" after the check: found so, or so marked by this repair.
    # The CLI's `--repair` (or the next run) downloads them.
    to_download: int = 0

    @property
    def intact(self) -> bool:
        """True when no problem is left that only a download can fix."""
        return all(problem.resolved for problem in self.problems)


def _classify(err: IntegrityError, path: Path, expected: int) -> str:
    """'truncated' when the file is shorter than it should be, 'corrupt' for anything else."""
    try:
        actual = path.stat().st_size
    except OSError:
        return "corrupt"
    if isinstance(err, SizeMismatchError):
        return "truncated" if 0 <= actual < expected else "corrupt"
    if isinstance(err, NotFitsError) and (actual % FITS_BLOCK or 0 <= actual < expected):
        return "truncated"
    return "corrupt"


def _check_one(root: Path, entry: ManifestEntry, level: VerifyLevel) -> MirrorProblem | None:
    """Check one recorded file; None when it is good. Runs in a worker thread."""
    try:
        path = resolve_within(root, entry.path)
    except UnsafePathError as err:
        return MirrorProblem("corrupt", entry.path, entry.url, f"the manifest names an unsafe path: {err}")
    try:
        verify.check_file(path, size=entry.nbytes, md5=entry.md5, level=level)
    except FileNotFoundError:
        return MirrorProblem("missing", entry.path, entry.url, "the file is not on disk")
    except IntegrityError as err:
        return MirrorProblem(_classify(err, path, entry.nbytes), entry.path, entry.url, redact(err.message))
    except PermissionError as err:
        raise local_error_from_oserror(err, path, "read", permission_hint=_READER_HINT) from err
    except OSError as err:  # EIO, a directory where a file should be, ...
        return MirrorProblem("corrupt", entry.path, entry.url, f"unreadable: {err.strerror or err}")
    return None


def _digest(text: str) -> bytes:
    """A fixed-size stand-in for a URL or path, so a million of them cost 16 MB, not 200."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=_DIGEST_BYTES).digest()


def latest_mask(manifest: Manifest) -> tuple[np.ndarray, int, list[int]]:
    """First pass: which records are the last of their file (key; a bool per record, numbered file
    after file in `manifest.paths()` order), how many of those say "verified" (the progress total),
    and how many records each manifest file held (so records appended meanwhile are left out).

    With shard manifests (engine.manifest: each file's own last record per key, then the later time,
    then the file read later), the same rule as `Manifest.load`.
    """
    keys = bytearray()
    verified = bytearray()  # one byte per record: was it "verified"
    files: list[int] = []  # per record: its file number (only kept when there are several files)
    times: list[float] = []
    per_file: list[int] = [0] * len(manifest.paths())
    for number, entry in manifest.iter_sourced():
        if number >= len(per_file):
            break  # a shard file that appeared during the pass: not ours to judge
        keys += _digest(entry.key)
        verified.append(entry.status == "verified")
        per_file[number] += 1
        if len(per_file) > 1:
            files.append(number)
            times.append(entry.time)
    count = len(verified)
    latest = np.zeros(count, dtype=bool)
    if count and len(per_file) == 1:
        # The first occurrence in reversed order is the last record; return_index sorts stably.
        _, first_reversed = np.unique(np.frombuffer(keys, dtype=f"S{_DIGEST_BYTES}")[::-1], return_index=True)
        latest[count - 1 - first_reversed] = True
    elif count:
        digests = np.frombuffer(keys, dtype=f"S{_DIGEST_BYTES}")
        file_no = np.asarray(files, dtype=np.int64)
        when = np.asarray(times, dtype=np.float64)
        # Each file's last record per key: the last index of each (key, file) pair.
        order = np.lexsort((np.arange(count), file_no, digests))
        pair_end = np.ones(count, dtype=bool)
        pair_end[:-1] = (digests[order][1:] != digests[order][:-1]) | (
            file_no[order][1:] != file_no[order][:-1]
        )
        candidates = order[pair_end]
        # Among those, per key: the later time, then the later file.
        ranked = candidates[np.lexsort((file_no[candidates], when[candidates], digests[candidates]))]
        key_end = np.ones(len(ranked), dtype=bool)
        key_end[:-1] = digests[ranked][1:] != digests[ranked][:-1]
        latest[ranked[key_end]] = True
    del keys
    return latest, int(np.count_nonzero(latest & np.frombuffer(verified, dtype=bool))), per_file


class _PathSet:
    """The expected relative paths, as a sorted array of digests (membership by binary search)."""

    def __init__(self, digests: bytearray) -> None:
        self._sorted = np.sort(np.frombuffer(bytes(digests), dtype=f"S{_DIGEST_BYTES}"))

    def missing(self, relpaths: list[str]) -> list[str]:
        """The members of `relpaths` that are not expected."""
        if not relpaths:
            return []
        wanted = np.frombuffer(b"".join(_digest(rel) for rel in relpaths), dtype=f"S{_DIGEST_BYTES}")
        if not len(self._sorted):
            return list(relpaths)
        where = np.minimum(np.searchsorted(self._sorted, wanted), len(self._sorted) - 1)
        found = self._sorted[where] == wanted
        return [rel for rel, hit in zip(relpaths, found.tolist(), strict=True) if not hit]


def _iter_files(root: Path, skip_dirs: set[tuple[int, int]]) -> Iterator[tuple[str, Path]]:
    """(POSIX relpath, path) of every file under root, streaming; never follows directory symlinks."""
    stack = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        # Any other error (EIO, ELOOP) is a LocalError naming the folder, never a bare OSError.
        with os_errors(directory, "list", permission_hint=_READER_HINT):
            try:
                with os.scandir(directory) as entries:
                    for dirent in entries:
                        rel = f"{prefix}{dirent.name}"
                        if dirent.is_dir(follow_symlinks=False):
                            stat = dirent.stat(follow_symlinks=False)
                            if (stat.st_dev, stat.st_ino) not in skip_dirs:
                                stack.append((Path(dirent.path), rel + "/"))
                        elif not _PART_NAME.search(dirent.name):  # a download in progress or interrupted
                            yield rel, Path(dirent.path)
            except FileNotFoundError:
                continue  # removed while we walked


def _quarantine(root: Path, state_dir: Path, relpath: str) -> Path | None:
    """Move a bad file to <state_dir>/quarantine/<relpath> (a numbered name if taken). None if gone.

    The entry itself is moved, never a symlink's target, and both folders are walked by descriptor
    (engine.fetch.partfile), so a symlinked folder on either side is refused, never followed.
    """
    owner_hint = "run verify --repair as the user who owns the mirror"
    with os_errors(root / relpath, "quarantine", permission_hint=owner_hint):
        try:
            return move_under(root, relpath, state_dir, f"{QUARANTINE_DIR}/{relpath}")
        except FileNotFoundError:
            return None  # gone meanwhile (or its folder was)


def quarantine_file(root: Path, state_dir: Path, relpath: str) -> Path | None:
    """Move the file (or symlink: never followed) at `relpath` under `root` to
    `<state_dir>/quarantine/<relpath>`, never overwriting an earlier copy; None when it is gone."""
    return _quarantine(root, state_dir, relpath)


def check_mirror(
    out_dir: Path,
    manifest: Manifest,
    *,
    level: VerifyLevel,
    repair: bool = False,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 2,
    progress_interval: float = 2.0,
    lock_held: bool = False,
    move_unexpected: bool = True,
) -> MirrorReport:
    """Check every verified file of the mirror again, and look for files no record names.

    The manifest's relative paths live under `out_dir`, which is also the tree searched for
    unexpected files, skipping the state directory and `*.part` files.
    `progress(done, total)` is called at the start, every `progress_interval` seconds and at the end.
    With `repair=True` the RunLock of `out_dir` (and of `manifest.state_dir`) is taken unless
    `lock_held` says the caller holds it (RunLockedError, exit 4, while a run is using the mirror);
    unexpected files are moved to the quarantine unless `move_unexpected=False` (then they stay,
    reported, and the mirror is not `intact`).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UsageError(f"{out_dir} is not a directory", hint="pass the --out folder of an earlier run")
    level = VerifyLevel.parse(level)
    lock = RunLock(manifest.state_dir, out_dir=out_dir) if repair and not lock_held else None
    with lock if lock is not None else contextlib.nullcontext():
        skip = [manifest.state_dir, out_dir / STATE_DIR_NAME]  # our own files (lock, quarantine)
        report = _check(
            out_dir, manifest, level, repair, progress, max(int(workers), 1), progress_interval, skip
        )
        if repair and move_unexpected:  # after the walk: moving files while walking could hide some
            for problem in report.problems:
                if problem.kind == "unexpected":
                    _quarantine_unexpected(out_dir, manifest.state_dir, problem, report)
        return report


def _check(
    root: Path,
    manifest: Manifest,
    level: VerifyLevel,
    repair: bool,
    progress: Callable[[int, int], None] | None,
    workers: int,
    progress_interval: float,
    skip: list[Path],
) -> MirrorReport:
    report = MirrorReport()
    latest, total, per_file = latest_mask(manifest)
    offsets = [sum(per_file[:number]) for number in range(len(per_file))]
    seen = [0] * len(per_file)
    expected = bytearray()  # digests of the paths the last records name
    bad: list[tuple[MirrorProblem, ManifestEntry]] = []  # found, not yet repaired (< _REPAIR_BATCH)
    next_progress = time.monotonic() + progress_interval
    if progress:
        progress(0, total)

    def collect(future: Future, entry: ManifestEntry) -> None:
        nonlocal next_progress
        report.checked += 1
        problem = future.result()
        if problem is None:
            report.ok += 1
        else:
            report.problems.append(problem)
            if repair:
                bad.append((problem, entry))
                if len(bad) >= _REPAIR_BATCH:
                    _repair(root, manifest, bad, report)
                    bad.clear()
        if progress and time.monotonic() >= next_progress:
            next_progress = time.monotonic() + progress_interval
            progress(report.checked, total)

    # Bounded in-flight work: the manifest is streamed, never all submitted at once.
    in_flight: collections.deque[tuple[Future, ManifestEntry]] = collections.deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="mirrorcheck") as pool:
        for number, entry in manifest.iter_sourced():
            if number >= len(per_file) or seen[number] >= per_file[number]:
                continue  # appended since the first pass (e.g. our own repair records): not ours to judge
            index = offsets[number] + seen[number]
            seen[number] += 1
            if not latest[index]:
                continue  # superseded by a later record
            if entry.path:
                expected += _digest(entry.path)
            if entry.status != "verified":
                # Not in the mirror: failed, or still to do (e.g. a repair whose download failed).
                report.problems.append(_not_downloaded(entry))
                if entry.status == "pending":
                    report.to_download += 1
                elif repair:
                    bad.append((report.problems[-1], entry))  # marked pending, so a run fetches it
                    if len(bad) >= _REPAIR_BATCH:
                        _repair(root, manifest, bad, report)
                        bad.clear()
                continue
            in_flight.append((pool.submit(_check_one, root, entry, level), entry))
            if len(in_flight) >= 4 * workers:
                collect(*in_flight.popleft())
        while in_flight:
            collect(*in_flight.popleft())
    if bad:
        _repair(root, manifest, bad, report)
        bad.clear()
    if progress:
        progress(report.checked, total)
    del latest

    expected_paths = _PathSet(expected)
    del expected
    skip_dirs: set[tuple[int, int]] = set()
    for directory in skip:
        with contextlib.suppress(OSError):
            stat = directory.stat()
            skip_dirs.add((stat.st_dev, stat.st_ino))
    walked: list[str] = []
    for relpath, _path in _iter_files(root, skip_dirs):
        walked.append(relpath)
        if len(walked) >= _LOOKUP_BATCH:
            _report_unexpected(expected_paths.missing(walked), report)
            walked.clear()
    _report_unexpected(expected_paths.missing(walked), report)
    return report


def _not_downloaded(entry: ManifestEntry) -> MirrorProblem:
    why = f"not in the mirror: its last record is {entry.status!r}"
    if entry.error:
        why += f" ({redact(entry.error)})"
    return MirrorProblem("missing", entry.path, entry.url, why)


def _report_unexpected(relpaths: list[str], report: MirrorReport) -> None:
    for relpath in relpaths:
        report.problems.append(MirrorProblem("unexpected", relpath, "", "no manifest record names this file"))


def _quarantine_unexpected(root: Path, state_dir: Path, problem: MirrorProblem, report: MirrorReport) -> None:
    """Move an unexpected file (or symlink: never followed) to the quarantine; mark it resolved."""
    try:
        moved = _quarantine(root, state_dir, problem.path)
    except UnsafePathError as err:  # its folder is no longer inside the mirror: leave it, say why
        problem.detail += f"; not moved: {err.message}"
        return
    if moved is None:
        problem.detail += "; it has gone since"
    else:
        report.quarantined.append(str(moved))
        problem.detail += f"; moved to {moved}"
        log.warning("quarantined the unexpected file %s to %s", problem.path, moved)
    problem.resolved = True


def _repair(
    root: Path, manifest: Manifest, bad: list[tuple[MirrorProblem, ManifestEntry]], report: MirrorReport
) -> None:
    """Mark bad files pending, then move them aside.

    The records go first: if we die in between, a bad file still in place is pending and will be
    replaced, whereas a file moved away while the manifest still said "verified" would never come back.
    """
    now = time.time()
    report.to_download += len(bad)
    manifest.append_entries(
        replace(entry, status="pending", error=redact(f"verify: {problem.kind}: {problem.detail}"), time=now)
        for problem, entry in bad
    )
    for problem, entry in bad:
        if problem.kind == "missing":
            continue
        try:
            moved = _quarantine(root, manifest.state_dir, entry.path)
        except UnsafePathError:
            continue  # an unsafe recorded path is never touched; the pending record re-fetches it
        if moved is not None:
            report.quarantined.append(str(moved))
            log.warning("quarantined %s (%s) to %s", entry.path, problem.kind, moved)
