"""Local MAST-shaped archive: CAOM TAP service, file server and fault injection, on 127.0.0.1.

Entry points: `LocalArchive` / `ArchiveOptions` (async; `ArchiveOptions.mast_like()` for the real
service's shape, see docs/MAST_MODEL.md), `ArchiveThread` (a background thread), `serve_forever`
(the CLI; its flags are in `engine.archive.cli_options`), `FaultPlan` (what to break). The engine
never imports this package except from the CLI.
"""

from engine.archive.faults import FaultPlan
from engine.archive.server import ArchiveOptions, ArchiveThread, LocalArchive, serve_forever

__all__ = ["ArchiveOptions", "ArchiveThread", "FaultPlan", "LocalArchive", "serve_forever"]
