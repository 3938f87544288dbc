"""Archive file names -> safe relative paths inside the output folder.

Every name here came from the archive and is untrusted: a hostile or broken service could answer
`../../.bashrc`, `/etc/passwd`, `C:evil`, a name with a NUL or a terminal escape in it, or one longer
than any file system allows. `safe_filename` refuses those (it never "cleans" them: a silently
rewritten name could collide with another file), `relpath_for` checks the name once and hands it
to the layout's strategy (`LAYOUTS`: one function per layout name, so a new layout is one decorated
function here), `within` checks a relative path lexically, and `resolve_within` adds a snapshot
check that no symlink already on disk takes the path outside the output folder. The writes themselves go
through `engine.fetch.partfile`, which never follows a symlink whatever this check saw.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import stat
import unicodedata
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath

from engine.exceptions import ConfigError, UnsafePathError
from engine.models import PlanItem

# tessmirror's own folder under --out (manifest, plan, lock; `engine.lock` holds the same name): no
# layout may put an archive file there, so a file of that name is refused, whatever its case.
STATE_DIR_NAME = ".tessmirror"
MAX_NAME_BYTES = 255  # NAME_MAX on Linux, macOS, and Lustre/NFS servers
_SHOWN_CHARS = 80  # how much of a hostile name an error message repeats

# Unicode categories never legitimate in a file name: controls (NUL, ESC, DEL...), format characters
# (bidi overrides like U+202E that make `gpj.exe` look like `exe.jpg`, zero-width joiners),
# line/paragraph separators, surrogates, private use, unassigned.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
# Windows would read these as devices wherever the mirror is copied to or served from (SMB).
_WINDOWS_DEVICES = frozenset(
    {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
)

# %00-%1F and %7F: a control character once anything URL-decodes the name.
_ENCODED_CONTROL = re.compile(r"%(?:[01][0-9A-Fa-f]|7[Ff])")
MAX_OBS_ID_CHARS = 255
# An obs_id is an identifier, never a path: no separators, no parent references, no controls.
_BAD_OBS_ID = re.compile(r"[/\\\x00-\x1f\x7f]|\.\.")

# tess2018206045859-s0001-0000000025155310-0120-s_lc.fits; DV files carry two sectors
# (-s0001-s0013-) and the TIC after them, so the TIC is matched separately.
_SECTOR_IN_NAME = re.compile(r"-s(\d{4})-")
_TIC_IN_NAME = re.compile(r"-(\d{4})(\d{4})(\d{4})(\d{4})-")  # a TIC, in the four parts of its folders
_SECTOR_FOLDER = re.compile(r"s\d{4}", re.IGNORECASE)  # flat-by-sector's folders, s0000..s9999
# "s0001/" and "tid/s0001/" by sector: a format spec per row was two fifths of the mast layout's time.
_SECTOR_DIRS = tuple(f"s{sector:04d}/" for sector in range(10000))
_TID_DIRS = tuple(f"tid/{folder}" for folder in _SECTOR_DIRS)


def _shown(name: object) -> str:
    text = repr(name)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _refuse(name: object, why: str) -> UnsafePathError:
    return UnsafePathError(
        f"unsafe file name from the archive: {_shown(name)} ({why})",
        hint="the file was skipped; report the name to the archive if it should be valid",
    )


# Names every check below passes as they are (NFC leaves ASCII alone): 1-255 ASCII letters, digits,
# '.', '_' and '-', neither starting nor ending with '.', and not a Windows device name (one before
# the first '.', any case: the lookahead). A million-file resume spent a sixth of its time in the
# general path.
_PLAIN_NAME = re.compile(
    r"(?!(?:[Cc][Oo][Nn]|[Pp][Rr][Nn]|[Aa][Uu][Xx]|[Nn][Uu][Ll]|[Cc][Oo][Mm][0-9]|[Ll][Pp][Tt][0-9])(?:\.|\Z))"
    rf"[A-Za-z0-9_-](?:[A-Za-z0-9._-]{{0,{MAX_NAME_BYTES - 2}}}[A-Za-z0-9_-])?"
)
# An obs_id with none of the characters `_BAD_OBS_ID` looks for, and not too long.
_PLAIN_OBS_ID = re.compile(rf"[A-Za-z0-9_-]{{0,{MAX_OBS_ID_CHARS}}}")

# For callers that place many rows at once (`engine.plan.invariants`): a match says `relpath_for`
# takes the file name / obs_id as it is, without its general checks.
is_plain_name: Callable[[str], re.Match[str] | None] = _PLAIN_NAME.fullmatch
is_plain_obs_id: Callable[[str], re.Match[str] | None] = _PLAIN_OBS_ID.fullmatch


def safe_filename(name: str) -> str:
    """Return `name` (NFC-normalised) if it is safe as one path component; raise UnsafePathError otherwise."""
    if not isinstance(name, str):
        raise _refuse(name, "not a string")
    if _PLAIN_NAME.fullmatch(name):
        return name  # what the general path below answers for such a name (tests compare the two)
    return _checked_filename(name)


def _checked_filename(name: str) -> str:
    """`safe_filename`'s general path, for any string."""
    # NFC so that the same name written by a macOS (NFD) client and a Linux one is one file, not two.
    normal = unicodedata.normalize("NFC", name)
    if normal in ("", ".", ".."):
        raise _refuse(name, "empty or a directory reference")
    if "/" in normal or "\\" in normal:
        raise _refuse(name, "contains a path separator")
    if ":" in normal:
        # `C:x` is drive-relative on Windows; `a:b` is an NTFS alternate data stream.
        raise _refuse(name, "contains ':' (a drive or stream name on Windows)")
    # Printable ASCII holds none of the forbidden categories: the per-character look (a third of a
    # million-file resume's CPU) is for names that are not plain.
    for char in normal if not (normal.isascii() and normal.isprintable()) else ():
        if unicodedata.category(char) in _FORBIDDEN_CATEGORIES:
            raise _refuse(name, f"contains the control or invisible character U+{ord(char):04X}")
    encoded = _ENCODED_CONTROL.search(normal)
    if encoded:
        # Harmless here (we never unquote a name), but a server or a later tool that decodes it gets
        # a NUL or an escape: the archive's data is broken, so the file is refused, not guessed at.
        raise _refuse(name, f"contains the percent-encoded control character {encoded.group()}")
    if normal != normal.strip() or normal.endswith("."):
        # Windows and some SMB/NFS gateways strip these, so two names could become one.
        raise _refuse(name, "starts or ends with white space, or ends with '.'")
    if normal.split(".", 1)[0].upper() in _WINDOWS_DEVICES:
        raise _refuse(name, "a reserved device name on Windows")
    if len(normal.encode("utf-8", errors="strict")) > MAX_NAME_BYTES:
        raise _refuse(name, f"longer than {MAX_NAME_BYTES} bytes")
    return normal


