"""Streaming checks on a download: byte count, md5 and a sniff of the first bytes, fed chunk by chunk.

`StreamCheck` never re-reads the file: the md5 is updated as the bytes go by, and one object lives
across the tries of one download, so a resumed transfer keeps its running hash.

Size rules (checked by `finish`):

* the body length equals the total the server announced (Content-Length, or the total of a
  Content-Range), when it announced one;
* it equals `item.size` when the archive declared an exact size (CAOM `contentLength`, binding);
* when only ObsCore's `access_estsize` (rounded kB, an *estimate*) is known, the body may be anything
  up to `estimate_ceiling(est_kb)` = max(2 x est_kb x 1024, est_kb x 1024 + 1 MiB) bytes. A body
  within the ceiling that differs from the estimate by more than
  ``fetch.est_size_tolerance x bytes + 1024`` is kept when its md5/FITS checks pass: `off_estimate`
  tells the caller to log a warning. `est_size_tolerance` controls only that warning.

The cap (`limit`) is the smallest of: the exact size, the estimate's ceiling, the total the server
announced, and `max_file_size` when the row declares no size at all (a URL list). `expect_total`
refuses a Content-Length above the cap before any body byte is read; a body without one is refused
as soon as it runs past the cap, so a hostile server cannot fill the disk.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import PurePosixPath

from engine.exceptions import ChecksumMismatchError, NotFitsError, SizeMismatchError
from engine.models import PlanItem, VerifyLevel
from engine.verify.fits import FITS_SIGNATURE, check_whole_blocks

# What each kind of product must start with. Files of other kinds only get the markup check.
_SIGNATURES: dict[str, bytes] = {
    ".fits": FITS_SIGNATURE,
    ".fit": FITS_SIGNATURE,
    ".fts": FITS_SIGNATURE,
    ".pdf": b"%PDF-",
    ".gz": b"\x1f\x8b",
}
# An error page is HTML, XML or JSON: refuse any body that starts like one, whatever the product.
_MARKUP_STARTS = (b"<", b"{", b"[")
_SNIFF_BYTES = 16  # enough for every signature and for the markup check past leading whitespace
NO_LIMIT = sys.maxsize
MIB = 1024 * 1024
DEFAULT_MAX_FILE_SIZE = 4 * 1024**3  # fetch.max_file_size's default


def product_suffix(item: PlanItem) -> str:
    """The lowercase extension of the item's file name (or of its URL path when the name is unknown)."""
    name = item.filename or PurePosixPath(item.url.split("?", 1)[0]).name
    return PurePosixPath(name.lower()).suffix


def is_fits_item(item: PlanItem) -> bool:
    return _SIGNATURES.get(product_suffix(item)) == FITS_SIGNATURE


def estimate_ceiling(est_kb: int) -> int:
    """The most bytes a file whose `access_estsize` is `est_kb` may have.

    ``max(2 * est_kb * 1024, est_kb * 1024 + 1 MiB)``: twice the estimate leaves room for estimates
    that are stale or rounded, the extra MiB for small files (a 0 kB estimate still admits 1 MiB),
    and it still stops a runaway body long before it fills a disk.
    """
    estimate = max(est_kb, 0) * 1024
    return max(2 * estimate, estimate + MIB)


def off_estimate(nbytes: int, est_kb: int, tolerance: float) -> bool:
    """True when `nbytes` is farther from the estimate than ``tolerance * nbytes + 1024`` (the kB
    rounding): worth a warning, never a refusal."""
    return est_kb >= 0 and abs(nbytes - est_kb * 1024) > tolerance * nbytes + 1024


