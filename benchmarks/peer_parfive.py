"""parfive, SunPy's aiohttp downloader, on the same file list.

    python -m benchmarks.peer_parfive URLS_AND_NAMES.tsv OUT_DIR [--max-conn N] [--max-splits M]

Without options it runs at parfive's defaults (max_conn=5, max_splits=5: up to 25 connections, each
file split into Range requests). `--max-conn N --max-splits 1` gives exactly N connections, the
same as tessmirror's `--concurrency N`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from parfive import Downloader


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("listing", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--max-conn", type=int)
    parser.add_argument("--max-splits", type=int)
    ns = parser.parse_args(argv)
    kwargs = {"progress": False, "overwrite": True}
    if ns.max_conn is not None:
        kwargs["max_conn"] = ns.max_conn
    if ns.max_splits is not None:
        kwargs["max_splits"] = ns.max_splits
    ns.out_dir.mkdir(parents=True, exist_ok=True)
    downloader = Downloader(**kwargs)
    for line in ns.listing.read_text().splitlines():
        url, name = line.split("\t")
        downloader.enqueue_file(url, path=ns.out_dir, filename=name)
    results = downloader.download()
    print(f"parfive: {len(results)} files, {len(results.errors)} errors", file=sys.stderr)
    for error in results.errors[:3]:  # what went wrong, for the benchmark's log
        print(f"  {error.url}: {repr(error.exception)[:400]}", file=sys.stderr)
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