def check_obs_id(obs_id: str) -> None:
    """Refuse an obs_id that looks like a path: it says the archive's data is broken or hostile.

    No obs_id is used in a path today, but it is stored, logged and matched on; a row that carries
    `../../x` in it is not trusted for its file either.
    """
    if not isinstance(obs_id, str):
        raise UnsafePathError(f"unsafe obs_id from the archive: {_shown(obs_id)} (not a string)")
    if _PLAIN_OBS_ID.fullmatch(obs_id):
        return  # TESS's obs_ids: nothing for the search below to find
    bad = _BAD_OBS_ID.search(obs_id)
    if bad or len(obs_id) > MAX_OBS_ID_CHARS:
        why = f"contains {bad.group()!r}" if bad else f"longer than {MAX_OBS_ID_CHARS} characters"
        raise UnsafePathError(
            f"unsafe obs_id from the archive: {_shown(obs_id)} ({why})",
            hint="the file was skipped; report the obs_id to the archive",
        )


def _sector_of(item: PlanItem) -> int | None:
    """The item's sector if it declares a sane one, else the first `-sNNNN-` in its file name."""
    sector = item.sector
    if type(sector) is not int:  # a plan's own ints skip the conversion
        try:
            sector = int(sector)
        except (TypeError, ValueError):
            sector = -1
    if 0 <= sector <= 9999:
        return sector
    match = _SECTOR_IN_NAME.search(item.filename)
    return int(match.group(1)) if match else None


