"""The IVOA validator STILTS `taplint` finds no errors in the local archive's TAP service.

taplint runs every stage it has (table metadata from /tables and TAP_SCHEMA, capabilities,
availability, sync GET/POST and async queries, UWS, result metadata, ObsCore, the examples
document). Its two *failures* are stages that do not apply to this service and are not errors: no
ivoa.obsplan (ObsLocTAP) and no table uploads.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from engine.archive import ArchiveOptions, ArchiveThread

STILTS = shutil.which("stilts")
pytestmark = pytest.mark.skipif(
    STILTS is None, reason="stilts is not installed (Debian: apt-get install stilts); CI installs it"
)
TOTALS = re.compile(
    r"Totals: Errors: (\d+); Warnings: (\d+); Infos: (\d+); Summaries: (\d+); Failures: (\d+)"
)


def run_taplint(tap_url: str) -> tuple[dict[str, int], str]:
    """Run taplint against `tap_url`; return its totals and its whole report."""
    completed = subprocess.run(
        [STILTS, "taplint", f"tapurl={tap_url}", "maxrepeat=20", "maxtable=20"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    report = completed.stdout + completed.stderr
    match = TOTALS.search(report)
    assert match, f"taplint printed no totals (exit {completed.returncode}):\n{report[-3000:]}"
    names = ("errors", "warnings", "infos", "summaries", "failures")
    return dict(zip(names, map(int, match.groups()), strict=True)), report


def _problems(report: str) -> str:
    return "\n".join(line for line in report.splitlines() if line[:2] in ("E-", "W-", "F-"))


def test_taplint_reports_no_errors_against_the_archive_with_its_defaults():
    with ArchiveThread(ArchiveOptions(host="127.0.0.1", port=0)) as running:
        assert running.archive is not None
        totals, report = run_taplint(running.archive.tap_url)
    assert totals["errors"] == 0, _problems(report)
    assert totals["warnings"] == 0, _problems(report)
    assert re.search(r"S-OBS-COLS-\d+ ivoa\.ObsCore columns: 30/30 required", report), report[-2000:]
    assert "Execution success/attempt: 2/2" in report  # the /examples queries ran


def test_taplint_reports_no_errors_against_the_mast_like_archive():
    options = ArchiveOptions.mast_like(sectors=(1,), targets=200, file_size="small", exposures_per_ccd=30)
    with ArchiveThread(options) as running:
        assert running.archive is not None
        totals, report = run_taplint(running.archive.tap_url)
    assert totals["errors"] == 0, _problems(report)
