"""Micro benchmarks of the compiled hot path, in-process, with null transports.

Run with `pytest bench/micro` (`make bench-micro`); `make test` does not collect them (its
testpaths is `tests`). Sessions are real `aether_fast._core.Session` objects connected to
picows `WSTransport`s whose underlying transport drops every write (`NullTransport`, shared
with the unit tests in tests/unit/support.py), so `Hub.flush` runs its real code without a
socket; the Hub's own loop is a stand-in that only records the flush it is asked to
schedule (the benchmark calls `Hub.flush` itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from picows import WSMsgType, WSTransport
from picows.picows import _make_test_ws_frame

from aether_fast._core import (
    Budget,
    Channel,
    Connection,
    Hub,
    RateBucket,
    Session,
    encode_publication,
    monotonic,
    utc_timestamp,
)
from aether_fast.auth import Authenticator, Claims, mint_token
from aether_fast.brokers.memory import MemoryBroker
from aether_fast.config import load_config
from aether_fast.stores.base import default_channel_config
from tests.unit import support
from tests.unit.support import NullTransport

SECRET = "micro-secret-micro-secret-micro-secret-0123"
CONTENT = "M" + "0" * 20 + "x" * 64  # the load generator's content: tag, send time, padding
MEMBERS = 1000


class StubLoop:
    """The Hub's loop: `call_soon` only (the flush it schedules); benchmarks flush themselves."""

    def call_soon(self, callback: Callable[[], Any], *args: Any) -> None:
        return None

    def call_later(self, delay: float, callback: Callable[[], Any], *args: Any) -> None:
        return None


class StubNode:
    """What a Session asks of the Node (events.SessionEvents) on open, close and
    non-publish messages: nothing."""

    def on_open(self, session: Session) -> None:
        return None

    def on_close(self, session: Session) -> None:
        return None

    def on_control(self, session: Session, mtype: Any, action: Any, data: Any) -> None:
        return None

    def security_event(self, session: Connection, event: str, reason: str) -> None:
        return None


class StubBroker:
    """Accepts every publication without fan-out: isolates decode + validate + ack."""

    def __init__(self) -> None:
        self.result = (1, utc_timestamp(), False)

    def publish(self, channel: Any, sender: Any, sequence: int, content: str) -> tuple[Any, ...]:
        return self.result


@pytest.fixture(scope="module")
def real_loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def make_hub(broker: Any = None) -> Hub:
    hub = support.make_hub(StubLoop())
    hub.node = StubNode()
    hub.broker = broker if broker is not None else StubBroker()  # type: ignore[assignment]
    return hub


def connect(
    hub: Hub, loop: asyncio.AbstractEventLoop, user: str, sock: socket.socket | None = None
) -> tuple[Session, WSTransport]:
    """A Session connected to a WSTransport over a NullTransport, as after the handshake."""
    session = Session(hub, f"c-{user}", Claims(user, 4e9, False, None), "127.0.0.1")
    # WSTransport's constructor is not in picows' type stubs
    null = NullTransport(sock)
    transport = WSTransport(False, null, logging.getLogger("micro"), loop)  # type: ignore[call-arg]
    session.on_ws_connected(transport)
    # the Node gives each session its user's budget at open: one that never runs out, so
    # every frame pays for the check as with RATE_LIMIT_MESSAGES > 0
    session.budget = Budget(1e18, 1.0)
    return session, transport


def channel(hub: Hub, name: str = "bench") -> Channel:
    config = load_config({"JWT_SECRET": SECRET})
    return hub.add_channel(name, default_channel_config(name, config))


def send_frame(sequence: int, channel_name: str = "bench") -> Any:
    payload = orjson.dumps(
        {
            "type": "message",
            "action": "send",
            "data": {
                "channel": channel_name,
                "content": CONTENT,
                "metadata": {"sequence": sequence},
            },
        }
    )
    return _make_test_ws_frame(WSMsgType.TEXT, payload, True, False)


