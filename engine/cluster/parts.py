"""Part files of the cluster executor: ``NAME.part.<host>.<pid>``, one per writer.

Dask may run a batch again on another worker while the first is still alive (it presumed it dead
after a missed heartbeat), so two writers of one file must never share an inode: each writer's part
carries its host and pid. Every other rule of `engine.fetch.partfile.PartFile` holds (descriptor
walks, O_EXCL|O_NOFOLLOW, flock, the validator sidecar, rename by descriptor).

A part whose writer is gone may be continued (Range resume, with the validator stored beside it) by
the next writer of that file, which takes it over by renaming it to its own name: one `rename` of a
unique name, so of two takers at most one gets it. The writer is gone when

- the part names this host and a pid that is not running (or this very process, whose earlier
  batch ended), and the part is not locked; or
- it names another host (whose pids mean nothing here), is not locked, and was not written for
  `STALE_PART_SECONDS`: a live writer writes at least once per idle timeout or ends its try, and
  waits at most a Retry-After ceiling (900 s) between tries, so an hour of silence is a dead writer.

A live writer's part is never touched: its flock refuses the probe, its pid runs, or it is recent.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import time
from pathlib import Path

from engine.fetch.partfile import DirCache, PartFile, walk

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None  # type: ignore[assignment]  # no module there; _unlocked checks for None

STALE_PART_SECONDS = 3600.0
_META_SUFFIX = ".meta.part"  # engine.fetch.partfile's validator sidecar suffix
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_PROBE_FLAGS = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


def host_name() -> str:
    """This host's name as it goes into part names (no '/' or control characters)."""
    name = socket.gethostname() or "host"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64]


def part_suffix(host: str | None = None, pid: int | None = None) -> str:
    """``.<host>.<pid>``: what the cluster executor appends to ``NAME.part``."""
    return f".{host or host_name()}.{os.getpid() if pid is None else pid}"


def _pid_alive(pid: int) -> bool:
    """Whether `pid` runs here. A zombie does not: a worker whose driver was killed is reparented,
    and where nobody reaps it (pid 1 of many containers) it stays a zombie that writes nothing."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive, unless it is a zombie
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc here (or it vanished just now): assume alive, never take a live part
    state = stat_line.rpartition(")")[2].split()[:1]
    return state not in (["Z"], ["X"])


def _unlocked(dir_fd: int, name: str) -> bool | None:
    """Whether no writer holds `name`'s flock (True), one does (False), or flock cannot tell (None)."""
    try:
        fd = os.open(name, _PROBE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return False  # vanished or not openable as a plain file: leave it
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or fcntl is None:
            return None if fcntl is None else False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as err:
            if err.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
                return None
            return False
        return True  # closing the descriptor below drops the probe's lock
    finally:
        os.close(fd)


def writer_gone(dir_fd: int, name: str, prefix: str, *, host: str, now: float | None = None) -> bool:
    """Whether the writer of the part `name` (``<prefix><host>.<pid>``) in `dir_fd` is gone."""
    rest = name[len(prefix) :]
    owner, _, pid_text = rest.rpartition(".")
    if not owner or not pid_text.isdigit():
        return False  # not a part of ours: leave it
    unlocked = _unlocked(dir_fd, name)
    if unlocked is False:
        return False
    pid = int(pid_text)
    if owner == host:
        return pid == os.getpid() or not _pid_alive(pid)
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    idle = (time.time() if now is None else now) - info.st_mtime
    return bool(unlocked) and idle >= STALE_PART_SECONDS


class ClusterPartFile(PartFile):
    """`NAME.part.<host>.<pid>`; on `open`, continues a part of the same file whose writer is gone.

    Built by the Downloader's ``part_file`` factory with the path it would use (``NAME.part``).
    """

    def __init__(self, path: Path, *, root: Path | None = None, cache: DirCache | None = None) -> None:
        self.host = host_name()
        super().__init__(path.with_name(path.name + part_suffix(self.host)), root=root, cache=cache)
        self.prefix = path.name + "."  # NAME.part. : every writer's part of this file starts so
        self.taken_over = ""  # the name of the part continued, if any (for tests and logs)

    def open(self) -> None:
        self._take_over_orphans()
        super().open()

    def _take_over_orphans(self) -> None:
        """Rename the first part of this file whose writer is gone to our own name (with its
        validator sidecar), so `open` continues it; remove the other gone writers' parts."""
        try:
            # The Downloader's folder cache when there is one: no walk from the root per file.
            cache = self._cache
            dir_fd = cache.open(self.root, self.dirs) if cache else walk(self.root, self.dirs, create=False)
        except (FileNotFoundError, NotADirectoryError):
            return  # the folder does not exist yet: nothing to take over
        try:
            names = [
                n
                for n in os.listdir(dir_fd)
                if n.startswith(self.prefix) and n != self.name and not n.endswith((_META_SUFFIX, ".tmp"))
            ]
            for orphan in sorted(names):
                if not writer_gone(dir_fd, orphan, self.prefix, host=self.host):
                    continue
                if self.taken_over:  # a second dead writer's part: only the first is continued
                    _remove(dir_fd, orphan + _META_SUFFIX)
                    _remove(dir_fd, orphan)
                    continue
                try:
                    os.rename(orphan, self.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                except FileNotFoundError:
                    continue  # another writer took it first
                self.taken_over = orphan
                with contextlib.suppress(FileNotFoundError):
                    os.rename(
                        orphan + _META_SUFFIX,
                        self.name + _META_SUFFIX,
                        src_dir_fd=dir_fd,
                        dst_dir_fd=dir_fd,
                    )
        finally:
            os.close(dir_fd)


def _remove(dir_fd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


__all__ = ["STALE_PART_SECONDS", "ClusterPartFile", "host_name", "part_suffix", "writer_gone"]
