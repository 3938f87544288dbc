"""Helpers shared by the integration tests: run the real CLI in a subprocess, check a mirror against
the archive's truth."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.manifest import Manifest


def stacks_of(pid: int, *, children: bool = True) -> str:
    """For the message of a test whose process hung: `pid` and (with `children`) every process under
    it, with the Python stack of each thread as py-spy reads it (the test extra installs py-spy)."""
    import shutil

    import psutil

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    try:
        tree = [psutil.Process(pid), *(psutil.Process(pid).children(recursive=True) if children else ())]
    except psutil.Error:
        return f"process {pid} is gone"
    lines: list[str] = []
    for proc in tree:
        try:
            lines.append(f"== process {proc.pid} ({proc.status()}): {' '.join(proc.cmdline())[:200]}")
        except psutil.Error:
            continue
        try:
            dump = subprocess.run(
                [spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True, timeout=30
            )
            lines.append(dump.stdout.strip() or dump.stderr.strip()[:300])
        except (OSError, subprocess.TimeoutExpired) as err:
            lines.append(f"(py-spy: {err})")
    return "\n".join(lines)


def cli_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "engine.cli", *map(str, args)]


def run_cli(*args: object, timeout: float = 120, env: dict[str, str] | None = None, cwd: Path | None = None):
    """Run `tessmirror ARGS...` as a user would; returns the CompletedProcess (text mode)."""
    return subprocess.run(
        cli_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def spawn_cli(*args: object, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        cli_command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


@contextmanager
def file_server(handler: Callable[..., Awaitable]) -> Iterator[str]:
    """GET /files/{name} answered by `handler`, on an event loop of its own in a thread, at 127.0.0.1
    on a free port; yields the base URL and stops the server afterwards."""
    from aiohttp import web

    started = threading.Event()
    state: dict[str, object] = {}

    def serve() -> None:
        loop = asyncio.new_event_loop()
        state["loop"] = loop

        async def main() -> None:
            app = web.Application()
            app.router.add_get("/files/{name}", handler)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            state["port"] = runner.addresses[0][1]
            stop = asyncio.Event()
            state["stop"] = stop
            started.set()
            await stop.wait()
            await runner.cleanup()

        loop.run_until_complete(main())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(30), "the file server did not start"
    try:
        yield f"http://127.0.0.1:{state['port']}"
    finally:
        loop: asyncio.AbstractEventLoop = state["loop"]  # type: ignore[assignment]
        loop.call_soon_threadsafe(state["stop"].set)  # type: ignore[attr-defined]
        thread.join(30)


def wait_until(condition, *, timeout: float = 60.0, interval: float = 0.05) -> bool:
    """Poll `condition()` until it is true (returns True) or `timeout` seconds pass (returns False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


def manifest_lines(path: Path) -> int:
    """How many records a manifest file holds so far (0 before it exists)."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def mirrored_files(out_dir: Path) -> dict[str, Path]:
    """File name -> path for every finished file under out_dir (state dir and .part files excluded)."""
    found: dict[str, Path] = {}
    for path in out_dir.rglob("*"):
        # NAME.part, and the cluster executor's NAME.part.<host>.<pid>
        if path.is_file() and ".tessmirror" not in path.parts and not re.search(r"\.part(\.|$)", path.name):
            found[path.name] = path
    return found


def assert_mirror_matches_truth(out_dir: Path, archive, names: set[str]) -> None:
    """Every expected file is present and byte-identical to the archive's (size and md5)."""
    files = mirrored_files(out_dir)
    missing = names - set(files)
    assert not missing, f"missing from the mirror: {sorted(missing)[:5]}"
    for name in names:
        truth = archive.catalog[name]
        path = files[name]
        assert path.stat().st_size == truth.size, f"{name}: size {path.stat().st_size} != {truth.size}"
        assert md5_of(path) == truth.md5, f"{name}: md5 differs from the archive's"


def assert_verified_records_are_good(out_dir: Path, archive) -> int:
    """No file the manifest calls verified is missing or corrupt. Returns how many were checked."""
    state = out_dir / ".tessmirror"
    checked = 0
    for entry in Manifest(state).load().values():
        if entry.status != "verified":
            continue
        path = out_dir / entry.path
        truth = archive.catalog[path.name]
        assert path.exists(), f"manifest says verified but {entry.path} is missing"
        assert md5_of(path) == truth.md5 == entry.md5, f"manifest says verified but {entry.path} is corrupt"
        checked += 1
    return checked


def lc_names_in_footprint(archive, sector: int, camera: int, ccd: int) -> set[str]:
    """The archive's truth, computed from the catalogue (not through TAP): the TESS light-curve files
    whose target lies in that CCD's footprint, in every sector."""
    from engine.archive.geometry import polygon_contains

    vertices = archive.catalog.footprints[(sector, camera, ccd)]
    obscore = archive.catalog.tables["ivoa.obscore"]
    names: set[str] = set()
    cols = {
        name: obscore.column(name)
        for name in ("obs_collection", "dataproduct_type", "access_url", "s_ra", "s_dec")
    }
    for i, url in enumerate(cols["access_url"]):
        if cols["obs_collection"][i] != "TESS" or cols["dataproduct_type"][i] != "timeseries":
            continue
        if not url.endswith("lc.fits"):
            continue
        if bool(polygon_contains([cols["s_ra"][i]], [cols["s_dec"][i]], vertices)[0]):
            names.add(url.rsplit("/", 1)[-1])
    return names


class WatchedCli:
    """`tessmirror ARGS...` in a subprocess whose stderr is read as it comes, so a test can wait for a
    log line (observable progress) before it acts, instead of sleeping and hoping."""

    def __init__(
        self,
        *args: object,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stdin: object = subprocess.DEVNULL,
    ) -> None:
        self.proc = subprocess.Popen(
            cli_command(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=stdin,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        self._lines: list[str] = []
        self._stdout = ""
        self._readers = [
            threading.Thread(target=self._read_stderr, daemon=True),
            threading.Thread(target=self._read_stdout, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._lines.append(line)

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        self._stdout = self.proc.stdout.read()

    @property
    def stderr(self) -> str:
        return "".join(self._lines)

    def saw(self, phrase: str) -> bool:
        return phrase in self.stderr

    def wait_for(self, phrase: str, *, timeout: float = 60.0) -> None:
        """Block until stderr shows `phrase`; fail at once if the process ends first."""

        def seen() -> bool:
            if self.saw(phrase):
                return True
            assert self.proc.poll() is None, (
                f"ended (exit {self.proc.returncode}) before {phrase!r}:\n{self.stderr[-3000:]}"
            )
            return False

        assert wait_until(seen, timeout=timeout), f"no {phrase!r} within {timeout} s:\n{self.stderr[-3000:]}"

    def signal(self, signum: int) -> float:
        """Send `signum`; returns the monotonic time it was sent."""
        self.proc.send_signal(signum)
        return time.monotonic()

    def finish(self, *, timeout: float = 60.0, shown: int = 3000) -> tuple[int, float]:
        """Wait for the exit (killing it after `timeout`, and failing with the last `shown` characters
        of its stderr); returns (exit code, monotonic end time)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stacks = stacks_of(self.proc.pid)
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"still running {timeout} s later:\n{self.stderr[-shown:]}\n-- where it was --\n{stacks}"
            ) from None
        ended = time.monotonic()
        for reader in self._readers:
            reader.join(timeout=10)
        return self.proc.returncode, ended

    @property
    def stdout(self) -> str:
        return self._stdout


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts connections and never answers: a hung TAP service.

    `url` is an http URL on it; `accepted` counts connections, so a test knows a client is waiting.
    """

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/tap"
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self._held.append(conn)  # kept open, never read from, never answered
            self.accepted += 1

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self._held:
            conn.close()
        self._sock.close()


def lock_files(out_dir: Path) -> list[Path]:
    """Run locks left under an output folder (none once a run has ended gracefully)."""
    return list(out_dir.rglob("run.lock")) if out_dir.exists() else []


class FakeClock:
    """An `engine.models.Clock` whose time moves only when a test moves it or something sleeps.

    `now` is the monotonic reading (tests may add to it); `time()` is `epoch + now`; every sleep is
    recorded in `sleeps` and yields to the event loop once, as a real sleep would.
    """

    def __init__(self, now: float = 0.0, *, epoch: float = 0.0) -> None:
        self.now = now
        self.epoch = epoch
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.epoch + self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)
