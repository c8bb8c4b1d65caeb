"""`make load`: a bounded load run against a running aether-fast, then a one-screen summary.

    python tools/load.py [--url 127.0.0.1:8000] [--connections 200] [--duration 10]
                         [--rate 0.5] [--channels 10] [--size 64] [--json]

Opens N WebSockets (each its own user `load-<i>` with a fresh client_id, and a token signed
with JWT_SECRET, the server's), spreads them over C channels `load.<j>`, and has every
connection publish `--rate` messages a second for `--duration` seconds. Every connection
reads all the time: acks (latency from send to ack), the other members' messages
(deliveries) and errors. Then it stops publishing, waits for the last acks and deliveries
(at most `--drain` seconds), closes everything and prints the summary. The run is bounded:
it ends by itself after at most connect-timeout + duration + drain + 10 seconds, whatever
the server does.

Exit status 0 when every connection opened, every message was acked, every delivery arrived
and no error came back; 1 otherwise (the summary says what went wrong); 2 on bad arguments.

This is a smoke and capacity check for operators (is this deployment healthy under N
clients?); the benchmarks with a C load generator live in bench/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import jwt
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake

#: connections opened at once: enough to be quick, few enough not to look like a SYN flood
CONNECT_CONCURRENCY = 50


def ws_base_url(url: str) -> str:
    """`127.0.0.1:8000`, `http://h:p`, `ws://h:p/ws`, `wss://…` -> a ws(s):// URL with a path."""
    if "://" not in url:
        url = "ws://" + url
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"not a WebSocket URL: {url!r}")
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return f"{scheme}://{parts.netloc}{path}"


@dataclass(slots=True)
class Stats:
    opened: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    acked: int = 0
    delivered: int = 0
    expected_deliveries: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    closed_early: Counter[str] = field(default_factory=Counter)
    ack_ms: list[float] = field(default_factory=list)


@dataclass(slots=True)
class Conn:
    index: int
    channel: str
    ws: ClientConnection | None = None
    pending: dict[int, float] = field(default_factory=dict)  # sequence -> send time
    sequence: int = 0
    delivered: int = 0


