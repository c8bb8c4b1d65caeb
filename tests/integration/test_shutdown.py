"""Graceful shutdown (SIGTERM/SIGINT) and the JSON log (docs/operations.md §7 and §9)."""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import jwt
import pytest
from websockets.sync.client import connect

from tests.conftest import SECRET, Server
from tests.integration.rawhttp import RawConn, exchange, request_bytes, upgrade_bytes
from tests.integration.wsclient import Client


def wait_exit(srv: Server, timeout: float) -> tuple[int, float]:
    """(exit status, seconds it took) for a server already signalled; fails past `timeout`."""
    assert srv.proc is not None
    start = time.monotonic()
    while srv.proc.poll() is None:
        if time.monotonic() - start > timeout:
            srv.proc.kill()
            srv.proc.wait()
            raise AssertionError(f"server did not exit within {timeout}s")
        time.sleep(0.02)
    return srv.proc.returncode, time.monotonic() - start


def signal_server(srv: Server, sig: int) -> None:
    assert srv.proc is not None and srv.proc.poll() is None
    srv.proc.send_signal(sig)


def notice_then_1001(c: Client) -> list[dict[str, Any]]:
    """Everything `c` receives until the close; asserts it ends with a system/status notice
    followed by close 1001."""
    from websockets.exceptions import ConnectionClosed

    got: list[dict[str, Any]] = []
    try:
        while True:
            got.append(c.recv(timeout=10))
    except ConnectionClosed as closed:
        assert closed.rcvd is not None, "closed without a close frame"
        assert closed.rcvd.code == 1001, closed.rcvd
    assert got, "no notice before the close"
    last = got[-1]
    assert last["type"] == "system" and last["action"] == "status", got
    assert last["data"] == {"message": "server shutting down", "severity": "warning"}, last
    return got


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_notifies_clients_closes_1001_and_exits_0(
    make_server: Callable[..., Server], sig: int
) -> None:
    timeout_s = 4.0
    srv = make_server(SHUTDOWN_TIMEOUT_S=timeout_s)
    clients = [
        Client(srv.ws_url, token=srv.token("a"), channel="sd.room"),
        Client(srv.ws_url, token=srv.token("b"), channel="sd.room"),
        Client(srv.ws_url, token=srv.token("c")),
        Client(srv.ws_url, token=srv.token("d"), channel="sd.other"),
    ]
    try:
        for c in clients:
            c.recv_until("connection", "connect")
        signal_server(srv, sig)
        for c in clients:
            notice_then_1001(c)
        code, took = wait_exit(srv, timeout_s + 2)
        assert code == 0, srv.log_text()[-2000:]
        assert took < timeout_s, f"clients closed at once, yet exit took {took:.2f}s"
    finally:
        for c in clients:
            c.close()
    events = [line.get("event") for line in srv.log_lines()]
    assert "server_stopped" in events, events


def test_unresponsive_client_does_not_hold_shutdown_past_the_timeout(
    make_server: Callable[..., Server],
) -> None:
    timeout_s = 2.0
    srv = make_server(SHUTDOWN_TIMEOUT_S=timeout_s)
    stalled = RawConn(srv.port)
    try:
        stalled.send(upgrade_bytes(f"/ws?token={srv.token('stalled')}&channel=sd.stall"))
        status_code, _, _ = stalled.read_head()
        assert status_code == 101
        assert stalled.read_ws_text()["action"] == "connect"
        with Client(srv.ws_url, token=srv.token("ok"), channel="sd.stall") as polite:
            polite.recv_until("connection", "connect")
            signal_server(srv, signal.SIGTERM)
            notice_then_1001(polite)
        # while it waits for the stalled client, the server accepts nobody new
        assert srv.proc is not None and srv.proc.poll() is None
        with pytest.raises(OSError):
            exchange(srv.port, request_bytes("GET", "/health"))
        code, _ = wait_exit(srv, timeout_s + 3)
        assert code == 0
        # the stalled client was told too: notice, then close 1001
        frames = []
        while True:
            op, payload = stalled.read_ws_frame()
            frames.append((op, payload))
            if op == 0x88:
                break
        notice = json.loads(frames[-2][1])
        assert notice["type"] == "system" and notice["action"] == "status", frames
        assert int.from_bytes(frames[-1][1][:2], "big") == 1001, frames
    finally:
        stalled.close()


