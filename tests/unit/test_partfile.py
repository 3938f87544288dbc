"""PartFile: every write under --out goes through directory descriptors and never follows a symlink.

Each test plants something hostile under the output folder and checks, byte for byte, that a victim
file and a sentinel folder OUTSIDE it are untouched.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from engine.exceptions import DestinationBusyError, TransferError, UnsafePathError
from engine.fetch.partfile import DirCache, PartFile, open_under, walk

DATA = b"SIMPLE  =                    T" + b"\0" * 2850
VICTIM_BYTES = b"the victim's precious bytes\n"


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    """An output folder, a victim file and a sentinel folder (with one file) outside it."""
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM_BYTES)
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_bytes(b"keep")
    return {"out": out, "victim": victim, "sentinel": sentinel, "tmp": tmp_path}


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under `folder`: file bytes, or 'dir' / 'link -> target'."""
    seen: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            seen[key] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            seen[key] = "dir"
        else:
            seen[key] = path.read_bytes()
    return seen


def assert_outside_untouched(world: dict[str, Path]) -> None:
    assert world["victim"].read_bytes() == VICTIM_BYTES
    assert snapshot(world["sentinel"]) == {"keep.txt": b"keep"}


def part_for(out: Path, relpath: str, cache: DirCache | None = None) -> tuple[PartFile, Path]:
    dest = out.joinpath(*relpath.split("/"))
    return PartFile(dest.with_name(dest.name + ".part"), root=out, cache=cache), dest


def write_file(out: Path, relpath: str, data: bytes = DATA, cache: DirCache | None = None) -> Path:
    part, dest = part_for(out, relpath, cache)
    part.open()
    part.write(data)
    assert Path(part.read_path()).read_bytes() == data
    part.commit(dest, fsync=True)
    return dest


# -- the ordinary path --------------------------------------------------------------------------------
def test_creates_the_folders_and_renames_the_part_into_place(world: dict[str, Path]) -> None:
    dest = write_file(world["out"], "tid/s0001/0000/0001/a_lc.fits")
    assert dest.read_bytes() == DATA
    assert not dest.with_name("a_lc.fits.part").exists()
    assert os.listdir(dest.parent) == ["a_lc.fits"]


def test_a_root_that_is_missing_is_created_and_a_symlinked_root_is_allowed(tmp_path: Path) -> None:
    real = tmp_path / "scratch"
    real.mkdir()
    (tmp_path / "out-link").symlink_to(real)  # the user may point --out at a symlink
    write_file(tmp_path / "out-link", "s0001/a_lc.fits")
    assert (real / "s0001" / "a_lc.fits").read_bytes() == DATA
    write_file(tmp_path / "new" / "out", "b_lc.fits")
    assert (tmp_path / "new" / "out" / "b_lc.fits").read_bytes() == DATA


def test_an_earlier_regular_part_is_truncated_and_restarted(world: dict[str, Path]) -> None:
    part, dest = part_for(world["out"], "s0001/a_lc.fits")
    dest.parent.mkdir()
    part.path.write_bytes(b"x" * 10_000)
    part.open()
    assert part.path.stat().st_size == 0
    part.write(DATA)
    part.commit(dest, fsync=False)
    assert dest.read_bytes() == DATA


def test_discard_removes_the_part(world: dict[str, Path]) -> None:
    part, dest = part_for(world["out"], "s0001/a_lc.fits")
    part.open()
    part.write(DATA)
    part.discard()
    assert os.listdir(dest.parent) == []


def test_without_a_root_the_parts_own_folder_is_the_root(tmp_path: Path) -> None:
    part = PartFile(tmp_path / "a_lc.fits.part")
    part.open()
    part.write(DATA)
    part.commit(tmp_path / "a_lc.fits", fsync=False)
    assert (tmp_path / "a_lc.fits").read_bytes() == DATA


# -- planted parts ------------------------------------------------------------------------------------
def test_a_planted_part_symlink_is_removed_and_the_victim_untouched(world: dict[str, Path]) -> None:
    out = world["out"]
    (out / "s0001").mkdir()
    (out / "s0001" / "a_lc.fits.part").symlink_to(world["victim"])
    dest = write_file(out, "s0001/a_lc.fits")
    assert dest.read_bytes() == DATA and not dest.is_symlink()
    assert_outside_untouched(world)


def test_a_dangling_part_symlink_creates_nothing_where_it_points(world: dict[str, Path]) -> None:
    out = world["out"]
    (out / "s0001").mkdir()
    target = world["sentinel"] / "created.fits"
    (out / "s0001" / "a_lc.fits.part").symlink_to(target)
    write_file(out, "s0001/a_lc.fits")
    assert not target.exists()
    assert_outside_untouched(world)


