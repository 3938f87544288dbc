"""Keep archive tokens out of logs, manifests, saved plans and error messages.

A token is registered once, when it is read from the environment; from then on `redact()` scrubs it
from any text, and `RedactingFilter` scrubs every log record on its way out.
"""

from __future__ import annotations

import logging
import re

_SECRETS: set[str] = set()
# Credentials that can ride in URLs even when we never saw the token itself.
_URL_SECRET = re.compile(r"(?i)((?:token|access_token|api_key|apikey|key|signature)=)[^&\s\"']+")
_USERINFO = re.compile(r"(?i)(https?://)[^/@\s:]+:[^/@\s]+@")
MASK = "***"


def register_secret(secret: str | None) -> None:
    if secret and len(secret) >= 4:
        _SECRETS.add(secret)


def redact(text: object) -> str:
    s = str(text)
    for secret in _SECRETS:
        if secret in s:
            s = s.replace(secret, MASK)
    # Cheap substring tests first: this runs once per planned URL on resume (a million, say).
    lowered = s.lower()
    if "token=" in lowered or "key=" in lowered or "signature=" in lowered:
        s = _URL_SECRET.sub(rf"\g<1>{MASK}", s)
    if "@" in s:
        s = _USERINFO.sub(rf"\g<1>{MASK}@", s)
    return s


def describe_error(err: BaseException, limit: int = 200) -> str:
    """One bounded, redacted line naming an exception: its type and the first line of its message.

    Parsers quote what they choked on and some messages run over many lines; a log line or a manifest
    record gets the first line, at most `limit` characters, never a token.
    """
    text = str(err).splitlines()[0] if str(err) else ""
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return redact(text if len(text) <= limit else text[: limit - 3] + "...")


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True
