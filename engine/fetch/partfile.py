"""The one audited way to write under the output folder: directory descriptors, never followed links.

Everything under `--out` may be changed by someone else while a run goes on (a group-shared mirror):
a `NAME.part` planted as a symlink to a victim file, a directory swapped for a symlink to another
folder, a final name pre-planted as a symlink. Path-based calls (`open(path)`, `mkdir(parents=True)`,
`os.replace(path, dest)`) follow every such link. This module never does:

* directories are entered one component at a time from a descriptor of the output folder, with
  ``os.open(name, O_DIRECTORY | O_NOFOLLOW, dir_fd=parent)``, and created with
  ``os.mkdir(name, dir_fd=parent)``; a component that is a symlink (wherever it points) or not a
  directory is refused with an `UnsafePathError` (a one-line, per-file failure);
* the part file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` relative to its directory's
  descriptor; an existing part that is a symlink, not a regular file, or has another hard link is
  removed (``unlink(dir_fd=)``, which never follows) and the download starts fresh; a plain regular
  part is reused: truncated, or (with `resume` set) kept when a validator (strong ETag or
  Last-Modified) was stored beside it (`save_validator`, the sidecar ``NAME.meta.part``: written to
  a fresh ``O_EXCL | O_NOFOLLOW`` temporary and renamed into place, read with ``O_NOFOLLOW``, at
  most 1 kB, printable ASCII only); each part is held under an exclusive `flock`, so a second
  writer on one destination is refused, never merged;
* commit is fsync + ``os.rename(part, final, src_dir_fd=fd, dst_dir_fd=fd)``: a final name that is a
  symlink is replaced, never followed; a final name that is a directory is refused;
* a directory can still be *moved* while its descriptor is held (a rename is not a symlink), so after
  the rename `PartFile.commit` walks the path again and compares device/inode with the descriptor: a
  file whose folder was moved away or replaced meanwhile is removed and recorded as failed, never
  left elsewhere;
* the FITS check reads the part through its folder's descriptor (`PartFile.read_path`,
  ``/proc/self/fd/<dir fd>/NAME``), never through the path under --out.

Only the output folder itself is opened by path (following links): the user chose it, and it may
well be a symlink to a scratch filesystem. No fact about a path ("was a real directory") is cached:
paths can be swapped at any time. `DirCache` keeps *descriptors* of folders already entered (opened
with O_NOFOLLOW | O_DIRECTORY, bounded LRU, closed on eviction and by `close`): a descriptor stays
bound to its folder whatever happens to the path, and the check after the rename catches a folder
that was moved since (its cached descriptor is then dropped).

Cost per file (2,000 files of 8 kB in a 4-level tree, open + write + commit, CPU time, 2 cores):
on tmpfs, where only the path handling counts, ~88 us with `layout.resolve_within` in front
(~75 us with the lexical `layout.within`) against ~42 us for the earlier path-based code; on ext4
with fsync both take 0.9-2.8 ms per file (fsync and the journal dominate; the difference is inside
the noise of a shared machine).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import stat
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from engine.exceptions import DestinationBusyError, UnsafePathError

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None  # type: ignore[assignment]  # no module there; _locked checks for None before use

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
DIR_FLAGS = os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC
# O_NONBLOCK: opening a FIFO planted between our lstat and our open must not block the thread.
_FRESH_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
# Read-write: a part kept for a resume is re-read (`replay`) to re-hash its bytes.
_REUSE_FLAGS = os.O_RDWR | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0)
_META_READ_FLAGS = os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0)
_META_MAX = 1024  # bytes of a validator sidecar; anything longer is not ours
_META_SUFFIX = ".meta.part"  # ends in .part, so `tessmirror verify` skips it as it skips parts
_DIR_MODE = 0o777  # narrowed by the umask, as mkdir(1) does
_FILE_MODE = 0o644
T = TypeVar("T")
_PROC_FD = Path("/proc/self/fd")  # Linux: a folder's descriptor as a path prefix
# What open(O_NOFOLLOW) says for a symlink: ELOOP, and EMLINK on FreeBSD (on Linux EMLINK means
# "too many links", which must not be mistaken for a planted symlink).
_SYMLINK_ERRNOS = frozenset({errno.ELOOP, *([errno.EMLINK] if sys.platform.startswith("freebsd") else [])})
_HINT = (
    "tessmirror never writes through a symlink or into a non-directory under --out; "
    "replace it with a real directory (or point --out at the real location) and run again"
)


@functools.cache
def _has_proc_fd() -> bool:
    """Whether /proc/self/fd names descriptors as paths (Linux). Asked once, not with a stat per file."""
    return _PROC_FD.is_dir()


def _unsafe(where: Path, why: str) -> UnsafePathError:
    return UnsafePathError(f"refusing to write under {str(where)!r}: {why}", hint=_HINT)


def _describe_entry(dir_fd: int, name: str) -> str:
    """Why `name` in `dir_fd` cannot be entered: a symlink (and where it points) or its file type."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as err:
        return f"cannot be inspected ({err.strerror})"
    if stat.S_ISLNK(info.st_mode):
        try:
            target = os.readlink(name, dir_fd=dir_fd)
        except OSError:
            target = "?"
        return f"it is a symlink (to {target[:200]!r})"
    return "it is not a directory"