def test_a_planted_part_hard_link_is_removed_and_the_victim_untouched(world: dict[str, Path]) -> None:
    out = world["out"]
    (out / "s0001").mkdir()
    os.link(world["victim"], out / "s0001" / "a_lc.fits.part")
    dest = write_file(out, "s0001/a_lc.fits")
    assert dest.read_bytes() == DATA
    assert_outside_untouched(world)


def test_a_planted_part_fifo_is_removed_without_blocking(world: dict[str, Path]) -> None:
    out = world["out"]
    (out / "s0001").mkdir()
    os.mkfifo(out / "s0001" / "a_lc.fits.part")
    done = threading.Event()

    def write() -> None:
        write_file(out, "s0001/a_lc.fits")
        done.set()

    threading.Thread(target=write, daemon=True).start()
    assert done.wait(30), "opening a planted FIFO blocked"
    assert (out / "s0001" / "a_lc.fits").read_bytes() == DATA


def test_a_part_that_is_an_empty_folder_is_removed_and_a_full_one_refused(world: dict[str, Path]) -> None:
    out = world["out"]
    (out / "s0001" / "a_lc.fits.part").mkdir(parents=True)
    assert write_file(out, "s0001/a_lc.fits").read_bytes() == DATA
    (out / "s0001" / "b_lc.fits.part").mkdir()
    (out / "s0001" / "b_lc.fits.part" / "x").write_bytes(b"x")
    with pytest.raises(UnsafePathError, match=r"b_lc\.fits\.part.*is a directory"):
        write_file(out, "s0001/b_lc.fits")


# -- planted folders ----------------------------------------------------------------------------------
def test_a_folder_symlinked_outside_is_refused_and_nothing_written_there(world: dict[str, Path]) -> None:
    out = world["out"]
    (out / "tid").mkdir()
    (out / "tid" / "s0001").symlink_to(world["sentinel"])
    with pytest.raises(UnsafePathError, match=r"s0001.*it is a symlink \(to .*sentinel") as info:
        write_file(out, "tid/s0001/a_lc.fits")
    assert info.value.hint and "never writes through a symlink" in info.value.hint
    assert "\n" not in info.value.message
    assert_outside_untouched(world)


def test_a_folder_symlinked_inside_the_mirror_is_refused_too(world: dict[str, Path]) -> None:
    out = world["out"]
    (out / "real").mkdir()
    (out / "alias").symlink_to(out / "real")
    with pytest.raises(UnsafePathError, match="it is a symlink"):
        write_file(out, "alias/a_lc.fits")
    assert list((out / "real").iterdir()) == []


def test_a_file_where_a_folder_belongs_is_refused(world: dict[str, Path]) -> None:
    (world["out"] / "s0001").write_bytes(b"not a folder")
    with pytest.raises(UnsafePathError, match=r"s0001.*not a directory"):
        write_file(world["out"], "s0001/a_lc.fits")


def test_walk_without_create_does_not_make_folders(world: dict[str, Path]) -> None:
    with pytest.raises(FileNotFoundError):
        walk(world["out"], ("a", "b"), create=False)
    assert list(world["out"].iterdir()) == []


# -- the final name ------------------------------------------------------------------------------------
def test_a_final_name_planted_as_a_symlink_is_replaced_not_followed(world: dict[str, Path]) -> None:
    out = world["out"]
    (out / "s0001").mkdir()
    (out / "s0001" / "a_lc.fits").symlink_to(world["victim"])
    dest = write_file(out, "s0001/a_lc.fits")
    assert not dest.is_symlink() and dest.read_bytes() == DATA
    assert_outside_untouched(world)


def test_a_final_name_that_is_a_folder_is_refused(world: dict[str, Path]) -> None:
    out = world["out"]
    (out / "s0001" / "a_lc.fits").mkdir(parents=True)
    with pytest.raises(UnsafePathError, match="a directory has the file's name"):
        write_file(out, "s0001/a_lc.fits")
    assert (out / "s0001" / "a_lc.fits").is_dir()
    assert sorted(os.listdir(out / "s0001")) == ["a_lc.fits"]  # the part is not left behind


