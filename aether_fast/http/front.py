"""The HTTP/1.1 front: one asyncio protocol per accepted socket, parsed by httptools.

What it owns: request parsing, keep-alive, limits on heads and bodies, the idle
(HTTP_KEEPALIVE_IDLE_S) and handshake timeouts (the first request's deadline runs from the
accept, TLS handshake included), the cap on sockets not yet upgraded
(MAX_PENDING_CONNECTIONS, and its share per peer address, MAX_PENDING_CONNECTIONS_PER_PEER),
backpressure (a client that does not read its answers stops being read: bounded write
buffer, answers in flight and unparsed bytes), fairness (at most BATCH_PER_PASS requests of
one connection per loop pass, the rest held unparsed until the next), and the hand-off of a
WebSocket upgrade to picows.
Rule: the front never interprets a route; it passes each complete `Request` to the router
(`routes.Router`) or, for an upgrade on WS_PATH, to the `Upgrader` and then steps aside:
after `transport.set_protocol(...)` this object no longer sees a byte.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Protocol, cast

import httptools
import orjson

from aether_fast import logs
from aether_fast.protocol import ErrorCode, error_body

#: Largest request head (request line + headers) accepted.
MAX_HEAD_BYTES = 16 * 1024
#: After a final answer, how long unread request bytes are drained before the close.
LINGER_S = 2.0
#: Unsent answer bytes per connection above which the front stops reading the client
#: (pause_writing), and below which it reads again (resume_writing).
WRITE_HIGH_WATER = 64 * 1024
WRITE_LOW_WATER = 16 * 1024
#: Answers per connection not yet written (pipelined requests, slow asynchronous routes):
#: at this many the front stops reading until they drain.
MAX_IN_FLIGHT = 32
#: Requests of one connection answered per loop pass: past it the rest of what was read
#: waits unparsed (reading paused) and is continued on the next pass, after the other
#: connections had their turn. One read of pipelined requests (up to 256 KiB, ~6 500 tiny
#: requests) would otherwise be answered in one go, a stall of the worker for everyone.
BATCH_PER_PASS = 32
#: Received bytes are fed to the parser this many at a time, and the front checks between
#: two pieces whether it must stop: one read of pipelined requests can then add at most a
#: piece's worth of requests past MAX_IN_FLIGHT or BATCH_PER_PASS; the rest waits unparsed.
FEED_PIECE = 2048


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

    @classmethod
    def method_not_allowed(cls, method: str, allowed: Iterable[str]) -> Response:
        """405 for `method`, naming the `allowed` methods (the Allow header too)."""
        allow = ", ".join(sorted(allowed))
        reason = f"{method} is not allowed here; allowed: {allow}"
        return cls.error(
            405, ErrorCode.INVALID_MESSAGE, "method not allowed", reason, (("Allow", allow),)
        )

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


class PendingSockets:
    """The sockets of one port that have not upgraded yet (in a TLS handshake, or speaking
    HTTP), against MAX_PENDING_CONNECTIONS: past it a new socket is closed at once, so idle
    or stalled sockets cannot exhaust the worker's file descriptors. Refusals go through the
    security log's throttle (`logs.security`), like every refused connection.

    Of those, one peer address may hold at most `per_peer` (MAX_PENDING_CONNECTIONS_PER_PEER,
    0 = no share), so one address cannot take every slot and lock everyone else out. The
    peer is known once the socket is handed to the front (`admit_peer`): with TLS, after its
    handshake."""

    __slots__ = ("_by_peer", "count", "limit", "per_peer", "port")

    def __init__(self, limit: int, per_peer: int, port: str) -> None:
        self.limit = limit
        self.per_peer = per_peer
        self.port = port
        self.count = 0
        self._by_peer: dict[str, int] = {}  # only peers with a pending socket

    def admit(self) -> bool:
        if self.count < self.limit:
            self.count += 1
            return True
        logs.security(
            "connection_refused",
            kind="connection_refused:max_pending_connections",
            reason="max_pending_connections",
            port=self.port,
            limit=self.limit,
        )
        return False

    def admit_peer(self, peer: str) -> bool:
        """Count an admitted socket against its peer's share; False past it."""
        held = self._by_peer.get(peer, 0)
        if self.per_peer and held >= self.per_peer:
            logs.security(
                "connection_refused",
                kind="connection_refused:max_pending_connections_per_peer",
                peer=peer,
                reason="max_pending_connections_per_peer",
                port=self.port,
                limit=self.per_peer,
            )
            return False
        self._by_peer[peer] = held + 1
        return True

    def release_peer(self, peer: str) -> None:
        held = self._by_peer.pop(peer, 0) - 1
        if held > 0:
            self._by_peer[peer] = held


