"""The Python entry points, for notebooks and scripts.

    >>> from engine import mirror
    >>> results = mirror(sector=1, camera=1, ccd=2, out_dir="tess-s1")   # blocking
    >>> results = await mirror_async(config="tessmirror.toml")             # in a running event loop

Both return an astropy Table with one row per planned file (`status`, `path`, `nbytes`, `error`, ...).
`results.meta` carries the counts and the `exit_code`; failures are rows, not exceptions, so one bad
file never hides the others. Problems with the whole run (bad input, an unreachable TAP service, a
full disk) raise `engine.exceptions.TessMirrorError` subclasses.

Signals belong to the caller (a notebook's kernel, a script): the API installs no handlers. An
interrupt stops the run cleanly: `mirror()` turns Ctrl-C (or a notebook's "interrupt kernel") into a
cancellation of the run, which abandons the transfers in flight (they stay `.part`), flushes the
manifest, releases the lock, and then raises KeyboardInterrupt; cancelling the task that awaits
`mirror_async()` does the same and raises CancelledError. Call again to resume.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from astropy.table import Table

from engine.config import load_settings
from engine.manager import MirrorRun, PlanSource, RunOutcome
from engine.progress import Progress
from engine.settings import Settings

# Friendly keyword names -> dotted configuration keys (the same names as the CLI flags).
KEYWORDS: dict[str, str] = {
    "tap_url": "tap.url",
    "sector": "selection.sector",
    "camera": "selection.cameras",
    "cameras": "selection.cameras",
    "ccd": "selection.ccds",
    "ccds": "selection.ccds",
    "polygon": "selection.polygon",
    "cone": "selection.cone",
    "targets_file": "selection.targets_file",
    "urls_file": "selection.urls_file",
    "sectors": "selection.sectors",
    "products": "selection.products",
    "out_dir": "output.out_dir",
    "layout": "output.layout",
    "state_dir": "output.state_dir",
    "concurrency": "fetch.concurrency",
    "per_host": "fetch.per_host",
    "retries": "fetch.retries",
    "idle_timeout": "fetch.idle_timeout",
    "bandwidth_limit": "fetch.bandwidth_limit",
    "verify": "verify.level",
    "force": "run.force",
    "recheck": "run.recheck",
    "refresh_plan": "run.refresh_plan",
}


def build_settings(config: str | Path | None = None, **kwargs: Any) -> Settings:
    overrides: dict[str, object] = {}
    for name, value in kwargs.items():
        key = KEYWORDS.get(name, name)
        if isinstance(value, int) and key in ("selection.cameras", "selection.ccds"):
            value = [value]
        overrides[key] = value
    return load_settings(Path(config) if config else None, overrides)


def outcome_table(outcome: RunOutcome) -> Table:
    table = outcome.results
    table.meta.update(
        {
            "planned": outcome.planned,
            "downloaded": outcome.downloaded,
            "skipped": outcome.skipped,
            "failed": outcome.failed,
            "pending": outcome.pending,
            "bytes": outcome.nbytes,
            "interrupted": outcome.interrupted,
            "exit_code": outcome.exit_code,
        }
    )
    return table


async def mirror_async(
    config: str | Path | None = None,
    *,
    settings: Settings | None = None,
    source: PlanSource | None = None,
    progress: Progress | None = None,
    **kwargs: Any,
) -> Table:
    """Plan and download; returns the results table. See the module docstring."""
    settings = settings or build_settings(config, **kwargs)
    outcome = await MirrorRun(settings, source, progress=progress, handle_signals=False).run()
    return outcome_table(outcome)


def mirror(config: str | Path | None = None, **kwargs: Any) -> Table:
    """Blocking form of `mirror_async`, for scripts and notebooks without a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(mirror_async(config, **kwargs))
    raise RuntimeError("mirror() was called inside a running event loop; use `await mirror_async(...)`")
