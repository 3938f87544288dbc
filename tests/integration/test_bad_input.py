"""Bad input: one row per kind, each the real CLI in a subprocess.

Every row asserts the exit code, that the error line names the bad value (or key), and that the user
sees a message, not a traceback. The README's bad-input table is this table.
"""

from __future__ import annotations

import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.archive import ArchiveOptions, ArchiveThread, FaultPlan, LocalArchive
from engine.cli import EXIT_BROKEN_PIPE
from engine.exceptions import EXIT_ARCHIVE, EXIT_PARTIAL, EXIT_USAGE
from engine.manifest import Manifest
from tests.helpers import cli_command, run_cli

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Row:
    """One kind of bad input: the CLI arguments after `run --out OUT` and what the user must see.

    `{tap}`, `{files}`, `{closed}` and `{dir}` in the arguments and phrases are filled in per run.
    """

    args: tuple[str, ...]
    exit_code: int
    phrases: tuple[str, ...]
    files: tuple[tuple[str, str], ...] = ()  # (name, content) written into {dir} first


TAP = ("--tap-url", "{tap}")
ROWS: dict[str, Row] = {
    "sector out of range": Row(("--sector", "0", *TAP), EXIT_USAGE, ("selection.sector", "sector 0")),
    "sector not a number": Row(("--sector", "abc", *TAP), EXIT_USAGE, ("--sector", "'abc'")),
    "camera out of range": Row(
        ("--sector", "1", "--camera", "5", *TAP), EXIT_USAGE, ("selection.cameras", "camera 5")
    ),
    "CCD out of range": Row(("--sector", "1", "--ccd", "0", *TAP), EXIT_USAGE, ("selection.ccds", "CCD 0")),
    "CCD not a number": Row(("--sector", "1", "--ccd", "x", *TAP), EXIT_USAGE, ("selection.ccds", "'x'")),
    "camera without a sector": Row(
        ("--camera", "1", *TAP), EXIT_USAGE, ("selection.cameras", "needs a sector", "--sector N")
    ),
    "sectors list out of range": Row(
        ("--sector", "1", "--sectors", "0-3", *TAP), EXIT_USAGE, ("selection.sectors", "sector 0")
    ),
    "unknown product": Row(
        ("--sector", "1", "--products", "lc,foo", *TAP), EXIT_USAGE, ("selection.products", "'foo'")
    ),
    "polygon with an odd count": Row(
        ("--polygon", "10 20 30", *TAP), EXIT_USAGE, ("selection.polygon", "odd count of numbers (3)")
    ),
    "polygon with a non-number": Row(
        ("--polygon", "10 20 30 abc 40 50", *TAP), EXIT_USAGE, ("selection.polygon", "'abc'")
    ),
    "cone without a radius": Row(("--cone", "10 20", *TAP), EXIT_USAGE, ("selection.cone", "'10 20'")),
    "cone with a negative radius": Row(
        ("--cone", "10 20 -1", *TAP), EXIT_USAGE, ("selection.cone", "radius -1.0")
    ),
    "cone with a bad declination": Row(
        ("--cone", "10 120 1", *TAP), EXIT_USAGE, ("selection.cone", "declination 120.0")
    ),
    "nothing selected": Row(TAP, EXIT_USAGE, ("nothing selected", "--sector")),
    "malformed TOML": Row(
        ("--sector", "1", "--config", "{dir}/bad.toml", *TAP),
        EXIT_USAGE,
        ("bad.toml", "not valid TOML", "line 1"),
        files=(("bad.toml", "[fetch\nconcurrency = 4\n"),),
    ),
    "unknown TOML key": Row(
        ("--sector", "1", "--config", "{dir}/typo.toml", *TAP),
        EXIT_USAGE,
        ("fetch.concurency", "unknown key", "did you mean fetch.concurrency"),
        files=(("typo.toml", "[fetch]\nconcurency = 4\n"),),
    ),
    "unknown TOML table": Row(
        ("--sector", "1", "--config", "{dir}/table.toml", *TAP),
        EXIT_USAGE,
        ("fetsh", "unknown table", "did you mean fetch"),
        files=(("table.toml", "[fetsh]\nconcurrency = 4\n"),),
    ),
    "TOML value of the wrong type": Row(
        ("--sector", "1", "--config", "{dir}/type.toml", *TAP),
        EXIT_USAGE,
        ("fetch.concurrency", "'many'"),
        files=(("type.toml", '[fetch]\nconcurrency = "many"\n'),),
    ),
    "value out of range": Row(
        ("--sector", "1", "--concurrency", "0", *TAP), EXIT_USAGE, ("fetch.concurrency", "0 is outside")
    ),
    "TAP URL not http(s)": Row(
        ("--sector", "1", "--tap-url", "ftp://example.org/tap"),
        EXIT_USAGE,
        ("tap.url", "ftp://example.org/tap"),
    ),
    "TAP URL that does not answer": Row(
        ("--sector", "1", "--tap-url", "{closed}", "--config", "{dir}/quick.toml"),
        EXIT_ARCHIVE,
        ("{closed}", "does not answer"),
        files=(("quick.toml", "[tap]\nretries = 1\n"),),
    ),
    "URL that is not a TAP service": Row(
        ("--sector", "1", "--tap-url", "{files}"), EXIT_ARCHIVE, ("{files}", "is not a TAP service")
    ),
    "empty result": Row(
        ("--polygon", "10 -80 10.01 -80 10.01 -79.99", *TAP),
        EXIT_USAGE,
        ("matched no files", "polygon 10.0 -80.0"),
    ),
    # -- a first day's surprises (issue 11) ---------------------------------------------------------
    "two selections at once": Row(
        ("--sector", "1", "--cone", "10 20 1", *TAP),
        EXIT_USAGE,
        ("conflicting selections", "--sector", "--cone", "only one of"),
    ),
    "a selection in the file and another as a flag": Row(
        ("--cone", "10 20 1", "--config", "{dir}/sector.toml", *TAP),
        EXIT_USAGE,
        ("conflicting selections", "selection.sector"),
        files=(("sector.toml", "[selection]\nsector = 1\n"),),
    ),
    "--sectors without --sector": Row(
        ("--sectors", "1", *TAP), EXIT_USAGE, ("nothing selected", "--sectors only filters", "--sector N")
    ),
    "cone right ascension 400": Row(
        ("--cone", "400 20 1", *TAP), EXIT_USAGE, ("selection.cone", "right ascension 400.0")
    ),
    "polygon right ascension 400": Row(
        ("--polygon", "400 0 10 0 10 10", *TAP), EXIT_USAGE, ("selection.polygon", "right ascension 400.0")
    ),
    "a mistyped flag": Row(("--sectr", "1", *TAP), EXIT_USAGE, ("--sectr", "did you mean --sector?")),
    "--quiet and --verbose together": Row(
        ("--sector", "1", "-q", "-v", *TAP), EXIT_USAGE, ("--quiet and --verbose",)
    ),
    "a log file that cannot be written": Row(
        ("--sector", "1", "--log-file", "{dir}/no/such/dir/run.log", *TAP),
        EXIT_USAGE,
        ("--log-file", "run.log"),
    ),
    "an unreadable CA bundle": Row(
        ("--sector", "1", "--config", "{dir}/ca.toml", *TAP),
        EXIT_USAGE,
        ("SSL_CERT_FILE", "missing.pem"),
        files=(("ca.toml", "[fetch]\nconcurrency = 2\n"),),
    ),
}
# Rows that need something in the environment as well as flags.
ROW_ENV: dict[str, dict[str, str]] = {
    "an unreadable CA bundle": {"SSL_CERT_FILE": "{dir}/missing.pem", "REQUESTS_CA_BUNDLE": ""},
}


