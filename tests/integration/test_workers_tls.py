"""TLS together with WORKERS=2 (docs/operations.md §10 and §14): the supervisor's two workers
both serve https:// and wss:// on the one shared port with TLS_CERT_FILE/TLS_KEY_FILE (a CA
and certificate made for the test), clients connected over TLS land on both workers, and a
round trip through Redis reaches every one of them, whichever worker it is on. Plain text to
the port is refused by the handshake."""

from __future__ import annotations

import json
import socket
import ssl
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trustme
from websockets.sync.client import connect

from tests.conftest import Server
from tests.integration.helpers import joined
from tests.integration.wsclient import TIMEOUT, Client

CLIENTS = 16


class TlsClient(Client):
    """`Client` over wss:// with the test's CA.

    Give it `sync_ws_context`: websockets' sync client reads its socket in a thread while
    the caller writes the upgrade request, and on one TLS 1.3 connection in a few hundred
    the server's session tickets, arriving just after the handshake, put that thread in
    OpenSSL's read at the moment of the write: the request is never sent and the client
    times out (reproduced against a bare asyncio server, so not the server's doing). TLS
    1.2 has no tickets after the handshake. https here, and `test_security`'s wss client
    (asyncio, one thread), keep TLS 1.3."""

    def __init__(self, url: str, ctx: ssl.SSLContext, **params: Any) -> None:
        query = "&".join(f"{k}={v}" for k, v in params.items() if v is not None)
        self.url = f"{url}?{query}" if query else url
        self._cm = connect(self.url, ssl=ctx, open_timeout=TIMEOUT, max_size=None)
        self.ws = self._cm.__enter__()
        self.sequence = 0


def sync_ws_context(ca: trustme.CA) -> ssl.SSLContext:
    """A client context trusting `ca`, capped at TLS 1.2 (see `TlsClient`)."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def https_json(port: int, path: str, ctx: ssl.SSLContext) -> dict[str, Any]:
    """GET over https on a new connection (so the kernel picks a worker each time)."""
    with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=ctx, timeout=10) as r:
        assert r.status == 200
        body: dict[str, Any] = json.loads(r.read())
        return body


def test_two_workers_serve_tls_on_the_shared_port(
    make_server: Callable[..., Server], redis_url: str, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    srv = make_server(
        WORKERS="2",
        BROKER_URL=redis_url,
        NODE_ID="tlsnode",
        TLS_CERT_FILE=str(tmp_path / "cert.pem"),
        TLS_KEY_FILE=str(tmp_path / "key.pem"),
        RATE_LIMIT_MESSAGES="100000",
    )
    assert srv.proc is not None
    supervisor = srv.proc.pid

    # both workers answer https on the port: each names itself in `answered_by`
    answered: set[str] = set()
    deadline = time.monotonic() + 20
    while True:
        body = https_json(srv.port, "/ws/status", ctx)
        if len(body["workers"]) == 2:
            answered.add(body["answered_by"])
        if len(answered) == 2:
            break
        assert time.monotonic() < deadline, f"one worker answered: {answered}; last {body}"
        time.sleep(0.05)
    pids = sorted(int(w["pid"]) for w in body["workers"])
    assert supervisor not in pids and len(set(pids)) == 2, body
    assert {w["worker"] for w in body["workers"]} == answered, body

    ch = "tls.fan"
    url = f"wss://127.0.0.1:{srv.port}/ws"
    ws_ctx = sync_ws_context(ca)
    clients = [
        TlsClient(url, ws_ctx, token=srv.token(f"t{i}"), client_id=f"t{i}", channel=ch)
        for i in range(CLIENTS)
    ]
    try:
        for c in clients:
            joined(c, ch)
        # the clients are on both workers (each worker's own count, over https)
        deadline = time.monotonic() + 15
        while True:
            workers = https_json(srv.port, "/ws/status", ctx)["workers"]
            by_pid = {int(w["pid"]): int(w["connections_active"]) for w in workers}
            if sum(by_pid.values()) == CLIENTS and all(by_pid.values()) and len(by_pid) == 2:
                break
            assert time.monotonic() < deadline, f"clients not on both workers: {by_pid}"
            time.sleep(0.1)

        # a round trip from each worker's side: every other client hears it, once
        for n, speaker in enumerate((clients[0], clients[-1])):
            speaker.publish(ch, f"hello {n}")
            ack = speaker.recv()
            assert ack["action"] == "ack", ack
            offset = ack["data"]["metadata"]["offset"]
            for c in clients:
                if c is speaker:
                    continue
                got = c.recv()
                assert got["action"] == "send", got
                assert (got["data"]["content"], got["data"]["metadata"]["offset"]) == (
                    f"hello {n}",
                    offset,
                ), got
        for c in clients:
            c.nothing(0.05)
    finally:
        for c in clients:
            c.close()

    # plain text to the TLS port: no answer in clear, and both workers go on serving TLS
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as plain:
        plain.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            reply = plain.recv(4096)
        except ConnectionResetError:
            reply = b""
        assert b"healthy" not in reply
    assert https_json(srv.port, "/health", ctx) == {"status": "healthy"}
