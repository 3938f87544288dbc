"""`--concurrency auto`: the setting, the meter the Downloader feeds, and what progress shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import load_settings
from engine.exceptions import ConfigError
from engine.fetch.download import Downloader
from engine.fetch.throttle import AdaptiveLimiter
from engine.models import FileStatus
from engine.progress import Progress
from engine.settings import AUTO, FetchSettings
from tests.unit.test_fetch_download import FITS_BYTES, FakeClock, TinyArchive, item_for, run


class RecordingMeter:
    def __init__(self) -> None:
        self.bytes = 0
        self.first_bytes: list[float] = []

    def add_bytes(self, n: int) -> None:
        self.bytes += n

    def add_first_byte(self, seconds: float) -> None:
        self.first_bytes.append(seconds)


@pytest.mark.parametrize("given", ["auto", "AUTO", " auto "])
def test_concurrency_auto_is_read_from_config_or_flags_in_any_case(given: str) -> None:
    settings = load_settings(None, {"fetch.concurrency": given}, require_selection=False)
    assert settings.fetch.concurrency == AUTO and settings.fetch.auto_concurrency
    assert settings.fetch.connections == settings.fetch.max_connections == 32


def test_a_number_fixes_the_concurrency_and_the_connections() -> None:
    settings = load_settings(None, {"fetch.concurrency": "12"}, require_selection=False)
    assert settings.fetch.concurrency == 12 and not settings.fetch.auto_concurrency
    assert settings.fetch.connections == 12


def test_max_connections_caps_auto_and_is_checked_against_its_range() -> None:
    settings = load_settings(
        None, {"fetch.concurrency": "auto", "fetch.max_connections": 6}, require_selection=False
    )
    assert settings.fetch.connections == 6
    with pytest.raises(ConfigError, match=r"fetch.max_connections.*0 is outside 1\.\.256"):
        load_settings(None, {"fetch.max_connections": 0}, require_selection=False)


@pytest.mark.parametrize("bad", ["some", "1.5", "8 connections"])
def test_a_concurrency_neither_number_nor_auto_names_the_key_and_both_forms(bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"fetch.concurrency": bad}, require_selection=False)
    assert caught.value.key == "fetch.concurrency"
    assert f"expected a number or 'auto', got {bad!r}" in str(caught.value)


def test_progress_shows_the_current_connections_under_auto_and_the_cut_after_overload() -> None:
    limiter = AdaptiveLimiter(32)
    progress = Progress(interval=60)
    progress.attach_limiter(limiter, auto=True)
    limiter.retarget(12)
    assert progress.limit_text() == "12 connections (auto)"
    assert "12 connections (auto)" in progress.line()
    limiter.on_overload(None)
    assert progress.limit_text() == "6 connections (auto) of 12 (the archive asked to slow down)"


def test_a_fixed_concurrency_shows_the_limit_only_when_overload_cut_it() -> None:
    limiter = AdaptiveLimiter(8)
    progress = Progress(interval=60)
    progress.attach_limiter(limiter)
    assert progress.limit_text() == ""
    limiter.on_overload(None)
    assert progress.limit_text().startswith("limit 4/8 connections")


def test_the_downloader_reports_body_bytes_and_times_to_first_byte_to_its_meter(tmp_path: Path) -> None:
    meter = RecordingMeter()

    async def scenario(archive: TinyArchive, downloader: Downloader, clock: FakeClock) -> None:
        for n in range(3):
            name = f"f{n}_lc.fits"
            archive.files[name] = FITS_BYTES
            result = await downloader.fetch(item_for(archive, name, FITS_BYTES), tmp_path / name, name)
            assert result.status is FileStatus.VERIFIED, result.error

    run(scenario, meter=meter)
    assert meter.bytes == 3 * len(FITS_BYTES)
    assert len(meter.first_bytes) == 3 and all(t >= 0 for t in meter.first_bytes)


def test_fetch_settings_default_stays_a_fixed_modest_number() -> None:
    assert FetchSettings().concurrency == 8 and FetchSettings().connections == 8
