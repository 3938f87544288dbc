"""A user's first day (issue 11): the README's Python snippet, `--config` in both positions, the size
before downloading (`plan`'s summary, `run --dry-run`), the start banner, -q/-v/--log-file, truthful
progress and `python -m engine`. Each against the local archive on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.archive.faults import FaultPlan
from engine.manifest import Manifest
from tests.helpers import lc_names_in_footprint, mirrored_files, run_cli

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FOOTPRINT = ("--sector", "1", "--camera", "1", "--ccd", "2")


def readme_python_snippet() -> str:
    """The README's Python example, exactly as written there."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    snippets = [block for block in blocks if "from engine import" in block]
    assert snippets, "the README has no Python example using `from engine import`"
    return snippets[0]


@pytest.fixture
def snippet_against(monkeypatch):
    """Point the API's default TAP URL at a local archive: the snippet itself stays verbatim."""
    import engine.api as api

    def point_at(tap_url: str) -> None:
        original = api.build_settings

        def build(*args, **kwargs):
            kwargs["tap_url"] = kwargs.get("tap_url") or tap_url
            return original(*args, **kwargs)

        monkeypatch.setattr(api, "build_settings", build)

    return point_at


def test_the_readme_python_snippet_runs_verbatim(archive, tmp_path, monkeypatch, snippet_against):
    arc = archive(targets=24, focus=(1, 1, 2))
    expected = lc_names_in_footprint(arc, 1, 1, 2)
    snippet_against(arc.tap_url)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(readme_python_snippet(), "README.md", "exec"), namespace)  # the README's own code
    results = namespace["results"]
    assert results.meta["exit_code"] == 0
    assert {Path(p).name for p in results["path"]} == expected
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in results["path"])
    assert Path(results.meta["out_dir"]).is_absolute()


def test_the_readme_python_snippet_runs_inside_a_running_event_loop(
    archive, tmp_path, monkeypatch, snippet_against
):
    """As in Jupyter: the snippet's `mirror()` is called while an event loop runs in this thread."""
    arc = archive(targets=24, focus=(1, 1, 2))
    expected = lc_names_in_footprint(arc, 1, 1, 2)
    snippet_against(arc.tap_url)
    monkeypatch.chdir(tmp_path)
    code = compile(readme_python_snippet(), "README.md", "exec")
    namespace: dict[str, object] = {}

    async def cell() -> None:
        asyncio.get_running_loop()  # a loop is running, as in a notebook's cell
        exec(code, namespace)  # the README's own code

    asyncio.run(cell())
    results = namespace["results"]
    assert results.meta["exit_code"] == 0
    assert {Path(p).name for p in results["path"]} == expected


