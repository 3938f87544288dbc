"""A hostile output folder, through the real CLI: nothing is ever written outside --out.

Someone with write access to a shared mirror plants symlinks (a `NAME.part` or a final `NAME` pointing
at a victim file, a folder swapped for a link to another folder in the middle of a run). Every test
keeps a victim file and a sentinel folder OUTSIDE --out and checks them byte for byte afterwards.

Each test runs twice: as the invoking user, and as an unprivileged user (uid/gid 65534) that owns
--out, the victim and the sentinel (only when the tests run as root: switching users needs it). The
interpreter of this venv may live under a folder that user cannot enter (e.g. /root/.pyenv); then the
CLI runs in a private mount namespace where that folder is replaced by a world-readable view of the
interpreter only (`unshare --mount`); nothing on the real system changes.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine.archive import FaultPlan
from engine.layout import relpath_for
from engine.manifest import Manifest
from engine.models import PlanItem
from tests.helpers import assert_verified_records_are_good, cli_command, md5_of, wait_until

pytestmark = pytest.mark.integration

UNPRIVILEGED = 65534  # nobody / nogroup
VICTIM_BYTES = b"the victim's precious bytes; nothing may ever write here\n"


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under `folder`, byte for byte (links and folders by kind and target)."""
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


def _blocked_ancestor(path: Path) -> Path | None:
    """The highest ancestor of `path` that other users cannot enter (None if every one is open)."""
    for parent in reversed(path.parents):
        if parent != Path("/") and not parent.stat().st_mode & stat.S_IXOTH:
            return parent
    return None


def _unprivileged_prefix(base: Path) -> list[str]:
    """The command prefix that runs the CLI as uid/gid 65534 with this venv's interpreter."""
    setpriv = ["setpriv", f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}", "--clear-groups", "--"]
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    interpreter = Path(sys.base_prefix)
    blocked = _blocked_ancestor(interpreter)
    if blocked is None:
        return setpriv
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--mount", "true"]).returncode:
        pytest.skip(f"{blocked} is closed to other users and no mount namespace is available")
    stash = base / ".interpreter"
    stash.mkdir()
    q = shlex.quote
    script = (
        f"mount --bind {q(str(interpreter))} {q(str(stash))} && "
        f"mount -t tmpfs -o mode=755 tessmirror-test {q(str(blocked))} && "
        f"mkdir -p {q(str(interpreter))} && mount --bind {q(str(stash))} {q(str(interpreter))} && "
        f'exec {" ".join(map(q, setpriv))} "$@"'
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]


