"""Static sharding for plain job arrays (`--shard K/N`, `[run] shard = "K/N"`).

A shard is a stable hash split of the plan by file identity: file `key` (`engine.manifest.file_key`
of its obs_id and file name, or ``path:<relpath>`` for a file listed without an obs_id) belongs to
shard ``blake2b(key) mod N``. So the N shards partition any plan exactly (no overlap, no gap), and
the split does not depend on the order of the rows, on the host, or on Python's hash seed.

Each shard writes its own manifest file (`manifest.d/shard-K-of-N.jsonl`, one writer per file) and
holds its own lock (`shard-K-of-N.lock`) plus the folder lock in shared mode (see engine.lock).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from engine.exceptions import ConfigError

SHARD_MAX = 10_000  # more shards than this is a typo, not a job array
_SHARD_RE = re.compile(r"^\s*(\d{1,6})\s*/\s*(\d{1,6})\s*$")


def shard_of(key: str, count: int) -> int:
    """The shard (0 .. count-1) that owns the file `key`: blake2b of the key, modulo `count`."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard `index` of `count` (0 <= index < count <= SHARD_MAX)."""

    index: int
    count: int

    @property
    def name(self) -> str:
        """``shard-K-of-N``: the stem of the shard's manifest and lock files."""
        return f"shard-{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, key: str) -> bool:
        """Whether the file `key` is this shard's."""
        return shard_of(key, self.count) == self.index


def parse_shard(text: object, key: str = "run.shard") -> Shard | None:
    """``"K/N"`` -> Shard(K, N); None for None or "". ConfigError naming `key` otherwise (exit 2)."""
    if text is None or text == "":
        return None
    if isinstance(text, Shard):
        return text
    hint = f'give K/N with 0 <= K < N <= {SHARD_MAX}, e.g. --shard "$SLURM_ARRAY_TASK_ID/8"'
    match = _SHARD_RE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(key, f"{str(text)[:40]!r} is not K/N", hint=hint)
    index, count = int(match.group(1)), int(match.group(2))
    if not 0 < count <= SHARD_MAX:
        raise ConfigError(key, f"{text!r}: N must be 1 to {SHARD_MAX}", hint=hint)
    if not 0 <= index < count:
        raise ConfigError(key, f"{text!r}: K must be 0 to N-1 ({count - 1})", hint=hint)
    return Shard(index, count)


__all__ = ["SHARD_MAX", "Shard", "parse_shard", "shard_of"]
