"""Helpers shared by the WebSocket integration tests.

- `HClient`: the sync `Client` with extra handshake headers (Authorization, Origin).
- `drain`: every message until the server closes, and the close code it sent.
- `expect_error`: the next message must be an error with a given code.
- `joined`, `member`: the connection/connect reply; a client whose join was confirmed.
- `closing_all`: a list of clients, each closed when the block ends.
- `Op`, `build_frame`: frame opcodes (RFC 6455 §5.2) and frames built by hand.
- `RawWS`: a hand-driven WebSocket on a plain socket, for what a well-behaved library refuses
  to send (bad UTF-8, reserved bits, stray continuations, unmasked frames) and for a reader
  that never reads.
- `wait_for`: poll a condition with a deadline instead of sleeping.
- `rss_kib`: a process's resident set size, for the bounded-memory checks.
- `no_new_server_errors`: an autouse fixture for modules on the shared `server`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from enum import IntEnum
from typing import Any, TypeVar
from urllib.parse import urlencode

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import Server
from tests.integration.wsclient import TIMEOUT, Client, Closing

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Op(IntEnum):
    """The frame opcodes of RFC 6455 §5.2."""

    CONT = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


@pytest.fixture(autouse=True)
def no_new_server_errors(server: Server) -> Iterator[None]:
    """Autouse in a module that imports it: the module's tests share one server, so an
    error-level log line (a crash in the server) is charged to the test whose input caused
    it, not to whichever test ran last when the module's server is torn down."""
    seen = len(server.log_lines())
    yield
    new = server.log_lines()[seen:]
    bad = [line for line in new if line.get("level") in ("error", "raw")]
    if bad:
        # Reported here, for this test; the module-level check at teardown would report the
        # same lines again against whichever test ran last.
        server.allow_errors = True
        raise AssertionError(f"server logged errors during this test: {bad[:3]}")


class HClient(Client):
    """`Client` that can send extra handshake headers and an Origin."""

    def __init__(
        self,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        origin: str | None = None,
        **params: Any,
    ) -> None:
        query = "&".join(f"{k}={v}" for k, v in params.items() if v is not None)
        self.url = f"{url}?{query}" if query else url
        self._cm = connect(
            self.url,
            open_timeout=TIMEOUT,
            max_size=None,
            additional_headers=headers,
            origin=origin,  # type: ignore[arg-type]
        )
        self.ws = self._cm.__enter__()
        self.sequence = 0


def drain(c: Client, timeout: float = TIMEOUT) -> tuple[list[dict[str, Any]], int | None]:
    """Every message until the server closes the connection, and the close code it sent."""
    got, code, closed = collect(c, timeout)
    if not closed:
        raise AssertionError(f"connection not closed within {timeout}s; got {got}")
    return got, code


def collect(c: Client, timeout: float) -> tuple[list[dict[str, Any]], int | None, bool]:
    """What arrives within `timeout`: (messages, close code, closed?)."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return got, None, False
            try:
                msg = c.ws.recv(timeout=left)
            except TimeoutError:
                return got, None, False
            got.append(json.loads(msg) if isinstance(msg, str) else {"binary": msg})
    except ConnectionClosed as closed:
        return got, (closed.rcvd.code if closed.rcvd is not None else None), True


def expect_error(c: Client, code: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The next message must be `{"type":"error","code":code,...}`, in the shape of
    docs/protocol.md §11."""
    msg = c.recv(timeout)
    assert msg.get("type") == "error", msg
    assert msg.get("code") == code, msg
    assert isinstance(msg.get("message"), str) and msg["message"], msg
    details = msg.get("details")
    assert isinstance(details, dict), msg
    assert isinstance(details.get("component"), str) and isinstance(details.get("reason"), str), msg
    return msg