# -- the layouts: one strategy per layout name -------------------------------------------------------
Layout = Callable[[PlanItem], str]
"""A layout strategy: a PlanItem whose `filename` is already safe -> its POSIX path under --out."""

LAYOUTS: dict[str, Layout] = {}
"""Every layout by name, in the order the CLI and the error messages list them."""


def _layout(name: str) -> Callable[[Layout], Layout]:
    """Register the decorated strategy as layout `name` (what `output.layout` / --layout accept)."""

    def register(strategy: Layout) -> Layout:
        LAYOUTS[name] = strategy
        return strategy

    return register


@_layout("mast")
def _mast(item: PlanItem) -> str:
    """tid/s0001/0000/0000/2515/5310/<file>, as on archive.stsci.edu; files without a TIC in their name
    (FFIs, unknown products) go to s0001/<file>, and to misc/<file> with no sector. Every directory
    stays small, which parallel file systems need."""
    declared = item.sector
    # `_sector_of`'s answer for a sane int, without the call.
    sector = declared if type(declared) is int and 0 <= declared <= 9999 else _sector_of(item)
    name = item.filename
    if sector is None:
        return f"misc/{name}"
    tic = _TIC_IN_NAME.search(name)
    if tic is None:
        return f"{_SECTOR_DIRS[sector]}{name}"
    a, b, c, d = tic.groups()
    return f"{_TID_DIRS[sector]}{a}/{b}/{c}/{d}/{name}"


@_layout("sector")
def _by_sector(item: PlanItem) -> str:
    """s0001/<file>; misc/<file> when no sector is known."""
    sector = _sector_of(item)
    return f"misc/{item.filename}" if sector is None else f"{_SECTOR_DIRS[sector]}{item.filename}"


@_layout("flat")
def _flat(item: PlanItem) -> str:
    """<file>: every file in the output folder itself."""
    return item.filename


@_layout("flat-by-sector")
def _flat_by_sector(item: PlanItem) -> str:
    """s0001/<file>, and <file> in the output folder itself when no sector is known.

    Unlike "sector" there is no misc/ folder, so a sector-less file shares the top level with the
    sector folders: one named like a folder (``s0001``, ``S0001`` on a case-insensitive disk) is
    refused rather than left to block that sector's folder.
    """
    sector = _sector_of(item)
    if sector is not None:
        return f"{_SECTOR_DIRS[sector]}{item.filename}"
    if _SECTOR_FOLDER.fullmatch(item.filename):
        raise _refuse(item.filename, "names a sector folder of the flat-by-sector layout")
    return item.filename


def layout_names() -> tuple[str, ...]:
    """The names `output.layout` and --layout accept, in registration order.

    Returns
    -------
    tuple of str
        E.g. ``("mast", "sector", "flat")``; config validation and the CLI's choices read this.
    """
    return tuple(LAYOUTS)


def check_layout(name: str) -> Layout:
    """The strategy registered as `name`; ConfigError naming ``output.layout`` if there is none.

    Parameters
    ----------
    name : str
        A layout name from the config file or --layout.
    """
    try:
        return LAYOUTS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable value from a hand-built Settings
        raise ConfigError(
            "output.layout", f"unknown layout {name!r}", hint=f"use one of: {', '.join(LAYOUTS)}"
        ) from None


