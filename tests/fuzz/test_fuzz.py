"""Fuzzing the message decoder/validator and the HTTP front over real sockets (hypothesis).

Bounded in CI (AETHER_FUZZ_EXAMPLES, default 150 per target); `make fuzz` runs a longer
campaign. Each example must be answered (or the socket closed) within a deadline, the server
must log no error, keep serving a bystander, and its memory must stay bounded.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Server
from tests.integration.helpers import OP_TEXT, RawWS
from tests.integration.wsclient import Client

EXAMPLES = int(os.environ.get("AETHER_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
words = st.sampled_from(
    [
        "connection",
        "message",
        "system",
        "error",
        "",
        "send",
        "retry",
        "connect",
        "disconnect",
        "refresh",
        "status",
        "broadcast",
        "ack",
    ]
)
messages = st.fixed_dictionaries(
    {"type": words | json_values, "action": words | json_values},
    optional={
        "data": st.fixed_dictionaries(
            {},
            optional={
                "channel": st.sampled_from(["fz", "other", "", "a" * 129, "bad name"])
                | json_values,
                "content": st.text(max_size=200) | json_values,
                "metadata": st.fixed_dictionaries(
                    {},
                    optional={
                        "sequence": st.integers(-5, 2**70) | json_values,
                        "timestamp": json_values,
                    },
                )
                | json_values,
                "since": json_values,
                "epoch": json_values,
                "token": st.text(max_size=50) | json_values,
                "message": json_values,
                "severity": json_values,
            },
        )
        | json_values,
        "extra": json_values,
    },
)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("fuzz"), {"RATE_LIMIT_MESSAGES": "0"})
    yield srv
    assert srv.stop() == 0
    srv.check_log()


def _probe(ws: RawWS) -> None:
    """A status request must be answered: the connection is alive and in order."""
    ws.send_json({"type": "system", "action": "status", "data": {}})
    for _ in range(100):
        msg = ws.recv_json()
        if msg.get("type") == "system" and msg.get("action") == "status":
            return
    raise AssertionError("no status reply")


def test_message_decoder_fuzz(fuzz_server: Server) -> None:
    srv = fuzz_server
    assert srv.proc is not None
    ws = RawWS(srv.port, query={"token": srv.token("fuzzer"), "channel": "fz"}, timeout=5)
    ws.recv_json()
    _probe(ws)
    before = rss_kib(srv.proc.pid)

    @FUZZ
    @given(msg=messages | json_values | st.text(max_size=300))
    def one(msg: Any) -> None:
        payload = msg if isinstance(msg, str) else json.dumps(msg)
        ws.send_frame(OP_TEXT, payload.encode())
        _probe(ws)

    one()
    with Client(srv.ws_url, token=srv.token("bystander"), channel="fz") as by:
        assert by.recv()["data"]["channel"] == "fz"
        by.publish("fz", "after the fuzz")
        assert by.recv()["action"] == "ack"
    ws.close()
    assert rss_kib(srv.proc.pid) - before < 64 * 1024  # bounded: under 64 MiB of growth


request_lines = st.sampled_from(
    [
        b"GET / HTTP/1.1",
        b"POST /ws/channels HTTP/1.1",
        b"GET /ws HTTP/1.1",
        b"DELETE /ws/channels/x HTTP/1.1",
        b"GET /health HTTP/1.0",
        b"PUT /ws/broadcast HTTP/1.1",
        b"\x00\xff",
        b"GET",
        b"",
    ]
)
headers = st.lists(
    st.tuples(
        st.sampled_from(
            [
                b"Host",
                b"Content-Length",
                b"Transfer-Encoding",
                b"Upgrade",
                b"Connection",
                b"Sec-WebSocket-Key",
                b"Sec-WebSocket-Version",
                b"Authorization",
                b"X",
            ]
        )
        | st.binary(max_size=20),
        st.sampled_from([b"websocket", b"Upgrade", b"chunked", b"13", b"5", b"-1", b"99999999999"])
        | st.binary(max_size=40),
    ),
    max_size=8,
)


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    head = draw(request_lines) + b"\r\n"
    for name, value in draw(headers):
        head += name + b": " + value + b"\r\n"
    return head + b"\r\n" + draw(st.binary(max_size=200))


def test_http_front_fuzz(fuzz_server: Server) -> None:
    srv = fuzz_server
    assert srv.proc is not None
    before = rss_kib(srv.proc.pid)

    @FUZZ
    @given(data=http_requests() | st.binary(max_size=400))
    def one(data: bytes) -> None:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            try:
                while sock.recv(65536):  # answered, then closed (or closed at once)
                    pass
            except ConnectionResetError:
                pass

    one()
    status, body, _ = srv.http("GET", "/health")
    assert status == 200 and body["status"] == "healthy"
    assert rss_kib(srv.proc.pid) - before < 64 * 1024
