"""A small synchronous WebSocket test client on `websockets.sync` with protocol helpers."""

from __future__ import annotations

import json
from typing import Any, Self

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

TIMEOUT = 5.0


class Closing:
    """Closed at the end of a `with` block."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client(Closing):
    def __init__(self, url: str, **params: Any) -> None:
        query = "&".join(f"{k}={v}" for k, v in params.items() if v is not None)
        self.url = f"{url}?{query}" if query else url
        self._cm = connect(self.url, open_timeout=TIMEOUT, max_size=None)
        self.ws: ClientConnection = self._cm.__enter__()
        self.sequence = 0

    def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        msg = self.ws.recv(timeout=timeout)
        assert isinstance(msg, str), msg
        out: dict[str, Any] = json.loads(msg)
        return out

    def recv_until(self, mtype: str, action: str | None = None, limit: int = 50) -> dict[str, Any]:
        for _ in range(limit):
            msg = self.recv()
            if msg["type"] == mtype and (action is None or msg.get("action") == action):
                return msg
        raise AssertionError(f"no {mtype}/{action} within {limit} messages")

    def nothing(self, timeout: float = 0.3) -> None:
        """Assert that no message arrives within `timeout` seconds."""
        try:
            msg = self.ws.recv(timeout=timeout)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected message: {msg!r}")

    def quiet(self, timeout: float = TIMEOUT) -> None:
        """Assert that nothing is on its way: a status request's reply must be the next frame.

        The server answers on this connection in order, so whatever it had queued for this
        client before it read the request (a delivery, an error) would come first. Unlike a
        silent wait, this cannot pass because the unwanted frame was merely slow."""
        self.send({"type": "system", "action": "status", "data": {}})
        msg = self.recv(timeout)
        assert (msg.get("type"), msg.get("action")) == ("system", "status"), msg
        assert "connections" in msg["data"], msg  # the reply, not a notice

    def send(self, obj: Any) -> None:
        self.ws.send(obj if isinstance(obj, (str, bytes)) else json.dumps(obj))

    def publish(
        self, channel: str, content: str, sequence: int | None = None, action: str = "send"
    ) -> int:
        if sequence is None:
            self.sequence += 1
            sequence = self.sequence
        self.send(
            {
                "type": "message",
                "action": action,
                "data": {
                    "channel": channel,
                    "content": content,
                    "metadata": {"sequence": sequence},
                },
            }
        )
        return sequence

    def join(self, channel: str, **extra: Any) -> None:
        self.send(
            {"type": "connection", "action": "connect", "data": {"channel": channel, **extra}}
        )

    def leave(self, channel: str) -> None:
        self.send({"type": "connection", "action": "disconnect", "data": {"channel": channel}})

    def closed_with(self, timeout: float = TIMEOUT) -> int | None:
        """Read until the server closes; returns the close code it sent."""
        try:
            while True:
                self.ws.recv(timeout=timeout)
        except ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd is not None else None

    def close(self) -> None:
        self.ws.close()