def expect(c: Client, mtype: str, action: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The next message must be `mtype`/`action`."""
    msg = c.recv(timeout)
    assert (msg.get("type"), msg.get("action")) == (mtype, action), msg
    return msg


def joined(c: Client, channel: str | None = None) -> dict[str, Any]:
    """The next message must be the connection/connect reply (for `channel`); its data."""
    msg = expect(c, "connection", "connect")
    if channel is not None:
        assert msg["data"]["channel"] == channel, msg
    data: dict[str, Any] = msg["data"]
    return data


@contextlib.contextmanager
def member(server: Server, user: str | None, channel: str, **params: Any) -> Iterator[Client]:
    """A client of `user` (anonymous: None) that joined `channel` on connecting (more query
    parameters in `params`), its connection/connect reply taken."""
    token = None if user is None else server.token(user)
    with Client(server.ws_url, token=token, channel=channel, **params) as c:
        joined(c, channel)
        yield c


C = TypeVar("C", bound=Closing)


@contextlib.contextmanager
def closing_all(clients: list[C]) -> Iterator[list[C]]:
    """`clients` (a list the block may add to), each closed when the block ends."""
    try:
        yield clients
    finally:
        for c in clients:
            c.close()


def wait_for(cond: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Call `cond` until it returns a truthy value; fail with its last value at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s; last: {value!r}")
        time.sleep(interval)


def rss_kib(pid: int) -> int:
    """The resident set size of process `pid`, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def join_msg(channel: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "connection", "action": "connect", "data": {"channel": channel, **extra}}


def send_msg(channel: Any, content: Any, sequence: Any, **extra: Any) -> dict[str, Any]:
    return {
        "type": "message",
        "action": "send",
        "data": {
            "channel": channel,
            "content": content,
            "metadata": {"sequence": sequence},
            **extra,
        },
    }


# -- raw WebSocket -----------------------------------------------------------------------------


def build_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
) -> bytes:
    """One client frame, built by hand. `rsv` is the 3 reserved bits (0..7)."""
    b0 = (0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0xF)
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + body


class RawWS(Closing):
    """A WebSocket client on a plain blocking socket."""

    def __init__(
        self,
        port: int,
        path: str = "/ws",
        *,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        connection: str = "Upgrade",
        rcvbuf: int | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # before connect(), so the window offered in the handshake is small from the start
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        self.sock = sock
        self.buf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        self.key = key
        target = path + ("?" + urlencode(query) if query else "")
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            f"Connection: {connection}",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed during the handshake: {self.buf!r}")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines_in = head.decode("latin-1").split("\r\n")
        self.status_line = lines_in[0]
        self.status = int(lines_in[0].split()[1])
        self.headers = {
            k.strip().lower(): v.strip()
            for k, v in (line.split(":", 1) for line in lines_in[1:] if ":" in line)
        }

    def expected_accept(self) -> str:
        digest = hashlib.sha1((self.key + WS_GUID).encode()).digest()
        return base64.b64encode(digest).decode()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, opcode: int, payload: bytes, **kw: Any) -> None:
        self.sock.sendall(build_frame(opcode, payload, **kw))

    def send_json(self, obj: Any) -> None:
        self.send_frame(Op.TEXT, json.dumps(obj).encode())

    def _need(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_frame(self) -> tuple[bool, int, bytes]:
        """(fin, opcode, payload) of the next frame from the server (unmasked)."""
        b0, b1 = self._need(2)
        n = b1 & 0x7F
        assert not b1 & 0x80, "server frames must not be masked"
        if n == 126:
            (n,) = struct.unpack("!H", self._need(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._need(8))
        return bool(b0 & 0x80), b0 & 0x0F, self._need(n)

    def recv_json(self) -> dict[str, Any]:
        """The next text message (pings are answered, pongs skipped)."""
        while True:
            fin, op, payload = self.recv_frame()
            if op == Op.PING:
                self.send_frame(Op.PONG, payload)
                continue
            if op == Op.PONG:
                continue
            assert op == Op.TEXT and fin, (op, payload)
            out: dict[str, Any] = json.loads(payload)
            return out

    def close_code(self) -> int | None:
        """Read until the server's CLOSE frame; its code (None: closed without one)."""
        try:
            while True:
                _, op, payload = self.recv_frame()
                if op == Op.CLOSE:
                    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
        except (EOFError, ConnectionError):
            return None

    def close(self) -> None:
        self.sock.close()
