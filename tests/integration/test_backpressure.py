"""SEND_BUFFER_LIMIT_BYTES counts only bytes the kernel has not taken (docs/protocol.md §12):
a recovery larger than the limit is replayed as the socket drains (memory and Redis broker), a burst
larger than the limit to a reader that keeps up is delivered, and a reader that never reads
is still closed with 4008 while the server's memory stays bounded."""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server
from tests.integration.helpers import Op, RawWS, expect, send_msg
from tests.integration.wsclient import Client

SIZE = 60_000  # one publication's content
ENV = {"MAX_MESSAGE_BYTES": "131072", "RATE_LIMIT_MESSAGES": "0"}


def _content(i: int) -> str:
    return f"{i:04d}" + "r" * (SIZE - 4)


def _read_messages(ws: RawWS, count: int) -> list[dict[str, Any]]:
    """The next `count` text messages; a CLOSE fails the test with its code."""
    out: list[dict[str, Any]] = []
    while len(out) < count:
        _, op, payload = ws.recv_frame()
        assert op != Op.CLOSE, f"closed {int.from_bytes(payload[:2], 'big')} after {len(out)}"
        if op == Op.TEXT:
            out.append(json.loads(payload))
    return out


def _send_frame(channel: str, content: str, sequence: int) -> bytes:
    """A masked message/send frame (masked with one big-integer XOR: these are large)."""
    payload = json.dumps(send_msg(channel, content, sequence)).encode()
    key = os.urandom(4)
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    if n < 65536:
        head = struct.pack("!BBH", 0x80 | Op.TEXT, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | Op.TEXT, 0x80 | 127, n)
    return head + key + masked


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("broker", ["memory", "redis"])
@pytest.mark.parametrize(
    ("limit", "count"),
    [
        (1048576, 40),  # the default limit, 2.4 MB of history
        (262144, 100),  # 6 MB: more than the kernel's socket buffer (4 MB at most) and the limit
    ],
    ids=["issue", "beyond-the-kernel"],
)
def test_recovery_larger_than_the_limit_is_replayed_as_the_socket_drains(
    make_server: Callable[..., Server],
    request: pytest.FixtureRequest,
    broker: str,
    limit: int,
    count: int,
) -> None:
    """`count` publications of 60 KB (more than the limit) recovered over one reconnect with
    `since`, by a reader with a small receive window that reads steadily; live publications
    sent while the replay is under way come after it: all in offset order, none twice, and
    no 4008."""
    env = {**ENV, "SEND_BUFFER_LIMIT_BYTES": str(limit)}
    if broker == "redis":
        env["BROKER_URL"] = request.getfixturevalue("redis_url")
    srv = make_server(**env)
    ch = "bp.recover"
    live = range(count + 1, count + 6)
    with Client(srv.ws_url, token=srv.token("pub"), channel=ch) as pub:
        epoch = expect(pub, "connection", "connect")["data"]["epoch"]
        for i in range(1, count + 1):
            pub.publish(ch, _content(i))
            assert expect(pub, "message", "ack")["data"]["metadata"]["offset"] == i
        query = {"token": srv.token("reader"), "channel": ch, "since": "0", "epoch": epoch}
        with RawWS(srv.port, query=query, rcvbuf=16384) as reader:
            assert reader.status == 101
            for i in live:  # while the replay is still being written
                pub.publish(ch, _content(i))
            for i in live:
                assert expect(pub, "message", "ack")["data"]["metadata"]["offset"] == i
            got = _read_messages(reader, count + 6)
            reply = got[0]
            assert reply["type"] == "connection" and reply["action"] == "connect", reply
            assert reply["data"]["recovered"] is True, reply
            offsets = [m["data"]["metadata"]["offset"] for m in got[1:]]
            assert offsets == list(range(1, count + 6)), offsets
            contents = [m["data"]["content"] for m in got[1:]]
            assert contents == [_content(i) for i in range(1, count + 6)]
            reader.send_json({"type": "system", "action": "status", "data": {}})
            status = _read_messages(reader, 1)[0]  # nothing more, and still open
            assert status["type"] == "system" and status["action"] == "status", status
    _, body, _ = srv.http("GET", "/metrics/connections")
    assert body["slow_reader_closes"] == 0


def test_burst_larger_than_the_limit_to_a_reader_that_keeps_up(
    make_server: Callable[..., Server],
) -> None:
    """40 publications of 12 KB pipelined in one write reach the server in one loop pass:
    480 KB for a reader whose limit is 64 KB but who reads all the time. It gets them all."""
    srv = make_server(SEND_BUFFER_LIMIT_BYTES="65536", HISTORY_SIZE="0", **ENV)
    ch = "bp.burst"
    n = 40
    with (
        Client(srv.ws_url, token=srv.token("reader"), channel=ch) as reader,
        RawWS(srv.port, query={"token": srv.token("pub"), "channel": ch}) as pub,
    ):
        expect(reader, "connection", "connect")
        assert pub.recv_json()["action"] == "connect"
        burst = b"".join(_send_frame(ch, f"{i:04d}" + "b" * 12_000, i) for i in range(1, n + 1))
        pub.send_raw(burst)
        got = [expect(reader, "message", "send")["data"] for _ in range(n)]
        assert [m["metadata"]["offset"] for m in got] == list(range(1, n + 1))
        assert [m["content"][:4] for m in got] == [f"{i:04d}" for i in range(1, n + 1)]
    _, body, _ = srv.http("GET", "/metrics/connections")
    assert body["slow_reader_closes"] == 0


