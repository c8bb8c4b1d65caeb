"""The WebSocket upgrade on WS_PATH: admission, authentication, and the hand-off to picows.

What it owns: the checks made before a WebSocket exists (MAX_CONNECTIONS -> 503, Origin ->
403, malformed query -> 400), reading the token from the query or the Authorization header,
and building the `Session` with the outcome. A bad token still gets its upgrade: the
session then sends AUTH_* and closes 4001, as docs/protocol.md §1 says.
Rule: after `upgrade` returns None, picows owns the socket: it is fed the rebuilt request
head and whatever bytes followed it, and performs the handshake itself.
"""

from __future__ import annotations

import asyncio
import base64
import traceback
from typing import Any
from urllib.parse import parse_qs

# WSProtocol is internal to picows (pinned): docs/architecture.md, "picows internals we rely on"
from picows import WSAutoPingStrategy, WSUpgradeResponse, WSUpgradeResponseWithListener
from picows.picows import WSProtocol  # type: ignore[attr-defined]

from aether_fast import logs
from aether_fast._core import Connection, EchoSession, Hub, Session, hand_over
from aether_fast.auth import Authenticator, AuthError
from aether_fast.config import Config
from aether_fast.http.front import Request, Response
from aether_fast.protocol import (
    ErrorCode,
    extension_element,
    name_error,
    split_quoted,
    valid_channel,
    window_bits,
)

#: Initial per-connection read buffer; picows grows it on demand for larger frames.
READ_BUFFER_INIT = 1024
#: picows drops, without a response, an upgrade request whose head reaches 16 KiB
#: (`WSProtocol._http_max_size`); ours is measured differently, so the rebuilt head is checked.
PICOWS_MAX_HEAD = 16 * 1024
#: Largest `since` in the upgrade's query: sequences are 64-bit.
MAX_SINCE = 2**63 - 1
#: Offers of an extension header read at most (each element of the header is one).
MAX_EXTENSION_OFFERS = 16
#: Characters of the extension headers read at most (all of them, joined by commas): a
#: browser's offer takes under 100; past this an offer is not read (parsing is a Python
#: loop per character: a 16 KiB header would cost milliseconds per upgrade).
MAX_EXTENSION_CHARS = 2048


def negotiate_deflate(values: list[str]) -> tuple[int, str] | None:
    """permessage-deflate (RFC 7692) from the `Sec-WebSocket-Extensions` header values of
    an upgrade request: (server window bits, the response header's value) for the first offer
    we can accept, or None (no offer, or every offer declined: the connection is plain).

    Accepted: any valid offer. The response always says `server_no_context_takeover` and
    `client_no_context_takeover` (RFC 7692 section 7.1.1: the server may add the latter unasked),
    so no connection keeps zlib state between messages; `server_max_window_bits=N` when
    offered (we compress with 2**N; N = 8 gets plain frames, zlib has no 256-byte raw
    window); `client_max_window_bits` is never answered (our inflater takes any window).
    Declined (RFC 7692 section 7: the cases a server MUST decline): an unknown parameter, a
    duplicate one, a value that is not 8..15, a value on a parameter that takes none,
    `server_max_window_bits` without one."""
    for offer in _extension_offers(values):
        if offer[0] != "permessage-deflate":
            continue
        bits = _deflate_offer(offer[1:])
        if bits is None:
            continue
        response = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        if bits > 0:
            response += f"; server_max_window_bits={bits}"
        return (bits or 15, response)
    return None


def _deflate_offer(params: list[tuple[str, str | None]]) -> int | None:
    """The server window bits an offer asks for (0: any), or None to decline it."""
    seen: set[str] = set()
    bits = 0
    for name, value in params:
        if name in seen:
            return None
        seen.add(name)
        if name in ("server_no_context_takeover", "client_no_context_takeover"):
            if value is not None:
                return None
        elif name in ("server_max_window_bits", "client_max_window_bits"):
            if value is None:
                if name == "server_max_window_bits":
                    return None  # it needs a value; client_max_window_bits may go without
                continue
            given = window_bits(value)
            if given is None:
                return None
            if name == "server_max_window_bits":
                bits = given
        else:
            return None
    return bits


def _extension_offers(values: list[str]) -> list[list[Any]]:
    """Each element of the extension headers: [name, (param, value or None), ...], names
    lowered, quoted values unquoted (RFC 6455 §9.1). An element that does not parse is left
    out; so is everything past MAX_EXTENSION_OFFERS elements, and an element that does not
    end within MAX_EXTENSION_CHARS (the headers are one list: RFC 7230 section 3.2.2)."""
    offers: list[list[Any]] = []
    text = ", ".join(values)
    elements = split_quoted(text[:MAX_EXTENSION_CHARS], ",")
    if len(text) > MAX_EXTENSION_CHARS:
        elements.pop()  # cut short: not read
    for element in elements:
        name, params = extension_element(element)
        if not name:
            continue
        offers.append([name, *params])
        if len(offers) >= MAX_EXTENSION_OFFERS:
            return offers
    return offers