def test_messages_published_just_before_shutdown_are_delivered(
    make_server: Callable[..., Server],
) -> None:
    srv = make_server()
    with (
        Client(srv.ws_url, token=srv.token("pub"), channel="sd.q") as a,
        Client(srv.ws_url, token=srv.token("sub"), channel="sd.q") as b,
    ):
        a.recv_until("connection", "connect")
        b.recv_until("connection", "connect")
        for i in range(5):
            a.publish("sd.q", f"last words {i}")
        signal_server(srv, signal.SIGTERM)
        got = notice_then_1001(b)
        contents = [
            m["data"]["content"] for m in got if m["type"] == "message" and m["action"] == "send"
        ]
        assert contents == [f"last words {i}" for i in range(5)], got
        a_got = notice_then_1001(a)
        acks = [m for m in a_got if m["type"] == "message" and m["action"] == "ack"]
        assert len(acks) == 5, a_got
    code, _ = wait_exit(srv, 10)
    assert code == 0


def test_queued_backlog_of_a_slow_reader_is_flushed_before_the_close(
    make_server: Callable[..., Server],
) -> None:
    """A member that is not reading has ~9 MB queued (more than the kernel's socket buffers
    hold) when SIGTERM comes: it still gets every message, in order, then the notice, then
    close 1001."""
    srv = make_server(
        SEND_BUFFER_LIMIT_BYTES=64 * 1024 * 1024, SHUTDOWN_TIMEOUT_S=10, RATE_LIMIT_MESSAGES=0
    )
    n, size = 150, 60_000
    with RawConn(srv.port, rcvbuf=16 * 1024) as slow:
        slow.send(upgrade_bytes(f"/ws?token={srv.token('slow')}&channel=sd.big"))
        assert slow.read_head()[0] == 101
        assert slow.read_ws_text()["action"] == "connect"
        with Client(srv.ws_url, token=srv.token("pub"), channel="sd.big") as a:
            a.recv_until("connection", "connect")
            for i in range(n):
                a.publish("sd.big", f"{i:04d}" + "x" * size)
            for _ in range(n):
                assert a.recv_until("message", "ack")["data"]["channel"] == "sd.big"
            signal_server(srv, signal.SIGTERM)
            notice_then_1001(a)
        # now read the backlog
        seen = []
        while True:
            op, payload = slow.read_ws_frame()
            if op == 0x88:
                assert int.from_bytes(payload[:2], "big") == 1001, payload
                break
            assert op == 0x81, hex(op)
            msg = json.loads(payload)
            seen.append(msg)
        slow.send_ws_close(1001)
    contents = [m["data"]["content"][:4] for m in seen if m["type"] == "message"]
    assert contents == [f"{i:04d}" for i in range(n)], f"{len(contents)} of {n} delivered"
    assert seen[-1]["type"] == "system" and seen[-1]["action"] == "status", seen[-1]
    code, _ = wait_exit(srv, 12)
    assert code == 0


# -- logs -------------------------------------------------------------------------------------

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]00:?00)$")


