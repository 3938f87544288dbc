"""The S3 route against the MAST route (Download API + its 302) on the same files, local archive.

    .venv/bin/python -m benchmarks.s3_route --files 40 --concurrency 8 --rounds 3

Both routes end on the same S3-shaped host of the local archive (`redirect_to_s3=True, s3=True`), so
the difference is what the route itself costs: with `--source mast` every file is a GET on the API
host answered with a 302, then a GET on the bucket; with `--source s3` it is one GET on the bucket.
Prints MB/s (wall clock, best of the rounds) and requests per file (from the archive's request log).
On loopback the bytes cost nothing to move, so this measures round trips and per-request overhead;
over a real WAN each saved round trip is one RTT per file, and the bandwidth difference (S3 in-region
vs MAST's servers) is not modelled here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

from engine.archive import ArchiveOptions, LocalArchive
from engine.archive.catalog import download_url
from engine.fetch.download import Downloader
from engine.fetch.session import open_session
from engine.models import FileStatus, PlanItem
from engine.settings import FetchSettings, VerifySettings


def plan_of(archive: LocalArchive, count: int) -> list[PlanItem]:
    assert archive.catalog is not None
    chosen = [e for e in archive.catalog.values() if e.product in ("lc", "tp")][:count]
    return [
        PlanItem(
            url=download_url(archive.base_url, e.uri),
            filename=e.name,
            obs_id=e.obs_id,
            product=e.product,
            sector=1,
            size=e.size,
            md5=e.md5,
        )
        for e in chosen
    ]


async def one_round(archive: LocalArchive, items: list[PlanItem], source: str, concurrency: int) -> dict:
    fetch = FetchSettings(source=source, s3_endpoint=archive.s3_url, concurrency=concurrency)
    out = Path(tempfile.mkdtemp(prefix=f"s3route-{source}-"))
    before = len(archive.request_log)
    queue: asyncio.Queue[PlanItem] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    failed = 0
    async with open_session(fetch) as session:
        downloader = Downloader(session, fetch, VerifySettings(level="checksum"), fsync=False)

        async def worker() -> None:
            nonlocal failed
            while not queue.empty():
                item = queue.get_nowait()
                result = await downloader.fetch(item, out / item.filename, item.filename)
                failed += result.status is not FileStatus.VERIFIED

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        downloader.close()
    shutil.rmtree(out, ignore_errors=True)
    log = archive.request_log[before:]
    total = sum(i.size for i in items)
    return {
        "source": source,
        "seconds": round(elapsed, 3),
        "mb_per_s": round(total / elapsed / 1e6, 1),
        "requests_per_file": round(len(log) / len(items), 2),
        "api_requests": sum(r.host == "api" for r in log),
        "s3_requests": sum(r.host == "s3" for r in log),
        "failed": failed,
    }


async def main(files: int, concurrency: int, rounds: int, file_size: str) -> list[dict]:
    options = ArchiveOptions(
        sectors=(1,),
        targets=max(files, 8),
        focus=(1, 1, 2),
        file_size=file_size,
        redirect_to_s3=True,
        s3=True,
    )
    async with LocalArchive(options) as archive:
        items = plan_of(archive, files)
        await one_round(archive, items, "s3", concurrency)  # warm-up: renders every file once
        best: dict[str, dict] = {}
        for _ in range(rounds):
            for source in ("mast", "s3"):
                row = await one_round(archive, items, source, concurrency)
                if source not in best or row["seconds"] < best[source]["seconds"]:
                    best[source] = row
        return [
            {**row, "files": len(items), "bytes": sum(i.size for i in items), "concurrency": concurrency}
            for row in best.values()
        ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--file-size", default="full", help="full (2 MB light curves) or small")
    args = parser.parse_args()
    for row in asyncio.run(main(args.files, args.concurrency, args.rounds, args.file_size)):
        print(json.dumps(row))
