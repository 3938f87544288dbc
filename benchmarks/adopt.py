"""Adopting files already on disk vs `tessmirror verify` on the same tree.

    python -m benchmarks.adopt [N]

N files (default 10,000) of 11,520 bytes are written into a flat mirror with no manifest, then a run
is planned over them with no network at all (a downloader that refuses to be called): every file is
verified in place at `checksum` level and recorded as adopted. Then `verify` checks the same tree.
Prints wall time, files/s and CPU seconds of each, and their ratio.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from engine.manager import MirrorRun
from engine.manifest import Manifest
from engine.mirrorcheck import check_mirror
from engine.models import PlanItem, VerifyLevel
from engine.plan.sources import TablePlan
from engine.plan.table import items_to_table
from engine.progress import Progress
from engine.settings import Settings

SIZE = 2880 * 4


@contextlib.asynccontextmanager
async def no_session(*_args, **_kwargs):
    yield None


class NoDownload:
    """A downloader that fails the benchmark if anything is fetched: every file must be adopted."""

    def __init__(self, *_args, **_kwargs) -> None:
        pass

    async def fetch(self, item, dest, relpath):
        raise AssertionError(f"{relpath} was downloaded; it should have been adopted")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 10_000
    root = Path(tempfile.mkdtemp(prefix="adopt-bench-"))
    try:
        out = root / "out"
        out.mkdir(parents=True)
        data = (b"SIMPLE  =" + b" " * SIZE)[:SIZE]
        md5 = hashlib.md5(data).hexdigest()
        items = []
        for i in range(n):
            name = f"f{i:06d}_lc.fits"
            (out / name).write_bytes(data)
            items.append(
                PlanItem(
                    url=f"http://127.0.0.1:1/x?uri={name}", filename=name, obs_id=f"o{i}", size=SIZE, md5=md5
                )
            )
        settings = Settings()
        settings.output.out_dir = out
        settings.output.layout = "flat"
        settings.output.fsync = False
        settings.verify.level = VerifyLevel.CHECKSUM
        run = MirrorRun(
            settings,
            TablePlan(items_to_table(items)),
            session_factory=no_session,
            downloader_factory=NoDownload,
            progress=Progress(bar=False),
            handle_signals=False,
            collect_results=False,
        )
        wall, cpu = time.perf_counter(), cpu_seconds()
        outcome = asyncio.run(run.run())
        adopt_s, adopt_cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        assert outcome.adopted == n, (outcome.adopted, outcome.failed, outcome.errors[:3])
        wall, cpu = time.perf_counter(), cpu_seconds()
        report = check_mirror(
            out, Manifest(settings.state_dir), level=VerifyLevel.CHECKSUM, workers=settings.verify.workers
        )
        verify_s, verify_cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        assert report.ok == n, report.ok
        print("| task | files | wall | files/s | CPU s |")
        print("|---|---|---|---|---|")
        print(f"| adopt in place (run) | {n:,} | {adopt_s:.2f} s | {n / adopt_s:,.0f} | {adopt_cpu:.2f} |")
        print(f"| tessmirror verify | {n:,} | {verify_s:.2f} s | {n / verify_s:,.0f} | {verify_cpu:.2f} |")
        print(f"adopting costs {adopt_s / verify_s:.2f}x the time of verify on the same tree")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