# -- folders swapped while a file is written -----------------------------------------------------------
def test_a_folder_swapped_for_a_symlink_mid_download_is_refused(world: dict[str, Path]) -> None:
    out = world["out"]
    part, dest = part_for(out, "tid/s0001/a_lc.fits")
    part.open()
    part.write(DATA)
    (out / "tid" / "s0001").rename(out / "moved")
    (out / "tid" / "s0001").symlink_to(world["sentinel"])
    with pytest.raises(UnsafePathError, match=r"s0001': it is a symlink"):
        part.check_in_place()
    with pytest.raises(UnsafePathError, match=r"s0001': it is a symlink"):
        part.commit(dest, fsync=False)
    part.discard()
    assert_outside_untouched(world)
    assert list((out / "moved").iterdir()) == []  # neither the part nor the file is left behind


def test_a_folder_moved_away_mid_download_does_not_keep_the_file(world: dict[str, Path]) -> None:
    out = world["out"]
    part, dest = part_for(out, "s0001/a_lc.fits")
    part.open()
    part.write(DATA)
    away = world["tmp"] / "away"
    (out / "s0001").rename(away)
    with pytest.raises(UnsafePathError, match="moved away during the download"):
        part.commit(dest, fsync=False)
    part.discard()
    assert list(away.iterdir()) == []


def test_a_folder_replaced_by_another_real_folder_mid_download_is_refused(world: dict[str, Path]) -> None:
    out = world["out"]
    part, dest = part_for(out, "s0001/a_lc.fits")
    part.open()
    part.write(DATA)
    (out / "s0001").rename(world["tmp"] / "away")
    (out / "s0001").mkdir()
    with pytest.raises(UnsafePathError, match="replaced during the download"):
        part.commit(dest, fsync=False)
    part.discard()
    assert list((out / "s0001").iterdir()) == [] and list((world["tmp"] / "away").iterdir()) == []


def test_the_fits_check_reads_the_part_through_its_folder_descriptor(world: dict[str, Path]) -> None:
    out = world["out"]
    part, _ = part_for(out, "s0001/a_lc.fits")
    part.open()
    part.write(DATA)
    (out / "s0001").rename(world["tmp"] / "away")
    decoy = world["tmp"] / "decoy"
    decoy.mkdir()
    (decoy / "a_lc.fits.part").write_bytes(b"an attacker's file")
    (out / "s0001").symlink_to(decoy)
    reading = part.read_path()
    assert reading.name == "a_lc.fits.part"  # what error messages show
    assert Path(reading).read_bytes() == DATA
    part.discard()


# -- the descriptor cache ------------------------------------------------------------------------------
def test_the_cache_keeps_descriptors_not_facts_a_swapped_folder_is_refused(world: dict[str, Path]) -> None:
    out = world["out"]
    cache = DirCache()
    write_file(out, "tid/s0001/a_lc.fits", cache=cache)
    write_file(out, "tid/s0001/0000/z_lc.fits", cache=cache)
    assert len(cache) == 4  # the root, tid, tid/s0001 and tid/s0001/0000
    (out / "tid" / "s0001").rename(world["tmp"] / "moved")
    (out / "tid" / "s0001").symlink_to(world["sentinel"])
    # The cached descriptor still points at the moved folder: the file is written there, then the
    # check after the rename finds the path changed, takes it back out and drops the descriptor.
    with pytest.raises(UnsafePathError, match="it is a symlink"):
        write_file(out, "tid/s0001/b_lc.fits", cache=cache)
    assert sorted(os.listdir(world["tmp"] / "moved")) == ["0000", "a_lc.fits"]
    assert os.listdir(world["tmp"] / "moved" / "0000") == ["z_lc.fits"]
    assert len(cache) == 1  # the folders on that path and below it dropped; only the root kept
    with pytest.raises(UnsafePathError, match="it is a symlink"):  # walked afresh: refused at once
        write_file(out, "tid/s0001/c_lc.fits", cache=cache)
    with pytest.raises(UnsafePathError, match="it is a symlink"):
        write_file(out, "tid/s0001/0000/d_lc.fits", cache=cache)
    assert_outside_untouched(world)
    cache.close()
    assert len(cache) == 0


def test_a_cached_folder_removed_meanwhile_is_made_again(world: dict[str, Path]) -> None:
    import shutil

    out = world["out"]
    cache = DirCache()
    write_file(out, "s0001/a_lc.fits", cache=cache)
    shutil.rmtree(out / "s0001")
    assert write_file(out, "s0001/b_lc.fits", cache=cache).read_bytes() == DATA
    cache.close()


def test_the_cache_is_bounded_and_evicts_the_least_recently_used(world: dict[str, Path]) -> None:
    out = world["out"]
    cache = DirCache(size=2)
    for name in ("a", "b", "c"):
        write_file(out, f"{name}/x_lc.fits", cache=cache)
    assert len(cache) == 2
    assert all((out / n / "x_lc.fits").read_bytes() == DATA for n in "abc")
    cache.close()


