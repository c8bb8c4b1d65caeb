"""The Python client of aether-fast: asyncio on picows' client.

What it owns: one *logical* connection that outlives its sockets. It reconnects with
exponential backoff, jitter and a cap; keeps the `client_id` (the server's dedupe key) across
sockets; numbers every publication and keeps it until its ack, resending unacked ones with
`retry` after a reconnect; queues publications while disconnected; rejoins every channel
with `since` + `epoch` and drops anything it already delivered; refreshes its token before
expiry through a callback. See docs/clients.md.

Pacing: every frame costs the user's budget on the server (RATE_LIMIT_MESSAGES; 10 refusals,
or one budget's worth when that is more, refilled at 3x the budget's rate, close the socket with
1008). So joins, leaves and publications go out through one window (`max_in_flight` frames
awaiting their answer, fewer than the 10 that could close the socket); one refused with
RATE_LIMITED / SERVER_BUSY is sent again after `retry_after_ms`, before anything newer, and
no frame of ours but pings is sent until then (status requests and token refreshes wait
too); the window then opens again one answer at a time (`_pump`). A slot with no answer
for IN_FLIGHT_TIMEOUT_S is freed (the join or leave sent again), so that nothing can jam
the window for good.

Rules it keeps:
- A message is delivered to the application at most once: per channel, every offset of the
  current epoch is delivered once, and (sender user, sender client_id, sequence) - which the
  protocol makes unique - is remembered for a window, which also covers a publication that
  appears again under a new epoch after the server lost its history.
- ... and at least once: an offset counts as delivered only when its publication came
  (with echo off, also when it is our own, acked: its copy never comes), never because an
  ack came first (with Redis an ack may beat its own copy and lower offsets, docs/protocol.md
  §7). The channel's position (`since` of a recovery) is the last offset without a gap
  below it; a gap that stays while GAP_WINDOW later offsets come is asked for at once
  (joined again with `since`), else at the next reconnect.
- No reconnect after close 4001 (auth) or 4003 (forbidden) unless a new token is supplied
  (by `token_refresh` or `set_token`); none after 4009 (replaced by a newer connection).
- Only this module's own task touches the socket; callbacks run on the loop and must not
  block it.

Compression (permessage-deflate, RFC 7692; `compression=True` by default): the handshake
offers `permessage-deflate; client_max_window_bits`; the server's answer is checked
(`parse_deflate_answer`: an extension not offered, an unknown, duplicate or out-of-range
parameter fails the handshake with ExtensionRefused, reported to `on_error`, and the client
tries again with backoff). Inbound RSV1 messages are inflated (raw inflate of the payload +
00 00 ff ff; a fresh inflater per message when the server said `server_no_context_takeover`)
into at most `max_message_bytes` (more: the socket is closed 1009); outbound frames of
`compress_min_bytes` or more are compressed, each with a fresh compressor (as if
`client_no_context_takeover`); one over the server's MAX_MESSAGE_BYTES once inflated is
answered MESSAGE_TOO_LARGE, as when sent plain (docs/protocol.md §16). RSV bits the
negotiation does not allow close the socket with 1002, data that does not inflate with 1007.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import heapq
import inspect
import json
import logging
import random
import struct
import time
import uuid
import zlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast
from urllib.parse import urlencode

from picows import WSListener, WSMsgType, WSTransport, WSUpgradeResponse, ws_connect

from aether_fast.protocol import extension_element, split_quoted, window_bits

__all__ = [
    "Ack",
    "AetherClient",
    "AetherError",
    "ClientClosed",
    "Deflate",
    "ExtensionRefused",
    "JoinResult",
    "Message",
    "State",
]

log = logging.getLogger("aether_fast.client")

State = Literal["idle", "connecting", "open", "reconnecting", "closed"]
TokenSource = Callable[[], str | Awaitable[str | None] | None]

#: Close codes after which the same token must not be used again (docs/protocol.md §12, §15).
AUTH_CLOSE_CODES: Final = frozenset({4001, 4003})
#: Close codes after which the client stops for good: 1000 is our own close, 4009 means a
#: newer connection with our user and client_id took over (reconnecting would fight it).
FINAL_CLOSE_CODES: Final = frozenset({1000, 4009})
#: Errors about one publication that are worth sending it again after `retry_after_ms`.
RETRYABLE_CODES: Final = frozenset({"RATE_LIMITED", "SERVER_BUSY", "INTERNAL_ERROR"})
#: Errors about one join that are worth sending it again after `retry_after_ms`.
RETRYABLE_JOIN_CODES: Final = frozenset({"RATE_LIMITED", "SERVER_BUSY"})
#: Seconds after which a join, leave or publication still unanswered frees its place in the
#: window (a join or leave is sent again; a publication waits for its answer or the next
#: socket): a safety net, the server answers every one of them.
IN_FLIGHT_TIMEOUT_S: Final = 30.0
#: How many (user, client_id, sequence) keys per channel are remembered for dedupe.
SEEN_WINDOW: Final = 4096
#: How many offsets a channel keeps above one that has not come (its position stays below
#: that one: a reconnect's recovery asks for it). One more, and the channel is joined again
#: with `since` at once, so the server replays what is missing; at twice as many (that join
#: waits too long) the socket is dropped: the reconnect's recovery asks for it then.
GAP_WINDOW: Final = 1024
#: The handshake's offer when `compression` is on (RFC 7692 §7.1: `client_max_window_bits`
#: without a value lets the server choose a smaller window for our compressor).
DEFLATE_OFFER: Final = "permessage-deflate; client_max_window_bits"
#: The 4 bytes a sender strips from the end of each compressed message (RFC 7692 §7.2.1).
DEFLATE_TAIL: Final = b"\x00\x00\xff\xff"
#: Default `max_message_bytes`: the largest message the client takes from the server, plain
#: or once inflated (a frame, or a fragmented message, over it closes the socket with 1009).
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Deflate:
    """permessage-deflate as the server's handshake answer settled it (RFC 7692 §7.1)."""

    server_no_context_takeover: bool = False
    client_no_context_takeover: bool = False
    server_max_window_bits: int = 15
    client_max_window_bits: int = 15


@dataclass(frozen=True, slots=True)
class Message:
    """A publication received on a joined channel."""

    channel: str
    content: str
    offset: int
    sequence: int
    client_id: str | None
    user_id: str | None
    timestamp: str
    replayed: bool = False  #: delivered by recovery after a reconnect


@dataclass(frozen=True, slots=True)
class Ack:
    """The server accepted a publication: its place in the channel."""

    channel: str
    sequence: int
    offset: int
    timestamp: str


