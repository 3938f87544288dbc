"""TAP failures: each ends in retries (where another try can help), then a clear message and exit 3.

The real CLI runs against the local archive with TAP faults switched on. Deadlines and retries come
from a TOML config, so every case is bounded: the subprocess timeout is the "never a hang" check.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.archive import FaultPlan
from engine.exceptions import EXIT_ARCHIVE
from tests.helpers import run_cli

pytestmark = pytest.mark.integration

TAP_RETRIES = 2


def write_config(directory: Path, *, page_size: int | None = None) -> Path:
    lines = [
        "[tap]",
        "poll_timeout = 1.0",
        "job_timeout = 2.0",
        f"retries = {TAP_RETRIES}",
    ]
    if page_size is not None:
        lines.append(f"page_size = {page_size}")
    path = directory / "tessmirror.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_against(arch, tmp_path: Path, *extra: object, page_size: int | None = None):
    out = tmp_path / "out"
    result = run_cli(
        "run",
        "--config",
        write_config(tmp_path, page_size=page_size),
        "--tap-url",
        arch.tap_url,
        "--sector",
        1,
        "--out",
        out,
        *extra,
        timeout=120,  # far above the bounded worst case: reaching it means a hang
    )
    return out, result


def tap_retries_logged(stderr: str) -> int:
    return sum("TAP:" in line and "trying again" in line for line in stderr.splitlines())


def assert_clear_failure(result, *phrases: str) -> None:
    assert result.returncode == EXIT_ARCHIVE, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("tessmirror: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


@pytest.mark.parametrize(
    ("spec", "retries", "phrases"),
    [
        # A transient ERROR phase: retried `tap.retries` times, then reported with the server's message.
        ("tap_error=1", TAP_RETRIES, ("could not run the query", "simulated service failure")),
        # Stuck in QUEUED: abandoned at tap.job_timeout, tried once more (each try costs a job_timeout).
        ("tap_queued=1", 1, ("still QUEUED after 2 s",)),
        # HTML 503 pages instead of VOTables / job documents.
        ("tap_html503=1", TAP_RETRIES, ("HTTP 503",)),
    ],
    ids=["error", "queued", "html503"],
)
def test_tap_fault_is_retried_then_reported(
    archive, tmp_path: Path, spec: str, retries: int, phrases: tuple[str, ...]
) -> None:
    arch = archive(faults=FaultPlan.from_spec(spec))
    _out, result = run_against(arch, tmp_path)
    assert_clear_failure(result, arch.tap_url, *phrases)
    # The ERROR case fails twice over: the TAP_SCHEMA probe (which degrades) and then the query.
    assert tap_retries_logged(result.stderr) >= retries
    assert not arch.request_log, "no file may be fetched when planning failed"


def test_tap_poll_slower_than_the_poll_timeout(archive, tmp_path: Path) -> None:
    """Every job document takes longer than tap.poll_timeout: the polls time out, the job is given up
    at its deadline and retried, and the run ends with exit 3 instead of waiting forever."""
    arch = archive(faults=FaultPlan.from_spec("tap_slow=1.5"))
    _out, result = run_against(arch, tmp_path)
    assert_clear_failure(result, arch.tap_url)
    assert tap_retries_logged(result.stderr) >= 1


def test_overflow_that_cannot_be_split_is_an_incomplete_plan(archive, tmp_path: Path) -> None:
    """A full page whose rows all share one key cannot be paged further: refused, never planned short."""
    arch = archive()
    out, result = run_against(arch, tmp_path, "--camera", 1, "--ccd", 1, page_size=1)
    assert_clear_failure(result, "cannot be paged further", "page size 1")
    assert "tap.page_size" in result.stderr  # the hint says what to change
    assert not (out / ".tessmirror" / "plan.ecsv").exists(), "an incomplete plan must not be saved"


def test_a_whole_sector_plans_every_ccd_even_with_a_two_row_page(archive, tmp_path: Path) -> None:
    """16 CCD footprints with a page of 2 rows: one small footprint query per CCD cannot overflow, so
    the run mirrors every CCD's light curves instead of refusing or silently keeping 2 CCDs."""
    arch = archive(exposures_per_ccd=20)  # 320 FFI exposures: one footprint query would overflow
    out, result = run_against(arch, tmp_path, page_size=2)
    assert result.returncode == 0, result.stderr[-2000:]
    catalog = arch.catalog
    expected = {
        f.name
        for key in catalog.exposures
        for f in catalog.files_inside(catalog.middle_exposure(key).vertices)
    }
    assert expected
    got = {p.name for p in out.rglob("*_lc.fits")}
    assert got == expected


def test_a_run_against_a_tap_service_that_never_answers_ends_in_exit_3_and_releases_the_lock(
    tmp_path: Path,
) -> None:
    """The same silence during `run` (not only `plan`): one line naming the service, the lock gone."""
    from tests.integration.test_tap_silent import REQUEST_TIMEOUT, tap_in_front_of

    config = tmp_path / "tessmirror.toml"
    config.write_text(f"[tap]\nrequest_timeout = {REQUEST_TIMEOUT}\nretries = 1\n")
    out = tmp_path / "out"
    with tap_in_front_of(None, lambda method, path: "hang") as url:
        result = run_cli(
            "run", "--config", config, "--tap-url", url, "--sector", 1, "--out", out, timeout=120
        )
    assert_clear_failure(result, url, f"did not answer within {REQUEST_TIMEOUT:g} s")
    assert not (out / ".tessmirror" / "run.lock").exists()
    assert not (out / ".tessmirror" / "plan.ecsv").exists()
