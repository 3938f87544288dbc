"""Command-line flags of `tessmirror archive serve` (and `demo`), mapped onto `ArchiveOptions`.

    add_archive_arguments(parser)                 # once, when building the parser
    options = archive_options_from_args(ns)       # after parse_args; extra= fields override

Flags the namespace lacks (e.g. `demo` has only some) keep ArchiveOptions' defaults. The shape
flags default to "not given", so `--mast-like` supplies MAST's shape and any flag given beside it
overrides that one knob (e.g. `--mast-like --exposures 1300 --no-redirect-s3`). A bad value raises
`ConfigError` naming the flag (exit code 2, one line, no traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from engine.exceptions import ConfigError

if TYPE_CHECKING:
    from engine.archive.server import ArchiveOptions

# Kept here (and checked against catalog.py by the tests) so that building the parser imports
# nothing heavy: catalog/server pull in numpy, astropy and aiohttp, needed only to serve.
MAX_EXPOSURES = 10_000
URL_FORMS = ("uri", "path")
SECTOR_MAX = 200


def _number(
    flag: str, cast: Callable[[str], Any], low: float, high: float, what: str
) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise ConfigError(flag, f"{text!r} is not {what}") from None
        if not (low <= value <= high) or (isinstance(value, float) and math.isnan(value)):
            raise ConfigError(flag, f"{text} is out of range; use {what} from {low:g} to {high:g}")
        return value

    return parse


def parse_sector_list(text: str, *, flag: str = "--sectors") -> list[int]:
    """'1-13' or '1,2,5-9' -> the sectors, in order (each 1..SECTOR_MAX)."""
    sectors: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        low, sep, high = part.partition("-")
        try:
            first, last = (int(low), int(high)) if sep else (int(part), int(part))
        except ValueError:
            raise ConfigError(
                flag, f"{part!r} is not a sector or a range", hint="e.g. 1-13 or 1,2,5"
            ) from None
        if not 1 <= first <= last <= SECTOR_MAX:
            raise ConfigError(flag, f"{part!r} is not a range of sectors 1-{SECTOR_MAX}", hint="e.g. 1-13")
        sectors.extend(range(first, last + 1))
    if not sectors:
        raise ConfigError(flag, f"no sectors in {text!r}", hint="e.g. 1-13 or 1,2,5")
    return sorted(set(sectors))


def _focus(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.replace(" ", "").split(",") if p)
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise ConfigError("--focus", f"expected SECTOR,CAMERA,CCD, got {text!r}", hint="e.g. --focus 1,1,2")
    return parts  # the length check above narrows tuple[int, ...] to three ints


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list of file names (empty items dropped)."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _file_size(flag: str) -> Callable[[str], str | int]:
    def parse(text: str) -> str | int:
        if text in ("full", "small"):
            return text
        if text.isdigit():
            return int(text)
        raise ConfigError(flag, f"{text!r} is not valid", hint="use full, small or a number")

    return parse


_F = TypeVar("_F", bound="Flag")


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag, written once: its names, its help and `add_argument`'s other keywords.

    `add` puts it on a parser or an argument group; `variant` is the same flag with another name or
    help text for another command (engine/cli.py builds the CLI's flags from this class too).
    """

    names: tuple[str, ...]
    help: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def help_text(self) -> str:
        """The help as `--help` shows it."""
        return self.help

    def add(self, parser: argparse._ActionsContainer, **overrides: Any) -> argparse.Action:
        """Add this flag to `parser` (a parser or a group); `overrides` win over its keywords."""
        return parser.add_argument(*self.names, **{"help": self.help_text(), **self.options, **overrides})

    def variant(self: _F, **changes: Any) -> _F:
        """This flag with some fields changed, e.g. `variant(help="...")` for another command."""
        return dataclasses.replace(self, **changes)


def flag(*names: str, help: str, **options: Any) -> Flag:
    """A `Flag` from `add_argument`'s arguments: `flag("--seed", type=int, help="...")`."""
    return Flag(names, help, options)


def ranged(name: str, cast: Callable[[str], Any], low: float, high: float, what: str, **options: Any) -> Flag:
    """A flag whose value is a number in [low, high]; a bad one is a ConfigError naming `name`."""
    return flag(name, type=_number(name, cast, low, high, what), **options)


def _fraction(name: str, dest: str, help: str) -> Flag:
    """A shape flag that is a fraction of the files (0 to 1), into ArchiveOptions' `dest`."""
    return ranged(name, float, 0, 1, "a fraction", dest=dest, metavar="F", help=help)


