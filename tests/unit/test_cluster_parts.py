"""Part files of the cluster executor: NAME.part.<host>.<pid>, and taking over a gone writer's part."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from engine.cluster.parts import STALE_PART_SECONDS, ClusterPartFile, host_name
from engine.fetch.partfile import PartFile


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant(folder: Path, name: str, data: bytes, validator: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / name
    part.write_bytes(data)
    if validator is not None:
        (folder / (name + ".meta.part")).write_text(json.dumps({"validator": validator}))
    return part


def test_a_part_is_named_after_its_host_and_pid(tmp_path: Path) -> None:
    part = ClusterPartFile(tmp_path / "a" / "x.fits.part", root=tmp_path)
    part.open()
    try:
        assert part.path.name == f"x.fits.part.{host_name()}.{os.getpid()}"
        assert (tmp_path / "a" / part.path.name).exists()
    finally:
        part.discard()


def test_a_dead_writers_part_on_this_host_is_continued_with_its_validator(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    _plant(folder, f"x.fits.part.{host_name()}.{_dead_pid()}", b"A" * 1000, validator='"etag-1"')
    part = ClusterPartFile(folder / "x.fits.part", root=tmp_path)
    part.resume = True
    part.open()
    try:
        assert part.taken_over
        assert part.kept == 1000 and part.kept_validator == '"etag-1"'
        leftovers = sorted(p.name for p in folder.iterdir())
        assert leftovers == sorted([part.path.name, part.path.name + ".meta.part"])
    finally:
        part.discard()
    assert list(folder.iterdir()) == []


def test_a_live_writers_part_is_never_touched(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = _plant(folder, f"x.fits.part.{host_name()}.{sleeper.pid}", b"B" * 10)
        part = ClusterPartFile(folder / "x.fits.part", root=tmp_path)
        part.open()
        part.discard()
        assert not part.taken_over
        assert live.read_bytes() == b"B" * 10
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_locked_part_is_never_touched_even_if_its_pid_looks_dead(tmp_path: Path) -> None:
    """The writer's flock is the proof of life wherever flock works (a pid can be reused)."""
    folder = tmp_path / "d"
    name = f"x.fits.part.{host_name()}.{_dead_pid()}"
    holder = PartFile(folder / name, root=tmp_path)  # opens and flocks the part, as a writer does
    holder.open()
    holder.write(b"C" * 10)
    try:
        part = ClusterPartFile(folder / "x.fits.part", root=tmp_path)
        part.open()
        part.discard()
        assert not part.taken_over
        assert (folder / name).read_bytes() == b"C" * 10
    finally:
        holder.discard()


def test_another_hosts_part_is_continued_only_after_an_hour_of_silence(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    fresh = _plant(folder, "x.fits.part.elsewhere.example.org.4242", b"D" * 10)
    part = ClusterPartFile(folder / "x.fits.part", root=tmp_path)
    part.open()
    part.discard()
    assert not part.taken_over and fresh.exists()
    old = time.time() - STALE_PART_SECONDS - 60
    os.utime(fresh, (old, old))
    part = ClusterPartFile(folder / "x.fits.part", root=tmp_path)
    part.resume = True
    part.open()
    try:
        assert part.taken_over == fresh.name
        assert not fresh.exists()
    finally:
        part.discard()


def test_only_one_gone_part_is_continued_and_the_others_are_removed(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    first = _plant(folder, f"x.fits.part.{host_name()}.{_dead_pid()}", b"E" * 10)
    second = _plant(folder, f"x.fits.part.{host_name()}.{_dead_pid()}", b"F" * 10)
    other_file = _plant(folder, f"y.fits.part.{host_name()}.{_dead_pid()}", b"G" * 10)
    part = ClusterPartFile(folder / "x.fits.part", root=tmp_path)
    part.open()
    try:
        assert part.taken_over in (first.name, second.name)
        assert not first.exists() and not second.exists()
        assert other_file.exists()  # another file's part is not ours to judge
    finally:
        part.discard()


def test_a_zombie_writer_is_gone(tmp_path: Path) -> None:
    """A worker whose driver was killed is reparented; where nobody reaps it, it stays a zombie."""
    folder = tmp_path / "d"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        stat_file = Path(f"/proc/{child.pid}/stat")
        deadline = time.monotonic() + 30
        while stat_file.read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never became a zombie"
            time.sleep(0.02)
        _plant(folder, f"x.fits.part.{host_name()}.{child.pid}", b"H" * 10)
        part = ClusterPartFile(folder / "x.fits.part", root=tmp_path)
        part.open()
        part.discard()
        assert part.taken_over
    finally:
        child.wait()


def test_the_downloaders_folder_cache_is_used_to_find_gone_parts(tmp_path: Path) -> None:
    from engine.fetch.partfile import DirCache

    folder = tmp_path / "a" / "b"
    _plant(folder, f"x.fits.part.{host_name()}.{_dead_pid()}", b"I" * 10, validator='"v"')
    cache = DirCache()
    try:
        part = ClusterPartFile(folder / "x.fits.part", root=tmp_path, cache=cache)
        part.resume = True
        part.open()
        assert part.taken_over and part.kept == 10
        part.discard()
        assert list(folder.iterdir()) == []
    finally:
        cache.close()