@dataclass
class World:
    """--out, a victim file and a sentinel folder outside it, and how to run the CLI there."""

    base: Path
    user: str
    prefix: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.base / "out"

    @property
    def victim(self) -> Path:
        return self.base / "victim.txt"

    @property
    def sentinel(self) -> Path:
        return self.base / "sentinel"

    def hand_over(self) -> None:
        """Give everything to the user the CLI runs as (the victim too: it is *their* file at risk)."""
        if self.user != "unprivileged":
            return
        for path in [self.base, *self.base.rglob("*")]:
            if path.name != ".interpreter" and ".interpreter" not in path.parts:
                os.chown(path, UNPRIVILEGED, UNPRIVILEGED, follow_symlinks=False)

    def spawn(self, *args: object) -> subprocess.Popen:
        self.hand_over()
        return subprocess.Popen(
            [*self.prefix, *cli_command(*args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **self.env},
            stdin=subprocess.DEVNULL,
        )

    def run(self, *args: object, timeout: float = 180) -> subprocess.CompletedProcess:
        process = self.spawn(*args)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            pytest.fail(f"the CLI did not finish in {timeout} s: {stderr[-2000:]}")
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def assert_outside_untouched(self) -> None:
        assert self.victim.read_bytes() == VICTIM_BYTES, "the victim file outside --out was written"
        assert snapshot(self.sentinel) == {"keep.txt": b"keep"}, "something was written to the sentinel"


@pytest.fixture(params=["invoking-user", "unprivileged"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    if request.param == "unprivileged":
        if os.geteuid() != 0:
            pytest.skip("switching to an unprivileged user needs root")
        # Not under pytest's tmp_path: its parent is closed (0700) to other users.
        base = Path(tempfile.mkdtemp(prefix="tessmirror-hostile-", dir="/tmp"))
        base.chmod(0o755)
        (base / "home").mkdir()
        made = World(base, "unprivileged", _unprivileged_prefix(base), {"HOME": str(base / "home")})
    else:
        made = World(tmp_path, "invoking-user")
    made.out.mkdir()
    made.victim.write_bytes(VICTIM_BYTES)
    made.sentinel.mkdir()
    (made.sentinel / "keep.txt").write_bytes(b"keep")
    try:
        yield made
    finally:
        if made.user == "unprivileged":
            shutil.rmtree(made.base, ignore_errors=True)


def light_curves(arch) -> list:
    return sorted(
        (f for f in arch.catalog.files.values() if f.product == "lc" and f.collection == "TESS"),
        key=lambda f: f.name,
    )


def relpath_of(entry) -> str:
    return relpath_for(PlanItem(url="", filename=entry.name, sector=1), "mast")


def run_ccd_of(world: World, arch, entry, *extra: object) -> subprocess.CompletedProcess:
    ccd = ("--sector", 1, "--camera", entry.identity.camera, "--ccd", entry.identity.ccd)
    return world.run("run", "--tap-url", arch.tap_url, *ccd, "--out", world.out, "--retries", 2, *extra)


def records(out: Path) -> list:
    return list(Manifest(out / ".tessmirror").load().values())


# -- the tests -------------------------------------------------------------------------------------------
def test_a_planted_part_symlink_is_not_followed_and_the_file_is_downloaded(world: World, archive) -> None:
    arch = archive()
    entry = light_curves(arch)[0]
    dest = world.out / relpath_of(entry)
    dest.parent.mkdir(parents=True)
    dest.with_name(dest.name + ".part").symlink_to(world.victim)

    result = run_ccd_of(world, arch, entry)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    world.assert_outside_untouched()
    assert not dest.is_symlink() and md5_of(dest) == entry.md5
    assert not dest.with_name(dest.name + ".part").exists()
    if world.user == "unprivileged":  # the CLI really ran as that user
        assert dest.stat().st_uid == UNPRIVILEGED
    assert assert_verified_records_are_good(world.out, arch) == len(records(world.out))


def test_a_final_name_planted_as_a_symlink_is_never_followed(world: World, archive) -> None:
    arch = archive()
    entry = light_curves(arch)[0]
    dest = world.out / relpath_of(entry)
    dest.parent.mkdir(parents=True)
    dest.symlink_to(world.victim)

    result = run_ccd_of(world, arch, entry)

    assert "Traceback" not in result.stderr
    world.assert_outside_untouched()
    (record,) = [r for r in records(world.out) if r.url.endswith(entry.name)]
    # Either refused up front (the planner sees a link leading outside) or replaced by the real file
    # (a rename replaces the link itself); never written through.
    if record.status == "verified":
        assert result.returncode == 0, result.stderr[-3000:]
        assert not dest.is_symlink() and md5_of(dest) == entry.md5
    else:
        assert result.returncode == 1, result.stderr[-3000:]
        assert "outside" in record.error or "symlink" in record.error, record.error
        assert "\n" not in record.error


def test_a_folder_swapped_for_a_symlink_mid_run_writes_nothing_outside(world: World, archive) -> None:
    # Every file waits 0.5 s before its first byte, two at a time: 32 files take 8 s or more, so the
    # swap (made as soon as the first file is on disk) always lands with most of the run ahead.
    arch = archive(faults=FaultPlan.from_spec("latency=0.5"))
    expected = {f.name: f for f in light_curves(arch)}
    sector_dir = world.out / "tid" / "s0001"
    moved = world.base / "moved-away"

    process = world.spawn(
        "run",
        "--tap-url",
        arch.tap_url,
        "--sector",
        1,
        "--out",
        world.out,
        "--concurrency",
        2,
        "--retries",
        1,
    )
    try:
        finished_file = wait_until(
            lambda: sector_dir.is_dir() and any(p.suffix == ".fits" for p in sector_dir.rglob("*")),
            timeout=120,
        )
        assert finished_file, "no file was written within 120 s"
        # The attack: the sector folder moves away, a symlink to the sentinel takes its place.
        sector_dir.rename(moved)
        sector_dir.symlink_to(world.sentinel)
        world.hand_over()
        _, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    world.assert_outside_untouched()
    assert "Traceback" not in stderr
    got = records(world.out)
    verified = [r for r in got if r.status == "verified"]
    failed = [r for r in got if r.status == "failed"]
    assert len(got) == len(expected)
    assert verified, "nothing was verified before the swap"
    assert failed, "every file was verified: the swap came too late to test anything"
    assert process.returncode == 1, stderr[-3000:]
    # A verified file was written inside --out before the swap, so it now lives in the moved folder.
    for record in verified:
        inside = moved / Path(record.path).relative_to("tid/s0001")
        name = inside.name
        assert md5_of(inside) == expected[name].md5 == record.md5, f"{record.path} is not the archive's file"
    for record in failed:
        assert "symlink" in record.error or "outside" in record.error or "moved" in record.error, record.error
        assert "\n" not in record.error
    leftovers = [p for p in moved.rglob("*") if p.is_file() and p.name.endswith(".part")]
    assert not leftovers, leftovers
