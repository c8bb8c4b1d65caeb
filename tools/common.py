"""What tools/load.py, tools/soak.py and tests/conftest.py share.

Free ports of 127.0.0.1, HS256 tokens, a server process's start (`wait_listening`) and its
JSON log, the descriptor limit, and `Members`: WebSocket connections spread over channels,
each publishing at a rate and counting its acks (with their latency) and the other members'
deliveries. The tools run as modules from the repository's root (`python -m tools.load`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import jwt
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake

#: connections opened at once: enough to be quick, few enough not to look like a SYN flood
CONNECT_CONCURRENCY = 50


# -- ports, tokens, processes ---------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """`n` different free ports (held together while chosen, so none is picked twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def token(secret: str, sub: str, ttl: float = 3600, **claims: Any) -> str:
    """An HS256 JWT for `sub`, issued now, expiring in `ttl` seconds, with `claims` added."""
    now = int(time.time())
    payload = {"sub": sub, "iat": now, "exp": now + ttl, **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def wait_listening(
    proc: subprocess.Popen[Any], port: int, timeout: float, log_text: Callable[[], str]
) -> None:
    """Returns once 127.0.0.1:`port` accepts a connection; RuntimeError, with `log_text()`,
    when `proc` exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {log_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start: " + log_text())


def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def json_lines(text: str, raw_chars: int | None = None) -> list[dict[str, Any]]:
    """A JSON log's lines; a line that is no JSON as {"level": "raw", "event": the line (its
    first `raw_chars` characters)}."""
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"level": "raw", "event": line[:raw_chars]})
    return out


def raise_fd_limit(needed: int) -> None:
    """This process's soft RLIMIT_NOFILE up to `needed` (at most the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed), hard))


# -- publishing members ---------------------------------------------------------------------


async def ws_connect(
    url: str, *, open_timeout: float = 10, local_addr: tuple[str, int] | None = None, **kw: Any
) -> ClientConnection:
    """A client connection as the tools want one: no size limit, no pings, no compression."""
    return await websockets.connect(
        url,
        open_timeout=open_timeout,
        max_size=None,
        ping_interval=None,
        compression=None,
        local_addr=local_addr,
        **kw,
    )


