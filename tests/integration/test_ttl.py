"""DEDUP_TTL_S and HISTORY_TTL_S with small values, against the in-memory broker and Redis
(docs/protocol.md §6 and §8, docs/operations.md §3).

- A retry of an accepted sequence, from a new connection with the same client_id, inside
  DEDUP_TTL_S is acked again with the original offset and timestamp and not published; once
  the window has been idle (no publish from that sender) for DEDUP_TTL_S, the same sequence
  is a new publication. A retry is not a publish: retrying does not keep the window alive.
- Redis: history leaves HISTORY_TTL_S after the last publish while the offset and epoch stay
  (the in-memory broker's case is tests/integration/test_lifecycle.py); HISTORY_TTL_S=0
  keeps history (as long as the channel's state, on Redis) on both brokers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import Server
from tests.integration.helpers import expect, joined, wait_for
from tests.integration.wsclient import Client

DEDUP_TTL_S = 3.0

MakeServer = Callable[..., Server]


@pytest.fixture(params=["memory", "redis"])
def broker_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment of a server on the in-memory broker, or on a real Redis."""
    if request.param == "memory":
        return {}
    return {"BROKER_URL": str(request.getfixturevalue("redis_url"))}


def _ack(c: Client) -> dict[str, Any]:
    msg = expect(c, "message", "ack")
    meta: dict[str, Any] = msg["data"]["metadata"]
    return meta


def test_retry_inside_dedup_ttl_is_a_duplicate_and_after_it_a_new_publication(
    make_server: MakeServer, broker_env: dict[str, str]
) -> None:
    srv = make_server(DEDUP_TTL_S=str(int(DEDUP_TTL_S)), RATE_LIMIT_MESSAGES="100000", **broker_env)
    ch = "ttl.dedupe"

    def sender() -> Client:
        c = Client(srv.ws_url, token=srv.token("ttl-sender"), client_id="dev-1", channel=ch)
        joined(c, ch)
        return c

    with Client(srv.ws_url, token=srv.token("ttl-watcher"), channel=ch) as watcher:
        joined(watcher, ch)
        with sender() as s:
            s.publish(ch, "once", sequence=5)
            first = _ack(s)
        published = time.monotonic()
        assert first["offset"] == 1 and first["sequence"] == 5, first
        assert expect(watcher, "message", "send")["data"]["metadata"]["offset"] == 1

        # the ack was "lost": the same sender retries on a new connection, inside the TTL
        with sender() as s:
            s.publish(ch, "once", sequence=5, action="retry")
            assert _ack(s) == first  # the original offset and timestamp
            assert time.monotonic() - published < DEDUP_TTL_S, "too slow to test inside"
            watcher.nothing(0.3)  # not published again

            # retried until it counts as new: the retries themselves do not renew the window
            # (the in-memory broker forgets idle windows on its 10 s sweep; Redis at the TTL)
            def retried() -> dict[str, Any] | None:
                s.publish(ch, "once", sequence=5, action="retry")
                meta = _ack(s)
                if meta["offset"] == first["offset"]:
                    assert meta == first, (meta, first)
                    return None
                return meta

            again = wait_for(retried, timeout=DEDUP_TTL_S + 20, interval=0.25)
        assert time.monotonic() - published >= DEDUP_TTL_S * 0.9, "forgotten too early"
        assert again["offset"] == 2 and again["sequence"] == 5, again
        assert again["timestamp"] != first["timestamp"], again
        msg = expect(watcher, "message", "send")  # published, this time
        assert msg["data"]["content"] == "once", msg
        assert msg["data"]["metadata"]["offset"] == 2, msg
        watcher.nothing(0.2)


def _recover(srv: Server, ch: str, since: int) -> tuple[dict[str, Any], list[str]]:
    """Join `ch` with `since` on a new connection: the join reply and the replayed contents."""
    with Client(srv.ws_url, token=srv.token("ttl-late"), channel=ch, since=since) as late:
        hello = joined(late, ch)
        replayed = []
        if hello["recovered"]:
            replayed = [late.recv()["data"]["content"] for _ in range(hello["offset"] - since)]
        return hello, replayed


def test_redis_history_leaves_after_history_ttl_and_the_offsets_go_on(
    make_server: MakeServer, redis_url: str
) -> None:
    srv = make_server(BROKER_URL=redis_url, HISTORY_TTL_S="1", CHANNEL_STATE_TTL_S="3600")
    ch = "ttl.hist"
    with Client(srv.ws_url, token=srv.token("ttl-pub"), channel=ch) as pub:
        first = joined(pub, ch)
        for text in ("m1", "m2"):
            pub.publish(ch, text)
            _ack(pub)
        published = time.monotonic()  # the history's TTL started before this ack
        hello, replayed = _recover(srv, ch, 0)
        assert (hello["recovered"], replayed) == (True, ["m1", "m2"]), hello

        def expired() -> dict[str, Any] | None:
            hello, _ = _recover(srv, ch, 0)
            return None if hello["recovered"] else hello

        gone = wait_for(expired, timeout=15.0, interval=0.2)
        assert time.monotonic() - published >= 0.5, "history gone at once"
        # the history went, the offset and epoch did not: a client that missed nothing is
        # still recovered, and the next publication takes the next offset
        assert gone["offset"] == 2 and gone["epoch"] == first["epoch"], gone
        hello, _ = _recover(srv, ch, 2)
        assert hello["recovered"] is True and hello["epoch"] == first["epoch"], hello
        pub.publish(ch, "m3")
        assert _ack(pub)["offset"] == 3


def test_history_ttl_0_keeps_history(make_server: MakeServer, broker_env: dict[str, str]) -> None:
    srv = make_server(HISTORY_TTL_S="0", **broker_env)
    ch = "ttl.keep"
    with Client(srv.ws_url, token=srv.token("ttl-pub"), channel=ch) as pub:
        joined(pub, ch)
        for text in ("k1", "k2"):
            pub.publish(ch, text)
            _ack(pub)
        time.sleep(1.1)  # past any whole-second expiry a 0 could be mistaken for
        hello, replayed = _recover(srv, ch, 0)
        assert (hello["recovered"], replayed) == (True, ["k1", "k2"]), hello
