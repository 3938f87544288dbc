"""Whole-mirror verification: `tessmirror verify --out DIR [--level ...] [--repair]`.

Every file whose last manifest record is "verified" is checked again on disk (size, md5, FITS
checksums, as deep as `level` asks) in a small thread pool; files under the mirror that no record
names are reported as "unexpected". With `repair=True` each bad file is moved aside to
`<state_dir>/quarantine/<relpath>` (never deleted: it may be the only copy someone has) and its URL
gets a "pending" record, so the next run downloads it again.

The caller must hold the RunLock when `repair=True`: the manifest has one writer at a time.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine import verify
from engine.exceptions import (
    IntegrityError,
    NotFitsError,
    PermissionDeniedError,
    SizeMismatchError,
    UnsafePathError,
    UsageError,
)
from engine.layout import resolve_within
from engine.manifest import Manifest, ManifestEntry
from engine.models import VerifyLevel
from engine.redact import redact

log = logging.getLogger(__name__)

FITS_BLOCK = 2880
QUARANTINE_DIR = "quarantine"
PROBLEM_KINDS = ("missing", "truncated", "corrupt", "unexpected")
_PROGRESS_EVERY = 200  # files between progress calls


@dataclass(slots=True)
class MirrorProblem:
    kind: str  # one of PROBLEM_KINDS
    path: str  # relative to the mirror root, POSIX separators
    url: str  # "" for unexpected files
    detail: str


@dataclass(slots=True)
class MirrorReport:
    checked: int = 0  # files the manifest says are verified, checked again
    ok: int = 0
    problems: list[MirrorProblem] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)  # where bad files were moved (absolute paths)


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
        raise PermissionDeniedError(
            f"permission denied to read {path}",
            path=path,
            hint="run verify as a user who can read the whole mirror",
        ) from err
    except OSError as err:  # EIO, a directory where a file should be, ...
        return MirrorProblem("corrupt", entry.path, entry.url, f"unreadable: {err.strerror or err}")
    return None


def _latest_index(manifest: Manifest) -> tuple[dict[str, int], int]:
    """url -> index of its last record, and how many URLs end "verified" (first pass, compact)."""
    last: dict[str, int] = {}
    verified = bytearray()  # one byte per record: was it "verified"
    for index, entry in enumerate(manifest.iter_records()):
        last[entry.url] = index
        verified.append(entry.status == "verified")
    return last, sum(verified[index] for index in last.values())


def _iter_files(root: Path, skip_dirs: set[tuple[int, int]]) -> Iterator[tuple[str, Path]]:
    """(POSIX relpath, path) of every file under root, streaming; never follows directory symlinks."""
    stack = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            with os.scandir(directory) as entries:
                for dirent in entries:
                    rel = f"{prefix}{dirent.name}"
                    if dirent.is_dir(follow_symlinks=False):
                        stat = dirent.stat(follow_symlinks=False)
                        if (stat.st_dev, stat.st_ino) not in skip_dirs:
                            stack.append((Path(dirent.path), rel + "/"))
                    elif not dirent.name.endswith(".part"):  # a download in progress or interrupted
                        yield rel, Path(dirent.path)
        except PermissionError as err:
            raise PermissionDeniedError(
                f"permission denied to list {directory}",
                path=directory,
                hint="run verify as a user who can read the whole mirror",
            ) from err
        except FileNotFoundError:
            continue  # removed while we walked


def _quarantine(root: Path, state_dir: Path, relpath: str) -> Path | None:
    """Move a bad file to <state_dir>/quarantine/<relpath> (a numbered name if taken). None if gone."""
    source = resolve_within(root, relpath)
    if not source.exists():
        return None
    target = resolve_within(state_dir / QUARANTINE_DIR, relpath)
    candidate, number = target, 0
    while candidate.exists():  # never overwrite an earlier quarantined copy
        number += 1
        candidate = target.with_name(f"{target.name}.{number}")
    try:
        candidate.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, candidate)  # a rename, or copy+remove across file systems
    except PermissionError as err:
        raise PermissionDeniedError(
            f"permission denied to move {source} to {candidate}",
            path=source,
            hint="run verify --repair as the user who owns the mirror",
        ) from err
    return candidate


def check_mirror(
    out_dir: Path,
    manifest: Manifest,
    *,
    level: VerifyLevel,
    layout_root: Path | None = None,
    repair: bool = False,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 2,
) -> MirrorReport:
    """Check every verified file of the mirror again, and look for files no record names.

    `layout_root` is where the manifest's relative paths live (default: `out_dir`); it is also the
    tree searched for unexpected files, skipping the state directory and `*.part` files.
    """
    out_dir = Path(out_dir)
    root = Path(layout_root) if layout_root is not None else out_dir
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory", hint="pass the --out folder of an earlier run")
    level = VerifyLevel.parse(level)
    report = MirrorReport()
    last, total = _latest_index(manifest)
    expected_paths: set[str] = set()
    bad: list[tuple[MirrorProblem, ManifestEntry]] = []
    if progress:
        progress(0, total)

    def collect(future: Future, entry: ManifestEntry) -> None:
        report.checked += 1
        problem = future.result()
        if problem is None:
            report.ok += 1
        else:
            report.problems.append(problem)
            bad.append((problem, entry))
        if progress and (report.checked % _PROGRESS_EVERY == 0 or report.checked == total):
            progress(report.checked, total)

    # Bounded in-flight work: the manifest is streamed, never all submitted at once.
    in_flight: collections.deque[tuple[Future, ManifestEntry]] = collections.deque()
    with ThreadPoolExecutor(max(int(workers), 1), thread_name_prefix="mirrorcheck") as pool:
        for index, entry in enumerate(manifest.iter_records()):
            if last.get(entry.url) != index:
                continue  # superseded by a later record
            if entry.path:
                expected_paths.add(entry.path)
            if entry.status != "verified":
                continue  # still to do: the next run handles it
            in_flight.append((pool.submit(_check_one, root, entry, level), entry))
            if len(in_flight) >= 4 * max(int(workers), 1):
                collect(*in_flight.popleft())
        while in_flight:
            collect(*in_flight.popleft())
    del last

    state_dir = manifest.state_dir
    skip_dirs: set[tuple[int, int]] = set()
    if state_dir.is_dir():
        stat = state_dir.stat()
        skip_dirs.add((stat.st_dev, stat.st_ino))
    for relpath, _path in _iter_files(root, skip_dirs):
        if relpath not in expected_paths:
            report.problems.append(
                MirrorProblem("unexpected", relpath, "", "no manifest record names this file")
            )

    if repair and bad:
        _repair(root, manifest, bad, report)
    return report


def _repair(
    root: Path, manifest: Manifest, bad: list[tuple[MirrorProblem, ManifestEntry]], report: MirrorReport
) -> None:
    """Mark bad files pending, then move them aside.

    The records go first: if we die in between, a bad file still in place is pending and will be
    replaced, whereas a file moved away while the manifest still said "verified" would never come back.
    """
    now = time.time()
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
