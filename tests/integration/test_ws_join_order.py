"""docs/protocol.md §2: what a client sends after a join is answered after the join's reply.

A client that sends `connection/connect` and at once `message/send` to that channel
(pipelined, before the reply) gets the reply first, then its own publication (`echo=1`) and
the ack, nothing lost: with Redis the join waits for Redis (SUBSCRIBE, then the channel's
position), and what the client sends meanwhile is held (`Session.hold_messages`) until the
joins then waiting are answered. Without the hold, the publication reached Redis before the
join read the position: the ack came before the reply, and the copy, at or below that
position, was dropped as already "seen". Redis is made slow for real (`CLIENT PAUSE`, as in
test_ws_first_frame.py) so that the join surely waits.

Also: several joins pipelined with publications between them (held messages are served
between the joins; joins right behind a join start with it and hold nothing), the bound on
what is held (1008), a join that fails (Redis stopped: every held message still gets its
answer, in order), the memory broker's order (nothing held), and a client that paces
through a window of 8 as the bundled clients do, so that a join of it is always waiting:
what it sends is served between the joins, and it is never closed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.conftest import Server
from tests.integration import test_ws_first_frame as first_frame
from tests.integration.cluster_helpers import only_expected_errors
from tests.integration.helpers import join_msg, send_msg, wait_for
from tests.integration.rawhttp import RawConn
from tests.integration.redis_fixture import RedisServer
from tests.integration.test_ws_first_frame import (
    HELD_MESSAGES,
    Setup,
    close_code,
    kind,
    next_json,
    own_publications,
    pipelined,
    quiet,
    status_request,
    text,
    welcome,
)

#: the same fixture as test_ws_first_frame.py's: a server with the memory broker, then Redis
setup = first_frame.setup


def connected(srv: Server, user: str) -> RawConn:
    """A connection with echo=1 and no URL channel, its welcome read."""
    conn = pipelined(srv, {"token": srv.token(user), "client_id": user, "echo": "1"}, [])
    welcome(conn, None)
    return conn


def label(msg: dict[str, Any]) -> str:
    """A frame as a short label: `join:a`, `copy:a:3` / `ack:3` (sequence), `status`, or
    the error code."""
    k = kind(msg)
    data = msg.get("data") or {}
    if k == ("connection", "connect"):
        return f"join:{data['channel']}"
    if k == ("message", "send"):
        return f"copy:{data['channel']}:{data['metadata']['sequence']}"
    if k == ("message", "ack"):
        return f"ack:{data['metadata']['sequence']}"
    if k == ("system", "status"):
        return "status"
    return k[1]


# -- a join, then at once a publication ------------------------------------------------------


def test_publication_right_after_a_join_comes_after_its_reply(setup: Setup) -> None:
    """The reply (offset 0), then the own copy (offset 1) and the ack: nothing lost."""
    srv = setup.srv
    with connected(srv, "late") as c:
        setup.slow_broker()
        c.send(text(join_msg("late.a")) + text(send_msg("late.a", "mine", 1)))
        reply = next_json(c)
        assert label(reply) == "join:late.a", reply
        assert reply["data"]["offset"] == 0, reply
        own_publications(setup, c, 1, "late.a")
        quiet(c)


def test_joins_pipelined_with_publications_between_them(setup: Setup) -> None:
    """Each publication and status request comes after the reply of every join sent before
    it, and before the reply of a join sent after it that waited (held messages are served
    between the joins); nothing is lost. The memory broker answers everything at once, in
    the order sent."""
    srv = setup.srv
    frames = [
        text(join_msg("many.a")),
        text(send_msg("many.a", "a1", 1)),
        status_request(),
        text(join_msg("many.b")),
        text(join_msg("many.c")),  # right behind the join of b: starts with it
        text(send_msg("many.b", "b2", 2)),
        text(send_msg("many.c", "c3", 3)),
        text(send_msg("many.a", "a4", 4)),
        status_request(),
        text(join_msg("many.d")),
        text(send_msg("many.d", "d5", 5)),
    ]
    with connected(srv, "many") as c:
        setup.slow_broker()
        c.send(b"".join(frames))
        got = [label(next_json(c)) for _ in range(4 + 5 + 5 + 2)]
        quiet(c)
    if not setup.is_redis:
        assert got == [
            "join:many.a",
            "copy:many.a:1",
            "ack:1",
            "status",
            "join:many.b",
            "join:many.c",
            "copy:many.b:2",
            "ack:2",
            "copy:many.c:3",
            "ack:3",
            "copy:many.a:4",
            "ack:4",
            "status",
            "join:many.d",
            "copy:many.d:5",
            "ack:5",
        ], got
        return
    at = {name: got.index(name) for name in got if name != "status"}
    first, second = [i for i, name in enumerate(got) if name == "status"]
    sent_to = {1: "a", 2: "b", 3: "c", 4: "a", 5: "d"}
    for seq, ch in sent_to.items():
        assert at[f"join:many.{ch}"] < at[f"ack:{seq}"], got
        assert at[f"join:many.{ch}"] < at[f"copy:many.{ch}:{seq}"], got
    assert [name for name in got if name.startswith("ack:")] == [f"ack:{i}" for i in range(1, 6)]
    assert at["join:many.a"] < first < min(at["join:many.b"], at["join:many.c"]), got
    assert max(at["join:many.b"], at["join:many.c"]) < second < at["join:many.d"], got


def test_joins_back_to_back_are_not_held(setup: Setup) -> None:
    """More joins than the bound, pipelined with nothing between them, all start at once
    (none is held, no 1008); the publication behind them waits for all of them."""
    srv = setup.srv
    n = HELD_MESSAGES + 16
    names = [f"row.{i}" for i in range(n)]
    with connected(srv, "row") as c:
        setup.slow_broker()
        c.send(b"".join(text(join_msg(name)) for name in names) + text(send_msg("row.0", "x", 1)))
        replies = [label(next_json(c)) for _ in range(n)]
        assert sorted(replies) == sorted(f"join:{name}" for name in names), replies
        if not setup.is_redis:
            assert replies == [f"join:{name}" for name in names]
        own_publications(setup, c, 1, "row.0")
        quiet(c)


def test_a_join_sent_with_the_upgrade_waits_for_the_welcome(setup: Setup) -> None:
    """No join starts beside the initial one (the URL `channel`'s): the welcome is the first
    frame even when the other join would be answered sooner (its channel is already
    subscribed on this worker, so with Redis it needs one round trip where the welcome
    needs two)."""
    srv = setup.srv
    with connected(srv, "known") as first:
        first.send(text(join_msg("early.known")))
        assert label(next_json(first)) == "join:early.known"
        setup.slow_broker()
        frames = [text(join_msg("early.known")), text(send_msg("early.known", "k", 1))]
        query = {"token": srv.token("early"), "client_id": "early", "channel": "early.url"}
        with pipelined(srv, {**query, "echo": "1"}, frames) as c:
            welcome(c, "early.url")
            assert label(next_json(c)) == "join:early.known"
            own_publications(setup, c, 1, "early.known")
            quiet(c)
        assert label(next_json(first)) == "copy:early.known:1"


# -- the bound ---------------------------------------------------------------------------------


def test_messages_held_behind_a_join_past_the_bound_close_1008(setup: Setup) -> None:
    """HELD_MESSAGES publications behind a join that waits are held and answered; one more
    closes the connection with 1008, logged `hold_limit_close`. The memory broker holds
    nothing: all are answered."""
    srv = setup.srv
    n = HELD_MESSAGES

    def burst(channel: str, count: int) -> bytes:
        sends = (text(send_msg(channel, "m", i)) for i in range(1, count + 1))
        return text(join_msg(channel)) + b"".join(sends)

    with connected(srv, "fits") as c:
        setup.slow_broker()
        c.send(burst("bound.fits", n))
        assert label(next_json(c)) == "join:bound.fits"
        own_publications(setup, c, n, "bound.fits")
        quiet(c)
    with connected(srv, "over") as c:
        setup.slow_broker()
        c.send(burst("bound.over", n + 1))
        if setup.is_redis:
            assert close_code(c) == 1008
        else:
            assert label(next_json(c)) == "join:bound.over"
            own_publications(setup, c, n + 1, "bound.over")
            quiet(c)
    setup.settle()
    closes = [o for o in srv.log_lines() if o.get("event") == "hold_limit_close"]
    assert [o["data"]["details"]["user_id"] for o in closes] == (
        ["over"] if setup.is_redis else []
    ), closes


# -- a join that fails ---------------------------------------------------------------------------


def test_held_messages_are_answered_in_order_when_joins_fail(
    make_server: Callable[..., Server], redis_url: str, redis_server: RedisServer
) -> None:
    """Redis is down: each join gets INTERNAL_ERROR, and what was held behind it what it
    would get without the membership, in the order sent; the connection stays open."""
    srv = make_server(BROKER_URL=redis_url, RATE_LIMIT_MESSAGES="100000")
    srv.allow_errors = True  # the outage is logged at error level (broker_degraded)
    frames = [
        text(join_msg("down.a")),
        text(send_msg("down.a", "lost", 1)),
        status_request(),
        text(join_msg("down.b")),
        text(send_msg("down.b", "lost", 2)),
    ]
    try:
        with connected(srv, "down") as c:
            redis_server.stop()
            wait_for(lambda: srv.http("GET", "/health")[0] == 503, timeout=10.0)
            c.send(b"".join(frames))
            got = [next_json(c) for _ in range(5)]
            assert [label(m) for m in got] == [
                "INTERNAL_ERROR",
                "NOT_A_MEMBER",
                "status",
                "INTERNAL_ERROR",
                "NOT_A_MEMBER",
            ], got
            assert [m["details"]["channel"] for m in got if m["type"] == "error"] == [
                "down.a",
                "down.a",
                "down.b",
                "down.b",
            ], got
            assert got[0]["details"]["reason"] == "broker_unavailable", got
            assert [got[1]["details"]["sequence"], got[4]["details"]["sequence"]] == [1, 2]
            quiet(c)
    finally:
        if not redis_server.running:
            redis_server.start()
    only_expected_errors(srv, "broker_degraded")


# -- a client that paces through a window: always a join waiting ----------------------------------


def test_a_client_pacing_through_a_window_always_has_a_join_waiting(setup: Setup) -> None:
    """A client that keeps 8 frames unanswered, as the bundled ones do, joins 40 channels
    and publishes to each right behind its join: a join of it is always waiting, and what
    is held behind one is served once the joins then waiting are answered, not when none is
    (which never comes). Every join reply comes before that channel's ack and own copy,
    nothing is lost, and the connection is never closed (no 1008)."""
    srv = setup.srv
    n = 40
    todo = [
        frame
        for i in range(n)
        for frame in (text(join_msg(f"win.{i}")), text(send_msg(f"win.{i}", f"m{i}", i + 1)))
    ]
    got: list[str] = []
    with connected(srv, "win") as c:
        setup.slow_broker()
        in_flight = 0
        while todo or in_flight:
            while todo and in_flight < 8:
                c.send(todo.pop(0))
                in_flight += 1
            name = label(next_json(c))
            got.append(name)
            if not name.startswith("copy:"):
                in_flight -= 1  # a join reply or an ack (an error would fail below)
        copies = sum(1 for name in got if name.startswith("copy:"))
        while copies < n:  # with Redis a copy may come after its ack
            name = label(next_json(c))
            got.append(name)
            copies += name.startswith("copy:")
        quiet(c)
    assert sorted(got) == sorted(
        name
        for i in range(n)
        for name in (f"join:win.{i}", f"ack:{i + 1}", f"copy:win.{i}:{i + 1}")
    ), got
    for i in range(n):
        assert got.index(f"join:win.{i}") < got.index(f"ack:{i + 1}"), got
        assert got.index(f"join:win.{i}") < got.index(f"copy:win.{i}:{i + 1}"), got
    assert not [o for o in srv.log_lines() if o.get("event") == "hold_limit_close"]