class LoadRun:
    def __init__(self, args: argparse.Namespace, base_url: str) -> None:
        self.args = args
        self.base_url = base_url
        self.stats = Stats()
        self.conns = [
            Conn(i, f"{args.channel_prefix}.{i % args.channels}") for i in range(args.connections)
        ]
        self.members: Counter[str] = Counter()
        # a fresh client_id per run: the server remembers (user, client_id, channel,
        # sequence) for DEDUP_TTL_S and would ack a rerun's messages without publishing them
        self.run_id = os.urandom(4).hex()
        self.publishing = False
        self.content = "x" * args.size

    def url(self, conn: Conn) -> str:
        query = f"client_id=load-{self.run_id}-{conn.index}&channel={conn.channel}"
        if self.args.secret:
            now = int(time.time())
            token = jwt.encode(
                {"sub": f"load-{conn.index}", "iat": now, "exp": now + 3600},
                self.args.secret,
                algorithm="HS256",
            )
            query += f"&token={token}"
        return f"{self.base_url}?{query}"

    async def open(self, conn: Conn, gate: asyncio.Semaphore) -> None:
        async with gate:
            try:
                ws = await websockets.connect(
                    self.url(conn),
                    open_timeout=self.args.connect_timeout,
                    max_size=None,
                    ping_interval=None,
                    compression=None,
                )
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                self.stats.failed[type(exc).__name__ + ": " + str(exc)[:80]] += 1
                return
            try:
                first = json.loads(await asyncio.wait_for(ws.recv(), self.args.connect_timeout))
            except (ConnectionClosed, TimeoutError, ValueError) as exc:
                self.stats.failed[f"no first frame: {type(exc).__name__}"] += 1
                await ws.close()
                return
            if first.get("type") == "error":
                self.stats.failed[f"refused: {first.get('code')}"] += 1
                await ws.close()
                return
            conn.ws = ws
            self.stats.opened += 1
            self.members[conn.channel] += 1

    async def read(self, conn: Conn) -> None:
        assert conn.ws is not None
        try:
            async for raw in conn.ws:
                msg = json.loads(raw)
                kind, action = msg.get("type"), msg.get("action")
                if kind == "message" and action == "ack":
                    seq = msg["data"]["metadata"]["sequence"]
                    started = conn.pending.pop(seq, None)
                    if started is not None:
                        self.stats.acked += 1
                        self.stats.ack_ms.append((time.perf_counter() - started) * 1000)
                elif kind == "message" and action == "send":
                    conn.delivered += 1
                    self.stats.delivered += 1
                elif kind == "error":
                    self.stats.errors[str(msg.get("code"))] += 1
        except ConnectionClosed as closed:
            if self.publishing or conn.pending:
                code = closed.rcvd.code if closed.rcvd is not None else "no close frame"
                self.stats.closed_early[str(code)] += 1

    async def publish(self, conn: Conn, stop_at: float) -> None:
        assert conn.ws is not None
        interval = 1.0 / self.args.rate
        # spread the first sends over one interval so the connections do not send in step
        await asyncio.sleep(random.uniform(0, interval))
        others = self.members[conn.channel] - 1
        while time.monotonic() < stop_at:
            conn.sequence += 1
            frame = {
                "type": "message",
                "action": "send",
                "data": {
                    "channel": conn.channel,
                    "content": self.content,
                    "metadata": {"sequence": conn.sequence},
                },
            }
            conn.pending[conn.sequence] = time.perf_counter()
            try:
                await conn.ws.send(json.dumps(frame))
            except ConnectionClosed:
                conn.pending.pop(conn.sequence, None)
                return
            self.stats.sent += 1
            self.stats.expected_deliveries += others
            await asyncio.sleep(interval)

    async def run(self) -> None:
        args = self.args
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        t0 = time.monotonic()
        await asyncio.gather(*(self.open(c, gate) for c in self.conns))
        self.connect_s = time.monotonic() - t0
        live = [c for c in self.conns if c.ws is not None]
        if not live:
            self.run_s = self.connect_s
            return
        readers = [asyncio.create_task(self.read(c)) for c in live]
        self.publishing = True
        stop_at = time.monotonic() + args.duration
        await asyncio.gather(*(self.publish(c, stop_at) for c in live))
        self.publishing = False
        # the last acks and deliveries
        drain_until = time.monotonic() + args.drain
        while time.monotonic() < drain_until and (
            any(c.pending for c in live) or self.stats.delivered < self.stats.expected_deliveries
        ):
            await asyncio.sleep(0.05)
        self.run_s = time.monotonic() - t0
        await asyncio.gather(*(c.ws.close() for c in live if c.ws is not None))
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

    def summary(self) -> dict[str, Any]:
        s, a = self.stats, self.args
        lat = sorted(s.ack_ms)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 2) if lat else None

        unacked = sum(len(c.pending) for c in self.conns)
        problems = []
        if s.opened < a.connections:
            problems.append(f"{a.connections - s.opened} connections failed to open")
        if unacked:
            problems.append(f"{unacked} messages not acked")
        if s.delivered < s.expected_deliveries:
            problems.append(f"{s.expected_deliveries - s.delivered} deliveries missing")
        if s.errors:
            problems.append(f"{sum(s.errors.values())} error messages")
        if s.closed_early:
            problems.append(f"{sum(s.closed_early.values())} connections closed by the server")
        return {
            "url": self.base_url,
            "connections": {"requested": a.connections, "opened": s.opened},
            "connect_failures": dict(s.failed),
            "connect_seconds": round(getattr(self, "connect_s", 0.0), 3),
            "duration_seconds": a.duration,
            "channels": a.channels,
            "messages": {"sent": s.sent, "acked": s.acked, "unacked": unacked},
            "send_rate_per_second": round(s.sent / a.duration, 1) if a.duration else None,
            "ack_latency_ms": {
                "p50": pct(0.50),
                "p95": pct(0.95),
                "p99": pct(0.99),
                "max": round(lat[-1], 2) if lat else None,
                "mean": round(statistics.fmean(lat), 2) if lat else None,
            },
            "deliveries": {"expected": s.expected_deliveries, "received": s.delivered},
            "errors": dict(s.errors),
            "closed_by_server": dict(s.closed_early),
            "ok": not problems,
            "problems": problems,
        }


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed), hard))