def test_reader_that_never_reads_is_closed_4008_and_memory_stays_bounded(
    make_server: Callable[..., Server],
) -> None:
    """Pipelined bursts (~24 MB in all) to a member that never reads: it is closed with 4008
    and the server's memory grows by far less than what was sent to it."""
    srv = make_server(HISTORY_SIZE="0", **ENV)
    assert srv.proc is not None
    ch = "bp.never"
    with (
        RawWS(srv.port, query={"token": srv.token("sloth"), "channel": ch}, rcvbuf=4096) as sloth,
        RawWS(srv.port, query={"token": srv.token("pub"), "channel": ch}) as pub,
    ):
        assert sloth.recv_json()["action"] == "connect"
        assert pub.recv_json()["action"] == "connect"
        rss_before = _rss_kib(srv.proc.pid)
        acked = 0
        for burst in range(10):  # 10 bursts of 40 x 60 KB
            seq = burst * 40
            pub.send_raw(b"".join(_send_frame(ch, _content(i), seq + i) for i in range(1, 41)))
            while acked < seq + 40:  # the publisher reads its acks: it keeps up
                msg = pub.recv_json()
                if msg["type"] == "message" and msg["action"] == "ack":
                    acked += 1
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            _, body, _ = srv.http("GET", "/metrics/connections")
            if body["slow_reader_closes"] >= 1:
                break
            time.sleep(0.05)
        assert body["slow_reader_closes"] == 1
        grown = _rss_kib(srv.proc.pid) - rss_before
        assert grown < 12 * 1024, f"the server grew by {grown} KiB"
        assert sloth.close_code() == 4008


@pytest.mark.parametrize("live", [True, False], ids=["live-traffic", "quiet"])
def test_reader_that_never_reads_its_replay_is_closed_4008(
    make_server: Callable[..., Server], live: bool
) -> None:
    """A join with `since` over 6 MB of history by a reader that never reads: the replay
    waits for it, but not for ever. With live traffic, the publications held for it pass
    the limit: 4008 at once. Without, the replay stalls: 4008 after about 10 s. The
    publisher is never slowed."""
    srv = make_server(SEND_BUFFER_LIMIT_BYTES="262144", **ENV)
    ch = "bp.stall"
    with Client(srv.ws_url, token=srv.token("pub"), channel=ch) as pub:
        epoch = expect(pub, "connection", "connect")["data"]["epoch"]
        for i in range(1, 101):
            pub.publish(ch, _content(i))
            expect(pub, "message", "ack")
        query = {"token": srv.token("sloth"), "channel": ch, "since": "0", "epoch": epoch}
        with RawWS(srv.port, query=query, rcvbuf=4096) as sloth:
            assert sloth.status == 101
            started = time.monotonic()
            closes = 0
            i = 100
            while time.monotonic() - started < 15 and not closes:
                if live:
                    i += 1
                    pub.publish(ch, _content(i))
                    expect(pub, "message", "ack")
                else:
                    time.sleep(0.2)
                _, body, _ = srv.http("GET", "/metrics/connections")
                closes = body["slow_reader_closes"]
            assert closes == 1
            took = time.monotonic() - started
            assert (took < 5) if live else (took > 8), took
            assert sloth.close_code() == 4008


def _publish_pipelined(pub: RawWS, ch: str, contents: list[str], first_seq: int) -> None:
    """Publish `contents` to `ch` in one write, then read until every ack is in."""
    pub.send_raw(b"".join(_send_frame(ch, c, first_seq + i) for i, c in enumerate(contents)))
    acked = 0
    while acked < len(contents):
        msg = pub.recv_json()
        if msg["type"] == "message" and msg["action"] == "ack":
            acked += 1