def test_decode_validate_message(benchmark: Any, real_loop: asyncio.AbstractEventLoop) -> None:
    """One message/send frame through Session.on_ws_frame: orjson decode, field validation,
    membership and rate checks, a stub broker, the ack encoded and queued (the flush is not
    timed)."""
    benchmark.extra_info["what"] = "frame in: decode, validate, rate check, ack queued (stub)"
    hub = make_hub()
    ch = channel(hub)
    session, transport = connect(hub, real_loop, "alice")
    hub.join(session, ch)
    frame = send_frame(1)
    on_frame = session.on_ws_frame

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        hub.flush()  # the previous ack leaves, outside the timing
        return (transport, frame), {}

    benchmark.pedantic(on_frame, setup=setup, rounds=20000, warmup_rounds=100)
    hub.flush()
    assert hub.messages_in > 0 and hub.errors_total == 0
    null = transport.underlying_transport
    assert isinstance(null, NullTransport) and null.written > 0


def test_publish_memory_broker(benchmark: Any, real_loop: asyncio.AbstractEventLoop) -> None:
    """The whole accept path with the real MemoryBroker (offset, history, dedupe window,
    publication encoded once), to a channel whose only member is the sender (no fan-out)."""
    benchmark.extra_info["what"] = "frame in → memory broker (history on) → ack queued, 0 members"
    hub = make_hub()
    hub.broker = MemoryBroker(hub, history_ttl_s=3600, dedup_ttl_s=300)
    ch = channel(hub)
    session, transport = connect(hub, real_loop, "alice")
    hub.join(session, ch)
    sequences = itertools.count(1)

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        hub.flush()
        return (transport, send_frame(next(sequences))), {}

    on_frame = session.on_ws_frame
    benchmark.pedantic(on_frame, setup=setup, rounds=20000, warmup_rounds=100)
    assert hub.messages_published > 0 and hub.errors_total == 0


def test_encode_publication(benchmark: Any) -> None:
    """The fan-out frame of one accepted message, encoded once for every member."""
    benchmark.extra_info["what"] = "publication JSON + WebSocket header, once per message"
    ts = utc_timestamp()
    frame = benchmark(encode_publication, "bench", CONTENT, 123456, ts, 654321, "c-1", "alice")
    assert orjson.loads(frame[4:])["data"]["content"] == CONTENT


@pytest.fixture(scope="module")
def fanout_hub(real_loop: asyncio.AbstractEventLoop) -> tuple[Hub, Channel, bytes]:
    hub = make_hub()
    ch = channel(hub)
    for i in range(MEMBERS):
        session, _ = connect(hub, real_loop, f"user-{i}")
        hub.join(session, ch)
    frame = encode_publication("bench", CONTENT, 1, utc_timestamp(), 1, "c-0", "user-0")
    return hub, ch, frame


def test_fanout_1000_deliver(benchmark: Any, fanout_hub: tuple[Hub, Channel, bytes]) -> None:
    """Hub.deliver: one encoded publication appended to 1000 members' outboxes (the
    outboxes are drained between rounds, outside the timing)."""
    benchmark.extra_info["what"] = f"Hub.deliver to {MEMBERS} members (outbox append)"
    hub, ch, frame = fanout_hub
    benchmark.pedantic(
        hub.deliver, args=(ch, frame, None), setup=hub.flush, rounds=3000, warmup_rounds=50
    )
    assert ch.member_count == MEMBERS


#: a publication worth compressing: 2 KiB of chat-like text (over COMPRESSION_MIN_BYTES)
DEFLATE_CONTENT = " ".join(f"word{i % 97} of message {i}" for i in range(100))[:2048]


@pytest.fixture(scope="module")
def deflate_hub(real_loop: asyncio.AbstractEventLoop) -> tuple[Hub, Channel, bytes]:
    """1000 members that negotiated permessage-deflate (window 15) and a 2 KiB publication."""
    hub = make_hub()
    ch = channel(hub, "bench.deflate")
    for i in range(MEMBERS):
        session, _ = connect(hub, real_loop, f"user-{i}")
        session.deflate = 15
        hub.join(session, ch)
    frame = encode_publication(
        "bench.deflate", DEFLATE_CONTENT, 1, utc_timestamp(), 1, "c-0", "user-0"
    )
    return hub, ch, frame