def sniff_prefix(item: PlanItem, prefix: bytes, *, complete: bool) -> bool:
    """Decide whether `prefix` (the first bytes of the body) can start `item`'s file.

    Returns False while more bytes are needed; raises NotFitsError on a refusal. `complete` says the
    body has ended, so a prefix shorter than the signature is final.
    """
    name = item.filename or item.url
    stripped = prefix.lstrip()
    if stripped.startswith(_MARKUP_STARTS):
        raise NotFitsError(
            f"{name}: the server sent a web page or JSON document ({prefix[:_SNIFF_BYTES]!r}...) "
            "instead of the file",
            hint="the archive may be down or refusing the request; try again later",
        )
    signature = _SIGNATURES.get(product_suffix(item))
    needed = len(signature) if signature else 1
    if len(prefix) < needed and not complete:
        return False
    if not prefix:
        raise NotFitsError(f"{name}: the server sent an empty body", hint="try again later")
    if signature and not prefix.startswith(signature):
        raise NotFitsError(
            f"{name}: the body starts with {prefix[:_SNIFF_BYTES]!r}, not {signature!r}: "
            "not the file the archive lists",
            hint="the archive may be serving an error page; try again later",
        )
    return True


class StreamCheck:
    """Count, hash and sniff a body as it streams; `finish()` applies the size/md5/FITS-block rules.

    Not thread-safe: one download feeds it from one place at a time (the Downloader feeds it from a
    worker thread, one block after another).
    """

    __slots__ = (
        "_hasher",
        "_limit",
        "_max_file_size",
        "_prefix",
        "_tolerance",
        "item",
        "level",
        "nbytes",
        "off_estimate",
        "sniffed",
        "total",
    )

    def __init__(
        self,
        item: PlanItem,
        level: VerifyLevel,
        *,
        est_tolerance: float = 0.05,
        max_file_size: int = DEFAULT_MAX_FILE_SIZE,
    ) -> None:
        self.item = item
        self.level = VerifyLevel.parse(level)
        self._tolerance = est_tolerance
        self._max_file_size = max_file_size
        self.off_estimate = False  # set by finish(): the body is far from the estimate (warn only)
        self.nbytes = 0
        self.total: int | None = None  # the total the server announced for this body
        self.sniffed = False
        self._prefix = b""
        # md5 is the costliest step of the hot loop: skip it when nothing will use it (level SIZE).
        self._hasher = hashlib.md5(usedforsecurity=False) if self.level >= VerifyLevel.CHECKSUM else None
        self._limit = self._declared_limit()

    # -- setup -------------------------------------------------------------------------------------
    def _declared_limit(self) -> int:
        """The cap before any server header: the exact size, else the estimate's ceiling, else
        max_file_size. Never NO_LIMIT: a row without any size is still bounded."""
        if self.item.size >= 0:
            return self.item.size
        if self.item.est_kb >= 0:
            return estimate_ceiling(self.item.est_kb)
        return self._max_file_size

    @property
    def limit(self) -> int:
        """Bytes past which the body is refused: the smallest of every size known so far."""
        return self._limit

    @property
    def checksum_declared(self) -> bool:
        """The archive declared an md5 and this level checks it."""
        return bool(self.item.md5) and self.level >= VerifyLevel.CHECKSUM

    def expect_total(self, total: int | None) -> None:
        """Record the body length the server announced; refuse it at once (before any body byte) if it
        contradicts the archive's exact size or exceeds the cap. The cap becomes `total`."""
        if total is None:
            return
        if self.item.size >= 0 and total != self.item.size:
            raise SizeMismatchError(
                f"{self.item.filename}: the server announces {total} bytes but the archive declares "
                f"{self.item.size}",
                hint="the file may have been reprocessed; re-plan with --refresh-plan",
            )
        cap = self._declared_limit()
        if total > cap:
            raise SizeMismatchError(
                f"{self.item.filename}: the server announces {total} bytes, more than the {cap} bytes "
                f"{self._cap_source()} allows; refused before the body",
                hint=self._cap_hint(),
            )
        self.total = total
        self._limit = total

    def _cap_source(self) -> str:
        if self.item.size >= 0:
            return "the declared size"
        if self.item.est_kb >= 0:
            return f"the estimate of {self.item.est_kb} kB"
        return "fetch.max_file_size"

    def _cap_hint(self) -> str:
        if self.item.size < 0 and self.item.est_kb < 0:
            return "raise fetch.max_file_size if files this large are expected"
        return "the archive's size disagrees with what it serves; try again later"

    def reset(self) -> None:
        """Forget every byte seen: the next body starts from zero."""
        self.nbytes = 0
        self.total = None
        self._limit = self._declared_limit()
        self.sniffed = False
        self._prefix = b""
        if self._hasher is not None:
            self._hasher = hashlib.md5(usedforsecurity=False)

    # -- the hot path ------------------------------------------------------------------------------
    def sniff(self, chunk: bytes | memoryview) -> None:
        """Look at the first bytes of the body (cheap; a no-op once decided). Raises NotFitsError."""
        if self.sniffed:
            return
        self._prefix += bytes(chunk[: _SNIFF_BYTES - len(self._prefix)])
        self.sniffed = sniff_prefix(self.item, self._prefix, complete=False)

    def feed(self, chunk: bytes | memoryview) -> None:
        """Take the next bytes of the body (in order, after any earlier ones)."""
        if not self.sniffed:
            self.sniff(chunk)
        self.nbytes += len(chunk)
        if self.nbytes > self._limit:
            raise self._too_long()
        if self._hasher is not None:
            self._hasher.update(chunk)

    def _too_long(self) -> SizeMismatchError:
        source = "the server announced" if self.total is not None else self._cap_source()
        return SizeMismatchError(
            f"{self.item.filename}: the body runs past {self._limit} bytes, the most {source} "
            "allows; refused",
            hint=self._cap_hint(),
        )

    def check_running_length(self, received: int) -> None:
        """Raise at once if `received` bytes already overrun the cap (called before buffering)."""
        if received > self._limit:
            raise self._too_long()

    # -- the end -----------------------------------------------------------------------------------
    def finish(self) -> tuple[int, str]:
        """Apply the size, md5 and FITS-block rules to the whole body; return (nbytes, md5 hex or "").

        The server's announced length reaches the check through `expect_total`, before the body.
        """
        if not self.sniffed:
            self.sniffed = sniff_prefix(self.item, self._prefix, complete=True)
        name = self.item.filename or self.item.url
        check_size(name, self.nbytes, total=self.total, item=self.item, tolerance=self._tolerance)
        self.off_estimate = self.item.size < 0 and off_estimate(
            self.nbytes, self.item.est_kb, self._tolerance
        )
        md5 = self._hasher.hexdigest() if self._hasher is not None else ""
        if self.checksum_declared and md5 != self.item.md5.lower():
            raise ChecksumMismatchError(
                f"{name}: md5 {md5} does not match the archive's {self.item.md5}",
                hint="the copy was corrupted in transit or the archive changed it; it will be fetched again",
            )
        if self.level >= VerifyLevel.FITS and is_fits_item(self.item):
            check_whole_blocks(name, self.nbytes, hint="the transfer was cut short; it will be fetched again")
        return self.nbytes, md5


def check_size(name: str, nbytes: int, *, total: int | None, item: PlanItem, tolerance: float = 0.0) -> None:
    """The size rules of this module's docstring; raises SizeMismatchError.

    `tolerance` is accepted for callers of the earlier rule; an estimate only bounds the size by its
    ceiling now (see `off_estimate` for the warning).
    """
    if total is not None and nbytes != total:
        raise SizeMismatchError(
            f"{name}: received {nbytes} bytes but the server announced {total}",
            hint="the transfer was cut short; it will be fetched again",
        )
    if item.size >= 0:
        if nbytes != item.size:
            raise SizeMismatchError(
                f"{name}: {nbytes} bytes but the archive declares {item.size}",
                hint="the transfer was cut short or the archive changed the file",
            )
    elif item.est_kb >= 0 and nbytes > estimate_ceiling(item.est_kb):
        raise SizeMismatchError(
            f"{name}: {nbytes} bytes is more than the {estimate_ceiling(item.est_kb)} bytes the "
            f"archive's estimate of {item.est_kb} kB allows",
            hint="the archive's estimate disagrees with what it serves; try again later",
        )