@pytest.mark.parametrize("broker", ["memory", "redis"])
def test_other_frames_during_a_paced_replay_find_room(
    make_server: Callable[..., Server], request: pytest.FixtureRequest, broker: str
) -> None:
    """A replay of 6 MB in 1 KB publications (far more than the kernel's buffers and the
    limit) to a reader that reads slowly: the replay leaves room under the limit for
    everything else. Publications of another channel the reader is in, the reply to another
    join and a pong arrive while it is under way: the reader gets all of it, no 4008."""
    env = {**ENV, "SEND_BUFFER_LIMIT_BYTES": "65536", "HISTORY_SIZE": "6000"}
    if broker == "redis":
        env["BROKER_URL"] = request.getfixturevalue("redis_url")
    srv = make_server(**env)
    count = 6000
    with RawWS(srv.port, query={"token": srv.token("pub"), "channel": "bp.c"}) as pub:
        epoch = pub.recv_json()["data"]["epoch"]
        pub.send_json({"type": "connection", "action": "connect", "data": {"channel": "bp.o"}})
        assert pub.recv_json()["data"]["channel"] == "bp.o"
        _publish_pipelined(pub, "bp.c", [f"{i:05d}" + "c" * 995 for i in range(count)], 1)
        query = {"token": srv.token("reader"), "channel": "bp.o"}
        with RawWS(srv.port, query=query, rcvbuf=8192) as reader:
            assert reader.recv_json()["data"]["channel"] == "bp.o"
            reader.send_json(
                {
                    "type": "connection",
                    "action": "connect",
                    "data": {"channel": "bp.c", "since": 0, "epoch": epoch},
                }
            )
            got = _read_messages(reader, 11)
            assert got[0]["data"]["recovered"] is True, got[0]
            time.sleep(1.5)  # the replay fills what the server lets it
            _publish_pipelined(pub, "bp.o", ["o" * 3000] * 3, 1)
            reader.send_json(
                {"type": "connection", "action": "connect", "data": {"channel": "bp.x"}}
            )
            reader.send_frame(Op.PING, b"still there")
            pongs = 0
            while len(got) < count + 1 + 3 + 1 or not pongs:
                _, op, payload = reader.recv_frame()
                assert op != Op.CLOSE, f"closed {int.from_bytes(payload[:2], 'big')}"
                if op == Op.PONG:
                    pongs += 1
                elif op == Op.TEXT:
                    got.append(json.loads(payload))
            replayed = [m for m in got if m["type"] == "message" and m["data"]["channel"] == "bp.c"]
            assert [m["data"]["metadata"]["offset"] for m in replayed] == list(range(1, count + 1))
            others = [m for m in got if m["type"] == "message" and m["data"]["channel"] == "bp.o"]
            assert len(others) == 3
            joins = [m for m in got if m["type"] == "connection"]
            assert [m["data"]["channel"] for m in joins] == ["bp.c", "bp.x"]
    _, body, _ = srv.http("GET", "/metrics/connections")
    assert body["slow_reader_closes"] == 0


@pytest.mark.parametrize("broker", ["memory", "redis"])
def test_replays_waiting_past_the_cap_answer_recovered_false(
    make_server: Callable[..., Server], request: pytest.FixtureRequest, broker: str
) -> None:
    """A reader whose replay of one channel (6 MB) is still waiting joins another channel
    with `since`: that replay would put more than 16 x SEND_BUFFER_LIMIT_BYTES (1 MiB here)
    of replays on the server for it, so the join is answered `recovered: false` with the
    channel's offset and epoch and replays nothing; later publications arrive live. The
    first replay is written whole."""
    env = {**ENV, "SEND_BUFFER_LIMIT_BYTES": "65536"}
    if broker == "redis":
        env["BROKER_URL"] = request.getfixturevalue("redis_url")
    srv = make_server(**env)
    with RawWS(srv.port, query={"token": srv.token("pub"), "channel": "bp.a"}) as pub:
        epoch = pub.recv_json()["data"]["epoch"]
        pub.send_json({"type": "connection", "action": "connect", "data": {"channel": "bp.b"}})
        epoch_b = pub.recv_json()["data"]["epoch"]
        _publish_pipelined(pub, "bp.a", [_content(i) for i in range(1, 101)], 1)
        _publish_pipelined(pub, "bp.b", [_content(i) for i in range(1, 21)], 1)
        query = {"token": srv.token("reader"), "channel": "bp.a", "since": "0", "epoch": epoch}
        with RawWS(srv.port, query=query, rcvbuf=4096) as reader:
            time.sleep(0.5)  # the replay of bp.a waits for the reader
            join_b = {"channel": "bp.b", "since": 0, "epoch": epoch_b}
            reader.send_json({"type": "connection", "action": "connect", "data": join_b})
            time.sleep(0.5)
            _publish_pipelined(pub, "bp.b", ["live" * 50], 21)
            got = _read_messages(reader, 1 + 100 + 1 + 1)
            replies = {m["data"]["channel"]: m["data"] for m in got if m["type"] == "connection"}
            assert replies["bp.a"]["recovered"] is True
            b = replies["bp.b"]
            assert (b["recovered"], b["offset"], b["epoch"]) == (False, 20, epoch_b), b
            msgs = [m["data"] for m in got if m["type"] == "message"]
            a_offsets = [m["metadata"]["offset"] for m in msgs if m["channel"] == "bp.a"]
            assert a_offsets == list(range(1, 101))
            b_offsets = [m["metadata"]["offset"] for m in msgs if m["channel"] == "bp.b"]
            assert b_offsets == [21]
    assert any(
        line.get("event") == "replay_limit" and line["data"]["details"]["reason"] == "bp.b"
        for line in srv.log_lines()
    ), "no replay_limit security line"