def test_log_shape_and_no_token_in_the_log(make_server: Callable[..., Server]) -> None:
    static_admin = "static-admin-0123456789-abcdefghij"
    srv = make_server(LOG_LEVEL="debug", ADMIN_TOKEN=static_admin, RATE_LIMIT_MESSAGES=3)
    now = int(time.time())
    user = srv.token("alice")
    header_user = srv.token("carol")
    fresh = srv.token("alice", ttl=7200)
    admin = srv.admin()
    expired = jwt.encode({"sub": "eve", "exp": now - 100}, SECRET, algorithm="HS256")
    forged = srv.token("mallory", secret="forged-secret-forged-secret-forged-0123")
    opaque = "opaque-credential-abc123XYZ"
    secrets = [user, header_user, fresh, admin, expired, forged, opaque, static_admin, SECRET]

    # a normal session: token in the query, join, publish, refresh, a bad refresh, rate limit
    with Client(srv.ws_url, token=user, channel="log.room") as c:
        c.recv_until("connection", "connect")
        c.publish("log.room", "hello")
        c.recv_until("message", "ack")
        c.send({"type": "connection", "action": "refresh", "data": {"token": fresh}})
        c.recv_until("connection", "refresh")
        c.send({"type": "connection", "action": "refresh", "data": {"token": forged}})
        assert c.recv_until("error")["code"] == "AUTH_INVALID"
        for i in range(4):
            c.publish("log.room", f"m{i}")
        assert c.recv_until("error")["code"] == "RATE_LIMITED"
    # token in an Authorization header
    with connect(
        srv.ws_url + "?channel=log.room",
        additional_headers={"Authorization": f"Bearer {header_user}"},
    ) as ws:
        assert json.loads(ws.recv(timeout=5))["data"]["user_id"] == "carol"
    # refused tokens: expired, forged, not a JWT at all
    for bad, code in (
        (expired, "TOKEN_EXPIRED"),
        (forged, "AUTH_INVALID"),
        (opaque, "AUTH_INVALID"),
    ):
        with Client(srv.ws_url, token=bad, channel="log.room") as c:
            assert c.recv_until("error")["code"] == code
            assert c.closed_with() == 4001
    # admin over HTTP, good and bad, and tokens in the query of plain requests
    assert srv.http("GET", "/ws/channels", token=admin)[0] == 200
    assert srv.http("GET", "/ws/channels", token=static_admin)[0] == 200
    assert srv.http("GET", "/ws/channels", token=forged)[0] == 401
    assert srv.http("GET", "/ws/channels", token=user)[0] == 403
    assert srv.http("GET", f"/ws/status?token={user}")[0] == 200
    assert srv.http("GET", f"/nope?token={user}")[0] == 404
    # upgrades that never become WebSockets, with the token in the query
    assert exchange(srv.port, upgrade_bytes(f"/elsewhere?token={user}")).status == 404
    assert exchange(srv.port, upgrade_bytes(f"/ws?token={user}&since=x")).status == 400
    bad_version = upgrade_bytes(f"/ws?token={user}", headers={"Sec-WebSocket-Version": "99"})
    with RawConn(srv.port) as raw:
        raw.send(bad_version)
        assert raw.read_head()[0] >= 400

    signal_server(srv, signal.SIGTERM)
    status, _ = wait_exit(srv, 10)
    assert status == 0

    text = srv.log_text()
    for secret in secrets:
        assert secret not in text, f"a credential appears in the log: {secret[:20]}..."
        if secret.count(".") == 2:
            signature = secret.rsplit(".", 1)[1]
            assert signature not in text, "a token signature appears in the log"

    lines = text.splitlines()
    assert lines
    parsed = []
    for raw_line in lines:
        obj = json.loads(raw_line)  # every line is one JSON object
        assert isinstance(obj, dict), raw_line
        parsed.append(obj)
        assert set(obj) >= {"timestamp", "level", "event", "data"}, obj
        assert TIMESTAMP.match(obj["timestamp"]), obj["timestamp"]
        datetime.fromisoformat(obj["timestamp"].replace("Z", "+00:00"))
        assert obj["level"] in ("debug", "info", "warn", "error"), obj
        assert isinstance(obj["event"], str) and obj["event"], obj
        data = obj["data"]
        assert isinstance(data, dict) and set(data) >= {"component", "details"}, obj
        assert isinstance(data["component"], str) and data["component"], obj
        assert isinstance(data["details"], dict), obj

    # security events are logged at warn
    warns = [o for o in parsed if o["level"] == "warn"]
    warn_text = json.dumps(warns)
    assert "expired" in warn_text.lower(), "no warn line for the expired token"
    assert len([o for o in warns if "auth" in json.dumps(o).lower()]) >= 3, warns
    assert any("rate" in json.dumps(o).lower() for o in warns), "no warn line for the rate limit"
    # timestamps are in order
    stamps = [datetime.fromisoformat(o["timestamp"].replace("Z", "+00:00")) for o in parsed]
    assert stamps == sorted(stamps)


def test_admin_auth_failures_are_logged_at_warn(server: Server) -> None:
    """docs/operations.md §7: security events (auth failures ...) are logged at warn; a refused
    admin request over HTTP is one, and the token it carried is not logged."""
    forged = server.token("mallory", admin=True, secret="forged-secret-forged-secret-forged-0123")
    user = server.token("mallory-user")
    before = len(server.log_lines())
    assert server.http("GET", "/ws/channels", token=forged)[0] == 401
    assert server.http("DELETE", "/ws/channels/x", token=user)[0] == 403
    assert server.http("POST", "/ws/broadcast", {"message": "x"})[0] == 401

    def logged() -> int:
        """admin_auth_failed lines, plus those held back and counted by the throttle."""
        new = server.log_lines()[before:]
        written = [o for o in new if o.get("event") == "admin_auth_failed"]
        assert all(o["level"] == "warn" for o in written)
        held: int = sum(
            o["data"]["details"]["suppressed"].get("admin_auth_failed", 0)
            for o in new
            if o.get("event") == "security_events_suppressed"
        )
        return len(written) + held

    deadline = time.monotonic() + 4
    while logged() < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert logged() >= 3, f"refused admin requests logged: {server.log_lines()[before:]}"
    text = server.log_text()
    assert forged not in text and user not in text
