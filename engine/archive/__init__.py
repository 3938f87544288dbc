"""Local MAST-shaped archive: CAOM TAP service, file server and fault injection, on 127.0.0.1.

Entry points: `LocalArchive` / `ArchiveOptions` (async; `ArchiveOptions.mast_like()` for the real
service's shape, see docs/MAST_MODEL.md), `ArchiveThread` (a background thread), `serve_forever`
(the CLI; its flags are in `engine.archive.cli_options`), `FaultPlan` (what to break). The engine
never imports this package except from the CLI.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.archive.faults import FaultPlan
    from engine.archive.server import ArchiveOptions, ArchiveThread, LocalArchive, serve_forever

__all__ = ["ArchiveOptions", "ArchiveThread", "FaultPlan", "LocalArchive", "serve_forever"]

# Loaded on first use, so `engine.archive.cli_options` (imported when the CLI builds its parser)
# does not pull in aiohttp, numpy and astropy.
_HOMES = {
    "FaultPlan": "engine.archive.faults",
    "ArchiveOptions": "engine.archive.server",
    "ArchiveThread": "engine.archive.server",
    "LocalArchive": "engine.archive.server",
    "serve_forever": "engine.archive.server",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'engine.archive' has no attribute {name!r}")
    return getattr(import_module(home), name)
