"""docs/operations.md §4-6 over real HTTP: status, channels, broadcast, admin auth, health,
metrics, errors, keep-alive and persistence of channel configs across a restart."""

from __future__ import annotations

import base64
import http.client
import json
import re
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from tests.conftest import SECRET, Server
from tests.integration.helpers import member, wait_for
from tests.integration.rawhttp import RawConn, request_bytes
from tests.integration.wsclient import Client


def assert_error(body: Any, code: str) -> None:
    assert isinstance(body, dict), body
    assert body.get("type") == "error", body
    assert body.get("code") == code, body
    assert isinstance(body.get("message"), str) and body["message"], body
    details = body.get("details")
    assert isinstance(details, dict), body
    assert isinstance(details.get("component"), str), body
    assert isinstance(details.get("reason"), str), body


def status(server: Server) -> dict[str, Any]:
    code, body, _ = server.http("GET", "/ws/status")
    assert code == 200, body
    return body  # type: ignore[no-any-return]


def prom_value(text: str, name: str) -> float:
    """Sum of every sample of `name` (all label sets) in a Prometheus text exposition."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)", line)
        if m:
            total += float(m.group(2))
            seen = True
    assert seen, f"{name} not in exposition:\n{text[:2000]}"
    return total


# -- GET /ws/status ---------------------------------------------------------------------------


def test_status_shape(server: Server) -> None:
    code, body, headers = server.http("GET", "/ws/status")
    assert code == 200
    assert headers["Content-Type"].startswith("application/json")
    assert body["status"] == "healthy"
    conns, chans = body["connections"], body["channels"]
    for key in ("active", "total"):
        assert isinstance(conns[key], int) and not isinstance(conns[key], bool) and conns[key] >= 0
    assert isinstance(chans["active"], int) and chans["active"] >= 0
    assert (
        isinstance(chans["messages_per_second"], (int, float)) and chans["messages_per_second"] >= 0
    )
    assert conns["active"] <= conns["total"]


def test_status_numbers_move_with_clients(server: Server) -> None:
    before = status(server)
    with (
        member(server, "status-user", "status.room") as a,
        member(server, "status-user", "status.room") as b,
    ):
        now = status(server)
        assert now["connections"]["active"] >= before["connections"]["active"] + 2, (before, now)
        assert now["connections"]["total"] >= before["connections"]["total"] + 2, (before, now)
        assert now["channels"]["active"] >= 1

        # The rate is measured once a second: keep publishing until it shows.
        def rate() -> float:
            a.publish("status.room", "tick")
            return float(status(server)["channels"]["messages_per_second"])

        assert wait_for(rate, timeout=4.0, interval=0.2) > 0
        a.close()
        b.close()
    wait_for(lambda: status(server)["connections"]["active"] <= before["connections"]["active"])
    after = status(server)
    assert after["connections"]["total"] >= before["connections"]["total"] + 2


# -- channels ---------------------------------------------------------------------------------

FULL_CONFIG = {
    "name": "rest.cfg",
    "max_connections": 7,
    "message_rate_limit": 12.5,
    "require_auth": False,
    "history_size": 20,
    "presence": True,
    "compression": False,
}


def test_channel_create_then_update(server: Server) -> None:
    admin = server.admin()
    code, body, _ = server.http("POST", "/ws/channels", FULL_CONFIG, token=admin)
    assert code == 201, body
    assert body == FULL_CONFIG

    code, body, _ = server.http(
        "POST", "/ws/channels", {"name": "rest.cfg", "max_connections": 3}, token=admin
    )
    assert code == 200, body
    assert body == {**FULL_CONFIG, "max_connections": 3}

    code, body, _ = server.http("GET", "/ws/channels/rest.cfg", token=admin)
    assert code == 200, body
    for key, value in {**FULL_CONFIG, "max_connections": 3}.items():
        assert body[key] == value, (key, body)


def test_channel_create_with_only_the_required_fields(server: Server) -> None:
    admin = server.admin()
    body_in = {
        "name": "rest.min",
        "max_connections": 0,
        "message_rate_limit": 0,
        "require_auth": True,
    }
    code, body, _ = server.http("POST", "/ws/channels", body_in, token=admin)
    assert code == 201, body
    assert set(body) == set(FULL_CONFIG)  # every field, the omitted ones at their defaults
    assert body["name"] == "rest.min" and body["max_connections"] == 0
    assert body["require_auth"] is True
    assert body["history_size"] == 100  # HISTORY_SIZE default
    assert body["presence"] is False
    assert body["compression"] is True


def test_channel_list(server: Server) -> None:
    admin = server.admin()
    for name in ("rest.list.a", "rest.list.b"):
        code, body, _ = server.http(
            "POST",
            "/ws/channels",
            {"name": name, "max_connections": 2, "require_auth": False},
            token=admin,
        )
        assert code == 201, body
    code, body, _ = server.http("GET", "/ws/channels", token=admin)
    assert code == 200, body
    channels = body["channels"] if isinstance(body, dict) else body
    by_name = {c["name"]: c for c in channels}
    assert {"rest.list.a", "rest.list.b"} <= set(by_name)
    assert by_name["rest.list.a"]["max_connections"] == 2
    assert by_name["rest.list.a"]["require_auth"] is False


def test_channel_read_has_live_counts(server: Server) -> None:
    admin = server.admin()
    assert server.create_channel(name="rest.live") == 201
    code, body, _ = server.http("GET", "/ws/channels/rest.live", token=admin)
    assert code == 200 and body["members"] == 0, body

    with member(server, "u1", "rest.live") as a, member(server, "u2", "rest.live") as b:
        code, body, _ = server.http("GET", "/ws/channels/rest.live", token=admin)
        assert code == 200 and body["members"] == 2, body
        a.publish("rest.live", "one")
        a.publish("rest.live", "two")
        assert b.recv_until("message", "send")["data"]["content"] == "one"
        assert b.recv_until("message", "send")["data"]["content"] == "two"
        code, body, _ = server.http("GET", "/ws/channels/rest.live", token=admin)
        assert body["offset"] == 2, body
        b.leave("rest.live")
        b.recv_until("connection", "disconnect")
        code, body, _ = server.http("GET", "/ws/channels/rest.live", token=admin)
        assert body["members"] == 1, body


def test_channel_read_unknown_is_404(server: Server) -> None:
    code, body, _ = server.http("GET", "/ws/channels/rest.never", token=server.admin())
    assert code == 404
    assert_error(body, "CHANNEL_NOT_FOUND")


def test_channel_delete_removes_members(server: Server) -> None:
    admin = server.admin()
    assert server.create_channel(name="rest.del") == 201
    with member(server, "m1", "rest.del") as a, member(server, "m2", "rest.del") as b:
        code, body, _ = server.http("DELETE", "/ws/channels/rest.del", token=admin)
        assert code == 200, body
        for c in (a, b):
            gone = c.recv_until("connection", "disconnect")
            assert gone["data"]["channel"] == "rest.del", gone
            # docs/protocol.md §4: members get a system notice
            notice = c.recv_until("system", "status")
            assert "rest.del" in notice["data"]["message"], notice
        # they are no longer members: a publish is refused, the connection stays open
        a.publish("rest.del", "after delete")
        err = a.recv_until("error")
        assert err["code"] == "NOT_A_MEMBER", err
        b.quiet()
        a.send({"type": "system", "action": "status", "data": {}})
        assert a.recv_until("system", "status")["data"]["severity"] == "info"
    code, body, _ = server.http("GET", "/ws/channels/rest.del", token=admin)
    assert code == 404
    assert_error(body, "CHANNEL_NOT_FOUND")
    code, body, _ = server.http("DELETE", "/ws/channels/rest.del", token=admin)
    assert code == 404
    assert_error(body, "CHANNEL_NOT_FOUND")
    code, body, _ = server.http("GET", "/ws/channels", token=admin)
    assert "rest.del" not in {c["name"] for c in body["channels"]}


def test_channel_update_applies_to_a_live_channel(server: Server) -> None:
    admin = server.admin()
    assert server.create_channel(name="rest.shrink", max_connections=0) == 201
    with member(server, "s1", "rest.shrink"):
        code, _, _ = server.http(
            "POST", "/ws/channels", {"name": "rest.shrink", "max_connections": 1}, token=admin
        )
        assert code == 200
        with Client(server.ws_url, token=server.token("s2"), channel="rest.shrink") as b:
            err = b.recv_until("error")
            assert err["code"] == "CHANNEL_FULL", err


# -- broadcast --------------------------------------------------------------------------------


def test_broadcast_to_everyone(server: Server) -> None:
    admin = server.admin()
    with member(server, "b1", "rest.bc") as a, Client(server.ws_url, token=server.token("b2")) as b:
        b.recv_until("connection", "connect")
        code, body, _ = server.http(
            "POST",
            "/ws/broadcast",
            {"message": "maintenance at noon", "severity": "warning"},
            token=admin,
        )
        assert code == 200, body
        for c in (a, b):
            msg = c.recv_until("system", "broadcast")
            assert msg["data"]["message"] == "maintenance at noon"
            assert msg["data"]["severity"] == "warning"


def test_broadcast_to_one_channel(server: Server) -> None:
    admin = server.admin()
    with member(server, "c1", "rest.bc1") as a, member(server, "c2", "rest.bc2") as b:
        code, body, _ = server.http(
            "POST",
            "/ws/broadcast",
            {"message": "only bc1", "severity": "error", "channel": "rest.bc1"},
            token=admin,
        )
        assert code == 200, body
        msg = a.recv_until("system", "broadcast")
        assert msg["data"]["message"] == "only bc1" and msg["data"]["severity"] == "error"
        b.quiet()


# -- admin auth -------------------------------------------------------------------------------

ADMIN_ROUTES = [
    ("GET", "/ws/channels", None),
    ("POST", "/ws/channels", {"name": "rest.auth", "require_auth": False}),
    ("GET", "/ws/channels/rest.auth", None),
    ("DELETE", "/ws/channels/rest.auth", None),
    ("POST", "/ws/broadcast", {"message": "hi", "severity": "info"}),
]
ROUTE_IDS = [f"{m} {p}" for m, p, _ in ADMIN_ROUTES]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES, ids=ROUTE_IDS)
def test_admin_route_without_credentials_is_401(
    server: Server, method: str, path: str, body: Any
) -> None:
    code, resp, _ = server.http(method, path, body)
    assert code == 401, resp
    assert_error(resp, "AUTH_REQUIRED")


def _bad_tokens(server: Server) -> dict[str, str]:
    now = int(time.time())
    return {
        "garbage": "not-a-jwt",
        "wrong-secret": server.token(
            "root", admin=True, secret="another-secret-another-secret-0123456789"
        ),
        "expired": jwt.encode(
            {"sub": "root", "admin": True, "exp": now - 60}, SECRET, algorithm="HS256"
        ),
        "alg-none": _unsigned({"sub": "root", "admin": True, "exp": now + 600}),
        "no-sub": jwt.encode({"admin": True, "exp": now + 600}, SECRET, algorithm="HS256"),
    }


def _unsigned(claims: dict[str, Any]) -> str:
    """A JWT with `"alg": "none"` and no signature."""

    def b64(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


@pytest.mark.parametrize("kind", ["garbage", "wrong-secret", "expired", "alg-none", "no-sub"])
@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES, ids=ROUTE_IDS)
def test_admin_route_with_bad_token_is_401(
    server: Server, method: str, path: str, body: Any, kind: str
) -> None:
    code, resp, _ = server.http(method, path, body, token=_bad_tokens(server)[kind])
    assert code == 401, resp
    assert resp["code"] == ("TOKEN_EXPIRED" if kind == "expired" else "AUTH_INVALID"), resp
    assert_error(resp, resp["code"])


@pytest.mark.parametrize(
    "claims",
    [{}, {"role": "user"}, {"admin": "true"}, {"admin": False}, {"admin": 1}, {"role": "Admin"}],
    ids=str,
)
@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES, ids=ROUTE_IDS)
def test_admin_route_with_user_token_is_403(
    server: Server, method: str, path: str, body: Any, claims: dict[str, Any]
) -> None:
    now = int(time.time())
    token = jwt.encode({"sub": "mallory", "exp": now + 600, **claims}, SECRET, algorithm="HS256")
    code, resp, _ = server.http(method, path, body, token=token)
    assert code == 403, resp
    assert_error(resp, "FORBIDDEN")


def _run_admin_routes(server: Server, token: str) -> None:
    """Every admin route, in an order where each one succeeds."""
    code, body, _ = server.http(
        "POST", "/ws/channels", {"name": "rest.auth", "require_auth": False}, token=token
    )
    assert code == 201, body
    code, body, _ = server.http("GET", "/ws/channels", token=token)
    assert code == 200 and "rest.auth" in {c["name"] for c in body["channels"]}, body
    code, body, _ = server.http("GET", "/ws/channels/rest.auth", token=token)
    assert code == 200 and body["name"] == "rest.auth", body
    code, body, _ = server.http(
        "POST", "/ws/broadcast", {"message": "hi", "severity": "info"}, token=token
    )
    assert code == 200, body
    code, body, _ = server.http("DELETE", "/ws/channels/rest.auth", token=token)
    assert code == 200, body


def test_admin_claim_and_role_claim_are_accepted(server: Server) -> None:
    _run_admin_routes(server, server.token("root", admin=True))
    _run_admin_routes(server, server.token("ops", role="admin"))


def test_static_admin_token(make_server: Callable[..., Server]) -> None:
    static = "static-admin-token-0123456789abcdef"
    srv = make_server(ADMIN_TOKEN=static)
    _run_admin_routes(srv, static)
    # JWT admins still work beside it, and a near miss of the static token does not
    _run_admin_routes(srv, srv.admin())
    code, body, _ = srv.http("GET", "/ws/channels", token=static + "x")
    assert code == 401, body
    code, body, _ = srv.http("GET", "/ws/channels", token=static[:-1])
    assert code == 401, body
    code, body, _ = srv.http("GET", "/ws/channels", headers={"Authorization": static})
    assert code == 401, body
    # the per-channel list of /metrics/channels takes the static token too
    with member(srv, "s", "static.room"):
        code, body, _ = srv.http("GET", "/metrics/channels", token=static)
        assert code == 200 and [x["name"] for x in body["channels"]] == ["static.room"], body
        assert srv.http("GET", "/metrics/channels", token=static + "x")[0] == 401


# -- health and metrics -----------------------------------------------------------------------


def test_health(server: Server) -> None:
    code, body, headers = server.http("GET", "/health")
    assert code == 200
    assert headers["Content-Type"].startswith("application/json")
    assert body["status"] == "healthy"


#: the JSON metrics routes, public: figures only (docs/operations.md §6)
JSON_METRICS = ("/metrics/connections", "/metrics/messages", "/metrics/channels", "/metrics/errors")


def test_json_metrics_routes(server: Server) -> None:
    for path in JSON_METRICS:
        code, body, headers = server.http("GET", path)
        assert code == 200, (path, body)
        assert headers["Content-Type"].startswith("application/json"), path
        assert isinstance(body, dict) and body, (path, body)


def test_json_metrics_move_with_traffic(server: Server) -> None:
    def get(path: str) -> dict[str, Any]:
        code, body, _ = server.http("GET", path)
        assert code == 200
        return body  # type: ignore[no-any-return]

    conns0, msgs0, errs0 = (
        get("/metrics/connections"),
        get("/metrics/messages"),
        get("/metrics/errors"),
    )
    with member(server, "m-a", "rest.metrics") as a, member(server, "m-b", "rest.metrics") as b:
        conns = get("/metrics/connections")
        assert conns["active"] >= conns0["active"] + 2, (conns0, conns)
        assert conns["total"] >= conns0["total"] + 2, (conns0, conns)
        for i in range(3):
            a.publish("rest.metrics", f"m{i}")
        for _ in range(3):
            b.recv_until("message", "send")
        a.send("{not json")
        assert a.recv_until("error")["code"] == "INVALID_JSON"
        msgs = get("/metrics/messages")
        assert msgs["published"] >= msgs0["published"] + 3, (msgs0, msgs)
        errs = get("/metrics/errors")
        assert errs["total"] >= errs0["total"] + 1, (errs0, errs)
        code, chans, _ = server.http("GET", "/metrics/channels", token=server.admin())
        assert code == 200, chans
        mine = [c for c in chans["channels"] if c["name"] == "rest.metrics"]
        assert mine and mine[0]["members"] == 2, chans
        assert get("/metrics/channels")["active"] == chans["active"]


def test_channel_names_are_not_public(server: Server) -> None:
    """Issue 12: public routes give figures only; the per-channel list of /metrics/channels
    needs admin credentials (an admin JWT or ADMIN_TOKEN); bad ones are refused."""
    secret_name = "user.alice.inbox"
    with member(server, "alice", secret_name):
        for path in (*JSON_METRICS, "/ws/status", "/health"):
            code, body, _ = server.http("GET", path)
            assert code == 200, (path, body)
            assert secret_name not in json.dumps(body), (path, body)
        code, body, _ = server.http("GET", "/metrics/channels")
        assert set(body) >= {"active"} and "channels" not in body, body
        assert body["active"] >= 1
        code, body, _ = server.http("GET", "/metrics/channels", token=server.admin())
        assert code == 200
        assert any(c["name"] == secret_name and c["members"] == 1 for c in body["channels"])
        assert body["active"] == len(body["channels"])
        code, body, hdrs = server.http("GET", "/metrics/channels", token=server.token("alice"))
        assert code == 403 and body["code"] == "FORBIDDEN", body
        forged = server.token("root", admin=True, secret="another-secret-another-secret-0123")
        code, body, hdrs = server.http("GET", "/metrics/channels", token=forged)
        assert code == 401 and hdrs.get("WWW-Authenticate") == "Bearer", body
        assert secret_name not in json.dumps(body)


def test_prometheus_exposition(server: Server) -> None:
    def scrape() -> str:
        code, text, headers = server.http("GET", "/metrics", port=server.metrics_port)
        assert code == 200
        assert headers["Content-Type"].startswith("text/plain"), headers
        assert isinstance(text, str)
        return text

    text = scrape()
    names = {m.group(1) for m in re.finditer(r"^# TYPE (\S+) (\w+)", text, re.M)}
    assert names and all(n.startswith("aether_") for n in names), names
    assert re.search(r"^# HELP aether_\w+ ", text, re.M)
    published0 = prom_value(text, "aether_messages_published_total")
    conns0 = prom_value(text, "aether_connections_total")
    with member(server, "p-a", "rest.prom") as a, member(server, "p-b", "rest.prom") as b:
        for i in range(4):
            a.publish("rest.prom", f"p{i}")
        for _ in range(4):
            b.recv_until("message", "send")
        text = scrape()
        assert prom_value(text, "aether_messages_published_total") >= published0 + 4
        assert prom_value(text, "aether_connections_total") >= conns0 + 2
        assert prom_value(text, "aether_connections_active") >= 2


def test_prometheus_port_only_serves_metrics(server: Server) -> None:
    code, body, _ = server.http("GET", "/ws/status", port=server.metrics_port)
    assert code == 404
    assert isinstance(body, dict) and body["type"] == "error", body
    code, body, headers = server.http("POST", "/metrics", raw=b"", port=server.metrics_port)
    assert code == 405 and headers["Allow"] == "GET", (body, headers)
    assert isinstance(body, dict) and body["details"]["reason"].startswith("POST"), body


# -- errors for unknown paths and methods ------------------------------------------------------


@pytest.mark.parametrize("path", ["/nope", "/ws/statusx", "/metrics/nothing", "/ws/channels/"])
def test_unknown_path_is_404_json(server: Server, path: str) -> None:
    code, body, headers = server.http("GET", path)
    assert code == 404, body
    assert headers["Content-Type"].startswith("application/json")
    assert isinstance(body, dict) and body["type"] == "error"
    assert isinstance(body["details"]["reason"], str)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/ws/status", {"GET"}),
        ("DELETE", "/health", {"GET"}),
        ("PUT", "/ws/channels", {"GET", "POST"}),
        ("GET", "/ws/broadcast", {"POST"}),
        ("POST", "/ws/channels/x", {"GET", "DELETE"}),
        ("PATCH", "/metrics/messages", {"GET"}),
    ],
)
def test_wrong_method_is_405_with_allow(
    server: Server, method: str, path: str, allowed: set[str]
) -> None:
    code, body, headers = server.http(
        method, path, raw=b"{}" if method != "GET" else None, token=server.admin()
    )
    assert code == 405, body
    assert isinstance(body, dict) and body["type"] == "error", body
    allow = {m.strip() for m in headers["Allow"].split(",")}
    assert allowed <= allow and method not in allow, headers["Allow"]


# -- keep-alive -------------------------------------------------------------------------------


def test_keep_alive_many_requests_on_one_connection(server: Server) -> None:
    admin = server.admin()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        assert resp.status == 200 and b"healthy" in resp.read()
        sock = conn.sock
        assert sock is not None

        conn.request(
            "POST",
            "/ws/channels",
            body=b'{"name": "rest.ka", "max_connections": 4}',
            headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 201, body
        assert b'"max_connections":4' in body.replace(b" ", b"")

        conn.request("GET", "/ws/channels/rest.ka", headers={"Authorization": f"Bearer {admin}"})
        resp = conn.getresponse()
        assert resp.status == 200 and b"rest.ka" in resp.read()

        conn.request("GET", "/nope")
        resp = conn.getresponse()
        assert resp.status == 404
        resp.read()

        conn.request("DELETE", "/ws/channels/rest.ka", headers={"Authorization": f"Bearer {admin}"})
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read()

        conn.request("GET", "/ws/status")
        resp = conn.getresponse()
        assert resp.status == 200 and b"connections" in resp.read()
        assert conn.sock is sock, "the server closed a keep-alive connection"
    finally:
        conn.close()


def test_keep_alive_answers_in_order_on_a_raw_socket(server: Server) -> None:
    admin = server.admin()
    with RawConn(server.port) as c:
        c.send(request_bytes("GET", "/health"))
        r = c.read_response()
        assert r.status == 200 and r.json["status"] == "healthy"
        assert r.headers.get("connection", "keep-alive").lower() == "keep-alive"
        c.send(request_bytes("POST", "/ws/channels", {"name": "rest.ka2"}, token=admin))
        r = c.read_response()
        assert r.status == 201 and r.json["name"] == "rest.ka2"
        c.send(
            request_bytes(
                "POST", "/ws/channels", {"name": "rest.ka2", "presence": True}, token=admin
            )
        )
        r = c.read_response()
        assert r.status == 200 and r.json["presence"] is True
        c.send(request_bytes("GET", "/ws/status", close=True))
        r = c.read_response()
        assert r.status == 200 and "connections" in r.json
        assert c.closed_by_server(), "Connection: close was not honoured"


def test_head_request_keeps_the_connection_usable(server: Server) -> None:
    """HEAD gets the GET's headers and no body (RFC 9110 §9.3.2); the next request on the
    same connection must still be answered correctly."""
    with RawConn(server.port) as c:
        c.send(request_bytes("HEAD", "/health"))
        status_code, _, headers = c.read_head()
        assert status_code == 200
        c.send(request_bytes("GET", "/ws/status"))
        r = c.read_response()
        assert r.status == 200, (r, headers)
        assert "connections" in r.json


# -- persistence ------------------------------------------------------------------------------


def test_channel_configs_survive_a_restart(make_server: Callable[..., Server]) -> None:
    srv = make_server()
    admin = srv.admin()
    small = {
        "name": "keep.small",
        "max_connections": 1,
        "message_rate_limit": 0,
        "require_auth": False,
        "history_size": 5,
        "presence": False,
        "compression": False,
    }
    slow = {
        "name": "keep.slow",
        "max_connections": 0,
        "message_rate_limit": 1,
        "require_auth": True,
        "history_size": 10,
        "presence": True,
        "compression": True,
    }
    for cfg in (small, slow):
        code, body, _ = srv.http("POST", "/ws/channels", cfg, token=admin)
        assert code == 201, body
    code, body, _ = srv.http("DELETE", "/ws/channels/keep.small", token=admin)
    assert code == 200
    code, body, _ = srv.http("POST", "/ws/channels", small, token=admin)
    assert code == 201

    srv.restart()

    code, body, _ = srv.http("GET", "/ws/channels", token=admin)
    assert code == 200
    by_name = {c["name"]: c for c in body["channels"]}
    for cfg in (small, slow):
        for key, value in cfg.items():
            assert by_name[cfg["name"]][key] == value, (key, by_name[cfg["name"]])
    code, body, _ = srv.http(
        "POST", "/ws/channels", {"name": "keep.small", "history_size": 6}, token=admin
    )
    assert code == 200, body  # it exists: an update, not a creation
    assert body == {**small, "history_size": 6}

    # the limits apply after the restart
    with (
        member(srv, None, "keep.small"),  # require_auth false: no token needed
        Client(srv.ws_url, token=srv.token("second"), channel="keep.small") as second,
    ):
        err = second.recv_until("error")
        assert err["code"] == "CHANNEL_FULL", err
    with Client(srv.ws_url, channel="keep.slow") as anon:  # require_auth true
        err = anon.recv_until("error")
        assert err["code"] == "AUTH_REQUIRED", err
    with member(srv, "pub", "keep.slow") as pub:
        for i in range(3):
            pub.publish("keep.slow", f"x{i}")
        replies = [pub.recv() for _ in range(3)]
        acks = [r for r in replies if r["type"] == "message" and r["action"] == "ack"]
        limited = [r for r in replies if r["type"] == "error" and r["code"] == "RATE_LIMITED"]
        assert len(acks) >= 1 and len(limited) >= 1, replies
        assert len(acks) + len(limited) == 3, replies