@dataclass(frozen=True, slots=True)
class Port:
    """What every socket of one listening port shares (each front holds this one reference):
    where its requests go, the upgrader of its WebSockets (None: it serves no WebSocket), the
    largest request body, the first request's deadline from the accept, its count of
    sockets not yet upgraded, and how long a keep-alive connection may idle between requests
    (HTTP_KEEPALIVE_IDLE_S)."""

    router: Router
    upgrader: Upgrader | None
    max_body: int
    first_request_timeout: float
    pending: PendingSockets
    keepalive_idle: float


class HttpFront(asyncio.Protocol):
    """One client socket until it upgrades or closes."""

    __slots__ = (
        "_batch",
        "_body",
        "_body_size",
        "_counted",
        "_done",
        "_feeding",
        "_head_size",
        "_headers",
        "_idle",
        "_in_request",
        "_loop",
        "_next_pass",
        "_parser",
        "_peer",
        "_peer_counted",
        "_port",
        "_read_paused",
        "_slots",
        "_transport",
        "_unparsed",
        "_url",
        "_write_paused",
    )

    def __init__(self, port: Port) -> None:
        self._port = port
        self._counted = port.pending.admit()  # from the accept, TLS handshake included
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        # from the accept: the first request must be complete within the timeout, whatever
        # the TLS handshake before it took
        self._idle: asyncio.TimerHandle | None = self._loop.call_later(
            port.first_request_timeout, self._on_idle
        )
        self._peer = ""
        self._peer_counted = False  # counted in its peer's share of the pending sockets
        self._done = False
        self._in_request = False
        self._feeding = False
        self._read_paused = False
        self._write_paused = False
        self._unparsed = b""
        self._batch = 0  # requests answered in this loop pass
        self._next_pass: asyncio.Handle | None = None
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
        # with TLS, this comes once the handshake is done (or never, if it fails)
        t = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self._done or not self._counted:
            self._done = True  # past MAX_PENDING_CONNECTIONS, or its deadline has passed
            self._cancel_idle()
            t.abort()
            return
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if peer else ""
        if not self._port.pending.admit_peer(self._peer):
            self._done = True  # past this address's share of MAX_PENDING_CONNECTIONS
            self._cancel_idle()
            self._release()
            t.abort()
            return
        self._peer_counted = True
        self._transport = t
        t.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        self._cancel_idle()
        self._release()
        self._unparsed = b""
        self._slots.clear()
        if self._next_pass is not None:
            self._next_pass.cancel()
            self._next_pass = None

    def pause_writing(self) -> None:
        # the client does not read its answers as fast as it sends requests
        self._write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._drain()
        self._unblock()

    def eof_received(self) -> bool | None:
        if self._done and self._transport is not None:
            self._transport.close()  # the client finished while we lingered
        return None

    def data_received(self, data: bytes) -> None:
        if self._closing():
            return
        if self._unparsed or self._blocked():
            # held back: keep the order, and stop reading (a TLS transport may still hand
            # over what it had already decrypted; that is bounded by its own buffer)
            self._unparsed += data
            self._pause_reading()
            return
        if self._next_pass is None:
            self._batch = 0  # a new loop pass
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Parse `data` a piece at a time; stop (keeping the rest unparsed, reading paused)
        when the answers in flight reach MAX_IN_FLIGHT or the client stops reading, and
        when this loop pass answered BATCH_PER_PASS requests (then go on at the next)."""
        view = memoryview(data)
        pos = 0
        self._feeding = True
        try:
            while pos < len(view) and not self._closing():
                if self._blocked() or self._batch >= BATCH_PER_PASS:
                    self._unparsed = bytes(view[pos:])
                    self._pause_reading()
                    if not self._blocked() and self._next_pass is None:
                        self._next_pass = self._loop.call_soon(self._go_on)
                    return
                start, pos = pos, min(pos + FEED_PIECE, len(view))
                try:
                    self._parser.feed_data(view[start:pos])
                except httptools.HttpParserUpgrade as upgrade:
                    self._on_upgrade(bytes(view[start + upgrade.args[0] :]))
                    return
                except httptools.HttpParserError as exc:
                    # a callback's refusal arrives wrapped in HttpParserCallbackError
                    cause = exc.__context__
                    if isinstance(cause, _Refused):
                        self._final(cause.response)
                        return
                    self._final(
                        Response.error(400, ErrorCode.INVALID_MESSAGE, "bad HTTP request", str(exc))
                    )
                    return
        finally:
            self._feeding = False

    def _closing(self) -> bool:
        """Closed, or a final answer is queued: nothing more is parsed."""
        return self._done or bool(self._slots and not self._slots[-1].keep_alive)

    def _blocked(self) -> bool:
        return self._write_paused or len(self._slots) >= MAX_IN_FLIGHT

    def _pause_reading(self) -> None:
        if not self._read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()

    def _go_on(self) -> None:
        """The next loop pass after a full batch: a new batch of what was held back."""
        self._next_pass = None
        self._batch = 0
        self._unblock()

    def _unblock(self) -> None:
        """Answers drained or the client read: feed what was held back, then read again."""
        if self._feeding or self._done or self._transport is None or self._blocked():
            return
        if self._unparsed:
            data, self._unparsed = self._unparsed, b""
            self._feed(data)
            if self._unparsed or self._done or self._transport is None:
                return  # blocked again, finished, or upgraded
        if self._read_paused:
            self._read_paused = False
            self._transport.resume_reading()

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()
        # a request must arrive whole within the timeout of its first byte (no slowloris)
        self._in_request = True
        self._arm(self._port.first_request_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._grow_head(len(name) + len(value) + 4)

    def on_headers_complete(self) -> None:
        length = self._header_value(b"content-length")
        if length is not None and length.isdigit() and int(length) > self._port.max_body:
            raise _Refused(self._too_large())

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._port.max_body:
            raise _Refused(self._too_large())
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._parser.should_upgrade():
            return  # handled by HttpParserUpgrade in _feed
        self._in_request = False
        self._cancel_idle()
        self._batch += 1
        request = self._request()
        # answers leave in request order, whichever route finishes first (pipelining)
        slot = _Slot(self._parser.should_keep_alive(), request.method == "HEAD")
        self._slots.append(slot)
        try:
            response = self._port.router.handle(request)
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
        self._unblock()

    def _final(self, response: Response) -> None:
        """A refusal that ends the connection, sent after the answers before it."""
        self._slots.append(_Slot(False, False, response))
        self._drain()

    def _drain(self) -> None:
        """Write the answers that are ready, in request order, while the client reads."""
        while self._slots and self._slots[0].response is not None and not self._write_paused:
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
            f"body over {self._port.max_body} bytes",
            limit=self._port.max_body,
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
        upgrader = self._port.upgrader
        if upgrader is None or not upgrader.wants(request):
            self._send(
                Response.error(404, ErrorCode.INVALID_MESSAGE, "not found", "no WebSocket here"),
                keep_alive=False,
            )
            return
        self._cancel_idle()
        if self._read_paused:  # picows reads from here on
            self._read_paused = False
            self._transport.resume_reading()
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
            self._release()
            self._reset()
            self._slots = _NO_SLOTS

    def _send(self, response: Response, keep_alive: bool, head: bool = False) -> None:
        transport = self._transport
        if transport is None or transport.is_closing() or self._done:
            return  # a final answer was already sent (or the socket is gone)
        transport.write(response.encode(keep_alive, head))
        if keep_alive:
            if not self._in_request:  # a request under way keeps its own deadline
                self._arm(self._port.keepalive_idle)
            return
        self._done = True
        # A lingering close: say we are done writing, then read and discard what the client
        # is still sending (a refused body) for a moment. Closing at once with unread data
        # makes the kernel send a reset, and the client would never read our answer.
        if transport.can_write_eof():
            transport.write_eof()
            self._cancel_idle()
            self._idle = self._loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    def _arm(self, timeout: float) -> None:
        self._cancel_idle()
        self._idle = self._loop.call_later(timeout, self._on_idle)

    def _release(self) -> None:
        """This socket no longer counts against MAX_PENDING_CONNECTIONS."""
        if self._counted:
            self._counted = False
            self._port.pending.count -= 1
        if self._peer_counted:
            self._peer_counted = False
            self._port.pending.release_peer(self._peer)

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _on_idle(self) -> None:
        self._idle = None
        if self._done:
            return
        self._done = True  # and connection_made closes a socket it has not seen yet
        if self._transport is not None:
            self._transport.close()
        else:
            # still in its TLS handshake, which ssl_handshake_timeout (the same timeout)
            # ends now, or failed: asyncio then never tells this protocol, so count it out
            self._release()


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


def front_factory(port: Port) -> Callable[[], HttpFront]:
    def make() -> HttpFront:
        return HttpFront(port)

    return make
