"""Measuring one tool: a subprocess timed by the wall clock, its CPU and peak RSS from wait4(2),
and its output checked file by file against the archive's md5s."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil


@dataclass
class Measured:
    """What one subprocess cost: wall seconds, CPU seconds (user+system, its children included),
    peak RSS in MiB (the largest process of its tree: the kernel's VmHWM, polled), exit code."""

    wall: float
    cpu: float
    peak_rss_mb: float
    returncode: int
    log: Path
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, RSS MiB)


def run_measured(
    cmd: Sequence[str],
    log: Path,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 900.0,
    stop_when: Callable[[float], bool] | None = None,
    sample_every: float = 0.0,
) -> Measured:
    """Run `cmd` to the end (or SIGTERM it once `stop_when(elapsed)` is true) and measure it.

    wait4 gives the CPU time of exactly this child (and the descendants it waited for), so it is per
    tool even when other work shares the machine. Its ru_maxrss is not used: it counts the memory of
    the forked benchmark process before exec. The peak RSS is the kernel's high-water mark (VmHWM,
    which exec resets), read every poll for the tool and each of its children.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    samples: list[tuple[float, float]] = []
    with open(log, "wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd), stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env, stdin=subprocess.DEVNULL
        )
        ps = psutil.Process(proc.pid)
        terminated = False
        poll = sample_every or 0.05
        peak_kb = 0
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            elapsed = time.perf_counter() - started
            peak_kb = max(peak_kb, _tree_hwm_kb(ps))
            if sample_every:
                with contextlib.suppress(psutil.Error):  # it may have just exited
                    samples.append((elapsed, ps.memory_info().rss / 2**20))
            if not terminated and (elapsed > timeout or (stop_when is not None and stop_when(elapsed))):
                proc.send_signal(signal.SIGTERM)
                terminated = True
            time.sleep(poll)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # wait4 reaped it; keep Popen consistent
    return Measured(
        wall=wall,
        cpu=rusage.ru_utime + rusage.ru_stime,
        peak_rss_mb=peak_kb / 1024,
        returncode=proc.returncode,
        log=log,
        samples=samples,
    )


def _hwm_kb(pid: int) -> int:
    """The peak resident set (VmHWM, kB) of one live process since its exec; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _tree_hwm_kb(ps: psutil.Process) -> int:
    """The largest VmHWM among the process and its live children."""
    try:
        children = ps.children(recursive=True)
    except psutil.Error:
        children = []
    return max([_hwm_kb(ps.pid), *(_hwm_kb(c.pid) for c in children)])


def md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class OutputCheck:
    expected: int
    ok: int
    missing: list[str]
    corrupt: list[str]
    nbytes: int  # bytes of the good files

    @property
    def clean(self) -> bool:
        return not self.missing and not self.corrupt


def check_output(out_dir: Path, truth: dict[str, tuple[int, str]], names: Sequence[str]) -> OutputCheck:
    """Every expected file, found by name anywhere under `out_dir`, must have the archive's md5.

    Tools lay files out differently (tessmirror's MAST layout, flat for the rest), so files are
    matched by name; tessmirror's state folder and leftover partial files are ignored.
    """
    found: dict[str, Path] = {}
    for root, dirs, files in os.walk(out_dir):
        dirs[:] = [d for d in dirs if d != ".tessmirror"]
        for name in files:
            found.setdefault(name, Path(root) / name)
    missing = [n for n in names if n not in found]
    present = [n for n in names if n in found]

    def good(name: str) -> bool:
        size, md5 = truth[name]
        path = found[name]
        return path.stat().st_size == size and md5_file(path) == md5

    # hashlib releases the GIL on large buffers: threads hash in parallel.
    with ThreadPoolExecutor(4) as pool:
        verdicts = list(pool.map(good, present))
    corrupt = [n for n, v in zip(present, verdicts, strict=True) if not v]
    nbytes = sum(truth[n][0] for n, v in zip(present, verdicts, strict=True) if v)
    return OutputCheck(len(names), len(present) - len(corrupt), missing, corrupt, nbytes)


class ArchiveProcess:
    """`benchmarks.archive_proc` in a subprocess; `command()` sends one JSON command."""

    def __init__(self, options: dict, log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.archive_proc", json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        ready = self._answer()
        if not ready.get("ready"):
            raise RuntimeError(f"the archive did not start: {ready}")
        self.tap_url: str = ready["tap_url"]
        self.base_url: str = ready["base_url"]
        self.start_seconds: float = ready["start_seconds"]

    def _answer(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the archive process exited (code {self.proc.poll()}); see {self._log.name}")
        return json.loads(line)

    def command(self, **command: object) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        answer = self._answer()
        if not answer.get("ok"):
            raise RuntimeError(f"archive command {command} failed: {answer.get('error')}")
        return answer

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command(cmd="stop")
                self.proc.wait(timeout=30)
            except (RuntimeError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> ArchiveProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