def test_fanout_1000_deliver_deflate(
    benchmark: Any, deflate_hub: tuple[Hub, Channel, bytes]
) -> None:
    """Hub.deliver of a 2 KiB publication to 1000 deflate members: compressed once (zlib
    level 1, window 15), the one compressed frame appended to every outbox."""
    benchmark.extra_info["what"] = f"Hub.deliver, compressed once, to {MEMBERS} deflate members"
    hub, ch, frame = deflate_hub
    packed = hub.deliver(ch, frame, None, 1)
    assert packed is not None and packed.compressed == [15]
    benchmark.pedantic(
        hub.deliver, args=(ch, frame, None, 1), setup=hub.flush, rounds=3000, warmup_rounds=50
    )
    assert ch.deflate_members == MEMBERS


@pytest.fixture(scope="module")
def socket_hub(
    real_loop: asyncio.AbstractEventLoop,
) -> Iterator[tuple[Hub, Channel, bytes, list[socket.socket]]]:
    """1000 members whose transports report one end of a Unix socket pair each: a server
    that writes to the fd itself does real send()s; the other ends are drained by the test."""
    hub = make_hub()
    ch = channel(hub)
    ours: list[socket.socket] = []
    theirs: list[socket.socket] = []
    for i in range(MEMBERS):
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        ours.append(a)
        theirs.append(b)
        session, _ = connect(hub, real_loop, f"user-{i}", a)
        hub.join(session, ch)
    frame = encode_publication("bench", CONTENT, 1, utc_timestamp(), 1, "c-0", "user-0")
    yield hub, ch, frame, theirs
    for sock in ours + theirs:
        sock.close()


def test_fanout_1000_flush(
    benchmark: Any, socket_hub: tuple[Hub, Channel, bytes, list[socket.socket]]
) -> None:
    """Hub.flush after one publication to 1000 members: one write per member, to a Unix
    socket (the kernel's part included, but not loopback TCP's)."""
    benchmark.extra_info["what"] = f"Hub.flush of one publication to {MEMBERS} (Unix sockets)"
    hub, ch, frame, peers = socket_hub

    def setup() -> None:
        for peer in peers:
            with contextlib.suppress(BlockingIOError):
                peer.recv(1 << 16)
        hub.deliver(ch, frame, None)

    benchmark.pedantic(hub.flush, setup=setup, rounds=300, warmup_rounds=5)
    hub.flush()
    received = 0
    for peer in peers:
        with contextlib.suppress(BlockingIOError):
            received += len(peer.recv(1 << 16))
    assert received > 0


def test_rate_limit_check(benchmark: Any) -> None:
    """One token-bucket check and take (the same C code as the hot path)."""
    benchmark.extra_info["what"] = "RateBucket.try_take (refill + take)"
    bucket = RateBucket(1e12, 1.0, monotonic())
    now = monotonic()
    assert benchmark(bucket.try_take, now) == 0.0


@pytest.fixture(scope="module")
def auth() -> tuple[Authenticator, Any]:
    config = load_config({"JWT_SECRET": SECRET})
    return Authenticator(config), config


def test_jwt_verify(benchmark: Any, auth: tuple[Authenticator, Any]) -> None:
    """A JWT (HS256) never seen before: signature, claims, then cached."""
    benchmark.extra_info["what"] = "Authenticator.verify, a new token each round (HS256)"
    authenticator, config = auth
    rounds = 3000
    tokens = iter([mint_token(config, f"user-{i}", ttl_s=3600) for i in range(rounds + 50)])

    def setup() -> tuple[tuple[str], dict[str, Any]]:
        return (next(tokens),), {}

    benchmark.pedantic(authenticator.verify, setup=setup, rounds=rounds, warmup_rounds=50)


def test_jwt_verify_cached(benchmark: Any, auth: tuple[Authenticator, Any]) -> None:
    """The same token again: the cache hit (expiry still checked)."""
    benchmark.extra_info["what"] = "Authenticator.verify, cached token"
    authenticator, config = auth
    token = mint_token(config, "cached-user", ttl_s=3600)
    authenticator.verify(token)
    claims = benchmark(authenticator.verify, token)
    assert claims.user_id == "cached-user"
