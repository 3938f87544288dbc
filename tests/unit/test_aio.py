"""The event loop's own errors (outside any task) reach the user as one line, never a traceback."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from engine.aio import new_event_loop


class _FailingProtocol(asyncio.Protocol):
    def __init__(self, lost: asyncio.Future[None]) -> None:
        self.lost = lost

    def data_received(self, data: bytes) -> None:
        raise MemoryError

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


def test_a_memory_error_in_a_transport_read_is_logged_as_one_line_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = new_event_loop()
    ours, theirs = socket.socketpair()

    async def main() -> None:
        lost: asyncio.Future[None] = loop.create_future()
        await loop.create_connection(lambda: _FailingProtocol(lost), sock=ours)
        theirs.sendall(b"x")
        await asyncio.wait_for(lost, 10)  # the transport is closed after the failed read

    try:
        with caplog.at_level(logging.INFO):
            loop.run_until_complete(main())
    finally:
        theirs.close()
        loop.close()

    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) == 1
    assert "MemoryError" in records[0].getMessage()
    assert records[0].exc_info is None and "\n" not in records[0].getMessage()


def test_the_cli_hooks_turn_thread_and_finalizer_errors_into_one_line_each(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc
    import sys
    import threading

    from engine.aio import quiet_process_hooks

    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after the test
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    quiet_process_hooks()

    def fail() -> None:
        raise RuntimeError("disk went away")

    class Finalizer:
        def __del__(self) -> None:
            raise MemoryError

    with caplog.at_level(logging.INFO):
        thread = threading.Thread(target=fail, name="io-7")
        thread.start()
        thread.join()
        Finalizer()
        gc.collect()

    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "thread io-7 stopped: RuntimeError: disk went away" in lines
    assert any(line.startswith("ignored in") and line.endswith("MemoryError") for line in lines)
    assert all(r.exc_info is None for r in caplog.records if r.levelno >= logging.WARNING)
