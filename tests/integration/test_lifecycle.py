"""Lifecycle behaviours: a silent half-open peer closed after two ping rounds, history
leaving with HISTORY_TTL_S, /health answering 503 while the server drains, and a refresh
replacing the old token's claims (not adding to them)."""

from __future__ import annotations

import signal
import struct
import time
from collections.abc import Callable

from tests.conftest import Server
from tests.integration.helpers import Op, RawWS, expect, expect_error, wait_for
from tests.integration.rawhttp import RawConn, request_bytes
from tests.integration.wsclient import Client


def test_silent_half_open_peer_is_closed_after_two_ping_rounds(
    make_server: Callable[..., Server],
) -> None:
    srv = make_server(PING_INTERVAL_S="1")
    with (
        RawWS(
            srv.port, query={"token": srv.token("mute"), "channel": "ping.room"}, timeout=15
        ) as mute,
        Client(srv.ws_url, token=srv.token("live"), channel="ping.room") as live,
    ):
        assert mute.status == 101
        assert expect(live, "connection", "connect")
        assert mute.recv_frame()[1] != Op.CLOSE  # the connect reply
        # the peer reads but never answers: one ping round sends a ping, the next finds it
        # unanswered and closes the connection (1001, "ping timeout"), nothing in between
        ops: list[int] = []
        while True:
            _, op, payload = mute.recv_frame()
            ops.append(op)
            if op == Op.CLOSE:
                break
        assert ops == [Op.PING, Op.CLOSE], ops
        assert struct.unpack("!H", payload[:2])[0] == 1001, payload
        assert payload[2:] == b"ping timeout", payload
        # a peer that answers (websockets does) stays through the same rounds
        live.send({"type": "system", "action": "status", "data": {}})
        expect(live, "system", "status")
        # the silent peer never answers the close either: the server drops the socket
        wait_for(lambda: srv.http("GET", "/ws/status")[1]["connections"]["active"] == 1, 20)
        assert mute.sock.recv(1) == b""


def test_history_leaves_after_history_ttl(make_server: Callable[..., Server]) -> None:
    srv = make_server(HISTORY_TTL_S="1")
    ch = "ttl.hist"
    with Client(srv.ws_url, token=srv.token("pub"), channel=ch) as pub:  # keeps the log
        expect(pub, "connection", "connect")
        for text in ("m1", "m2"):
            pub.publish(ch, text)
            expect(pub, "message", "ack")

        def join_since(since: int) -> tuple[bool, list[str]]:
            with Client(srv.ws_url, token=srv.token("late"), channel=ch, since=since) as late:
                hello = expect(late, "connection", "connect")
                assert hello["data"]["offset"] == 2, hello
                replayed = [late.recv()["data"]["content"] for _ in range(2 - since)]
                return hello["data"]["recovered"], replayed

        assert join_since(0) == (True, ["m1", "m2"])  # within the TTL: all of it
        started = time.monotonic()

        def expired() -> bool:
            with Client(srv.ws_url, token=srv.token("late"), channel=ch, since=0) as late:
                hello = expect(late, "connection", "connect")
                assert hello["data"]["offset"] == 2, hello  # the offsets go on
                recovered: bool = hello["data"]["recovered"]
                return not recovered

        wait_for(expired, 15, interval=0.2)
        assert time.monotonic() - started >= 0.5  # not at once: after about a second
        late_client = Client(srv.ws_url, token=srv.token("late"), channel=ch, since=2)
        with late_client as late:  # nothing missed since the current offset: still true
            assert expect(late, "connection", "connect")["data"]["recovered"] is True


def test_health_is_503_while_draining(make_server: Callable[..., Server]) -> None:
    srv = make_server(SHUTDOWN_TIMEOUT_S="30")
    with (
        RawConn(srv.port) as http,
        RawWS(srv.port, query={"token": srv.token("stays")}) as stays,
    ):
        http.send(request_bytes("GET", "/health"))
        first = http.read_response()
        assert first.status == 200 and first.json["status"] == "healthy", first
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        # the WebSocket peer never answers the close, so the server keeps draining
        assert stays.close_code() == 1001
        http.send(request_bytes("GET", "/health"))
        during = http.read_response()
        assert during.status == 503, during
        assert during.json == {"status": "down", "reason": "shutting_down"}, during
    assert srv.stop() == 0


def test_refresh_replaces_the_old_claims(server: Server) -> None:
    old = server.token("rita", admin=True, channels=["rc.a"])
    with Client(server.ws_url, token=old, channel="rc.a") as c:
        expect(c, "connection", "connect")
        new = server.token("rita", channels=["rc.b"], ttl=7200)
        c.send({"type": "connection", "action": "refresh", "data": {"token": new}})
        expect(c, "connection", "refresh")
        # what only the old token allowed is gone: its channel rc.a at once ...
        gone = expect(c, "connection", "disconnect")
        assert gone["data"]["channel"] == "rc.a", gone
        assert gone["data"]["reason"] == "not allowed by the new token", gone
        assert expect(c, "system", "status")["data"]["severity"] == "warning"
        # ... the channel the old token did not allow is allowed now ...
        c.join("rc.b")
        assert expect(c, "connection", "connect")["data"]["channel"] == "rc.b"
        # ... and neither admin nor rc.a comes back
        c.send({"type": "system", "action": "broadcast", "data": {"message": "hi"}})
        expect_error(c, "FORBIDDEN")
        c.join("rc.a")
        expect_error(c, "FORBIDDEN")
