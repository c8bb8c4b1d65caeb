"""A TCP relay on 127.0.0.1 that records the WebSocket text messages crossing it.

A client connects to `WireTap.url` instead of the server; every byte is relayed unchanged
both ways, and each connection's text messages are decoded as JSON into `Tapped.up`
(client to server, as the server read them, or as the client sent them once stalled) and
`Tapped.down` (server to client, as the server wrote them, including what it wrote after
the client dropped its side). `stall_up(i)` makes the network lose what the client of
connection `i` sends from then on (recorded, never passed on): a request that is never
answered. It shows
what crossed the wire, which neither end's own account can: e.g. that a client's resend
really was a `retry` and how many acks the server sent for it.

Not a WebSocket implementation: it skips the HTTP upgrade, then parses frames (masked or
not, fragmented or not). A message that crossed compressed (permessage-deflate, RSV1) is
inflated as one whose sender kept no context (aether-fast's server always answers both
`*_no_context_takeover`; its Python client compresses each message afresh) and flagged in
`Tapped.up_compressed` / `Tapped.down_compressed`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import zlib
from dataclasses import dataclass, field
from typing import Any

from tests.integration.helpers import Op


@dataclass
class Tapped:
    """One relayed connection: the JSON text messages each way, in order."""

    up: list[dict[str, Any]] = field(default_factory=list)
    down: list[dict[str, Any]] = field(default_factory=list)
    #: per message of `up` / `down`: it crossed compressed (RSV1)
    up_compressed: list[bool] = field(default_factory=list)
    down_compressed: list[bool] = field(default_factory=list)


class _Frames:
    """Incremental parser of one direction: HTTP head first, then WebSocket frames."""

    def __init__(self, out: list[dict[str, Any]], compressed: list[bool]) -> None:
        self.out = out
        self.compressed = compressed
        self.buf = b""
        self.in_head = True
        self.parts: list[bytes] | None = None  # a fragmented text message so far
        self.rsv1 = False  # the message in `parts` came compressed

    def feed(self, data: bytes) -> None:
        self.buf += data
        if self.in_head:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.buf = self.buf[end + 4 :]
            self.in_head = False
        while True:
            frame = self._frame()
            if frame is None:
                return
            fin, rsv1, opcode, payload = frame
            if opcode == Op.TEXT:
                self.parts, self.rsv1 = [payload], rsv1
            elif opcode == Op.CONT and self.parts is not None:
                self.parts.append(payload)
            else:
                continue  # binary, ping, pong, close
            if fin:
                message = b"".join(self.parts)
                if self.rsv1:
                    message = zlib.decompressobj(-15).decompress(message + b"\x00\x00\xff\xff")
                self.out.append(json.loads(message))
                self.compressed.append(self.rsv1)
                self.parts = None

    def _frame(self) -> tuple[bool, bool, int, bytes] | None:
        buf = self.buf
        if len(buf) < 2:
            return None
        fin, rsv1, opcode = bool(buf[0] & 0x80), bool(buf[0] & 0x40), buf[0] & 0x0F
        masked, length = bool(buf[1] & 0x80), buf[1] & 0x7F
        pos = 2
        if length == 126:
            if len(buf) < 4:
                return None
            (length,) = struct.unpack("!H", buf[2:4])
            pos = 4
        elif length == 127:
            if len(buf) < 10:
                return None
            (length,) = struct.unpack("!Q", buf[2:10])
            pos = 10
        mask = b""
        if masked:
            if len(buf) < pos + 4:
                return None
            mask, pos = buf[pos : pos + 4], pos + 4
        if len(buf) < pos + length:
            return None
        payload = buf[pos : pos + length]
        if masked:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.buf = buf[pos + length :]
        return fin, rsv1, opcode, payload


class WireTap:
    """Relay 127.0.0.1:<port> to `target` (host, port), recording every connection."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.connections: list[Tapped] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        self._stalled: set[int] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def snapshot(self) -> list[Tapped]:
        """A copy of what was recorded so far."""
        with self._lock:
            return [
                Tapped(list(t.up), list(t.down), list(t.up_compressed), list(t.down_compressed))
                for t in self.connections
            ]

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target)
            tapped = Tapped()
            with self._lock:
                index = len(self.connections)
                self.connections.append(tapped)
                self._sockets += [client, upstream]
            for src, dst, frames, up in (
                (client, upstream, _Frames(tapped.up, tapped.up_compressed), index),
                (upstream, client, _Frames(tapped.down, tapped.down_compressed), -1),
            ):
                threading.Thread(
                    target=self._pump, args=(src, dst, frames, up), daemon=True
                ).start()

    def stall_up(self, index: int) -> None:
        """From now on, what the client of connection `index` (in order of connection) sends
        is recorded and not passed on to the server."""
        with self._lock:
            self._stalled.add(index)

    def _pump(self, src: socket.socket, dst: socket.socket, frames: _Frames, up: int) -> None:
        """Relay `src` to `dst`; `up`: the connection's index when `src` is its client."""
        dst_open = True
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            with self._lock:
                frames.feed(data)
                if up in self._stalled:
                    continue
            if dst_open:
                try:
                    dst.sendall(data)
                except OSError:
                    dst_open = False  # keep reading src: what it still sends is recorded
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> WireTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