class _PicowsLog:
    """A logger-like object for picows: its per-connection info lines are dropped (they would
    cost a Logger per connection); its warnings and errors, nearly all a client's protocol
    violations (one a bad connection), are security events: they go through the throttle
    (`logs.security`, kind "picows"), so a flood of bad connections writes a line a second.
    `exception` (our own code failed) is an error line, never throttled."""

    name = "picows"

    def isEnabledFor(self, level: int) -> bool:
        return level >= 30

    def log(self, level: int, msg: str, *args: object) -> None:
        if level >= 30:
            logs.security("picows", kind="picows", message=msg % args if args else msg)

    def debug(self, msg: str, *args: object) -> None:
        return None

    def info(self, msg: str, *args: object) -> None:
        return None

    def warning(self, msg: str, *args: object) -> None:
        self.log(30, msg, *args)

    def error(self, msg: str, *args: object) -> None:
        # picows reports a client's protocol violations at error level: they are the
        # client's fault, so they are warnings here
        self.log(30, msg, *args)

    def exception(self, msg: str, *args: object) -> None:
        logs.log(
            "error",
            "picows_callback_failed",
            "websocket",
            message=msg % args if args else msg,
            exception=traceback.format_exc(),
        )


class WebSocketUpgrader:
    def __init__(self, config: Config, hub: Hub, node: Any, auth: Authenticator) -> None:
        self._config = config
        self._hub = hub
        self._node = node
        self._auth = auth
        self._log = _PicowsLog()
        self._max_frame = max(config.max_message_bytes * 4, 1 << 20)

    def wants(self, request: Request) -> bool:
        return request.path in (self._config.ws_path, self._config.echo_path)

    def upgrade(
        self, request: Request, transport: asyncio.Transport, rest: bytes
    ) -> Response | None:
        refused = self._admit(request)
        if refused is not None:
            return refused
        head = _rebuild_head(request)
        if len(head) >= PICOWS_MAX_HEAD:
            return Response.error(
                431,
                ErrorCode.INVALID_MESSAGE,
                "request head too large",
                f"upgrade request over {PICOWS_MAX_HEAD - 1} bytes",
            )
        deflate = self._deflate(request)
        if request.path == self._config.echo_path:
            echo = EchoSession(self._hub, request.peer, self._config.max_message_bytes)
            self._hand_off(echo, head, transport, rest, deflate)
            return None
        query = parse_qs(request.query, keep_blank_values=True)

        def one(name: str) -> str | None:
            values = query.get(name)
            return values[-1] if values else None

        client_id = one("client_id")
        if client_id is not None and not valid_channel(client_id):
            return _bad("client_id", name_error("client_id"))
        channel = one("channel")
        if channel is not None and not valid_channel(channel):
            return _bad("channel", name_error("channel"))
        since_text = one("since")
        since: int | None = None
        if since_text is not None:
            # ASCII digits only: str.isdigit() is also true of "²", which int() refuses
            if not (since_text.isascii() and since_text.isdigit()) or len(since_text) > 19:
                return _bad("since", "since must be a non-negative integer below 2**63")
            since = int(since_text)
            if since > MAX_SINCE:
                return _bad("since", "since must be a non-negative integer below 2**63")
        epoch = one("epoch")

        token = one("token")
        if not token:
            auth_header = request.header("authorization") or ""
            if auth_header[:7].lower() == "bearer ":
                token = auth_header[7:].strip()
        claims = None
        auth_error: tuple[str, str] | None = None
        if token:
            try:
                claims = self._auth.verify(token)
            except AuthError as err:
                auth_error = (err.code, err.reason)

        session = Session(self._hub, client_id or self._node.new_client_id(), claims, request.peer)
        session.auth_error = auth_error
        session.echo = one("echo") in ("1", "true")
        if channel is not None:
            session.initial = {"channel": channel, "since": since, "epoch": epoch}

        self._hand_off(session, head, transport, rest, deflate)
        return None

    def _deflate(self, request: Request) -> tuple[int, str] | None:
        """permessage-deflate for this upgrade (`negotiate_deflate`), unless COMPRESSION is
        off (then the header is ignored: the connection is plain)."""
        if not self._config.compression:
            return None
        values = [
            v.decode("latin-1")
            for k, v in request.raw_headers
            if k.lower() == b"sec-websocket-extensions"
        ]
        return negotiate_deflate(values) if values else None

    def _hand_off(
        self,
        listener: Connection,
        head: bytes,
        transport: asyncio.Transport,
        rest: bytes,
        deflate: tuple[int, str] | None = None,
    ) -> None:
        """Give the socket to picows with `listener` as its WSListener; with `deflate`,
        its 101 response carries the `Sec-WebSocket-Extensions` answer."""
        factory: Any = lambda _request: listener  # noqa: E731
        if deflate is not None:
            listener.deflate = deflate[0]
            response = WSUpgradeResponse.create_101_response(
                extra_headers=(("Sec-WebSocket-Extensions", deflate[1]),)
            )
            accepted = WSUpgradeResponseWithListener(response, listener)
            factory = lambda _request: accepted  # noqa: E731
        # by keyword: WSProtocol's constructor is internal to picows (docs/architecture.md,
        # "picows internals we rely on")
        protocol = WSProtocol(
            host_port=None,
            ws_path=None,
            is_client_side=False,
            ws_listener_factory=factory,
            logger=self._log,
            disconnect_on_exception=True,
            websocket_handshake_timeout=self._config.handshake_timeout_s,
            enable_auto_ping=False,  # Hub.tick pings every PING_INTERVAL_S itself
            auto_ping_idle_timeout=20,
            auto_ping_reply_timeout=20,
            auto_ping_strategy=WSAutoPingStrategy.PING_WHEN_IDLE,
            enable_auto_pong=False,  # Connection.on_ws_frame answers, in outbox order
            max_frame_size=self._max_frame,
            extra_headers=None,
            read_buffer_init_size=READ_BUFFER_INIT,
        )
        transport.set_protocol(protocol)
        hand_over(protocol, transport, listener, head, rest)

    def _admit(self, request: Request) -> Response | None:
        version = request.header("sec-websocket-version")
        if version != "13":
            return Response.error(
                426 if version else 400,
                ErrorCode.INVALID_MESSAGE,
                "unsupported WebSocket version",
                "Sec-WebSocket-Version must be 13",
                (("Sec-WebSocket-Version", "13"),),
            )
        if not _valid_key(request.header("sec-websocket-key")):
            return _bad("sec-websocket-key", "Sec-WebSocket-Key must be 16 bytes in base64")
        if self._node.shutting_down:
            return Response.error(503, ErrorCode.SERVER_BUSY, "server shutting down", "shutdown")
        if self._hub.active_connections >= self._config.max_connections:
            return _refuse(
                request,
                "max_connections",
                503,
                ErrorCode.SERVER_BUSY,
                "server is at MAX_CONNECTIONS",
                (("Retry-After", "1"),),
                limit=self._config.max_connections,
            )
        origins = self._config.allowed_origins
        origin = request.header("origin")
        if origins and origin is not None and origin.lower() not in origins:
            return _refuse(
                request, "origin", 403, ErrorCode.FORBIDDEN, "origin not allowed", origin=origin
            )
        return None


