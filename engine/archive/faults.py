"""Faults the local archive injects on demand, decided deterministically per (seed, file, attempt).

Spec string (the CLI's `--faults`), comma-separated tokens::

    500=0.2,429=0.1:retry_after=2,reset=0.2:files=*_lc.fits,wrong=1:attempts=1,latency=0.05,seed=7

* Rate faults take a probability 0..1: `500`, `502`, `429`, `503` (status codes; 429/503 carry
  `Retry-After`, option `retry_after=<s>`, default 1), `html` (an HTML error page with status 200),
  `reset` (connection reset mid-body), `short` (body closed early, before Content-Length), `stall`
  (sends `after=<bytes>` then goes silent for `for=<s>`, default 3600), `wrong` (right size, flipped
  bytes, so the md5 fails).
* Hostile answers, also rates: `redirect` answers 302 instead of the file, with option `to=`:
  `ftp` (the default: `Location: ftp://127.0.0.1/<name>`, a scheme change), `file`
  (`Location: file:///etc/passwd`) or `http` (back to the same download URL on this server, so a
  client that follows it makes a new attempt; with rate 1 and no `attempts=` that is a redirect loop).
  `overlong` sends the file (or the asked range) plus 64 KiB of extra bytes, chunked, with NO
  Content-Length, so only a client's cap at the declared size stops it. `lie` sends a Content-Length
  equal to the true length but then 1,000 more bytes than that (the header understates the body):
  aiohttp's server clips a body at its Content-Length, so the body's last 4 KiB and the surplus are
  written straight to the socket in one write. The surplus is garbage where the next response's
  status line should be: aiohttp's client refuses the whole answer ("Bad status line") when it
  arrives in the same read as the headers (small files), and otherwise returns exactly
  Content-Length bytes and drops the connection (full-size files).
* `latency=<s>` waits before the first byte; `bandwidth=<bytes/s>` caps each response's rate. Both
  apply to every matching request. `linkcap=<bytes/s>` is one token bucket shared by every file
  response the server sends (clean or faulted), like a WAN link: N connections together cannot
  exceed it (`bandwidth` caps each response separately). It ignores `files=`.
* Options on any file fault: `files=<glob>` limits it to matching file names; `attempts=<n>` limits it
  to a file's first n attempts (0, the default, means every attempt: with rate 1 a permanent failure).
* TAP faults are passed to the TAP service: `tap_error`, `tap_queued`, `tap_html503` (rates) and
  `tap_slow` (seconds per poll).
* Where they strike: without `redirect_to_s3` every fault strikes on the one file server (Download
  API and `/files/` paths). With it, the Download API counts the attempt and answers the status
  faults (500, 502, 429, 503, html, redirect) instead of its 302; the second host counts its own
  GETs per file and applies the body faults, `latency`, `bandwidth` and `linkcap`
  (`decide(..., statuses=False)`).
* `slowdown` (a rate) is S3's ``503 SlowDown`` (an XML error, no Retry-After): it strikes only on the
  S3-shaped host (`decide(..., s3=True)`), where it is answered instead of the object.
* `seed=<int>` seeds the decisions: a fault fires when hash(seed, fault, file name, attempt) < rate,
  so a run is reproducible.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass, field
from typing import Any

STATUS_FAULTS = ("500", "502", "429", "503", "html", "redirect")  # answered instead of the file
BODY_FAULTS = ("reset", "short", "stall", "wrong", "overlong", "lie")  # spoil the body of a 200/206
# S3's own answers, only on the S3-shaped host: `slowdown` is 503 with an XML <Code>SlowDown</Code>.
S3_FAULTS = ("slowdown",)
RATE_FAULTS = STATUS_FAULTS + BODY_FAULTS + S3_FAULTS
TAP_RATE_KEYS = {"tap_error": "job_error_rate", "tap_queued": "queued_rate", "tap_html503": "html_503_rate"}
REDIRECT_TARGETS = ("ftp", "file", "http")
OVERLONG_EXTRA = 65_536  # bytes an `overlong` body carries beyond the file (or range)
LIE_EXTRA = 1_000  # bytes a `lie` body carries beyond its Content-Length
_OPTIONS = {"files", "attempts", "retry_after", "after", "for", "to"}


@dataclass(frozen=True, slots=True)
class FaultRule:
    """One file fault: how often, on which files, on which attempts, with its parameters."""

    kind: str
    rate: float
    files: str = "*"
    attempts: int = 0  # fires only on a file's first `attempts` attempts; 0: on every attempt
    retry_after: float = 1.0  # 429/503
    after: int = 65_536  # stall: bytes sent before going silent
    stall_seconds: float = 3600.0
    to: str = "ftp"  # redirect: where Location points (REDIRECT_TARGETS)

    def applies(self, name: str, attempt: int) -> bool:
        if self.attempts and attempt > self.attempts:
            return False
        return fnmatch.fnmatchcase(name, self.files)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do to one request. `status` set means answer it instead of the file."""

    status: str | None = None  # one of STATUS_FAULTS or S3_FAULTS
    body: str | None = None  # one of BODY_FAULTS
    retry_after: float = 1.0
    redirect_to: str = "ftp"
    stall_after: int = 65_536
    stall_seconds: float = 3600.0
    latency: float = 0.0
    bandwidth: float | None = None

    @property
    def label(self) -> str:
        return ",".join(x for x in (self.status, self.body) if x)


