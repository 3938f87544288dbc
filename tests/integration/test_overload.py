"""Overload: the archive answers 429/503 to many requests; the engine slows down, waits, recovers.

The engine runs in-process (engine.manager.MirrorRun, as engine.api does) so the test can watch its
AdaptiveLimiter: the concurrency limit must fall under overload and climb back afterwards. The
archive's request log shows the rest: Retry-After waited for, and a bounded number of requests per
file (no hammering).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from pathlib import Path

import pytest

from engine.api import build_settings
from engine.archive import FaultPlan
from engine.fetch.download import Downloader
from engine.fetch.throttle import AdaptiveLimiter
from engine.manager import MirrorRun
from tests.helpers import assert_mirror_matches_truth, assert_verified_records_are_good

pytestmark = pytest.mark.integration

CONCURRENCY = 16
RETRY_AFTER = 0.1
OVERLOADED_TRIES = 2  # the archive refuses a file's first two tries (each at 50%), then serves it


def light_curves(archive) -> set[str]:
    return {n for n, f in archive.catalog.files.items() if f.product == "lc" and f.collection == "TESS"}


def test_concurrency_adapts_down_and_recovers(archive, tmp_path: Path) -> None:
    spec = (
        f"429=0.5:retry_after={RETRY_AFTER}:attempts={OVERLOADED_TRIES},"
        f"503=0.5:retry_after={RETRY_AFTER}:attempts={OVERLOADED_TRIES},"
        "latency=0.02,bandwidth=2000000"
    )
    arch = archive(sectors=(1,), targets=120, file_size="small", faults=FaultPlan.from_spec(spec))
    names = light_curves(arch)
    settings = build_settings(
        tap_url=arch.tap_url, sector=1, out_dir=tmp_path / "out", concurrency=CONCURRENCY, retries=6
    )
    settings.fetch.backoff_initial = 0.05
    settings.fetch.backoff_max = 0.5
    limiters: list[AdaptiveLimiter] = []
    samples: list[tuple[int, int]] = []  # (limit, in flight), sampled while the run goes on

    def downloader(*args, **kwargs) -> Downloader:
        limiters.append(kwargs["throttle"])
        return Downloader(*args, **kwargs)

    async def main():
        run = asyncio.create_task(
            MirrorRun(settings, downloader_factory=downloader, handle_signals=False).run()
        )
        while not run.done():
            if limiters:
                samples.append((limiters[0].limit, limiters[0].in_flight))
            await asyncio.sleep(0.01)
        return await run

    outcome = asyncio.run(main())

    assert outcome.exit_code == 0, outcome.errors[:5]
    assert_mirror_matches_truth(tmp_path / "out", arch, names)
    assert assert_verified_records_are_good(tmp_path / "out", arch) == len(names)
    limiter = limiters[0]
    lowest = min(limit for limit, _ in samples)
    # Adapted downwards: the limit fell to a quarter or less, and never more was in flight.
    assert lowest <= CONCURRENCY // 4, f"the limit only fell to {lowest}"
    assert limiter.decreases >= 2 and limiter.overload_events > limiter.decreases  # one cut per window
    # ... and recovered once the archive stopped refusing.
    assert limiter.increases >= 2 and samples[-1][0] > lowest

    gets: dict[str, list] = defaultdict(list)
    for record in arch.request_log:
        if record.method == "GET":
            gets[record.name].append(record)
    refused = [r for records in gets.values() for r in records if r.fault in ("429", "503")]
    assert len(refused) >= 0.4 * len(names)
    # No hammering: each file took at most its refused tries plus one, and the run as a whole asked
    # fewer than (refused tries + 1) per file.
    per_file = [len(records) for records in gets.values()]
    assert max(per_file) <= OVERLOADED_TRIES + 1
    assert sum(per_file) == len(refused) + len(names)
    # Retry-After honoured: a file's retry never comes sooner than the Retry-After that refused it.
    for records in gets.values():
        records.sort(key=lambda r: r.time)
        for answer, retry in itertools.pairwise(records):
            if answer.fault in ("429", "503"):
                assert retry.time - answer.time >= RETRY_AFTER - 0.01
    print(
        f"overload: {len(names)} files, {sum(per_file)} requests ({sum(per_file) / len(names):.2f}/file), "
        f"{len(refused)} refused; limit {CONCURRENCY} -> {lowest} -> {samples[-1][0]}; "
        f"decreases {limiter.decreases}, increases {limiter.increases}, overloads {limiter.overload_events}"
    )
