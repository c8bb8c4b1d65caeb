"""A TCP relay to a real redis-server that makes its pub/sub slow: what Redis sends to a
subscriber connection reaches the server `delay` seconds late (in order, nothing dropped),
everything else (publishes and their replies: the acks) passes at once.

With the Redis broker a sender's ack is the reply of the publish (command connection) and
its own copy, like every member's, comes back through pub/sub (docs/protocol.md §7), so
behind this relay acks beat the copies they acknowledge, and the copies of lower offsets
published just before, as they may on a real network. A connection counts as a subscriber
from the first `SUBSCRIBE` it sends (matched in any case, across reads).

`cut_subscribers()` closes the subscriber connections and refuses new connections until
`refusing` is set False again: what is published meanwhile never reaches the server's
members, a gap on their live sockets, as when a server's Redis subscriber is lost a while.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time


class SlowPubSubRelay:
    """Listens on 127.0.0.1:`port`; each connection is relayed to `target` (host, port)."""

    def __init__(self, target: tuple[str, int], delay: float = 0.15) -> None:
        self.target = target
        self.delay = delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        #: subscriber connections seen so far
        self.subscribers = 0
        #: new connections are closed at once
        self.refusing = False
        self._links: list[_Link] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def __enter__(self) -> SlowPubSubRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks, self._socks = self._socks, []
        for s in [self._listener, *socks]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def cut_subscribers(self) -> None:
        """Close every subscriber connection; refuse new connections (`refusing`)."""
        self.refusing = True
        with self._lock:
            links = [link for link in self._links if link.subscriber]
        for link in links:
            link.end()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._socks += [client, upstream]
                link = _Link(self, client, upstream)
                self._links.append(link)
            link.start()


class _Link:
    """One relayed connection: up (server to Redis) at once; down (Redis to server) at once
    until the connection subscribes, then through a queue released `delay` after arrival."""

    def __init__(self, relay: SlowPubSubRelay, client: socket.socket, upstream: socket.socket):
        self.relay = relay
        self.client = client
        self.upstream = upstream
        self.subscriber = False
        self.late: queue.Queue[tuple[float, bytes] | None] = queue.Queue()

    def start(self) -> None:
        for target in (self._up, self._down, self._release):
            threading.Thread(target=target, daemon=True).start()

    def end(self) -> None:
        for s in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.late.put(None)

    def _up(self) -> None:
        tail = b""
        try:
            while data := self.client.recv(65536):
                if not self.subscriber and b"SUBSCRIBE" in (tail + data).upper():
                    self.subscriber = True  # before the command goes: its reply is late too
                    self.relay.subscribers += 1
                tail = data[-16:]
                self.upstream.sendall(data)
        except OSError:
            pass
        self.end()

    def _down(self) -> None:
        try:
            while data := self.upstream.recv(65536):
                if self.subscriber:
                    self.late.put((time.monotonic() + self.relay.delay, data))
                else:
                    self.client.sendall(data)
        except OSError:
            pass
        self.end()

    def _release(self) -> None:
        while (item := self.late.get()) is not None:
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                self.client.sendall(data)
            except OSError:
                return
