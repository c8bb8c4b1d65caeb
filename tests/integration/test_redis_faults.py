"""Redis goes away mid-traffic and comes back (docs/operations.md §14): two machines keep their
members connected, say `degraded` with the reason on /health and /ws/status, refuse what cannot be
made durable with an error instead of a false ack, reconnect by themselves with backoff,
and serve fan-out again to the members that stayed (their subscriptions restored).

Each test stops the session's redis-server and starts it again on the same port; the
servers log the outage at error level, which these tests expect (`allow_errors`).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest

from tests.conftest import Server
from tests.integration.cluster_helpers import (
    messages,
    only_expected_errors,
    pub_members_late,
    start_pair,
    status,
)
from tests.integration.helpers import expect, expect_error, joined, wait_for
from tests.integration.redis_fixture import RedisServer
from tests.integration.wsclient import Client

Pair = tuple[Server, Server]

#: How long Redis stays down in the outage test, from the moment it stops. Long enough for
#: the reconnect backoff to outgrow the once-a-second heartbeat (0.1 + 0.2 + ... s): a server
#: that says "healthy" again before its subscriber is back would lose the next publication.
OUTAGE_S = 4.0


@pytest.fixture
def outage_pair(
    make_server: Callable[..., Server], redis_url: str, redis_server: RedisServer
) -> Iterator[Pair]:
    common = {"BROKER_URL": redis_url, "RATE_LIMIT_MESSAGES": "100000"}
    a, b = start_pair(make_server, "fault-a", "fault-b", **common)
    # stopping Redis is logged at error level (broker_degraded): expected here
    a.allow_errors = b.allow_errors = True
    try:
        yield a, b
    finally:
        if not redis_server.running:  # a failed test must not leave Redis down
            redis_server.start()


def health(srv: Server) -> tuple[int, dict[str, Any]]:
    code, body, _ = srv.http("GET", "/health")
    assert isinstance(body, dict), body
    return code, body


def degraded(srv: Server) -> dict[str, Any] | None:
    code, body = health(srv)
    if code == 503 and body.get("status") == "degraded":
        return body
    return None


def healthy(srv: Server) -> bool:
    code, body = health(srv)
    return code == 200 and body.get("status") == "healthy"


def ask_status(c: Client) -> dict[str, Any]:
    """A round trip over the WebSocket: the connection is alive and served."""
    c.send({"type": "system", "action": "status", "data": {}})
    return expect(c, "system", "status")


def test_redis_outage_degrades_then_recovers_by_itself(
    outage_pair: Pair, redis_server: RedisServer
) -> None:
    a, b = outage_pair
    ch = "f.ch"
    with pub_members_late(a, b, ch, late_on=a) as (pub, ma, mb, late):
        pub.publish(ch, "before")
        expect(pub, "message", "ack")
        for m in (ma, mb):
            assert messages(m, 1)[0]["data"]["content"] == "before"

        # Redis dies in the middle of a stream of publishes. The first half is sent and acked
        # while Redis runs; then Redis is frozen (SIGSTOP: it reads nothing more), the second
        # half is sent, and Redis is killed under it. Every publish is answered, with an ack
        # (the first half, offsets following the sending order) or an error (the second
        # half, which Redis never processed), never silence and never a false ack.
        half = 30
        first_half = [pub.publish(ch, f"burst {i}") for i in range(half)]
        acked: dict[int, int] = {}  # sequence -> offset
        contents: dict[int, str] = {}  # offset -> content
        for i, seq in enumerate(first_half):
            meta = expect(pub, "message", "ack")["data"]["metadata"]
            assert meta["sequence"] == seq, meta
            acked[seq] = meta["offset"]
            contents[meta["offset"]] = f"burst {i}"
        assert list(acked.values()) == list(range(2, 2 + half)), acked
        assert redis_server.proc is not None
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            second_half = [pub.publish(ch, f"burst {half + i}") for i in range(half)]
        finally:
            redis_server.stop(signal.SIGKILL)  # SIGKILL ends a stopped process too
        stopped = time.monotonic()
        refused = []
        for _ in second_half:
            msg = expect_error(pub, "INTERNAL_ERROR", timeout=15.0)
            assert msg["details"]["component"] == "broker", msg
            refused.append(msg["details"]["sequence"])
        assert sorted(refused) == second_half, refused  # exactly one answer each
        # the members got exactly the acked publications, in order, once each (what they
        # get next, below, is the retry after the outage: nothing refused slipped through)
        for m in (ma, mb):
            got = messages(m, half)
            assert [g["data"]["metadata"]["offset"] for g in got] == sorted(contents), got
            assert [g["data"]["content"] for g in got] == [contents[o] for o in sorted(contents)]

        # public routes give a reason code; the error itself (Redis's host and port) is
        # only in the log, once per change, not once per request
        where = f":{redis_server.port}"
        for srv in (a, b):
            body = wait_for(partial(degraded, srv), timeout=5.0, interval=0.05)
            assert body == {"status": "degraded", "reason": "broker_unavailable"}, body
            st = status(srv)
            assert st["status"] == "degraded", st
            assert st["reason"] == "broker_unavailable", st
            assert where not in json.dumps(st) and "redis:" not in json.dumps(st), st
            for _ in range(5):
                assert degraded(srv) is not None
            logged = [o for o in srv.log_lines() if o.get("event") == "broker_degraded"]
            assert logged and all(
                o["data"]["details"]["reason"].startswith("redis: ") for o in logged
            )
            assert len(logged) < 10, logged  # per change of the error, not per request

        # every member is still connected and served
        for c in (pub, ma, mb, late):
            ask_status(c)

        # a publish that cannot be made durable is refused, not acked, and not delivered
        seq = pub.publish(ch, "during the outage")
        err = expect_error(pub, "INTERNAL_ERROR")
        assert err["details"]["component"] == "broker", err
        assert err["details"]["channel"] == ch and err["details"]["sequence"] == seq, err
        pub.nothing(0.3)
        ma.nothing(0.1)
        mb.nothing(0.1)

        # so is a join that needs Redis (its position cannot be read)
        late.join("f.late")
        err = expect_error(late, "INTERNAL_ERROR")
        assert err["details"]["channel"] == "f.late", err
        assert err["details"]["reason"] == "broker_unavailable", err

        time.sleep(max(0.0, stopped + OUTAGE_S - time.monotonic()))
        redis_server.start()

        # each server reconnects by itself
        for srv in (a, b):
            wait_for(partial(healthy, srv), timeout=15.0, interval=0.05)
            assert status(srv)["status"] == "healthy"

        # the refused message is sent again and reaches the members that stayed connected,
        # on both machines (the subscriptions were restored), exactly once
        pub.publish(ch, "after the outage", sequence=seq, action="retry")
        ack = expect(pub, "message", "ack")["data"]["metadata"]
        assert ack["sequence"] == seq
        for m in (ma, mb):
            got = messages(m, 1)
            assert got[0]["data"]["content"] == "after the outage"
            assert got[0]["data"]["metadata"]["offset"] == ack["offset"]
            m.nothing(0.2)
        pub.nothing(0.1)

        # publishing from machine B works as well
        mb.publish(ch, "from b")
        expect(mb, "message", "ack")
        assert messages(ma, 1)[0]["data"]["content"] == "from b"
        assert messages(pub, 1)[0]["data"]["content"] == "from b"

        # the channel whose join failed during the outage can be joined now
        late.join("f.late")
        assert joined(late, "f.late")["offset"] == 0
        with Client(b.ws_url, token=b.token("other"), channel="f.late") as other:
            joined(other, "f.late")
            other.publish("f.late", "hello late")
            expect(other, "message", "ack")
            assert messages(late, 1)[0]["data"]["content"] == "hello late"
    for srv in (a, b):
        only_expected_errors(srv, "broker_degraded")


def test_channel_admin_during_an_outage_is_refused_with_503(
    outage_pair: Pair, redis_server: RedisServer
) -> None:
    a, _ = outage_pair
    redis_server.stop()
    wait_for(lambda: degraded(a), timeout=5.0, interval=0.05)
    cfg = {"name": "f.admin", "max_connections": 0, "message_rate_limit": 0}
    code, body, _ = a.http("POST", "/ws/channels", cfg, token=a.admin())
    assert code == 503, (code, body)  # the broker is not available: not a server bug (500)
    assert body["details"]["component"] == "broker", body
    redis_server.start()
    wait_for(lambda: healthy(a), timeout=15.0, interval=0.05)
    code, body, _ = a.http("POST", "/ws/channels", cfg, token=a.admin())
    assert code == 201, body


def test_a_hung_redis_fails_publishes_instead_of_leaving_them_waiting(
    outage_pair: Pair, redis_server: RedisServer
) -> None:
    """Redis stops answering without closing anything (SIGSTOP): a publish waiting on it is
    answered with an error once the command connection has been silent for STALL_S (5 s),
    and the server serves again once Redis wakes up."""
    a, _ = outage_pair
    ch = "f.hang"
    assert redis_server.proc is not None
    with Client(a.ws_url, token=a.token("hang"), channel=ch) as pub:
        joined(pub, ch)
        pub.publish(ch, "before")
        expect(pub, "message", "ack")
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            seq = pub.publish(ch, "while Redis hangs")
            err = expect_error(pub, "INTERNAL_ERROR", timeout=15.0)
            assert time.monotonic() - started < 12.0
            assert err["details"]["component"] == "broker", err
            assert err["details"]["sequence"] == seq, err
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: healthy(a), timeout=15.0, interval=0.05)
        pub.publish(ch, "after", sequence=seq, action="retry")
        ack = expect(pub, "message", "ack")["data"]["metadata"]
        assert ack["sequence"] == seq
