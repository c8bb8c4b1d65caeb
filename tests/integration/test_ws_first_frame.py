"""docs/protocol.md §2: the first frame is the welcome, whatever the client sends meanwhile.

A client that joins a channel with the upgrade (`?channel=`) and sends at once — its frames in
the same TCP write as the upgrade request, before it has read anything — gets the join reply
first, then the answers to what it sent, in order: with the embedded broker (the join is
answered at once) and with Redis, where the join waits for Redis (SUBSCRIBE, then the
channel's position) and the messages are held meanwhile (`Session.hold_messages`). To make
that wait certain, Redis itself is paused (`CLIENT PAUSE`) for a few hundred milliseconds
before the upgrade: every reply of the real redis-server comes late.

Also: the bound on what is held (HELD_MESSAGES messages, HELD_MESSAGE_SIZES x
MAX_MESSAGE_BYTES bytes, ext/session.pxi; one more closes with 1008), the budget still taken
as each message comes, and an initial join that fails (Redis stopped): the held messages get
the errors they would have got after it, and nothing reaches the log as a traceback.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.conftest import Server
from tests.integration.cluster_helpers import only_expected_errors
from tests.integration.helpers import (
    Op,
    build_frame,
    send_msg,
    wait_for,
)
from tests.integration.rawhttp import RawConn, upgrade_bytes
from tests.integration.redis_fixture import RedisServer
from tests.integration.wsclient import Client

#: ext/session.pxi: HELD_MESSAGES, HELD_MESSAGE_SIZES
HELD_MESSAGES = 64
HELD_MESSAGE_SIZES = 4
#: how long Redis answers nobody, from just before the upgrade: far longer than it takes the
#: server to read the frames sent with the upgrade, so the join is still waiting for them
PAUSE_MS = 400
MAX_MESSAGE_BYTES = 4096


class Setup:
    """A server with the broker under test, and a way to make its broker slow."""

    def __init__(self, srv: Server, redis: RedisServer | None) -> None:
        self.srv = srv
        self.redis = redis

    @property
    def is_redis(self) -> bool:
        return self.redis is not None

    def slow_broker(self) -> None:
        """Redis: no client of the real redis-server is answered for PAUSE_MS from now (the
        memory broker needs nothing: its join is answered at once)."""
        if self.redis is not None:
            with self.redis.client() as r:
                r.execute_command("CLIENT", "PAUSE", PAUSE_MS, "ALL")

    def settle(self) -> None:
        """Wait until Redis has answered what the server asked before now (a connection
        closed while its join waited for a paused Redis leaves that join behind): a join's
        reply needs the subscriber and the command connection, each answered in order.
        Without it, stopping the server while Redis still holds those replies logs their
        loss (broker_degraded)."""
        if self.redis is not None:
            with Client(
                self.srv.ws_url, token=self.srv.token("settle"), channel="first.settle"
            ) as c:
                assert c.recv()["data"]["channel"] == "first.settle"


@pytest.fixture(params=["memory", "redis"])
def setup(request: pytest.FixtureRequest, make_server: Callable[..., Server]) -> Iterator[Setup]:
    env = {"RATE_LIMIT_MESSAGES": "100000", "MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES)}
    redis: RedisServer | None = None
    if request.param == "redis":
        redis = request.getfixturevalue("redis_server")
        env["BROKER_URL"] = request.getfixturevalue("redis_url")
    yield Setup(make_server(**env), redis)


def text(obj: Any) -> bytes:
    return build_frame(Op.TEXT, json.dumps(obj).encode())


def status_request() -> bytes:
    return text({"type": "system", "action": "status", "data": {}})


def pipelined(srv: Server, query: dict[str, str], frames: list[bytes]) -> RawConn:
    """The upgrade request and `frames` in one TCP write, before reading anything; then the
    101 is read."""
    conn = RawConn(srv.port)
    conn.send(upgrade_bytes("/ws?" + urlencode(query)) + b"".join(frames))
    code, _, _ = conn.read_head()
    assert code == 101, code
    return conn


def next_frame(conn: RawConn) -> tuple[int, Any]:
    """(opcode, JSON of a text frame / payload of any other)."""
    b0, payload = conn.read_ws_frame()
    assert b0 & 0x80, "server frames are not fragmented"
    op = b0 & 0x0F
    return op, (json.loads(payload) if op == Op.TEXT else payload)


def next_json(conn: RawConn) -> dict[str, Any]:
    op, msg = next_frame(conn)
    assert op == Op.TEXT, (op, msg)
    assert isinstance(msg, dict), msg
    return msg


def kind(msg: dict[str, Any]) -> tuple[str, str]:
    return str(msg["type"]), str(msg.get("action") or msg.get("code"))


def welcome(conn: RawConn, channel: str | None) -> dict[str, Any]:
    """The first frame: connection/connect for `channel`."""
    msg = next_json(conn)
    assert kind(msg) == ("connection", "connect"), msg
    assert msg["data"]["channel"] == channel, msg
    data: dict[str, Any] = msg["data"]
    return data


def quiet(conn: RawConn) -> None:
    """Nothing else is on its way: a status request's reply is the next frame."""
    conn.send(status_request())
    msg = next_json(conn)
    assert kind(msg) == ("system", "status") and "connections" in msg["data"], msg


