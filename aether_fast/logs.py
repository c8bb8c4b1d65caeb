"""JSON logs: one object a line on stdout, in the shape of docs/operations.md §7, with
secrets redacted.

Shape: {"timestamp": "2024-01-02T03:04:05.678Z", "level": "debug|info|warn|error",
"event": str, "data": {"component": str, "details": {...}}}.

Rule: a token is never logged. Every line passes through `redact` in the formatter, so no
caller can forget it: keys that name a credential become "***", JWT-shaped strings become
"***", and `token=...` in URLs or query strings becomes `token=***`. `log()` costs one level
check when its level is disabled.

Security events (failed logins, refused upgrades, rate limits ...) go through `security()`,
whose `Throttle` writes at most one line a second per kind and sums up the rest in one
summary line a second, so a flood of bad requests cannot become a flood of log lines.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import traceback
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime
from typing import Final, TextIO

import orjson

LOGGER_NAME: Final = "aether_fast"
#: Library loggers routed through the same JSON formatter, at warn and above.
LIBRARY_LOGGERS: Final = ("picows", "asyncio")

_LEVELS: Final[dict[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

MASK: Final = "***"
_SECRET_KEYS: Final = frozenset(
    {"token", "jwt", "authorization", "password", "secret", "admin_token"}
)
# access_token, refresh_token, jwt_secret, client_secret, db_password ... as well.
_SECRET_SUFFIXES: Final = ("_token", "_secret", "_password", "_jwt")
_JWT_RE: Final = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# token=, access_token=, csrf_token=, jwt=, password=, client_secret= ...
_QUERY_RE: Final = re.compile(r"(?i)\b(\w*(?:token|jwt|password|secret))=[^&\s#;,\"']*")
_BEARER_RE: Final = re.compile(r"(?i)\b(bearer)\s+[^\s,;\"']+")

_logger: Final = logging.getLogger(LOGGER_NAME)


def _secret_key(key: str) -> bool:
    low = key.lower()
    return low in _SECRET_KEYS or low.endswith(_SECRET_SUFFIXES)


def redact_text(text: str) -> str:
    """Mask JWT-shaped substrings, `token=...` parameters and `Bearer ...` credentials."""
    if "eyJ" in text:
        text = _JWT_RE.sub(MASK, text)
    if "=" in text:
        text = _QUERY_RE.sub(lambda m: f"{m.group(1)}={MASK}", text)
    if "earer" in text or "EARER" in text:
        text = _BEARER_RE.sub(lambda m: f"{m.group(1)} {MASK}", text)
    return text


def redact(value: object) -> object:
    """A copy of `value` (dicts, lists and tuples walked) with every credential masked."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {
            k: (MASK if v is not None else None)
            if isinstance(k, str) and _secret_key(k)
            else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple, set, frozenset)):
        return [redact(v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return redact_text(bytes(value).decode("utf-8", "replace"))
    return value


def _timestamp(created: float) -> str:
    moment = datetime.fromtimestamp(created, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _fallback(value: object) -> str:
    return str(value)


class JsonFormatter(logging.Formatter):
    """Formats our records (made by `log`) and library records in that shape."""

    def format(self, record: logging.LogRecord) -> str:
        component = getattr(record, "aether_component", None)
        details: dict[str, object]
        if component is not None:
            event = record.getMessage()
            details = dict(getattr(record, "aether_details", None) or {})
        elif record.name == LOGGER_NAME or record.name.startswith(LOGGER_NAME + "."):
            # A plain logging call on one of our loggers: the message is the event.
            component, event, details = record.name, record.getMessage(), {}
        else:
            component, event = record.name, "library_log"
            details = {"message": record.getMessage()}
        if record.exc_info:
            details["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            details["exception"] = record.exc_text
        line = {
            "timestamp": _timestamp(record.created),
            "level": _level_name(record.levelno),
            "event": redact_text(event),
            "data": {"component": component, "details": redact(details)},
        }
        return orjson.dumps(line, default=_fallback, option=orjson.OPT_NON_STR_KEYS).decode()


def _level_name(levelno: int) -> str:
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warn"
    if levelno >= logging.INFO:
        return "info"
    return "debug"


def _level(level: str) -> int:
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}: use debug|info|warn|error") from None


def setup_logging(level: str, stream: TextIO | None = None) -> None:
    """Send the "aether_fast" logger (at `level`) and library loggers (at warn) to `stream`.

    `stream` defaults to sys.stdout. Calling it again replaces the previous setup.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(JsonFormatter())
    targets = [(LOGGER_NAME, _level(level))]
    targets += [(name, logging.WARNING) for name in LIBRARY_LOGGERS]
    for name, threshold in targets:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h.formatter, JsonFormatter)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(threshold)
        # propagate is left alone: the root logger has no handler in production (so no second
        # copy), and test runners that capture through the root still see every record.


def log(level: str, event: str, component: str, **details: object) -> None:
    """Write one JSON line: `event` in `component`, with `details` (redacted)."""
    levelno = _LEVELS.get(level)
    if levelno is None:
        levelno = _level(level)
    if not _logger.isEnabledFor(levelno):
        return
    _logger.log(
        levelno,
        event,
        extra={"aether_component": component, "aether_details": details},
    )


#: Longest string a throttled line keeps of one detail (an Origin header can be 16 KiB).
DETAIL_CHARS: Final = 200


def _short(value: object) -> object:
    if isinstance(value, str) and len(value) > DETAIL_CHARS:
        return value[:DETAIL_CHARS] + "..."
    return value


@dataclass(eq=False, slots=True)
class Throttle:
    """At most one line per `every_s` per kind; the lines held back are counted by kind and
    written as one summary line (`summary_event`) per `every_s`, with a sample of peers.

    Bounded whatever the callers pass: at most `max_kinds` kinds are told apart (the rest are
    counted as "other"), at most `max_peers` peers are sampled, and each string detail is cut
    to DETAIL_CHARS. `flush` writes a pending summary; the Node's timer calls it each second,
    so the counts of a flood that stopped are not held back.
    """

    component: str
    summary_event: str
    _: KW_ONLY
    every_s: float = 1.0
    max_kinds: int = 32
    max_peers: int = 10
    _last: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _held: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _peers: set[str] = field(default_factory=set, init=False, repr=False)
    #: when the oldest line held back was: its summary is due `every_s` later
    _held_since: float = field(default=0.0, init=False, repr=False)

    def log(self, level: str, event: str, *, kind: str | None = None, **details: object) -> bool:
        """Write `event` unless a line of its kind (default: the event) was written less than
        `every_s` ago; then count it. True when the line was written."""
        return self.log_at(time.monotonic(), level, event, kind, details)

    def log_at(
        self, now: float, level: str, event: str, kind: str | None, details: dict[str, object]
    ) -> bool:
        """`log` at monotonic time `now`."""
        kind = kind or event
        if kind not in self._last and len(self._last) >= self.max_kinds:
            kind = "other"
        last = self._last.get(kind)
        if last is not None and now - last < self.every_s:
            if not self._held:
                self._held_since = now
            self._held[kind] = self._held.get(kind, 0) + 1
            peer = details.get("peer")
            if isinstance(peer, str) and len(self._peers) < self.max_peers:
                self._peers.add(peer[:DETAIL_CHARS])
            self.flush(now)
            return False
        self._last[kind] = now
        self.flush(now)
        log(level, event, self.component, **{k: _short(v) for k, v in details.items()})
        return True

    def flush(self, now: float | None = None, *, force: bool = False) -> None:
        """Write the summary of the lines held back, once the oldest of them is `every_s`
        old (at once with `force`, at shutdown)."""
        if not self._held:
            return
        now = time.monotonic() if now is None else now
        if now - self._held_since < self.every_s and not force:
            return
        held, peers = self._held, sorted(self._peers)
        self._held, self._peers = {}, set()
        log(
            "warn",
            self.summary_event,
            self.component,
            suppressed=held,
            total=sum(held.values()),
            peers=peers,
        )


#: The one throttle of security events in this process.
SECURITY: Final = Throttle("security", "security_events_suppressed")


def security(event: str, *, kind: str | None = None, **details: object) -> None:
    """Log a security event at warn, through the throttle (see `Throttle`)."""
    SECURITY.log("warn", event, kind=kind, **details)
