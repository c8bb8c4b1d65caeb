"""docs/protocol.md §13, the inbound budget, over real sockets: every frame a client sends
(control messages and pings too) costs its user's budget (its peer address's, when anonymous),
shared by all their connections and kept across reconnects; a flood gets RATE_LIMITED errors,
then close 1008, while everyone else is served."""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from tests.conftest import Server
from tests.integration.helpers import (
    Op,
    RawWS,
    build_frame,
    expect,
)
from tests.integration.wsclient import Client

#: RATE_LIMIT_MESSAGES of these tests, over a window long enough (one token every 30 s) that
#: nothing refills while a test runs
BUDGET = 20
WINDOW = str(BUDGET * 30)
#: refusals (strikes) before the close when nothing refills (docs/protocol.md §13):
#: max(10, the budget), so that a client that sent one budget's worth before it heard the
#: first refusal stays open
REFUSALS_BEFORE_CLOSE = max(10, BUDGET)

STATUS = {"type": "system", "action": "status", "data": {}}


def _budget_server(make_server: Callable[..., Server]) -> Server:
    return make_server(RATE_LIMIT_MESSAGES=str(BUDGET), RATE_LIMIT_WINDOW_S=WINDOW)


def _raw(srv: Server, user: str | None) -> RawWS:
    ws = RawWS(srv.port, query={"token": srv.token(user)} if user else None)
    assert ws.status == 101, ws.status_line
    assert ws.recv_json()["action"] == "connect"  # the greeting
    return ws


def _until_close(ws: RawWS) -> tuple[list[dict[str, Any]], int, int | None]:
    """Every text message until the server's CLOSE, the pongs, and the close code."""
    got: list[dict[str, Any]] = []
    pongs = 0
    while True:
        _, op, payload = ws.recv_frame()
        if op == Op.TEXT:
            got.append(json.loads(payload))
        elif op == Op.PONG:
            pongs += 1
        elif op == Op.CLOSE:
            ws.send_frame(Op.CLOSE, payload[:2])
            return got, pongs, struct.unpack("!H", payload[:2])[0] if payload else None


def _refused(err: dict[str, Any]) -> None:
    """A refusal by the budget: RATE_LIMITED, reason user, with when to retry."""
    assert err["type"] == "error" and err["code"] == "RATE_LIMITED", err
    d = err["details"]
    assert d["component"] == "ratelimit" and d["reason"] == "user", err
    assert isinstance(d["retry_after_ms"], int) and d["retry_after_ms"] > 0, err


def test_status_flood_is_refused_then_closed_others_served(
    make_server: Callable[..., Server],
) -> None:
    srv = _budget_server(make_server)
    with Client(srv.ws_url, token=srv.token("bob"), channel="budget.room") as bob:
        expect(bob, "connection", "connect")
        with _raw(srv, "mallory") as flood:
            # 5000 system/status in one burst, nothing read meanwhile
            flood.send_raw(build_frame(Op.TEXT, json.dumps(STATUS).encode()) * 5000)

            # another user is answered meanwhile: status and a publication
            bob.send(STATUS)
            expect(bob, "system", "status")
            seq = bob.publish("budget.room", "still served")
            assert expect(bob, "message", "ack")["data"]["metadata"]["sequence"] == seq

            got, _, code = _until_close(flood)
        statuses = [m for m in got if m["type"] == "system"]
        errors = [m for m in got if m["type"] == "error"]
        assert len(statuses) == BUDGET, len(statuses)  # what the budget allows, no more
        assert len(errors) == REFUSALS_BEFORE_CLOSE, errors[-3:]  # one per refusal, bounded
        for err in errors:
            _refused(err)
        assert got == statuses + errors, "each refusal after the budget, none before"
        assert code == 1008
        bob.send(STATUS)
        expect(bob, "system", "status")
    assert any(
        line.get("event") == "rate_limit_close" and line["data"]["details"]["user_id"] == "mallory"
        for line in srv.log_lines()
    )


def test_ping_flood_is_bounded_by_the_budget(make_server: Callable[..., Server]) -> None:
    srv = _budget_server(make_server)
    with _raw(srv, "mallory") as flood:
        flood.send_raw(build_frame(Op.PING, b"p") * 5000)
        got, pongs, code = _until_close(flood)
    # a refused ping is not answered and gets no error: the close says why
    assert pongs == BUDGET and got == [] and code == 1008


