"""Every error tessmirror raises on purpose, in one hierarchy.

Lower-level errors (aiohttp, pyvo, OSError, astropy) are translated into these at the boundary of the
module that meets them, so callers and the CLI only ever handle what is drawn here::

    TessMirrorError                 exit_code  meaning
    ├── UsageError                  2          the user's input is wrong; the message says how to fix it
    │   ├── ConfigError                        a bad TOML file, key or value (names the key)
    │   └── EmptySelectionError                the selection matched no files
    ├── ArchiveError                3          the archive (TAP service) failed us
    │   ├── TapUnavailableError                does not answer, or is not a TAP service
    │   ├── TapJobError                        a job ended in ERROR/ABORTED, or answered garbage
    │   ├── TapTimeoutError                    a job stayed QUEUED/EXECUTING past its deadline
    │   └── IncompletePlanError                a result overflowed and could not be split further
    ├── LocalError                  4          this machine refused: disk, permissions, locks
    │   ├── DiskFullError
    │   ├── PermissionDeniedError
    │   ├── RunLockedError                     another run holds the output directory
    │   └── ManifestError                      the manifest cannot be read or written
    ├── TransferError               1          one file failed; recorded, never fatal to the run
    │   ├── HTTPStatusError                    carries .status and .retryable
    │   ├── IdleTimeoutError                   no bytes arrived for `idle_timeout` seconds
    │   ├── ConnectionLostError                reset, refused, or cut mid-body
    │   ├── UnsafeRedirectError                a redirect to another scheme, or too many
    │   ├── DestinationBusyError               another download is writing the same file (never retried)
    │   └── IntegrityError                     the bytes are not what the archive declared
    │       ├── SizeMismatchError
    │       ├── ChecksumMismatchError
    │       └── NotFitsError                   HTML error page, truncated FITS, bad HDU checksum
    └── UnsafePathError             1          an archive-supplied name would escape the output folder

A run stopped by SIGINT/SIGTERM exits with `EXIT_INTERRUPTED` (130); that is not an error of this
tree, since nothing failed.

`local_error_from_oserror` is the one translation of an OSError met on a local file into this tree
(disk full, permission denied, anything else), so every module names the path and the verb the same way;
`os_errors(path, verb)` is the same translation as a context manager around the file operations
(httpx's `map_httpcore_exceptions` is the model): ``with os_errors(plan, "write the plan"): ...``.

Every error carries a `hint` (how to fix it, where that is known). Messages must never contain a
token: build them from values that went through `engine.redact`.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:  # typing.Unpack is 3.11+; the annotations are never evaluated at run time
    from typing_extensions import Unpack

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_ARCHIVE = 3
EXIT_LOCAL = 4
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 70  # a bug in tessmirror (EX_SOFTWARE); never used for bad input


class TessMirrorError(Exception):
    """Base class. `str(err)` is the message a user sees; `hint` says what to do about it."""

    exit_code = EXIT_PARTIAL

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


# -- the user's input ---------------------------------------------------------------------------
class UsageError(TessMirrorError):
    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A bad configuration value. `key` is the dotted TOML key (or CLI flag) at fault."""

    def __init__(self, key: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"{key}: {message}", hint=hint)
        self.key = key


class EmptySelectionError(UsageError):
    pass


# -- the archive --------------------------------------------------------------------------------
class ArchiveError(TessMirrorError):
    exit_code = EXIT_ARCHIVE


class TapUnavailableError(ArchiveError):
    pass


class TapJobError(ArchiveError):
    """A TAP job that failed. `query_fault` is True when the query itself is at fault (syntax, an
    unknown column, refused with HTTP 400/422): the same query fails again, so it is never retried.
    None where the raiser could not tell."""

    query_fault: bool | None = None


class TapTimeoutError(ArchiveError):
    pass


class IncompletePlanError(ArchiveError):
    pass


