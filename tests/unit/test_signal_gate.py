"""The CLI's signal gate: a stop request is never lost between start-up and the run's event loop."""

from __future__ import annotations

import asyncio
import signal

from engine.cli import _SignalGate


def test_a_signal_whose_exception_was_swallowed_before_the_loop_still_stops_the_run():
    """A SIGTERM during start-up raises _Stopped; if some library swallowed it, the request must not
    vanish: the gate stops the run as soon as the loop takes requests."""
    gate = _SignalGate()
    gate.received = signal.SIGTERM  # the handler ran; its exception went nowhere

    async def run() -> bool:
        stopped = asyncio.Event()
        with gate.deliver_to(asyncio.get_running_loop(), stopped.set):
            await asyncio.wait_for(stopped.wait(), timeout=10)
        return stopped.is_set()

    assert asyncio.run(run())
    assert gate.exit_code == 130


def test_a_second_signal_while_the_loop_runs_asks_again_and_keeps_the_first_exit_code():
    gate = _SignalGate()
    calls: list[int] = []

    async def run() -> None:
        with gate.deliver_to(asyncio.get_running_loop(), lambda: calls.append(1)):
            gate._handle(signal.SIGHUP, None)
            gate._handle(signal.SIGTERM, None)
            await asyncio.sleep(0)  # let the loop run the requested stops
            await asyncio.sleep(0)

    asyncio.run(run())
    assert len(calls) == 2  # stopping twice is harmless; losing the request is not
    assert gate.exit_code == 129 and gate.name == "SIGHUP"
