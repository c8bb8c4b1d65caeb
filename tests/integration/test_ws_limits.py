"""docs/protocol.md §13 and §14 over real sockets: message rate limits (connection, channel,
global), connection limits per user and per worker, allowed origins, slow readers, and the
Firefox upgrade."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from tests.conftest import Server
from tests.integration.helpers import (
    HClient,
    RawWS,
    drain,
    expect,
    expect_error,
    joined,
    member,
    wait_for,
)
from tests.integration.wsclient import Client


def _status_ok(c: Client) -> None:
    c.send({"type": "system", "action": "status", "data": {}})
    expect(c, "system", "status")


def _limited(c: Client, code: str, reason: str, channel: str, seq: int) -> dict[str, Any]:
    err = expect_error(c, code)
    d = err["details"]
    assert d["reason"] == reason, err
    assert d["channel"] == channel and d["sequence"] == seq, err
    assert isinstance(d["retry_after_ms"], int) and d["retry_after_ms"] > 0, err
    return err


# -- message rates -------------------------------------------------------------------------------


def test_rate_limit_per_user(make_server: Callable[..., Server]) -> None:
    # 3 messages per 6 s: a bucket of 3 that refills one token every 2 s, per user (a refill
    # period a busy machine does not stretch a back-to-back burst past)
    # (tests/integration/test_ws_budget.py: shared by their connections, kept across reconnects)
    srv = make_server(RATE_LIMIT_MESSAGES="3", RATE_LIMIT_WINDOW_S="6")
    ch = "lim.conn"
    with member(srv, "alice", ch) as a, member(srv, "bob", ch) as peer:
        for i in range(3):  # sent back to back: well inside one refill period
            a.publish(ch, f"m{i}")
        seq = a.publish(ch, "one too many")
        for _ in range(3):
            expect(a, "message", "ack")
        err = _limited(a, "RATE_LIMITED", "user", ch, seq)
        assert 0 < err["details"]["retry_after_ms"] <= 2001, err  # one token every 2 s
        got = [expect(peer, "message", "send")["data"]["content"] for _ in range(3)]
        assert got == ["m0", "m1", "m2"]
        peer.nothing(0.1)  # the limited message was not published

        # after retry_after_ms the refused message may pass; it was never accepted, so the
        # retry is a new publication; the connection stayed open
        time.sleep(err["details"]["retry_after_ms"] / 1000 + 0.05)
        a.publish(ch, "one too many", sequence=seq, action="retry")
        ack = expect(a, "message", "ack")["data"]["metadata"]
        assert ack["sequence"] == seq and ack["offset"] == 4
        assert expect(peer, "message", "send")["data"]["content"] == "one too many"
        # control messages cost the same budget, the other user's is their own
        time.sleep(2.05)  # one refill period: the retry took the token that came back
        _status_ok(a)
        _status_ok(peer)


def test_rate_limit_per_channel_across_publishers(server: Server) -> None:
    ch = "lim.chan"
    # 1 message every 2 s, all publishers (a period a busy machine does not stretch a round
    # trip past)
    server.create_channel(name=ch, message_rate_limit=0.5)
    with (
        member(server, "alice", ch) as a,
        member(server, "bob", ch) as b,
        member(server, "carol", ch) as reader,
    ):
        a.publish(ch, "a1")
        expect(a, "message", "ack")
        seq_b = b.publish(ch, "b1")  # bob's first message, but the channel's second
        err = b.recv_until("error", limit=3)
        d = err["details"]
        assert err["code"] == "RATE_LIMITED", err
        assert d["reason"] == "channel" and d["channel"] == ch and d["sequence"] == seq_b, d
        assert 0 < d["retry_after_ms"] <= 2001, d
        seq_a = a.publish(ch, "a2")
        _limited(a, "RATE_LIMITED", "channel", ch, seq_a)
        assert reader.recv()["data"]["content"] == "a1"
        reader.nothing(0.1)
        _status_ok(a)
        _status_ok(b)
        # the channel's limit is per channel: another channel is not limited
        a.join("lim.other")
        joined(a)
        a.publish("lim.other", "elsewhere")
        expect(a, "message", "ack")
        time.sleep(d["retry_after_ms"] / 1000 + 0.05)
        b.publish(ch, "b1", sequence=seq_b, action="retry")
        b.recv_until("message", "ack", limit=3)
        assert reader.recv()["data"]["content"] == "b1"


def test_fractional_channel_rate_limit(server: Server) -> None:
    # message_rate_limit is a number of messages per second (REST accepts 0..1e9): 0.5 is one
    # message every two seconds, not "never".
    ch = "lim.half"
    server.create_channel(name=ch, message_rate_limit=0.5)
    with member(server, "alice", ch) as a, member(server, "carol", ch) as reader:
        a.publish(ch, "first")
        ack = a.recv()
        assert (ack["type"], ack.get("action")) == ("message", "ack"), ack
        assert reader.recv()["data"]["content"] == "first"
        seq = a.publish(ch, "second")
        err = _limited(a, "RATE_LIMITED", "channel", ch, seq)
        assert err["details"]["retry_after_ms"] <= 2001, err
        time.sleep(err["details"]["retry_after_ms"] / 1000 + 0.05)
        a.publish(ch, "second", sequence=seq, action="retry")
        ack = a.recv()
        assert (ack["type"], ack.get("action")) == ("message", "ack"), ack
        assert reader.recv()["data"]["content"] == "second"


def test_global_rate_limit_is_server_busy(make_server: Callable[..., Server]) -> None:
    srv = make_server(RATE_LIMIT_GLOBAL_MESSAGES="1")  # 1 message a second, whole server
    with (
        member(srv, "alice", "g.one") as a,
        member(srv, "bob", "g.two") as b,
        member(srv, "carol", "g.one") as reader,
    ):
        a.publish("g.one", "a")
        expect(a, "message", "ack")
        # another user, another channel: the same server-wide budget
        seq = b.publish("g.two", "over the server's budget")
        err = expect_error(b, "SERVER_BUSY")
        assert err["details"]["channel"] == "g.two" and err["details"]["sequence"] == seq
        assert 0 < err["details"]["retry_after_ms"] <= 1001
        seq = a.publish("g.one", "also over")
        err = expect_error(a, "SERVER_BUSY")
        assert err["details"]["sequence"] == seq
        assert reader.recv()["data"]["content"] == "a"
        reader.nothing(0.1)
        _status_ok(a)
        _status_ok(b)
        time.sleep(err["details"]["retry_after_ms"] / 1000 + 0.05)
        a.publish("g.one", "later")
        expect(a, "message", "ack")
        assert reader.recv()["data"]["content"] == "later"


# -- connection limits ---------------------------------------------------------------------------


def test_connection_limit_per_user(make_server: Callable[..., Server]) -> None:
    srv = make_server(RATE_LIMIT_CONNECTIONS="2")
    url = srv.ws_url
    with (
        Client(url, token=srv.token("alice"), client_id="c1") as c1,
        Client(url, token=srv.token("alice"), client_id="c2") as c2,
    ):
        joined(c1)
        joined(c2)
        with Client(url, token=srv.token("alice"), client_id="c3") as c3:
            msgs, close = drain(c3)
            assert [m.get("code") for m in msgs] == ["CONNECTION_LIMIT"], msgs
            assert close == 4029
        # another user is not counted with alice
        with Client(url, token=srv.token("bob")) as b:
            joined(b)
        _status_ok(c1)
        # closing one releases its place
        c1.close()

        def fourth_gets_in() -> bool:
            with Client(url, token=srv.token("alice"), client_id="c4") as c4:
                first = c4.recv()
                return bool(first["type"] == "connection")

        wait_for(fourth_gets_in, timeout=5, interval=0.05)
        _status_ok(c2)


def test_connection_limit_per_ip_for_anonymous(make_server: Callable[..., Server]) -> None:
    srv = make_server(RATE_LIMIT_CONNECTIONS="2")
    with Client(srv.ws_url) as a1, Client(srv.ws_url) as a2:
        joined(a1)
        joined(a2)
        with Client(srv.ws_url) as a3:
            msgs, close = drain(a3)
            assert [m.get("code") for m in msgs] == ["CONNECTION_LIMIT"], msgs
            assert close == 4029
        with Client(srv.ws_url, token=srv.token("alice")) as alice:
            joined(alice)


def test_a_user_named_like_an_address_is_not_its_anonymous_clients(
    make_server: Callable[..., Server],
) -> None:
    """Users and anonymous clients are counted apart whatever the sub: a token whose sub is
    `ip:127.0.0.1` neither takes nor is refused the places of anonymous clients from
    127.0.0.1 (both used to be the key `ip:127.0.0.1`)."""
    srv = make_server(RATE_LIMIT_CONNECTIONS="2")
    lookalike = srv.token("ip:127.0.0.1")
    with Client(srv.ws_url) as a1, Client(srv.ws_url) as a2:
        joined(a1)
        joined(a2)
        with (
            Client(srv.ws_url, token=lookalike, client_id="u1") as u1,
            Client(srv.ws_url, token=lookalike, client_id="u2") as u2,
        ):
            joined(u1)
            joined(u2)
            # each side is at its own limit
            with Client(srv.ws_url, token=lookalike, client_id="u3") as u3:
                msgs, close = drain(u3)
                assert [m.get("code") for m in msgs] == ["CONNECTION_LIMIT"], msgs
                assert close == 4029
            with Client(srv.ws_url) as a3:
                msgs, close = drain(a3)
                assert [m.get("code") for m in msgs] == ["CONNECTION_LIMIT"], msgs
                assert close == 4029
            _status_ok(u1)
            _status_ok(a1)


def test_a_user_named_like_an_address_has_its_own_budget(
    make_server: Callable[..., Server],
) -> None:
    """The inbound budget is keyed like the connection count: anonymous clients of
    127.0.0.1 spending theirs leave a user whose sub is `ip:127.0.0.1` untouched, and the
    other way round."""
    srv = make_server(RATE_LIMIT_MESSAGES="3", RATE_LIMIT_WINDOW_S="600")
    status = {"type": "system", "action": "status", "data": {}}
    with (
        Client(srv.ws_url) as anon,
        Client(srv.ws_url, token=srv.token("ip:127.0.0.1")) as lookalike,
    ):
        joined(anon)
        joined(lookalike)
        for _ in range(3):
            _status_ok(anon)
        anon.send(status)
        assert expect_error(anon, "RATE_LIMITED")["details"]["reason"] == "user"
        for _ in range(3):
            _status_ok(lookalike)
        lookalike.send(status)
        assert expect_error(lookalike, "RATE_LIMITED")["details"]["reason"] == "user"


def test_max_connections_refuses_upgrade_with_503(make_server: Callable[..., Server]) -> None:
    srv = make_server(MAX_CONNECTIONS="2")
    with member(srv, "alice", "mc") as a, member(srv, "bob", "mc") as b:
        with pytest.raises(InvalidStatus) as refused:
            Client(srv.ws_url, token=srv.token("carol"), channel="mc")
        assert refused.value.response.status_code == 503
        assert refused.value.response.headers["Retry-After"] == "1"
        body = json.loads(refused.value.response.body or b"{}")
        assert body.get("type") == "error" and body.get("code") == "SERVER_BUSY", body
        assert body["details"]["reason"] == "max_connections", body
        assert body["details"]["limit"] == 2, body
        # logged as a security event, with the same reason (docs/operations.md §7)
        wait_for(
            lambda: any(
                o.get("event") == "connection_refused"
                and o["data"]["details"].get("reason") == "max_connections"
                for o in srv.log_lines()
            ),
            5,
        )
        # the existing clients keep working
        a.publish("mc", "still fine")
        expect(a, "message", "ack")
        assert expect(b, "message", "send")["data"]["content"] == "still fine"
        # plain HTTP is not a WebSocket: still answered
        status, _, _ = srv.http("GET", "/health")
        assert status == 200
        a.close()

        def third_gets_in() -> bool:
            try:
                with Client(srv.ws_url, token=srv.token("carol")) as c:
                    return bool(c.recv()["type"] == "connection")
            except InvalidStatus:
                return False

        wait_for(third_gets_in, timeout=5, interval=0.05)


# -- origins -------------------------------------------------------------------------------------


def test_allowed_origins(make_server: Callable[..., Server]) -> None:
    srv = make_server(ALLOWED_ORIGINS="https://app.example.com,http://localhost:3000")
    tok = srv.token("alice")
    for bad in (
        "https://evil.example.com",
        "https://app.example.com.evil.net",
        "null",
        "http://localhost:3001",
    ):
        with pytest.raises(InvalidStatus) as refused:
            HClient(srv.ws_url, origin=bad, token=tok)
        assert refused.value.response.status_code == 403, bad
    for good in ("https://app.example.com", "http://localhost:3000"):
        with HClient(srv.ws_url, origin=good, token=tok, channel="orig") as c:
            assert joined(c)["channel"] == "orig"
    with Client(srv.ws_url, token=tok, channel="orig") as c:  # no Origin header at all
        assert joined(c)["channel"] == "orig"


# -- slow readers ----------------------------------------------------------------------------------


def test_slow_reader_closed_4008_others_keep_receiving(make_server: Callable[..., Server]) -> None:
    srv = make_server(SEND_BUFFER_LIMIT_BYTES="65536", RATE_LIMIT_MESSAGES="0")
    ch = "slow.room"
    content = "y" * 16000
    with (
        RawWS(srv.port, query={"token": srv.token("sloth"), "channel": ch}, rcvbuf=4096) as slow,
        member(srv, "fast", ch) as fast,
        member(srv, "pub", ch) as pub,
    ):
        assert slow.status == 101
        assert slow.recv_json()["action"] == "connect"
        offsets: list[int] = []
        closed = False
        for n in range(1, 1201):  # at most ~19 MB
            pub.publish(ch, content)
            assert expect(pub, "message", "ack")["data"]["metadata"]["offset"] == n
            got = expect(fast, "message", "send")["data"]
            assert got["content"] == content
            offsets.append(got["metadata"]["offset"])
            if n % 20 == 0:
                _, body, _ = srv.http("GET", "/metrics/connections")
                if body["slow_reader_closes"] >= 1:
                    closed = True
                    break
        assert closed, "the reader that never reads was not closed"
        assert offsets == list(range(1, len(offsets) + 1))  # the fast one got every message
        # the slow one now reads what was sent to it: some messages, then CLOSE 4008
        assert slow.close_code() == 4008
        # and the others go on
        for _ in range(5):
            pub.publish(ch, "after")
            expect(pub, "message", "ack")
            assert expect(fast, "message", "send")["data"]["content"] == "after"
        _, body, _ = srv.http("GET", "/metrics/connections")
        assert body["slow_reader_closes"] == 1
    # the close is logged as a security event naming the reader (Session.slow_reader_event)
    logged = [o for o in srv.log_lines() if o.get("event") == "slow_reader"]
    assert [(o["level"], o["data"]["details"]["user_id"]) for o in logged] == [("warn", "sloth")]


# -- the upgrade request ---------------------------------------------------------------------------


def test_firefox_connection_header_is_accepted(server: Server) -> None:
    with RawWS(
        server.port,
        query={"token": server.token("fox"), "channel": "ff.room"},
        connection="keep-alive, Upgrade",
    ) as raw:
        assert raw.status == 101, raw.status_line
        assert raw.headers["upgrade"].lower() == "websocket"
        assert raw.headers["sec-websocket-accept"] == raw.expected_accept()
        first = raw.recv_json()
        assert (first["type"], first["action"]) == ("connection", "connect"), first
        assert first["data"]["user_id"] == "fox" and first["data"]["channel"] == "ff.room"
        raw.send_json(
            {
                "type": "message",
                "action": "send",
                "data": {"channel": "ff.room", "content": "hi", "metadata": {"sequence": 1}},
            }
        )
        ack = raw.recv_json()
        assert (ack["type"], ack["action"]) == ("message", "ack"), ack


# -- channel caps (docs/protocol.md §5: what one client can make a worker hold) ---------------


def _channel_limit(c: Client, channel: str, reason: str, limit: int) -> None:
    err = expect_error(c, "CHANNEL_LIMIT")
    d = err["details"]
    assert (d["component"], d["reason"], d["channel"], d["limit"]) == (
        "channel",
        reason,
        channel,
        limit,
    ), err


def test_max_channels_per_connection(make_server: Callable[..., Server]) -> None:
    srv = make_server(MAX_CHANNELS_PER_CONNECTION="3", RATE_LIMIT_MESSAGES="1000")
    with (
        Client(srv.ws_url, token=srv.token("hoarder")) as c,
        Client(srv.ws_url, token=srv.token("reader"), channel="cap.d") as reader,
    ):
        expect(c, "connection", "connect")
        joined(reader)
        for name in ("cap.a", "cap.b", "cap.c"):
            c.join(name)
            assert joined(c)["channel"] == name
        # one more is refused, whether the channel exists (cap.d) or not (cap.e) ...
        for name in ("cap.d", "cap.e"):
            c.join(name)
            _channel_limit(c, name, "channels_per_connection", 3)
        # ... it joined nothing: a publication there does not reach it, and it may not send
        reader.publish("cap.d", "not for the hoarder")
        expect(reader, "message", "ack")
        c.publish("cap.d", "refused")
        assert expect_error(c, "NOT_A_MEMBER")["details"]["channel"] == "cap.d"
        # the connection stays usable: a re-join of a member's channel is no new channel,
        # its channels still work, and after a leave there is room again
        c.join("cap.a")
        assert joined(c)["channel"] == "cap.a"
        c.publish("cap.a", "still here")
        expect(c, "message", "ack")
        c.leave("cap.a")
        expect(c, "connection", "disconnect")
        c.join("cap.d")
        assert joined(c)["channel"] == "cap.d"
        reader.publish("cap.d", "now for it too")
        expect(reader, "message", "ack")
        assert expect(c, "message", "send")["data"]["content"] == "now for it too"
        _status_ok(c)
    warned = [line for line in srv.log_lines() if line.get("event") == "channel_limit"]
    assert warned and warned[0]["level"] == "warn", warned


def test_max_channels_per_worker(make_server: Callable[..., Server]) -> None:
    srv = make_server(MAX_CHANNELS="3", RATE_LIMIT_MESSAGES="1000")
    with (
        Client(srv.ws_url, token=srv.token("first")) as first,
        Client(srv.ws_url, token=srv.token("second")) as second,
    ):
        expect(first, "connection", "connect")
        expect(second, "connection", "connect")
        for name in ("wcap.1", "wcap.2", "wcap.3"):
            first.join(name)
            joined(first)
        # a join of a live channel is no new one: allowed at the cap
        second.join("wcap.1")
        joined(second)
        # a join that would make a fourth live channel is refused, the connection stays
        second.join("wcap.4")
        _channel_limit(second, "wcap.4", "channels_per_worker", 3)
        second.publish("wcap.1", "still usable")
        expect(second, "message", "ack")
        assert expect(first, "message", "send")["data"]["content"] == "still usable"
        # the URL's channel too: the first frame, then the error, and the connection stays
        with Client(srv.ws_url, token=srv.token("third"), channel="wcap.5") as third:
            assert joined(third)["channel"] is None
            _channel_limit(third, "wcap.5", "channels_per_worker", 3)
            _status_ok(third)
        # a channel left empty makes room again (dropped by the timer, or at the cap)
        first.leave("wcap.3")
        expect(first, "connection", "disconnect")

        def room() -> bool:
            second.join("wcap.4")
            msg = second.recv()
            if msg["type"] == "error":
                assert msg["code"] == "CHANNEL_LIMIT", msg
                time.sleep(0.3)
                return False
            assert (msg["type"], msg["action"], msg["data"]["channel"]) == (
                "connection",
                "connect",
                "wcap.4",
            ), msg
            return True

        wait_for(room, timeout=15)