def close_code(conn: RawConn) -> int:
    """The next frame must be the server's close frame: its code."""
    op, payload = next_frame(conn)
    assert op == Op.CLOSE, (op, payload)
    code: int = struct.unpack("!H", payload[:2])[0]
    return code


def own_publications(setup: Setup, conn: RawConn, n: int, channel: str) -> None:
    """The copies (echo=1) and acks of sequences 1..n, offsets 1..n: copy before ack with the
    memory broker (docs/protocol.md §7); with Redis the two travel apart (the copy through
    the subscriber, the ack as the script's reply) and either may come first, but the acks
    keep the order of the messages and the copies the order of the offsets."""
    got = [next_json(conn) for _ in range(2 * n)]
    assert all(kind(m) in (("message", "send"), ("message", "ack")) for m in got), got
    copies = [m["data"] for m in got if m["action"] == "send"]
    acks = [m["data"] for m in got if m["action"] == "ack"]
    assert [c["metadata"]["offset"] for c in copies] == list(range(1, n + 1)), got
    assert [c["metadata"]["sequence"] for c in copies] == list(range(1, n + 1)), got
    assert all(c["channel"] == channel for c in copies), got
    assert [(a["metadata"]["sequence"], a["metadata"]["offset"]) for a in acks] == [
        (i, i) for i in range(1, n + 1)
    ], got
    if not setup.is_redis:
        assert [m["action"] for m in got] == ["send", "ack"] * n, got


def query(srv: Server, user: str, channel: str) -> dict[str, str]:
    return {"token": srv.token(user), "client_id": user, "channel": channel, "echo": "1"}


# -- the order ---------------------------------------------------------------------------------


def test_publication_sent_with_the_upgrade_comes_after_the_welcome(setup: Setup) -> None:
    srv = setup.srv
    setup.slow_broker()
    with pipelined(
        srv, query(srv, "early", "first.early"), [text(send_msg("first.early", "hi", 1))]
    ) as c:
        assert welcome(c, "first.early")["offset"] == 0
        own_publications(setup, c, 1, "first.early")
        quiet(c)


def test_whatever_is_sent_with_the_upgrade_is_answered_after_the_welcome(setup: Setup) -> None:
    """Pings, bad and oversized messages, a status request and publications: each answered
    after the welcome, in the order sent."""
    srv = setup.srv
    ch = "first.mixed"
    frames = [
        build_frame(Op.PING, b"p1"),
        build_frame(Op.TEXT, b"not json"),
        build_frame(Op.TEXT, b"x" * (MAX_MESSAGE_BYTES + 1)),
        build_frame(Op.BINARY, b"\x00"),
        status_request(),
        *(text(send_msg(ch, f"m{i}", i)) for i in (1, 2, 3)),
    ]
    setup.slow_broker()
    with pipelined(srv, query(srv, "mixed", ch), frames) as c:
        welcome(c, ch)
        assert next_frame(c) == (0xA, b"p1")  # the pong
        assert kind(next_json(c)) == ("error", "INVALID_JSON")
        too_large = next_json(c)
        assert kind(too_large) == ("error", "MESSAGE_TOO_LARGE"), too_large
        assert too_large["details"]["limit"] == MAX_MESSAGE_BYTES, too_large
        assert kind(next_json(c)) == ("error", "INVALID_MESSAGE")
        assert kind(next_json(c)) == ("system", "status")
        own_publications(setup, c, 3, ch)
        quiet(c)


def test_the_budget_is_taken_as_held_messages_come(
    make_server: Callable[..., Server], redis_url: str, redis_server: RedisServer
) -> None:
    """RATE_LIMIT_MESSAGES=3: of five publications held during the join, three pass and two
    are refused (RATE_LIMITED, reason user, naming their sequence) after the welcome."""
    srv = make_server(BROKER_URL=redis_url, RATE_LIMIT_MESSAGES="3")
    ch = "first.budget"
    setup = Setup(srv, redis_server)
    setup.slow_broker()
    frames = [text(send_msg(ch, f"m{i}", i)) for i in range(1, 6)]
    with pipelined(srv, query(srv, "budget", ch), frames) as c:
        welcome(c, ch)
        got = [next_json(c) for _ in range(8)]
        refused = [m for m in got if m["type"] == "error"]
        assert [(m["code"], m["details"]["reason"], m["details"]["sequence"]) for m in refused] == [
            ("RATE_LIMITED", "user", 4),
            ("RATE_LIMITED", "user", 5),
        ], got
        acks = [m["data"]["metadata"]["sequence"] for m in got if kind(m) == ("message", "ack")]
        assert acks == [1, 2, 3], got
        copies = [m for m in got if kind(m) == ("message", "send")]
        assert [m["data"]["metadata"]["offset"] for m in copies] == [1, 2, 3], got


