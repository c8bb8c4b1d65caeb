"""The HTTP/1.1 front: one asyncio protocol per accepted socket, parsed by httptools.

What it owns: request parsing, keep-alive, limits on heads and bodies, the idle and
handshake timeouts, and the hand-off of a WebSocket upgrade to picows.
Rule: the front never interprets a route; it passes each complete `Request` to the router
(`routes.Router`) or, for an upgrade on WS_PATH, to the `Upgrader` and then steps aside:
after `transport.set_protocol(...)` this object no longer sees a byte.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Protocol, cast

import httptools
import orjson

from aether_fast import logs
from aether_fast.protocol import ErrorCode, error_body

#: Largest request head (request line + headers) accepted.
MAX_HEAD_BYTES = 16 * 1024
#: Keep-alive connections idle this long are closed.
KEEPALIVE_IDLE_S = 30.0
#: After a final answer, how long unread request bytes are drained before the close.
LINGER_S = 2.0


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    peer: str
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, obj: object, headers: tuple[tuple[str, str], ...] = ()) -> Response:
        return cls(status, orjson.dumps(obj), "application/json", headers)

    @classmethod
    def error(
        cls,
        status: int,
        code: str,
        message: str,
        reason: str,
        headers: tuple[tuple[str, str], ...] = (),
        **details: object,
    ) -> Response:
        return cls.json(status, error_body(code, message, "http", reason, **details), headers)

    def encode(self, keep_alive: bool, head: bool = False) -> bytes:
        """The response bytes; `head`: the answer to a HEAD request (headers only)."""
        phrase = HTTPStatus(self.status).phrase
        lines = [
            f"HTTP/1.1 {self.status} {phrase}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Connection: keep-alive" if keep_alive else "Connection: close",
        ]
        if not any(k.lower() == "cache-control" for k, _ in self.headers):
            lines.append("Cache-Control: no-store")  # API answers; static files set their own
        lines.extend(f"{k}: {v}" for k, v in self.headers)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else self.body)


class Router(Protocol):
    def handle(self, request: Request) -> Response | Awaitable[Response]: ...


class Upgrader(Protocol):
    def wants(self, request: Request) -> bool: ...

    def upgrade(
        self, request: Request, transport: asyncio.Transport, rest: bytes
    ) -> Response | None:
        """Hand the socket to picows (return None), or refuse with a response."""
        ...


#: What an upgraded connection's front keeps instead of its own deque (~600 bytes each).
_NO_SLOTS: deque[_Slot] = deque(maxlen=0)


class HttpFront(asyncio.Protocol):
    """One client socket until it upgrades or closes."""

    __slots__ = (
        "_body",
        "_body_size",
        "_done",
        "_head_size",
        "_headers",
        "_idle",
        "_loop",
        "_max_body",
        "_parser",
        "_peer",
        "_request_timeout",
        "_router",
        "_slots",
        "_transport",
        "_upgrader",
        "_url",
    )

    def __init__(
        self,
        router: Router,
        upgrader: Upgrader | None,
        max_body: int,
        first_request_timeout: float,
    ) -> None:
        self._router = router
        self._upgrader = upgrader
        self._max_body = max_body
        self._request_timeout = first_request_timeout
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._idle: asyncio.TimerHandle | None = self._loop.call_later(
            first_request_timeout, self._on_idle
        )
        self._peer = ""
        self._done = False
        self._slots: deque[_Slot] = deque()
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._head_size = 0
        self._body_size = 0

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if peer else ""

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        self._cancel_idle()

    def eof_received(self) -> bool | None:
        if self._done and self._transport is not None:
            self._transport.close()  # the client finished while we lingered
        return None

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._on_upgrade(data[upgrade.args[0] :])
        except httptools.HttpParserError as exc:
            # a callback's refusal arrives wrapped in HttpParserCallbackError
            cause = exc.__context__
            if isinstance(cause, _Refused):
                self._send(cause.response, keep_alive=False)
                return
            self._send(
                Response.error(400, ErrorCode.INVALID_MESSAGE, "bad HTTP request", str(exc)),
                keep_alive=False,
            )

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()
        # a request must arrive whole within the timeout of its first byte (no slowloris)
        self._cancel_idle()
        self._idle = self._loop.call_later(self._request_timeout, self._on_idle)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._grow_head(len(name) + len(value) + 4)

    def on_headers_complete(self) -> None:
        length = self._header_value(b"content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body:
            raise _Refused(self._too_large())

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._max_body:
            raise _Refused(self._too_large())
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._parser.should_upgrade():
            return  # handled by HttpParserUpgrade in data_received
        self._cancel_idle()
        request = self._request()
        # answers leave in request order, whichever route finishes first (pipelining)
        slot = _Slot(self._parser.should_keep_alive(), request.method == "HEAD")
        self._slots.append(slot)
        try:
            response = self._router.handle(request)
        except Exception as exc:  # a route bug must not take the connection's peers down
            response = _internal_error(exc)
        if isinstance(response, Response):
            slot.response = response
            self._drain()
            return
        task = self._loop.create_task(self._answer_later(slot, response))
        _PENDING.add(task)
        task.add_done_callback(_PENDING.discard)

    async def _answer_later(self, slot: _Slot, pending: Awaitable[Response]) -> None:
        try:
            slot.response = await pending
        except Exception as exc:
            slot.response = _internal_error(exc)
        self._drain()

    def _drain(self) -> None:
        while self._slots and self._slots[0].response is not None:
            slot = self._slots.popleft()
            assert slot.response is not None
            self._send(slot.response, slot.keep_alive, slot.head)
            if not slot.keep_alive:
                self._slots.clear()

    # -- helpers ---------------------------------------------------------------------------

    def _grow_head(self, n: int) -> None:
        self._head_size += n
        if self._head_size > MAX_HEAD_BYTES:
            raise _Refused(
                Response.error(
                    431,
                    ErrorCode.INVALID_MESSAGE,
                    "request head too large",
                    f"request line and headers over {MAX_HEAD_BYTES} bytes",
                )
            )

    def _too_large(self) -> Response:
        return Response.error(
            413,
            ErrorCode.MESSAGE_TOO_LARGE,
            "request body too large",
            f"body over {self._max_body} bytes",
            limit=self._max_body,
        )

    def _header_value(self, name: bytes) -> str | None:
        for k, v in self._headers:
            if k.lower() == name:
                return v.decode("latin-1")
        return None

    def _request(self) -> Request:
        url = httptools.parse_url(self._url) if self._url else None
        path = url.path.decode("latin-1") if url is not None and url.path else "/"
        query = url.query.decode("latin-1") if url is not None and url.query else ""
        headers: dict[str, str] = {}
        for k, v in self._headers:
            name = k.decode("latin-1").lower()
            value = v.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        method = self._parser.get_method().decode("latin-1")
        return Request(
            method, path, query, headers, b"".join(self._body), self._peer, self._headers
        )

    def _on_upgrade(self, rest: bytes) -> None:
        request = self._request()
        assert self._transport is not None
        upgrader = self._upgrader
        if upgrader is None or not upgrader.wants(request):
            self._send(
                Response.error(404, ErrorCode.INVALID_MESSAGE, "not found", "no WebSocket here"),
                keep_alive=False,
            )
            return
        self._cancel_idle()
        self._done = True
        refused = upgrader.upgrade(request, self._transport, rest)
        if refused is not None:
            self._done = False
            self._send(refused, keep_alive=False)
        else:
            # picows owns the socket now. uvloop keeps this protocol's data_received for the
            # connection's life, so let go of everything: the parser (a cycle with this
            # object), the request's pieces, the slots
            self._parser = None  # type: ignore[assignment]
            self._transport = None
            self._reset()
            self._slots = _NO_SLOTS

    def _send(self, response: Response, keep_alive: bool, head: bool = False) -> None:
        transport = self._transport
        if transport is None or transport.is_closing() or self._done:
            return  # a final answer was already sent (or the socket is gone)
        transport.write(response.encode(keep_alive, head))
        if keep_alive:
            self._idle = self._loop.call_later(KEEPALIVE_IDLE_S, self._on_idle)
            return
        self._done = True
        # A lingering close: say we are done writing, then read and discard what the client
        # is still sending (a refused body) for a moment. Closing at once with unread data
        # makes the kernel send a reset, and the client would never read our answer.
        if transport.can_write_eof():
            transport.write_eof()
            self._idle = self._loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _on_idle(self) -> None:
        self._idle = None
        if self._transport is not None and not self._done:
            self._done = True
            self._transport.close()


@dataclass(slots=True)
class _Slot:
    """One request's place in the answer order."""

    keep_alive: bool
    head: bool
    response: Response | None = None


#: Tasks of asynchronous routes still running (kept so they are not garbage collected).
_PENDING: set[asyncio.Task[None]] = set()


def _internal_error(exc: Exception) -> Response:
    logs.log("error", "route_failed", "http", error=repr(exc))
    return Response.error(500, ErrorCode.INTERNAL_ERROR, "internal error", type(exc).__name__)


class _Refused(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def front_factory(
    router: Router, upgrader: Upgrader | None, max_body: int, first_request_timeout: float
) -> Callable[[], HttpFront]:
    def make() -> HttpFront:
        return HttpFront(router, upgrader, max_body, first_request_timeout)

    return make