def test_the_cache_serves_files_right_in_the_output_folder(world: dict[str, Path]) -> None:
    cache = DirCache()
    for name in ("a_lc.fits", "b_lc.fits"):
        assert write_file(world["out"], name, cache=cache).read_bytes() == DATA
    cache.close()


# -- other files under --out (manifest, lock, plan) -------------------------------------------------------
def test_open_under_appends_without_following_a_planted_symlink(world: dict[str, Path]) -> None:
    out = world["out"]
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    fd = open_under(out, ".tessmirror/manifest.jsonl", flags)
    os.write(fd, b"{}\n")
    os.close(fd)
    assert (out / ".tessmirror" / "manifest.jsonl").read_bytes() == b"{}\n"
    (out / ".tessmirror" / "manifest.jsonl").unlink()
    (out / ".tessmirror" / "manifest.jsonl").symlink_to(world["victim"])
    with pytest.raises(UnsafePathError, match=r"manifest\.jsonl.*it is a symlink"):
        open_under(out, ".tessmirror/manifest.jsonl", flags)
    (out / "other").symlink_to(world["sentinel"])
    with pytest.raises(UnsafePathError, match=r"other.*it is a symlink"):
        open_under(out, "other/lock", flags)
    assert_outside_untouched(world)


def test_a_second_writer_on_the_same_part_is_refused_and_the_first_untouched(world: dict[str, Path]) -> None:
    first, dest = part_for(world["out"], "s0001/a_lc.fits")
    first.open()
    first.write(DATA)
    second, _ = part_for(world["out"], "s0001/a_lc.fits")
    with pytest.raises(DestinationBusyError, match="another download is writing this file") as info:
        second.open()
    assert isinstance(info.value, TransferError) and not info.value.retryable
    second.discard()  # what the Downloader does on a failure: the first writer's part stays
    assert dest.with_name("a_lc.fits.part").exists()
    first.commit(dest, fsync=False)
    assert dest.read_bytes() == DATA


# -- keeping a part for a resume across runs -------------------------------------------------------
ETAG = '"0123456789abcdef0123456789abcdef"'


def test_a_part_with_a_stored_validator_is_kept_and_replayed_for_a_resume(world: dict[str, Path]) -> None:
    first, dest = part_for(world["out"], "s0001/a_lc.fits")
    first.open()
    first.save_validator(ETAG)
    first.write(DATA[:1000])
    first.close()  # a killed run: the part and its sidecar stay
    second, _ = part_for(world["out"], "s0001/a_lc.fits")
    second.resume = True
    second.open()
    assert (second.kept, second.kept_validator) == (1000, ETAG)
    seen = bytearray()
    second.replay(lambda block: seen.extend(block), 300)
    assert bytes(seen) == DATA[:1000]
    second.write(DATA[1000:])  # appended after the kept bytes
    second.commit(dest, fsync=False)
    assert dest.read_bytes() == DATA
    assert os.listdir(dest.parent) == ["a_lc.fits"]  # the sidecar went with the part


def test_a_part_without_a_validator_is_truncated_even_when_resuming(world: dict[str, Path]) -> None:
    part, _ = part_for(world["out"], "s0001/a_lc.fits")
    part.path.parent.mkdir()
    part.path.write_bytes(b"x" * 1000)
    part.resume = True
    part.open()
    assert part.kept == 0 and part.path.stat().st_size == 0


@pytest.mark.parametrize(
    "sidecar",
    [
        b'{"validator": "\\"abc\\"\\r\\nX-Injected: 1"}',  # a header injection
        b'{"validator": 42}',
        b"not json",
        b'{"validator": "' + b"a" * 2000 + b'"}',  # too long to be ours
    ],
)
def test_a_tampered_sidecar_is_ignored_and_the_part_restarted(world: dict[str, Path], sidecar: bytes) -> None:
    part, _ = part_for(world["out"], "s0001/a_lc.fits")
    part.path.parent.mkdir()
    part.path.write_bytes(b"x" * 1000)
    part.path.with_name("a_lc.fits.meta.part").write_bytes(sidecar)
    part.resume = True
    part.open()
    assert part.kept == 0 and part.kept_validator is None and part.path.stat().st_size == 0


def test_a_symlinked_part_with_a_sidecar_is_still_removed_and_the_victim_untouched(
    world: dict[str, Path],
) -> None:
    part, _ = part_for(world["out"], "s0001/a_lc.fits")
    part.path.parent.mkdir()
    part.path.symlink_to(world["victim"])
    part.path.with_name("a_lc.fits.meta.part").write_text(json.dumps({"validator": ETAG}))
    part.resume = True
    part.open()
    assert part.kept == 0 and not part.path.is_symlink()
    part.write(DATA)
    part.close()
    assert_outside_untouched(world)