def _seconds(name: str, low: float, help: str, **options: Any) -> Flag:
    """A shape flag that is a duration in seconds, from `low` to a day."""
    return ranged(name, float, low, 86_400, "seconds", metavar="S", help=help, **options)


def add_flags(parser: argparse._ActionsContainer, flags: Iterable[Flag]) -> None:
    """Add `flags` to `parser` (a parser or a group), in order: the order `--help` lists them."""
    for each in flags:
        each.add(parser)


# The flags of `archive serve`, in the order `--help` lists them. Built at import: nothing here is heavy.
_SERVE_FLAGS = (
    flag("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"),
    ranged("--port", int, 0, 65535, "a port", default=0, help="0: a free port"),
    flag("--sectors", default="1-13", help="sectors to generate, e.g. 1-13 or 1,2,5"),
    ranged("--targets", int, 0, 10_000_000, "a count", default=2000, help="TIC targets"),
    flag(
        "--file-size", type=_file_size("--file-size"), default="full",
        help="full (about 2 MB), small, or cadences",
    ),
    flag("--faults", default="", help="fault spec, e.g. '500=0.2,429=0.1:retry_after=2,seed=7'"),
    flag("--data-dir", type=Path, help="cache for generated files (default: a temporary folder)"),
    ranged(
        "--seed", int, 0, 2**31 - 1, "a whole number", default=0,
        help="seed of the synthetic catalogue and of the faults (default 0)",
    ),
    ranged(
        "--hard-limit", int, 1, 10_000_000, "a row count", default=100_000,
        help="TAP MAXREC hard limit (the default MAXREC is the smaller of 100,000 and this)",
    ),
    flag("--focus", type=_focus, help="put every target in one footprint: SECTOR,CAMERA,CCD"),
    flag("--no-artifacts", action="store_true", help="serve no dbo.caomplane/caomartifact (ObsCore only)"),
    flag("--hostile-names", action="store_true", help="add rows with hostile file names (for testing)"),
)  # fmt: skip

_SHAPE_TITLE = "MAST's shapes (docs/MAST_MODEL.md); unset flags keep the defaults or --mast-like's"
# The shape flags default to None ("not given"): --mast-like's values stand unless a flag overrides one.
_MAST_LIKE = flag(
    "--mast-like", action="store_true",
    help="MAST's shape: 300 FFI exposures a CCD with files, ObsCore rows per product, redirects to a "
    "second host, 20%% chunked, 10%% NULL checksums, 5%% NULL lengths, 60 s sync timeout",
)  # fmt: skip
_ON_OFF: dict[str, Any] = {"action": argparse.BooleanOptionalAction, "default": None}
_SHAPE_FLAGS = (
    ranged(
        "--exposures", int, 1, MAX_EXPOSURES, "a count", dest="exposures_per_ccd", metavar="N",
        help=f"FFI observations per sector/camera/CCD (1-{MAX_EXPOSURES}; MAST: ~1,300 at 30 min)",
    ),
    flag("--ffi-files", **_ON_OFF, help="give every FFI exposure its _ffic.fits and _ffir.fits files"),
    flag(
        "--ffi-size", dest="ffi_file_size", type=_file_size("--ffi-size"),
        help="FFI size: small (17 KB), full (about 35 MB) or a side in pixels",
    ),
    flag(
        "--obscore-per-product", **_ON_OFF,
        help="one ivoa.obscore row per product file (lc, tp, dvt, ffic, ffir), same obs_id",
    ),
    flag("--url-form", choices=URL_FORMS, help="access_url form: uri (Download API) or path (/files/...)"),
    flag(
        "--redirect-s3", dest="redirect_to_s3", **_ON_OFF,
        help="the Download API answers 302 to a second host:port serving /stpubdata/tess/public/...",
    ),
    flag(
        "--s3", **_ON_OFF,
        help="serve the S3-shaped bucket /stpubdata/tess/public/... on its own port (for --source s3), "
        "with S3's XML errors and MAST's path_lookup on the API host",
    ),
    _fraction(
        "--s3-multipart", "s3_multipart_fraction",
        "fraction of objects with a multipart ETag (<hex>-<parts>, not an md5)",
    ),
    _fraction(
        "--s3-missing", "s3_missing_fraction",
        "fraction of files left out of the bucket (served by the Download API only)",
    ),
    flag(
        "--s3-missing-names", metavar="NAMES", type=_names,
        help="comma-separated file names left out of the bucket",
    ),
    flag(
        "--s3-missing-error", choices=("NoSuchKey", "AccessDenied"),
        help="what a key left out answers: NoSuchKey (404, the default) or AccessDenied (403)",
    ),
    flag(
        "--path-lookup", **_ON_OFF,
        help="with --s3: serve MAST's /api/v0.1/path_lookup/ (default on; off answers 404)",
    ),
    flag(
        "--path-lookup-disagrees", action="store_const", const=True,
        help="path_lookup names other keys than the bucket's layout (clients must not trust theirs)",
    ),
    _fraction("--chunked", "chunked_fraction", "fraction of files sent without Content-Length (0-1)"),
    _fraction("--null-checksums", "null_checksum_fraction", "fraction of NULL contentChecksum"),
    _fraction("--null-lengths", "null_length_fraction", "fraction of NULL contentLength"),
    _seconds("--sync-timeout", 0.001, "a sync TAP query running longer answers HTTP 504"),
    _seconds(
        "--async-abort", 0.001, "an async TAP job running longer ends in ERROR", dest="async_abort_after"
    ),
    _seconds("--slow-join", 0, "seconds added to any query that joins dbo.caomartifact"),
)  # fmt: skip