def test_reconnecting_does_not_refill_the_budget(make_server: Callable[..., Server]) -> None:
    srv = _budget_server(make_server)
    for user in ("mallory", None):  # a user, and anonymous clients of one address
        with _raw(srv, user) as flood:
            flood.send_raw(build_frame(Op.TEXT, json.dumps(STATUS).encode()) * 100)
            assert _until_close(flood)[2] == 1008
        # a new connection, even with another client_id: the first message is refused
        with Client(srv.ws_url, token=srv.token(user) if user else None, client_id="new") as c:
            expect(c, "connection", "connect")
            c.send(STATUS)
            _refused(c.recv())
    # another user is not affected
    with Client(srv.ws_url, token=srv.token("bob")) as bob:
        expect(bob, "connection", "connect")
        bob.send(STATUS)
        expect(bob, "system", "status")


def test_connections_of_one_user_share_one_budget(make_server: Callable[..., Server]) -> None:
    srv = make_server(RATE_LIMIT_MESSAGES="6", RATE_LIMIT_WINDOW_S="600")
    ch = "budget.shared"
    with (
        Client(srv.ws_url, token=srv.token("alice"), client_id="a1", channel=ch) as a1,
        Client(srv.ws_url, token=srv.token("alice"), client_id="a2", channel=ch) as a2,
        Client(srv.ws_url, token=srv.token("bob"), channel=ch) as bob,
    ):
        for c in (a1, a2, bob):
            expect(c, "connection", "connect")
        # the join in the URL is part of the upgrade; each message from here costs a token
        for i in range(3):
            a1.publish(ch, f"a1-{i}")
            assert expect(a1, "message", "ack")["data"]["metadata"]["sequence"] == i + 1
        a2.send(STATUS)
        a2.recv_until("system", "status")  # after a1's three publications
        for i in range(2):
            a2.publish(ch, f"a2-{i}")
            a2.recv_until("message", "ack")
        # six messages between the two connections: the seventh is refused, on either
        seq = a2.publish(ch, "one too many")
        err = a2.recv_until("error")
        _refused(err)
        assert err["details"]["channel"] == ch and err["details"]["sequence"] == seq, err
        a1.send(STATUS)
        _refused(a1.recv_until("error"))
        # bob's budget is his own
        bob.publish(ch, "bob")
        bob.recv_until("message", "ack")
        # a refusal now and then is not a flood: both connections stay open and served
        for c in (a1, a2):
            assert c.recv_until("message", "send")["data"]["content"] == "bob"


#: pongs and continuation frames per token (docs/protocol.md §13)
FREE_FRAMES_PER_TOKEN = 64


def test_pong_flood_is_bounded_by_the_budget(make_server: Callable[..., Server]) -> None:
    """Unsolicited pongs are not free for ever: one token per 64, then close 1008."""
    srv = _budget_server(make_server)
    with _raw(srv, "mallory") as flood:
        flood.send_raw(build_frame(Op.PONG, b"p") * 5000)
        got, pongs, code = _until_close(flood)
    assert (got, pongs, code) == ([], 0, 1008)
    assert any(
        line.get("event") == "rate_limit_close" and line["data"]["details"]["user_id"] == "mallory"
        for line in srv.log_lines()
    )


def test_endless_continuation_frames_are_closed(make_server: Callable[..., Server]) -> None:
    """A message that never ends (empty non-final continuations for ever, which never pass
    MAX_MESSAGE_BYTES) costs one token per 64 of its frames: close 1008."""
    srv = _budget_server(make_server)
    with _raw(srv, "mallory") as flood:
        flood.send_raw(build_frame(Op.TEXT, b"{", fin=False))
        flood.send_raw(build_frame(Op.CONT, b"", fin=False) * 5000)
        got, _, code = _until_close(flood)
    assert (got, code) == ([], 1008)


def test_a_message_in_many_fragments_and_some_pongs_are_served(
    make_server: Callable[..., Server],
) -> None:
    """Below the budget, fragments and pongs cost only a token per 64: a status request in
    200 fragments (plus 100 pongs) is answered, and the connection stays open."""
    srv = _budget_server(make_server)
    with _raw(srv, "alice") as ws:
        body = json.dumps(STATUS).encode()
        pieces = [body[:1]] + [b""] * 198 + [body[1:]]
        frames = [build_frame(Op.TEXT, pieces[0], fin=False)]
        frames += [build_frame(Op.CONT, p, fin=False) for p in pieces[1:-1]]
        frames.append(build_frame(Op.CONT, pieces[-1]))
        ws.send_raw(b"".join(frames) + build_frame(Op.PONG, b"") * 100)
        reply = ws.recv_json()
        assert reply["type"] == "system" and reply["action"] == "status", reply
        ws.send_json(STATUS)
        reply = ws.recv_json()
        assert reply["type"] == "system" and reply["action"] == "status", reply


