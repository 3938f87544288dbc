"""A silent or broken TAP service never hangs the CLI: exit 3, one line naming the service.

Each case puts a small HTTP server on 127.0.0.1 (a free port) in front of the local archive's TAP
service. It forwards every request, except the one it was told to spoil: that one is never answered,
or answered with half a VOTable before the connection is closed. The silent case answers nothing at
all. A config file sets a small `tap.request_timeout` and few retries, so each case is bounded; the
subprocess timeout is the "never a hang" check.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.exceptions import EXIT_ARCHIVE
from tests.helpers import run_cli

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT = 1.0
SELECTION = ("--sector", 1, "--camera", 1, "--ccd", 2)
# Decides what happens to one request: "forward", "hang" or "half" (half the answer, then close).
Rule = Callable[[str, str], str]


def write_config(directory: Path) -> Path:
    path = directory / "tessmirror.toml"
    path.write_text(
        f"[tap]\nrequest_timeout = {REQUEST_TIMEOUT}\npoll_timeout = 2.0\njob_timeout = 20.0\nretries = 1\n"
    )
    return path


@contextlib.contextmanager
def tap_in_front_of(upstream: str | None, rule: Rule) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 that applies `rule` to each request, forwarding to `upstream`
    (the archive's TAP base URL) where the rule says "forward". With `upstream=None` it accepts
    connections and never answers anything. Yields the base URL that stands for the TAP service."""
    release = threading.Event()
    target = urllib.parse.urlsplit(upstream) if upstream else None

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def handle(self) -> None:
            if target is None:
                release.wait()  # the connection was accepted; not a byte will come back
                return
            with contextlib.suppress(ConnectionError):  # the client gave up on us: as intended
                super().handle()

        def log_message(self, *args: object) -> None:  # quiet: the test output is the CLI's
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            action = rule(self.command, self.path)
            if action == "hang":
                release.wait()
                self.close_connection = True
                return
            assert target is not None and target.hostname and target.port
            upstream_conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            upstream_conn.request(self.command, self.path, body=body or None, headers=headers)
            answer = upstream_conn.getresponse()
            payload = answer.read().replace(upstream_base.encode(), own_base.encode())
            upstream_conn.close()
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() in ("content-length", "transfer-encoding", "connection", "date", "server"):
                    continue
                self.send_header(name, value.replace(upstream_base, own_base))
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if action == "half":
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(payload)

        do_GET = do_POST = do_DELETE = _serve

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    own_base = f"http://127.0.0.1:{server.server_address[1]}"
    upstream_base = f"{target.scheme}://{target.netloc}" if target else ""
    path = target.path if target else "/caom"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield own_base + path
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join()


def plan_against(url: str, tmp_path: Path):
    return run_cli(
        "plan",
        *SELECTION,
        "--config",
        write_config(tmp_path),
        "--tap-url",
        url,
        timeout=120,  # far above the bounded worst case: reaching it means a hang
    )


def assert_one_line_naming(result, url: str, *phrases: str) -> str:
    assert result.returncode == EXIT_ARCHIVE, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("tessmirror: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert url in errors[0], errors[0]
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    # `plan` streams: the ECSV header may be out before planning fails, but no row of a plan.
    assert ".fits" not in result.stdout, "no plan row may be printed when planning failed"
    return errors[0]


def test_a_service_that_accepts_connections_and_never_answers(tmp_path: Path) -> None:
    with tap_in_front_of(None, lambda method, path: "hang") as url:
        result = plan_against(url, tmp_path)
    assert_one_line_naming(result, url, f"did not answer within {REQUEST_TIMEOUT:g} s")


def test_a_service_that_answers_capabilities_then_hangs_on_job_submission(archive, tmp_path: Path) -> None:
    arch = archive()
    submitted: list[str] = []

    def rule(method: str, path: str) -> str:
        if method == "POST" and path.rstrip("/").endswith("/async"):
            submitted.append(path)
            return "hang"
        return "forward"

    with tap_in_front_of(arch.tap_url, rule) as url:
        result = plan_against(url, tmp_path)
    assert_one_line_naming(result, url, f"did not answer within {REQUEST_TIMEOUT:g} s", "submitting a job")
    assert len(submitted) >= 2, "the submission was not tried again"
    assert not arch.request_log, "no file may be fetched when planning failed"


def test_a_service_that_sends_half_a_votable_then_closes(archive, tmp_path: Path) -> None:
    arch = archive()
    spoiled: list[str] = []

    def rule(method: str, path: str) -> str:
        if method == "GET" and "/results/" in path:
            spoiled.append(path)
            return "half"
        return "forward"

    with tap_in_front_of(arch.tap_url, rule) as url:
        result = plan_against(url, tmp_path)
    assert_one_line_naming(result, url, "broken answer", "fetching the result")
    assert len(spoiled) >= 2, "the broken result was not fetched again"
