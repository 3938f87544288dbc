"""Progress for people and for batch logs.

On a terminal: a tqdm bar with files, bytes, rate and ETA. Elsewhere (Slurm, nohup, CI): one plain
log line every `interval` seconds, because a bar redrawn into a log file is unreadable.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from engine.models import Clock, FileResult, FileStatus, SystemClock

log = logging.getLogger("tessmirror")


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # unreachable; keeps type checkers calm


class Progress:
    """Counts what the run did; draws it as a bar or as periodic log lines."""

    def __init__(
        self,
        *,
        interval: float = 30.0,
        stream: TextIO | None = None,
        bar: bool | None = None,
        clock: Clock | None = None,
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
        self.started = self.clock.monotonic()
        self._last_line = self.started
        use_bar = self.stream.isatty() if bar is None else bar
        self._bar = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=None, unit="file", file=self.stream, dynamic_ncols=True, desc="mirror", leave=True
            )

    # -- events ---------------------------------------------------------------------------------
    def planned_items(self, count: int, nbytes: int) -> None:
        self.planned += count
        self.planned_bytes += max(nbytes, 0)
        if self._bar is not None:
            self._bar.total = self.planned
            self._bar.refresh()

    def plan_complete(self) -> None:
        self.planning_done = True

    def skipped_items(self, count: int) -> None:
        """Files an earlier run already verified: counted as done, no network."""
        self.skipped += count
        if self._bar is not None:
            self._bar.update(count)

    def file_done(self, result: FileResult) -> None:
        if result.status is FileStatus.VERIFIED:
            self.verified += 1
            self.bytes_done += result.nbytes
        else:
            self.failed += 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(self._rate_text(), refresh=False)
        else:
            self.tick()

    def tick(self) -> None:
        """Emit a plain log line when one is due (no-op when drawing a bar)."""
        now = self.clock.monotonic()
        if self._bar is None and now - self._last_line >= self.interval:
            self._last_line = now
            log.info("progress: %s", self.line())

    # -- text -----------------------------------------------------------------------------------
    @property
    def done(self) -> int:
        return self.skipped + self.verified + self.failed

    def _rate_text(self) -> str:
        elapsed = max(self.clock.monotonic() - self.started, 1e-9)
        return f"{human_bytes(self.bytes_done)} at {human_bytes(self.bytes_done / elapsed)}/s"

    def line(self) -> str:
        total = f"{self.planned}" if self.planning_done else f"{self.planned}+ (planning)"
        text = (
            f"{self.done}/{total} files ({self.verified} downloaded, {self.skipped} already done, "
            f"{self.failed} failed), {self._rate_text()}"
        )
        elapsed = self.clock.monotonic() - self.started
        remaining = self.planned - self.done
        if self.planning_done and self.verified and remaining > 0:
            eta = elapsed / max(self.verified + self.failed, 1) * remaining
            text += f", ETA {eta / 60:.1f} min"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