def test_refused_join_and_leave_name_their_channel(make_server: Callable[..., Server]) -> None:
    """A join or leave the budget refuses names its channel (so that a client knows which
    join to send again after `retry_after_ms`); a few refusals do not close."""
    srv = make_server(RATE_LIMIT_MESSAGES="2", RATE_LIMIT_WINDOW_S="600")
    with Client(srv.ws_url, token=srv.token("alice")) as c:
        expect(c, "connection", "connect")
        c.join("budget.j1")
        c.join("budget.j2")
        assert expect(c, "connection", "connect")["data"]["channel"] == "budget.j1"
        assert expect(c, "connection", "connect")["data"]["channel"] == "budget.j2"
        c.join("budget.j3")
        err = c.recv()
        _refused(err)
        assert err["details"]["channel"] == "budget.j3" and err["details"]["sequence"] is None
        c.leave("budget.j1")
        err = c.recv()
        _refused(err)
        assert err["details"]["channel"] == "budget.j1", err
        c.send({"type": "connection", "action": "connect", "data": {"channel": "bad name!"}})
        err = c.recv()
        _refused(err)
        assert err["details"]["channel"] is None, err
        c.nothing()


def test_flood_close_waits_for_one_budget_of_refusals(make_server: Callable[..., Server]) -> None:
    """A client that sent a burst of twice its budget before hearing a refusal (a budget of
    30, above the floor of 10): every frame over the budget is refused, none closes; one
    more refusal in a row than the budget closes with 1008."""
    srv = make_server(RATE_LIMIT_MESSAGES="30", RATE_LIMIT_WINDOW_S="9000")
    with _raw(srv, "alice") as ws:
        ws.send_raw(build_frame(Op.TEXT, json.dumps(STATUS).encode()) * 59)
        got = [ws.recv_json() for _ in range(59)]
        assert [m["type"] for m in got] == ["system"] * 30 + ["error"] * 29
        ws.send_raw(build_frame(Op.TEXT, json.dumps(STATUS).encode()))
        got, _, code = _until_close(ws)
        assert len(got) == 1 and code == 1008
        _refused(got[0])


def test_oversized_message_on_an_empty_budget_is_still_message_too_large(
    make_server: Callable[..., Server],
) -> None:
    """A message over MAX_MESSAGE_BYTES is answered MESSAGE_TOO_LARGE (with `limit`, which
    a client matches it by) even when the budget is empty; it is a refusal all the same, so
    a run of them is closed like any flood."""
    srv = make_server(RATE_LIMIT_MESSAGES="2", RATE_LIMIT_WINDOW_S="600", MAX_MESSAGE_BYTES="1024")
    big = build_frame(Op.TEXT, json.dumps({"pad": "x" * 2000}).encode())
    with _raw(srv, "alice") as ws:
        ws.send_raw(build_frame(Op.TEXT, json.dumps(STATUS).encode()) * 2)
        assert [ws.recv_json()["type"] for _ in range(2)] == ["system", "system"]
        ws.send_raw(big * 3)
        for _ in range(3):
            err = ws.recv_json()
            assert err["code"] == "MESSAGE_TOO_LARGE" and err["details"]["limit"] == 1024, err
        ws.send_raw(big * 20)
        got, _, code = _until_close(ws)
        assert code == 1008 and len(got) == 10 - 3, got  # max(10, 2) strikes in all
        assert {m["code"] for m in got} == {"MESSAGE_TOO_LARGE"}


def test_flood_with_a_large_budget_is_closed(make_server: Callable[..., Server]) -> None:
    """A budget of 1000 per second refills a token every millisecond: a publication flood
    gets some of its frames accepted all the time, and is closed all the same (1008), since
    the refusals are bounded to about three budgets per window, not counted in a row."""
    srv = make_server(RATE_LIMIT_MESSAGES="1000", RATE_LIMIT_WINDOW_S="1")
    pub = {
        "type": "message",
        "action": "send",
        "data": {"channel": "x", "content": "a", "metadata": {"sequence": 1}},
    }
    chunk = build_frame(Op.TEXT, json.dumps(pub).encode()) * 2000
    with _raw(srv, "mallory") as flood:
        flood.sock.settimeout(20)
        closed: list[int | None] = []

        def drain() -> None:
            closed.append(_until_close(flood)[2])

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        deadline = time.monotonic() + 15
        while not closed and time.monotonic() < deadline:
            try:
                flood.send_raw(chunk)
            except OSError:
                break
        reader.join(20)
    assert closed == [1008]
    assert any(line.get("event") == "rate_limit_close" for line in srv.log_lines())
