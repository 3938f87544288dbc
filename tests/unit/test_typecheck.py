"""mypy over the engine, with the repository's mypy.ini (`files = engine`, nothing excluded).

mypy checks every module (mypy.ini: `files = engine`, nothing excluded), and the engine is held to
zero errors: a new one fails the suite with its file and line.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_ERROR = re.compile(r"^(?P<path>[^:\s]+\.py):(?P<line>\d+): error: (?P<message>.*)$")
_CHECKED = re.compile(r"\b(?:checked|in) (?P<count>\d+) source files?\b")


@pytest.fixture(scope="module")
def mypy_output(tmp_path_factory: pytest.TempPathFactory) -> str:
    """mypy's output, run as CI runs it: from the repository root, reading mypy.ini."""
    cache = tmp_path_factory.mktemp("mypy-cache")  # a cold cache: what a fresh clone gets
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(cache), "--no-color-output"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # 0: clean, 1: errors found; anything else means mypy itself failed (a bad mypy.ini, a crash).
    assert done.returncode in (0, 1), f"mypy failed (status {done.returncode}):\n{done.stdout}{done.stderr}"
    return done.stdout


def _errors_by_file(output: str) -> dict[str, list[str]]:
    errors: dict[str, list[str]] = {}
    for line in output.splitlines():
        match = _ERROR.match(line)
        if match:
            errors.setdefault(match["path"], []).append(f"{match['line']}: {match['message']}")
    return errors


def test_mypy_finds_no_error_in_the_engine(mypy_output: str) -> None:
    errors = _errors_by_file(mypy_output)
    report = "\n".join(f"{path}:{line}" for path, lines in sorted(errors.items()) for line in lines)
    assert not errors, f"mypy errors (run `.venv/bin/mypy` to see them with context):\n{report}"


def test_mypy_checks_every_module_of_the_engine(mypy_output: str) -> None:
    modules = list((ROOT / "engine").rglob("*.py"))
    match = _CHECKED.search(mypy_output.splitlines()[-1])
    assert match, f"no summary line in mypy's output:\n{mypy_output}"
    assert int(match["count"]) == len(modules)
