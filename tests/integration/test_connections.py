"""How many connections a run opens to the one host its files come from, counted at the server."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from astropy.io import fits

from tests.helpers import file_server, run_cli

pytestmark = pytest.mark.integration

FILES = 40


def small_fits() -> bytes:
    buffer = io.BytesIO()
    fits.PrimaryHDU(np.arange(100, dtype=np.int16)).writeto(buffer, checksum=True)
    return buffer.getvalue()


@dataclass
class Census:
    """What the server saw: the most requests in flight at once, and every client socket."""

    in_flight: int = 0
    most_in_flight: int = 0
    peers: set[tuple[str, int]] = field(default_factory=set)


@contextmanager
def counting_server(body: bytes, *, hold_until: int) -> Iterator[tuple[str, Census]]:
    """A file server on 127.0.0.1 (free port) that holds each request until `hold_until` requests are
    in flight at once (or 20 s pass), so the count reached is the client's real parallelism."""
    census = Census()
    crowd = asyncio.Event()  # bound to the server's loop at its first wait

    async def handler(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            census.peers.add((peer[0], peer[1]))
        census.in_flight += 1
        census.most_in_flight = max(census.most_in_flight, census.in_flight)
        if census.in_flight >= hold_until:
            crowd.set()
        try:
            await asyncio.wait_for(crowd.wait(), timeout=20)
        except asyncio.TimeoutError:
            pass  # the client never reached the count: let it finish, the assertion tells
        finally:
            census.in_flight -= 1
        return web.Response(body=body, content_type="application/fits")

    with file_server(handler) as base:
        yield base, census


@pytest.mark.parametrize("concurrency", [4, 16])
def test_per_host_follows_concurrency_when_not_set(tmp_path: Path, concurrency: int) -> None:
    """--concurrency N opens N connections to the single host the files come from (it used to stop
    at a per-host default of 8)."""
    with counting_server(small_fits(), hold_until=concurrency) as (base, census):
        urls = tmp_path / "urls.txt"
        urls.write_text("".join(f"{base}/files/f{i:03d}.fits\n" for i in range(FILES)))
        result = run_cli(
            "fetch", "--input", urls, "--out", tmp_path / "out", "--concurrency", concurrency, timeout=180
        )
    assert result.returncode == 0, result.stderr[-2000:]
    assert census.most_in_flight == concurrency
    assert len(list((tmp_path / "out").rglob("*.fits"))) == FILES


def test_an_explicit_per_host_caps_the_connections_to_one_host(tmp_path: Path) -> None:
    with counting_server(small_fits(), hold_until=3) as (base, census):
        urls = tmp_path / "urls.txt"
        urls.write_text("".join(f"{base}/files/f{i:03d}.fits\n" for i in range(12)))
        result = run_cli(
            "fetch",
            "--input",
            urls,
            "--out",
            tmp_path / "out",
            "--concurrency",
            8,
            "--per-host",
            3,
            timeout=180,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    assert census.most_in_flight == 3


def test_concurrency_auto_never_opens_more_than_max_connections(tmp_path: Path) -> None:
    """--concurrency auto starts at min(8, cap) and never passes --max-connections; the run says so."""
    with counting_server(small_fits(), hold_until=5) as (base, census):
        urls = tmp_path / "urls.txt"
        urls.write_text("".join(f"{base}/files/f{i:03d}.fits\n" for i in range(FILES)))
        result = run_cli(
            "fetch",
            "--input",
            urls,
            "--out",
            tmp_path / "out",
            "--concurrency",
            "auto",
            "--max-connections",
            5,
            "--log-level",
            "INFO",
            timeout=180,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    assert census.most_in_flight == 5  # started at the cap (below 8), and never above it
    assert len(list((tmp_path / "out").rglob("*.fits"))) == FILES
    assert "concurrency auto: starting at 5 connections, at most 5" in result.stderr
    assert "(concurrency auto, at most 5," in result.stderr  # the start banner
    assert "concurrency auto: 5 connections at the end" in result.stderr
