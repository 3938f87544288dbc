"""Progress for people and for batch logs, and the plan's summary before a download starts.

On a terminal: a tqdm bar (`tqdm.auto` in a notebook) with files, bytes, rate and ETA. Elsewhere
(Slurm, nohup, CI): one plain log line every `interval` seconds, because a bar redrawn into a log file
is unreadable. Until planning ends the total is unknown, and both say so ("planning… N found so far")
instead of showing a percentage of a total that is still growing. Retries are counted (from each
file's `attempts`), and the overload limiter, when attached, tells how often the archive answered
429/503 and whether the connection limit is cut right now.
"""

from __future__ import annotations

import logging
import math
import sys
from collections import Counter
from collections.abc import Iterable
from typing import Protocol, TextIO

from engine.models import Clock, FileResult, FileStatus, PlanItem, SystemClock

log = logging.getLogger(__name__)

PLANNING = "planning…"
REDRAW_SECONDS = 0.5


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # unreachable; keeps type checkers calm


def _retries(n: int) -> str:
    return "1 retry" if n == 1 else f"{n} retries"


def human_seconds(seconds: float) -> str:
    """'45 s', '3.2 min', '2.1 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Limiter(Protocol):
    """What progress reads from the overload policy (`engine.fetch.throttle.AdaptiveLimiter`)."""

    @property
    def limit(self) -> int: ...
    @property
    def ceiling(self) -> int: ...

    overload_events: int
    decreases: int


class Progress:
    """Counts what the run did; draws it as a bar or as periodic log lines.

    Parameters
    ----------
    interval
        Seconds between plain log lines when no bar is drawn.
    stream
        Where the bar goes (default: standard error).
    bar
        Draw a bar (True), log lines (False), or a bar only when `stream` is a terminal (None).
    clock
        The run's clock (tests inject a fake one).
    auto
        Use `tqdm.auto`, which draws a notebook widget inside Jupyter (the Python API).
    """

    def __init__(
        self,
        *,
        interval: float = 30.0,
        stream: TextIO | None = None,
        bar: bool | None = None,
        clock: Clock | None = None,
        auto: bool = False,
    ) -> None:
        self.clock = clock or SystemClock()
        self.stream = stream or sys.stderr
        self.interval = interval
        self.planned = 0
        self.planned_bytes = 0
        self.planning_done = False
        self.skipped = 0
        self.verified = 0
        self.failed = 0
        self.bytes_done = 0
        self.retries = 0  # tries beyond the first, over every finished file
        self.files_retried = 0
        self.limiter: Limiter | None = None
        self.auto_connections = False
        self.started = self.clock.monotonic()
        self.finished: float | None = None
        self._last_line = self.started
        self._last_draw = float("-inf")
        try:
            use_bar = self.stream.isatty() if bar is None else bar
        except (AttributeError, ValueError):  # a closed or odd stream: no bar
            use_bar = False
        self._bar = None
        if use_bar:
            from tqdm import tqdm as tqdm_plain

            tqdm: type[tqdm_plain] = tqdm_plain
            if auto:
                from tqdm.auto import tqdm as tqdm_auto

                tqdm = tqdm_auto
            self._bar = tqdm(
                total=None, unit="file", file=self.stream, dynamic_ncols=True, desc=PLANNING, leave=True
            )

    def attach_limiter(self, limiter: Limiter | None, *, auto: bool = False) -> None:
        """Show the overload policy's connection limit when it is cut, and count its slow-downs.

        With `auto` (`--concurrency auto`) the current number of connections is always shown: the
        tuner moves it, and the user chose not to give one.
        """
        self.limiter = limiter
        self.auto_connections = auto

    # -- events ---------------------------------------------------------------------------------
    def planned_items(self, count: int, nbytes: int) -> None:
        self.planned += count
        self.planned_bytes += max(nbytes, 0)
        self._redraw()

    def plan_complete(self) -> None:
        """The total is known now: the bar gets it (and with it a percentage and an ETA)."""
        self.planning_done = True
        if self._bar is not None:
            self._bar.total = self.planned
            self._bar.set_description_str("mirror", refresh=False)
        self._redraw(force=True)

    def skipped_items(self, count: int) -> None:
        """Files an earlier run already verified: counted as done, no network."""
        self.skipped += count
        if self._bar is not None and count:
            self._bar.update(count)

    def file_done(self, result: FileResult) -> None:
        if result.status is FileStatus.VERIFIED:
            self.verified += 1
            self.bytes_done += result.nbytes
        else:
            self.failed += 1
        extra = max(int(getattr(result, "attempts", 0) or 0) - 1, 0)
        if extra:
            self.retries += extra
            self.files_retried += 1
            log.debug("%s: verified after %d tries", result.item.filename, extra + 1)
        if self._bar is not None:
            # tqdm redraws on update() at most every mininterval: set the text first, draw once.
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.update(1)
        else:
            self.tick()

    def tick(self) -> None:
        """Emit a plain log line when one is due (no-op when drawing a bar)."""
        now = self.clock.monotonic()
        if self._bar is None and now - self._last_line >= self.interval:
            self._last_line = now
            log.info("progress: %s", self.line())

    def _redraw(self, *, force: bool = False) -> None:
        """New text for the bar; drawn at most every REDRAW_SECONDS (a page of 10,000 rows, a file
        a millisecond on a fast link: a terminal write each would cost more than the work)."""
        if self._bar is None:
            return
        if not self.planning_done:
            self._bar.set_description_str(f"{PLANNING} {self.planned} found", refresh=False)
        self._bar.set_postfix_str(self._postfix(), refresh=False)
        now = self.clock.monotonic()
        if force or now - self._last_draw >= REDRAW_SECONDS:
            self._last_draw = now
            self._bar.refresh()

    # -- text -----------------------------------------------------------------------------------
    @property
    def done(self) -> int:
        return self.skipped + self.verified + self.failed

    @property
    def elapsed(self) -> float:
        end = self.finished if self.finished is not None else self.clock.monotonic()
        return max(end - self.started, 1e-9)

    def rate(self) -> float:
        """Mean bytes per second since the start."""
        return self.bytes_done / self.elapsed

    def _rate_text(self) -> str:
        return f"{human_bytes(self.bytes_done)} at {human_bytes(self.rate())}/s"

    def eta(self) -> float | None:
        """Seconds left, from the files per second so far; None while the total is unknown."""
        remaining = self.planned - self.done
        worked = self.verified + self.failed
        if not self.planning_done or not worked or remaining <= 0:
            return None
        return self.elapsed / worked * remaining

    def limit_text(self) -> str:
        """'limit 4/16 connections' while the overload policy has cut the limit; else ''.

        Under `--concurrency auto`: '12 connections (auto)' at any time.
        """
        limiter = self.limiter
        if limiter is None:
            return ""
        try:
            limit, ceiling = int(limiter.limit), int(limiter.ceiling)
        except (AttributeError, TypeError, ValueError):
            return ""
        if self.auto_connections:
            cut = f" of {ceiling} (the archive asked to slow down)" if limit < ceiling else ""
            return f"{limit} connections (auto){cut}"
        return (
            f"limit {limit}/{ceiling} connections (the archive asked to slow down)" if limit < ceiling else ""
        )

    def _postfix(self) -> str:
        parts = [self._rate_text()]
        if self.planning_done and self.planned_bytes:
            done, total = human_bytes(self.bytes_done), human_bytes(self.planned_bytes)
            parts[0] = f"{done}/{total} at {human_bytes(self.rate())}/s"
        if self.retries:
            parts.append(_retries(self.retries))
        limit = self.limit_text()
        if limit:
            parts.append(limit.split(" (")[0])
        return ", ".join(parts)

    def line(self) -> str:
        if self.planning_done:
            total = f"{self.planned}"
            size = f" of {human_bytes(self.planned_bytes)}" if self.planned_bytes else ""
        else:
            total = f"? ({PLANNING} {self.planned} found so far)"
            size = ""
        text = (
            f"{self.done}/{total} files ({self.verified} downloaded, {self.skipped} already done, "
            f"{self.failed} failed), {human_bytes(self.bytes_done)}{size} at {human_bytes(self.rate())}/s"
        )
        eta = self.eta()
        if eta is not None:
            text += f", ETA {human_seconds(eta)}"
        if self.retries:
            text += f", {_retries(self.retries)}"
        limit = self.limit_text()
        if limit:
            text += f", {limit}"
        return text

    def summary_lines(self) -> list[str]:
        """The end-of-run lines about how the transfer went: retries, overload, mean rate."""
        lines = [f"mean rate   {human_bytes(self.rate())}/s over {human_seconds(self.elapsed)}"]
        retry = f"retries     {self.retries}"
        if self.retries:
            retry += f" (on {self.files_retried} files)"
        limiter = self.limiter
        if limiter is not None:
            events = int(getattr(limiter, "overload_events", 0))
            cuts = int(getattr(limiter, "decreases", 0))
            retry += f"; 429/503 answers {events}, slow-downs {cuts}"
        lines.append(retry)
        return lines

    def close(self) -> None:
        if self.finished is None:
            self.finished = self.clock.monotonic()
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class PlanSummary:
    """What a plan holds, counted page by page: files, bytes, and counts by product and sector.

    `lines()` is what `tessmirror plan` and `run --dry-run` print on standard error, so the size of a
    download is known before it starts.
    """

    def __init__(self) -> None:
        self.files = 0
        self.nbytes = 0
        self.estimated = 0  # files whose size is ObsCore's kB estimate, not an exact byte count
        self.unknown = 0  # files with no size declared at all
        self.by_product: Counter[str] = Counter()
        self.by_sector: Counter[int] = Counter()

    def add(self, page: Iterable[PlanItem]) -> None:
        for item in page:
            self.files += 1
            if item.size >= 0:
                self.nbytes += item.size
            elif item.est_kb >= 0:
                self.nbytes += item.est_kb * 1024
                self.estimated += 1
            else:
                self.unknown += 1
            self.by_product[item.product or "?"] += 1
            self.by_sector[item.sector] += 1

    def lines(self, *, guard_line: str = "") -> list[str]:
        """The summary, one fact a line; `guard_line`: `PlanGuard.summary_line()` (rows dropped, why)."""
        size = human_bytes(self.nbytes)
        if self.estimated:
            size += f" (with {self.estimated} sizes estimated from access_estsize)"
        lines = [f"files       {self.files}", f"bytes       {size}"]
        if self.unknown:
            lines.append(f"            {self.unknown} files declare no size and are not counted")
        if self.by_product:
            lines.append("products    " + ", ".join(f"{p} {n}" for p, n in sorted(self.by_product.items())))
        if self.by_sector:
            lines.append("sectors     " + _sector_counts(self.by_sector))
        if guard_line:
            lines.append(guard_line)
        return lines


def _sector_counts(counts: Counter[int], shown: int = 30) -> str:
    items = sorted(counts.items())
    text = ", ".join(f"s{s:04d} {n}" if s >= 0 else f"unknown {n}" for s, n in items[:shown])
    if len(items) > shown:
        text += f", ... ({len(items) - shown} more sectors)"
    return text


def free_space_verdict(needed: int, free: int, where: object) -> tuple[bool, str]:
    """(fits, one line) comparing the bytes a plan needs with the free space at `where`."""
    if free >= (1 << 62) or math.isinf(free):
        return True, f"free space  unknown on {where} (the filesystem does not tell)"
    if needed <= free:
        return (
            True,
            f"free space  {human_bytes(free)} free on {where}; the plan needs {human_bytes(needed)}: fits",
        )
    return False, (
        f"free space  {human_bytes(free)} free on {where}; the plan needs {human_bytes(needed)}: "
        "does NOT fit (a run would stop; free space, narrow the selection, or --force)"
    )
