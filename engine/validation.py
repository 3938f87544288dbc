"""The small per-value checks that `engine.settings` runs on construction and `engine.config` reuses.

Every check raises `ConfigError(key, message, hint=...)` naming the dotted key at fault, with the
same words whether the value came from a TOML file, a command-line flag or a hand-built `Settings`.
This module imports nothing from `engine.settings` or `engine.config`, so both can import it.
"""

from __future__ import annotations

import math
import os
import types
import typing
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from engine.exceptions import ConfigError
from engine.models import VerifyLevel

SECTOR_MIN, SECTOR_MAX = 1, 200
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def hint_args(hint: Any) -> tuple[Any, ...]:
    """The member types of a union (`int | None` -> (int, NoneType)), or (hint,) for a plain type."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def check_http_url(key: str, url: str, *, example: str) -> None:
    """An http(s) URL with a host, or ConfigError naming `key` with an example."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"{url!r} is not an http(s) URL with a host", hint=f"e.g. {example}")


def at_least(key: str, value: float | None, low: float) -> None:
    """ConfigError naming `key` when `value` (None passes) is below `low`."""
    if value is not None and value < low:
        raise ConfigError(key, f"{value} is below the minimum {low}", hint=f"give a value >= {low}")


def positive_timeout(key: str, value: float) -> None:
    """ConfigError naming `key` unless `value` is a positive number of seconds."""
    if value <= 0:
        raise ConfigError(key, f"timeout {value} must be positive", hint="give seconds, e.g. 30")


def check_range(key: str, number: int, low: int, high: int, what: str) -> None:
    """ConfigError naming `key` unless ``low <= number <= high``; `what` names one item ("sector")."""
    if not low <= number <= high:
        raise ConfigError(
            key, f"{what} {number} is outside {low}..{high}", hint=f"give a {what} from {low} to {high}"
        )


def parse_verify_level(key: str, raw: Any) -> VerifyLevel:
    """A VerifyLevel from a member or its name (any case); ConfigError naming `key` otherwise."""
    try:
        return VerifyLevel.parse(raw)
    except ValueError as err:
        raise ConfigError(key, str(err), hint="use size, checksum or fits") from None


def validate_polygon(numbers: list[float], *, key: str = "selection.polygon") -> list[float]:
    """Check a flat [ra1, dec1, ...] list and drop a closing vertex; raise ConfigError naming `key`."""
    hint = "give at least 3 vertices as ra dec pairs in degrees, e.g. '10 -5 12 -5 11 -3'"
    if any(not math.isfinite(v) for v in numbers):
        raise ConfigError(key, "vertices must be finite numbers", hint=hint)
    if len(numbers) % 2:
        raise ConfigError(
            key, f"odd count of numbers ({len(numbers)}); each vertex is an ra dec pair", hint=hint
        )
    if len(numbers) >= 4 and numbers[:2] == numbers[-2:]:
        numbers = numbers[:-2]
    if len(numbers) < 6:
        raise ConfigError(key, f"a polygon needs at least 3 vertices, got {len(numbers) // 2}", hint=hint)
    for ra, dec in zip(numbers[0::2], numbers[1::2], strict=True):
        if abs(dec) > 90:
            raise ConfigError(key, f"declination {dec} is outside -90..90", hint=hint)
        if not -360 <= ra <= 360:
            raise ConfigError(key, f"right ascension {ra} is outside 0..360", hint=hint)
    return [float(v) for v in numbers]


def validate_cone(numbers: Any, *, key: str = "selection.cone") -> tuple[float, float, float]:
    """Check (ra, dec, radius) in degrees; ConfigError naming `key` otherwise."""
    ra, dec, radius = (float(v) for v in numbers)
    hint = "give ra dec radius in degrees, e.g. '330.3 -44.3 0.5'"
    if not all(math.isfinite(v) for v in (ra, dec, radius)):
        raise ConfigError(key, "values must be finite numbers", hint=hint)
    if not -360 <= ra <= 360:
        raise ConfigError(key, f"right ascension {ra} is outside 0..360", hint=hint)
    if abs(dec) > 90:
        raise ConfigError(key, f"declination {dec} is outside -90..90", hint=hint)
    if not 0 < radius <= 180:
        raise ConfigError(key, f"radius {radius} must be > 0 and <= 180 degrees", hint=hint)
    return (ra, dec, radius)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _matches(value: object, hint: Any) -> bool:
    """Whether `value` fits the declared type `hint` (int also fits float; bool fits neither)."""
    origin = typing.get_origin(hint)
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_int(value) or (isinstance(value, float) and math.isfinite(value))
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is tuple:
        items = typing.get_args(hint)
        return (
            isinstance(value, (tuple, list))
            and len(value) == len(items)
            and all(_matches(v, t) for v, t in zip(value, items, strict=True))
        )
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a hint this check does not model: the section's own checks decide


_WORDS = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false", Path: "a path"}


def _describe(hint: Any) -> str:
    if hint is type(None):
        return "None"
    if hint in _WORDS:
        return _WORDS[hint]
    if typing.get_origin(hint) is None and isinstance(hint, type):
        return hint.__name__
    return str(hint)  # list[int], tuple[float, float, float]


def check_types(section: str, obj: object, hints: dict[str, Any]) -> None:
    """ConfigError naming ``section.field`` for the first field of `obj` whose value is not of its
    declared type. A path given as `str` or `os.PathLike` is turned into a `Path` (in place), and a
    verify level given by name into the `VerifyLevel`, as the TOML loader does."""
    for name, hint in hints.items():
        value = getattr(obj, name)
        members = hint_args(hint)
        if Path in members and isinstance(value, (str, os.PathLike)) and not isinstance(value, Path):
            if not str(value).strip():
                raise ConfigError(f"{section}.{name}", f"expected a path, got {value!r}")
            object.__setattr__(obj, name, Path(value))
            continue
        if VerifyLevel in members and not isinstance(value, VerifyLevel):
            object.__setattr__(obj, name, parse_verify_level(f"{section}.{name}", value))
            continue
        if any(_matches(value, member) for member in members):
            continue
        words = " or ".join(_describe(member) for member in members)
        raise ConfigError(f"{section}.{name}", f"expected {words}, got {value!r}")
