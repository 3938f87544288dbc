"""Site proxies: downloads go through HTTP_PROXY as planning does (requests honours it for pyvo).

A small forwarding HTTP proxy runs on 127.0.0.1 in the test (asyncio, absolute-form requests, one
request a connection) and counts what it forwards. The run's URLs name a port on 127.0.0.1 where
nothing listens: only the proxy knows that this "host" is the local archive, so every file that
arrives came through the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from engine.manifest import Manifest
from tests.helpers import assert_mirror_matches_truth, lc_names_in_footprint, run_cli

pytestmark = pytest.mark.integration

TOKEN = "proxy-test-token-6f1c2b"  # a test value, searched for in what the proxy saw


@dataclass
class Seen:
    """One request the proxy forwarded."""

    method: str
    url: str
    authorized: bool


@dataclass
class ForwardingProxy:
    """An HTTP proxy on 127.0.0.1: `routes` maps the requested "host:port" to the real one."""

    routes: dict[str, tuple[str, int]]
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
            lines = head.decode("latin-1").split("\r\n")
            method, target, _version = lines[0].split(" ", 2)
            headers = [line for line in lines[1:] if line]
            parts = urlsplit(target)  # a proxy gets the absolute form of the URL, host and port included
            authorized = any(h.lower().startswith("authorization:") for h in headers)
            self.seen.append(Seen(method, target, authorized))
            upstream = self.routes.get(parts.netloc)
            if upstream is None:
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*upstream), timeout=30)
            kept = [
                h
                for h in headers
                if h.split(":", 1)[0].strip().lower() not in ("connection", "proxy-connection", "host")
            ]
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            request = [f"{method} {path} HTTP/1.1", f"Host: {upstream[0]}:{upstream[1]}", *kept]
            up_writer.write(("\r\n".join([*request, "Connection: close", "", ""])).encode("latin-1"))
            await up_writer.drain()
            while chunk := await asyncio.wait_for(up_reader.read(1 << 16), timeout=60):
                writer.write(chunk)
                await writer.drain()
            up_writer.close()
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                writer.close()

    @contextlib.contextmanager
    def running(self) -> Iterator[ForwardingProxy]:
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        holder: dict[str, asyncio.AbstractServer] = {}

        async def start() -> None:
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            holder["server"] = server
            self.port = server.sockets[0].getsockname()[1]
            ready.set()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(start())
            loop.run_forever()

        thread = threading.Thread(target=serve, name="test-proxy", daemon=True)
        thread.start()
        assert ready.wait(30), "the proxy did not start"
        try:
            yield self
        finally:

            async def stop() -> None:
                holder["server"].close()

            asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
            loop.close()


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port on 127.0.0.1 that is bound but never listens: a direct connection is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def _proxy_env(proxy: ForwardingProxy) -> dict[str, str]:
    address = f"http://127.0.0.1:{proxy.port}"
    # NO_PROXY empty: loopback is not exempt here, so 127.0.0.1 goes through the proxy as any host.
    return {"HTTP_PROXY": address, "http_proxy": address, "NO_PROXY": "", "no_proxy": ""}


def _url_list(tmp_path: Path, port: int, names: set[str]) -> Path:
    path = tmp_path / "urls.txt"
    lines = [
        f"http://127.0.0.1:{port}/api/v0.1/Download/file?uri=mast:TESS/product/{n}" for n in sorted(names)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_every_file_request_goes_through_the_site_proxy(archive, tmp_path, dead_port):
    arc = archive(targets=40)
    names = lc_names_in_footprint(arc, 1, 1, 2)
    assert len(names) >= 3
    urls = _url_list(tmp_path, dead_port, names)
    out = tmp_path / "mirror"
    real = urlsplit(arc.base_url)
    proxy = ForwardingProxy(routes={f"127.0.0.1:{dead_port}": (real.hostname, real.port)})
    with proxy.running():
        env = {**_proxy_env(proxy), "MAST_API_TOKEN": TOKEN}
        proc = run_cli("fetch", "--input", urls, "--out", out, "--layout", "flat", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_mirror_matches_truth(out, arc, names)
    fetched = {urlsplit(s.url).query.rsplit("/", 1)[-1] for s in proxy.seen if s.method == "GET"}
    assert fetched >= names, f"not through the proxy: {sorted(names - fetched)[:5]}"
    assert all(f"127.0.0.1:{dead_port}" in s.url for s in proxy.seen)
    # 127.0.0.1 is not one of the token's hosts here (no --tap-url on it): no request carried it.
    assert not any(s.authorized for s in proxy.seen)
    assert TOKEN not in proc.stderr


def test_without_the_proxy_the_same_run_cannot_reach_the_archive(archive, tmp_path, dead_port):
    """The control: the URLs really are unreachable directly, so the first test proves the proxy."""
    arc = archive(targets=40)
    names = sorted(lc_names_in_footprint(arc, 1, 1, 2))[:2]
    urls = _url_list(tmp_path, dead_port, set(names))
    out = tmp_path / "mirror"
    env = {"HTTP_PROXY": "", "http_proxy": "", "NO_PROXY": "", "no_proxy": ""}
    proc = run_cli("fetch", "--input", urls, "--out", out, "--retries", "0", env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    entries = Manifest(out / ".tessmirror").load()
    assert {e.status for e in entries.values()} == {"failed"}


def test_the_token_reaches_its_loopback_host_through_a_loopback_proxy_only_for_that_host(
    archive, tmp_path, dead_port
):
    """With the TAP host on the token's list, its file requests carry the token through the proxy (a
    loopback proxy, plain http on loopback only); nothing else does."""
    arc = archive(targets=40)
    names = lc_names_in_footprint(arc, 1, 1, 2)
    urls = _url_list(tmp_path, dead_port, names)
    real = urlsplit(arc.base_url)
    proxy = ForwardingProxy(routes={f"127.0.0.1:{dead_port}": (real.hostname, real.port)})
    config = tmp_path / "tessmirror.toml"  # the TAP URL names the token's host; fetch plans nothing
    config.write_text(f'[tap]\nurl = "http://127.0.0.1:{dead_port}/vo-tap/api/v0.1/caom"\n', encoding="utf-8")
    with proxy.running():
        env = {**_proxy_env(proxy), "MAST_API_TOKEN": TOKEN}
        proc = run_cli("--config", config, "fetch", "--input", urls, "--out", tmp_path / "m", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gets = [s for s in proxy.seen if s.method == "GET"]
    assert gets and all(s.authorized for s in gets)
    assert TOKEN not in proc.stderr


# -- certificates and the token's rule, without a network ---------------------------------------
def test_a_site_ca_bundle_from_requests_ca_bundle_or_ssl_cert_file_is_loaded(tmp_path):
    import certifi

    from engine.fetch.session import ssl_context

    assert ssl_context({}) is None  # nothing set: the system's defaults
    for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        context = ssl_context({name: certifi.where()})
        assert context is not None and context.cert_store_stats()["x509_ca"] > 0
        assert context.verify_mode.name == "CERT_REQUIRED"


def test_a_ca_bundle_that_cannot_be_read_is_bad_input_naming_the_variable(tmp_path):
    from engine.exceptions import ConfigError
    from engine.fetch.session import ssl_context

    with pytest.raises(ConfigError) as info:
        ssl_context({"SSL_CERT_FILE": str(tmp_path / "missing.pem")})
    assert info.value.key == "SSL_CERT_FILE" and "missing.pem" in info.value.message
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="REQUESTS_CA_BUNDLE"):
        ssl_context({"REQUESTS_CA_BUNDLE": str(bogus)})


@pytest.mark.parametrize(
    ("url", "proxy", "sent"),
    [
        ("http://127.0.0.1:9/f", None, True),  # the local archive, directly
        ("http://127.0.0.1:9/f", "http://127.0.0.1:3128", True),  # through a proxy on loopback
        ("http://127.0.0.1:9/f", "http://proxy.example.org:3128", False),  # a remote proxy would read it
        ("https://mast.stsci.edu/f", "http://proxy.example.org:3128", True),  # CONNECT: a tunnel
        ("https://elsewhere.example.org/f", None, False),  # not the token's host
    ],
)
def test_the_token_goes_in_plain_text_only_between_loopback_addresses(url, proxy, sent):
    from types import SimpleNamespace

    from multidict import CIMultiDict
    from yarl import URL

    from engine.fetch.session import token_middleware

    middleware = token_middleware(TOKEN, ["127.0.0.1", "mast.stsci.edu"])
    request = SimpleNamespace(
        url=URL(url), proxy=URL(proxy) if proxy else None, headers=CIMultiDict(Authorization="stale")
    )

    async def handler(req):
        return req.headers.get("Authorization")

    header = asyncio.run(middleware(request, handler))
    assert (header == f"token {TOKEN}") is sent
    if not sent:
        assert header is None