def _print_human(out: dict[str, Any]) -> None:
    c, m, lat, d = out["connections"], out["messages"], out["ack_latency_ms"], out["deliveries"]
    print(f"aether-fast load: {out['url']}")
    print(
        f"  connections  {c['opened']}/{c['requested']} opened in {out['connect_seconds']} s"
        f" over {out['channels']} channels"
    )
    for reason, n in out["connect_failures"].items():
        print(f"    failed     {n} x {reason}")
    print(
        f"  messages     {m['sent']} sent in {out['duration_seconds']} s "
        f"({out['send_rate_per_second']}/s), {m['acked']} acked, {m['unacked']} unacked"
    )
    print(
        f"  ack latency  p50 {lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms, "
        f"max {lat['max']} ms"
    )
    print(f"  deliveries   {d['received']} of {d['expected']} expected")
    if out["errors"]:
        print(f"  errors       {out['errors']}")
    if out["closed_by_server"]:
        print(f"  closed       {out['closed_by_server']} (close codes)")
    print("  result       " + ("ok" if out["ok"] else "FAILED: " + "; ".join(out["problems"])))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/load.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--url",
        default=os.environ.get("URL") or "127.0.0.1:8000",
        help="server: host:port or ws(s)://host:port/path ($URL, default 127.0.0.1:8000)",
    )
    p.add_argument("--connections", type=int, default=200, help="WebSockets to open (200)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of publishing (10)")
    p.add_argument(
        "--rate",
        type=float,
        default=0.5,
        help="messages/s per connection (0.5; RATE_LIMIT_MESSAGES allows 50 a minute)",
    )
    p.add_argument("--channels", type=int, default=10, help="channels to spread over (10)")
    p.add_argument("--channel-prefix", default="load", help="channel names: PREFIX.<n>")
    p.add_argument("--size", type=int, default=64, help="bytes of content per message (64)")
    p.add_argument(
        "--secret",
        default=os.environ.get("JWT_SECRET"),
        help="HS256 key to sign tokens with ($JWT_SECRET); none: connect anonymously",
    )
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds (10)")
    p.add_argument("--drain", type=float, default=5.0, help="seconds to wait for the last acks")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    bad = [
        name
        for name, ok in (
            ("--connections", 1 <= args.connections <= 100_000),
            ("--duration", 0 < args.duration <= 3600),
            ("--rate", 0 < args.rate <= 10_000),
            ("--channels", args.channels >= 1),
            ("--size", 0 <= args.size <= 1 << 20),
            ("--connect-timeout", args.connect_timeout > 0),
            ("--drain", 0 <= args.drain <= 600),
        )
        if not ok
    ]
    if bad:
        parser.error(f"out of range: {', '.join(bad)}")
    try:
        base = ws_base_url(args.url)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.secret:
        print(
            "tools/load.py: JWT_SECRET is not set: connecting anonymously (only channels with "
            "require_auth: false accept that)",
            file=sys.stderr,
        )
    _raise_fd_limit(args.connections + 64)
    run = LoadRun(args, base)
    bound = args.connect_timeout + args.duration + args.drain + 10
    try:
        asyncio.run(asyncio.wait_for(run.run(), bound))
    except TimeoutError:
        print(f"tools/load.py: the run did not finish within {bound:g} s", file=sys.stderr)
        out = run.summary()
        out["ok"] = False
        out["problems"].append(f"did not finish within {bound:g} s")
    else:
        out = run.summary()
    if args.json:
        print(json.dumps(out))
    else:
        _print_human(out)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
