"""`tessmirror archive serve`: prints its TAP URL, answers pyvo, and stops cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import queue
import re
import signal
import threading
import time

import pytest
import pyvo as vo
import requests

from tests.helpers import spawn_cli

_TAP_LINE = re.compile(r"TAP service:\s+(http://127\.0\.0\.1:\d+/\S+)")


def _lines(stream) -> queue.Queue[str | None]:
    """Lines of `stream` as they come (None at EOF), read in a thread so the test can time out."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_for_tap_url(lines: queue.Queue[str | None], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if match := _TAP_LINE.search(line):
            return match.group(1)
    raise AssertionError(f"no TAP URL printed within {timeout} s; stdout so far: {seen}")


def _start(lines_of, process) -> str:
    try:
        return _wait_for_tap_url(lines_of, timeout=60)
    except AssertionError as err:
        if process.poll() is not None:  # it died: its stderr says why
            raise AssertionError(
                f"{err}; exit {process.returncode}; stderr: {process.stderr.read()}"
            ) from None
        raise


@pytest.mark.integration
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_archive_serve_prints_tap_url_answers_and_stops_on_signal(signum):
    process = spawn_cli(
        "archive", "serve", "--port", "0", "--targets", "16", "--sectors", "1", "--file-size", "small"
    )
    try:
        tap_url = _start(_lines(process.stdout), process)
        service = vo.dal.TAPService(tap_url)
        result = service.run_sync(
            "SELECT obs_id, access_url FROM ivoa.obscore WHERE dataproduct_type = 'timeseries'"
        ).to_table()
        assert len(result) > 0
        url = str(result["access_url"][0])
        assert url.startswith(tap_url.split("/vo-tap/")[0])  # files come from the same server
        download = requests.get(url, timeout=10)
        assert download.status_code == 200 and download.content.startswith(b"SIMPLE  =")

        process.send_signal(signum)
        code = process.wait(timeout=10)
        stderr = process.stderr.read() if process.stderr else ""
        assert code == 0, f"exit {code} after {signum.name}; stderr: {stderr}"
        assert "Traceback" not in stderr
        with pytest.raises(requests.ConnectionError):  # and the port is closed
            requests.get(tap_url + "/availability", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