def add_archive_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every `archive serve` flag to `parser`."""
    add_flags(parser, _SERVE_FLAGS)
    shape = parser.add_argument_group(_SHAPE_TITLE)
    add_flags(shape, (_MAST_LIKE, *_SHAPE_FLAGS))


def _dest(each: Flag) -> str:
    """The namespace attribute argparse gives `each`: its dest, else its long name."""
    return str(each.options.get("dest") or each.names[-1].lstrip("-").replace("-", "_"))


# Namespace attribute -> ArchiveOptions field of each shape flag (None: not given); read from the
# flags themselves, so a new shape flag is one entry above.
_SHAPE_FIELDS = tuple(_dest(each) for each in _SHAPE_FLAGS)


def archive_options_from_args(ns: argparse.Namespace, **extra: Any) -> ArchiveOptions:
    """ArchiveOptions from parsed flags; `extra` fields (e.g. demo's sectors/focus/port) win.

    Raises ConfigError naming the flag for a bad fault spec, sector list or option mix.
    """
    from engine.archive.faults import FaultPlan
    from engine.archive.server import ArchiveOptions

    fields: dict[str, Any] = {}
    spec = getattr(ns, "faults", "") or ""
    try:
        fields["faults"] = FaultPlan.from_spec(spec) if spec else FaultPlan()
    except ValueError as err:
        raise ConfigError("--faults", str(err)) from None
    sectors = getattr(ns, "sectors", None)
    if isinstance(sectors, str):
        fields["sectors"] = parse_sector_list(sectors)
    elif sectors:
        fields["sectors"] = tuple(sectors)
    file_size = getattr(ns, "file_size", None)
    if isinstance(file_size, str) and file_size.isdigit():
        file_size = int(file_size)
    plain = {
        "host": getattr(ns, "host", None),
        "port": getattr(ns, "port", None),
        "targets": getattr(ns, "targets", None),
        "file_size": file_size,
        "data_dir": getattr(ns, "data_dir", None),
        "seed": getattr(ns, "seed", None),
        "focus": tuple(ns.focus) if getattr(ns, "focus", None) else None,
        "hostile_names": getattr(ns, "hostile_names", None) or None,
    }
    fields.update({k: v for k, v in plain.items() if v is not None})
    if getattr(ns, "no_artifacts", False):
        fields["artifacts"] = False
    hard_limit = getattr(ns, "hard_limit", None)
    if hard_limit is not None:
        fields["tap_hard_limit"] = hard_limit
        fields["tap_default_maxrec"] = min(100_000, hard_limit)
    for name in _SHAPE_FIELDS:
        value = getattr(ns, name, None)
        if value is not None:
            fields[name] = value
    fields.update(extra)
    if fields.get("focus") is not None and len(fields["focus"]) != 3:
        raise ConfigError("--focus", f"expected SECTOR,CAMERA,CCD, got {fields['focus']}")
    options = (
        ArchiveOptions.mast_like(**fields) if getattr(ns, "mast_like", False) else ArchiveOptions(**fields)
    )
    try:
        options.shape()  # validated now, not when the server starts
        options.s3_shape()
    except ValueError as err:
        raise ConfigError("archive options", str(err)) from None
    return options
