"""The one aiohttp session a run shares: pooled keep-alive connections, an idle timeout, the token.

Timeouts: never a total one (a slow but healthy 2 GB transfer must not die at 300 s, parfive #77).
`sock_connect` bounds opening a connection and `sock_read` is the *idle* timeout: no byte for that
long ends the try. `connect` is left unset because it also counts the wait for a free pooled
connection, which is ordinary queueing here, not a fault.

The token travels as ``Authorization: token <token>`` only to the archive's own hosts, and only over
https (or to a loopback address, for the local archive, when no proxy other than a loopback one
would see the plain-text request). A client middleware adds it per request, so every redirect hop
is judged on its own: a redirect to a third-party host never sees it.

Site proxies and certificates, as pyvo (through requests) honours them for planning:
``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` (aiohttp's ``trust_env``; https goes through the proxy
with CONNECT, so the proxy never sees the token), and a CA bundle from ``REQUESTS_CA_BUNDLE`` or
``SSL_CERT_FILE`` (a file or a folder of certificates) for the TLS checks.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import unicodedata
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

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
        if host in allowed and (request.url.scheme == "https" or _plain_http_stays_local(request, host)):
            request.headers["Authorization"] = value
        else:
            request.headers.popall("Authorization", None)
        return await handler(request)

    return add_token


def _plain_http_stays_local(request: aiohttp.ClientRequest, host: str) -> bool:
    """Plain http carries the token only between loopback addresses: to a loopback host, directly or
    through a proxy that is itself on loopback (a remote proxy would read the header)."""
    if not _is_loopback(host):
        return False
    proxy = getattr(request, "proxy", None)
    return proxy is None or _is_loopback((proxy.host or "").lower())


# The CA bundle variables, in the order they are read: requests' own (what pyvo uses for planning)
# first, so planning and downloads trust the same certificates, then OpenSSL's.
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")


def ssl_context(environ: Mapping[str, str] | None = None) -> ssl.SSLContext | None:
    """A TLS context trusting the site's CA bundle named by REQUESTS_CA_BUNDLE or SSL_CERT_FILE.

    Parameters
    ----------
    environ
        Where to look (default: `os.environ`).

    Returns
    -------
    ssl.SSLContext or None
        A verifying context loaded from the bundle (a PEM file, or a folder of hashed certificates);
        None when neither variable is set, and the system's defaults apply.

    Raises
    ------
    ConfigError
        When the variable names a file or folder that cannot be read as certificates; the message
        names the variable and the path.
    """
    env = os.environ if environ is None else environ
    for name in CA_BUNDLE_VARIABLES:
        value = env.get(name, "").strip()
        if not value:
            continue
        path = Path(value).expanduser()
        try:
            # The bundle alone, as requests trusts it for planning; given a bundle, the context
            # skips loading the system's store (OpenSSL parses a few hundred certificates there).
            if path.is_dir():
                return ssl.create_default_context(capath=str(path))
            return ssl.create_default_context(cafile=str(path))
        except (OSError, ssl.SSLError) as err:
            reason = getattr(err, "strerror", None) or str(err)
            raise ConfigError(
                name,
                f"cannot load the CA bundle {str(path)!r} named by {name}: {reason}",
                hint=f"point {name} at a readable PEM file of certificates, or unset it",
            ) from None
    return None


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


def env_has_proxy_or_netrc() -> bool:
    """Whether the environment names a proxy (``*_PROXY``) or a netrc file exists (``NETRC``, else
    ``~/.netrc``): what aiohttp's ``trust_env`` would look up for every request."""
    if urllib.request.getproxies():
        return True
    path = os.environ.get("NETRC")
    if path is None:
        try:
            path = str(Path.home() / ".netrc")
        except RuntimeError:  # no home directory to look in
            return False
    return os.path.exists(path)


def open_session(
    settings: FetchSettings, *, token: str | None = None, token_hosts: Iterable[str] | None = None
) -> aiohttp.ClientSession:
    """Open the run's shared session. Call from inside the running event loop; close it when done.

    `token_hosts`: the hosts that may receive the token (default: the MAST host). The session
    honours HTTPS_PROXY/HTTP_PROXY/NO_PROXY and the CA bundle of REQUESTS_CA_BUNDLE/SSL_CERT_FILE
    (see the module docstring); a bundle that cannot be loaded raises ConfigError naming it.
    """
    context = ssl_context()
    connector = aiohttp.TCPConnector(
        # Under --concurrency auto the pool is sized for the cap; the tuner's limiter decides how
        # many of those connections are in use.
        limit=settings.connections,
        limit_per_host=settings.per_host or settings.connections,
        ttl_dns_cache=DNS_CACHE_SECONDS,
        keepalive_timeout=KEEPALIVE_SECONDS,
        ssl=context if context is not None else True,
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
        # aiohttp pauses a connection once 2 x read_bufsize bytes wait unread; at its 64 KiB default a
        # single 256 KiB socket read pauses and resumes the transport (two epoll_ctl calls) for every
        # block. A block's worth keeps a fast transfer flowing; memory stays 2 blocks per connection.
        read_bufsize=max(settings.chunk_size, 64 * 1024),
        middlewares=middlewares,
        raise_for_status=False,
        # HTTP(S)_PROXY and NO_PROXY, as requests honours them for planning (and ~/.netrc, whose
        # Authorization the token middleware replaces or removes per host). Only when there is
        # something to trust: aiohttp re-reads both in two thread hops per request, which cost a
        # mirror of small files more than its FITS checks.
        trust_env=env_has_proxy_or_netrc(),
    )