@dataclass(frozen=True, slots=True)
class JoinResult:
    """A join reply. `recovered` is None for a first join, True when every missed message
    was replayed after a reconnect, False when they could not be: reload this channel's
    state by other means. `new_epoch` says the server lost its history meanwhile (e.g. an
    in-memory server restarted): every message of the new epoch was asked for, and
    `recovered` tells whether all of those came; messages of the old epoch that never
    reached this client cannot be known."""

    channel: str
    offset: int
    epoch: str
    recovered: bool | None
    new_epoch: bool = False


class AetherError(Exception):
    """An error message of the server (docs/protocol.md §11), or a refusal of the client itself."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details: dict[str, Any] = details or {}


class ClientClosed(AetherError):
    """The client stopped (closed by the application, or refused with 4001/4003/4009)."""

    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__("CLOSED", message, {"close_code": close_code})
        self.close_code = close_code


class ExtensionRefused(AetherError):
    """The server's `Sec-WebSocket-Extensions` answer is one the client cannot accept (an
    extension it did not offer, an unknown or invalid parameter): the handshake fails."""

    def __init__(self, message: str) -> None:
        super().__init__("EXTENSION_REFUSED", message)


def parse_deflate_answer(values: list[str], offered: bool) -> Deflate | None:
    """The server's `Sec-WebSocket-Extensions` answer (its header values) to our offer
    (`offered`: permessage-deflate was offered): the settled Deflate, or None when the
    server declined (no header). Raises ExtensionRefused for an answer a client must not
    accept (RFC 6455 §9.1, RFC 7692 §5, §7.1): an extension not offered, permessage-deflate
    twice, an unknown or repeated parameter, a value where none belongs or none where one
    must be, a window size outside 8..15."""
    elements = [e for text in values for e in split_quoted(text, ",") if e.strip()]
    if not elements:
        return None
    if len(elements) > 1:
        raise ExtensionRefused(f"server answered more than one extension: {values!r}")
    name, params = extension_element(elements[0])
    if name != "permessage-deflate" or not offered:
        raise ExtensionRefused(f"server answered an extension the client did not offer: {name!r}")
    seen: set[str] = set()
    flags = {"server_no_context_takeover": False, "client_no_context_takeover": False}
    bits = {"server_max_window_bits": 15, "client_max_window_bits": 15}
    for key, value in params:
        if key in seen:
            raise ExtensionRefused(f"permessage-deflate parameter {key!r} given twice")
        seen.add(key)
        if key in flags:
            if value is not None:
                raise ExtensionRefused(f"permessage-deflate parameter {key!r} takes no value")
            flags[key] = True
        elif key in bits:
            given = None if value is None else window_bits(value)
            if given is None:
                raise ExtensionRefused(f"permessage-deflate {key} must be 8..15, got {value!r}")
            bits[key] = given
        else:
            raise ExtensionRefused(f"unknown permessage-deflate parameter {key!r}")
    return Deflate(
        flags["server_no_context_takeover"],
        flags["client_no_context_takeover"],
        bits["server_max_window_bits"],
        bits["client_max_window_bits"],
    )


@dataclass(slots=True)
class _Pending:
    sequence: int
    channel: str
    content: str
    future: asyncio.Future[Ack]
    sent: bool = False  # sent on some socket: a resend is a `retry`
    socket: int = 0  # the socket (generation) it is in flight on; 0: to be (re)sent
    size: int = 0  # bytes of its frame as last sent
    sent_at: float = 0.0  # monotonic time it was last sent


@dataclass(slots=True)
class _Channel:
    name: str
    epoch: str | None = None
    #: the position: every offset <= floor was received (or, with echo off, is one of our
    #: own, acked); `above` holds the later ones received, above one that has not come yet
    floor: int | None = None
    above: set[int] = field(default_factory=set)
    seen: OrderedDict[tuple[Any, Any, int], None] = field(default_factory=OrderedDict)
    #: the join of this socket sent `since` (recovery asked)
    asked: bool = False
    #: a second join (since=0 in a new epoch) is under way: hold live messages until its
    #: reply, then until its replay is in (`replay_until`), then deliver them (deduped)
    resyncing: bool = False
    new_epoch: bool = False
    held: list[dict[str, Any]] = field(default_factory=list)
    replay_until: int = 0

    def take_offset(self, offset: int) -> bool:
        """Record `offset` as received; False when it already was. The floor only moves
        over offsets received: one that has not come holds it (and the recovery position,
        `since`) below it, however many later ones come (the client bounds them: GAP_WINDOW)."""
        if self.floor is None:
            self.floor = offset - 1
        if offset <= self.floor or offset in self.above:
            return False
        self.above.add(offset)
        self.advance()
        return True

    def advance(self) -> None:
        """Move the floor over the offsets received right above it."""
        assert self.floor is not None
        while self.floor + 1 in self.above:
            self.floor += 1
            self.above.discard(self.floor)

    def settle(self) -> None:
        """After the floor jumped forward (a join reply): forget what is below it, advance."""
        assert self.floor is not None
        self.above = {o for o in self.above if o > self.floor}
        self.advance()

    def take_key(self, key: tuple[Any, Any, int]) -> bool:
        """Record a (user, client_id, sequence); False when it was already delivered."""
        if key in self.seen:
            return False
        self.seen[key] = None
        if len(self.seen) > SEEN_WINDOW:
            self.seen.popitem(last=False)
        return True


class _Listener(WSListener):
    """picows callbacks for one socket, handed to the client with the socket's number so a
    late callback of an old socket is ignored. It assembles messages (fragments, RSV1:
    inflated) into at most `max_message` bytes and fails the socket on frames the
    negotiation does not allow."""

    def __init__(
        self,
        client: AetherClient,
        generation: int,
        deflate: Deflate | None = None,
        max_message: int = MAX_MESSAGE_BYTES,
    ) -> None:
        super().__init__()
        self._client = client
        self._generation = generation
        self.deflate = deflate
        self._max_message = max_message
        self._parts: list[bytes] = []
        self._size = 0  # bytes in _parts
        self._compressed = False  # the message being assembled came with RSV1
        self._text = False  # a text message is being assembled (the protocol has no other)
        # with context takeover, the one inflater of the socket (its window spans messages)
        self._inflater: Any = None
        self._failed = False  # this side closed the socket over a bad frame
        self.close_code: int | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport: WSTransport) -> None:
        # before ws_connect() returns: the server's first frame may come with the handshake
        if self._generation == self._client._generation:
            self._client._transport = transport
            self._client._listener = self

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if self._failed:
            return
        kind = frame.msg_type
        if (
            frame.rsv2
            or frame.rsv3
            or (
                frame.rsv1
                and (self.deflate is None or kind not in (WSMsgType.TEXT, WSMsgType.BINARY))
            )
        ):
            # RSV1 means "compressed" only on the first frame of a data message, and only
            # once permessage-deflate was negotiated (RFC 7692 §6)
            self._fail(transport, 1002, "PROTOCOL_ERROR", "reserved bits set without an extension")
            return
        if kind == WSMsgType.BINARY:
            # not part of the protocol: ignored, and so are its continuation frames
            self._text = False
            self._parts.clear()
            self._size = 0
        elif kind == WSMsgType.TEXT or (kind == WSMsgType.CONTINUATION and self._text):
            if kind == WSMsgType.TEXT:
                self._parts.clear()
                self._size = 0
                self._compressed = bool(frame.rsv1)
                self._text = not frame.fin
            elif frame.fin:
                self._text = False
            self._size += frame.payload_size
            if self._size > self._max_message:
                self._fail(
                    transport,
                    1009,
                    "INBOUND_TOO_LARGE",
                    f"a message from the server is over max_message_bytes ({self._max_message})",
                )
                return
            self._parts.append(frame.get_payload_as_bytes())
            if frame.fin:
                payload = b"".join(self._parts)
                self._parts.clear()
                self._size = 0
                if self._compressed:
                    inflated = self._inflate(transport, payload)
                    if inflated is None:
                        return
                    payload = inflated
                self._client._on_frame(self._generation, payload)
        elif kind == WSMsgType.PING:  # answered here, after the RSV check (no auto pong)
            transport.send_pong(frame.get_payload_as_bytes())
        elif kind == WSMsgType.CLOSE:
            raw = frame.get_payload_as_bytes()
            self.close_code = struct.unpack("!H", raw[:2])[0] if len(raw) >= 2 else 1005
            with contextlib.suppress(Exception):
                echo = self.close_code if self.close_code != 1005 else 1000
                transport.send_close(cast(Any, echo))  # WSCloseCode names only RFC codes
            transport.disconnect()

    def _inflate(self, transport: WSTransport, data: bytes) -> bytes | None:
        """A whole compressed message inflated into at most `max_message` bytes (inflating
        stops there); None when it could not be (the socket is failed)."""
        assert self.deflate is not None
        inflater = self._inflater
        if inflater is None:
            inflater = zlib.decompressobj(-15)  # takes any window the server used
            if not self.deflate.server_no_context_takeover:
                self._inflater = inflater
        try:
            out: bytes = inflater.decompress(data + DEFLATE_TAIL, self._max_message + 1)
        except zlib.error:
            self._fail(transport, 1007, "PROTOCOL_ERROR", "invalid compressed data")
            return None
        if len(out) > self._max_message:
            self._fail(
                transport,
                1009,
                "INBOUND_TOO_LARGE",
                f"a message from the server is over max_message_bytes ({self._max_message})"
                " once inflated",
            )
            return None
        if inflater.eof:
            self._inflater = None  # the server ended its stream (BFINAL): a new one follows
        return out

    def _fail(self, transport: WSTransport, code: int, error: str, reason: str) -> None:
        """Close this socket with `code` (the client reconnects with backoff) and report
        it: a warning in the log, an AetherError to `on_error`."""
        self._failed = True
        self._parts.clear()
        self.close_code = code
        log.warning("closing the socket with %d: %s", code, reason)
        with contextlib.suppress(Exception):
            transport.send_close(cast(Any, code), reason.encode()[:120])
        transport.disconnect()
        if self._generation == self._client._generation:
            self._client._emit(
                self._client._on_error, AetherError(error, reason, {"close_code": code})
            )

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.done.done():
            self.done.set_result(None)


class AetherClient:
    """A client of one aether-fast server.

    Usage::

        client = AetherClient("ws://127.0.0.1:8000/ws", token=jwt, client_id="bot-1",
                              channels=["chat"])
        await client.connect()
        ack = await client.publish("chat", "hello")
        async for msg in client.messages():
            print(msg.channel, msg.user_id, msg.content)

    Callbacks (each optional, called on the loop): `on_message(Message)` (when given,
    messages go there instead of to `messages()`), `on_system(dict)` for system notices
    and presence, `on_error(AetherError)` for server errors that answer no pending call,
    `on_state(State)`, `on_join(JoinResult)`.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        client_id: str | None = None,
        channels: Iterable[str] = (),
        token_refresh: TokenSource | None = None,
        echo: bool = False,
        on_message: Callable[[Message], object] | None = None,
        on_system: Callable[[dict[str, Any]], object] | None = None,
        on_error: Callable[[AetherError], object] | None = None,
        on_state: Callable[[State], object] | None = None,
        on_join: Callable[[JoinResult], object] | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        backoff_factor: float = 2.0,
        jitter: float = 0.5,
        refresh_before_s: float = 30.0,
        max_pending: int = 10_000,
        first_sequence: int | None = None,
        handshake_timeout: float = 5.0,
        ping_idle_s: float = 20.0,
        max_in_flight: int = 8,
        compression: bool = True,
        compress_min_bytes: int = 512,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.url = url
        self._token = token
        self.client_id = client_id
        self.user_id: str | None = None
        self._token_refresh = token_refresh
        self._echo = echo
        self._on_message = on_message
        self._on_system = on_system
        self._on_error = on_error
        self._on_state = on_state
        self._on_join = on_join
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.backoff_factor = backoff_factor
        self.jitter = jitter
        self.refresh_before_s = refresh_before_s
        self.max_pending = max_pending
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        #: joins and publications sent and not answered yet, at most (see the module doc)
        self.max_in_flight = max_in_flight
        self._handshake_timeout = handshake_timeout
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be at least 1")
        #: offer permessage-deflate at each connect (RFC 7692)
        self.compression = compression
        #: outbound frames this big or bigger are compressed (when the server accepted)
        self.compress_min_bytes = compress_min_bytes
        #: the largest message taken from the server, plain or once inflated
        self.max_message_bytes = max_message_bytes
        self._ping_idle_s = ping_idle_s
        # Sequences start at the clock (µs) so that a restarted process with the same
        # client_id does not reuse sequences the server still remembers (DEDUP_TTL_S).
        self._sequence = (
            first_sequence - 1 if first_sequence is not None else int(time.time() * 1e6)
        )
        self._channels: dict[str, _Channel] = {name: _Channel(name) for name in channels}
        self._pending: dict[int, _Pending] = {}
        self._joins: dict[str, list[asyncio.Future[JoinResult]]] = {}
        self._leaves: dict[str, list[asyncio.Future[None]]] = {}
        self._syncing: set[str] = set()  # joins of this socket still unanswered
        # pacing (`_pump`): joins and leaves to send on this socket, those sent and
        # unanswered (name -> when sent), sequences of publications to send (a heap: the
        # oldest first), publications sent and unanswered, the window, frames that take no
        # place in it (status, refresh) but wait for the pause too, and no sending before
        # `_paused_until` (monotonic)
        self._join_queue: deque[str] = deque()
        self._joins_out: dict[str, float] = {}
        self._leave_queue: deque[str] = deque()
        self._leaves_out: dict[str, float] = {}
        self._control: deque[dict[str, Any]] = deque()
        self._refresh_out: str | None = None  # a refresh sent (or to send), unanswered
        self._stall_timer: asyncio.TimerHandle | None = None
        self._to_send: list[int] = []
        self._pubs_out = 0
        self._window = max_in_flight
        self._paused_until = 0.0
        self._inbox: asyncio.Queue[Message | None] = asyncio.Queue()
        self.state: State = "idle"
        self.attempts = 0  #: failed connection attempts since the last open
        self.last_close_code: int | None = None
        self._generation = 0
        self._transport: WSTransport | None = None
        self._listener: _Listener | None = None
        self._first_frame = False
        self._ready = False  # joins answered, queue flushed: publishes go straight out
        self._task: asyncio.Task[None] | None = None
        self._opened: asyncio.Future[None] | None = None
        self._closing = False
        self._wake = asyncio.Event()  # cuts a backoff wait short (close, reconnect, token)
        self._now = False  # reconnect() asked for the next attempt without a wait
        self._refused_token: str | None = None
        self._refresh_timer: asyncio.TimerHandle | None = None
        self._refreshing = False
        self._resend_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- public API ------------------------------------------------------------------------

    @property
    def token(self) -> str | None:
        return self._token

    @property
    def channels(self) -> list[str]:
        return list(self._channels)

    @property
    def deflate(self) -> Deflate | None:
        """permessage-deflate as settled for the current socket; None: it is plain."""
        listener = self._listener
        return listener.deflate if listener is not None else None

    @property
    def pending(self) -> int:
        """Publications not acknowledged yet (queued or in flight)."""
        return len(self._pending)

    def position(self, channel: str) -> tuple[int | None, str | None]:
        """(position, epoch) of a joined channel: the last offset with none missing below
        it (received, or with echo off our own, acked), the `since` of its next recovery."""
        ch = self._channels[channel]
        return ch.floor, ch.epoch

    async def connect(self, timeout: float | None = None) -> None:
        """Start the client and wait until it is connected and joined (reconnecting with
        backoff meanwhile). Raises ClientClosed when it is refused for good (4001/4003 with
        no new token), TimeoutError after `timeout`."""
        if self.state == "closed" and not self._restart():
            raise ClientClosed("client is closed", self.last_close_code)
        loop = asyncio.get_running_loop()
        if self._opened is None or self._opened.done():
            self._opened = loop.create_future()
        if self._task is None:
            self._task = loop.create_task(self._run())
        opened = self._opened
        if self.state == "open":
            return
        await asyncio.wait_for(asyncio.shield(opened), timeout)

    async def publish(self, channel: str, content: str) -> Ack:
        """Publish `content` to `channel` (joined) and wait for its ack. While the client
        is disconnected the message is queued; a message sent but not acked when its
        socket dropped is resent with `retry` on the next one (the server acks a duplicate
        with its original offset, never publishes it twice). Raises AetherError when the
        server refuses it for good (NOT_A_MEMBER, FORBIDDEN, INVALID_MESSAGE, ...)."""
        return await self.publish_nowait(channel, content)

    def publish_nowait(self, channel: str, content: str) -> asyncio.Future[Ack]:
        """`publish` without waiting: the future resolves to the Ack."""
        if self.state == "closed":
            raise ClientClosed("client is closed", self.last_close_code)
        if len(self._pending) >= self.max_pending:
            raise AetherError("QUEUE_FULL", f"{self.max_pending} messages are waiting for acks")
        self._sequence += 1
        fut: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        item = _Pending(self._sequence, channel, content, fut)
        self._pending[item.sequence] = item
        heapq.heappush(self._to_send, item.sequence)
        if self._ready:
            self._pump()
        return fut

    async def join(
        self, channel: str, *, since: int | None = None, epoch: str | None = None
    ) -> JoinResult:
        """Join `channel` (rejoined after every reconnect from then on). With `since` and
        `epoch` (a position kept from an earlier run) the missed messages are replayed."""
        ch = self._channels.get(channel)
        if ch is None:
            ch = self._channels[channel] = _Channel(channel, epoch=epoch, floor=since)
        fut: asyncio.Future[JoinResult] = asyncio.get_running_loop().create_future()
        self._joins.setdefault(channel, []).append(fut)
        if self._first_frame:
            self._queue_join(ch)
            self._pump()
        return await fut

    async def leave(self, channel: str) -> None:
        """Leave `channel`; it is no longer rejoined."""
        if self._channels.pop(channel, None) is None:
            return
        self._syncing.discard(channel)
        if channel in self._join_queue:
            self._join_queue.remove(channel)
        if not self._first_frame:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._leaves.setdefault(channel, []).append(fut)
        if channel not in self._leaves_out and channel not in self._leave_queue:
            self._leave_queue.append(channel)  # through the window, like a join
        self._pump()
        await fut

    async def request_status(self) -> None:
        """Ask the server for a status notice (arrives at `on_system`); sent once no rate
        limit's `retry_after_ms` runs."""
        self._send_control({"type": "system", "action": "status", "data": {}})

    def set_token(self, token: str) -> None:
        """Use `token` from now on: refresh the live connection with it, or reconnect with
        it if the client was stopped by 4001/4003."""
        self._token = token
        if self.state == "closed":
            if self._restart():
                self._task = asyncio.get_running_loop().create_task(self._run())
            return
        self._wake.set()
        if self._first_frame:
            self._send_refresh(token)
        self._arm_refresh()

    def _restart(self) -> bool:
        """After a stop by 4001/4003: start afresh when the token was changed since."""
        if self.last_close_code not in AUTH_CLOSE_CODES or self._token == self._refused_token:
            return False
        self._closing = False
        self._task = None
        self._inbox = asyncio.Queue()
        self.attempts = 0
        self._set_state("idle")
        return True

    def reconnect(self) -> None:
        """Drop the current socket and connect again at once (e.g. after a network
        change); nothing is lost: unacked messages are resent, channels recovered."""
        self.attempts = 0
        self._now = True
        self._wake.set()
        if self._transport is not None:
            self._transport.disconnect(graceful=False)

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every publication so far is acknowledged (or refused)."""
        futures = [p.future for p in self._pending.values()]
        if futures:
            await asyncio.wait_for(
                asyncio.gather(*(asyncio.shield(f) for f in futures), return_exceptions=True),
                timeout,
            )

    async def messages(self) -> AsyncIterator[Message]:
        """Every message received (unless `on_message` is set), until the client closes."""
        while True:
            msg = await self._inbox.get()
            if msg is None:
                self._inbox.put_nowait(None)  # let any other reader end too
                return
            yield msg

    async def close(self) -> None:
        """Close with 1000 and stop. Unacked publications fail with ClientClosed (call
        `flush()` first to wait for them)."""
        self._closing = True
        self._wake.set()
        transport = self._transport
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.send_close(cast(Any, 1000), b"client closing")
            transport.disconnect()
        task = self._task
        if task is not None and task is not asyncio.current_task() and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), 2.0)
            except TimeoutError:  # a connect attempt still hanging: stop it
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._stop("client closed", 1000)

    async def __aenter__(self) -> AetherClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the connection loop ---------------------------------------------------------------

    def backoff_delay(self, attempt: int) -> float:
        """Seconds to wait before reconnect attempt `attempt` (1, 2, ...): exponential up to
        `backoff_max`, of which a random part (`jitter`) is spread so that many clients
        dropped at once do not come back at once."""
        base = min(self.backoff_max, self.backoff_initial * self.backoff_factor ** (attempt - 1))
        return base * (1 - self.jitter) + base * self.jitter * random.random()

    def _build_url(self) -> str:
        params: dict[str, str] = {}
        if self._token:
            params["token"] = self._token
        if self.client_id:
            params["client_id"] = self.client_id
        if self._echo:
            params["echo"] = "1"
        sep = "&" if "?" in self.url else "?"
        return self.url + (sep + urlencode(params) if params else "")

    async def _run(self) -> None:
        try:
            while not self._closing:
                self._set_state("connecting" if self._generation == 0 else "reconnecting")
                code = await self._one_socket()
                if self._closing:
                    break
                if code in FINAL_CLOSE_CODES:
                    self._stop("replaced by a newer connection" if code == 4009 else "closed", code)
                    return
                if code in AUTH_CLOSE_CODES and not await self._new_token_after(code):
                    self._refused_token = self._token
                    self._stop(f"refused with close code {code}; no new token", code)
                    return
                if code == 4029:  # connection limit: it will recur, so wait long
                    self.attempts = max(self.attempts, 5)
                self.attempts += 1
                immediate = code in AUTH_CLOSE_CODES or self._now
                self._now = False
                delay = 0.0 if immediate else self.backoff_delay(self.attempts)
                self._set_state("reconnecting")
                if delay:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
        finally:
            if self.state != "closed":
                self._stop("client closed", self.last_close_code)

    async def _one_socket(self) -> int | None:
        """Open one socket and serve it until it drops; its close code (None: none came)."""
        self._generation += 1
        generation = self._generation
        self._first_frame = False
        self._ready = False
        offered = self.compression

        def listener_for(_request: object, response: WSUpgradeResponse) -> _Listener:
            # called by picows with the 101 response, before any frame: an answer we cannot
            # accept raises ExtensionRefused, which fails the handshake (ws_connect raises it)
            answer = response.headers.getall("Sec-WebSocket-Extensions", [])
            deflate = parse_deflate_answer(answer, offered)
            return _Listener(self, generation, deflate, self.max_message_bytes)

        try:
            transport, listener = await ws_connect(
                listener_for,
                self._build_url(),
                websocket_handshake_timeout=self._handshake_timeout,
                enable_auto_ping=self._ping_idle_s > 0,
                auto_ping_idle_timeout=max(self._ping_idle_s, 1.0),
                auto_ping_reply_timeout=10.0,
                enable_auto_pong=False,  # _Listener answers pings (it checks their RSV bits)
                max_frame_size=self.max_message_bytes,
                extra_headers={"Sec-WebSocket-Extensions": DEFLATE_OFFER} if offered else None,
                use_aiofastnet=False,
            )
        except ExtensionRefused as exc:
            log.warning("handshake failed: %s", exc.message)
            self._emit(self._on_error, exc)
            return None
        except (TimeoutError, OSError, EOFError, RuntimeError) as exc:
            log.debug("connect failed: %r", exc)
            return None
        except Exception as exc:  # picows' handshake errors (a refusal before the upgrade)
            log.debug("handshake refused: %r", exc)
            return None
        listener = cast(_Listener, listener)
        self._transport = transport
        self._listener = listener
        try:
            await listener.done
        finally:
            self._transport = None
            self._listener = None
            self._first_frame = False
            self._ready = False
            self._syncing.clear()
            self._join_queue.clear()
            self._joins_out.clear()
            self._leave_queue.clear()
            self._leaves_out.clear()
            self._control.clear()
            self._refresh_out = None
            self._refreshing = False  # a new token, if any, is used at the next connect
            self._pubs_out = 0
            self._cancel_timer("_resend_timer")
            self._cancel_timer("_stall_timer")
            for item in self._pending.values():
                item.socket = 0  # unacked: resend on the next socket
            for ch in self._channels.values():
                ch.resyncing, ch.held = False, []
            for waiters in self._leaves.values():  # the server forgets membership anyway
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(None)
            self._leaves.clear()
        self.last_close_code = listener.close_code
        return listener.close_code

    async def _new_token_after(self, code: int) -> bool:
        """After 4001/4003: True when a token other than the refused one is available."""
        refused = self._token
        self._cancel_timer("_refresh_timer")
        if self._token_refresh is not None:
            with contextlib.suppress(Exception):
                fresh = await self._call_token_refresh()
                if fresh and fresh != refused:
                    self._token = fresh
                    return True
        return False

    async def _call_token_refresh(self) -> str | None:
        assert self._token_refresh is not None
        result = self._token_refresh()
        if inspect.isawaitable(result):
            result = await result
        return result if isinstance(result, str) and result else None

    def _stop(self, reason: str, code: int | None) -> None:
        if self.state == "closed":
            return
        self._closing = True
        self.last_close_code = code
        self._cancel_timer("_refresh_timer")
        self._cancel_timer("_resend_timer")
        self._cancel_timer("_stall_timer")
        error = ClientClosed(reason, code)
        for item in self._pending.values():
            if not item.future.done():
                item.future.set_exception(error)
                item.future.exception()  # retrieved: no "never retrieved" warning
        self._pending.clear()
        waiting: list[asyncio.Future[Any]] = [f for fs in self._joins.values() for f in fs]
        waiting += [f for fs in self._leaves.values() for f in fs]
        for fut in waiting:
            if not fut.done():
                fut.set_exception(error)
                fut.exception()
        self._joins.clear()
        self._leaves.clear()
        if self._opened is not None and not self._opened.done():
            self._opened.set_exception(error)
            self._opened.exception()
        self._inbox.put_nowait(None)
        self._set_state("closed")

    # -- frames in -------------------------------------------------------------------------

    def _on_frame(self, generation: int, payload: bytes) -> None:
        if generation != self._generation:
            return
        try:
            msg = json.loads(payload)
        except ValueError:
            log.warning("ignored a frame that is not JSON")
            return
        if not isinstance(msg, dict):
            return
        try:
            self._dispatch(msg)
        except Exception:  # a bad frame or a failing callback must not drop the socket
            log.exception("error handling %s/%s", msg.get("type"), msg.get("action"))

    def _dispatch(self, msg: dict[str, Any]) -> None:
        mtype, action = msg.get("type"), msg.get("action")
        data = msg.get("data") if isinstance(msg.get("data"), dict) else {}
        assert isinstance(data, dict)
        if mtype == "message" and action == "send":
            self._on_publication(data)
        elif mtype == "message" and action == "ack":
            self._on_ack(data)
        elif mtype == "connection" and action == "connect":
            if not self._first_frame:
                self._on_open(data)
            elif "epoch" in data:
                self._on_join_reply(data)
            else:
                self._emit(self._on_system, msg)  # presence
        elif mtype == "connection" and action == "disconnect":
            self._on_leave(msg, data)
        elif mtype == "connection" and action == "refresh":
            self._refreshing = False
            self._refresh_out = None
            self._arm_refresh()
        elif mtype == "system":
            if action == "status" and "expires_at" in data:
                self._refresh_now()
            self._emit(self._on_system, msg)
        elif mtype == "error":
            self._on_error_frame(msg)

    def _on_open(self, data: dict[str, Any]) -> None:
        self._first_frame = True
        if isinstance(data.get("client_id"), str):
            self.client_id = data["client_id"]  # keep it: it is the dedupe key
        self.user_id = data.get("user_id")
        self.attempts = 0
        self._arm_refresh()
        # every unacked publication is sent again on this socket, oldest first
        self._to_send = list(self._pending)  # ascending sequences: already a heap
        for ch in list(self._channels.values()):
            self._queue_join(ch)
        self._pump()
        self._maybe_ready()

    def _queue_join(self, ch: _Channel) -> None:
        """(Re)join `ch` on this socket when the window lets it (`_pump`)."""
        self._syncing.add(ch.name)
        if ch.name not in self._joins_out and ch.name not in self._join_queue:
            self._join_queue.append(ch.name)  # else on its way: its reply answers all waiters

    def _send_join(self, ch: _Channel) -> None:
        data: dict[str, Any] = {"channel": ch.name}
        ch.asked = ch.floor is not None
        if ch.floor is not None:
            data["since"] = ch.floor
            if ch.epoch is not None:
                data["epoch"] = ch.epoch
        ch.resyncing, ch.new_epoch, ch.held = False, False, []
        if self._send({"type": "connection", "action": "connect", "data": data}):
            self._joins_out[ch.name] = time.monotonic()

    def _on_join_reply(self, data: dict[str, Any]) -> None:
        name = data.get("channel")
        ch = self._channels.get(name) if isinstance(name, str) else None
        if ch is None:
            if isinstance(name, str):
                self._answered_join(name)  # left meanwhile
            return
        offset, epoch = int(data.get("offset") or 0), str(data.get("epoch"))
        recovered = data.get("recovered")
        if recovered is False and ch.epoch != epoch and not ch.resyncing and offset > 0:
            # The server started a new epoch (it lost its history, e.g. restarted) and has
            # published `offset` messages in it since: we saw none of them, so ask for all.
            ch.resyncing = ch.new_epoch = True
            self._send(
                {
                    "type": "connection",
                    "action": "connect",
                    "data": {"channel": ch.name, "since": 0, "epoch": epoch},
                }
            )
            return
        new_epoch = ch.new_epoch or (ch.epoch is not None and ch.epoch != epoch)
        if ch.epoch != epoch:
            ch.floor, ch.above = (0 if recovered is True else None), set()
        ch.epoch = epoch
        ch.resyncing = False
        if recovered is True:
            # the missed messages follow this reply, before any live one; what was held
            # while resyncing is among them, and is checked against them once they are in
            ch.replay_until = offset
            self._flush_held(ch)
        else:
            # nothing is replayed: deliver what was held, then continue from `offset`
            held, ch.held = ch.held, []
            if held:
                ch.floor = None
            for pub in held:
                self._deliver(ch, pub)
            ch.floor = offset if ch.floor is None else max(ch.floor, offset)
            ch.settle()
            ch.replay_until = 0
        result = JoinResult(
            ch.name, offset, epoch, recovered if ch.asked else None, new_epoch and ch.asked
        )
        ch.new_epoch = False
        self._syncing.discard(ch.name)
        for fut in self._joins.pop(ch.name, []):
            if not fut.done():
                fut.set_result(result)
        self._emit(self._on_join, result)
        self._answered_join(ch.name)
        self._maybe_ready()

    def _answered_join(self, name: str) -> None:
        """A join of this socket was answered: its place in the window is free."""
        if name in self._joins_out:
            del self._joins_out[name]
            self._window = min(self.max_in_flight, self._window + 1)
            self._pump()

    def _flush_held(self, ch: _Channel) -> None:
        if ch.held and (ch.floor or 0) >= ch.replay_until:
            held, ch.held = ch.held, []
            for pub in held:
                self._deliver(ch, pub)

    def _on_leave(self, msg: dict[str, Any], data: dict[str, Any]) -> None:
        name = data.get("channel")
        if data.get("client_id") != self.client_id or not isinstance(name, str):
            self._emit(self._on_system, msg)  # presence
            return
        if data.get("reason"):  # removed by an admin: do not rejoin
            self._channels.pop(name, None)
            self._emit(self._on_system, msg)
        self._answered_leave(name)

    def _answered_leave(self, name: str) -> None:
        """A leave of this socket was answered (or refused for good): its waiters are done,
        its place in the window is free."""
        for fut in self._leaves.pop(name, []):
            if not fut.done():
                fut.set_result(None)
        if self._leaves_out.pop(name, None) is not None:
            self._window = min(self.max_in_flight, self._window + 1)
            self._pump()

    def _on_publication(self, data: dict[str, Any]) -> None:
        name = data.get("channel")
        ch = self._channels.get(name) if isinstance(name, str) else None
        if ch is None:
            return
        if ch.resyncing:
            ch.held.append(data)
            return
        self._deliver(ch, data)
        self._flush_held(ch)

    def _deliver(self, ch: _Channel, data: dict[str, Any]) -> None:
        meta = data.get("metadata")
        if not isinstance(meta, dict):
            return
        offset, sequence = meta.get("offset"), meta.get("sequence")
        if not isinstance(offset, int) or not isinstance(sequence, int):
            return
        fresh_offset = ch.take_offset(offset)
        self._mind_gap(ch)
        key = (meta.get("user_id"), meta.get("client_id"), sequence)
        if not fresh_offset or not ch.take_key(key):
            return
        if (
            not self._echo
            and meta.get("client_id") == self.client_id
            and meta.get("user_id") == self.user_id
        ):
            return  # our own message, replayed by recovery
        message = Message(
            ch.name,
            str(data.get("content", "")),
            offset,
            sequence,
            meta.get("client_id"),
            meta.get("user_id"),
            str(meta.get("timestamp", "")),
            offset <= ch.replay_until,
        )
        if self._on_message is not None:
            self._emit(self._on_message, message)
        else:
            self._inbox.put_nowait(message)

    def _on_ack(self, data: dict[str, Any]) -> None:
        meta = data.get("metadata")
        if not isinstance(meta, dict):
            return
        item = self._pending.pop(meta.get("sequence"), None)  # type: ignore[arg-type]
        if item is None:
            return  # an ack repeated for a retry we already settled
        if item.socket == self._generation:
            self._pubs_out -= 1
            self._window = min(self.max_in_flight, self._window + 1)
        ack = Ack(item.channel, item.sequence, int(meta["offset"]), str(meta.get("timestamp")))
        ch = self._channels.get(item.channel)
        if (
            not self._echo
            and ch is not None
            and ch.floor is not None
            and not ch.resyncing
            and item.channel not in self._syncing
        ):
            # echo off: our own message never comes as a copy; its offset is not missed, so
            # the position passes it and a recovery does not ask for it. With echo on the
            # copy comes, maybe after this ack (Redis, docs/protocol.md §7) or after lower
            # offsets: it counts when it comes, so that it is not taken for a double.
            ch.take_offset(ack.offset)
            self._mind_gap(ch)
            self._flush_held(ch)
        if not item.future.done():
            item.future.set_result(ack)
        self._pump()

    def _mind_gap(self, ch: _Channel) -> None:
        """Bound the offsets kept above one that has not come (GAP_WINDOW): the server
        missed it for this socket (its Redis subscriber was lost a while, say). Join again
        with `since` (= the floor): the server replays what is missing (or answers
        `recovered: false`: the join event says so). If that join is still not answered at
        twice the bound, drop the socket: the reconnect's recovery asks again."""
        if len(ch.above) <= GAP_WINDOW or (ch.floor or 0) < ch.replay_until:
            return  # few, or a replay is coming in (it fills every gap below its end)
        if ch.name not in self._syncing and not ch.resyncing:
            log.warning(
                "channel %s: offset %s has not come; recovering", ch.name, (ch.floor or 0) + 1
            )
            self._queue_join(ch)
            self._pump()
        elif len(ch.above) > 2 * GAP_WINDOW and self._transport is not None:
            log.warning(
                "channel %s: offset %s has not come; reconnecting", ch.name, (ch.floor or 0) + 1
            )
            self.reconnect()

    def _on_error_frame(self, msg: dict[str, Any]) -> None:
        details = msg.get("details") if isinstance(msg.get("details"), dict) else {}
        assert isinstance(details, dict)
        code = str(msg.get("code"))
        error = AetherError(code, str(msg.get("message", "")), details)
        seq = details.get("sequence")
        item = self._pending.get(seq) if isinstance(seq, int) else None
        channel = details.get("channel")
        limit = details.get("limit")
        if code == "MESSAGE_TOO_LARGE" and isinstance(limit, int):
            # the error names no publication: it answers the oldest one out over the limit
            out = [p for p in self._pending.values() if p.socket == self._generation]
            item = min((p for p in out if p.size > limit), key=lambda p: p.sequence, default=None)
            channel = item.channel if item is not None else None
        if item is not None and item.channel == channel:
            if item.socket == self._generation:
                self._pubs_out -= 1
            if code in RETRYABLE_CODES:
                # sent again after the wait, before anything newer
                item.socket = 0
                heapq.heappush(self._to_send, item.sequence)
                self._hold_off(details)
                return
            del self._pending[item.sequence]
            if not item.future.done():
                item.future.set_exception(error)
            self._pump()
            return
        if (
            isinstance(channel, str)
            and channel in self._joins_out
            and code in RETRYABLE_JOIN_CODES
            and not isinstance(seq, int)
        ):
            # a join refused by a rate limit: sent again after the wait
            del self._joins_out[channel]
            if channel in self._syncing:
                self._join_queue.appendleft(channel)
            self._hold_off(details)
            return
        if isinstance(channel, str) and channel in self._leaves_out and not isinstance(seq, int):
            if code in RETRYABLE_JOIN_CODES:
                # a leave refused by a rate limit: sent again after the wait
                del self._leaves_out[channel]
                self._leave_queue.appendleft(channel)
                self._hold_off(details)
                return
            self._answered_leave(channel)  # refused for good (not a member...): done
        if code in RETRYABLE_JOIN_CODES and channel is None and seq is None:
            # a rate limit refused a frame it cannot name (a status request, a token
            # refresh, a frame over MAX_MESSAGE_BYTES...): hold off all the same, and send
            # a refresh that is still unanswered again after the wait
            if self._refresh_out is not None:
                self._control.append(_refresh_frame(self._refresh_out))
                self._hold_off(details)
                return
            self._hold_off(details)
        if (
            isinstance(channel, str)
            and channel in self._syncing
            and code not in ("RATE_LIMITED", "SERVER_BUSY")
            and (details.get("component") != "auth" or code == "AUTH_REQUIRED")
        ):
            # a refused join (CHANNEL_FULL, FORBIDDEN, ...): stop waiting for it
            self._syncing.discard(channel)
            self._answered_join(channel)
            for fut in self._joins.pop(channel, []):
                if not fut.done():
                    fut.set_exception(error)
            self._channels.pop(channel, None)  # not rejoined after a reconnect either
            self._maybe_ready()
        elif details.get("component") == "auth" and msg.get("message") == "refresh token refused":
            self._refreshing = False
            self._refresh_out = None
        self._emit(self._on_error, error)

    # -- frames out ------------------------------------------------------------------------

    def _send(self, obj: dict[str, Any]) -> int:
        """Send `obj` on this socket: the bytes of its frame, 0 when there is no socket."""
        transport = self._transport
        if transport is None or not self._first_frame:
            return 0
        payload = json.dumps(obj, separators=(",", ":")).encode()
        deflate = self.deflate
        if deflate is not None and len(payload) >= self.compress_min_bytes:
            packed = _compress(payload, deflate.client_max_window_bits)
            if packed is not None and len(packed) < len(payload):
                transport.send(WSMsgType.TEXT, packed, rsv1=True)
                return len(payload)  # what the server's limits count
        transport.send(WSMsgType.TEXT, payload)
        return len(payload)

    def _send_publication(self, item: _Pending) -> bool:
        action = "retry" if item.sent else "send"
        sent = self._send(
            {
                "type": "message",
                "action": action,
                "data": {
                    "channel": item.channel,
                    "content": item.content,
                    "metadata": {"sequence": item.sequence},
                },
            }
        )
        if sent:
            item.sent, item.socket, item.size = True, self._generation, sent
            item.sent_at = time.monotonic()
            self._pubs_out += 1
        return sent > 0

    def _maybe_ready(self) -> None:
        """Once every join of this socket is answered: flush the queue, in order."""
        if self._ready or not self._first_frame or self._syncing:
            return
        self._ready = True
        self._pump()
        self._set_state("open")
        if self._opened is not None and not self._opened.done():
            self._opened.set_result(None)

    def _pump(self) -> None:
        """Send what the window lets out: status requests and refreshes (no place in it),
        queued leaves and joins, then (once every join of this socket is answered) pending
        publications, oldest first; nothing while a rate limit's `retry_after_ms` runs."""
        if not self._first_frame or self._transport is None:
            return
        wait = self._paused_until - time.monotonic()
        if wait > 0:
            if self._resend_timer is None:
                self._resend_timer = asyncio.get_running_loop().call_later(wait, self._resume)
            return
        while self._control:
            self._send(self._control.popleft())
        while self._leave_queue and self._in_flight() < self._window:
            name = self._leave_queue.popleft()
            frame = {"type": "connection", "action": "disconnect", "data": {"channel": name}}
            if self._send(frame):
                self._leaves_out[name] = time.monotonic()
        while self._join_queue and self._in_flight() < self._window:
            ch = self._channels.get(self._join_queue.popleft())
            if ch is not None and ch.name in self._syncing and ch.name not in self._joins_out:
                self._send_join(ch)
        if self._ready:
            while self._to_send and self._in_flight() < self._window:
                item = self._pending.get(heapq.heappop(self._to_send))
                if item is None or item.socket == self._generation:
                    continue  # settled meanwhile, or already out on this socket
                if not self._send_publication(item):
                    heapq.heappush(self._to_send, item.sequence)
                    break
        if self._stall_timer is None and self._in_flight():
            self._stall_timer = asyncio.get_running_loop().call_later(
                IN_FLIGHT_TIMEOUT_S, self._unstall
            )

    def _in_flight(self) -> int:
        return len(self._joins_out) + len(self._leaves_out) + self._pubs_out

    def _unstall(self) -> None:
        """The safety net: free the places of frames unanswered for IN_FLIGHT_TIMEOUT_S."""
        self._stall_timer = None
        cutoff = time.monotonic() - IN_FLIGHT_TIMEOUT_S
        stale = 0
        for item in self._pending.values():
            if item.socket == self._generation and item.sent_at <= cutoff:
                item.socket = -1  # still awaited (a late ack settles it), resent next socket
                self._pubs_out -= 1
                stale += 1
        for name in [n for n, at in self._joins_out.items() if at <= cutoff]:
            del self._joins_out[name]
            if name in self._syncing:
                self._join_queue.append(name)
            stale += 1
        for name in [n for n, at in self._leaves_out.items() if at <= cutoff]:
            del self._leaves_out[name]
            self._leave_queue.append(name)
            stale += 1
        if stale:
            log.warning(
                "%d frames unanswered for %.0f s: their places freed", stale, IN_FLIGHT_TIMEOUT_S
            )
            self._window = min(self.max_in_flight, self._window + stale)
        self._pump()

    def _send_control(self, frame: dict[str, Any]) -> None:
        """A frame that takes no place in the window, sent once no pause runs."""
        self._control.append(frame)
        self._pump()

    def _send_refresh(self, token: str) -> bool:
        """Refresh this socket's token (sent again if a rate limit refuses it); False
        when there is no socket (the token is used at the next connect)."""
        if not self._first_frame or self._transport is None:
            return False
        self._refresh_out = token
        self._send_control(_refresh_frame(token))
        return True

    def _resume(self) -> None:
        self._resend_timer = None
        self._pump()

    def _hold_off(self, details: dict[str, Any]) -> None:
        """A rate limit refused a frame: send nothing for `retry_after_ms`, then one frame
        at a time, the window growing by one per answer."""
        wait_ms = details.get("retry_after_ms")
        delay = (wait_ms if isinstance(wait_ms, int) and wait_ms >= 0 else 1000) / 1000.0
        self._paused_until = max(self._paused_until, time.monotonic() + delay)
        self._window = 1
        self._pump()

    # -- token refresh ---------------------------------------------------------------------

    def _arm_refresh(self) -> None:
        self._cancel_timer("_refresh_timer")
        if self._token_refresh is None or not self._token:
            return
        exp = token_expiry(self._token)
        if exp is None:
            return
        left = exp - time.time()
        delay = max(0.0, left - min(self.refresh_before_s, left / 2))
        self._refresh_timer = asyncio.get_running_loop().call_later(delay, self._refresh_now)

    def _refresh_now(self) -> None:
        if self._token_refresh is None or self._refreshing or self._closing:
            return
        self._refreshing = True
        task = asyncio.get_running_loop().create_task(self._refresh())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self) -> None:
        try:
            fresh = await self._call_token_refresh()
        except Exception as exc:
            self._refreshing = False
            self._emit(self._on_error, AetherError("REFRESH_FAILED", repr(exc)))
            return
        if not fresh or fresh == self._token:
            self._refreshing = False
            return
        self._token = fresh
        if not self._send_refresh(fresh):
            self._refreshing = False  # used at the next connect

    # -- helpers ---------------------------------------------------------------------------

    def _cancel_timer(self, name: str) -> None:
        timer: asyncio.TimerHandle | None = getattr(self, name)
        if timer is not None:
            timer.cancel()
            setattr(self, name, None)

    def _set_state(self, state: State) -> None:
        if state != self.state:
            self.state = state
            self._emit(self._on_state, state)

    def _emit(self, callback: Callable[[Any], object] | None, value: Any) -> None:
        if callback is None:
            return
        try:
            result = callback(value)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except Exception:
            log.exception("callback %r failed", callback)


def _compress(payload: bytes, window_bits: int) -> bytes | None:
    """`payload` as one permessage-deflate message: raw deflate with a fresh compressor (no
    context kept between messages), flushed, its 00 00 ff ff tail removed. None for a
    window of 8 bits: zlib's raw deflate uses 9 for it, more than the server allowed."""
    if window_bits < 9:
        return None
    compressor = zlib.compressobj(6, zlib.DEFLATED, -window_bits)
    out = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return out[:-4] if out.endswith(DEFLATE_TAIL) else None


def _refresh_frame(token: str) -> dict[str, Any]:
    return {"type": "connection", "action": "refresh", "data": {"token": token}}


def token_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, read without verifying it (the server does that)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, (int, float)) else None


def new_client_id() -> str:
    """A random client id (kept across reconnects by the client that uses it)."""
    return uuid.uuid4().hex[:16]
