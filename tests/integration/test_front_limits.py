"""What one client can cost the HTTP front before it upgrades (issue 12, "Safe to expose"):
a pipelining client that never reads its answers, TLS handshakes that stall, sockets that
never send a request (MAX_PENDING_CONNECTIONS), and malformed upgrade queries."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from tests.conftest import Server
from tests.integration.helpers import rss_kib
from tests.integration.rawhttp import RawConn, request_bytes, upgrade_bytes

MakeServer = Callable[..., Server]

#: RSS growth allowed while one client pipelines several MB and reads nothing
RSS_BOUND_KIB = 32 * 1024


def _pipeline_without_reading(srv: Server, port: int, path: str) -> int:
    """Pipeline ~6 MB of `GET path` on one connection and never read: the largest RSS growth
    seen (KiB). Stops early once past the bound, so a failing server is not driven into swap."""
    assert srv.proc is not None
    before = rss_kib(srv.proc.pid)
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    chunk = request * (65536 // len(request))
    worst = 0
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(0.5)
    try:
        sent = 0
        deadline = time.monotonic() + 8
        while sent < 6 * 1024 * 1024 and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):  # the server stopped reading: wanted
                sent += sock.send(chunk)
            worst = max(worst, rss_kib(srv.proc.pid) - before)
            if worst > RSS_BOUND_KIB:
                break
        # everyone else is still served promptly, on both ports
        status, body, _ = srv.http("GET", "/health")
        assert status == 200 and body["status"] == "healthy"
        with RawConn(srv.metrics_port, timeout=5) as other:
            other.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert other.read_response().status == 200
        time.sleep(0.5)
        worst = max(worst, rss_kib(srv.proc.pid) - before)
    finally:
        sock.close()
    return worst


@pytest.mark.parametrize("which", ["main", "metrics"])
def test_pipelining_client_that_never_reads_costs_little(
    make_server: MakeServer, which: str
) -> None:
    srv = make_server(ENABLE_METRICS="true")
    port, path = (srv.port, "/client.js") if which == "main" else (srv.metrics_port, "/metrics")
    grown = _pipeline_without_reading(srv, port, path)
    assert grown < RSS_BOUND_KIB, f"server RSS grew by {grown} KiB"
    # and the front still answers pipelined requests whole and in order afterwards
    with RawConn(port) as conn:
        conn.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode() * 100)
        for _ in range(100):
            assert conn.read_response().status == 200


def _tls_server(
    make_server: MakeServer, tmp_path: Path, **env: str
) -> tuple[Server, ssl.SSLContext]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    srv = make_server(TLS_CERT_FILE=tmp_path / "cert.pem", TLS_KEY_FILE=tmp_path / "key.pem", **env)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return srv, ctx


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_stalled_tls_handshakes_are_closed(make_server: MakeServer, tmp_path: Path) -> None:
    srv, ctx = _tls_server(make_server, tmp_path, HANDSHAKE_TIMEOUT_S="1")
    silent = socket.create_connection(("127.0.0.1", srv.port))  # never starts its handshake
    half = socket.create_connection(("127.0.0.1", srv.port))
    half.sendall(b"\x16\x03\x01\x02\x00\x01")  # the first bytes of a ClientHello, then nothing
    late = socket.create_connection(("127.0.0.1", srv.port))
    t0 = time.monotonic()
    assert _closed_within(silent, 4) and _closed_within(half, 4)
    assert time.monotonic() - t0 < 4
    # a client that stalls past the deadline, then shakes hands and stays silent: its socket
    # must not outlive HANDSHAKE_TIMEOUT_S, whatever the handshake took
    time.sleep(max(0.0, 2 - (time.monotonic() - t0)))
    try:
        tls = ctx.wrap_socket(late, server_hostname="127.0.0.1")
    except (OSError, ssl.SSLError):
        pass  # refused: closed
    else:
        assert _closed_within(tls, 3), "a silent TLS socket was kept past its deadline"
        tls.close()
    for s in (silent, half, late):
        s.close()
    # and the port serves https as before
    import urllib.request

    with urllib.request.urlopen(f"https://127.0.0.1:{srv.port}/health", context=ctx) as r:
        assert r.status == 200


def test_sockets_not_yet_upgraded_are_capped(make_server: MakeServer) -> None:
    srv = make_server(MAX_PENDING_CONNECTIONS="3", HANDSHAKE_TIMEOUT_S="30")
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(3)]
    time.sleep(0.2)
    extra = socket.create_connection(("127.0.0.1", srv.port))
    assert _closed_within(extra, 2), "a socket past MAX_PENDING_CONNECTIONS was kept"
    extra.close()
    for s in idle:
        s.close()
    time.sleep(0.2)
    # the count goes down again; upgraded connections do not count
    upgraded = []
    for _ in range(4):
        conn = RawConn(srv.port)
        conn.send(upgrade_bytes(f"/ws?token={srv.token('u')}"))
        assert conn.read_head()[0] == 101
        upgraded.append(conn)
    assert srv.http("GET", "/health")[0] == 200
    for conn in upgraded:
        conn.close()
    assert any(
        line.get("event") == "connection_refused"
        and line["data"]["details"].get("reason") == "max_pending_connections"
        for line in srv.log_lines()
    )


def test_one_address_cannot_take_every_pending_slot(make_server: MakeServer) -> None:
    """MAX_PENDING_CONNECTIONS_PER_PEER: one address that opens idle sockets gets its share of
    MAX_PENDING_CONNECTIONS, no more; a client from another address is still served."""
    srv = make_server(
        MAX_PENDING_CONNECTIONS="8", MAX_PENDING_CONNECTIONS_PER_PEER="3", HANDSHAKE_TIMEOUT_S="30"
    )
    hog = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(8)]
    time.sleep(0.2)
    kept = [s for s in hog if not _closed_within(s, 0.3)]
    assert len(kept) == 3, f"one address holds {len(kept)} sockets that never upgrade"
    with RawConn(srv.port, source="127.0.0.2") as conn:
        conn.send(request_bytes("GET", "/health"))
        assert conn.read_response().status == 200
    for s in hog:
        s.close()
    time.sleep(0.2)
    # the share is given back: the same address is served again
    with RawConn(srv.port) as conn:
        conn.send(request_bytes("GET", "/health"))
        assert conn.read_response().status == 200
    refused = [
        line["data"]["details"]
        for line in srv.log_lines()
        if line.get("event") == "connection_refused"
        and line["data"]["details"].get("reason") == "max_pending_connections_per_peer"
    ]
    assert refused and refused[0]["peer"] == "127.0.0.1" and refused[0]["limit"] == 3, refused


@pytest.mark.parametrize(
    "query",
    [
        "since=%C2%B2",  # '²'.isdigit() is true, int() refuses it
        "since=%D9%A3",  # an Arabic-Indic digit
        "since=" + "9" * 5000,  # past int()'s digit limit
        "since=99999999999999999999",  # past 64 bits
        "since=-1",
        "since=1%00",
        "channel=%FF%FE",  # not UTF-8
        "channel=a%00b",
        "client_id=%",  # a broken percent-escape
        "client_id=" + "x" * 200,
    ],
)
def test_malformed_upgrade_query_is_a_400(server: Server, query: str) -> None:
    with RawConn(server.port) as conn:
        conn.send(upgrade_bytes(f"/ws?token={server.token('q')}&{query}"))
        response = conn.read_response()
    assert response.status in (400, 431), query
    body = response.json
    assert body["type"] == "error" and body["code"] == "INVALID_MESSAGE", body


#: Slowest /health round trip allowed to another client while one socket pipelines (seen:
#: 13-23 ms with a batch per loop pass, 102 ms once with the other core busy with tests;
#: 2.5-3.7 s when a read was answered in one go): far from both, so a busy machine does not
#: fail it and the old behaviour does
OTHER_CLIENT_MAX_S = 0.5


def test_a_pipelining_client_does_not_stall_the_worker(make_server: MakeServer) -> None:
    """One socket pipelines ~6 MB of `GET /nothing` on the metrics port (404s), as fast as
    the kernel takes them, and its answers are taken too (read and dropped, as kernel
    buffers would for a while). The worker answers it a small batch per loop pass, so
    another client's /health round trips on the main port stay quick throughout."""
    srv = make_server(ENABLE_METRICS="true")
    request = b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n"
    chunk = request * (262144 // len(request))
    n_chunks = 6 * 1024 * 1024 // len(chunk)
    attacker = socket.create_connection(("127.0.0.1", srv.metrics_port))
    attacker.sendall(request)
    attacker.settimeout(5)
    answer = attacker.recv(65536)
    assert answer.startswith(b"HTTP/1.1 404")
    expected = len(answer) * (len(chunk) // len(request)) * n_chunks

    def pipeline() -> None:
        for _ in range(n_chunks):
            attacker.sendall(chunk)

    def drop_answers() -> None:
        got, deadline = 0, time.monotonic() + 30
        with contextlib.suppress(OSError):
            while got < expected and time.monotonic() < deadline:
                got += len(attacker.recv(1 << 20))

    worst, rounds = 0.0, 0
    with RawConn(srv.port) as other:
        other.send(request_bytes("GET", "/health"))  # connected and warm before the attack
        assert other.read_response().status == 200
        threads = [threading.Thread(target=f, daemon=True) for f in (pipeline, drop_answers)]
        for t in threads:
            t.start()
        while threads[1].is_alive():  # until every answer of the attacker has come
            t0 = time.monotonic()
            other.send(request_bytes("GET", "/health"))
            assert other.read_response().status == 200
            worst = max(worst, time.monotonic() - t0)
            rounds += 1
    attacker.close()
    threads[0].join(5)
    assert worst < OTHER_CLIENT_MAX_S, (
        f"another client waited {worst * 1000:.0f} ms for /health ({rounds} round trips)"
    )
    assert rounds >= 10, f"only {rounds} round trips during the attack"