def percentile(values: list[float], p: float) -> float | None:
    """The `p` quantile (0..1) of `values`, to 0.01; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 2)


@dataclass(slots=True)
class Member:
    """One publishing connection."""

    index: int
    channel: str
    client_id: str
    ws: ClientConnection | None = None
    sequence: int = 0
    pending: dict[int, float] = field(default_factory=dict)  # sequence -> perf_counter at send
    closed: str | None = None  # the close code, once the server closed it


@dataclass(slots=True)
class Tally:
    opened: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # why a member did not open
    sent: int = 0
    acked: int = 0
    expected: int = 0  # deliveries: each message sent, once to each other member of its channel
    received: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # error messages, by code


M = TypeVar("M", bound=Member)
T = TypeVar("T", bound=Tally)


class Members(Generic[M, T]):
    """`members` open (`open_all`), publish (`publish_all`) until a time, wait for the last
    acks and deliveries (`drain`) and close (`close`). A subclass gives each member's `url`
    and says what it sends (`content`) and what it makes of an ack, a delivery and a close."""

    def __init__(self, members: list[M], tally: T) -> None:
        self.members = members
        self.stats = tally
        self.per_channel: Counter[str] = Counter()  # open members of each channel
        self.readers: list[asyncio.Task[None]] = []

    # what a subclass says

    def url(self, m: M) -> str:
        raise NotImplementedError

    def local_addr(self, m: M) -> tuple[str, int] | None:
        return None

    def content(self, m: M, now: float) -> str:
        raise NotImplementedError

    def on_ack(self, m: M, ms: float) -> None:
        """An ack of `m`'s message, `ms` after its send."""

    def on_delivery(self, m: M, data: dict[str, Any], now: float) -> None:
        self.stats.received += 1

    def on_close(self, m: M, code: str) -> None:
        m.closed = code

    # the run

    async def open(self, m: M, gate: asyncio.Semaphore, timeout: float) -> dict[str, Any] | None:
        """Connects `m` and reads its first frame, which it returns; None (and the reason in
        `stats.failed`) when the connection failed or was refused."""
        async with gate:
            try:
                ws = await ws_connect(
                    self.url(m), open_timeout=timeout, local_addr=self.local_addr(m)
                )
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                self.stats.failed[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
                return None
            try:
                first: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
            except (ConnectionClosed, TimeoutError, ValueError) as exc:
                self.stats.failed[f"no first frame: {type(exc).__name__}"] += 1
                await ws.close()
                return None
            if first.get("type") == "error":
                self.stats.failed[f"refused: {first.get('code')}"] += 1
                await ws.close()
                return None
            m.ws = ws
            self.stats.opened += 1
            self.per_channel[m.channel] += 1
            return first

    async def open_all(self, timeout: float) -> list[M]:
        """Opens every member, CONNECT_CONCURRENCY at a time, and starts reading those that
        opened, which it returns."""
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        await asyncio.gather(*(self.open(m, gate, timeout) for m in self.members))
        live = [m for m in self.members if m.ws is not None]
        self.readers = [asyncio.create_task(self.read(m)) for m in live]
        return live

    async def read(self, m: M) -> None:
        assert m.ws is not None
        try:
            async for raw in m.ws:
                msg = json.loads(raw)
                kind, action = msg.get("type"), msg.get("action")
                now = time.perf_counter()
                if kind == "message" and action == "ack":
                    started = m.pending.pop(msg["data"]["metadata"]["sequence"], None)
                    if started is not None:
                        self.stats.acked += 1
                        self.on_ack(m, (now - started) * 1000)
                elif kind == "message" and action == "send":
                    self.on_delivery(m, msg["data"], now)
                elif kind == "error":
                    self.stats.errors[str(msg.get("code"))] += 1
        except ConnectionClosed as closed:
            self.on_close(m, str(closed.rcvd.code) if closed.rcvd is not None else "no close frame")

    async def publish(self, m: M, rate: float, stop_at: float) -> None:
        """`rate` messages a second on `m`'s channel until `stop_at` (time.monotonic)."""
        assert m.ws is not None
        interval = 1.0 / rate
        # spread the first sends over one interval so the members do not send in step
        await asyncio.sleep(random.uniform(0, interval))
        others = self.per_channel[m.channel] - 1
        while time.monotonic() < stop_at and m.closed is None:
            m.sequence += 1
            now = time.perf_counter()
            data = {
                "channel": m.channel,
                "content": self.content(m, now),
                "metadata": {"sequence": m.sequence},
            }
            m.pending[m.sequence] = now
            try:
                await m.ws.send(json.dumps({"type": "message", "action": "send", "data": data}))
            except ConnectionClosed:
                m.pending.pop(m.sequence, None)
                return
            self.stats.sent += 1
            self.stats.expected += others
            await asyncio.sleep(interval)

    def publish_all(self, live: list[M], rate: float, stop_at: float) -> Awaitable[list[None]]:
        return asyncio.gather(*(self.publish(m, rate, stop_at) for m in live))

    async def drain(self, live: list[M], seconds: float) -> None:
        """Waits, at most `seconds`, for the last acks and deliveries."""
        until = time.monotonic() + seconds
        while time.monotonic() < until and (
            any(m.pending for m in live) or self.stats.received < self.stats.expected
        ):
            await asyncio.sleep(0.05)

    async def close(self, live: list[M]) -> None:
        await asyncio.gather(*(m.ws.close() for m in live if m.ws is not None))
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)


# -- the command line ------------------------------------------------------------------------


def check_ranges(parser: argparse.ArgumentParser, checks: Iterable[tuple[str, bool]]) -> None:
    """Exits with status 2 naming every option whose check is False."""
    bad = [name for name, ok in checks if not ok]
    if bad:
        parser.error(f"out of range: {', '.join(bad)}")


def result_line(out: dict[str, Any]) -> str:
    """The last line of a tool's summary: ok, or what failed."""
    return "  result       " + ("ok" if out["ok"] else "FAILED: " + "; ".join(out["problems"]))


def report(
    out: dict[str, Any], as_json: bool, print_human: Callable[[dict[str, Any]], None]
) -> int:
    """Prints the summary, as one JSON line or for a person; the exit status: 0 when ok."""
    if as_json:
        print(json.dumps(out))
    else:
        print_human(out)
    return 0 if out["ok"] else 1