def open_root(root: Path) -> int:
    """A descriptor of the output folder (created if missing). The one path-based open."""
    try:
        return os.open(root, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    except FileNotFoundError:
        os.makedirs(root, exist_ok=True)
        return os.open(root, os.O_RDONLY | _DIRECTORY | _CLOEXEC)


def walk(root: Path, parts: tuple[str, ...], *, create: bool, start: int = -1) -> int:
    """Open `root/parts...` one component at a time without following any symlink; return its fd.

    Missing directories are created when `create` is true (FileNotFoundError otherwise). A component
    that is a symlink or not a directory raises UnsafePathError. `start`, when given, is a descriptor
    of `root` that the walk takes over (closes). The caller owns the returned fd.
    """
    fd = open_root(root) if start < 0 else start
    for depth, name in enumerate(parts):
        fd = _enter(fd, name, root, parts[: depth + 1], create=create)  # consumes (closes) fd
    return fd


def _enter(parent: int, name: str, root: Path, shown: tuple[str, ...], *, create: bool) -> int:
    """Open directory `name` in `parent`, creating it if allowed. Closes `parent` in every case."""
    try:
        for _ in range(3):  # a concurrent mkdir/rmdir can race us; a few tries settle it
            try:
                return os.open(name, DIR_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                if not create:
                    raise
            # FileExistsError: another worker made it (or something was planted: the next open tells).
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, _DIR_MODE, dir_fd=parent)
        return os.open(name, DIR_FLAGS, dir_fd=parent)
    except OSError as err:
        if err.errno in _SYMLINK_ERRNOS or err.errno == errno.ENOTDIR:
            raise _unsafe(root.joinpath(*shown), _describe_entry(parent, name)) from None
        raise
    finally:
        os.close(parent)


def same_file(fd: int, other: int) -> bool:
    a, b = os.fstat(fd), os.fstat(other)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def remove_entry(dir_fd: int, name: str, where: Path) -> None:
    """Remove `name` from `dir_fd` without following it (a symlink is removed, not its target)."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except IsADirectoryError:
        _remove_dir(dir_fd, name, where)
    except PermissionError as err:
        if err.errno == errno.EPERM:  # what unlink(2) says for a directory on Linux
            _remove_dir(dir_fd, name, where)
        else:
            raise


def _remove_dir(dir_fd: int, name: str, where: Path) -> None:
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except OSError as err:
        raise _unsafe(where, f"it is a directory ({err.strerror}); remove it by hand") from None


def open_under(root: Path, relpath: str, flags: int, mode: int = _FILE_MODE) -> int:
    """Open `root/relpath` with `flags` (e.g. O_WRONLY | O_APPEND | O_CREAT) without following any
    symlink under `root`, its folders created as needed; return the fd (the caller closes it).

    For the other files written under --out (manifest, lock, plan): a `.tessmirror` folder or a
    manifest swapped for a symlink is refused with UnsafePathError. To replace a file atomically,
    `walk` to its folder and ``os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)``.
    """
    parts = tuple(relpath.split("/"))
    dir_fd = walk(root, parts[:-1], create=True)
    try:
        return os.open(parts[-1], flags | _NOFOLLOW | _CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as err:
        if err.errno in _SYMLINK_ERRNOS:
            raise _unsafe(root.joinpath(*parts), _describe_entry(dir_fd, parts[-1])) from None
        raise
    finally:
        os.close(dir_fd)


def _locked(fd: int, path: Path) -> int:
    """Take an exclusive lock on a part's fd, or close it and refuse: two writers on one part (two
    rows with one destination, two runs on one mirror) would interleave their bytes."""
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DestinationBusyError(
            f"{path.name}: another download is writing this file right now; skipped"
        ) from None
    except OSError as err:
        if err.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
            os.close(fd)
            raise
        # A filesystem without flock (some Lustre/NFS mounts): go on unlocked, as before.
    return fd


def _close_all(fds: OrderedDict[tuple[str, tuple[str, ...]], int]) -> None:
    while fds:
        os.close(fds.popitem()[1])


class DirCache:
    """Descriptors of folders already entered under the output folder, keyed by relative path.

    Bounded (least recently used first out), thread-safe, and handing out *duplicates*, so an
    eviction never closes a descriptor another thread is using. Closed by `close()`, or when garbage
    collected. Only descriptors are kept, never the fact that a path was a real folder.
    """

    def __init__(self, size: int = 256) -> None:
        self._size = max(size, 1)
        self._fds: OrderedDict[tuple[str, tuple[str, ...]], int] = OrderedDict()
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _close_all, self._fds)

    def __len__(self) -> int:
        return len(self._fds)

    def _get(self, key: tuple[str, tuple[str, ...]]) -> int:
        with self._lock:
            fd = self._fds.get(key)
            if fd is None:
                return -1
            self._fds.move_to_end(key)
            return os.dup(fd)  # under the lock: an eviction cannot close it first

    def _put(self, key: tuple[str, tuple[str, ...]], fd: int) -> None:
        with self._lock:
            if key in self._fds:
                return  # another thread walked there too; keep the first
            self._fds[key] = os.dup(fd)
            while len(self._fds) > self._size:
                os.close(self._fds.popitem(last=False)[1])

    def root(self, root: Path) -> int:
        """A new descriptor of the output folder (opened by path once, then duplicated)."""
        key = (str(root), ())
        fd = self._get(key)
        if fd < 0:
            fd = open_root(root)
            self._put(key, fd)
        return fd

    def open(self, root: Path, parts: tuple[str, ...]) -> int:
        """A new descriptor of `root/parts` (created if missing), walked without following links.

        The walk starts from the deepest folder already held (a new target's folder in the mast
        layout costs one or two `openat`, not six) and keeps each folder it enters.
        """
        base = str(root)
        depth = len(parts)
        fd = self._get((base, parts)) if parts else -1
        while fd < 0 and depth > 0:
            depth -= 1
            fd = self._get((base, parts[:depth])) if depth else -1
        if fd < 0:
            fd = self.root(root)
        while depth < len(parts):
            fd = _enter(fd, parts[depth], root, parts[: depth + 1], create=True)  # consumes fd
            depth += 1
            self._put((base, parts[:depth]), fd)
        return fd

    def forget(self, root: Path, parts: tuple[str, ...]) -> None:
        """Drop the descriptors of `root/parts`, of the folders above it and of those below it: one
        of them was moved, replaced or removed (the check cannot tell which). The root stays."""
        base = str(root)
        with self._lock:
            stale = [
                key
                for key in self._fds
                if key[0] == base
                and key[1]
                and (key[1] == parts[: len(key[1])] or key[1][: len(parts)] == parts)
            ]
            for key in stale:
                os.close(self._fds.pop(key))

    def close(self) -> None:
        """Close every cached descriptor (the cache stays usable; it refills on demand)."""
        with self._lock:
            _close_all(self._fds)


class PartFile:
    """`<dest>.part`, written through a descriptor of its directory. Blocking: run it in threads.

    `path` is the part's path (for messages; it is never opened by path) and must lie lexically under
    `root`, the output folder (default: the part's own folder, no walk). `cache` shares folder
    descriptors between files (the Downloader passes one). Tests substitute a subclass (e.g. one
    whose `write` fails with ENOSPC) through `Downloader(part_file=...)`.
    """

    def __init__(self, path: Path, *, root: Path | None = None, cache: DirCache | None = None) -> None:
        self.path = path
        self.root = path.parent if root is None else root
        self.dirs: tuple[str, ...] = path.parent.relative_to(self.root).parts
        self.name = path.name
        self._cache = cache
        self._fd = -1
        self._dir_fd = -1
        self.resume = False  # `open` keeps an earlier part that has a stored validator
        self.kept = 0  # bytes of an earlier part kept by `open` (with `resume`)
        self.kept_validator: str | None = None  # the validator stored beside those bytes
        self._meta_name = path.name.removesuffix(".part") + _META_SUFFIX
        self._meta_exists = False  # a sidecar of ours may be there: remove it on commit/discard

    # -- opening -----------------------------------------------------------------------------------
    def open(self) -> None:
        """Enter (creating) the part's directory safely and open the part file in it.

        The part is empty afterwards, unless `resume` is set and an earlier regular part has a
        stored validator: then its bytes are kept (`kept`, `kept_validator`) and writes append.
        """
        resume = self.resume
        self.close()
        self.kept, self.kept_validator = 0, None
        if self._cache is None:
            self._dir_fd = walk(self.root, self.dirs, create=True)
            self._fd = self._open_part(resume)
            return
        self._dir_fd = self._cache.open(self.root, self.dirs)
        try:
            self._fd = self._open_part(resume)
        except FileNotFoundError:
            # The cached folder was removed since (e.g. the user cleaned the mirror): walk afresh.
            self._close_dir()
            self._cache.forget(self.root, self.dirs)
            self._dir_fd = self._cache.open(self.root, self.dirs)
            self._fd = self._open_part(resume)

    def _open_part(self, resume: bool = False) -> int:
        for _ in range(4):  # each round removes one planted entry; a persistent attacker gets refused
            try:
                return _locked(os.open(self.name, _FRESH_FLAGS, _FILE_MODE, dir_fd=self._dir_fd), self.path)
            except FileExistsError:
                pass
            except OSError as err:
                if err.errno not in _SYMLINK_ERRNOS:
                    raise
            fd = self._reuse_part(resume)
            if fd >= 0:
                return fd
        raise _unsafe(self.path, "it keeps being replaced by something other than a regular file")

    def _reuse_part(self, resume: bool = False) -> int:
        """Open an existing regular part (truncated unless kept for a resume), or remove whatever is
        there and return -1."""
        try:
            info = os.stat(self.name, dir_fd=self._dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return -1
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
            try:
                fd = os.open(self.name, _REUSE_FLAGS, dir_fd=self._dir_fd)
            except OSError as err:
                if err.errno not in (*_SYMLINK_ERRNOS, errno.ENOENT, errno.ENXIO):
                    raise
            else:
                after = os.fstat(fd)
                if stat.S_ISREG(after.st_mode) and after.st_nlink == 1:
                    _locked(fd, self.path)  # before truncating: never another writer's bytes
                    validator = self._read_meta() if resume else None
                    if validator and after.st_size > 0:
                        self.kept, self.kept_validator = after.st_size, validator
                        os.lseek(fd, 0, os.SEEK_END)
                    else:
                        os.ftruncate(fd, 0)  # no validator: the bytes cannot be vouched for
                    return fd
                os.close(fd)
        # A symlink (perhaps to a victim file), a FIFO, a directory, or a hard link to another file:
        # remove the entry itself (never what it points to) and start fresh.
        remove_entry(self._dir_fd, self.name, self.path)
        return -1

    # -- the validator sidecar ----------------------------------------------------------------------
    def _read_meta(self) -> str | None:
        """The validator stored beside the part, or None (missing, not a regular file, malformed)."""
        try:
            fd = os.open(self._meta_name, _META_READ_FLAGS, dir_fd=self._dir_fd)
        except OSError:
            return None
        self._meta_exists = True
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            raw = os.read(fd, _META_MAX + 1)
        except OSError:
            return None
        finally:
            os.close(fd)
        if len(raw) > _META_MAX:
            return None
        try:
            record = json.loads(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return None
        value = record.get("validator") if isinstance(record, dict) else None
        # It goes into a request header: printable ASCII only (no CR/LF), never anything else.
        if not isinstance(value, str) or not value or not all(" " <= c <= "~" for c in value):
            return None
        return value

    def save_validator(self, validator: str) -> None:
        """Store `validator` beside the part (replacing any earlier one), never following a link."""
        if not validator or not all(" " <= c <= "~" for c in validator) or len(validator) > 512:
            return
        data = json.dumps({"validator": validator}).encode("ascii")
        temporary = self._meta_name + ".tmp"
        remove_entry(self._dir_fd, temporary, self.path)
        fd = os.open(temporary, _FRESH_FLAGS, _FILE_MODE, dir_fd=self._dir_fd)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.rename(temporary, self._meta_name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        self._meta_exists = True

    def _drop_meta(self) -> None:
        if self._meta_exists and self._dir_fd >= 0:
            remove_entry(self._dir_fd, self._meta_name, self.path)
            self._meta_exists = False

    def replay(self, feed: Callable[[memoryview], None], block: int = 1 << 20) -> None:
        """Hand the kept bytes to `feed` in order (to re-hash them), reading through our descriptor."""
        buffer = bytearray(max(block, 1))
        view = memoryview(buffer)
        offset = 0
        while offset < self.kept:
            count = os.preadv(self._fd, [view[: min(len(buffer), self.kept - offset)]], offset)
            if count <= 0:  # shorter than it was at open: someone truncated it; the checks decide
                break
            feed(view[:count])
            offset += count

    # -- writing -----------------------------------------------------------------------------------
    def write(self, data: bytes | memoryview) -> None:
        written = os.write(self._fd, data)
        if written < len(data):  # short writes happen (signals, some filesystems): finish the block
            view = memoryview(data)[written:]
            while view:
                view = view[os.write(self._fd, view) :]

    def truncate(self) -> None:
        """Empty the part; a stored validator goes too (it vouched for the bytes just dropped)."""
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self.kept = 0
        self._drop_meta()

    # -- finishing ---------------------------------------------------------------------------------
    def read_path(self) -> Path:
        """A path that reads this part through its folder's descriptor, whatever happened to the
        path under --out since (Linux: ``/proc/self/fd/<fd>/NAME``; its `.name` is the part's name,
        for messages). Elsewhere: the part's path, after `check_in_place`."""
        if _has_proc_fd():
            return _PROC_FD / str(self._dir_fd) / self.name
        self.check_in_place()
        return self.path

    def check_in_place(self) -> None:
        """Raise UnsafePathError unless the held directory is still the one at its path under root.

        A folder moved away or replaced by a symlink since `open` would otherwise receive the file.
        """
        start = self._cache.root(self.root) if self._cache is not None else -1
        try:
            fresh = walk(self.root, self.dirs, create=False, start=start)
        except FileNotFoundError:
            self._forget()
            raise _unsafe(self.path.parent, "the folder was moved away during the download") from None
        except UnsafePathError:
            self._forget()
            raise
        try:
            if not same_file(fresh, self._dir_fd):
                self._forget()
                raise _unsafe(self.path.parent, "the folder was replaced during the download")
        finally:
            os.close(fresh)

    def _forget(self) -> None:
        if self._cache is not None:
            self._cache.forget(self.root, self.dirs)

    def commit(self, dest: Path, *, fsync: bool) -> None:
        """Make the bytes durable (optionally), close, and atomically rename to `dest` (same folder).

        A `dest` that is a symlink is replaced (rename never follows it); a directory is refused.
        """
        if dest.parent != self.path.parent:
            raise ValueError(f"{dest} is not beside {self.path}")
        if fsync:
            os.fsync(self._fd)
        self._close_file()  # forgets the descriptor before closing: a failing close is never retried
        # The sidecar first: a crash between the two leaves a part without one (restarted next time),
        # never a sidecar without its part.
        self._drop_meta()
        try:
            os.rename(self.name, dest.name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        except IsADirectoryError:
            remove_entry(self._dir_fd, self.name, self.path)
            raise _unsafe(dest, "a directory has the file's name; remove it by hand") from None
        try:
            self.check_in_place()
        except UnsafePathError:
            # Renamed inside a folder that someone moved (or replaced) meanwhile: take it back out.
            remove_entry(self._dir_fd, dest.name, dest)
            raise
        self._close_dir()

    def discard(self) -> None:
        """Close and remove the part (through the directory descriptor) if this object opened it:
        a part another writer holds (`open` refused it) is left to that writer."""
        opened = self._fd >= 0
        self._close_file()
        if opened and self._dir_fd >= 0:
            self._drop_meta()  # first, as in commit: never a sidecar without its part
            remove_entry(self._dir_fd, self.name, self.path)
        self._close_dir()

    def close(self) -> None:
        self._close_file()
        self._close_dir()

    def _close_file(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _close_dir(self) -> None:
        if self._dir_fd >= 0:
            fd, self._dir_fd = self._dir_fd, -1
            os.close(fd)


# -- moving and placing whole files under a root (adoption, quarantine, superseded copies) ----------------
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
_FICLONE = 0x40049409  # Linux ioctl: share the source's blocks (btrfs, XFS, ...), copy-on-write


def _split(relpath: str) -> tuple[tuple[str, ...], str]:
    """(folders, name) of a relative path; `..`, `.`, absolute and empty paths are refused (a recorded
    path is untrusted: `..` is a real directory, which O_NOFOLLOW would not stop)."""
    parts = tuple(relpath.split("/"))
    if not relpath or relpath.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise _unsafe(Path(relpath), "it is not a plain relative path inside the folder")
    return parts[:-1], parts[-1]


def free_name(dir_fd: int, name: str) -> str:
    """`name`, or `name.1`, `name.2`, ... : the first that does not exist in `dir_fd` (never a link's
    target: the entry itself is looked at)."""
    candidate, number = name, 0
    while True:
        try:
            os.stat(candidate, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return candidate
        number += 1
        candidate = f"{name}.{number}"


def _copy_fd(source_fd: int, target_fd: int) -> None:
    """The bytes of `source_fd` into `target_fd`: a reflink where the file system can, else a copy."""
    try:
        import fcntl

        fcntl.ioctl(target_fd, _FICLONE, source_fd)
        return
    except (ImportError, OSError):  # no reflinks here (ext4, tmpfs, another file system)
        pass
    os.lseek(source_fd, 0, os.SEEK_SET)
    while block := os.read(source_fd, 1 << 20):
        view = memoryview(block)
        while view:
            view = view[os.write(target_fd, view) :]


def move_under(
    src_root: Path, src_rel: str, dst_root: Path, dst_rel: str, *, keep_source: bool = False
) -> Path:
    """Move (or, with `keep_source`, hard-link or copy) `src_root/src_rel` to a new name at
    `dst_root/dst_rel` (numbered when taken), never following a symlink on either side: both folders
    are walked by descriptor and the entry itself is moved (a symlink moves as a link, its target
    untouched). Across file systems a regular file is copied through descriptors, then removed.

    Returns the destination path. Raises UnsafePathError for a symlinked folder, OSError otherwise.
    """
    src_dirs, src_name = _split(src_rel)
    dst_dirs, dst_name = _split(dst_rel)
    src_fd = walk(src_root, src_dirs, create=False)
    try:
        dst_fd = walk(dst_root, dst_dirs, create=True)
        try:
            name = free_name(dst_fd, dst_name)
            if keep_source:
                try:
                    os.link(src_name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
                except OSError as err:
                    if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                        raise
                    _copy_entry(src_fd, src_name, dst_fd, name)
            else:
                try:
                    os.rename(src_name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
                except OSError as err:
                    if err.errno != errno.EXDEV:
                        raise
                    _copy_entry(src_fd, src_name, dst_fd, name)
                    remove_entry(src_fd, src_name, src_root / src_rel)
            return dst_root.joinpath(*dst_dirs, name)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


def _copy_entry(src_fd: int, src_name: str, dst_fd: int, name: str) -> None:
    source = os.open(src_name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=src_fd)
    try:
        if not stat.S_ISREG(os.fstat(source).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", src_name)
        target = os.open(name, _NEW_FILE_FLAGS, _FILE_MODE, dir_fd=dst_fd)
        try:
            _copy_fd(source, target)
        except BaseException:
            os.close(target)
            remove_entry(dst_fd, name, Path(name))
            raise
        os.close(target)
    finally:
        os.close(source)


def install_copy(
    root: Path, relpath: str, source: Path, check: Callable[[Path], T], *, link: bool = False
) -> T:
    """Place a copy of `source` (a file outside our control: a user's cache) at `root/relpath`: a
    temporary name in the destination folder (walked by descriptor, created with O_EXCL|O_NOFOLLOW),
    filled by a reflink or a copy (`link`: a hard link), `check(path)` run on it through the folder's
    descriptor, then renamed into place. `source` is never changed. Returns what `check` returned;
    whatever `check` raises leaves nothing behind."""
    dirs, name = _split(relpath)
    dir_fd = walk(root, dirs, create=True)
    tmp = f".{name}.adopt-{os.getpid()}.tmp"
    try:
        remove_entry(dir_fd, tmp, root / relpath)  # ours, left by a run killed mid-adoption
        linked = False
        if link:
            try:
                os.link(source, tmp, dst_dir_fd=dir_fd, follow_symlinks=False)
                linked = True
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                    raise
        if not linked:
            source_fd = os.open(source, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
            try:
                target = os.open(tmp, _NEW_FILE_FLAGS, _FILE_MODE, dir_fd=dir_fd)
                try:
                    _copy_fd(source_fd, target)
                finally:
                    os.close(target)
            finally:
                os.close(source_fd)
        result = check(Path(f"/proc/self/fd/{dir_fd}/{tmp}"))
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # replaces a link, never follows it
        return result
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    finally:
        os.close(dir_fd)