# -- the bound ---------------------------------------------------------------------------------


def sends(channel: str, n: int, content: str = "m") -> list[bytes]:
    """Publications of sequences 1..n to `channel`, each a frame."""
    return [text(send_msg(channel, content, i)) for i in range(1, n + 1)]


def send_held(setup: Setup, user: str, channel: str, frames: list[bytes], *, over: bool) -> None:
    """`frames`, the publications of sequences 1..len(frames) to `channel`, sent with the
    upgrade while the broker is slow. Within the bound (not `over`), and always with the
    memory broker (it holds nothing: its join is answered at once), each is answered after
    the welcome; past it (`over`), Redis closes with 1008 before anything else is sent."""
    srv = setup.srv
    setup.slow_broker()
    with pipelined(srv, query(srv, user, channel), frames) as c:
        if over and setup.is_redis:
            assert close_code(c) == 1008
        else:
            welcome(c, channel)
            own_publications(setup, c, len(frames), channel)
            quiet(c)


def test_messages_past_the_bound_close_1008_when_held(setup: Setup) -> None:
    """HELD_MESSAGES messages are held and answered; one more closes the connection with
    1008 (docs/protocol.md §12) before anything else is sent, logged `hold_limit_close`.
    The memory broker holds nothing (its join is answered at once): all are answered."""
    srv = setup.srv
    n = HELD_MESSAGES
    send_held(setup, "fits", "first.fits", sends("first.fits", n), over=False)
    send_held(setup, "over", "first.over", sends("first.over", n + 1), over=True)
    setup.settle()
    closes = [o for o in srv.log_lines() if o.get("event") == "hold_limit_close"]
    assert [o["data"]["details"]["user_id"] for o in closes] == (
        ["over"] if setup.is_redis else []
    ), closes


def test_bytes_past_the_bound_close_1008_when_held(setup: Setup) -> None:
    """HELD_MESSAGE_SIZES x MAX_MESSAGE_BYTES of messages are held; past it, 1008."""

    def big(channel: str, n: int) -> list[bytes]:
        """n messages of MAX_MESSAGE_BYTES each: HELD_MESSAGE_SIZES of them fill the room."""
        envelope = len(json.dumps(send_msg(channel, "", 1)).encode())
        frames = sends(channel, n, "y" * (MAX_MESSAGE_BYTES - envelope))
        assert len(frames[0]) - 6 - 2 == MAX_MESSAGE_BYTES  # header 2 + 2 (length), mask 4
        return frames

    fitting = big("first.bytes", HELD_MESSAGE_SIZES)
    send_held(setup, "bytes-fit", "first.bytes", fitting, over=False)
    one_more = [
        *big("first.bytes2", HELD_MESSAGE_SIZES),
        text(send_msg("first.bytes2", "", HELD_MESSAGE_SIZES + 1)),
    ]
    send_held(setup, "bytes-over", "first.bytes2", one_more, over=True)
    setup.settle()


# -- a join that fails ---------------------------------------------------------------------------


def test_held_messages_get_their_errors_when_the_initial_join_fails(
    make_server: Callable[..., Server], redis_url: str, redis_server: RedisServer
) -> None:
    """Redis is down: the URL channel cannot be joined. The connection stays open; its first
    frame is the welcome of no channel, then INTERNAL_ERROR for the channel, then what the
    messages held meanwhile would get without the membership (NOT_A_MEMBER), in order."""
    srv = make_server(BROKER_URL=redis_url, RATE_LIMIT_MESSAGES="100000")
    srv.allow_errors = True  # the outage is logged at error level (broker_degraded)
    ch = "first.down"
    try:
        redis_server.stop()
        wait_for(lambda: srv.http("GET", "/health")[0] == 503, timeout=10.0)
        frames = [text(send_msg(ch, "lost", 1)), status_request(), text(send_msg(ch, "x", 2))]
        with pipelined(srv, query(srv, "down", ch), frames) as c:
            welcome(c, None)
            err = next_json(c)
            assert kind(err) == ("error", "INTERNAL_ERROR"), err
            assert err["details"]["channel"] == ch, err
            assert err["details"]["reason"] == "broker_unavailable", err
            first = next_json(c)
            assert kind(first) == ("error", "NOT_A_MEMBER"), first
            assert first["details"]["sequence"] == 1, first
            assert kind(next_json(c)) == ("system", "status")
            second = next_json(c)
            assert kind(second) == ("error", "NOT_A_MEMBER"), second
            assert second["details"]["sequence"] == 2, second
            quiet(c)
    finally:
        if not redis_server.running:
            redis_server.start()
    only_expected_errors(srv, "broker_degraded")
