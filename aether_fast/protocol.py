"""The wire protocol's vocabulary: message kinds, error codes, close codes, limits (no I/O).

Rule: every code a client can see is defined here, once, with its meaning. The compiled hot
path (`aether_fast._core`) and the Python control path both import these tables; neither
invents a code of its own. Validation of the rarely used control messages lives here too; the
per-message `message/send` validation is compiled (ext/session.pxi) and checked against the
same rules by the tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

# -- message kinds -------------------------------------------------------------------------

#: (type, action) pairs a client may send.
CLIENT_MESSAGES: Final[frozenset[tuple[str, str]]] = frozenset(
    {
        ("connection", "connect"),
        ("connection", "disconnect"),
        ("connection", "refresh"),
        ("message", "send"),
        ("message", "retry"),
        ("system", "status"),
        ("system", "broadcast"),
    }
)

SEVERITIES: Final[frozenset[str]] = frozenset({"info", "warning", "error"})

#: The rule for a channel name (and a client_id): the regex and its words, for every place
#: that checks one. The compiled check (ext/session.pxi `valid_channel_name`) is the same
#: rule in C; tests/unit/test_protocol.py holds it to this regex.
CHANNEL_NAME_RE: Final[re.Pattern[str]] = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
NAME_RULE: Final = "1-128 characters of A-Z a-z 0-9 _ . : -"


def name_error(field: str) -> str:
    """The reason given for a `field` (channel, client_id, name) that breaks the name rule."""
    return f"{field} must be {NAME_RULE}"


# -- error codes ---------------------------------------------------------------------------


class ErrorCode:
    """Error codes sent as `{"type":"error","code":...}`; the meaning is the docstring."""

    INVALID_JSON: Final = "INVALID_JSON"  # the frame is not JSON
    INVALID_MESSAGE: Final = "INVALID_MESSAGE"  # JSON, but not a valid message
    MESSAGE_TOO_LARGE: Final = "MESSAGE_TOO_LARGE"  # over MAX_MESSAGE_BYTES
    AUTH_REQUIRED: Final = "AUTH_REQUIRED"  # no token where one is needed
    AUTH_INVALID: Final = "AUTH_INVALID"  # token bad: signature, claims, algorithm
    TOKEN_EXPIRED: Final = "TOKEN_EXPIRED"  # token past its exp
    FORBIDDEN: Final = "FORBIDDEN"  # token valid, but not allowed this
    CHANNEL_NOT_FOUND: Final = "CHANNEL_NOT_FOUND"  # not configured, no auto-create
    CHANNEL_FULL: Final = "CHANNEL_FULL"  # max_connections reached
    CHANNEL_LIMIT: Final = "CHANNEL_LIMIT"  # too many channels: this connection's or worker's
    NOT_A_MEMBER: Final = "NOT_A_MEMBER"  # publish/leave without joining
    RATE_LIMITED: Final = "RATE_LIMITED"  # a token bucket is empty
    CONNECTION_LIMIT: Final = "CONNECTION_LIMIT"  # too many connections for the user/IP
    SERVER_BUSY: Final = "SERVER_BUSY"  # global message limit or no capacity
    INTERNAL_ERROR: Final = "INTERNAL_ERROR"  # a bug or a failed dependency


ERROR_CODES: Final[frozenset[str]] = frozenset(
    v for k, v in vars(ErrorCode).items() if not k.startswith("_")
)

#: HTTP status for each error code on the REST routes.
HTTP_STATUS: Final[dict[str, int]] = {
    ErrorCode.INVALID_JSON: 400,
    ErrorCode.INVALID_MESSAGE: 400,
    ErrorCode.MESSAGE_TOO_LARGE: 413,
    ErrorCode.AUTH_REQUIRED: 401,
    ErrorCode.AUTH_INVALID: 401,
    ErrorCode.TOKEN_EXPIRED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.CHANNEL_NOT_FOUND: 404,
    ErrorCode.CHANNEL_FULL: 409,
    ErrorCode.CHANNEL_LIMIT: 429,
    ErrorCode.NOT_A_MEMBER: 409,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.CONNECTION_LIMIT: 429,
    ErrorCode.SERVER_BUSY: 503,
    ErrorCode.INTERNAL_ERROR: 500,
}

# -- close codes ---------------------------------------------------------------------------


class CloseCode:
    """WebSocket close codes. 1000-2999: RFC 6455. 4000-4999: aether-fast's own."""

    NORMAL: Final = 1000  # the client or the server is done
    GOING_AWAY: Final = 1001  # the server is shutting down
    PROTOCOL_ERROR: Final = 1002  # RFC 6455 framing violation
    INVALID_DATA: Final = 1007  # text frame that is not UTF-8
    POLICY: Final = 1008  # Origin refused
    TOO_BIG: Final = 1009  # frame or message over the hard limit
    INTERNAL: Final = 1011  # unexpected server error
    AUTH: Final = 4001  # auth failed or token expired: do not reconnect with this token
    FORBIDDEN: Final = 4003  # not allowed
    SLOW_READER: Final = 4008  # send buffer over SEND_BUFFER_LIMIT_BYTES
    REPLACED: Final = 4009  # a newer connection with the same user and client_id
    CONNECTION_LIMIT: Final = 4029  # too many connections for this user/IP


# -- validation of control messages ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Invalid(Exception):
    """A message that fails validation: the error code, the field and why."""

    code: str
    field: str
    reason: str


