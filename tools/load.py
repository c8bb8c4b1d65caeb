"""`make load`: a bounded load run against a running aether-fast, then a one-screen summary.

    python -m tools.load [--url 127.0.0.1:8000] [--connections 200] [--duration 10]
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
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from tools.common import (
    Member,
    Members,
    Tally,
    check_ranges,
    percentile,
    raise_fd_limit,
    report,
    result_line,
    token,
)


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
class Stats(Tally):
    closed_early: Counter[str] = field(default_factory=Counter)  # by the server, by close code
    ack_ms: list[float] = field(default_factory=list)


class LoadRun(Members[Member, Stats]):
    def __init__(self, args: argparse.Namespace, base_url: str) -> None:
        # a fresh client_id per run: the server remembers (user, client_id, channel,
        # sequence) for DEDUP_TTL_S and would ack a rerun's messages without publishing them
        self.run_id = os.urandom(4).hex()
        channels = [f"{args.channel_prefix}.{i % args.channels}" for i in range(args.connections)]
        members = [Member(i, ch, f"load-{self.run_id}-{i}") for i, ch in enumerate(channels)]
        super().__init__(members, Stats())
        self.args = args
        self.base_url = base_url
        self.publishing = False
        self.content_text: str = "x" * args.size

    def url(self, m: Member) -> str:
        query = f"client_id={m.client_id}&channel={m.channel}"
        if self.args.secret:
            query += f"&token={token(self.args.secret, f'load-{m.index}')}"
        return f"{self.base_url}?{query}"

    def content(self, m: Member, now: float) -> str:
        return self.content_text

    def on_ack(self, m: Member, ms: float) -> None:
        self.stats.ack_ms.append(ms)

    def on_close(self, m: Member, code: str) -> None:
        super().on_close(m, code)
        if self.publishing or m.pending:
            self.stats.closed_early[code] += 1

    async def run(self) -> None:
        args = self.args
        t0 = time.monotonic()
        live = await self.open_all(args.connect_timeout)
        self.connect_s = time.monotonic() - t0
        if not live:
            self.run_s = self.connect_s
            return
        self.publishing = True
        await self.publish_all(live, args.rate, time.monotonic() + args.duration)
        self.publishing = False
        await self.drain(live, args.drain)
        self.run_s = time.monotonic() - t0
        await self.close(live)

    def summary(self) -> dict[str, Any]:
        s, a = self.stats, self.args
        lat = s.ack_ms
        unacked = sum(len(m.pending) for m in self.members)
        problems = []
        if s.opened < a.connections:
            problems.append(f"{a.connections - s.opened} connections failed to open")
        if unacked:
            problems.append(f"{unacked} messages not acked")
        if s.received < s.expected:
            problems.append(f"{s.expected - s.received} deliveries missing")
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
                "p50": percentile(lat, 0.50),
                "p95": percentile(lat, 0.95),
                "p99": percentile(lat, 0.99),
                "max": round(max(lat), 2) if lat else None,
                "mean": round(statistics.fmean(lat), 2) if lat else None,
            },
            "deliveries": {"expected": s.expected, "received": s.received},
            "errors": dict(s.errors),
            "closed_by_server": dict(s.closed_early),
            "ok": not problems,
            "problems": problems,
        }


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
    print(result_line(out))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.load", description=__doc__.split("\n\n")[0])
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
    check_ranges(
        parser,
        (
            ("--connections", 1 <= args.connections <= 100_000),
            ("--duration", 0 < args.duration <= 3600),
            ("--rate", 0 < args.rate <= 10_000),
            ("--channels", args.channels >= 1),
            ("--size", 0 <= args.size <= 1 << 20),
            ("--connect-timeout", args.connect_timeout > 0),
            ("--drain", 0 <= args.drain <= 600),
        ),
    )
    try:
        base = ws_base_url(args.url)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.secret:
        print(
            "tools.load: JWT_SECRET is not set: connecting anonymously (only channels with "
            "require_auth: false accept that)",
            file=sys.stderr,
        )
    raise_fd_limit(args.connections + 64)
    run = LoadRun(args, base)
    bound = args.connect_timeout + args.duration + args.drain + 10
    try:
        asyncio.run(asyncio.wait_for(run.run(), bound))
    except TimeoutError:
        print(f"tools.load: the run did not finish within {bound:g} s", file=sys.stderr)
        out = run.summary()
        out["ok"] = False
        out["problems"].append(f"did not finish within {bound:g} s")
    else:
        out = run.summary()
    return report(out, args.json, _print_human)


if __name__ == "__main__":
    sys.exit(main())