def _refuse(
    request: Request,
    reason: str,
    status: int,
    code: str,
    message: str,
    headers: tuple[tuple[str, str], ...] = (),
    **details: object,
) -> Response:
    """The upgrade refused for `reason`: a security event (`connection_refused`, of kind
    `connection_refused:<reason>`, through the throttle), and the answer, which names
    `reason` and `details` too."""
    logs.security(
        "connection_refused",
        kind=f"connection_refused:{reason}",
        peer=request.peer,
        reason=reason,
        **details,
    )
    return Response.error(status, code, message, reason, headers, **details)


def _valid_key(key: str | None) -> bool:
    if key is None or len(key) != 24:
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        return False


def _bad(field: str, reason: str) -> Response:
    return Response.error(
        400, ErrorCode.INVALID_MESSAGE, "bad WebSocket request", reason, field=field
    )


def _rebuild_head(request: Request) -> bytes:
    """The request head for picows, from the parsed pieces. `Connection` is normalised to
    `Upgrade` (Firefox sends `keep-alive, Upgrade`, which picows would refuse)."""
    target = request.path + ("?" + request.query if request.query else "")
    lines = [f"GET {target} HTTP/1.1".encode("latin-1")]
    for name, value in request.raw_headers:
        lowered = value.lower()
        if (
            name.lower() == b"connection"
            and lowered != b"upgrade"
            and b"upgrade" in [t.strip() for t in lowered.split(b",")]
        ):
            value = b"Upgrade"
        lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n"
