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
import os
import unicodedata
from collections.abc import Iterable, Mapping

import aiohttp
from yarl import URL

from engine.exceptions import ConfigError
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


def _flaw(token: str) -> str | None:
    """What is wrong with a token's characters (never quoting it), or None."""
    if token != token.rstrip("\r\n"):
        ending = "a carriage return (\\r)" if "\r" in token[len(token.rstrip("\r\n")) :] else "a newline"
        return f"ends in {ending}"
    if token != token.strip():
        return "starts or ends with whitespace"
    for position, char in enumerate(token, start=1):
        if char.isspace() or unicodedata.category(char).startswith("C"):
            return f"holds a space or control character (U+{ord(char):04X}) at character {position}"
    return None


def read_token(env_name: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The archive token from the environment variable `env_name` (`fetch.token_env`), or None.

    Parameters
    ----------
    env_name
        The variable's name; None or "" means no token is used.
    environ
        Where to look (default: `os.environ`).

    Returns
    -------
    str or None
        The token, registered with `engine.redact` so it never reaches a log; None when the variable
        is unset or empty.

    Raises
    ------
    ConfigError
        ("fetch.token_env") when the value carries a newline, carriage return, surrounding whitespace
        or a control character: an HTTP header cannot carry it, and every file would fail. The
        message names the variable, never its value.
    """
    if not env_name:
        return None
    token = (os.environ if environ is None else environ).get(env_name)
    if not token:
        return None
    flaw = _flaw(token)
    if flaw is not None:
        register_secret(token.strip())  # whatever happens next, the token itself is never shown
        if flaw.startswith("ends in"):
            hint = f"strip the newline: export {env_name}=$(tr -d '\\r\\n' < token.txt)"
        else:
            hint = f"set it to the token alone: export {env_name}=$(tr -d '[:space:][:cntrl:]' < token.txt)"
        raise ConfigError(
            "fetch.token_env", f"the token in the environment variable {env_name} {flaw}", hint=hint
        )
    register_secret(token)
    return token


def open_session(
    settings: FetchSettings, *, token: str | None = None, token_hosts: Iterable[str] | None = None
) -> aiohttp.ClientSession:
    """Open the run's shared session. Call from inside the running event loop; close it when done.

    `token_hosts`: the hosts that may receive the token (default: the MAST host).
    """
    connector = aiohttp.TCPConnector(
        limit=settings.concurrency,
        limit_per_host=settings.per_host or settings.concurrency,
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
