"""Two machines sharing one Redis (docs/operations.md §14): two server processes on two ports
with the same BROKER_URL and JWT secret and different NODE_IDs.

Fan-out exactly once and in offset order across them, echo, recovery on the other machine
and after a flushed Redis, idempotent retry across machines, channel configs and deletes
that apply everywhere, and the cluster-wide limits (RATE_LIMIT_CONNECTIONS, a channel's
max_connections), which are only as fresh as the cluster table: those are polled.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from tests.conftest import Server
from tests.integration.cluster_helpers import (
    first_answer,
    messages,
    reader_leaves_after_five,
    refused_eventually,
    start_pair,
    status,
    wait_cluster,
    wait_status,
)
from tests.integration.helpers import drain, expect, expect_error, joined, wait_for
from tests.integration.redis_fixture import RedisServer, db_of
from tests.integration.wsclient import Client

Pair = tuple[Server, Server]


def machines(make_server: Callable[..., Server], redis_url: str, **env: str) -> Pair:
    """Machine A and machine B. The message rate limit is lifted: the bulk test publishes
    hundreds of messages from one connection."""
    common = {"BROKER_URL": redis_url, "RATE_LIMIT_MESSAGES": "100000", **env}
    return start_pair(make_server, "node-a", "node-b", **common)


@pytest.fixture
def pair(make_server: Callable[..., Server], redis_url: str) -> Pair:
    return machines(make_server, redis_url)


def acks(c: Client, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The next `n` acks; deliveries in between are not expected."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        msg = c.recv(max(0.01, deadline - time.monotonic()))
        assert (msg["type"], msg.get("action")) == ("message", "ack"), msg
        got.append(msg)
    return got


def wait_config(srv: Server, name: str, **expected: Any) -> dict[str, Any]:
    """Poll GET /ws/channels/{name} on `srv` until the config has the `expected` values."""

    def seen() -> dict[str, Any] | None:
        code, body, _ = srv.http("GET", f"/ws/channels/{name}", token=srv.admin())
        if code == 200 and all(body.get(k) == v for k, v in expected.items()):
            return dict(body)
        return None

    found: dict[str, Any] = wait_for(seen, timeout=5.0, interval=0.05)
    return found


# -- fan-out ----------------------------------------------------------------------------------


def test_fan_out_across_machines_exactly_once_in_offset_order(pair: Pair) -> None:
    a, b = pair
    ch = "cl.fan"
    n = 100  # per publisher
    with (
        Client(a.ws_url, token=a.token("pa"), client_id="pa", channel=ch) as pa,
        Client(b.ws_url, token=b.token("pb"), client_id="pb", channel=ch) as pb,
        Client(a.ws_url, token=a.token("ma"), client_id="ma", channel=ch) as ma,
        Client(b.ws_url, token=b.token("mb"), client_id="mb", channel=ch) as mb,
        Client(b.ws_url, token=b.token("eb"), client_id="eb", channel=ch, echo=1) as eb,
    ):
        for c in (pa, pb, ma, mb, eb):
            assert joined(c, ch)["offset"] == 0
        for i in range(n):
            pa.publish(ch, f"a{i}")
            pb.publish(ch, f"b{i}")

        # every member on both machines: offsets 1..2n, no gap, no duplicate, in order
        for member in (ma, mb, eb):
            got = messages(member, 2 * n)
            offsets = [m["data"]["metadata"]["offset"] for m in got]
            assert offsets == list(range(1, 2 * n + 1)), offsets
            for sender in ("pa", "pb"):
                mine = [m["data"] for m in got if m["data"]["metadata"]["client_id"] == sender]
                # one publisher's messages keep the order it sent them in
                assert [d["metadata"]["sequence"] for d in mine] == list(range(1, n + 1))
                assert [d["content"] for d in mine] == [f"{sender[1]}{i}" for i in range(n)]
            member.nothing(0.3)

        # the publishers: their acks, and the other publisher's messages, never their own
        ack_offsets: dict[str, dict[int, int]] = {}
        for p, other in ((pa, "pb"), (pb, "pa")):
            own: dict[int, int] = {}
            theirs = []
            for _ in range(2 * n):
                msg = p.recv()
                if msg["action"] == "ack":
                    own[msg["data"]["metadata"]["sequence"]] = msg["data"]["metadata"]["offset"]
                else:
                    assert (msg["type"], msg["action"]) == ("message", "send"), msg
                    theirs.append(msg["data"]["metadata"])
            assert sorted(own) == list(range(1, n + 1))
            assert [m["client_id"] for m in theirs] == [other] * n  # no copy of its own
            assert [m["offset"] for m in theirs] == sorted(m["offset"] for m in theirs)
            p.nothing(0.3)
            ack_offsets[other] = own
        every = sorted([*ack_offsets["pa"].values(), *ack_offsets["pb"].values()])
        assert every == list(range(1, 2 * n + 1))  # each publication acked once, one offset

        # echo=1 on machine B: the sender gets its ack and its own copy; the others one copy
        eb.publish(ch, "mirror")
        by_kind = {(m["type"], m["action"]): m for m in (eb.recv(), eb.recv())}
        assert set(by_kind) == {("message", "ack"), ("message", "send")}, by_kind
        assert by_kind[("message", "send")]["data"]["metadata"]["offset"] == 2 * n + 1
        for c in (pa, pb, ma, mb):
            msg = expect(c, "message", "send")
            assert msg["data"]["content"] == "mirror"
            assert msg["data"]["metadata"]["offset"] == 2 * n + 1
            c.nothing(0.2)
        eb.nothing(0.2)


def test_each_machine_only_receives_channels_its_members_joined(
    pair: Pair, redis_server: RedisServer
) -> None:
    a, b = pair
    with (
        Client(a.ws_url, token=a.token("x1"), channel="cl.only.a") as on_a,
        Client(b.ws_url, token=b.token("x2"), channel="cl.only.b") as on_b,
        Client(b.ws_url, token=b.token("x3"), channel="cl.only.a") as reader_b,
    ):
        joined(on_a)
        joined(on_b)
        joined(reader_b)
        # each machine subscribes in Redis only to the channels its members joined
        with redis_server.client() as r:
            subscribers = dict(r.pubsub_numsub("aether:pub:cl.only.a", "aether:pub:cl.only.b"))
        assert subscribers == {b"aether:pub:cl.only.a": 2, b"aether:pub:cl.only.b": 1}
        on_a.publish("cl.only.a", "for a's channel")
        expect(on_a, "message", "ack")
        assert expect(reader_b, "message", "send")["data"]["content"] == "for a's channel"
        on_b.nothing(0.3)  # a member of another channel gets nothing
        on_b.publish("cl.only.b", "for b's channel")
        expect(on_b, "message", "ack")
        on_a.nothing(0.3)
        reader_b.nothing(0.1)


# -- recovery --------------------------------------------------------------------------------


def test_recovery_on_the_other_machine_and_after_a_flushed_redis(
    pair: Pair, redis_server: RedisServer
) -> None:
    a, b = pair
    ch = "cl.rec"
    reader = {"token": a.token("reader"), "client_id": "reader-1", "channel": ch}
    with Client(a.ws_url, token=a.token("pub"), channel=ch) as pub:
        joined(pub, ch)
        epoch = reader_leaves_after_five(a.ws_url, reader, pub, ch)
        assert [m["data"]["metadata"]["offset"] for m in acks(pub, 10)] == list(range(1, 11))

        # the reader comes back on machine B with what it saw on machine A
        with Client(b.ws_url, **reader, since=5, epoch=epoch) as r:
            data = joined(r, ch)
            assert data["recovered"] is True, data
            assert data["epoch"] == epoch and data["offset"] == 10, data
            got = messages(r, 5)
            assert [m["data"]["metadata"]["offset"] for m in got] == [6, 7, 8, 9, 10]
            assert [m["data"]["content"] for m in got] == [f"m{i}" for i in range(6, 11)]
            r.nothing(0.3)
            pub.publish(ch, "live")  # live publications follow the replay, once
            assert acks(pub, 1)[0]["data"]["metadata"]["offset"] == 11
            live = expect(r, "message", "send")
            assert live["data"]["metadata"]["offset"] == 11 and live["data"]["content"] == "live"
            r.nothing(0.3)

        # Redis loses everything: the channel gets a new epoch and recovery says so
        redis_server.flushall()
        with Client(b.ws_url, **reader, since=11, epoch=epoch) as r:
            data = joined(r, ch)
            assert data["recovered"] is False, data
            assert data["epoch"] != epoch and isinstance(data["epoch"], str), data
            assert data["offset"] == 0, data
            r.nothing(0.3)  # nothing replayed
            pub.publish(ch, "after flush")
            ack = acks(pub, 1)[0]["data"]["metadata"]
            assert ack["offset"] == 1
            msg = expect(r, "message", "send")
            assert msg["data"]["metadata"]["offset"] == 1
            assert msg["data"]["content"] == "after flush"
        # and machine A, which published, agrees on the new epoch
        with Client(a.ws_url, **reader, since=0, epoch=data["epoch"]) as r:
            again = joined(r, ch)
            assert again["recovered"] is True and again["epoch"] == data["epoch"], again
            assert messages(r, 1)[0]["data"]["content"] == "after flush"


def test_publications_through_redis_are_the_documented_bytes(pair: Pair) -> None:
    """A publication that went through Redis, live and replayed from its history, is the
    text of docs/protocol.md's shape in its key order, byte for byte (what the memory
    broker sends too: tests/unit/test_core.py)."""
    a, b = pair
    ch = "cl.bytes"

    def documented(raw: str | bytes) -> None:
        msg = orjson.loads(raw)
        data, meta = msg["data"], msg["data"]["metadata"]
        shape = {
            "type": "message",
            "action": "send",
            "data": {
                "channel": data["channel"],
                "content": data["content"],
                "metadata": {
                    "sequence": meta["sequence"],
                    "timestamp": meta["timestamp"],
                    "offset": meta["offset"],
                    "client_id": meta["client_id"],
                    "user_id": meta["user_id"],
                },
            },
        }
        assert raw == orjson.dumps(shape).decode(), raw

    with (
        Client(a.ws_url, token=a.token("pub"), client_id="pub-1", channel=ch) as pub,
        Client(b.ws_url, token=b.token("live"), channel=ch) as live,
    ):
        joined(pub, ch)
        epoch = joined(live, ch)["epoch"]
        pub.publish(ch, 'quo"te é 😀')
        documented(live.ws.recv(timeout=5.0))
        with Client(b.ws_url, token=b.token("late"), channel=ch, since=0, epoch=epoch) as late:
            assert joined(late, ch)["recovered"] is True
            documented(late.ws.recv(timeout=5.0))


# -- idempotence -----------------------------------------------------------------------------


def test_retry_on_the_other_machine_is_acked_with_the_original_offset(
    pair: Pair, redis_server: RedisServer, redis_url: str
) -> None:
    a, b = pair
    ch = "cl.retry"
    with Client(b.ws_url, token=b.token("watch"), channel=ch) as watcher:
        joined(watcher, ch)
        with Client(a.ws_url, token=a.token("ret"), client_id="dup-1", channel=ch) as s:
            joined(s, ch)
            s.publish(ch, "once", sequence=7)
            first = acks(s, 1)[0]["data"]["metadata"]
            assert first["offset"] == 1 and first["sequence"] == 7
        got = expect(watcher, "message", "send")
        assert got["data"]["metadata"]["offset"] == 1
        # the window lives in Redis and expires (DEDUP_TTL_S, default 300 s)
        with redis_server.client(db_of(redis_url)) as r:
            keys = r.keys("aether:dedupe:*")
            assert keys
            assert all(0 < r.pttl(k) <= 300_000 for k in keys), keys

        # the ack was "lost": the same user and client_id retry on machine B
        with Client(b.ws_url, token=b.token("ret"), client_id="dup-1", channel=ch) as s:
            joined(s, ch)
            s.publish(ch, "once", sequence=7, action="retry")
            again = acks(s, 1)[0]["data"]["metadata"]
            assert again == first, (again, first)  # same offset, same timestamp
            s.publish(ch, "once", sequence=7)  # a plain send of it is deduplicated as well
            assert acks(s, 1)[0]["data"]["metadata"]["offset"] == 1
            watcher.nothing(0.5)  # not delivered twice
            s.publish(ch, "twice", sequence=8)
            assert acks(s, 1)[0]["data"]["metadata"]["offset"] == 2
            msg = expect(watcher, "message", "send")
            assert msg["data"]["content"] == "twice" and msg["data"]["metadata"]["offset"] == 2

        # the window is per (user, client_id): another client's sequence 7 is new
        with Client(a.ws_url, token=a.token("ret"), client_id="dup-2", channel=ch) as s:
            joined(s, ch)
            s.publish(ch, "other client", sequence=7)
            assert acks(s, 1)[0]["data"]["metadata"]["offset"] == 3
        assert expect(watcher, "message", "send")["data"]["metadata"]["offset"] == 3
        watcher.nothing(0.2)


def test_anonymous_client_id_taken_on_the_other_machine(pair: Pair) -> None:
    """Issue 12 across machines: an anonymous connection on B naming the client_id of an
    anonymous one on A has its own dedupe window in Redis, and each gets the other's
    publications (echo exclusion finds each sender by its own identity)."""
    a, b = pair
    ch = "cl.anon"
    a.create_channel(name=ch, require_auth=False)
    wait_config(b, ch, require_auth=False)
    with (
        Client(a.ws_url, client_id="victim", channel=ch) as victim,
        Client(b.ws_url, client_id="victim", channel=ch) as attacker,
    ):
        joined(victim, ch)
        joined(attacker, ch)
        victim.publish(ch, "mine", sequence=1)
        assert acks(victim, 1)[0]["data"]["metadata"]["offset"] == 1
        assert expect(attacker, "message", "send")["data"]["content"] == "mine"
        attacker.publish(ch, "forged", sequence=1)
        assert acks(attacker, 1)[0]["data"]["metadata"]["offset"] == 2  # not a duplicate
        assert expect(victim, "message", "send")["data"]["content"] == "forged"
        victim.publish(ch, "mine", sequence=1, action="retry")
        assert acks(victim, 1)[0]["data"]["metadata"]["offset"] == 1  # its own window
        attacker.nothing(0.3)
        victim.nothing(0.1)


# -- channel configs -------------------------------------------------------------------------


def test_channel_config_posted_on_one_machine_applies_on_the_other(pair: Pair) -> None:
    a, b = pair
    ch = "cl.cfg"
    wait_cluster(a, 2, 2)
    wait_cluster(b, 2, 2)
    base = {"name": ch, "message_rate_limit": 0}
    assert a.create_channel(**base, max_connections=0, require_auth=False) == 201
    wait_config(b, ch, require_auth=False, max_connections=0)
    with Client(b.ws_url, channel=ch) as anon:  # anonymous is allowed, for now
        assert joined(anon, ch)["user_id"] is None

    # an update on A reaches B's live channel
    assert a.create_channel(**base, max_connections=2, require_auth=True) == 200
    wait_config(b, ch, require_auth=True, max_connections=2)
    with Client(b.ws_url) as anon:
        joined(anon)
        anon.join(ch)
        expect_error(anon, "AUTH_REQUIRED")

    def join_on(srv: Server, user: str) -> Callable[[], tuple[Client, dict[str, Any]]]:
        def attempt() -> tuple[Client, dict[str, Any]]:
            c = Client(srv.ws_url, token=srv.token(user))
            joined(c)
            c.join(ch)
            return c, c.recv()

        return attempt

    with (
        Client(a.ws_url, token=a.token("m1"), channel=ch) as m1,
        Client(b.ws_url, token=b.token("m2"), channel=ch) as m2,
    ):
        joined(m1, ch)
        joined(m2, ch)
        # one member on each machine: the third is refused on either, once the counts sync
        for srv in (b, a):
            third, err = refused_eventually(join_on(srv, "m3"), "CHANNEL_FULL")
            assert err["details"]["channel"] == ch, err
            third.nothing(0.1)  # refused, not disconnected
            third.close()
        # a member leaves on A: a join on B is accepted again
        m1.close()

        def accepted_on_b() -> bool:
            c, msg = join_on(b, "m4")()
            c.close()
            return bool(msg["type"] == "connection" and msg["data"]["channel"] == ch)

        wait_for(accepted_on_b, timeout=6.0, interval=0.2)
        m2.nothing(0.1)


def test_configs_missed_while_the_subscriber_was_away_are_read_again(
    pair: Pair, redis_server: RedisServer, redis_url: str
) -> None:
    """A config change announced while a node's subscriber is disconnected never reaches it
    by pub/sub; when the subscriber is back the node reads every config again."""
    a, b = pair
    a.allow_errors = b.allow_errors = True  # the lost subscriber is logged as an error
    ch = "cl.missed"
    cfg = (
        '{"name": "cl.missed", "max_connections": 3, "message_rate_limit": 0, '
        '"require_auth": false, "history_size": 5, "presence": false}'
    )
    with redis_server.client(db_of(redis_url)) as r:
        r.hset("aether:channels", ch, cfg)  # written, never announced
        assert b.http("GET", f"/ws/channels/{ch}", token=b.admin())[0] == 404
        killed = r.client_kill_filter(_type="pubsub")  # both nodes' subscribers
        assert killed >= 2, killed
    wait_config(b, ch, max_connections=3, history_size=5)
    assert status(b)["status"] == "healthy"


def test_channel_delete_on_one_machine_removes_members_on_the_other(pair: Pair) -> None:
    a, b = pair
    ch = "cl.del"
    a.create_channel(name=ch, max_connections=0, message_rate_limit=0, require_auth=True)
    wait_config(b, ch, max_connections=0)
    with (
        Client(a.ws_url, token=a.token("d1"), channel=ch) as on_a,
        Client(b.ws_url, token=b.token("d2"), channel=ch) as on_b,
    ):
        joined(on_a, ch)
        joined(on_b, ch)
        code, body, _ = a.http("DELETE", f"/ws/channels/{ch}", token=a.admin())
        assert code == 200, body
        for c in (on_a, on_b):
            bye = expect(c, "connection", "disconnect")
            assert bye["data"]["channel"] == ch, bye
            c.recv_until("system", "status")
            c.publish(ch, "still here?")
            err = expect_error(c, "NOT_A_MEMBER")
            assert err["details"]["channel"] == ch
        wait_for(
            lambda: b.http("GET", f"/ws/channels/{ch}", token=b.admin())[0] == 404, timeout=5.0
        )


def test_require_auth_switch_removes_anonymous_members_on_every_machine(pair: Pair) -> None:
    a, b = pair
    ch = "cl.ra"
    a.create_channel(name=ch, max_connections=0, message_rate_limit=0, require_auth=False)
    wait_config(b, ch, require_auth=False)
    with (
        Client(a.ws_url, channel=ch) as anon_a,
        Client(b.ws_url, channel=ch) as anon_b,
        Client(b.ws_url, token=b.token("member"), channel=ch) as member_b,
        Client(a.ws_url, token=a.token("speaker"), channel=ch) as speaker_a,
    ):
        for c in (anon_a, anon_b, member_b, speaker_a):
            joined(c, ch)
        a.create_channel(name=ch, max_connections=0, message_rate_limit=0, require_auth=True)
        for c in (anon_a, anon_b):  # the other machine applies it when Redis tells it
            gone = expect(c, "connection", "disconnect")
            assert gone["data"]["channel"] == ch, gone
            assert gone["data"]["reason"] == "channel requires auth", gone
            note = expect(c, "system", "status")
            assert note["data"]["severity"] == "warning" and ch in note["data"]["message"], note
        speaker_a.publish(ch, "members only")
        expect(speaker_a, "message", "ack")
        assert expect(member_b, "message", "send")["data"]["content"] == "members only"
        for c in (anon_a, anon_b):
            c.nothing(0.3)
            c.join(ch)
            assert expect_error(c, "AUTH_REQUIRED")["details"]["channel"] == ch


# -- channel state in Redis expires ------------------------------------------------------------


def test_every_redis_key_of_a_channel_has_a_ttl(
    make_server: Callable[..., Server], redis_server: RedisServer, redis_url: str
) -> None:
    srv = make_server(BROKER_URL=redis_url, HISTORY_TTL_S="0", CHANNEL_STATE_TTL_S="5000")
    ch = "cl.ttl"
    with redis_server.client(db_of(redis_url)) as r:

        def channel_keys() -> dict[str, int]:
            return {k.decode(): r.pttl(k) for k in r.keys(f"*{ch}*")}

        with Client(srv.ws_url, token=srv.token("keeper"), client_id="k1", channel=ch) as c:
            joined(c, ch)
            after_join = channel_keys()  # a join alone leaves the meta key: it expires too
            assert list(after_join) == [f"aether:ch:{{{ch}}}:meta"], after_join
            assert all(0 < ttl <= 5_000_000 for ttl in after_join.values()), after_join
            c.publish(ch, "kept a while")
            expect(c, "message", "ack")
            keys = channel_keys()
            kinds = sorted(k.split(":")[1] for k in keys)
            assert kinds == ["ch", "ch", "dedupe"], keys  # meta, history, dedupe window
            # HISTORY_TTL_S=0: the history lives as long as the meta key, not for ever
            assert all(0 < ttl <= 5_000_000 for ttl in keys.values()), keys


def test_expired_channel_state_starts_a_new_epoch(
    make_server: Callable[..., Server], redis_server: RedisServer, redis_url: str
) -> None:
    srv = make_server(
        BROKER_URL=redis_url, CHANNEL_STATE_TTL_S="1", HISTORY_TTL_S="1", DEDUP_TTL_S="1"
    )
    ch = "cl.exp"
    with Client(srv.ws_url, token=srv.token("old"), channel=ch) as c:
        first = joined(c, ch)
        c.publish(ch, "soon gone")
        assert acks_offset(c) == 1
    with redis_server.client(db_of(redis_url)) as r:
        wait_for(lambda: not r.keys(f"*{ch}*"), timeout=10.0, interval=0.2)
    # the offset key expired: the channel starts again under a new epoch, which a client
    # recovering with the old one is told ("history lost")
    with Client(srv.ws_url, token=srv.token("old"), channel=ch, since=1, epoch=first["epoch"]) as c:
        again = joined(c, ch)
        assert again["recovered"] is False and again["offset"] == 0, again
        assert again["epoch"] != first["epoch"], again
        c.publish(ch, "fresh", sequence=1)
        assert acks_offset(c) == 1


def acks_offset(c: Client) -> int:
    msg = expect(c, "message", "ack")
    return int(msg["data"]["metadata"]["offset"])


# -- cluster-wide connection limit -----------------------------------------------------------


def test_connection_limit_per_user_spans_machines(
    make_server: Callable[..., Server], redis_url: str
) -> None:
    a, b = machines(make_server, redis_url, RATE_LIMIT_CONNECTIONS="2")
    wait_cluster(a, 2, 2)
    wait_cluster(b, 2, 2)

    def open_on(srv: Server) -> Callable[[], tuple[Client, dict[str, Any]]]:
        return lambda: first_answer(srv.ws_url, token=srv.token("lim"))

    c1, first = open_on(a)()
    c2, second = open_on(b)()
    try:
        assert first["type"] == "connection" and second["type"] == "connection", (first, second)
        for srv in (a, b):
            third, err = refused_eventually(open_on(srv), "CONNECTION_LIMIT")
            assert err["details"]["reason"] == "connections", err
            assert drain(third)[1] == 4029
        # another user is not affected
        with Client(a.ws_url, token=a.token("someone-else")) as other:
            joined(other)
        # one connection of the user closes on B: a new one on A is accepted again
        c2.close()

        def accepted_on_a() -> bool:
            c, msg = open_on(a)()
            c.close()
            return bool(msg["type"] == "connection")

        wait_for(accepted_on_a, timeout=6.0, interval=0.2)
    finally:
        c1.close()
        c2.close()


# -- status ----------------------------------------------------------------------------------


def test_status_shows_the_cluster_and_who_answered(pair: Pair) -> None:
    a, b = pair
    for srv, node in ((a, "node-a"), (b, "node-b")):
        body = wait_cluster(srv, 2, 2)
        assert body["status"] == "healthy", body
        assert body["node"] == node
        assert body["answered_by"].startswith(node + ":"), body
        assert [w["pid"] for w in body["workers"]] == [srv.proc.pid if srv.proc else None]
        assert body["cluster"]["workers"] == 2 and body["cluster"]["nodes"] == 2, body
    with Client(b.ws_url, token=b.token("st")) as c:
        joined(c)
        # the node's own counts stay its own; the cluster view counts B's connection
        body = wait_status(a, lambda s: s.get("cluster", {}).get("connections") == 1)
        assert body["connections"]["active"] == 0, body
        assert status(b)["connections"]["active"] == 1