def valid_channel(name: object) -> bool:
    return isinstance(name, str) and CHANNEL_NAME_RE.fullmatch(name) is not None


def require_channel(data: dict[str, Any]) -> str:
    channel = data.get("channel")
    if not valid_channel(channel):
        raise Invalid(ErrorCode.INVALID_MESSAGE, "channel", name_error("channel"))
    assert isinstance(channel, str)
    return channel


def optional_offset(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise Invalid(ErrorCode.INVALID_MESSAGE, key, f"{key} must be a non-negative integer")
    return value


def optional_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise Invalid(ErrorCode.INVALID_MESSAGE, key, f"{key} must be a string")
    return value


def require_str(data: dict[str, Any], key: str, max_len: int = 65536) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise Invalid(ErrorCode.INVALID_MESSAGE, key, f"{key} must be a non-empty string")
    return value


def require_severity(data: dict[str, Any]) -> str:
    severity = data.get("severity", "info")
    if severity not in SEVERITIES:
        raise Invalid(
            ErrorCode.INVALID_MESSAGE, "severity", "severity must be info, warning or error"
        )
    assert isinstance(severity, str)
    return severity


# -- server messages -----------------------------------------------------------------------
# One builder for each message the control plane sends, in docs/protocol.md's key order
# (tests/unit/test_protocol.py compares orjson.dumps of each with the documented lines). The
# per-message frames (publication, ack) are compiled: ext/codec.pxi.


def connected(
    client_id: str,
    user_id: str | None,
    channel: str | None,
    offset: int | None,
    epoch: str | None,
    recovered: bool | None = None,
) -> dict[str, Any]:
    """`connection/connect` to the connection itself: its first frame (no channel) or its
    join reply; `recovered` only when it asked for recovery (`since`)."""
    data: dict[str, Any] = {
        "client_id": client_id,
        "user_id": user_id,
        "channel": channel,
        "offset": offset,
        "epoch": epoch,
    }
    if recovered is not None:
        data["recovered"] = recovered
    return {"type": "connection", "action": "connect", "data": data}


def presence(action: str, client_id: str, user_id: str | None, channel: str) -> dict[str, Any]:
    """`connection/connect` or `connection/disconnect` to the other members of `channel`."""
    return {
        "type": "connection",
        "action": action,
        "data": {"client_id": client_id, "user_id": user_id, "channel": channel},
    }


def disconnected(
    client_id: str, user_id: str | None, channel: str, reason: str | None = None
) -> dict[str, Any]:
    """`connection/disconnect` to the connection itself: the reply to its leave, or with
    `reason` the server's removal of it (docs/protocol.md §5)."""
    msg = presence("disconnect", client_id, user_id, channel)
    if reason is not None:
        msg["data"]["reason"] = reason
    return msg


def refreshed(expires_at: float) -> dict[str, Any]:
    """`connection/refresh`: the new token was accepted."""
    return {"type": "connection", "action": "refresh", "data": {"expires_at": expires_at}}


def status(message: str, severity: str, **extra: object) -> dict[str, Any]:
    """`system/status`: the reply to a status request (`extra`: the counts) or a notice
    (replaced, removed, token expiring with `expires_at`, shutting down)."""
    return {
        "type": "system",
        "action": "status",
        "data": {"message": message, "severity": severity, **extra},
    }


def broadcast(message: str, severity: str, channel: str | None) -> dict[str, Any]:
    """`system/broadcast`: an admin's notice to everyone (`channel` None) or one channel."""
    return {
        "type": "system",
        "action": "broadcast",
        "data": {"message": message, "severity": severity, "channel": channel},
    }


def error_body(
    code: str, message: str, component: str, reason: str, **details: object
) -> dict[str, object]:
    """The error shape of docs/protocol.md §11, used on the WebSocket and by every REST error."""
    return {
        "type": "error",
        "code": code,
        "message": message,
        "details": {"component": component, "reason": reason, **details},
    }


def split_quoted(text: str, sep: str) -> list[str]:
    """`text` split at `sep` outside double quotes: the elements and parameters of a
    `Sec-WebSocket-Extensions` header (RFC 6455 §9.1), read by the server's negotiation
    (`http/upgrade.py`) and the Python client's check of the answer (`client.py`)."""
    parts: list[str] = []
    quoted = False
    start = 0
    for i, c in enumerate(text):
        if c == '"':
            quoted = not quoted
        elif c == sep and not quoted:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def extension_element(element: str) -> tuple[str, list[tuple[str, str | None]]]:
    """One element of a `Sec-WebSocket-Extensions` list: its name and its parameters as
    (name, value or None), names lowered, quoted values unquoted (RFC 6455 §9.1)."""
    parts = split_quoted(element, ";")
    params: list[tuple[str, str | None]] = []
    for part in parts[1:]:
        key, eq, raw = part.partition("=")
        value = raw.strip() if eq else None
        if value is not None and len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        params.append((key.strip().lower(), value))
    return parts[0].strip().lower(), params


def window_bits(value: str) -> int | None:
    """A permessage-deflate `*_max_window_bits` value: 8..15 written as a decimal integer
    without leading zeroes (RFC 7692 §7.1.2.1), else None."""
    if not (value.isascii() and value.isdigit()) or len(value) > 2 or value[0] == "0":
        return None
    bits = int(value)
    return bits if 8 <= bits <= 15 else None
