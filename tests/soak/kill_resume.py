"""Kill-and-resume soak: signal the CLI at random moments, resume, repeat; then check everything.

    .venv/bin/python tests/soak/kill_resume.py --rounds 100
    .venv/bin/python tests/soak/kill_resume.py --rounds 30 --signals term,hup,kill
    .venv/bin/python tests/soak/kill_resume.py --rounds 300 --targets 400 --faults "500=0.05,reset=0.05"

Each round starts `tessmirror run` against a local archive (paced so a run lasts several seconds,
with optional extra faults), waits for its start banner, then after a random delay sends one of
`--signals` (SIGTERM, SIGHUP or SIGKILL, chosen at random each round). After each round it checks:
a graceful stop (TERM 130, HUP 129) released the lock, left no traceback and took under 5 s; the
manifest loads; no file it calls verified is missing or corrupt; nothing outside --out changed (a
sentinel folder next to it, checked byte for byte, and no new entries beside it). When the mirror
completes it is wiped and the next round starts over, so signals keep landing mid-run. At the end
one run completes and the mirror is compared byte for byte with the archive's truth. Prints the
figures and exits non-zero on any failure.
Not collected by pytest (no test_ prefix); the CI's 10-round version is tests/integration/test_crash.py.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.archive import ArchiveOptions, ArchiveThread, FaultPlan
from engine.manifest import Manifest
from tests.helpers import (
    WatchedCli,
    assert_mirror_matches_truth,
    assert_verified_records_are_good,
    lock_files,
    md5_of,
    run_cli,
    wait_until,
)

SIGNALS = {"term": signal.SIGTERM, "hup": signal.SIGHUP, "kill": signal.SIGKILL}
GRACEFUL_EXIT = {signal.SIGTERM: 130, signal.SIGHUP: 129}
STOP_WITHIN = 5.0


def _snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> md5 (or '<dir>'/'<link>') of everything under `folder`."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            found[rel] = "<link>"
        elif path.is_dir():
            found[rel] = "<dir>"
        else:
            found[rel] = md5_of(path)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=100, help="kill rounds (default 100)")
    parser.add_argument("--targets", type=int, default=200, help="light curves in the archive (default 200)")
    parser.add_argument("--faults", default="", help="extra fault spec, e.g. '500=0.05,reset=0.05'")
    parser.add_argument("--bandwidth", type=float, default=150_000, help="bytes/s per response (pacing)")
    parser.add_argument("--min-delay", type=float, default=0.0, help="seconds after the start banner")
    parser.add_argument("--max-delay", type=float, default=4.0)
    parser.add_argument(
        "--signals", default="kill", help="comma-separated mix of term, hup, kill (default kill)"
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        mix = [SIGNALS[name.strip().lower()] for name in args.signals.split(",") if name.strip()]
    except KeyError as err:
        parser.error(f"--signals: unknown signal {err.args[0]!r}; use term, hup, kill")
    if not mix:
        parser.error("--signals: give at least one of term, hup, kill")

    rng = random.Random(args.seed)
    spec = ",".join(x for x in (f"bandwidth={args.bandwidth:g}", args.faults) if x)
    options = ArchiveOptions(
        sectors=(1,), targets=args.targets, file_size="small", faults=FaultPlan.from_spec(spec)
    )
    workdir = Path(tempfile.mkdtemp(prefix="tessmirror-soak-"))
    out = workdir / "out"
    sentinel = workdir / "sentinel"
    sentinel.mkdir()
    (sentinel / "victim.txt").write_text("nothing may write here\n")
    (sentinel / "nested").mkdir()
    (sentinel / "nested" / "keep.bin").write_bytes(bytes(range(256)) * 64)
    sentinel_before = _snapshot(sentinel)
    beside_out = {"out", "sentinel"}
    runs = completed = checked = 0
    sent = Counter()
    exits = Counter()
    slowest_stop = 0.0
    started = time.monotonic()
    try:
        with ArchiveThread(options) as running:
            archive = running.archive
            assert archive is not None
            names = {
                n for n, f in archive.catalog.files.items() if f.product == "lc" and f.collection == "TESS"
            }
            cli = ["run", "--tap-url", archive.tap_url, "--sector", 1, "--out", out, "--concurrency", 4]
            for round_number in range(1, args.rounds + 1):
                signum = rng.choice(mix)
                watched = WatchedCli(*cli)
                runs += 1
                ready = wait_until(
                    lambda w=watched: w.saw("starting run") or w.proc.poll() is not None, timeout=120
                )
                assert ready, f"round {round_number}: no start banner within 120 s"
                deadline = time.monotonic() + rng.uniform(args.min_delay, args.max_delay)
                wait_until(lambda w=watched, d=deadline: w.proc.poll() is not None or time.monotonic() >= d)
                signalled = watched.proc.poll() is None
                if signalled:
                    at = watched.signal(signum)
                    sent[signal.Signals(signum).name] += 1
                code, ended = watched.finish(timeout=120)
                exits[code] += 1
                stderr = watched.stderr
                allowed = {0, 1, GRACEFUL_EXIT.get(signum, -signal.SIGKILL)} if signalled else {0, 1}
                assert code in allowed, f"round {round_number}: exit {code} after {signum}\n{stderr[-2000:]}"
                if signalled and signum in GRACEFUL_EXIT and code == GRACEFUL_EXIT[signum]:
                    slowest_stop = max(slowest_stop, ended - at)
                    assert ended - at < STOP_WITHIN, f"round {round_number}: {ended - at:.1f} s to stop"
                    assert "Traceback" not in stderr, f"round {round_number}:\n{stderr[-2000:]}"
                    assert not lock_files(out), f"round {round_number}: the lock was left behind"
                Manifest(out / ".tessmirror").load()
                checked += assert_verified_records_are_good(out, archive)
                assert _snapshot(sentinel) == sentinel_before, f"round {round_number}: the sentinel changed"
                beside = {p.name for p in workdir.iterdir()}
                assert beside <= beside_out, (
                    f"round {round_number}: written outside --out: {beside - beside_out}"
                )
                if code == 0:  # finished before the signal: start over so signals stay mid-run
                    completed += 1
                    shutil.rmtree(out)
                if round_number % 10 == 0:
                    print(
                        f"round {round_number}: {dict(sent)} sent, {checked} verified records checked",
                        flush=True,
                    )
            final = run_cli(*cli, timeout=600)
            runs += 1
            if final.returncode != 0:
                print(f"final run: exit {final.returncode}\n{final.stderr[-3000:]}")
                return 1
            assert_mirror_matches_truth(out, archive, names)
            verified = assert_verified_records_are_good(out, archive)
            assert _snapshot(sentinel) == sentinel_before, "the sentinel changed"
            faults = sum(1 for r in archive.request_log if r.fault and r.fault != "")
            requests = sum(1 for r in archive.request_log if r.method == "GET")
    except AssertionError as err:
        print(f"FAILED: {err}")
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"runs {runs}, signals sent {dict(sent)}, exit codes {dict(sorted(exits.items()))}, "
        f"mirrors completed between signals {completed}, slowest graceful stop {slowest_stop:.2f} s, "
        f"verified records checked after signals {checked}, "
        f"files verified at the end {verified}/{len(names)}, "
        f"file requests {requests}, faults injected {faults}, files corrupt 0, files outside --out 0, "
        f"{time.monotonic() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
