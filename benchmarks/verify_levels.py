"""What each verification level costs, and what `tessmirror verify` costs on a big mirror.

    .venv/bin/python benchmarks/verify_levels.py levels [--repeat 200]
    .venv/bin/python benchmarks/verify_levels.py mirror [--files 200000] [--level checksum]

`levels`: one full-size light curve (2,039,040 bytes, rendered by the local archive's generator) is
verified `--repeat` times at each level, the way the Downloader does it: the body is fed to a
`StreamCheck` in `fetch.chunk_size` blocks (size: count + sniff + cap; checksum: the same plus md5 of
every block), then `verify_fits` reads the finished file (fits). It prints wall and CPU time per file
for each level, what each level adds over the one below, and the ratios. The file is in the page
cache, so these are the costs of the checks themselves, not of the disk.

`mirror`: builds a synthetic mirror of `--files` small FITS files (one 5,760-byte file with
CHECKSUM/DATASUM, hard-linked under every name, so the disk holds a few copies) and a manifest with one
record each (plus a superseded record for one file in ten), then runs `check_mirror` in a fresh
process and prints its wall time, CPU time and peak RSS (resource.getrusage; the RSS after imports is
printed too, so the check's own share is visible).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.models import PlanItem, VerifyLevel  # noqa: E402
from engine.settings import FetchSettings, VerifySettings  # noqa: E402
from engine.verify.fits import verify_fits  # noqa: E402
from engine.verify.stream import StreamCheck  # noqa: E402


# -- levels ---------------------------------------------------------------------------------------
def _full_light_curve(directory: Path) -> tuple[Path, PlanItem]:
    from engine.archive.fitsgen import FileIdentity, full_cadences, render_bytes

    name = "tess2018206045859-s0001-0000000025155310-0120-s_lc.fits"
    data = render_bytes(
        FileIdentity(name, "lc", 25155310, 1, 1, 2, 30.0, -60.0), cadences=full_cadences(), seed=0
    )
    path = directory / name
    path.write_bytes(data)
    item = PlanItem(
        url=f"http://127.0.0.1/{name}", filename=name, size=len(data), md5=hashlib.md5(data).hexdigest()
    )
    return path, item


def _stream(item: PlanItem, level: VerifyLevel, blocks: list[memoryview]) -> None:
    check = StreamCheck(item, level)
    check.expect_total(item.size)
    for block in blocks:
        check.feed(block)
    check.finish()


def _timed(fn: Callable[[], None], repeat: int) -> tuple[float, float]:
    """Median wall and CPU seconds of one call (after one warm-up call)."""
    fn()
    walls, cpus = [], []
    for _ in range(repeat):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall0)
        cpus.append(time.process_time() - cpu0)
    return statistics.median(walls), statistics.median(cpus)


def bench_levels(repeat: int) -> None:
    chunk = FetchSettings().chunk_size
    with tempfile.TemporaryDirectory(prefix="tessmirror-bench-") as tmp:
        path, item = _full_light_curve(Path(tmp))
        data = path.read_bytes()
        blocks = [memoryview(data)[i : i + chunk] for i in range(0, len(data), chunk)]
        size = _timed(lambda: _stream(item, VerifyLevel.SIZE, blocks), repeat)
        checksum = _timed(lambda: _stream(item, VerifyLevel.CHECKSUM, blocks), repeat)
        fits_only = _timed(lambda: verify_fits(path), repeat)
    fits = (checksum[0] + fits_only[0], checksum[1] + fits_only[1])
    mb = len(data) / 1e6
    print(f"one light curve: {len(data):,} bytes, fed in {chunk // 1024} KiB blocks; median of {repeat} runs")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print()
    print(f"{'level':<10}{'wall ms/file':>14}{'CPU ms/file':>13}{'adds wall ms':>14}{'MB/s (wall)':>13}")
    rows = [
        ("size", size, size),
        ("checksum", checksum, (checksum[0] - size[0], 0.0)),
        ("fits", fits, fits_only),
    ]
    for name, (wall, cpu), (added, _) in rows:
        print(f"{name:<10}{wall * 1e3:>14.3f}{cpu * 1e3:>13.3f}{added * 1e3:>14.3f}{mb / wall:>13.0f}")
    print()
    print(f"checksum / size : {checksum[0] / size[0]:6.1f}x wall")
    print(f"fits / checksum : {fits[0] / checksum[0]:6.1f}x wall")
    print(f"fits / size     : {fits[0] / size[0]:6.1f}x wall")
    print(f"verify_fits alone: {fits_only[0] * 1e3:.3f} ms wall, {fits_only[1] * 1e3:.3f} ms CPU per file")
    print(
        f"one core at level fits: {1 / fits[0]:.0f} files/s ({mb / fits[0]:.0f} MB/s); "
        f"verify.workers={VerifySettings().workers} threads for the FITS part: "
        f"{VerifySettings().workers / fits_only[0]:.0f} files/s"
    )


# -- mirror ---------------------------------------------------------------------------------------
_LINKS_PER_INODE = 50_000


def _small_fits(path: Path) -> None:
    import numpy as np
    from astropy.io import fits

    table = fits.BinTableHDU.from_columns(
        [fits.Column(name="TIME", format="D", array=np.arange(100, dtype=float))], name="LIGHTCURVE"
    )
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path, checksum=True)


def build_mirror(root: Path, files: int) -> None:
    """A mirror of `files` hard links to one small FITS file, and its manifest."""
    from engine.manifest import Manifest, ManifestEntry, encode_entry

    out = root / "mirror"
    if (root / "built").exists() and json.loads((root / "built").read_text()) == files:
        return
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    template = root / "template.fits"
    for old in root.glob("template*.fits"):
        old.unlink()
    _small_fits(template)
    size, md5 = template.stat().st_size, hashlib.md5(template.read_bytes()).hexdigest()
    manifest = Manifest(out / ".tessmirror")
    manifest.state_dir.mkdir()
    per_dir = 200  # the "mast" layout keeps directories small; so does this
    with open(manifest.path, "wb") as handle:
        for index in range(files):
            rel = f"s0001/{index // per_dir:05d}/tess2018206045859-s0001-{index:016d}-0120-s_lc.fits"
            target = out / rel
            if index % per_dir == 0:
                target.parent.mkdir(parents=True)
            if index % _LINKS_PER_INODE == 0:  # ext4 allows 65,000 links to one inode
                source = root / f"template-{index // _LINKS_PER_INODE}.fits"
                shutil.copyfile(template, source)
            os.link(source, target)
            url = f"http://127.0.0.1:1/api/v0.1/Download/file?uri=mast:TESS/product/{target.name}"
            if index % 10 == 0:  # a superseded record: the check must use the last one only
                handle.write(encode_entry(ManifestEntry(url, rel, "failed", error="HTTP 503", time=1.0)))
            entry = ManifestEntry(url, rel, "verified", "", size, md5, "fits", True, "", 1, 2.0)
            handle.write(encode_entry(entry))
    (root / "built").write_text(json.dumps(files))


def run_check(out: Path, level: str, workers: int) -> None:
    """(In a fresh process) check the mirror and print time and memory as JSON."""
    from engine.manifest import Manifest
    from engine.mirrorcheck import check_mirror

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    updates: list[tuple[int, int]] = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    report = check_mirror(
        out,
        Manifest(out / ".tessmirror"),
        level=VerifyLevel.parse(level),
        workers=workers,
        progress=lambda done, total: updates.append((done, total)),
    )
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "checked": report.checked,
                "ok": report.ok,
                "problems": len(report.problems),
                "wall_s": wall,
                "cpu_s": cpu,
                "rss_after_imports_mb": base_rss / 1024,
                "peak_rss_mb": peak / 1024,
                "progress_calls": len(updates),
            }
        )
    )


def bench_mirror(files: int, level: str, workers: int, directory: Path | None) -> None:
    root = directory or Path(tempfile.gettempdir()) / f"tessmirror-bench-mirror-{files}"
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    build_mirror(root, files)
    print(f"mirror of {files:,} files at {root} ready in {time.perf_counter() - started:.1f} s")
    result = subprocess.run(
        [sys.executable, __file__, "_check", str(root / "mirror"), level, str(workers)],
        capture_output=True,
        text=True,
        check=True,
    )
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"check_mirror level={level} workers={workers}:")
    for key, value in stats.items():
        print(f"  {key:<22}{value:.1f}" if isinstance(value, float) else f"  {key:<22}{value}")
    print(f"  per file              {stats['wall_s'] / max(stats['checked'], 1) * 1e6:.0f} us wall")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("levels", help="cost of each verification level on a full-size light curve")
    p.add_argument("--repeat", type=int, default=200)
    p = sub.add_parser("mirror", help="time and peak memory of check_mirror on a synthetic mirror")
    p.add_argument("--files", type=int, default=200_000)
    p.add_argument("--level", default="checksum", choices=("size", "checksum", "fits"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dir", type=Path, help="where to build the mirror (kept for re-runs)")
    p = sub.add_parser("_check")
    p.add_argument("out", type=Path)
    p.add_argument("level")
    p.add_argument("workers", type=int)
    ns = parser.parse_args()
    if ns.command == "levels":
        bench_levels(ns.repeat)
    elif ns.command == "mirror":
        bench_mirror(ns.files, ns.level, ns.workers, ns.dir)
    else:
        run_check(ns.out, ns.level, ns.workers)


if __name__ == "__main__":
    main()
