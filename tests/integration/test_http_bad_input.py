"""Bad HTTP input: every case gets the documented JSON error, and the server keeps serving
everyone else (a fresh request and a WebSocket client connected before both still work)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import Server
from tests.integration.helpers import Op, build_frame, no_new_server_errors  # noqa: F401 (autouse)
from tests.integration.rawhttp import (
    RawConn,
    RawResponse,
    chunked,
    exchange,
    request_bytes,
    upgrade_bytes,
)
from tests.integration.wsclient import Client


@pytest.fixture
def bystander(server: Server) -> Iterator[Client]:
    """A member of channel `by.room`, connected before the bad input is sent."""
    with Client(server.ws_url, token=server.token("bystander"), channel="by.room") as c:
        assert c.recv_until("connection", "connect")["data"]["channel"] == "by.room"
        yield c


def still_serving(server: Server, bystander: Client) -> None:
    code, body, _ = server.http("GET", "/health")
    assert code == 200 and body["status"] == "healthy", body
    code, body, _ = server.http("GET", "/ws/status")
    assert code == 200 and body["connections"]["active"] >= 1, body
    bystander.send({"type": "system", "action": "status", "data": {}})
    reply = bystander.recv_until("system", "status")
    assert reply["data"]["severity"] == "info", reply
    bystander.publish("by.room", "still here")
    ack = bystander.recv_until("message", "ack")
    assert ack["data"]["channel"] == "by.room", ack


def assert_error(body: Any, code: str, field: str | None = None) -> None:
    assert isinstance(body, dict), body
    assert body.get("type") == "error" and body.get("code") == code, body
    assert isinstance(body.get("message"), str), body
    details = body["details"]
    assert isinstance(details.get("component"), str) and isinstance(details.get("reason"), str), (
        body
    )
    if field is not None:
        assert details.get("field") == field, body


# -- JSON bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/ws/channels", "/ws/broadcast"])
@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"", b'{"name": "x"', b"\xff\xfe", b'{"name": "a"} trailing', b"NaN"],
    ids=["broken", "empty", "truncated", "not-utf8", "trailing", "nan"],
)
def test_invalid_json_body(server: Server, bystander: Client, path: str, raw: bytes) -> None:
    code, body, headers = server.http("POST", path, raw=raw, token=server.admin())
    assert code == 400, body
    assert headers["Content-Type"].startswith("application/json")
    assert_error(body, "INVALID_JSON")
    bystander.quiet()  # no broadcast escaped
    still_serving(server, bystander)


@pytest.mark.parametrize("path", ["/ws/channels", "/ws/broadcast"])
@pytest.mark.parametrize("value", [[1, 2], "text", None, 42, True, [{"name": "a"}]], ids=str)
def test_body_not_an_object(server: Server, bystander: Client, path: str, value: Any) -> None:
    code, body, _ = server.http("POST", path, raw=json.dumps(value).encode(), token=server.admin())
    assert code == 400, body
    assert_error(body, "INVALID_MESSAGE", "body")
    still_serving(server, bystander)


CHANNEL_CASES: list[tuple[dict[str, Any], str]] = [
    ({}, "name"),
    ({"max_connections": 5}, "name"),
    ({"name": ""}, "name"),
    ({"name": "has space"}, "name"),
    ({"name": "slash/inside"}, "name"),
    ({"name": "x" * 129}, "name"),
    ({"name": 5}, "name"),
    ({"name": None}, "name"),
    ({"name": ["a"]}, "name"),
    ({"name": "bad.max", "max_connections": -1}, "max_connections"),
    ({"name": "bad.max", "max_connections": "10"}, "max_connections"),
    ({"name": "bad.max", "max_connections": True}, "max_connections"),
    ({"name": "bad.max", "max_connections": 1.5}, "max_connections"),
    ({"name": "bad.max", "max_connections": None}, "max_connections"),
    ({"name": "bad.max", "max_connections": 2**63}, "max_connections"),
    ({"name": "bad.rate", "message_rate_limit": -1}, "message_rate_limit"),
    ({"name": "bad.rate", "message_rate_limit": "5"}, "message_rate_limit"),
    ({"name": "bad.rate", "message_rate_limit": False}, "message_rate_limit"),
    ({"name": "bad.rate", "message_rate_limit": 1e300}, "message_rate_limit"),
    ({"name": "bad.auth", "require_auth": "yes"}, "require_auth"),
    ({"name": "bad.auth", "require_auth": 1}, "require_auth"),
    ({"name": "bad.auth", "require_auth": None}, "require_auth"),
    ({"name": "bad.hist", "history_size": 100001}, "history_size"),
    ({"name": "bad.hist", "history_size": -1}, "history_size"),
    ({"name": "bad.hist", "history_size": "10"}, "history_size"),
    ({"name": "bad.pres", "presence": "true"}, "presence"),
    ({"name": "bad.pres", "presence": 0}, "presence"),
    ({"name": "bad.unknown", "colour": "red"}, "colour"),
    ({"name": "bad.unknown", "maxConnections": 5}, "maxConnections"),
]


@pytest.mark.parametrize(
    ("body_in", "field"), CHANNEL_CASES, ids=[f"{f}-{i}" for i, (_, f) in enumerate(CHANNEL_CASES)]
)
def test_channel_field_errors(
    server: Server, bystander: Client, body_in: dict[str, Any], field: str
) -> None:
    admin = server.admin()
    code, body, _ = server.http("POST", "/ws/channels", body_in, token=admin)
    assert code == 400, body
    assert_error(body, "INVALID_MESSAGE", field)
    name = body_in.get("name")
    if field != "name":
        code, got, _ = server.http("GET", f"/ws/channels/{name}", token=admin)
        assert code == 404, f"a refused config was stored: {got}"
    still_serving(server, bystander)


def test_refused_update_leaves_the_config_unchanged(server: Server, bystander: Client) -> None:
    admin = server.admin()
    good = {"name": "bad.keep", "max_connections": 3, "require_auth": False}
    code, stored, _ = server.http("POST", "/ws/channels", good, token=admin)
    assert code == 201 and stored["max_connections"] == 3, stored
    code, body, _ = server.http(
        "POST",
        "/ws/channels",
        {"name": "bad.keep", "max_connections": 9, "presence": "no"},
        token=admin,
    )
    assert code == 400
    assert_error(body, "INVALID_MESSAGE", "presence")
    code, now, _ = server.http("GET", "/ws/channels/bad.keep", token=admin)
    assert code == 200 and now["max_connections"] == 3, now
    still_serving(server, bystander)


BROADCAST_CASES: list[tuple[dict[str, Any], str]] = [
    ({"severity": "info"}, "message"),
    ({"message": "", "severity": "info"}, "message"),
    ({"message": 5, "severity": "info"}, "message"),
    ({"message": None, "severity": "info"}, "message"),
    ({"message": "hi", "severity": "fatal"}, "severity"),
    ({"message": "hi", "severity": 3}, "severity"),
    ({"message": "hi", "severity": "INFO"}, "severity"),
    ({"message": "hi", "severity": "info", "channel": "bad name"}, "channel"),
    ({"message": "hi", "severity": "info", "channel": 5}, "channel"),
    ({"message": "hi", "severity": "info", "channel": ""}, "channel"),
    ({"message": "hi", "severity": "info", "target": "all"}, "target"),
]


@pytest.mark.parametrize(
    ("body_in", "field"),
    BROADCAST_CASES,
    ids=[f"{f}-{i}" for i, (_, f) in enumerate(BROADCAST_CASES)],
)
def test_broadcast_field_errors(
    server: Server, bystander: Client, body_in: dict[str, Any], field: str
) -> None:
    code, body, _ = server.http("POST", "/ws/broadcast", body_in, token=server.admin())
    assert code == 400, body
    assert_error(body, "INVALID_MESSAGE", field)
    bystander.quiet()  # a refused broadcast reaches nobody
    still_serving(server, bystander)


# -- size limits ------------------------------------------------------------------------------


def _padded(n: int) -> bytes:
    """A valid channel config JSON of exactly n bytes (whitespace padding)."""
    core = b'{"name": "big.body", "require_auth": false}'
    assert n >= len(core) + 1
    return core[:-1] + b" " * (n - len(core)) + b"}"


def test_body_over_limit_is_413(make_server: Callable[..., Server]) -> None:
    srv = make_server(MAX_HTTP_BODY_BYTES=1024)
    admin = srv.admin()
    with Client(srv.ws_url, token=srv.token("by"), channel="by.room") as by:
        by.recv_until("connection", "connect")
        for size in (1025, 4096, 64 * 1024):
            resp = exchange(
                srv.port, request_bytes("POST", "/ws/channels", _padded(size), token=admin)
            )
            assert resp.status == 413, (size, resp)
            assert_error(resp.json, "MESSAGE_TOO_LARGE")
            still_serving(srv, by)
        # exactly at the limit is fine
        code, body, _ = srv.http("POST", "/ws/channels", raw=_padded(1024), token=admin)
        assert code == 201, body
        # the same through urllib (a client a user would use)
        code, body, _ = srv.http(
            "POST", "/ws/broadcast", raw=b'{"message": "' + b"a" * 2000 + b'"}', token=admin
        )
        assert code == 413, body
        assert_error(body, "MESSAGE_TOO_LARGE")
        by.quiet()
        still_serving(srv, by)


def test_large_body_over_limit_is_413_for_a_plain_client(
    make_server: Callable[..., Server],
) -> None:
    """http.client (like urllib and requests) sends the whole body before it reads the answer:
    the 413 must still reach it, not a reset or a broken pipe."""
    srv = make_server(MAX_HTTP_BODY_BYTES=1024)
    with Client(srv.ws_url, token=srv.token("by"), channel="by.room") as by:
        by.recv_until("connection", "connect")
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        try:
            conn.request(
                "POST",
                "/ws/channels",
                body=_padded(4 * 1024 * 1024),
                headers={
                    "Authorization": f"Bearer {srv.admin()}",
                    "Content-Type": "application/json",
                },
            )
            resp = conn.getresponse()
            assert resp.status == 413
            assert_error(json.loads(resp.read()), "MESSAGE_TOO_LARGE")
        finally:
            conn.close()
        still_serving(srv, by)


def test_chunked_body_over_limit_is_413(make_server: Callable[..., Server]) -> None:
    srv = make_server(MAX_HTTP_BODY_BYTES=1024)
    with Client(srv.ws_url, token=srv.token("by"), channel="by.room") as by:
        by.recv_until("connection", "connect")
        head = request_bytes(
            "POST",
            "/ws/channels",
            token=srv.admin(),
            headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json"},
        )
        resp = exchange(srv.port, head + chunked(_padded(3000), 500))
        assert resp.status == 413, resp
        assert_error(resp.json, "MESSAGE_TOO_LARGE")
        still_serving(srv, by)


def test_chunked_body_under_limit_is_accepted(server: Server, bystander: Client) -> None:
    body = b'{"name": "chunked.ok", "max_connections": 2}'
    head = request_bytes(
        "POST", "/ws/channels", token=server.admin(), headers={"Transfer-Encoding": "chunked"}
    )
    resp = exchange(server.port, head + chunked(body, 7))
    assert resp.status == 201, resp
    assert resp.json["max_connections"] == 2
    still_serving(server, bystander)


def test_head_over_16k_is_431(server: Server, bystander: Client) -> None:
    big_header = request_bytes("GET", "/ws/status", headers={"X-Big": "a" * (17 * 1024)})
    resp = exchange(server.port, big_header)
    assert resp.status == 431, resp
    assert resp.json["type"] == "error"
    still_serving(server, bystander)

    many = request_bytes("GET", "/ws/status", headers={f"X-H{i}": "b" * 100 for i in range(200)})
    resp = exchange(server.port, many)
    assert resp.status == 431, resp
    still_serving(server, bystander)

    long_url = request_bytes("GET", "/ws/status?" + "q=" + "c" * (17 * 1024))
    resp = exchange(server.port, long_url)
    assert resp.status == 431, resp
    still_serving(server, bystander)

    # a head just under the limit is served
    resp = exchange(
        server.port, request_bytes("GET", "/ws/status", headers={"X-Big": "a" * (15 * 1024)})
    )
    assert resp.status == 200, resp
    still_serving(server, bystander)


def test_upgrade_with_head_over_16k_is_431(server: Server, bystander: Client) -> None:
    resp = exchange(server.port, upgrade_bytes("/ws", headers={"X-Big": "a" * (17 * 1024)}))
    assert resp.status == 431, resp
    still_serving(server, bystander)


def test_upgrades_with_heads_around_the_limit_are_answered(
    server: Server, bystander: Client
) -> None:
    """Heads from just under to just over 16 KiB, in small steps: each gets a 101 or a clean
    refusal (picows measures the head a little differently from our front), never a crash."""
    base = len(upgrade_bytes("/ws", headers={"X-Big": ""}))
    statuses = set()
    for size in range(16 * 1024 - 40, 16 * 1024 + 40, 3):
        with RawConn(server.port) as conn:
            conn.send(upgrade_bytes("/ws", headers={"X-Big": "a" * (size - base)}))
            status, _, _ = conn.read_head()
            assert status in (101, 400, 431), status
            statuses.add(status)
    assert 101 in statuses and 431 in statuses
    still_serving(server, bystander)


def test_frame_pipelined_behind_the_upgrade_is_answered_after_the_101(
    server: Server, bystander: Client
) -> None:
    """A bad frame sent with the upgrade request: picows answers it (close 1002) itself, and
    that must not overtake the 101."""
    token = server.token("alice")
    with RawConn(server.port) as conn:
        conn.send(
            upgrade_bytes(f"/ws?token={token}&client_id=pipe")
            + build_frame(Op.TEXT, b"unmasked", mask=False)
        )
        status, _, _ = conn.read_head()
        assert status == 101
        op, payload = conn.read_ws_frame()
        while op != 0x88:  # the connect reply may come first
            op, payload = conn.read_ws_frame()
        assert int.from_bytes(payload[:2], "big") == 1002
    still_serving(server, bystander)


# -- not HTTP, and HTTP in pieces -------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x01\x02\x03\xff\xfe\r\n\r\n",
        b"HELLO WORLD\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET /health HTTP/1.1\r\nbad header line\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS ClientHello
        # request smuggling shapes (RFC 9112 §6.3): refused, not guessed
        b"POST /ws/broadcast HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /ws/broadcast HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Content-Length: 6\r\n\r\nabcdef",
    ],
    ids=["binary", "words", "version", "content-length", "header", "tls", "cl-and-te", "two-cl"],
)
def test_garbage_is_400(server: Server, bystander: Client, garbage: bytes) -> None:
    with RawConn(server.port) as c:
        c.send(garbage)
        resp = c.read_response()
        assert resp.status == 400, resp
        assert resp.json["type"] == "error"
        assert c.closed_by_server(), "the connection stayed open after garbage"
    still_serving(server, bystander)


def test_http_1_0_request_is_answered_and_closed(server: Server, bystander: Client) -> None:
    with RawConn(server.port) as c:
        c.send(b"GET /health HTTP/1.0\r\n\r\n")
        resp = c.read_response()
        assert resp.status == 200 and resp.json["status"] == "healthy", resp
        assert c.closed_by_server(), "HTTP/1.0 without keep-alive must be closed after the answer"
    still_serving(server, bystander)


def test_request_sent_one_byte_at_a_time(server: Server, bystander: Client) -> None:
    admin = server.admin()
    with RawConn(server.port) as c:
        c.send_bytewise(
            request_bytes(
                "POST", "/ws/channels", {"name": "bytewise", "max_connections": 5}, token=admin
            )
        )
        resp = c.read_response()
        assert resp.status == 201, resp
        assert resp.json["name"] == "bytewise" and resp.json["max_connections"] == 5
        c.send_bytewise(request_bytes("GET", "/ws/status"))
        resp = c.read_response()
        assert resp.status == 200 and "connections" in resp.json, resp
    still_serving(server, bystander)


def test_upgrade_sent_one_byte_at_a_time(server: Server, bystander: Client) -> None:
    token = server.token("bytewise")
    with RawConn(server.port) as c:
        c.send_bytewise(
            upgrade_bytes(f"/ws?token={token}&channel=by.room&client_id=bw"), delay=0.0005
        )
        status_code, _, headers = c.read_head()
        assert status_code == 101, headers
        assert headers["upgrade"].lower() == "websocket"
        first = c.read_ws_text()
        assert first["type"] == "connection" and first["action"] == "connect", first
        assert first["data"]["channel"] == "by.room" and first["data"]["client_id"] == "bw", first
    still_serving(server, bystander)


# -- the WebSocket path -----------------------------------------------------------------------


def test_plain_get_on_ws_path_is_426(server: Server, bystander: Client) -> None:
    code, body, headers = server.http("GET", "/ws")
    assert code == 426, body
    assert headers.get("Upgrade", "").lower() == "websocket", headers
    assert body["type"] == "error"
    still_serving(server, bystander)


@pytest.mark.parametrize("path", ["/other", "/ws/", "/wss", "/ws/status", "/"])
def test_upgrade_on_another_path_is_404(server: Server, bystander: Client, path: str) -> None:
    with RawConn(server.port) as c:
        c.send(upgrade_bytes(path))
        resp = c.read_response()
        assert resp.status == 404, resp
        assert resp.json["type"] == "error"
    still_serving(server, bystander)


@pytest.mark.parametrize(
    ("drop", "extra"),
    [
        ("Sec-WebSocket-Key", {}),
        ("Sec-WebSocket-Version", {}),
        (None, {"Sec-WebSocket-Version": "99"}),
        (None, {"Sec-WebSocket-Key": "short"}),
    ],
    ids=["no-key", "no-version", "version-99", "bad-key"],
)
def test_malformed_upgrade_on_ws_path_is_a_json_error(
    server: Server, bystander: Client, drop: str | None, extra: dict[str, str]
) -> None:
    """docs/operations.md §4: every error is JSON in the error shape, the handshake's included."""
    req = upgrade_bytes(f"/ws?token={server.token('q')}", headers=extra)
    if drop is not None:
        req = b"\r\n".join(
            line for line in req.split(b"\r\n") if not line.startswith(drop.encode())
        )
    with RawConn(server.port) as c:
        c.send(req)
        resp = c.read_response()
    assert resp.status in (400, 426), resp
    assert resp.headers.get("content-type", "").startswith("application/json"), resp
    assert resp.json["type"] == "error", resp
    still_serving(server, bystander)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("client_id=bad%20id", "client_id"),
        ("client_id=", "client_id"),
        ("client_id=" + "c" * 129, "client_id"),
        ("channel=has%20space", "channel"),
        ("channel=", "channel"),
        ("channel=a/b", "channel"),
        ("channel=room&since=abc", "since"),
        ("channel=room&since=-1", "since"),
        ("channel=room&since=1.5", "since"),
    ],
)
def test_malformed_ws_query_is_400_before_upgrade(
    server: Server, bystander: Client, query: str, field: str
) -> None:
    with RawConn(server.port) as c:
        c.send(upgrade_bytes(f"/ws?token={server.token('q')}&{query}"))
        resp = c.read_response()
        assert resp.status == 400, resp
        assert "upgrade" not in {k.lower() for k in resp.headers}
        assert_error(resp.json, "INVALID_MESSAGE", field)
    still_serving(server, bystander)


