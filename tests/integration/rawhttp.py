"""Raw-socket HTTP/1.1 helpers: exact bytes out, responses parsed by hand.

Used where `urllib`/`http.client` would hide what the server did on the wire: pipelining,
requests fed one byte at a time, garbage, oversized heads, and whether the server closed.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

TIMEOUT = 5.0


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def request_bytes(
    method: str,
    path: str,
    body: bytes | Any = None,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    close: bool = False,
) -> bytes:
    """One HTTP/1.1 request; a non-bytes body is sent as JSON with its Content-Length."""
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if body is not None:
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    lines.extend(f"{k}: {v}" for k, v in (headers or {}).items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def chunked(body: bytes, size: int) -> bytes:
    """`body` in the chunked transfer coding, `size` bytes a chunk, then the last chunk."""
    parts = (body[i : i + size] for i in range(0, len(body), size))
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts) + b"0\r\n\r\n"


def upgrade_bytes(path: str, headers: dict[str, str] | None = None) -> bytes:
    """A WebSocket upgrade request for `path` (which may carry a query)."""
    key = base64.b64encode(os.urandom(16)).decode()
    head = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key,
        "Sec-WebSocket-Version": "13",
        **(headers or {}),
    }
    return request_bytes("GET", path, headers=head)


class RawConn:
    """One TCP connection to the server, read with an explicit buffer."""

    def __init__(
        self,
        port: int,
        timeout: float = TIMEOUT,
        rcvbuf: int | None = None,
        source: str | None = None,
    ) -> None:
        """`source`: the local address to connect from (e.g. 127.0.0.2, another peer)."""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if source is not None:
            self.sock.bind((source, 0))
        if rcvbuf is not None:  # before connect, so the window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(("127.0.0.1", port))
        except OSError:
            self.sock.close()
            raise
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_bytewise(self, data: bytes, delay: float = 0.001) -> None:
        """Each byte in its own TCP segment, with a pause so the server reads them apart."""
        for i in range(len(data)):
            self.sock.sendall(data[i : i + 1])
            time.sleep(delay)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"server closed the connection; unread: {self.buf[:200]!r}")
        self.buf += chunk

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_head(self) -> tuple[int, str, dict[str, str]]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        version, status, *reason = lines[0].split(" ", 2)
        assert version == "HTTP/1.1", lines[0]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(status), (reason[0] if reason else ""), headers

    def read_response(self) -> RawResponse:
        status, reason, headers = self.read_head()
        body = self.read_exact(int(headers.get("content-length", "0")))
        return RawResponse(status, reason, headers, body)

    def read_ws_frame(self) -> tuple[int, bytes]:
        """One unmasked server frame: (opcode with the FIN bit, payload)."""
        b0, b1 = self.read_exact(2)
        assert not b1 & 0x80, "server frames must not be masked"
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(self.read_exact(2), "big")
        elif n == 127:
            n = int.from_bytes(self.read_exact(8), "big")
        return b0, self.read_exact(n)

    def read_ws_text(self) -> Any:
        """One unfragmented server text frame, decoded as JSON."""
        op, payload = self.read_ws_frame()
        assert op == 0x81, hex(op)
        return json.loads(payload)

    def send_ws_close(self, code: int = 1000) -> None:
        """A masked client CLOSE frame."""
        mask = os.urandom(4)
        payload = code.to_bytes(2, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.send(bytes([0x88, 0x80 | len(payload)]) + mask + masked)

    def closed_by_server(self, timeout: float = TIMEOUT) -> bool:
        """True when the server closes (EOF or reset) within `timeout` with nothing more sent."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        finally:
            self.sock.settimeout(TIMEOUT)
        if data:
            self.buf += data
            return False
        return True


def exchange(port: int, data: bytes) -> RawResponse:
    """Send `data` on a fresh connection and read one response."""
    with RawConn(port) as conn:
        conn.send(data)
        return conn.read_response()