@pytest.fixture(scope="module")
def local_archive() -> Iterator[LocalArchive]:
    with ArchiveThread(ArchiveOptions(sectors=(1,), targets=32, file_size="small")) as running:
        assert running.archive is not None
        yield running.archive


@pytest.fixture(scope="module")
def closed_port_url() -> str:
    """A 127.0.0.1 URL on a port that was free a moment ago: nothing listens there."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/tap"


@pytest.mark.parametrize("kind", list(ROWS))
def test_bad_input_gets_a_clear_message(
    local_archive: LocalArchive, closed_port_url: str, tmp_path: Path, kind: str
) -> None:
    row = ROWS[kind]
    values = {
        "tap": local_archive.tap_url,
        "files": local_archive.base_url + "/api/v0.1/Download/file",
        "closed": closed_port_url,
        "dir": str(tmp_path),
    }
    for name, content in row.files:
        (tmp_path / name).write_text(content)
    args = [arg.format(**values) for arg in row.args]
    served_before = len(local_archive.request_log)

    env = {name: value.format(**values) for name, value in ROW_ENV.get(kind, {}).items()}
    result = run_cli("run", "--out", tmp_path / "out", *args, timeout=60, env=env)

    assert result.returncode == row.exit_code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    # The error line (and its hint line, if any) as the user sees them; argparse's own errors count.
    shown = "\n".join(line for line in result.stderr.splitlines() if "error:" in line or "hint:" in line)
    assert shown, result.stderr[-3000:]
    for phrase in row.phrases:
        assert phrase.format(**values) in shown, f"{phrase!r} not in {shown!r}"
    assert len(local_archive.request_log) == served_before, "bad input must not download anything"


@pytest.mark.parametrize(
    ("content", "phrase"),
    [("ftp://example.org/x_lc.fits\n", "'ftp://example.org/x_lc.fits'"), (None, "nope.txt")],
    ids=["URL list with a non-http line", "missing input file"],
)
def test_bad_url_list_gets_a_clear_message(tmp_path: Path, content: str | None, phrase: str) -> None:
    url_list = tmp_path / ("urls.txt" if content is not None else "nope.txt")
    if content is not None:
        url_list.write_text(content)
    result = run_cli("fetch", "--out", tmp_path / "out", "--input", url_list, timeout=60)
    assert result.returncode == EXIT_USAGE, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("tessmirror: error:")]
    assert errors and phrase in errors[0], result.stderr[-3000:]


# -- lifecycle cases (issue 10): saved plans, pipes, closed streams, tokens, verify ---------------


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("tessmirror: error:")]


@pytest.fixture(scope="module")
def finished_mirror(local_archive: LocalArchive, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete mirror of the module's archive (copied by tests that change it)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    result = run_cli("run", "--tap-url", local_archive.tap_url, "--sector", "1", "--out", out, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def copy_of(mirror: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(mirror, out)
    return out


@pytest.mark.parametrize(
    "content",
    ["# %ECSV 1.0\n# ---\n# datatype:\n# - {name: url, datatype: string\n", "\x00\xff garbage\n"],
    ids=["broken YAML header", "not text"],
)
def test_a_saved_plan_with_a_broken_header_is_one_line_with_the_refresh_plan_hint(
    local_archive: LocalArchive, finished_mirror: Path, tmp_path: Path, content: str
) -> None:
    out = copy_of(finished_mirror, tmp_path)
    (out / ".tessmirror" / "plan.ecsv").write_bytes(content.encode("latin-1"))
    args = ("run", "--tap-url", local_archive.tap_url, "--sector", "1", "--out", out)
    result = run_cli(*args, timeout=60)
    assert result.returncode == EXIT_USAGE, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "plan.ecsv" in errors[0] and "not a valid ECSV plan" in errors[0]
    assert "tessmirror: hint:" in result.stderr and "--refresh-plan" in result.stderr
    refreshed = run_cli(*args, "--refresh-plan", timeout=120)
    assert refreshed.returncode == 0, refreshed.stderr[-3000:]


def test_plan_into_a_pipe_closed_early_exits_141_quietly(local_archive: LocalArchive) -> None:
    command = cli_command("plan", "--tap-url", local_archive.tap_url, "--sector", "1", "--format", "urls")
    script = f"set -o pipefail; {shlex.join(command)} | head -1"
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_BROKEN_PIPE, result.stderr[-3000:]
    assert result.stdout.startswith("http://127.0.0.1")
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr
    assert not error_lines(result.stderr)


def test_status_into_a_pipe_closed_early_exits_without_a_traceback(finished_mirror: Path) -> None:
    script = f"set -o pipefail; {shlex.join(cli_command('status', '--out', finished_mirror))} | head -1"
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    # 0 when every line fitted in the pipe before `head` left, 141 when a write found it gone.
    assert result.returncode in (0, EXIT_BROKEN_PIPE), result.stderr[-3000:]
    assert result.stdout.startswith("mirror")
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr


def test_a_run_with_stderr_closed_completes_and_keeps_the_manifest_clean(
    local_archive: LocalArchive, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    command = shlex.join(
        cli_command("run", "--tap-url", local_archive.tap_url, "--sector", "1", "--out", out)
    )
    result = subprocess.run(["bash", "-c", f"{command} 2>&-"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    entries = Manifest(out / ".tessmirror").load()
    assert entries and all(e.status == "verified" for e in entries.values())
    # Descriptor 2 was reopened on /dev/null: nothing meant for stderr landed in the manifest.
    assert b"INFO" not in (out / ".tessmirror" / "manifest.jsonl").read_bytes()


@pytest.mark.parametrize("command", ["plan", "status"])
def test_a_closed_stdout_is_bad_input_for_commands_that_print(
    local_archive: LocalArchive, finished_mirror: Path, command: str
) -> None:
    args = (
        ("plan", "--tap-url", local_archive.tap_url, "--sector", "1")
        if command == "plan"
        else ("status", "--out", finished_mirror)
    )
    result = subprocess.run(
        ["bash", "-c", f"{shlex.join(cli_command(*args))} >&-"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == EXIT_USAGE, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "standard output is closed" in errors[0]


@pytest.mark.parametrize("token", ["s3cr3t-t0ken\r", "s3cr3t t0ken", "s3cr3t-t0ken\n", "s3cr3t\x07t0ken"])
def test_a_token_with_control_characters_is_refused_at_start_without_showing_it(
    local_archive: LocalArchive, tmp_path: Path, token: str
) -> None:
    served_before = len(local_archive.request_log)
    result = run_cli(
        "run",
        "--tap-url",
        local_archive.tap_url,
        "--sector",
        "1",
        "--out",
        tmp_path / "out",
        env={"MAST_API_TOKEN": token},
        timeout=60,
    )
    assert result.returncode == EXIT_USAGE, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "MAST_API_TOKEN" in errors[0], result.stderr
    assert "s3cr3t" not in result.stderr and "t0ken" not in result.stderr
    assert len(local_archive.request_log) == served_before


def test_verify_after_a_repair_whose_downloads_failed_exits_1_naming_the_files(tmp_path: Path) -> None:
    with ArchiveThread(ArchiveOptions(sectors=(1,), targets=16, file_size="small")) as running:
        arch = running.archive
        assert arch is not None
        out = tmp_path / "out"
        first = run_cli("run", "--tap-url", arch.tap_url, "--sector", "1", "--out", out, timeout=120)
        assert first.returncode == 0, first.stderr[-3000:]
        victim = next(p for p in out.rglob("*.fits"))
        victim.write_bytes(victim.read_bytes()[:-2880])  # truncated
        arch.faults = FaultPlan.from_spec("wrong=1")  # every download now arrives corrupt
        repair = run_cli("verify", "--out", out, "--repair", "--retries", "0", timeout=120)
        assert repair.returncode == EXIT_PARTIAL, repair.stderr[-3000:]

        again = run_cli("verify", "--out", out, timeout=120)

    assert again.returncode == EXIT_PARTIAL, again.stderr[-3000:]
    assert victim.name in again.stderr
    assert "Traceback" not in again.stderr


def test_verify_finding_unexpected_files_exits_1_and_repair_moves_them_to_the_quarantine(
    finished_mirror: Path, tmp_path: Path
) -> None:
    """Decision: an unexpected file makes `verify` exit 1. `--repair` moves it to the quarantine
    (never deletes it: it may be someone's only copy); the mirror then matches its manifest, and
    nothing had to be downloaded, so it exits 0."""
    out = copy_of(finished_mirror, tmp_path)
    stray = out / "notes-from-a-colleague.txt"
    stray.write_text("mine")
    check = run_cli("verify", "--out", out, timeout=120)
    assert check.returncode == EXIT_PARTIAL, check.stderr[-3000:]
    assert "unexpected" in check.stderr and stray.name in check.stderr

    result = run_cli("verify", "--out", out, "--repair", timeout=120)

    assert result.returncode == 0, result.stderr[-3000:]
    assert stray.name in result.stderr and "quarantine" in result.stderr
    assert not stray.exists()
    kept = list((out / ".tessmirror" / "quarantine").rglob(stray.name))
    assert len(kept) == 1 and kept[0].read_text() == "mine"
    assert run_cli("verify", "--out", out, timeout=120).returncode == 0


# -- the CLI's conventions (issue 11) -------------------------------------------------------------
def test_run_without_out_names_both_ways_to_give_it(tmp_path: Path) -> None:
    result = run_cli("run", "--sector", "1", timeout=60, cwd=tmp_path)
    assert result.returncode == EXIT_USAGE, result.stderr[-3000:]
    assert "output.out_dir" in result.stderr and "--out DIR" in result.stderr and "[output]" in result.stderr
    assert not (tmp_path / "tessmirror-data").exists()


def test_fetch_without_input_says_to_give_input(tmp_path: Path) -> None:
    result = run_cli("fetch", "--out", tmp_path / "out", timeout=60)
    assert result.returncode == EXIT_USAGE, result.stderr[-3000:]
    assert error_lines(result.stderr) == [
        "tessmirror: error: selection.urls_file: fetch needs a saved plan or a URL list"
    ]
    assert "--input FILE" in result.stderr
