"""The session trusts the environment (proxies, ~/.netrc) only when it names something to trust."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine.fetch.session import env_has_proxy_or_netrc, open_session
from engine.settings import FetchSettings

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


@pytest.fixture
def bare_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No proxy variables, no NETRC, and a home folder without a .netrc."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_nothing_to_trust_without_a_proxy_or_a_netrc(bare_env: Path) -> None:
    assert env_has_proxy_or_netrc() is False


def test_a_proxy_variable_is_trusted(bare_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    assert env_has_proxy_or_netrc() is True


def test_a_netrc_in_the_home_folder_is_trusted(bare_env: Path) -> None:
    (bare_env / ".netrc").write_text("machine example.org login user password secret\n")
    assert env_has_proxy_or_netrc() is True


def test_a_netrc_named_by_the_netrc_variable_is_trusted(
    bare_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    named = bare_env / "elsewhere.netrc"
    monkeypatch.setenv("NETRC", str(named))
    assert env_has_proxy_or_netrc() is False  # named but missing: nothing to read
    named.write_text("machine example.org login user password secret\n")
    assert env_has_proxy_or_netrc() is True


def test_the_session_trusts_the_environment_only_when_it_has_something(
    bare_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def trusted() -> bool:
        async with open_session(FetchSettings()) as session:
            return session.trust_env

    assert asyncio.run(trusted()) is False
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:3128")
    assert asyncio.run(trusted()) is True