def write_config(path: Path, tap_url: str, out: Path) -> Path:
    path.write_text(
        f'[tap]\nurl = "{tap_url}"\n[selection]\nsector = 1\ncameras = [1]\nccds = [2]\n'
        f'[output]\nout_dir = "{out}"\nlayout = "flat"\n',
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize("position", ["before the command", "after the command"])
def test_config_works_before_or_after_the_command_and_its_out_dir_satisfies_out(archive, tmp_path, position):
    arc = archive(targets=24, focus=(1, 1, 2))
    expected = lc_names_in_footprint(arc, 1, 1, 2)
    out = tmp_path / "from-config"
    config = write_config(tmp_path / "my.toml", arc.tap_url, out)
    args = ("--config", config, "run") if position == "before the command" else ("run", "--config", config)
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(mirrored_files(out)) == expected
    assert f"downloaded  {len(expected)}" in proc.stderr


def test_plan_ends_with_its_size_on_stderr(archive):
    arc = archive(targets=24, focus=(1, 1, 2), sectors=(1, 2))
    proc = run_cli("plan", "--tap-url", arc.tap_url, *FOOTPRINT, "--format", "urls")
    assert proc.returncode == 0, proc.stderr[-3000:]
    urls = proc.stdout.split()
    expected = lc_names_in_footprint(arc, 1, 1, 2)
    assert len(urls) == len(expected)
    total = sum(arc.catalog[name].size for name in expected)
    assert f"files       {len(expected)}" in proc.stderr
    from engine.progress import human_bytes

    assert f"bytes       {human_bytes(total)}" in proc.stderr
    assert f"products    lc {len(expected)}" in proc.stderr
    sectors = re.search(r"sectors     (.*)", proc.stderr)
    assert sectors and "s0001" in sectors.group(1)
    assert sum(int(n) for n in re.findall(r"s\d{4} (\d+)", sectors.group(1))) == len(expected)
    assert "plan: " in proc.stderr  # the guard's line: merged and dropped rows, and why
    assert not [line for line in proc.stderr.splitlines() if line.startswith("http")]  # URLs: stdout only


def test_run_dry_run_prints_the_size_and_the_free_space_verdict_and_downloads_nothing(archive, tmp_path):
    arc = archive(targets=24, focus=(1, 1, 2))
    out = tmp_path / "not-yet"
    served = len(arc.request_log)
    proc = run_cli("run", "--dry-run", "--tap-url", arc.tap_url, *FOOTPRINT, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = lc_names_in_footprint(arc, 1, 1, 2)
    assert f"files       {len(expected)}" in proc.stderr
    assert re.search(r"free space  .* free on .*not-yet; the plan needs .*: fits", proc.stderr)
    assert "nothing was downloaded" in proc.stderr
    assert not out.exists(), "a dry run writes nothing"
    assert not any("/Download/" in str(entry) for entry in arc.request_log[served:])


def test_the_start_banner_says_what_is_planned_where(archive, tmp_path):
    arc = archive(targets=16, focus=(1, 1, 2))
    out = tmp_path / "m"
    proc = run_cli("run", "--tap-url", arc.tap_url, *FOOTPRINT, "--products", "lc", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    first = next(i for i, line in enumerate(lines) if "tessmirror 0.1.0: starting run" in line)
    assert "INFO    run: sector 1 camera 1 ccd 2: lc from all sectors, via " + arc.tap_url in lines[first + 1]
    assert f"into {out.resolve()}" in lines[first + 1] and "concurrency 8" in lines[first + 1]
    assert proc.stderr.index("starting run") < proc.stderr.index("planned     ")


def test_quiet_shows_no_info_lines_and_the_log_file_keeps_debug_with_retries_summarised(archive, tmp_path):
    # Every file's first try fails with a 500: each is retried once, and the summary counts it.
    arc = archive(targets=16, focus=(1, 1, 2), faults=FaultPlan.from_spec("500=1:attempts=1"))
    expected = lc_names_in_footprint(arc, 1, 1, 2)
    out, log_file = tmp_path / "m", tmp_path / "run.log"
    proc = run_cli(
        "run", "-q", "--log-file", log_file, "--tap-url", arc.tap_url, *FOOTPRINT, "--out", out,
        "--config", _fast_retries(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        " INFO " not in proc.stderr and "starting run" not in proc.stderr and "progress:" not in proc.stderr
    )
    assert f"downloaded  {len(expected)}" in proc.stderr  # the summary stays
    retries = re.search(r"retries     (\d+) \(on (\d+) files\)", proc.stderr)
    assert retries and int(retries.group(1)) >= len(expected) and int(retries.group(2)) == len(expected)
    text = log_file.read_text(encoding="utf-8")
    assert "starting run" in text and " DEBUG " in text and "verified after 2 tries" in text


def _fast_retries(tmp_path: Path) -> Path:
    config = tmp_path / "fast.toml"
    config.write_text("[fetch]\nbackoff_initial = 0.01\nbackoff_max = 0.05\n", encoding="utf-8")
    return config


def test_verbose_shows_debug_lines_on_the_terminal(archive, tmp_path):
    arc = archive(targets=16, focus=(1, 1, 2), faults=FaultPlan.from_spec("500=1:attempts=1"))
    proc = run_cli(
        "run", "-v", "--tap-url", arc.tap_url, *FOOTPRINT, "--out", tmp_path / "m",
        "--config", _fast_retries(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert " DEBUG " in proc.stderr and "verified after 2 tries" in proc.stderr


def test_batch_progress_says_planning_until_the_total_is_known(archive, tmp_path):
    """A log line written before planning ends never shows a total that is still growing."""
    slow = FaultPlan.from_spec("latency=0.05")
    arc = archive(targets=48, faults=slow, tap_hard_limit=5, tap_default_maxrec=5)  # many TAP pages
    out = tmp_path / "m"
    proc = run_cli(
        "run", "--tap-url", arc.tap_url, "--sector", "1", "--out", out, "--progress-interval", "0",
        "--concurrency", "2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "progress:" in line]
    assert lines
    planned = len(Manifest(out / ".tessmirror").load())
    for line in lines:
        done_total = re.search(r"progress: (\d+)/(\?|\d+) ", line)
        assert done_total, line
        if done_total.group(2) != "?":
            assert int(done_total.group(2)) == planned, line  # a known total is the whole plan
        else:
            assert "planning… " in line and "found so far" in line
    assert "ETA" in " ".join(lines) or planned <= 2


def test_python_dash_m_engine_is_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: tessmirror" in proc.stdout and "run" in proc.stdout and "--config FILE" in proc.stdout


# -- the parser's conventions, in-process ---------------------------------------------------------
def _commands():
    import argparse

    from engine.cli import build_parser

    def walk(parser, name):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from walk(sub, f"{name} {sub_name}".strip())

    return list(walk(build_parser(), ""))


def test_every_flag_has_help_and_a_metavar_a_user_understands():
    for name, parser in _commands():
        for action in parser._actions:
            if not action.option_strings or action.help == "==SUPPRESS==":
                continue
            assert action.help, f"tessmirror {name}: {action.option_strings} has no help"
        text = parser.format_help()
        assert not re.search(r"[A-Z]+\.[A-Z_]+", text), f"tessmirror {name}: an internal key as metavar"


def test_verify_shows_only_its_own_flags():
    text = dict(_commands())["verify"].format_help()
    assert "--level" in text and "--repair" in text
    for other in ("--verify ", "--sector", "--layout", "--bandwidth", "--tap-url"):
        assert other not in text, other


def test_a_mistyped_flag_gets_a_suggestion_and_exit_2(capsys):
    from engine.cli import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(["run", "--sectr", "1", "--out", "x"])
    assert info.value.code == 2
    assert "unrecognized arguments: --sectr 1; did you mean --sector?" in capsys.readouterr().err


def test_log_level_in_the_config_file_is_honoured_from_the_first_line(archive, tmp_path):
    arc = archive(targets=16, focus=(1, 1, 2))
    config = write_config(tmp_path / "quiet.toml", arc.tap_url, tmp_path / "m")
    config.write_text(config.read_text(encoding="utf-8") + '[run]\nlog_level = "WARNING"\n', encoding="utf-8")
    proc = run_cli("run", "--config", config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert " INFO " not in proc.stderr and "downloaded  " in proc.stderr


def test_a_dry_run_that_does_not_fit_exits_4_as_the_run_would(archive, tmp_path, monkeypatch, capsys):
    """The disk reports less free space than the plan needs: the verdict says so, nothing is written."""
    import shutil
    from collections import namedtuple

    from engine import cli
    from engine.config import load_settings

    arc = archive(targets=24, focus=(1, 1, 2))
    out = tmp_path / "not-yet"
    settings = load_settings(
        None,
        {"tap.url": arc.tap_url, "selection.sector": 1, "selection.cameras": [1], "selection.ccds": [2],
         "output.out_dir": out},
    )  # fmt: skip
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    assert cli._dry_run(settings) == 4
    err = capsys.readouterr().err
    assert "free space  1.0 kB free on" in err and "does NOT fit" in err
    assert not out.exists()


def test_shell_completion_offers_the_commands_flags(tmp_path):
    """With argcomplete installed (optional), `register-python-argcomplete tessmirror` completes flags."""
    pytest.importorskip("argcomplete")
    line = "tessmirror run --sec"
    out = tmp_path / "completions"
    env = {**os.environ, "COMP_LINE": line, "COMP_POINT": str(len(line)), "_ARGCOMPLETE": "1",
           "_ARGCOMPLETE_IFS": "\n", "OUT": str(out), "PY": sys.executable}  # fmt: skip
    # argcomplete answers on descriptor 8 (and chatters on 9), as the shell's hook arranges.
    proc = subprocess.run(
        ["bash", "-c", '"$PY" -m engine 8>"$OUT" 9>/dev/null'],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert set(out.read_text().split()) == {"--sector", "--sectors"}


def test_a_long_plan_says_how_many_files_it_has_found_so_far(archive):
    arc = archive(targets=48, tap_hard_limit=5, tap_default_maxrec=5)  # many TAP pages
    proc = run_cli(
        "plan", "--tap-url", arc.tap_url, "--sector", "1", "--format", "urls", "--progress-interval", "0"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = [int(n) for n in re.findall(r"planning… (\d+) files found so far", proc.stderr)]
    assert counts and counts == sorted(counts) and counts[-1] == len(proc.stdout.split())
