"""Shared fixtures. `archive` starts the local MAST-shaped archive in a background thread."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from engine.archive import ArchiveOptions, ArchiveThread, LocalArchive

# Small and fast unless a test asks otherwise: one sector, a few dozen files, small files.
# Every test archive has MAST's many FFI exposures per CCD (fewer than the default 300, to build fast):
# a planner that took one footprint row per CCD for granted fails everywhere, not in one test.
ARCHIVE_TEST_DEFAULTS = {"sectors": (1,), "targets": 32, "file_size": "small", "exposures_per_ccd": 24}


@pytest.fixture
def archive() -> Iterator[Callable[..., LocalArchive]]:
    """Factory: `archive(**ArchiveOptions fields)` starts a LocalArchive on 127.0.0.1 (free port) in a
    thread with its own loop and returns it; every archive started is stopped after the test."""
    running: list[ArchiveThread] = []

    def start(**options: object) -> LocalArchive:
        thread = ArchiveThread(ArchiveOptions(**{**ARCHIVE_TEST_DEFAULTS, **options}))  # type: ignore[arg-type]
        running.append(thread)
        return thread.start()

    yield start
    for thread in running:
        thread.stop()
