"""Kill-and-resume soak: SIGKILL the CLI at random moments, resume, repeat; then check everything.

    .venv/bin/python tests/soak/kill_resume.py --rounds 100
    .venv/bin/python tests/soak/kill_resume.py --rounds 300 --targets 400 --faults "500=0.05,reset=0.05"

Each round starts `tessmirror run` against a local archive (paced so a run lasts several seconds,
with optional extra faults), sends SIGKILL after a random delay, and then checks that the manifest
loads and that no file it calls verified is missing or corrupt. When the mirror completes it is
wiped and the next round starts over, so kills keep landing mid-run. At the end one run completes
and the mirror is compared byte for byte with the archive's truth. Prints the figures (runs, kills,
files verified, faults injected, corrupt files) and exits non-zero on any failure.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.archive import ArchiveOptions, ArchiveThread, FaultPlan
from engine.manifest import Manifest
from tests.helpers import (
    assert_mirror_matches_truth,
    assert_verified_records_are_good,
    run_cli,
    spawn_cli,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=100, help="kill rounds (default 100)")
    parser.add_argument("--targets", type=int, default=200, help="light curves in the archive (default 200)")
    parser.add_argument("--faults", default="", help="extra fault spec, e.g. '500=0.05,reset=0.05'")
    parser.add_argument("--bandwidth", type=float, default=150_000, help="bytes/s per response (pacing)")
    parser.add_argument("--min-delay", type=float, default=0.3)
    parser.add_argument("--max-delay", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    spec = ",".join(x for x in (f"bandwidth={args.bandwidth:g}", args.faults) if x)
    options = ArchiveOptions(
        sectors=(1,), targets=args.targets, file_size="small", faults=FaultPlan.from_spec(spec)
    )
    workdir = Path(tempfile.mkdtemp(prefix="tessmirror-soak-"))
    out = workdir / "out"
    runs = kills = completed = checked = 0
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
                proc = spawn_cli(*cli)
                runs += 1
                time.sleep(rng.uniform(args.min_delay, args.max_delay))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    kills += 1
                _, stderr = proc.communicate(timeout=120)
                if proc.returncode not in (-signal.SIGKILL, 0, 1):
                    print(f"round {round_number}: unexpected exit {proc.returncode}\n{stderr[-2000:]}")
                    return 1
                Manifest(out / ".tessmirror").load()
                checked += assert_verified_records_are_good(out, archive)
                if proc.returncode == 0:  # finished before the kill: start over so kills stay mid-run
                    completed += 1
                    shutil.rmtree(out)
                if round_number % 10 == 0:
                    print(
                        f"round {round_number}: {kills} kills, {checked} verified records checked", flush=True
                    )
            final = run_cli(*cli, timeout=600)
            runs += 1
            if final.returncode != 0:
                print(f"final run: exit {final.returncode}\n{final.stderr[-3000:]}")
                return 1
            assert_mirror_matches_truth(out, archive, names)
            verified = assert_verified_records_are_good(out, archive)
            faults = sum(1 for r in archive.request_log if r.fault and r.fault != "")
            requests = sum(1 for r in archive.request_log if r.method == "GET")
    except AssertionError as err:
        print(f"FAILED: {err}")
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"runs {runs}, kills {kills}, mirrors completed between kills {completed}, "
        f"verified records checked after kills {checked}, files verified at the end {verified}/{len(names)}, "
        f"file requests {requests}, faults injected {faults}, files corrupt 0, "
        f"{time.monotonic() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
