"""Fuzzing the message decoder/validator and the HTTP front over real sockets (hypothesis).

Bounded in CI (AETHER_FUZZ_EXAMPLES, default 150 per target); `make fuzz` runs a longer
campaign. The upgrade's query and headers are fuzzed too: each gets a 101 or a JSON 4xx.
Each example must be answered (or the socket closed) within a deadline, the server
must log no error, keep serving a bystander, and its memory must stay bounded.
"""

from __future__ import annotations

import base64
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import Server
from tests.integration.helpers import Op, RawWS, rss_kib
from tests.integration.rawhttp import RawConn
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
        ws.send_frame(Op.TEXT, payload.encode())
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


query_names = st.sampled_from(["token", "client_id", "channel", "since", "epoch", "echo"])
tricky_values = st.sampled_from(
    ["", "1", "-1", "true", "chat", "%C2%B2", "%D9%A3", "%FF", "%", "%0", "%00", "1%00", "9" * 5000]
)
query_values = (
    tricky_values
    | st.text(max_size=60)
    | st.binary(max_size=40).map(lambda b: "".join(f"%{c:02X}" for c in b))
)
query_pairs = st.tuples(query_names, tricky_values) | st.tuples(
    query_names | st.text(max_size=8), query_values
)
upgrade_headers = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "Origin",
                "Authorization",
                "Sec-WebSocket-Protocol",
                "Sec-WebSocket-Extensions",
                "Sec-WebSocket-Key",
                "Sec-WebSocket-Version",
                "Connection",
                "Upgrade",
                "Cookie",
                "X-Forwarded-For",
            ]
        ),
        st.sampled_from(["", "Bearer ", "Bearer x", "13", "8", "permessage-deflate; x=%", "null"])
        | st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
    ),
    max_size=4,
)


def _query(pairs: list[tuple[str, str]]) -> str:
    from urllib.parse import quote

    return "&".join(f"{quote(k, safe='%')}={quote(v, safe='%')}" for k, v in pairs)


def test_upgrade_query_and_headers_fuzz(fuzz_server: Server) -> None:
    """Every upgrade request is answered with a 101, or a JSON error with a fitting 4xx."""
    srv = fuzz_server
    assert srv.proc is not None
    token = srv.token("upgrader")
    before = rss_kib(srv.proc.pid)

    @FUZZ
    @given(
        pairs=st.lists(query_pairs, max_size=5),
        extra=upgrade_headers,
        with_token=st.booleans(),
    )
    @example(pairs=[("since", "%C2%B2")], extra=[], with_token=True)  # issue 12: was a traceback
    def one(pairs: list[tuple[str, str]], extra: list[tuple[str, str]], with_token: bool) -> None:
        if with_token:
            pairs = [("token", token), *pairs]
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET /ws?{_query(pairs)} HTTP/1.1",
            "Host: 127.0.0.1",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in extra if "\r" not in v and "\n" not in v),
        ]
        with RawConn(srv.port, timeout=10) as conn:
            conn.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            try:
                status, _, headers = conn.read_head()
            except ConnectionError:
                raise AssertionError(f"closed without an answer: {lines}") from None
            if status == 101:
                return
            assert 400 <= status < 500, (status, lines)
            body = json.loads(conn.read_exact(int(headers["content-length"])))
            assert body["type"] == "error" and isinstance(body["code"], str), body

    one()
    status, body, _ = srv.http("GET", "/health")
    assert status == 200 and body["status"] == "healthy"
    assert rss_kib(srv.proc.pid) - before < 64 * 1024
