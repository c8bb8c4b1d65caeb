"""HTTP keep-alive on a raw socket (docs/operations.md §4): a connection left idle for
HTTP_KEEPALIVE_IDLE_S after an answer is closed by the server, on the main port and on the
metrics port; one that keeps sending requests is answered and kept, however long it lasts.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.conftest import Server
from tests.integration.rawhttp import RawConn, request_bytes

IDLE_S = 1.0


def _answered(conn: RawConn, path: str) -> None:
    conn.send(request_bytes("GET", path))
    resp = conn.read_response()
    assert resp.status == 200, resp
    assert resp.headers.get("connection", "").lower() != "close", resp.headers


def test_idle_keep_alive_connection_is_closed(make_server: Callable[..., Server]) -> None:
    srv = make_server(HTTP_KEEPALIVE_IDLE_S=str(IDLE_S))
    for port, path in ((srv.port, "/health"), (srv.metrics_port, "/metrics")):
        with RawConn(port) as conn:
            _answered(conn, path)
            answered = time.monotonic()
            # EOF, with nothing more sent, once the connection has been idle long enough:
            # well before the default (30 s) would close it
            assert conn.closed_by_server(timeout=15.0), f"port {port} kept the idle connection"
            assert time.monotonic() - answered >= IDLE_S * 0.9, "closed before it was idle"
            assert conn.buf == b""


def test_busy_keep_alive_connection_stays_open(make_server: Callable[..., Server]) -> None:
    idle = 2 * IDLE_S  # room for a busy machine between two requests
    srv = make_server(HTTP_KEEPALIVE_IDLE_S=str(idle))
    with RawConn(srv.port) as conn:
        started = time.monotonic()
        # a request every ~0.1 s for three idle periods: each one restarts the idle clock
        while time.monotonic() - started < 3 * idle:
            _answered(conn, "/health")
            assert not conn.closed_by_server(timeout=0.1), "closed while in use"
        # and a request after the others is still answered on the same connection
        _answered(conn, "/ws/status")
        assert conn.closed_by_server(timeout=15.0)