def relpath_for(item: PlanItem, layout: str) -> str:
    """The POSIX path, relative to the output folder, where `item` is stored under `layout`.

    The file name and obs_id are checked here, once, for every layout (UnsafePathError); the
    strategy registered in `LAYOUTS` places the checked name, and a path that would land in the
    state folder is refused. An unknown layout is a ConfigError.
    """
    strategy = check_layout(layout)
    filename, obs_id = item.filename, item.obs_id
    # The plain names and obs_ids of `safe_filename` and `check_obs_id`, without the calls: this runs
    # for every row of every plan.
    if type(filename) is not str or not _PLAIN_NAME.fullmatch(filename):
        filename = safe_filename(filename)
        if filename != item.filename:  # NFC-normalised: the strategy sees only the checked name
            item = dataclasses.replace(item, filename=filename)
    if type(obs_id) is not str or not _PLAIN_OBS_ID.fullmatch(obs_id):
        check_obs_id(obs_id)
    relpath = strategy(item)
    # Only '.' casefolds to a string starting with '.', so any other first character rules the state
    # folder out without the casefold.
    if relpath[:1] == "." and relpath.partition("/")[0].casefold() == STATE_DIR_NAME:
        # A flat layout would put the file where the state folder is: refused by name here rather
        # than by the writer, whose message would suggest removing that folder.
        raise _refuse(item.filename, "the name of tessmirror's state folder under --out")
    return relpath


def within(root: Path, relpath: str) -> Path:
    """`root / relpath` as an absolute path, checked lexically only (no file system access).

    `relpath` must be a relative POSIX path whose every component passes `safe_filename`; the root
    is made absolute and resolved (it may be a symlink: the user chose it). Raises UnsafePathError.
    Symlinks *under* the root are not looked at here: writes go through
    `engine.fetch.partfile`, which never follows one.
    """
    if not isinstance(relpath, str) or not relpath:
        raise _refuse(relpath, "empty path")
    if "\\" in relpath or PurePosixPath(relpath).is_absolute() or PureWindowsPath(relpath).drive:
        raise _refuse(relpath, "absolute or not a POSIX relative path")
    safe_parts = [safe_filename(part) for part in relpath.split("/")]
    return _resolved_root(str(root)).joinpath(*safe_parts)


def resolve_within(root: Path, relpath: str) -> Path:
    """`root / relpath` as an absolute path (see `within`), refused if a symlink already on disk
    would take it outside `root`.

    The symlink check is advisory: it is a snapshot (a path can be swapped a moment later), which is
    why nothing is remembered between calls and why writers must use `engine.fetch.partfile`. It
    lets readers (`tessmirror verify`) and the planner refuse an escaping path early, with a clear
    one-line failure. Cost: one lstat per existing component (~2 us each).
    """
    candidate = within(root, relpath)
    base = _resolved_root(str(root))
    current = str(base)
    for part in candidate.parts[len(base.parts) :]:
        current = os.path.join(current, part)
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            break  # nothing below it exists yet, so no symlink can redirect it (yet)
        except OSError as err:
            raise _refuse(relpath, f"cannot be resolved: {err}") from None
        if stat.S_ISLNK(mode):
            return _resolve_through_links(base, candidate, relpath)
    return candidate


@functools.lru_cache(maxsize=64)
def _resolved_root(root: str) -> Path:
    return Path(os.path.abspath(root)).resolve()


def _resolve_through_links(base: Path, candidate: Path, relpath: str) -> Path:
    # strict=False: the parts that do not exist yet are taken as they are, the existing ones resolved.
    try:
        resolved = candidate.resolve(strict=False)
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop (Python < 3.13)
        raise _refuse(relpath, f"cannot be resolved: {err}") from None
    if resolved != base and base not in resolved.parents:
        raise _refuse(relpath, f"resolves to {str(resolved)!r}, outside {str(base)!r} (a symlink?)")
    return candidate
