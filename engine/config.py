"""TOML file + CLI overrides -> a validated `engine.settings.Settings`.

Every problem is raised as `ConfigError(key, message, hint=...)` naming the dotted key at fault, so
the user can find the line in the file or the flag on the command line. The list of known keys is
derived from the dataclasses in `engine.settings`, so it cannot drift from the schema. The loader
converts text to the declared types; the sections check the values when they are built.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.cluster import check_job_extra
from engine.cluster import validate_settings as validate_cluster
from engine.exceptions import ConfigError
from engine.models import VerifyLevel, is_number
from engine.settings import AUTO, Settings
from engine.validation import (
    SECTOR_MAX,
    SECTOR_MIN,
    check_range,
    hint_args,
    parse_verify_level,
    validate_cone,
    validate_polygon,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# One entry per TOML table: the Settings field name -> its dataclass.
SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Settings)[f.name] for f in dataclasses.fields(Settings)
}
# Every known dotted key ("fetch.concurrency") -> its type hint, read from the dataclasses.
KEYS: dict[str, Any] = {
    f"{section}.{name}": hint
    for section, cls in SECTIONS.items()
    for name, hint in typing.get_type_hints(cls).items()
}


def _is_path_hint(hint: Any) -> bool:
    return Path in hint_args(hint)


# Keys holding paths: relative values are resolved against the config file's folder or the CWD.
PATH_KEYS = frozenset(key for key, hint in KEYS.items() if _is_path_hint(hint))


# -- public parsers for CLI values ----------------------------------------------------------------
def parse_sectors(text: str, *, key: str = "selection.sectors") -> list[int] | None:
    """'all' -> None (every sector); '1,2,5-9' -> [1, 2, 5, 6, 7, 8, 9]."""
    if str(text).strip().lower() == "all":
        return None
    return _parse_int_ranges(text, key=key, low=SECTOR_MIN, high=SECTOR_MAX, what="sector")


def parse_polygon(text: str, *, key: str = "selection.polygon") -> list[float]:
    """'ra1 dec1 ra2 dec2 ...', comma-separated, or MAST's 'POLYGON ra dec ...' -> [ra1, dec1, ...].

    A closing vertex equal to the first is dropped, so the result is the open list of >= 3 vertices.
    """
    body = str(text).strip()
    # Accept MAST's s_region form ("POLYGON ICRS ra dec ...") and ADQL's "POLYGON('ICRS', ...)".
    body = re.sub(r"(?i)^\s*polygon\b", "", body).strip()
    body = body.strip("()").strip()
    body = re.sub(r"(?i)^'?(icrs|fk5|j2000)'?\s*,?", "", body)
    tokens = [tok for tok in re.split(r"[\s,]+", body) if tok]
    try:
        numbers = [float(tok) for tok in tokens]
    except ValueError:
        bad = next(tok for tok in tokens if not is_number(tok))
        raise ConfigError(
            key, f"{bad!r} is not a number", hint="give ra dec pairs in degrees, e.g. '10 -5 12 -5 11 -3'"
        ) from None
    return validate_polygon(numbers, key=key)


def parse_cone(text: str, *, key: str = "selection.cone") -> tuple[float, float, float]:
    """'ra dec radius' (degrees, space- or comma-separated) -> (ra, dec, radius)."""
    tokens = [tok for tok in re.split(r"[\s,]+", str(text).strip()) if tok]
    try:
        numbers = [float(tok) for tok in tokens]
    except ValueError:
        numbers = []
    if len(numbers) != 3:
        raise ConfigError(
            key, f"expected 'ra dec radius' in degrees, got {text!r}", hint="e.g. --cone '330.3 -44.3 0.5'"
        )
    return validate_cone(numbers, key=key)


# -- loading ----------------------------------------------------------------------------------------
def load_settings(
    path: Path | None,
    overrides: Mapping[str, object] | None = None,
    *,
    require_selection: bool = True,
    require_out: bool = False,
) -> Settings:
    """Read `path` (TOML; None: defaults), apply `overrides` (dotted keys from CLI flags; CLI wins),
    validate, and return Settings. Override values of None mean "flag not given" and are skipped.

    `require_selection=False` lets commands that download nothing (verify, archive serve) skip the
    "nothing selected" check. `require_out=True` (the CLI) refuses to fall back on the default output
    directory: `output.out_dir` must come from the file or from `--out`.
    """
    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    if path is not None:
        path = Path(path).expanduser()
        document = _read_toml(path)
        base = path.resolve().parent
        for table, content in document.items():
            if table not in SECTIONS:
                raise _unknown(table, list(SECTIONS), what="table")
            if not isinstance(content, dict):
                raise ConfigError(
                    table, f"expected a [{table}] table, got {content!r}", hint=f"write [{table}]"
                )
            for name, raw in content.items():
                key = f"{table}.{name}"
                if key not in KEYS:
                    raise _unknown(key, list(KEYS), what="key")
                values[table][name] = _convert(key, raw, base=base)
    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in KEYS:
            raise _unknown(key, list(KEYS), what="key")
        table, name = key.split(".", 1)
        values[table][name] = _convert(key, raw, base=Path.cwd())
    if require_out and "out_dir" not in values["output"]:
        raise ConfigError(
            "output.out_dir",
            "no output directory given",
            hint="give --out DIR, or set out_dir in the [output] table of the --config file",
        )
    settings = Settings(**{section: SECTIONS[section](**values[section]) for section in SECTIONS})
    _validate(settings, require_selection=require_selection)
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError("config", f"the file {str(path)!r} does not exist", hint="check --config") from None
    except OSError as err:
        raise ConfigError(
            "config", f"cannot read {str(path)!r}: {err.strerror or err}", hint="check --config"
        ) from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(
            "config", f"{str(path)!r} is not UTF-8 text: {err}", hint="save it as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as err:
        # tomllib's message already carries "(at line L, column C)".
        raise ConfigError(
            "config", f"{str(path)!r} is not valid TOML: {err}", hint="see config.example.toml"
        ) from None


def _unknown(key: str, known: list[str], *, what: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return ConfigError(key, f"unknown {what}; did you mean {close[0]}?", hint="see config.example.toml")
    return ConfigError(key, f"unknown {what}", hint="see config.example.toml for the known keys")


# -- conversion: TOML / CLI value -> the dataclass field's type ---------------------------------------
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _convert(key: str, raw: Any, *, base: Path) -> Any:
    """Turn one raw value into the type KEYS[key] declares; relative paths are joined onto `base`."""
    special = _SPECIAL.get(key)
    if special is not None:
        return special(key, raw)
    hint = KEYS[key]
    members = hint_args(hint)
    if type(None) in members and (raw is None or (isinstance(raw, str) and raw.strip().lower() == "none")):
        return None
    target = next(m for m in members if m is not type(None))
    if target is Path:
        if not isinstance(raw, (str, Path)) or not str(raw).strip():
            raise ConfigError(key, f"expected a path, got {raw!r}")
        if key == "selection.urls_file" and str(raw).strip() == "-":
            return Path("-")  # standard input, not a file named "-" in some folder
        candidate = Path(raw).expanduser()
        return candidate if candidate.is_absolute() else base / candidate
    if target is bool:
        return _to_bool(key, raw)
    if target is int:
        return _to_int(key, raw)
    if target is float:
        return _to_float(key, raw)
    if target is str:
        if not isinstance(raw, str):
            raise ConfigError(key, f"expected a string, got {raw!r}")
        return raw
    if target is VerifyLevel:
        return parse_verify_level(key, raw)
    raise ConfigError(key, f"cannot read a value of type {target!r}")  # schema grew a type we do not know


def _to_bool(key: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise ConfigError(key, f"expected true or false, got {raw!r}")


def _to_int(key: str, raw: Any) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and re.fullmatch(r"\s*[+-]?\d+\s*", raw):
        return int(raw)
    raise ConfigError(key, f"expected an integer, got {raw!r}")


def _to_float(key: str, raw: Any) -> float:
    numeric = isinstance(raw, (int, float)) and not isinstance(raw, bool)
    if not (numeric or (isinstance(raw, str) and is_number(raw.strip()))):
        raise ConfigError(key, f"expected a number, got {raw!r}")
    value = float(raw)
    if not math.isfinite(value):
        raise ConfigError(key, f"expected a finite number, got {raw!r}")
    return value


def _int_list(key: str, raw: Any, *, low: int, high: int, what: str) -> list[int]:
    if isinstance(raw, str):
        return _parse_int_ranges(raw, key=key, low=low, high=high, what=what)
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = [raw]
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(key, f"expected a list of integers, got {raw!r}")
    numbers = [_to_int(key, item) for item in raw]
    for number in numbers:
        check_range(key, number, low, high, what)
    return sorted(set(numbers))


def _parse_int_ranges(text: str, *, key: str, low: int, high: int, what: str) -> list[int]:
    numbers: set[int] = set()
    parts = [part.strip() for part in str(text).split(",")]
    example = f"e.g. '{low},{low + 1}' or '{low}-{min(high, low + 3)}'"
    for part in parts:
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise ConfigError(key, f"expected {what} numbers, got {part!r}", hint=example)
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else first
        if last < first:
            raise ConfigError(key, f"range {part!r} runs backwards", hint=example)
        for number in (first, last):
            check_range(key, number, low, high, what)
        numbers.update(range(first, last + 1))
    return sorted(numbers)


def _sectors(key: str, raw: Any) -> list[int] | None:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("all", "none", "")):
        return None
    return _int_list(key, raw, low=SECTOR_MIN, high=SECTOR_MAX, what="sector")


def _sector(key: str, raw: Any) -> int | None:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() == "none"):
        return None
    number = _to_int(key, raw)
    check_range(key, number, SECTOR_MIN, SECTOR_MAX, "sector")
    return number


def _detectors(key: str, raw: Any) -> list[int]:
    if isinstance(raw, str) and raw.strip().lower() == "all":
        return []  # every camera / CCD, as when none is given
    what = "camera" if key.endswith("cameras") else "CCD"
    return _int_list(key, raw, low=1, high=4, what=what)


def _polygon(key: str, raw: Any) -> list[float] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        return parse_polygon(raw, key=key)
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(key, f"expected a list of numbers or a string, got {raw!r}")
    return validate_polygon([_to_float(key, v) for v in raw], key=key)


def _cone(key: str, raw: Any) -> tuple[float, float, float] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        return parse_cone(raw, key=key)
    if not isinstance(raw, (list, tuple)) or len(raw) != 3:
        raise ConfigError(key, f"expected [ra, dec, radius] in degrees, got {raw!r}")
    return validate_cone([_to_float(key, v) for v in raw], key=key)


def _products(key: str, raw: Any) -> list[str]:
    if isinstance(raw, str):
        raw = [part for part in re.split(r"[\s,]+", raw) if part]
    if not isinstance(raw, (list, tuple)) or not all(isinstance(p, str) for p in raw):
        raise ConfigError(key, f"expected a list of product names, got {raw!r}")
    return list(raw)  # Selection checks the names and lower-cases them when it is built


def _concurrency(key: str, raw: Any) -> int | str:
    if isinstance(raw, str) and raw.strip().lower() == AUTO:
        return AUTO
    try:
        return _to_int(key, raw)
    except ConfigError:
        raise ConfigError(
            key, f"expected a number or {AUTO!r}, got {raw!r}", hint="e.g. --concurrency 16, or auto"
        ) from None


_SPECIAL = {
    "fetch.concurrency": _concurrency,
    "selection.sector": _sector,
    "selection.sectors": _sectors,
    "selection.cameras": _detectors,
    "selection.ccds": _detectors,
    "selection.polygon": _polygon,
    "selection.cone": _cone,
    "selection.products": _products,
    "cluster.job_extra": check_job_extra,
}


# -- whole-settings validation ------------------------------------------------------------------------
def validate_settings(settings: Settings, *, require_selection: bool = False) -> None:
    """Check a whole Settings, however it was made (the loader, the Python API, by hand).

    Each section already checked its own fields when it was built; this runs those checks again
    (the sections are mutable) and adds what one section cannot see: the http(s) URLs and the
    source name, which selections may be combined, a cluster beside a shard, an extra that is
    not installed, and `require_selection`.

    Parameters
    ----------
    settings : Settings
        Checked in place; a few values are normalized (the log level's case, the shard's form).
    require_selection : bool
        Also refuse settings that select nothing to mirror.

    Raises
    ------
    engine.exceptions.ConfigError
        The first bad value, naming its key and the fix.
    """
    _validate(settings, require_selection=require_selection)


def _validate(settings: Settings, *, require_selection: bool) -> None:
    # Each section checked itself when it was built; again here, because the sections are mutable
    # (`settings.fetch.retries = -1` after construction) and normalize on the way (log level, shard).
    tap, fetch = settings.tap, settings.fetch
    tap.validate()
    settings.selection.validate()
    settings.output.validate()
    fetch.validate()
    settings.verify.validate()
    settings.run.validate()
    settings.cluster.validate()
    validate_cluster(settings)  # [cluster] beside run.shard; --cluster without the extra is one line
    _validate_selection(settings, require_selection=require_selection)


def _validate_selection(settings: Settings, *, require_selection: bool) -> None:
    sel = settings.selection
    if (sel.cameras or sel.ccds) and sel.sector is None and sel.polygon is None and sel.cone is None:
        raise ConfigError(
            "selection.cameras" if sel.cameras else "selection.ccds",
            "cameras/CCDs choose a footprint, which needs a sector",
            hint="add --sector N (selection.sector)",
        )
    regions = {
        "selection.sector": ("--sector", sel.sector),
        "selection.polygon": ("--polygon", sel.polygon),
        "selection.cone": ("--cone", sel.cone),
        "selection.targets_file": ("--targets", sel.targets_file),
    }
    given = [(key, flag) for key, (flag, value) in regions.items() if value is not None]
    if len(given) > 1:
        # The planner would silently take one and ignore the others: say so instead.
        keys = " and ".join(f"{flag} ({key})" for key, flag in given)
        raise ConfigError(
            given[1][0],
            f"conflicting selections: {keys} each choose what to mirror",
            hint="give only one of --sector, --polygon, --cone, --targets (the flag or the config key)",
        )
    chosen = (sel.sector, sel.polygon, sel.cone, sel.targets_file, sel.urls_file)
    if require_selection and all(value is None for value in chosen):
        if sel.sectors is not None:
            raise ConfigError(
                "selection",
                "nothing selected: --sectors only filters which sectors' products are kept",
                hint="did you mean --sector N (the footprint's sector)? e.g. --sector 1 --sectors 1-3",
            )
        raise ConfigError(
            "selection",
            "nothing selected; give --sector N (with --camera/--ccd), --polygon, --cone, or --input FILE",
        )
