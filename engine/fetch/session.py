"""The one aiohttp session a run shares: pooled keep-alive connections, an idle timeout, the token.

Timeouts: never a total one (a slow but healthy 2 GB transfer must not die at 300 s, parfive #77).
`sock_connect` bounds opening a connection and `sock_read` is the *idle* timeout: no byte for that
long ends the try. `connect` is left unset because it also counts the wait for a free pooled
connection, which is ordinary queueing here, not a fault.

The token travels as ``Authorization: token <token>`` only to the archive's own hosts, and only over
https (or to a loopback address, for the local archive). A client middleware adds it per request,
so every redirect hop is judged on its own: a redirect to a third-party host never sees it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import aiohttp
from yarl import URL

from engine.redact import register_secret
from engine.settings import MAST_TAP_URL, FetchSettings

DEFAULT_TOKEN_HOSTS: tuple[str, ...] = (URL(MAST_TAP_URL).host or "mast.stsci.edu",)
DNS_CACHE_SECONDS = 300
KEEPALIVE_SECONDS = 30.0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def token_middleware(token: str, hosts: Iterable[str]) -> aiohttp.ClientMiddlewareType:
    """A client middleware that sends `token` to `hosts` only (https, or loopback over http)."""
    allowed = frozenset(host.lower() for host in hosts)
    value = f"token {token}"

    async def add_token(
        request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        host = (request.url.host or "").lower()
        if host in allowed and (request.url.scheme == "https" or _is_loopback(host)):
            request.headers["Authorization"] = value
        else:
            request.headers.popall("Authorization", None)
        return await handler(request)

    return add_token


def open_session(
    settings: FetchSettings, *, token: str | None = None, token_hosts: Iterable[str] | None = None
) -> aiohttp.ClientSession:
    """Open the run's shared session. Call from inside the running event loop; close it when done.

    `token_hosts`: the hosts that may receive the token (default: the MAST host).
    """
    connector = aiohttp.TCPConnector(
        limit=settings.concurrency,
        limit_per_host=settings.per_host,
        ttl_dns_cache=DNS_CACHE_SECONDS,
        keepalive_timeout=KEEPALIVE_SECONDS,
    )
    timeout = aiohttp.ClientTimeout(
        total=None, connect=None, sock_connect=settings.connect_timeout, sock_read=settings.idle_timeout
    )
    middlewares: tuple[aiohttp.ClientMiddlewareType, ...] = ()
    if token:
        register_secret(token)
        middlewares = (token_middleware(token, token_hosts or DEFAULT_TOKEN_HOSTS),)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        # identity: the bytes on disk must be the bytes the archive's size and md5 describe.
        headers={"User-Agent": settings.user_agent, "Accept-Encoding": "identity"},
        auto_decompress=False,
        middlewares=middlewares,
        raise_for_status=False,
    )