# -- pipelining -------------------------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order(server: Server, bystander: Client) -> None:
    admin = server.admin()
    batch = b"".join(
        [
            request_bytes("GET", "/health"),
            request_bytes(
                "POST", "/ws/channels", {"name": "pipe.a", "max_connections": 1}, token=admin
            ),
            request_bytes("GET", "/nope"),
            request_bytes(
                "POST", "/ws/channels", {"name": "pipe.a", "max_connections": 2}, token=admin
            ),
            request_bytes("POST", "/ws/channels", b"{broken", token=admin),
            request_bytes("GET", "/ws/channels/pipe.a", token=admin),
            request_bytes("GET", "/ws/status", close=True),
        ]
    )
    with RawConn(server.port) as c:
        c.send(batch)
        got: list[RawResponse] = [c.read_response() for _ in range(7)]
        assert [r.status for r in got] == [200, 201, 404, 200, 400, 200, 200], got
        assert got[0].json["status"] == "healthy"
        assert got[1].json["max_connections"] == 1
        assert got[3].json["max_connections"] == 2
        assert got[4].json["code"] == "INVALID_JSON"
        assert got[5].json["name"] == "pipe.a" and got[5].json["max_connections"] == 2
        assert "connections" in got[6].json
        assert c.closed_by_server()
    still_serving(server, bystander)


def test_pipelined_requests_after_an_error_that_closes(server: Server, bystander: Client) -> None:
    """A request refused with 431 closes the connection: the next pipelined request is not
    answered on it, and the server goes on serving others."""
    batch = request_bytes(
        "GET", "/ws/status", headers={"X-Big": "a" * (17 * 1024)}
    ) + request_bytes("GET", "/health")
    with RawConn(server.port) as c:
        c.send(batch)
        resp = c.read_response()
        assert resp.status == 431, resp
        assert c.closed_by_server()
    still_serving(server, bystander)
