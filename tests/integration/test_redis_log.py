"""The Redis broker's message log, per message (brokers/redis.py's publish script): a channel
with `history_size` 0 keeps no history stream and still numbers, acks and deduplicates;
sequences out of order are new or duplicates by their own record, whatever the highest
sequence seen; the history is trimmed approximately in Redis (`MAXLEN ~`) but a join
recovers no more than `history_size` publications (docs/protocol.md §6, §8); a member's
re-join without `since` loses none of the publications still on their way to it, and when
Redis fails it the member stays one (docs/protocol.md §8, *Joining a channel you are in*).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.conftest import Server
from tests.integration.cluster_helpers import only_expected_errors
from tests.integration.helpers import expect, expect_error, joined, wait_for
from tests.integration.redis_fixture import RedisServer, db_of
from tests.integration.slow_pubsub import SlowPubSubRelay
from tests.integration.wsclient import Client


def ack_of(c: Client, sequence: int) -> dict[str, Any]:
    msg = expect(c, "message", "ack")["data"]["metadata"]
    assert msg["sequence"] == sequence, msg
    return dict(msg)


def with_channel(
    make_server: Callable[..., Server], redis_url: str, ch: str, history_size: int, **env: str
) -> Server:
    """A server with the Redis broker (and `env`) where channel `ch` keeps `history_size`."""
    srv = make_server(BROKER_URL=redis_url, **env)
    srv.create_channel(name=ch, history_size=history_size)
    return srv


def test_channel_without_history_keeps_no_stream(
    make_server: Callable[..., Server], redis_server: RedisServer, redis_url: str
) -> None:
    ch = "log.nohist"
    srv = with_channel(make_server, redis_url, ch, 0, CHANNEL_STATE_TTL_S="5000")
    with (
        Client(srv.ws_url, token=srv.token("pub"), client_id="p1", channel=ch) as pub,
        Client(srv.ws_url, token=srv.token("sub"), channel=ch) as sub,
    ):
        joined(pub, ch)
        epoch = joined(sub, ch)["epoch"]
        for i in range(1, 4):
            pub.publish(ch, f"n{i}", sequence=i)
            assert ack_of(pub, i)["offset"] == i
            got = expect(sub, "message", "send")["data"]
            assert (got["content"], got["metadata"]["offset"]) == (f"n{i}", i)
        pub.publish(ch, "n2 again", sequence=2, action="retry")
        assert ack_of(pub, 2)["offset"] == 2  # deduplicated without a history
        sub.nothing(0.3)
        with redis_server.client(db_of(redis_url)) as r:
            keys = {k.decode(): r.pttl(k) for k in r.keys(f"*{ch}*")}
        assert sorted(keys) == [
            f"aether:ch:{{{ch}}}:meta",
            f"aether:dedupe:{{{ch}}}:pub\x1fp1",
        ], keys  # no history stream
        assert all(0 < ttl <= 5_000_000 for ttl in keys.values()), keys
    # nothing missed: recovered, nothing to replay; anything missed cannot be replayed
    with Client(srv.ws_url, token=srv.token("sub"), channel=ch, since=3, epoch=epoch) as c:
        data = joined(c, ch)
        assert data["recovered"] is True and data["offset"] == 3, data
        c.nothing(0.3)
    with Client(srv.ws_url, token=srv.token("sub"), channel=ch, since=2, epoch=epoch) as c:
        assert joined(c, ch)["recovered"] is False
        c.nothing(0.3)


def test_sequences_out_of_order_are_new_or_duplicates_by_their_own_record(
    make_server: Callable[..., Server], redis_url: str
) -> None:
    srv = make_server(BROKER_URL=redis_url, RATE_LIMIT_MESSAGES="100000")
    ch = "log.order"
    with (
        Client(srv.ws_url, token=srv.token("pub"), client_id="p1", channel=ch) as pub,
        Client(srv.ws_url, token=srv.token("sub"), channel=ch) as sub,
    ):
        joined(pub, ch)
        joined(sub, ch)
        # (sequence, offset it is acked with): below the highest sequence seen is not
        # necessarily a duplicate, and a duplicate below it is found in its slot
        steps = [(10, 1), (5, 2), (5, 2), (10, 1), (7, 3), (11, 4), (7, 3), (6, 5)]
        for sequence, offset in steps:
            pub.publish(ch, f"s{sequence}", sequence=sequence)
            assert ack_of(pub, sequence)["offset"] == offset, (sequence, offset)
        delivered = [expect(sub, "message", "send")["data"] for _ in range(5)]
        assert [(d["content"], d["metadata"]["offset"]) for d in delivered] == [
            ("s10", 1),
            ("s5", 2),
            ("s7", 3),
            ("s11", 4),
            ("s6", 5),
        ]
        sub.nothing(0.3)


def test_recovery_beyond_history_size_through_redis(
    make_server: Callable[..., Server], redis_server: RedisServer, redis_url: str
) -> None:
    ch = "log.short"
    srv = with_channel(make_server, redis_url, ch, 2, RATE_LIMIT_MESSAGES="100000")
    with Client(srv.ws_url, token=srv.token("pub"), channel=ch) as pub:
        epoch = joined(pub, ch)["epoch"]
        sent = [pub.publish(ch, f"h{i}") for i in range(1, 41)]
        assert [ack_of(pub, s)["offset"] for s in sent] == list(range(1, 41))
    with redis_server.client(db_of(redis_url)) as r:
        kept = r.xlen(f"aether:ch:{{{ch}}}:hist")
    assert kept >= 2  # trimmed by whole stream nodes: more than 2 may be kept
    with Client(srv.ws_url, token=srv.token("sub"), channel=ch, since=37, epoch=epoch) as c:
        data = joined(c, ch)
        assert data["recovered"] is False and data["offset"] == 40, data  # 3 missed > 2
        c.nothing(0.3)
    with Client(srv.ws_url, token=srv.token("sub"), channel=ch, since=38, epoch=epoch) as c:
        assert joined(c, ch)["recovered"] is True
        assert [c.recv()["data"]["content"] for _ in range(2)] == ["h39", "h40"]
        c.nothing(0.3)


def test_a_members_rejoin_loses_no_publication_on_its_way(
    make_server: Callable[..., Server], redis_server: RedisServer, redis_url: str
) -> None:
    """With Redis a publication reaches the members through pub/sub, later than its ack (a
    relay delays pub/sub 0.3 s here: tests/integration/slow_pubsub.py). A member that joins
    its channel again without `since` while they are on their way (Redis is paused for 1 s,
    so that they reach the server while the re-join waits for the position) gets the reply
    with the position Redis has, at or above their offsets, and every one of them: they
    were published while it was a member, and it asked for no replay that would carry them."""
    ch = "log.rejoin"
    db = db_of(redis_url)
    with SlowPubSubRelay(("127.0.0.1", redis_server.port), delay=0.3) as relay:
        srv = make_server(BROKER_URL=relay.url(db), RATE_LIMIT_MESSAGES="100000")
        try:
            with (
                Client(srv.ws_url, token=srv.token("pub"), client_id="p1", channel=ch) as pub,
                Client(srv.ws_url, token=srv.token("sub"), channel=ch) as sub,
            ):
                joined(pub, ch)
                joined(sub, ch)
                for i in range(1, 6):
                    pub.publish(ch, f"r{i}", sequence=i)
                    assert ack_of(pub, i)["offset"] == i
                with redis_server.client(db) as r:
                    r.execute_command("CLIENT", "PAUSE", 1000, "ALL")
                sub.join(ch)  # the copies of all five are still in the relay
                frames = [sub.recv() for _ in range(6)]
                replies = [f["data"] for f in frames if f["type"] == "connection"]
                assert len(replies) == 1 and replies[0]["offset"] == 5, frames
                got = [
                    (f["data"]["content"], f["data"]["metadata"]["offset"])
                    for f in frames
                    if f["type"] == "message"
                ]
                assert got == [(f"r{i}", i) for i in range(1, 6)], frames
                # still a member, live as before
                pub.publish(ch, "r6", sequence=6)
                assert ack_of(pub, 6)["offset"] == 6
                got6 = expect(sub, "message", "send")["data"]
                assert (got6["content"], got6["metadata"]["offset"]) == ("r6", 6)
                sub.nothing(0.5)
        finally:
            srv.stop()  # before the relay goes


def test_a_members_rejoin_that_redis_fails_leaves_it_a_member(
    make_server: Callable[..., Server], redis_server: RedisServer, redis_url: str
) -> None:
    """Redis down: a member's re-join without `since` gets INTERNAL_ERROR and the member
    stays one (a publication of it gets the broker's error, not NOT_A_MEMBER)."""
    srv = make_server(BROKER_URL=redis_url, RATE_LIMIT_MESSAGES="100000")
    srv.allow_errors = True  # the outage is logged at error level (broker_degraded)
    ch = "log.rejoin.down"
    try:
        with Client(srv.ws_url, token=srv.token("sub"), channel=ch) as sub:
            joined(sub, ch)
            redis_server.stop()
            wait_for(lambda: srv.http("GET", "/health")[0] == 503, timeout=10.0)
            sub.join(ch)
            err = expect_error(sub, "INTERNAL_ERROR")["details"]
            assert (err["channel"], err["reason"]) == (ch, "broker_unavailable"), err
            sub.publish(ch, "while down", sequence=1)
            err = expect_error(sub, "INTERNAL_ERROR")["details"]
            assert (err["component"], err["sequence"]) == ("broker", 1), err
    finally:
        if not redis_server.running:
            redis_server.start()
    only_expected_errors(srv, "broker_degraded")
