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
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def add_archive_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every `archive serve` flag to `parser`."""
    p = parser
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument(
        "--port", type=_number("--port", int, 0, 65535, "a port"), default=0, help="0: a free port"
    )
    p.add_argument("--sectors", default="1-13", help="sectors to generate, e.g. 1-13 or 1,2,5")
    p.add_argument(
        "--targets",
        type=_number("--targets", int, 0, 10_000_000, "a count"),
        default=2000,
        help="TIC targets",
    )
    p.add_argument(
        "--file-size",
        type=_file_size("--file-size"),
        default="full",
        help="full (about 2 MB), small, or cadences",
    )
    p.add_argument("--faults", default="", help="fault spec, e.g. '500=0.2,429=0.1:retry_after=2,seed=7'")
    p.add_argument("--data-dir", type=Path, help="cache for generated files (default: a temporary folder)")
    p.add_argument(
        "--seed",
        type=_number("--seed", int, 0, 2**31 - 1, "a whole number"),
        default=0,
        help="seed of the synthetic catalogue and of the faults (default 0)",
    )
    p.add_argument(
        "--hard-limit", type=_number("--hard-limit", int, 1, 10_000_000, "a row count"), default=100_000,
        help="TAP MAXREC hard limit (the default MAXREC is the smaller of 100,000 and this)",
    )  # fmt: skip
    p.add_argument("--focus", type=_focus, help="put every target in one footprint: SECTOR,CAMERA,CCD")
    p.add_argument(
        "--no-artifacts", action="store_true", help="serve no dbo.caomplane/caomartifact (ObsCore only)"
    )
    p.add_argument(
        "--hostile-names", action="store_true", help="add rows with hostile file names (for testing)"
    )

    shape = p.add_argument_group(
        "MAST's shapes (docs/MAST_MODEL.md); unset flags keep the defaults or --mast-like's"
    )
    shape.add_argument(
        "--mast-like", action="store_true",
        help="MAST's shape: 300 FFI exposures a CCD with files, ObsCore rows per product, redirects to a "
        "second host, 20%% chunked, 10%% NULL checksums, 5%% NULL lengths, 60 s sync timeout",
    )  # fmt: skip
    shape.add_argument(
        "--exposures", dest="exposures_per_ccd", metavar="N",
        type=_number("--exposures", int, 1, MAX_EXPOSURES, "a count"),
        help=f"FFI observations per sector/camera/CCD (1-{MAX_EXPOSURES}; MAST: ~1,300 at 30 min)",
    )  # fmt: skip
    shape.add_argument(
        "--ffi-files", action=argparse.BooleanOptionalAction, default=None,
        help="give every FFI exposure its _ffic.fits and _ffir.fits files",
    )  # fmt: skip
    shape.add_argument(
        "--ffi-size", dest="ffi_file_size", type=_file_size("--ffi-size"),
        help="FFI size: small (17 KB), full (about 35 MB) or a side in pixels",
    )  # fmt: skip
    shape.add_argument(
        "--obscore-per-product", action=argparse.BooleanOptionalAction, default=None,
        help="one ivoa.obscore row per product file (lc, tp, dvt, ffic, ffir), same obs_id",
    )  # fmt: skip
    shape.add_argument(
        "--url-form", choices=URL_FORMS, help="access_url form: uri (Download API) or path (/files/...)"
    )
    shape.add_argument(
        "--redirect-s3", dest="redirect_to_s3", action=argparse.BooleanOptionalAction, default=None,
        help="the Download API answers 302 to a second host:port serving /stpubdata/tess/public/...",
    )  # fmt: skip
    shape.add_argument(
        "--s3", action=argparse.BooleanOptionalAction, default=None,
        help="serve the S3-shaped bucket /stpubdata/tess/public/... on its own port (for --source s3), "
        "with S3's XML errors and MAST's path_lookup on the API host",
    )  # fmt: skip
    shape.add_argument(
        "--s3-multipart", dest="s3_multipart_fraction", metavar="F",
        type=_number("--s3-multipart", float, 0, 1, "a fraction"),
        help="fraction of objects with a multipart ETag (<hex>-<parts>, not an md5)",
    )  # fmt: skip
    shape.add_argument(
        "--s3-missing", dest="s3_missing_fraction", metavar="F",
        type=_number("--s3-missing", float, 0, 1, "a fraction"),
        help="fraction of files left out of the bucket (served by the Download API only)",
    )  # fmt: skip
    shape.add_argument(
        "--s3-missing-names", dest="s3_missing_names", metavar="NAMES", type=_names,
        help="comma-separated file names left out of the bucket",
    )  # fmt: skip
    shape.add_argument(
        "--s3-missing-error", dest="s3_missing_error", choices=("NoSuchKey", "AccessDenied"),
        help="what a key left out answers: NoSuchKey (404, the default) or AccessDenied (403)",
    )  # fmt: skip
    shape.add_argument(
        "--path-lookup", dest="path_lookup", action=argparse.BooleanOptionalAction, default=None,
        help="with --s3: serve MAST's /api/v0.1/path_lookup/ (default on; off answers 404)",
    )  # fmt: skip
    shape.add_argument(
        "--path-lookup-disagrees", dest="path_lookup_disagrees", action="store_const", const=True,
        help="path_lookup names other keys than the bucket's layout (clients must not trust theirs)",
    )  # fmt: skip
    shape.add_argument(
        "--chunked", dest="chunked_fraction", metavar="F",
        type=_number("--chunked", float, 0, 1, "a fraction"),
        help="fraction of files sent without Content-Length (0-1)",
    )  # fmt: skip
    shape.add_argument(
        "--null-checksums", dest="null_checksum_fraction", metavar="F",
        type=_number("--null-checksums", float, 0, 1, "a fraction"), help="fraction of NULL contentChecksum",
    )  # fmt: skip
    shape.add_argument(
        "--null-lengths", dest="null_length_fraction", metavar="F",
        type=_number("--null-lengths", float, 0, 1, "a fraction"), help="fraction of NULL contentLength",
    )  # fmt: skip
    shape.add_argument(
        "--sync-timeout", metavar="S", type=_number("--sync-timeout", float, 0.001, 86_400, "seconds"),
        help="a sync TAP query running longer answers HTTP 504",
    )  # fmt: skip
    shape.add_argument(
        "--async-abort", dest="async_abort_after", metavar="S",
        type=_number("--async-abort", float, 0.001, 86_400, "seconds"),
        help="an async TAP job running longer ends in ERROR",
    )  # fmt: skip
    shape.add_argument(
        "--slow-join", metavar="S", type=_number("--slow-join", float, 0, 86_400, "seconds"),
        help="seconds added to any query that joins dbo.caomartifact",
    )  # fmt: skip


# Namespace attribute -> ArchiveOptions field, for the shape flags (None: not given).
_SHAPE_FIELDS = (
    "exposures_per_ccd",
    "ffi_files",
    "ffi_file_size",
    "obscore_per_product",
    "url_form",
    "redirect_to_s3",
    "s3",
    "s3_multipart_fraction",
    "s3_missing_fraction",
    "s3_missing_names",
    "s3_missing_error",
    "path_lookup",
    "path_lookup_disagrees",
    "chunked_fraction",
    "null_checksum_fraction",
    "null_length_fraction",
    "sync_timeout",
    "async_abort_after",
    "slow_join",
)


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
