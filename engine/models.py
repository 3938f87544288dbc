"""The values that flow through the pipeline: plan items in, file results out.

This module sits at the bottom of the import graph; everything may import it, it imports nothing of
the engine.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from dataclasses import dataclass, field
from typing import Protocol


class VerifyLevel(enum.IntEnum):
    """How hard a file is checked before it counts as complete. Each level includes the ones below.

    This enum is the registry of levels: the config, the CLI's choices and help, the manifest and
    `engine.verify` all read the names and what each level checks from here. A new level is a
    member plus its line in `_LEVEL_CHECKS`, and its check in `engine.verify`.
    """

    SIZE = 1
    CHECKSUM = 2
    FITS = 3

    @classmethod
    def parse(cls, value: str | VerifyLevel) -> VerifyLevel:
        """The level named `value` (any case, surrounding space ignored); ValueError naming the choices."""
        if isinstance(value, VerifyLevel):
            return value
        try:
            return cls[str(value).strip().upper()]
        except KeyError:
            raise ValueError(
                f"unknown verification level {value!r}; use one of: {', '.join(cls.names())}"
            ) from None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every level's name, weakest first: ``("size", "checksum", "fits")``."""
        return tuple(str(level) for level in cls)

    @classmethod
    def describe(cls) -> str:
        """One line for help texts: each level and what it adds to the one below."""
        return "; ".join(f"{level}: {_LEVEL_CHECKS[level]}" for level in cls)

    def __str__(self) -> str:
        return self.name.lower()


# What each level adds to the ones below it (one line each, for help texts and docs).
_LEVEL_CHECKS: dict[VerifyLevel, str] = {
    VerifyLevel.SIZE: "the byte count and a sniff of the first bytes",
    VerifyLevel.CHECKSUM: "+ the archive's md5",
    VerifyLevel.FITS: "+ whole FITS blocks, HDU structure and CHECKSUM/DATASUM",
}


class FileStatus(str, enum.Enum):
    VERIFIED = "verified"  # downloaded (this run or an earlier one) and verified
    FAILED = "failed"  # gave up; `error` says why
    PENDING = "pending"  # planned, not attempted (e.g. the run was interrupted)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class PlanItem:
    """One file the archive offers. Every field came from the archive and is untrusted."""

    url: str
    filename: str  # the archive's file name, e.g. tess2018206045859-s0001-...-s_lc.fits
    obs_id: str = ""
    product: str = ""  # "lc", "tp", "dvt", ... ("" when unknown)
    sector: int = -1  # -1 when unknown
    size: int = -1  # exact bytes (caomartifact.contentLength); -1 when not declared
    est_kb: int = -1  # ObsCore access_estsize, in kB; -1 when not declared
    md5: str = ""  # lowercase hex (from contentChecksum 'md5:<hex>'); "" when not declared
    target_name: str = ""
    s_ra: float = math.nan  # the observation's ObsCore position, degrees (NaN when unknown)
    s_dec: float = math.nan


# Column order of a plan table (astropy Table / ECSV); one column per PlanItem field.
PLAN_COLUMNS: tuple[str, ...] = PlanItem.__slots__


@dataclass(slots=True)
class FileResult:
    """What happened to one PlanItem."""

    item: PlanItem
    status: FileStatus
    path: str = ""  # relative to the output directory, POSIX separators
    nbytes: int = 0
    md5: str = ""  # computed while streaming ("" if not computed)
    level: VerifyLevel | None = None  # the level it was verified at
    checksum_declared: bool = False  # the archive declared an md5 and it matched
    error: str = ""  # the reason, for FAILED; already redacted
    attempts: int = 0
    elapsed: float = 0.0
    finished_at: float = field(default_factory=time.time)
    origin: str = ""  # how a VERIFIED file came to be: "downloaded", "adopted" ("" when not said)
    source: str = ""  # which source served the bytes ("mast", "s3"; "" when not said)
    note: str = ""  # why not the chosen source, e.g. a fallback to MAST ("" when none)


class Clock(Protocol):
    """Time, passed in so tests can replace it."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def is_number(text: str) -> bool:
    """Whether `float()` accepts `text` (so ``"1e3"``, ``" 2 "``, ``"nan"`` and ``"inf"`` do).

    Parameters
    ----------
    text : str
        A word from a config value, an STC-S region or an ADQL argument.
    """
    try:
        float(text)
    except ValueError:
        return False
    return True
