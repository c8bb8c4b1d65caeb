"""The security review of issue 4 as tests: TLS on the same port, JWT algorithm confusion
against an RS256 server, `none`, abuse that must not disturb other clients (ping flood, a
message in 10k fragments, slow handshakes, idle sockets)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import connect as asyncio_connect

from tests.conftest import Server
from tests.integration.helpers import Op, RawWS, wait_for
from tests.integration.wsclient import Client

MakeServer = Callable[..., Server]


def test_tls_serves_https_and_wss_on_one_port(make_server: MakeServer, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    srv = make_server(TLS_CERT_FILE=tmp_path / "cert.pem", TLS_KEY_FILE=tmp_path / "key.pem")
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    import urllib.request

    with urllib.request.urlopen(f"https://127.0.0.1:{srv.port}/health", context=ctx) as r:
        assert json.loads(r.read()) == {"status": "healthy"}
    url = f"wss://127.0.0.1:{srv.port}/ws?token={srv.token('alice')}&channel=tls&echo=1"
    # websockets' asyncio client: one thread, so TLS 1.3 is safe (its sync client races its
    # reader thread against the upgrade request; see test_workers_tls.TlsClient)
    got = asyncio.run(_wss_round_trip(url, ctx))
    assert got[0]["data"]["channel"] == "tls", got
    assert {m["action"] for m in got[1:3]} == {"send", "ack"}, got
    assert got[-1]["tls"] == "TLSv1.3", got
    # plain text to the TLS port is refused by the handshake, and the server goes on
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as plain:
        plain.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"healthy" not in plain.recv(4096)
    with urllib.request.urlopen(f"https://127.0.0.1:{srv.port}/health", context=ctx) as r:
        assert r.status == 200


async def _wss_round_trip(url: str, ctx: ssl.SSLContext) -> list[dict[str, Any]]:
    """Over wss://: the welcome, then the echo and the ack of one publication; last, the
    TLS version the connection negotiated."""
    async with asyncio_connect(url, ssl=ctx, open_timeout=5) as ws:
        got = [json.loads(await asyncio.wait_for(ws.recv(), 5))]
        await ws.send(
            json.dumps(
                {
                    "type": "message",
                    "action": "send",
                    "data": {"channel": "tls", "content": "secret", "metadata": {"sequence": 1}},
                }
            )
        )
        got += [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(2)]
        got.append({"tls": ws.transport.get_extra_info("ssl_object").version()})
    return got


def _rsa_keys(tmp_path: Path) -> tuple[bytes, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_path = tmp_path / "public.pem"
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public_path


def _refused(srv: Server, token: str) -> tuple[str, int | None]:
    with RawWS(srv.port, query={"token": token, "channel": "x"}) as raw:
        msg = raw.recv_json()
        return msg["code"], raw.close_code()


def test_algorithm_confusion_and_none_are_refused(make_server: MakeServer, tmp_path: Path) -> None:
    private, public_path = _rsa_keys(tmp_path)
    srv = make_server(JWT_ALGORITHM="RS256", JWT_PUBLIC_KEY_FILE=public_path, JWT_SECRET="")
    now = int(time.time())
    claims = {"sub": "mallory", "exp": now + 60}
    good = jwt.encode(claims, private, algorithm="RS256")
    with Client(srv.ws_url, token=good, channel="x") as c:
        assert c.recv()["data"]["user_id"] == "mallory"
    # HS256 signed with the public key as the HMAC secret: the classic confusion attack
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    import hashlib
    import hmac

    signing = header + b"." + body
    sig = hmac.new(public_path.read_bytes(), signing, hashlib.sha256).digest()
    forged = (signing + b"." + base64.urlsafe_b64encode(sig).rstrip(b"=")).decode()
    assert _refused(srv, forged) == ("AUTH_INVALID", 4001)
    unsigned = (
        base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=") + b"." + body + b"."
    ).decode()
    assert _refused(srv, unsigned) == ("AUTH_INVALID", 4001)
    no_exp = jwt.encode({"sub": "mallory"}, private, algorithm="RS256")
    assert _refused(srv, no_exp) == ("AUTH_INVALID", 4001)


def test_ping_flood_and_10k_fragments_leave_others_served(server: Server) -> None:
    with Client(server.ws_url, token=server.token("bob"), client_id="bob", channel="abuse") as bob:
        bob.recv()
        with RawWS(server.port, query={"token": server.token("eve"), "channel": "abuse"}) as eve:
            eve.recv_json()
            for i in range(5000):
                eve.send_frame(Op.PING, str(i).encode())
            pongs = 0
            while pongs < 5000:
                _fin, opcode, _payload = eve.recv_frame()
                pongs += opcode == Op.PONG
            content = "x" * 10000
            msg = json.dumps(
                {
                    "type": "message",
                    "action": "send",
                    "data": {"channel": "abuse", "content": content, "metadata": {"sequence": 1}},
                }
            ).encode()
            step = max(1, len(msg) // 10000)
            pieces = [msg[i : i + step] for i in range(0, len(msg), step)]
            assert len(pieces) >= 10000
            for n, piece in enumerate(pieces):
                eve.send_frame(Op.TEXT if n == 0 else Op.CONT, piece, fin=n == len(pieces) - 1)
            ack = eve.recv_json()
            assert ack["action"] == "ack", ack
        assert bob.recv()["data"]["content"] == content
        bob.publish("abuse", "still here")
        assert bob.recv()["action"] == "ack"


def test_slow_handshake_is_timed_out_without_harm(make_server: MakeServer) -> None:
    srv = make_server(HANDSHAKE_TIMEOUT_S="1")
    slow = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    slow.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
    idle = socket.create_connection(("127.0.0.1", srv.port), timeout=5)  # sends nothing
    with Client(srv.ws_url, token=srv.token("ok"), channel="c") as ok:
        assert ok.recv()["data"]["channel"] == "c"
    t0 = time.monotonic()
    assert slow.recv(100) == b"" and idle.recv(100) == b""  # closed by the server
    assert time.monotonic() - t0 < 3
    slow.close()
    idle.close()
    wait_for(lambda: srv.http("GET", "/health")[0] == 200)


# -- the security log cannot be flooded (issue 12) -----------------------------------------


def security_counts(srv: Server, event: str, kind: str | None = None) -> tuple[int, int]:
    """(lines written for `event`, events counted in summaries for its kind)."""
    lines = srv.log_lines()
    written = sum(1 for o in lines if o.get("event") == event)
    held = sum(
        o["data"]["details"]["suppressed"].get(kind or event, 0)
        for o in lines
        if o.get("event") == "security_events_suppressed"
    )
    return written, held


def test_failed_logins_are_throttled_with_counts(make_server: MakeServer) -> None:
    """300 failed logins: at most a line a second for them plus a summary a second, and the
    summaries carry the count of every line held back."""
    srv = make_server()
    started = time.monotonic()
    for i in range(300):
        code, close = _refused(srv, f"bad-token-{i}")
        assert (code, close) == ("AUTH_INVALID", 4001)
    elapsed = time.monotonic() - started
    # every event is accounted for: written, or counted in a summary (within ~2 s)
    wait_for(lambda: sum(security_counts(srv, "auth_failed")) == 300, 5)
    written, held = security_counts(srv, "auth_failed")
    summaries = [o for o in srv.log_lines() if o["event"] == "security_events_suppressed"]
    assert written <= elapsed + 2, (written, elapsed)
    assert 1 <= len(summaries) <= elapsed + 3, (summaries, elapsed)
    assert held == 300 - written and held > 0
    assert all(o["level"] == "warn" and o["data"]["component"] == "security" for o in summaries)


def _upgrade_status(srv: Server, origin: str) -> int:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(
            (
                "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {base64.b64encode(b'k' * 16).decode()}\r\n"
                f"Sec-WebSocket-Version: 13\r\nOrigin: {origin}\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split()[1])


def test_many_distinct_origins_stay_bounded(make_server: MakeServer) -> None:
    """Refused Origins are counted by kind, not by value: 400 distinct long Origins give a
    few short lines (no line lists them all, none carries a whole 4 KiB value)."""
    srv = make_server(ALLOWED_ORIGINS="https://good.example")
    for i in range(400):
        assert _upgrade_status(srv, f"https://evil{i}.example/" + "x" * 4000) == 403
    kind = "connection_refused:origin"
    wait_for(lambda: sum(security_counts(srv, "connection_refused", kind)) == 400, 5)
    lines = [
        o
        for o in srv.log_lines()
        if o["event"] in ("connection_refused", "security_events_suppressed")
    ]
    assert len(lines) < 40, len(lines)
    assert all(len(json.dumps(o)) < 2000 for o in lines), max(len(json.dumps(o)) for o in lines)
    for o in lines:
        if o["event"] == "security_events_suppressed":
            assert set(o["data"]["details"]["suppressed"]) == {kind}


def test_picows_protocol_errors_are_throttled(make_server: MakeServer) -> None:
    """150 connections that each send an unmasked frame (a protocol violation picows reports):
    a line a second for them plus the summaries, which count the rest, instead of a warn
    line per connection (12,593 lines in 3 s in the review)."""
    srv = make_server()
    started = time.monotonic()
    for _ in range(150):
        ws = RawWS(srv.port)
        assert ws.status == 101
        ws.send_frame(Op.TEXT, b"x", mask=False)
        ws.sock.close()
    elapsed = time.monotonic() - started
    wait_for(lambda: sum(security_counts(srv, "picows")) == 150, 5)
    written, held = security_counts(srv, "picows")
    assert written <= elapsed + 2, (written, elapsed)
    assert held == 150 - written and held > 0
    first = next(o for o in srv.log_lines() if o.get("event") == "picows")
    assert first["level"] == "warn" and first["data"]["component"] == "security"
    assert "mask" in first["data"]["details"]["message"].lower()


def test_echo_path_is_admitted_like_ws_path(make_server: MakeServer) -> None:
    """ECHO_PATH (the conformance endpoint, no auth, no budget) still passes the upgrade's
    admission: a refused Origin gets 403 and MAX_CONNECTIONS counts its sockets (503)."""
    srv = make_server(ECHO_PATH="/echo", MAX_CONNECTIONS="2", ALLOWED_ORIGINS="https://ok.example")
    evil = RawWS(srv.port, "/echo", headers={"Origin": "https://evil.example"})
    assert evil.status == 403
    evil.sock.close()
    first, second = RawWS(srv.port, "/echo"), RawWS(srv.port, "/ws")
    assert (first.status, second.status) == (101, 101)
    third = RawWS(srv.port, "/echo", headers={"Origin": "https://ok.example"})
    assert third.status == 503
    first.send_frame(Op.TEXT, b"still echoed")
    assert first.recv_frame()[1:] == (Op.TEXT, b"still echoed")
    for ws in (first, second, third):
        ws.sock.close()
