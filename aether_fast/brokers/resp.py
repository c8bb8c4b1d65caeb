"""A lean Redis connection for the broker's per-message traffic: publishes, positions and
the subscriber.

redis-py costs ~100 µs of Python per command (packing, the pool, retries, observability),
which capped a worker at a few thousand publishes per second. This module keeps only what
the hot path needs: hiredis packs commands and parses replies in C, a command is written in
the loop pass that made it (all of one pass in one write), and replies are matched to their
futures in order, because Redis answers one connection's commands in the order it received
them. That order is also what keeps a channel's offsets in sending order.

Rule: nothing here retries or reconnects. A lost connection fails every waiting future with
`redis.exceptions.ConnectionError` and resolves `closed`; the owner (`redis_link.py`, the
connections the broker and the cluster share) decides when to connect again. Errors are
redis-py's exception types, so callers catch one family.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import hiredis
from redis.asyncio.connection import RedisSSLContext, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

Push = Callable[[Any], None]
#: called with (reply, None) or (None, error) as soon as the reply is read
Handler = Callable[[Any, BaseException | None], None]


def _error(reply: hiredis.ReplyError) -> ResponseError:
    text = str(reply)
    if text.startswith("NOSCRIPT"):
        return NoScriptError(text)
    return ResponseError(text)


class RespConnection(asyncio.Protocol):
    """One connection speaking RESP2. As a command connection, `call()` returns a future for
    the reply; as a subscriber (`on_push` given) every reply goes to `on_push` instead and
    commands are sent with `send()`."""

    def __init__(self, on_push: Push | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._reader = hiredis.Reader()
        self._waiting: deque[asyncio.Future[Any] | Handler] = deque()
        self._out: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._on_push = on_push
        #: when the oldest unanswered command was sent, or when Redis last answered
        self._progress = time.monotonic()
        self.closed: asyncio.Future[None] = self._loop.create_future()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._progress = time.monotonic()
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                if self._on_push is not None:
                    self._on_push(reply)
                    continue
                self._answer(self._waiting.popleft(), reply)
        except hiredis.ProtocolError as exc:
            self.abort(f"redis: protocol error: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        error = RedisConnectionError(f"redis: connection lost{f': {exc}' if exc else ''}")
        while self._waiting:
            self._answer(self._waiting.popleft(), error)
        self._out.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def _answer(self, waiter: asyncio.Future[Any] | Handler, reply: Any) -> None:
        error: BaseException | None = None
        if isinstance(reply, hiredis.ReplyError):
            error = _error(reply)
        elif isinstance(reply, BaseException):
            error = reply
        if isinstance(waiter, asyncio.Future):
            if waiter.done():
                return
            if error is None:
                waiter.set_result(reply)
            else:
                waiter.set_exception(error)
            return
        try:
            waiter(None, error) if error is not None else waiter(reply, None)
        except Exception as exc:  # one handler's bug must not cost the others their replies
            self._loop.call_exception_handler(
                {"message": "redis reply handler failed", "exception": exc}
            )

    # -- commands --------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def send(self, *args: Any) -> None:
        """Queue one command for this loop pass's write; raises if the connection is gone."""
        if self._transport is None or self._transport.is_closing():
            raise RedisConnectionError("redis: not connected")
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(hiredis.pack_command(args))

    def call(self, *args: Any) -> asyncio.Future[Any]:
        """Send one command; the future gets its reply (or its error, as an exception)."""
        self.send(*args)
        done: asyncio.Future[Any] = self._loop.create_future()
        if not self._waiting:
            self._progress = time.monotonic()
        self._waiting.append(done)
        return done

    def request(self, handler: Handler, *args: Any) -> None:
        """Send one command; `handler` gets its reply or its error, from `data_received`
        (no future and no task: this is the publish path)."""
        self.send(*args)
        if not self._waiting:
            self._progress = time.monotonic()
        self._waiting.append(handler)

    def _flush(self) -> None:
        if self._out and self._transport is not None:
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def stalled(self, seconds: float) -> bool:
        """A command has waited `seconds` with no reply from Redis at all."""
        return bool(self._waiting) and time.monotonic() - self._progress > seconds

    def abort(self, reason: str = "redis: closed") -> None:
        if self._transport is not None:
            self._transport.abort()
        else:
            self.connection_lost(RedisConnectionError(reason))


def tls_context(opts: Any) -> ssl.SSLContext:
    """The TLS context of a rediss:// URL (`opts`: its `parse_url`), from its `ssl_*`
    parameters and with the defaults of redis-py's SSLConnection, which the broker's other
    connections (its pool) use: the certificate and host name are checked, against the
    system's CAs or `ssl_ca_certs`; `ssl_certfile`/`ssl_keyfile` are the client's own."""
    return RedisSSLContext(
        keyfile=opts.get("ssl_keyfile"),
        certfile=opts.get("ssl_certfile"),
        cert_reqs=opts.get("ssl_cert_reqs", "required"),
        ca_certs=opts.get("ssl_ca_certs"),
        ca_path=opts.get("ssl_ca_path"),
        check_hostname=opts.get("ssl_check_hostname", True),
    ).get()


async def connect(url: str, on_push: Push | None = None, timeout: float = 5.0) -> RespConnection:
    """Open a connection to the Redis at `url` (redis://, rediss:// or unix://, with the
    password, user, database and TLS settings it names) and authenticate/select before
    returning."""
    opts = parse_url(url)
    loop = asyncio.get_running_loop()

    def factory() -> RespConnection:
        return RespConnection()

    try:
        async with asyncio.timeout(timeout):
            if "path" in opts:
                _, conn = await loop.create_unix_connection(factory, opts["path"])
            else:
                tls = tls_context(opts) if urlsplit(url).scheme == "rediss" else None
                _, conn = await loop.create_connection(
                    factory, opts.get("host", "localhost"), opts.get("port", 6379), ssl=tls
                )
            try:
                # AUTH and SELECT are answered as plain replies, before any subscription
                setup: list[asyncio.Future[Any]] = []
                if opts.get("password"):
                    auth = [opts["username"]] if opts.get("username") else []
                    setup.append(conn.call("AUTH", *auth, opts["password"]))
                if opts.get("db"):
                    setup.append(conn.call("SELECT", opts["db"]))
                for step in setup:
                    await step
            except BaseException:
                conn.abort()
                raise
    except TimeoutError as exc:
        raise RedisConnectionError(f"redis: no connection within {timeout} s") from exc
    except OSError as exc:
        raise RedisConnectionError(f"redis: {exc}") from exc
    conn._on_push = on_push
    return conn
