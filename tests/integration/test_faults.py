"""The fault matrix: a 200+ file mirror through each fault the local archive can inject, then all mixed.

Every case runs the real CLI in a subprocess against the local archive and checks the result against
the archive's truth: every file verified and byte-identical, no file requested more often than the
retry budget allows, and (per fault) that the fault really struck and was handled as intended:
Retry-After waited for, the idle timeout fired on a stall, broken bodies resumed with Range.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path

import pytest

from engine.archive import FaultPlan
from engine.manifest import Manifest
from tests.helpers import assert_mirror_matches_truth, assert_verified_records_are_good, run_cli

pytestmark = pytest.mark.integration

TARGETS = 210  # one light curve per target in sector 1: 210 files over the 16 CCDs
RETRIES = 8
IDLE_TIMEOUT = 1.0
RETRY_AFTER = 0.2
CLOCK_SLACK = 0.01  # asyncio may wake a timer up to one clock tick early

MATRIX: dict[str, str] = {
    "500": "500=0.2",
    "502": "502=0.2",
    "429": f"429=0.2:retry_after={RETRY_AFTER}",
    "503": f"503=0.2:retry_after={RETRY_AFTER}",
    "reset": "reset=0.2",
    "short": "short=0.2",
    "wrong": "wrong=0.2",
    "html": "html=0.2",
    # Sends 4 kB, then silence for far longer than the idle timeout: only the timeout can end it.
    "stall": "stall=0.2:after=4096:for=60",
    "slow": "latency=0.05,bandwidth=1000000",
    "mixed": (
        f"500=0.03,502=0.03,429=0.03:retry_after={RETRY_AFTER},503=0.03:retry_after={RETRY_AFTER},"
        "reset=0.03,short=0.03,wrong=0.03,html=0.03,stall=0.03:after=4096:for=60,"
        "latency=0.01,bandwidth=2000000"
    ),
}


def write_config(directory: Path, **sections: dict[str, object]) -> Path:
    """A TOML config with short backoffs, so retries are quick but real."""
    tables = {"fetch": {"backoff_initial": 0.05, "backoff_max": 0.5}, **sections}
    lines: list[str] = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {value!r}" for key, value in values.items())
    path = directory / "tessmirror.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def light_curves(archive) -> set[str]:
    return {
        name
        for name, entry in archive.catalog.files.items()
        if entry.product == "lc" and entry.collection == "TESS"
    }


def gets_by_file(archive) -> dict[str, list]:
    by_name: dict[str, list] = defaultdict(list)
    for record in archive.request_log:
        if record.method == "GET":
            by_name[record.name].append(record)
    for records in by_name.values():
        records.sort(key=lambda r: r.time)
    return by_name


def mirror(archive, tmp_path: Path, *extra: object, retries: int = RETRIES):
    out = tmp_path / "out"
    config = write_config(tmp_path)
    result = run_cli(
        "run",
        "--config",
        config,
        "--tap-url",
        archive.tap_url,
        "--sector",
        1,
        "--out",
        out,
        "--concurrency",
        16,
        "--retries",
        retries,
        "--idle-timeout",
        IDLE_TIMEOUT,
        *extra,
        timeout=240,
    )
    return out, result


@pytest.mark.parametrize("fault", list(MATRIX))
def test_each_fault_ends_with_a_complete_verified_mirror(archive, tmp_path: Path, fault: str) -> None:
    spec = MATRIX[fault]
    arch = archive(sectors=(1,), targets=TARGETS, file_size="small", faults=FaultPlan.from_spec(spec))
    names = light_curves(arch)
    assert len(names) >= 200

    out, result = mirror(arch, tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert_mirror_matches_truth(out, arch, names)
    assert assert_verified_records_are_good(out, arch) == len(names)
    assert not list(out.rglob("*.part")), "a verified run leaves no .part files behind"

    gets = gets_by_file(arch)
    faulted = [r for records in gets.values() for r in records if r.fault]
    # The fault really struck a good share of the files (about 20% of requests).
    if fault != "slow":
        assert len(faulted) >= 0.1 * len(names), f"only {len(faulted)} faults injected"
    # No hammering: nobody went past the retry budget.
    assert max(len(records) for records in gets.values()) <= RETRIES + 1

    if fault in ("429", "503", "mixed"):
        _assert_retry_after_honoured(gets, ("429", "503"))
    if fault in ("stall", "mixed"):
        _assert_idle_timeout_fired(gets)
    if fault in ("reset", "short"):
        # Bytes received before the break are kept: the next try asks for the rest only.
        resumed = [r for records in gets.values() for r in records if r.range.startswith("bytes=")]
        assert resumed, "no try resumed with a Range request after a broken body"


def _assert_retry_after_honoured(gets: dict[str, list], statuses: tuple[str, ...]) -> None:
    """The retry of a file never comes sooner than the Retry-After of the answer that refused it."""
    measured = 0
    for records in gets.values():
        for answer, retry in itertools.pairwise(records):
            if answer.fault in statuses:
                waited = retry.time - answer.time
                assert waited >= RETRY_AFTER - CLOCK_SLACK, (
                    f"{answer.name}: retried {waited:.3f} s after a {answer.fault} "
                    f"with Retry-After {RETRY_AFTER}"
                )
                measured += 1
    assert measured, "no Retry-After answer was followed by a retry"


def _assert_idle_timeout_fired(gets: dict[str, list]) -> None:
    """A stalled try was abandoned after about the idle timeout, long before the stall would end."""
    measured = 0
    for records in gets.values():
        for stalled, retry in itertools.pairwise(records):
            if "stall" in stalled.fault:
                waited = retry.time - stalled.time
                assert IDLE_TIMEOUT - CLOCK_SLACK <= waited < 30, (
                    f"{stalled.name}: next try {waited:.1f} s after a stall (idle timeout {IDLE_TIMEOUT})"
                )
                measured += 1
    assert measured, "no stalled try was retried"


def test_corruption_on_every_try_is_a_recorded_failure(archive, tmp_path: Path) -> None:
    """One file always corrupt: it fails with its reason after the retry budget; the rest complete."""
    arch = archive(sectors=(1,), targets=TARGETS, file_size="small")
    names = light_curves(arch)
    victim = sorted(names)[7]
    arch.faults = FaultPlan.from_spec(f"wrong=1:files={victim}")
    retries = 3

    out, result = mirror(arch, tmp_path, retries=retries)

    assert result.returncode == 1, result.stderr[-3000:]
    assert victim in result.stderr  # the summary names the failed file
    assert "Traceback" not in result.stderr
    assert_mirror_matches_truth(out, arch, names - {victim})
    entries = {Path(e.path).name: e for e in Manifest(out / ".tessmirror").load().values()}
    assert entries[victim].status == "failed"
    assert "md5" in entries[victim].error
    assert entries[victim].attempts == retries + 1
    assert len(gets_by_file(arch)[victim]) == retries + 1
    assert not (out / entries[victim].path).exists(), "a corrupt file must never be left in place"
    assert sum(e.status == "verified" for e in entries.values()) == len(names) - 1


def test_missing_file_is_a_recorded_failure_and_not_retried(archive, tmp_path: Path) -> None:
    """A 404 in a URL list: recorded as failed with the status, asked once, the other files complete."""
    arch = archive(sectors=(1,), targets=40, file_size="small")
    good = sorted(light_curves(arch))[:20]
    bogus_name = "tess2018206045859-s0001-0000000099999999-0120-s_lc.fits"
    urls = [f"{arch.base_url}/api/v0.1/Download/file?uri=mast:TESS/product/{name}" for name in good]
    urls.insert(5, f"{arch.base_url}/api/v0.1/Download/file?uri=mast:TESS/product/{bogus_name}")
    url_list = tmp_path / "urls.txt"
    url_list.write_text("\n".join(urls) + "\n")
    out = tmp_path / "out"

    result = run_cli("fetch", "--config", write_config(tmp_path), "--input", url_list, "--out", out)

    assert result.returncode == 1, result.stderr[-3000:]
    assert "404" in result.stderr and bogus_name in result.stderr
    assert "Traceback" not in result.stderr
    assert_mirror_matches_truth(out, arch, set(good))
    entries = Manifest(out / ".tessmirror").load()
    failed = [e for e in entries.values() if e.status == "failed"]
    assert [e.url for e in failed] == [urls[5]]
    assert "404" in failed[0].error
    assert sum(1 for r in arch.request_log if r.name == bogus_name) == 1, "a 404 is permanent: no retry"
