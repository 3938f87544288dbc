"""The manifest's typed fast decoder (msgspec) reads every record as the general decoder does.

Records the engine writes go through `_decode_record`; anything else (another field, another type,
a non-ASCII byte, a number out of range) must fall back to `_loads` and read exactly as before. Each
test reads a manifest of random records twice, with the fast decoder and with it refused, and
compares every answer.
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import msgspec
import pytest

from engine import manifest as manifest_module
from engine.manifest import STATUSES, Manifest, ManifestEntry, encode_entry


def _framed(payload: bytes) -> bytes:
    return b'{"crc":"%08x","rec":%s}\n' % (zlib.crc32(payload), payload)


def _random_record(rng: random.Random, n: int) -> bytes:
    """One manifest line: mostly as `encode_entry` writes it, often with one field made odd."""
    key = f"obs{rng.randint(0, 400)}/f{rng.randint(0, 3)}.fits"
    entry = ManifestEntry(
        url=f"https://example.org/{n}",
        path=f"p/{n}.fits",
        status=rng.choice(["verified", "verified", "verified", "failed", "pending", ""]),
        obs_id=f"obs{n}",
        nbytes=rng.choice([0, -5, 2039040, 10**13]),
        md5=rng.choice(["", "0" * 32, f"{rng.getrandbits(128):032x}", "AB" * 16, "Z" * 32]),
        level=rng.choice(["", "size", "fits"]),
        time=rng.choice([0.0, 1.7e9, 12.5]),
        key=key,
        size=rng.choice([-1, 5, 2039040]),
        declared_md5=rng.choice(["", "1" * 32]),
    )
    if rng.random() < 0.6:
        return encode_entry(entry)
    record = json.loads(encode_entry(entry)[len(b'{"crc":"00000000","rec":') : -2])
    field = rng.choice(list(record))
    roll = rng.random()
    if roll < 0.3:  # another type
        record[field] = rng.choice([None, 5, 2.5, True, "12", [1], {"a": 1}, -(2**70), 2**70])
    elif roll < 0.45:  # a field this version does not know
        record[rng.choice(["extra", "Key", "url "])] = rng.choice([1, "x", None])
    elif roll < 0.6:  # left out
        del record[field]
    elif roll < 0.75:  # non-ASCII text
        record[field] = rng.choice(["é", "\u2028", "fichier-\u00e9.fits", "\U0001f600"])
    payload = json.dumps(record, separators=(",", ":"), ensure_ascii=rng.random() < 0.5).encode()
    if roll >= 0.75:  # numbers and bytes only a hand edit writes: out of range, invalid UTF-8
        odd = rng.choice([b"1e999", b"-1e400", b"1" * 400, b'"\xff"', b'"\\ud800"', b"NaN"])
        payload = payload[:-1] + b',"extra":' + odd + b"}" if rng.random() < 0.5 else payload
        if rng.random() < 0.5:
            payload = payload.replace(b'"time":', b'"time":' + odd + b',"t2":', 1)
    return _framed(payload)


def _refuse(_payload: bytes) -> object:
    raise msgspec.DecodeError("refused: the general path only")


@pytest.fixture
def random_manifest(tmp_path: Path) -> Path:
    rng = random.Random(2026)
    state = tmp_path / ".tessmirror"
    state.mkdir()
    lines = [_random_record(rng, n) for n in range(6_000)]
    lines.insert(100, b"\n")
    (state / "manifest.jsonl").write_bytes(b"".join(lines) + b'{"crc":"0000')  # a torn last line
    return state


def test_the_resume_scan_answers_as_the_general_decoder_does(random_manifest: Path, monkeypatch) -> None:
    fast = Manifest(random_manifest)
    fast_found = fast.verified()
    monkeypatch.setattr(manifest_module, "_decode_record", _refuse)
    general = Manifest(random_manifest)
    assert fast_found == general.verified()
    assert fast.skipped_lines == general.skipped_lines > 1
    assert len(fast_found) > 100


def test_loading_the_manifest_answers_as_the_general_decoder_does(random_manifest: Path, monkeypatch) -> None:
    fast = Manifest(random_manifest)
    fast_entries = fast.load()
    monkeypatch.setattr(manifest_module, "_decode_record", _refuse)
    general = Manifest(random_manifest)
    general_entries = general.load()
    assert fast_entries == general_entries
    assert fast.skipped_lines == general.skipped_lines > 1
    # The same shared status strings: a million entries hold one object each.
    for key, entry in fast_entries.items():
        if entry.status in STATUSES:
            assert entry.status is general_entries[key].status


def test_a_record_the_engine_writes_takes_the_fast_decoder() -> None:
    entry = ManifestEntry(
        url="https://example.org/a.fits",
        path="s0001/a.fits",
        status="verified",
        obs_id="o",
        nbytes=12,
        md5="0" * 32,
        level="fits",
        checksum_declared=True,
        error="",
        attempts=2,
        time=1.5,
        key="o/a.fits",
        size=12,
        declared_md5="1" * 32,
        origin="downloaded",
        source="mast",
        note="n",
    )
    payload = encode_entry(entry)[len(b'{"crc":"00000000","rec":') : -2]
    record = manifest_module._decode_record(payload)
    assert {name: getattr(record, name) for name in record.__struct_fields__} == json.loads(payload)
    assert manifest_module._decode_entry(payload) == entry


@pytest.mark.parametrize(
    "odd",
    [b',"extra":1', b',"nbytes":1.0', b',"attempts":true', b',"md5":null', b',"note":"\xc3\xa9"'],
    ids=["unknown field", "float size", "bool count", "null md5", "non-ASCII"],
)
def test_any_other_shape_is_left_to_the_general_decoder(odd: bytes) -> None:
    payload = b'{"url":"u","key":"k","status":"verified"' + odd + b"}"
    if payload.isascii():
        with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
            manifest_module._decode_record(payload)
    assert manifest_module._decode_entry(payload) == ManifestEntry(
        **{name: value for name, value in json.loads(payload).items() if name != "extra"}
    )