# -- this machine -------------------------------------------------------------------------------
class LocalError(TessMirrorError):
    exit_code = EXIT_LOCAL

    def __init__(self, message: str, *, path: object = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path


class DiskFullError(LocalError):
    pass


class PermissionDeniedError(LocalError):
    pass


class RunLockedError(LocalError):
    pass


class ManifestError(LocalError):
    pass


# -- one file -----------------------------------------------------------------------------------
class TransferError(TessMirrorError):
    """A per-file failure. `retryable` tells the retry policy whether another try can help."""

    exit_code = EXIT_PARTIAL
    retryable = True


class HTTPStatusError(TransferError):
    def __init__(
        self, status: int, message: str, *, retry_after: float | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:  # type: ignore[override]  # computed here; a class attribute above
        return self.status in (408, 425, 429) or self.status >= 500


class IdleTimeoutError(TransferError):
    pass


class ConnectionLostError(TransferError):
    pass


class UnsafeRedirectError(TransferError):
    retryable = False


class DestinationBusyError(TransferError):
    """Another download holds the lock on this file's part: a second try would meet the same lock."""

    retryable = False


class IntegrityError(TransferError):
    """The body is not the file the archive declared. Retryable: a fresh copy may be right."""


class SizeMismatchError(IntegrityError):
    pass


class ChecksumMismatchError(IntegrityError):
    pass


class NotFitsError(IntegrityError):
    pass


class UnsafePathError(TessMirrorError):
    """An archive-supplied name that would land outside the output directory. Never retried."""

    exit_code = EXIT_PARTIAL
    retryable = False


# -- OSError -> LocalError --------------------------------------------------------------------------
# errno -> (class, message template, hint). One table, so a full disk reads the same everywhere.
_DISK_FULL_HINT = "free some space (or raise the quota) and run again; the manifest resumes the run"
_PERMISSION_HINT = "make the directory writable by this user, or choose another --out / --state-dir"
_READ_ONLY_HINT = "the filesystem is mounted read-only: choose a writable --out / --state-dir"
_OSERROR_TABLE: dict[int, tuple[type[LocalError], str, str]] = {
    errno.ENOSPC: (DiskFullError, "no space left on the device to {doing} {path}", _DISK_FULL_HINT),
    errno.EDQUOT: (DiskFullError, "disk quota exceeded to {doing} {path}", _DISK_FULL_HINT),
    errno.EACCES: (PermissionDeniedError, "permission denied to {doing} {path}", _PERMISSION_HINT),
    errno.EPERM: (PermissionDeniedError, "operation not permitted to {doing} {path}", _PERMISSION_HINT),
    errno.EROFS: (PermissionDeniedError, "cannot {doing} {path}: read-only file system", _READ_ONLY_HINT),
}


class OsErrorOptions(TypedDict, total=False):
    """How `local_error_from_oserror` and `os_errors` word an error; every key is optional.

    default
        The class for an errno the table does not know (`LocalError`; e.g. `ManifestError`).
    hint
        The hint for such an errno; the table's own hints are used for the errnos it knows.
    key
        The setting that chose the path (e.g. ``"output.out_dir"``), named after the path.
    permission_hint
        Replaces the table's hint for a PermissionDeniedError: who should run the command differs
        between a reader (``tessmirror verify``) and a writer, a full disk's fix does not.
    """

    default: type[LocalError]
    hint: str | None
    key: str | None
    permission_hint: str | None


def local_error_from_oserror(
    err: OSError, path: object, doing: str, **options: Unpack[OsErrorOptions]
) -> LocalError:
    """Translate an OSError met while `doing` something to `path` into the LocalError it means.

    Parameters
    ----------
    err
        The OSError as raised.
    path
        The file or directory being worked on; named in the message and kept as ``.path``.
    doing
        A verb phrase that fits "cannot {doing} {path}", e.g. "write", "create", "read".
    **options
        `OsErrorOptions`: the class and hint for an unknown errno, the setting's key, the hint for
        a permission error.

    Returns
    -------
    LocalError
        A DiskFullError, PermissionDeniedError or ``options["default"]``; raise it ``from err``.
    """
    shown = str(path) if isinstance(path, (str, Path)) else repr(path)
    if options.get("key"):
        shown = f"{shown} ({options['key']})"
    known = _OSERROR_TABLE.get(err.errno or -1)
    if known is not None:
        cls, template, table_hint = known
        permission_hint = options.get("permission_hint") if cls is PermissionDeniedError else None
        hint = table_hint if permission_hint is None else permission_hint
        return cls(template.format(doing=doing, path=shown), path=path, hint=hint)
    reason = err.strerror or str(err) or type(err).__name__
    default = options.get("default", LocalError)
    return default(f"cannot {doing} {shown}: {reason}", path=path, hint=options.get("hint"))


@contextlib.contextmanager
def os_errors(path: object, doing: str, **options: Unpack[OsErrorOptions]) -> Iterator[None]:
    """Raise any OSError of the block as the LocalError `local_error_from_oserror` makes of it.

    The OSError stays attached as ``__cause__``. Other exceptions pass through untouched, and so
    does a LocalError raised inside the block (it is not an OSError).

    Parameters
    ----------
    path, doing, **options
        As for `local_error_from_oserror`.

    Examples
    --------
    ``with os_errors(plan, "write the plan"): plan.write_text(rows)`` on a full disk raises
    ``DiskFullError("no space left on the device to write the plan <plan>")``.
    """
    try:
        yield
    except OSError as err:
        raise local_error_from_oserror(err, path, doing, **options) from err
