"""The run lock: one run at a time per output directory (and per state directory).

Why not fcntl/flock: both are unreliable on NFS and Lustre, where mirrors live. The lock is a file
holding ``{host, pid, started, token, ...}``, published atomically with `link()` (the classic
NFS-safe exclusive create; O_CREAT|O_EXCL is the fallback where hard links are not supported), so it
is never seen half-written.

Where: ``<out_dir>/.tessmirror/run.lock`` always, whatever ``--state-dir`` says, so two runs on one
``--out`` with different state directories cannot both write it; and ``<state_dir>/run.lock`` too
when the state directory is elsewhere, so two outputs never share one manifest writer.

When a lock is stale (taken over with a warning):

- it names this host and a pid that is not running, or a pid now running a *different* process
  (the start time recorded in the lock differs from the process's, e.g. after a reboot or when a
  restarted container gives pid 1 to someone else);
- it names this host and our own pid, but not a lock this process holds (a restarted container in
  which we are pid 1 again);
- it names our own Slurm job (``SLURM_JOB_ID`` and ``SLURM_ARRAY_TASK_ID``) and that job has been
  requeued since (``SLURM_RESTART_COUNT`` differs, or, where Slurm does not set it, another host):
  Slurm runs a job id once at a time, so the earlier holder is gone.

A lock that is not a tessmirror lock (not JSON, no host, a pid that no system can have) is never
guessed at: RunLockedError names the file to delete.

Shared and exclusive: shards of a job array (``--shard K/N``)
-----------------------------------------------------------
Without fcntl, a readers-writer lock is built from the same NFS-safe exclusive creates:

- an **exclusive** holder (``run`` without ``--shard``, ``verify --repair``, a manifest upgrade)
  (1) creates ``run.lock`` as above, then (2) lists ``run.lock.d/``: a live entry there is a shard
  at work, so it removes its ``run.lock`` again and refuses (RunLockedError, exit 4, naming it);
- a **shared** holder (one shard) first takes its own ``shard-K-of-N.lock`` (same rules as
  ``run.lock``: one process per shard), then (1) creates its entry ``run.lock.d/<host>.<pid>.<id>``
  (same JSON as a lock, plus the shard and its declared free-space need), then (2) reads
  ``run.lock``: a live exclusive holder there makes it remove its entry and refuse.

Why no exclusive holder ever runs beside a shared one: each side creates its own file *before* it
looks for the other's. Take any exclusive E and shared S that both passed step (2). E's check did
not see S's entry, so it happened before S's create; S's check comes after S's create, hence after
E's check, hence after E's create, so S saw ``run.lock`` and refused: a contradiction. Both may
refuse in a close race (each saw the other); then both exit 4 and are simply run again. The argument
needs only that a create is visible to a later lookup, which NFS's close-to-open consistency gives
for files created and looked up by name. Stale entries (their pid dead on this host, reused, or a
requeued Slurm task: the rules above) are removed by whoever meets them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.exceptions import RunLockedError, local_error_from_oserror
from engine.layout import STATE_DIR_NAME  # the default state directory under --out

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
SHARED_DIR_NAME = "run.lock.d"  # one entry per shared holder (a shard at work)

# Linux's PID_MAX_LIMIT (2**22); other systems' pids are smaller. Above it a pid is not a pid.
PID_MAX = 4_194_304
# The Slurm variables a lock records: the job (and array task) it belongs to, and its restart count.
SLURM_KEYS = {
    "slurm_job_id": "SLURM_JOB_ID",
    "slurm_array_task_id": "SLURM_ARRAY_TASK_ID",
    "slurm_restart_count": "SLURM_RESTART_COUNT",
}

# Tokens of the locks this process holds: our own pid in a lock is live only if its token is here.
_HELD: set[str] = set()
_HELD_GUARD = threading.Lock()


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, from /proc), with the boot id.

    None where /proc is not available or the process does not exist. Together with the pid it
    names one process for good: a reused pid has another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: fields after the last ")" are fixed.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if len(fields) < 20:
        return None
    return f"{boot}:{fields[19].decode('ascii', 'replace')}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except (OverflowError, ValueError, OSError):
        return False
    return True


def _slurm_identity() -> dict[str, str]:
    return {key: os.environ[name] for key, name in SLURM_KEYS.items() if os.environ.get(name)}


class RunLock:
    """One run per output directory; or, with `shard`, one of many shards sharing it.

    Parameters
    ----------
    state_dir
        The run's state directory (manifest, plan); a lock is kept there when it is not the default
        ``<out_dir>/.tessmirror``.
    out_dir
        The output directory. Its lock ``<out_dir>/.tessmirror/run.lock`` is what keeps two runs off
        one mirror whatever their state directories; None locks the state directory only (the old
        behaviour, for callers that know no output directory).
    shard
        ``"shard-K-of-N"`` to take the folder in shared mode (beside other shards, never beside an
        exclusive run) plus that shard's own lock; None (default) to take it exclusively.

    Use as a context manager, or `acquire()` / `release()`. RunLockedError (exit 4) when another run
    holds either lock, or when a lock file is not one tessmirror wrote.
    """

    def __init__(self, state_dir: Path, *, out_dir: Path | None = None, shard: str | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.shard = shard
        dirs = [self.out_dir / STATE_DIR_NAME] if self.out_dir is not None else []
        if not dirs or not _same_dir(dirs[0], self.state_dir):
            dirs.append(self.state_dir)
        self._dirs = dirs
        name = LOCK_NAME if shard is None else f"{shard}.lock"
        self._files = [_LockFile(directory, self._subject(directory), name) for directory in dirs]
        self._held: list[_LockFile] = []
        self._record: dict[str, Any] = {}

    @property
    def path(self) -> Path:
        """The main lock file: under the output directory when one was given."""
        return self._files[0].path

    @property
    def paths(self) -> list[Path]:
        """Every lock file this lock takes, in the order taken."""
        return [lock.path for lock in self._files]

    def _subject(self, directory: Path) -> Path:
        """What the lock in `directory` protects, for messages."""
        if self.out_dir is not None and directory == self.out_dir / STATE_DIR_NAME:
            return self.out_dir
        return self.state_dir

    def acquire(self) -> None:
        """Take every lock, or raise RunLockedError naming the run that holds one (and take none)."""
        if self._held:
            return
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "token": uuid.uuid4().hex,
            "state_dir": str(self.state_dir),
            **({"out_dir": str(self.out_dir)} if self.out_dir is not None else {}),
            **({"pid_start": start} if (start := _process_start(os.getpid())) else {}),
            **_slurm_identity(),
            **({"shard": _shard_label(self.shard), "need": 0} if self.shard is not None else {}),
        }
        self._record = record
        try:
            for lock in self._files:
                lock.acquire(record)
                self._held.append(lock)
            if self.shard is None:
                for directory in self._dirs:
                    self._refuse_beside_shards(directory, record)
            else:
                for directory in self._dirs:
                    shared = directory / SHARED_DIR_NAME
                    entry = _LockFile(shared, self._subject(directory), self._entry_name())
                    entry.acquire(record)
                    self._held.append(entry)
                for directory in self._dirs:
                    self._refuse_beside_exclusive(directory, record)
        except BaseException:
            self.release()
            raise

    def _entry_name(self) -> str:
        host = "".join(c if c.isalnum() or c in "-_" else "_" for c in self._record["host"])[:64]
        return f"{host}.{self._record['pid']}.{self._record['token'][:8]}"

    def _refuse_beside_shards(self, directory: Path, mine: dict[str, Any]) -> None:
        """Exclusive step (2): a live shared entry means a shard is at work."""
        for entry, holder in _live_entries(directory / SHARED_DIR_NAME, self._subject(directory), mine):
            raise entry._locked(entry._describe(holder))

    def _refuse_beside_exclusive(self, directory: Path, mine: dict[str, Any]) -> None:
        """Shared step (2): a live ``run.lock`` means an exclusive run is at work."""
        lock = _LockFile(directory, self._subject(directory))
        holder = lock._read()
        if holder is not None and lock._stale_because(holder, mine) is None:
            raise lock._locked(lock._describe(holder))

    # -- the free-space share of a shard -------------------------------------------------------
    def declare_need(self, nbytes: int) -> None:
        """Record in our shared entries the bytes this shard still needs (for the others' preflight).

        The entry is replaced atomically (a new file renamed over it): readers see the old or the new
        record, never a torn one. A shard that cannot write it keeps going: the figure is advisory.
        """
        if self.shard is None or not self._held:
            return
        self._record["need"] = max(int(nbytes), 0)
        content = json.dumps(self._record).encode()
        for lock in self._held:
            if lock.directory.name != SHARED_DIR_NAME:
                continue
            tmp = lock.directory / f".{lock.path.name}.{uuid.uuid4().hex}.tmp"
            try:
                tmp.write_bytes(content)
                os.replace(tmp, lock.path)
            except OSError as err:
                log.debug("could not declare the shard's need in %s: %s", lock.path, err)
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def others_need(self) -> int:
        """The bytes the other live shards of this folder have declared they still need."""
        directory = self._dirs[0]
        mine = self._record or {"host": socket.gethostname(), "pid": os.getpid()}
        total = 0
        for _entry, holder in _live_entries(directory / SHARED_DIR_NAME, self._subject(directory), mine):
            if holder.get("token") != mine.get("token"):
                need = holder.get("need", 0)
                total += need if isinstance(need, int) and need > 0 else 0
        return total

    def release(self) -> None:
        """Remove the locks that are still ours. Idempotent."""
        held, self._held = self._held, []
        for lock in reversed(held):
            lock.release()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _shard_label(shard: str) -> str:
    """``shard-K-of-N`` -> ``K/N`` for messages."""
    parts = shard.split("-")
    return f"{parts[1]}/{parts[3]}" if len(parts) == 4 else shard


def _live_entries(
    directory: Path, subject: Path, mine: dict[str, Any]
) -> Iterator[tuple[_LockFile, dict[str, Any]]]:
    """The live shared entries in `directory` (stale ones are removed on the way)."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return
    except OSError as err:
        raise local_error_from_oserror(err, directory, "list the shared locks") from err
    for name in names:
        if name.startswith("."):
            continue  # a temporary file of a publish or a declaration
        entry = _LockFile(directory, subject, name)
        holder = entry._read()
        if holder is None or holder.get("token") == mine.get("token"):
            continue
        why = entry._stale_because(holder, mine)
        if why is not None:
            log.warning("removing a stale shard lock: %s (%s)", entry.path, why)
            entry._take_over(holder)
            continue
        yield entry, holder


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


class _LockFile:
    """One lock file: `<directory>/run.lock`, guarding `subject` (named in messages)."""

    def __init__(self, directory: Path, subject: Path, name: str = LOCK_NAME) -> None:
        self.directory = directory
        self.subject = subject
        self.path = directory / name
        self._token: str | None = None

    # -- messages ---------------------------------------------------------------------------------
    def _describe(self, holder: dict[str, Any]) -> str:
        job = holder.get("slurm_job_id")
        if job and holder.get("slurm_array_task_id"):
            job = f"{job}_{holder['slurm_array_task_id']}"
        slurm = f", Slurm job {job}" if job else ""
        shard = f"shard {holder['shard']}, " if isinstance(holder.get("shard"), str) else ""
        return (
            f"another tessmirror run ({shard}pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
            f"{slurm}, started {holder.get('started', '?')}) is using {self.subject}"
        )

    def _locked(self, message: str) -> RunLockedError:
        return RunLockedError(
            message, path=self.path, hint=f"wait for it to finish, or remove {self.path} if that run is dead"
        )

    def _malformed(self, why: str) -> RunLockedError:
        return RunLockedError(
            f"the lock file {self.path} {why}, so it cannot tell whether another run is using {self.subject}",
            path=self.path,
            hint=f"if no tessmirror run is using {self.subject}, delete {self.path} and run again",
        )

    # -- reading ----------------------------------------------------------------------------------
    def _read(self) -> dict[str, Any] | None:
        """The current lock's content; None when it vanished. RunLockedError when it is malformed."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise self._malformed("is a directory") from None
        except OSError as err:
            raise local_error_from_oserror(err, self.path, "read the lock") from err
        try:
            holder = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise self._malformed("is not a tessmirror lock (not JSON)") from None
        if not isinstance(holder, dict) or not isinstance(holder.get("host"), str):
            raise self._malformed("is not a tessmirror lock (no host in it)")
        pid = holder.get("pid")
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid <= PID_MAX:
            raise self._malformed(f"names an impossible pid ({str(pid)[:40]!r})")
        return holder

    def _stale_because(self, holder: dict[str, Any], mine: dict[str, Any]) -> str | None:
        """Why the lock `holder` is stale, or None when its run may be alive."""
        pid = holder["pid"]
        if holder.get("slurm_job_id") and _same_slurm_task(holder, mine):
            if holder.get("slurm_restart_count") != mine.get("slurm_restart_count"):
                return f"Slurm job {holder['slurm_job_id']} was requeued"
            if "slurm_restart_count" not in mine and holder["host"] != mine["host"]:
                return f"Slurm job {holder['slurm_job_id']} now runs on {mine['host']}"
        if holder["host"] != mine["host"]:
            return None  # another machine: its pids mean nothing here
        if pid == mine["pid"]:
            with _HELD_GUARD:
                ours = holder.get("token") in _HELD
            return None if ours else f"pid {pid} is this process, which did not take it"
        if not _pid_alive(pid):
            return f"pid {pid} is not running"
        recorded = holder.get("pid_start")
        current = _process_start(pid)
        if isinstance(recorded, str) and current is not None and recorded != current:
            return f"pid {pid} is now another process"
        return None

    # -- writing ----------------------------------------------------------------------------------
    def acquire(self, record: dict[str, Any]) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise local_error_from_oserror(err, self.directory, "create") from err
        content = json.dumps(record).encode()
        for _ in range(5):
            if self._publish(content):
                self._token = record["token"]
                with _HELD_GUARD:
                    _HELD.add(self._token)
                return
            holder = self._read()
            if holder is None:
                continue  # released between our tries
            why = self._stale_because(holder, record)
            if why is None:
                raise self._locked(self._describe(holder))
            log.warning("taking over a stale lock: %s (%s)", self.path, why)
            self._take_over(holder)
        raise self._locked(f"could not take the lock {self.path}: other runs keep changing it")

    def _publish(self, content: bytes) -> bool:
        """Create the lock file with `content`, atomically; False if it already exists."""
        tmp = self.directory / f".{self.path.name}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError as err:
                if err.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
                    return self._publish_excl(content)  # no hard links here
                # NFS may report an error for a link that was made: the link count tells the truth.
                if os.stat(tmp).st_nlink == 2:
                    return True
                raise
        except OSError as err:
            raise local_error_from_oserror(err, self.path, "create the lock") from err
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _publish_excl(self, content: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def _take_over(self, holder: dict[str, Any]) -> None:
        """Move a stale lock aside; if a racing run replaced it meanwhile, put theirs back."""
        aside = self.directory / f".{self.path.name}.stale.{uuid.uuid4().hex}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else removed it; just try to create ours
        except OSError as err:
            raise local_error_from_oserror(err, self.path, "replace the stale lock") from err
        try:
            moved = json.loads(aside.read_bytes())
        except (OSError, ValueError):
            moved = None
        if moved != holder:
            # A racing run replaced the stale lock with its live one before our rename: put it back.
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        with contextlib.suppress(OSError):
            os.unlink(aside)

    def release(self) -> None:
        if self._token is None:
            return
        token, self._token = self._token, None
        with _HELD_GUARD:
            _HELD.discard(token)
        try:
            data = self.path.read_bytes()
            holder = json.loads(data)
        except (OSError, ValueError):
            return
        if isinstance(holder, dict) and holder.get("token") == token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _same_slurm_task(holder: dict[str, Any], mine: dict[str, Any]) -> bool:
    return holder.get("slurm_job_id") == mine.get("slurm_job_id") and holder.get(
        "slurm_array_task_id"
    ) == mine.get("slurm_array_task_id")


__all__ = ["LOCK_NAME", "PID_MAX", "SHARED_DIR_NAME", "STATE_DIR_NAME", "RunLock"]