def test_a_sidecar_planted_as_a_symlink_is_replaced_not_written_through(world: dict[str, Path]) -> None:
    part, _ = part_for(world["out"], "s0001/a_lc.fits")
    part.path.parent.mkdir()
    meta = part.path.with_name("a_lc.fits.meta.part")
    meta.symlink_to(world["victim"])
    part.resume = True
    part.open()  # reading never follows the link either
    assert part.kept_validator is None
    part.save_validator(ETAG)
    assert not meta.is_symlink() and json.loads(meta.read_text()) == {"validator": ETAG}
    part.discard()
    assert not meta.exists() and not meta.is_symlink()
    assert_outside_untouched(world)


# -- whole files moved or placed under a root: quarantine, superseded copies, adoption -------------------
def test_a_quarantine_folder_planted_as_a_symlink_is_refused_and_nothing_leaves_the_mirror(tmp_path):
    from engine.fetch.partfile import move_under

    out, state, outside = tmp_path / "out", tmp_path / "out" / ".tessmirror", tmp_path / "outside"
    (out / "tid").mkdir(parents=True)
    (out / "tid" / "bad.fits").write_bytes(b"bad bytes")
    state.mkdir()
    outside.mkdir()
    (state / "quarantine").symlink_to(outside)  # planted by another user of a shared mirror
    with pytest.raises(UnsafePathError, match="quarantine"):
        move_under(out, "tid/bad.fits", state, "quarantine/tid/bad.fits")
    assert list(outside.iterdir()) == []
    assert (out / "tid" / "bad.fits").read_bytes() == b"bad bytes"


def test_move_under_moves_a_symlink_itself_and_numbers_a_taken_name(tmp_path):
    from engine.fetch.partfile import move_under

    out, state = tmp_path / "out", tmp_path / "state"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"victim")
    (out / "f.fits").symlink_to(victim)
    (state / "q").mkdir(parents=True)
    (state / "q" / "f.fits").write_bytes(b"an earlier copy")
    moved = move_under(out, "f.fits", state, "q/f.fits")
    assert moved == state / "q" / "f.fits.1" and moved.is_symlink()
    assert victim.read_bytes() == b"victim" and (state / "q" / "f.fits").read_bytes() == b"an earlier copy"
    assert not os.path.lexists(out / "f.fits")


@pytest.mark.parametrize("relpath", ["../victim.fits", "/etc/passwd", "a/./b", "a//b", ""])
def test_a_recorded_path_that_is_not_plainly_relative_is_refused(tmp_path, relpath):
    from engine.fetch.partfile import move_under

    (tmp_path / "victim.fits").write_bytes(b"x")
    (tmp_path / "out").mkdir()
    with pytest.raises(UnsafePathError):
        move_under(tmp_path / "out", relpath, tmp_path / "state", "q/x")
    assert (tmp_path / "victim.fits").read_bytes() == b"x"


def test_an_adopted_copy_into_a_symlinked_folder_is_refused_and_the_source_is_untouched(tmp_path):
    from engine.fetch.partfile import install_copy

    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "tid").symlink_to(outside)
    source = tmp_path / "cache.fits"
    source.write_bytes(b"SIMPLE  = T")
    with pytest.raises(UnsafePathError):
        install_copy(out, "tid/f.fits", source, lambda placed: placed.read_bytes())
    assert list(outside.iterdir()) == [] and source.read_bytes() == b"SIMPLE  = T"


def test_install_copy_checks_the_copy_before_it_takes_its_name_and_leaves_nothing_on_failure(tmp_path):
    from engine.fetch.partfile import install_copy

    out = tmp_path / "out"
    source = tmp_path / "cache.fits"
    source.write_bytes(b"good bytes")
    assert install_copy(out, "a/b/f.fits", source, lambda placed: placed.read_bytes()) == b"good bytes"
    assert (out / "a" / "b" / "f.fits").read_bytes() == b"good bytes"
    assert (out / "a" / "b" / "f.fits").stat().st_ino != source.stat().st_ino  # a copy by default

    def refuse(_placed):
        raise ValueError("fails its md5")

    with pytest.raises(ValueError):
        install_copy(out, "a/b/g.fits", source, refuse)
    assert sorted(p.name for p in (out / "a" / "b").iterdir()) == ["f.fits"]
    linked = install_copy(out, "a/b/h.fits", source, lambda placed: placed.stat().st_ino, link=True)
    assert linked == source.stat().st_ino