@dataclass(slots=True)
class FaultPlan:
    """The faults to inject. Empty by default; build one with `from_spec` or directly."""

    seed: int = 0
    rules: list[FaultRule] = field(default_factory=list)
    latency: float = 0.0
    latency_files: str = "*"
    bandwidth: float | None = None
    bandwidth_files: str = "*"
    linkcap: float | None = None  # bytes/s shared by every file response
    tap: dict[str, float] = field(default_factory=dict)  # TapFaults field name -> value

    @classmethod
    def from_spec(cls, spec: str) -> FaultPlan:
        """Parse a spec string (see the module docstring). Raises ValueError naming the bad token."""
        plan = cls()
        for token in (t.strip() for t in spec.split(",")):
            if token:
                plan._add_token(token)
        return plan

    def _add_token(self, token: str) -> None:
        head, *option_texts = token.split(":")
        key, sep, value_text = head.partition("=")
        key = key.strip().lower()
        if not sep:
            raise ValueError(f"fault token {token!r} has no value; write kind=value, e.g. 500=0.2")
        options: dict[str, str] = {}
        for option in option_texts:
            name, osep, ovalue = option.partition("=")
            if not osep or name.strip() not in _OPTIONS:
                raise ValueError(
                    f"fault token {token!r}: bad option {option!r}; options are {', '.join(sorted(_OPTIONS))}"
                )
            options[name.strip()] = ovalue.strip()
        value = _number(token, value_text)
        files = options.get("files", "*")
        to = options.get("to", "ftp").lower()
        if "to" in options and key != "redirect":
            raise ValueError(f"fault token {token!r}: option to= applies only to redirect")
        if to not in REDIRECT_TARGETS:
            raise ValueError(
                f"fault token {token!r}: to={to!r} is not a redirect target; "
                f"use one of {', '.join(REDIRECT_TARGETS)}"
            )
        if key == "seed":
            self.seed = int(value)
        elif key in RATE_FAULTS:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"fault token {token!r}: rate must be between 0 and 1")
            self.rules.append(
                FaultRule(
                    kind=key,
                    rate=value,
                    files=files,
                    attempts=int(_number(token, options.get("attempts", "0"))),
                    retry_after=_number(token, options.get("retry_after", "1")),
                    after=int(_number(token, options.get("after", "65536"))),
                    stall_seconds=_number(token, options.get("for", "3600")),
                    to=to,
                )
            )
        elif key == "latency":
            self.latency, self.latency_files = _non_negative(token, value), files
        elif key == "bandwidth":
            if value <= 0:
                raise ValueError(f"fault token {token!r}: bandwidth must be > 0 bytes/s")
            self.bandwidth, self.bandwidth_files = value, files
        elif key == "linkcap":
            if value <= 0:
                raise ValueError(f"fault token {token!r}: linkcap must be > 0 bytes/s")
            self.linkcap = value
        elif key in TAP_RATE_KEYS:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"fault token {token!r}: rate must be between 0 and 1")
            self.tap[TAP_RATE_KEYS[key]] = value
        elif key == "tap_slow":
            self.tap["slow_poll_seconds"] = _non_negative(token, value)
        else:
            others = ["latency", "bandwidth", "linkcap", "seed", *TAP_RATE_KEYS, "tap_slow"]
            known = ", ".join([*RATE_FAULTS, *others])
            raise ValueError(f"unknown fault {key!r} in token {token!r}; known faults: {known}")

    # -- decisions ---------------------------------------------------------------------------------
    def fires(self, rule: FaultRule, name: str, attempt: int) -> bool:
        """Deterministic coin: the same (seed, fault, file, attempt) always gives the same answer."""
        if rule.rate <= 0.0 or not rule.applies(name, attempt):
            return False
        if rule.rate >= 1.0:
            return True
        text = f"{self.seed}\0{rule.kind}\0{name}\0{attempt}".encode()
        draw = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") / 2**64
        return draw < rule.rate

    def decide(self, name: str, attempt: int, *, statuses: bool = True, s3: bool = False) -> Decision:
        """The faults for attempt `attempt` (1-based) at file `name`: first firing status, first body.

        `statuses=False` skips the status faults: the redirect target of MAST's Download API (the
        second host) only spoils bodies, the API itself already answered the status faults. `s3`:
        the S3-shaped host, the only one where `slowdown` strikes (as a status fault).
        """
        status = body = None
        retry_after, stall_after, stall_seconds, redirect_to = 1.0, 65_536, 3600.0, "ftp"
        for rule in self.rules:
            if rule.kind in S3_FAULTS:
                if not s3:
                    continue
            elif not statuses and rule.kind in STATUS_FAULTS:
                continue
            if not self.fires(rule, name, attempt):
                continue
            if rule.kind in (*STATUS_FAULTS, *S3_FAULTS) and status is None:
                status, retry_after, redirect_to = rule.kind, rule.retry_after, rule.to
            elif rule.kind in BODY_FAULTS and body is None:
                body, stall_after, stall_seconds = rule.kind, rule.after, rule.stall_seconds
        return Decision(
            status=status,
            body=None if status else body,
            retry_after=retry_after,
            redirect_to=redirect_to,
            stall_after=stall_after,
            stall_seconds=stall_seconds,
            latency=self.latency if fnmatch.fnmatchcase(name, self.latency_files) else 0.0,
            bandwidth=self.bandwidth if fnmatch.fnmatchcase(name, self.bandwidth_files) else None,
        )

    def tap_faults(self) -> Any:
        """The TAP side's `TapFaults` for this plan (seeded the same)."""
        from engine.archive.tap import TapFaults

        return TapFaults(seed=self.seed, **self.tap)


def _number(token: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"fault token {token!r}: {text!r} is not a number") from None


def _non_negative(token: str, value: float) -> float:
    if value < 0:
        raise ValueError(f"fault token {token!r}: value must be >= 0")
    return value
