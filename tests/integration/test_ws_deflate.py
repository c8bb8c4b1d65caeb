"""permessage-deflate (RFC 7692) on real sockets: negotiation at the upgrade, one compressed
frame per publication and window size for every deflate member (plain for the others), what
stays uncompressed, history and recovery without compressing again, the switches, inbound
compressed messages, the RSV1 rules, the zip bomb, the metrics."""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode

import pytest
import redis

from aether_fast.brokers.redis import _keys
from tests.conftest import Server
from tests.integration.rawhttp import RawConn, upgrade_bytes

ANSWER = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
BIG = "lorem ipsum dolor sit amet " * 200  # 5400 characters: over COMPRESSION_MIN_BYTES


def deflate(data: bytes, bits: int = 15) -> bytes:
    """`data` as one compressed message (raw deflate, the 00 00 ff ff tail removed)."""
    c = zlib.compressobj(6, zlib.DEFLATED, -bits)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def inflate(data: bytes, bits: int = 15) -> bytes:
    """A compressed message's payload inflated with a window of 2**bits (RFC 7692 §7.2.2)."""
    return zlib.decompressobj(-bits).decompress(data + b"\x00\x00\xff\xff")


class WS:
    """A raw WebSocket client: the upgrade with an extension offer, frames as they are."""

    def __init__(
        self, srv: Server, offer: str | list[str] | None, path: str = "/ws", **query: Any
    ) -> None:
        self.conn = RawConn(srv.port)
        q = urlencode({k: v for k, v in query.items() if v is not None})
        req = upgrade_bytes(path + ("?" + q if q else ""))
        offers = [offer] if isinstance(offer, str) else (offer or [])
        lines = "".join(f"Sec-WebSocket-Extensions: {o}\r\n" for o in offers)
        head, _, end = req.partition(b"\r\n\r\n")
        self.conn.send(head + b"\r\n" + lines.encode() + b"\r\n" + end if lines else req)
        self.status, _, self.headers = self.conn.read_head()
        assert self.status == 101, self.status
        self.extensions = self.headers.get("sec-websocket-extensions")
        self.reply: dict[str, Any] = {}

    def close(self) -> None:
        self.conn.close()

    def frame(self) -> tuple[int, bytes]:
        """The next server frame: (first header byte, payload)."""
        return self.conn.read_ws_frame()

    def message(self) -> tuple[bool, dict[str, Any]]:
        """The next message: (whether it came compressed, its JSON)."""
        b0, payload = self.frame()
        assert b0 & 0x0F == 1 and b0 & 0x80, hex(b0)
        compressed = bool(b0 & 0x40)
        return compressed, json.loads(inflate(payload) if compressed else payload)

    def until(self, mtype: str, action: str | None = None) -> tuple[bool, dict[str, Any]]:
        for _ in range(50):
            compressed, msg = self.message()
            if msg["type"] == mtype and (action is None or msg.get("action") == action):
                return compressed, msg
        raise AssertionError(f"no {mtype}/{action}")

    def send_frame(self, payload: bytes, *, b0: int = 0x81) -> None:
        """One masked client frame; `b0` is its first byte (FIN, RSV bits, opcode)."""
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = bytes([b0, 0x80 | n])
        elif n < 65536:
            head = bytes([b0, 0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head = bytes([b0, 0x80 | 127]) + n.to_bytes(8, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.conn.send(head + mask + masked)

    def send_json(self, obj: Any, *, compressed: bool = False) -> None:
        data = json.dumps(obj).encode()
        if compressed:
            self.send_frame(deflate(data), b0=0xC1)
        else:
            self.send_frame(data)

    def close_code(self) -> int:
        """Frames until the server's CLOSE: its code."""
        for _ in range(100):
            b0, payload = self.frame()
            if b0 & 0x0F == 8:
                return int.from_bytes(payload[:2], "big")
        raise AssertionError("no close")


def publish(ws: WS, channel: str, content: str, seq: int, *, compressed: bool = False) -> None:
    ws.send_json(
        {
            "type": "message",
            "action": "send",
            "data": {"channel": channel, "content": content, "metadata": {"sequence": seq}},
        },
        compressed=compressed,
    )


@pytest.fixture
def member(server: Server) -> Iterator[Callable[..., WS]]:
    """Opens a member of a channel (the connect reply read); closed at the end."""
    opened: list[WS] = []

    def open_member(
        channel: str, offer: str | None = "permessage-deflate", user: str = "alice", **query: Any
    ) -> WS:
        ws = WS(server, offer, token=server.token(user), channel=channel, **query)
        compressed, reply = ws.until("connection", "connect")
        assert not compressed and reply["data"]["channel"] == channel
        ws.reply = reply
        opened.append(ws)
        return ws

    yield open_member
    for ws in opened:
        ws.close()


def messages_figures(srv: Server) -> dict[str, Any]:
    status, body, _ = srv.http("GET", "/metrics/messages")
    assert status == 200
    return dict(body)


# -- negotiation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offer", "answer"),
    [
        ("permessage-deflate", ANSWER),
        ("permessage-deflate; client_max_window_bits", ANSWER),
        ("permessage-deflate; client_max_window_bits=10", ANSWER),
        ("permessage-deflate; server_no_context_takeover; client_no_context_takeover", ANSWER),
        *[
            (
                f"permessage-deflate; server_max_window_bits={n}",
                f"{ANSWER}; server_max_window_bits={n}",
            )
            for n in range(8, 16)
        ],
        ('permessage-deflate; server_max_window_bits="10"', f"{ANSWER}; server_max_window_bits=10"),
        # the first offer we can accept wins; other extensions are ignored
        (
            "permessage-deflate; server_max_window_bits=16, permessage-deflate; "
            "server_max_window_bits=12",
            f"{ANSWER}; server_max_window_bits=12",
        ),
        ("x-webkit-deflate-frame, permessage-deflate", ANSWER),
        (["foo", "permessage-deflate; client_max_window_bits"], ANSWER),
        # declined (RFC 7692 §7): the upgrade goes on without the extension
        ("permessage-deflate; server_max_window_bits=16", None),
        ("permessage-deflate; server_max_window_bits=7", None),
        ("permessage-deflate; server_max_window_bits", None),
        ("permessage-deflate; client_max_window_bits=x", None),
        ("permessage-deflate; client_no_context_takeover=1", None),
        ("permessage-deflate; server_no_context_takeover; server_no_context_takeover", None),
        ("permessage-deflate; mystery", None),
        ("x-webkit-deflate-frame", None),
        (None, None),
    ],
)
def test_negotiation(server: Server, offer: str | list[str] | None, answer: str | None) -> None:
    ws = WS(server, offer, token=server.token("alice"))
    try:
        assert ws.extensions == answer
        compressed, reply = ws.until("connection", "connect")
        assert not compressed and reply["data"]["client_id"]
    finally:
        ws.close()


def test_compression_false_declines_and_sends_plain(make_server: Callable[..., Server]) -> None:
    srv = make_server(COMPRESSION="false")
    ws = WS(srv, "permessage-deflate", token=srv.token("alice"), channel="off")
    try:
        assert ws.extensions is None
        ws.until("connection", "connect")
        publish(ws, "off", BIG, 1)
        b0, _ = ws.frame()  # the ack (no echo): plain
        assert b0 == 0x81
        # a compressed frame on a connection that did not negotiate it: 1002
        publish(ws, "off", BIG, 2, compressed=True)
        assert ws.close_code() == 1002
    finally:
        ws.close()


# -- outbound ------------------------------------------------------------------------------


def test_publication_is_compressed_once_for_every_deflate_member(
    server: Server, member: Callable[..., WS]
) -> None:
    d1 = member("dfl.fan")
    d2 = member("dfl.fan", "permessage-deflate; client_max_window_bits", user="bob")
    plain = member("dfl.fan", None, user="carol")
    sender = member("dfl.fan", user="dave")
    before = messages_figures(server)["compression"]["compressions"]
    publish(sender, "dfl.fan", BIG, 1)
    ack_compressed, ack = sender.until("message", "ack")
    assert not ack_compressed and ack["data"]["metadata"]["sequence"] == 1

    b1, p1 = d1.frame()
    b2, p2 = d2.frame()
    bp, pp = plain.frame()
    assert b1 == b2 == 0xC1  # FIN + RSV1 + text: one frame, compressed
    assert p1 == p2  # byte for byte the same frame
    assert bp == 0x81  # the plain member gets the plain frame
    assert inflate(p1) == pp  # which is what the compressed one inflates to
    assert json.loads(pp)["data"]["content"] == BIG
    assert len(p1) < len(pp) // 5
    # one compression for the three deflate members (sender included: it got its ack)
    assert messages_figures(server)["compression"]["compressions"] == before + 1


def test_small_messages_acks_and_errors_stay_uncompressed(member: Callable[..., WS]) -> None:
    d = member("dfl.small")
    sender = member("dfl.small", user="bob")
    publish(sender, "dfl.small", "hi", 1)
    compressed, ack = sender.until("message", "ack")
    assert not compressed and ack["data"]["metadata"]["sequence"] == 1
    b0, payload = d.frame()
    assert b0 == 0x81 and json.loads(payload)["data"]["content"] == "hi"
    sender.send_frame(b"{not json" + b" " * 1000)  # a long bad message: its error is plain
    compressed, err = sender.until("error")
    assert not compressed and err["code"] == "INVALID_JSON"
    sender.send_json({"type": "system", "action": "status", "data": {}})
    compressed, status = sender.until("system", "status")
    assert not compressed and "connections" in status["data"]


def test_each_window_size_gets_its_own_compression(
    server: Server, member: Callable[..., WS]
) -> None:
    w10 = member("dfl.win", "permessage-deflate; server_max_window_bits=10")
    w15 = member("dfl.win", user="bob")
    w8 = member("dfl.win", "permessage-deflate; server_max_window_bits=8", user="carol")
    sender = member("dfl.win", None, user="dave")
    before = messages_figures(server)["compression"]["compressions"]
    text = "".join(f"{i:05d} unrepeated-ish {i * 7919 % 10007} " for i in range(400))
    publish(sender, "dfl.win", text, 1)
    b10, p10 = w10.frame()
    b15, p15 = w15.frame()
    b8, p8 = w8.frame()
    assert b10 == b15 == 0xC1
    assert b8 == 0x81  # zlib has no 256-byte window: plain, as RFC 7692 allows
    assert json.loads(inflate(p10, 10))["data"]["content"] == text  # within its window
    assert inflate(p15) == p8
    assert p10 != p15
    assert messages_figures(server)["compression"]["compressions"] == before + 2


def test_a_publication_is_compressed_at_most_seven_times_whatever_the_members_ask(
    server: Server, member: Callable[..., WS]
) -> None:
    """A hostile crowd asking for every window size (9..15), twice over, costs one
    compression per size (7), never one per member; history keeps those 7 and a replay
    compresses nothing."""
    members = [
        member("dfl.many", f"permessage-deflate; server_max_window_bits={bits}", user=f"u{i}")
        for i, bits in enumerate([*range(9, 16), *range(9, 16), 8])
    ]
    sender = member("dfl.many", None, user="sender")
    before = messages_figures(server)["compression"]["compressions"]
    publish(sender, "dfl.many", BIG, 1)
    for ws in members:
        b0, payload = ws.frame()
        assert b0 == (0x81 if ws is members[-1] else 0xC1)
    assert messages_figures(server)["compression"]["compressions"] == before + 7
    late = member(
        "dfl.many",
        "permessage-deflate; server_max_window_bits=9",
        user="late",
        since=0,
        epoch=members[0].reply["data"]["epoch"],
    )
    b0, payload = late.frame()
    assert b0 == 0xC1 and json.loads(inflate(payload, 9))["data"]["content"] == BIG
    assert messages_figures(server)["compression"]["compressions"] == before + 7


def test_channel_config_can_turn_compression_off(server: Server, member: Callable[..., WS]) -> None:
    server.create_channel(name="dfl.cfg", require_auth=True, compression=False)
    d = member("dfl.cfg")
    sender = member("dfl.cfg", user="bob")
    publish(sender, "dfl.cfg", BIG, 1)
    b0, payload = d.frame()
    assert b0 == 0x81 and json.loads(payload)["data"]["content"] == BIG
    server.create_channel(name="dfl.cfg", compression=True)
    publish(sender, "dfl.cfg", BIG, 2)
    b0, payload = d.frame()
    assert b0 == 0xC1 and json.loads(inflate(payload))["data"]["content"] == BIG


def test_recovery_replays_the_compressed_frames_without_compressing_again(
    server: Server, member: Callable[..., WS]
) -> None:
    live = member("dfl.hist")
    plain_live = member("dfl.hist", None, user="carol")
    sender = member("dfl.hist", user="bob")
    frames = []
    plain_frames = []
    for seq in (1, 2, 3):
        publish(sender, "dfl.hist", f"{seq} {BIG}", seq)
        frames.append(live.frame())
        plain_frames.append(plain_live.frame())
    assert all(b0 == 0xC1 for b0, _ in frames)
    before = messages_figures(server)["compression"]
    epoch = live.reply["data"]["epoch"]
    again = member("dfl.hist", user="frank", since=0, epoch=epoch)
    replayed = [again.frame() for _ in range(3)]
    assert replayed == frames  # the very bytes the live members got
    old_plain = member("dfl.hist", None, user="gina", since=0, epoch=epoch)
    assert [old_plain.frame() for _ in range(3)] == plain_frames
    after = messages_figures(server)["compression"]
    assert after["compressions"] == before["compressions"]  # nothing compressed again
    assert after["bytes_in"] == before["bytes_in"]


# -- inbound -------------------------------------------------------------------------------


def test_compressed_messages_are_accepted(server: Server, member: Callable[..., WS]) -> None:
    sender = member("dfl.in")
    plain = member("dfl.in", None, user="bob")
    inflated = messages_figures(server)["compression"]["inflated"]
    publish(sender, "dfl.in", BIG, 1, compressed=True)
    compressed, ack = sender.until("message", "ack")
    assert not compressed and ack["data"]["metadata"]["sequence"] == 1
    b0, payload = plain.frame()
    assert b0 == 0x81 and json.loads(payload)["data"]["content"] == BIG
    # fragmented: RSV1 on the first frame only
    data = deflate(
        json.dumps(
            {
                "type": "message",
                "action": "send",
                "data": {
                    "channel": "dfl.in",
                    "content": "frag " + BIG,
                    "metadata": {"sequence": 2},
                },
            }
        ).encode()
    )
    half = len(data) // 2
    sender.send_frame(data[:half], b0=0x41)  # RSV1 + text, not FIN
    sender.send_frame(data[half:], b0=0x80)  # FIN continuation
    compressed, ack = sender.until("message", "ack")
    assert ack["data"]["metadata"]["sequence"] == 2
    b0, payload = plain.frame()
    assert json.loads(payload)["data"]["content"] == "frag " + BIG
    assert messages_figures(server)["compression"]["inflated"] == inflated + 2


def test_fragmented_compressed_messages_over_the_limit_are_too_large(
    make_server: Callable[..., Server],
) -> None:
    srv = make_server(RATE_LIMIT_MESSAGES="100000")
    ws = WS(srv, "permessage-deflate", token=srv.token("alice"), channel="dfl.fragbig")
    try:
        ws.until("connection", "connect")
        # incompressible: past what 64 KiB compresses to at worst, it is not kept
        noise = deflate(os.urandom(80_000))
        for i in range(0, len(noise), 16_000):
            last = i + 16_000 >= len(noise)
            first = i == 0
            ws.send_frame(noise[i : i + 16_000], b0=(0x80 if last else 0) | (0x41 if first else 0))
        assert ws.until("error")[1]["code"] == "MESSAGE_TOO_LARGE"
        # small once compressed, over the limit once inflated
        zeros = deflate(b"0" * 100_000)
        ws.send_frame(zeros[:10], b0=0x41)
        ws.send_frame(zeros[10:], b0=0x80)
        assert ws.until("error")[1]["code"] == "MESSAGE_TOO_LARGE"
        publish(ws, "dfl.fragbig", "still open", 1, compressed=True)
        assert ws.until("message", "ack")[1]["data"]["metadata"]["sequence"] == 1
    finally:
        ws.close()


@pytest.mark.parametrize(
    ("offer", "frames"),
    [
        (None, [(0xC1, b"x")]),  # RSV1 without the extension
        ("permessage-deflate", [(0x41, b"ab"), (0xC0, b"cd")]),  # RSV1 on a continuation
        ("permessage-deflate", [(0xC9, b"")]),  # RSV1 on a ping
        ("permessage-deflate", [(0xA1, b"x")]),  # RSV2 stays reserved
    ],
)
def test_rsv1_where_it_is_not_allowed_closes_1002(
    server: Server, offer: str | None, frames: list[tuple[int, bytes]]
) -> None:
    ws = WS(server, offer, token=server.token("alice"))
    try:
        ws.until("connection", "connect")
        for b0, payload in frames:
            ws.send_frame(payload, b0=b0)
        assert ws.close_code() == 1002
    finally:
        ws.close()


def test_invalid_compressed_data_closes_1007(server: Server) -> None:
    ws = WS(server, "permessage-deflate", token=server.token("alice"))
    try:
        ws.until("connection", "connect")
        ws.send_frame(b"\xff\xff\xff\xff", b0=0xC1)
        assert ws.close_code() == 1007
    finally:
        ws.close()


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_zip_bomb_is_refused_1009_and_inflates_no_further(
    make_server: Callable[..., Server],
) -> None:
    srv = make_server(RATE_LIMIT_MESSAGES="100000")
    assert srv.proc is not None
    bomb = deflate(b"\x00" * (50 * 1024 * 1024), 15)  # 50 MiB of zeros in ~50 KB
    assert len(bomb) < 65536
    ws = WS(srv, "permessage-deflate", token=srv.token("alice"), channel="dfl.bomb")
    other = WS(srv, None, token=srv.token("bob"), channel="dfl.bomb")
    try:
        ws.until("connection", "connect")
        other.until("connection", "connect")
        peak = _peak_rss_kib(srv.proc.pid)
        ws.send_frame(bomb, b0=0xC1)
        assert ws.close_code() == 1009
        assert ws.conn.closed_by_server()
        # the server kept no more than MAX_MESSAGE_BYTES (64 KiB) of it, and inflated no
        # more than the hard limit (1 MiB): its peak memory did not take the 50 MiB
        assert _peak_rss_kib(srv.proc.pid) - peak < 16 * 1024
        # and it still serves the others
        publish(other, "dfl.bomb", "still here", 1)
        assert other.until("message", "ack")[1]["data"]["metadata"]["sequence"] == 1
        # a compressed message over the limit by a little is what its plain message would
        # be: MESSAGE_TOO_LARGE, and the connection stays
        again = WS(srv, "permessage-deflate", token=srv.token("carol"), channel="dfl.bomb")
        try:
            again.until("connection", "connect")
            again.send_frame(deflate(b"a" * 65537), b0=0xC1)
            assert again.until("error")[1]["code"] == "MESSAGE_TOO_LARGE"
            publish(again, "dfl.bomb", "after", 1, compressed=True)
            assert again.until("message", "ack")[1]["data"]["metadata"]["sequence"] == 1
        finally:
            again.close()
    finally:
        ws.close()
        other.close()


# -- metrics and the echo endpoint ---------------------------------------------------------


def test_metrics_count_bytes_before_and_after_compression(
    server: Server, member: Callable[..., WS]
) -> None:
    d = member("dfl.metrics")
    sender = member("dfl.metrics", None, user="bob")
    before = messages_figures(server)
    publish(sender, "dfl.metrics", BIG, 1)
    b0, payload = d.frame()
    assert b0 == 0xC1
    after = messages_figures(server)
    z0, z1 = before["compression"], after["compression"]
    plain_size = len(inflate(payload))
    assert z1["compressions"] == z0["compressions"] + 1
    assert z1["deliveries"] == z0["deliveries"] + 1
    assert z1["bytes_in"] - z0["bytes_in"] == plain_size
    assert z1["bytes_out"] - z0["bytes_out"] == len(payload)
    assert 0 < z1["ratio"] < 1 and z1["seconds"] > z0["seconds"]
    header = 4  # both frames are 126..65535 bytes long: a 4-byte header
    assert after["bytes_out"] - before["bytes_out"] == len(payload) + header
    assert after["bytes_out_uncompressed"] - before["bytes_out_uncompressed"] == plain_size + header
    # Prometheus on METRICS_PORT
    status, text, _ = server.http("GET", "/metrics", port=server.metrics_port)
    assert status == 200
    for name in (
        "aether_compressions_total",
        "aether_compress_bytes_in_total",
        "aether_compress_bytes_out_total",
        "aether_compress_seconds_total",
        "aether_bytes_out_uncompressed_total",
        "aether_compression_ratio",
        "aether_messages_inflated_total",
    ):
        assert f"\n{name}{{" in text, name


def test_echo_endpoint_compresses_and_inflates(make_server: Callable[..., Server]) -> None:
    srv = make_server(ECHO_PATH="/echo")
    ws = WS(srv, "permessage-deflate; server_max_window_bits=9", path="/echo")
    try:
        assert ws.extensions == f"{ANSWER}; server_max_window_bits=9"
        data = ("echo " * 400).encode()
        ws.send_frame(deflate(data), b0=0xC1)
        b0, payload = ws.frame()
        assert b0 == 0xC1 and inflate(payload, 9) == data
        ws.send_frame(b"short")
        assert ws.frame() == (0x81, b"short")
    finally:
        ws.close()


def test_redis_recovery_replays_what_this_worker_compressed(
    make_server: Callable[..., Server], redis_url: str
) -> None:
    srv = make_server(BROKER_URL=redis_url, RATE_LIMIT_MESSAGES="100000")
    opened: list[WS] = []

    def join(user: str, offer: str | None, **query: Any) -> WS:
        ws = WS(srv, offer, token=srv.token(user), channel="dfl.redis", **query)
        ws.reply = ws.until("connection", "connect")[1]
        opened.append(ws)
        return ws

    try:
        plain = join("alice", None)
        sender = join("bob", None)
        publish(sender, "dfl.redis", f"1 {BIG}", 1)  # no deflate member yet: not compressed
        assert plain.frame()[0] == 0x81
        live = join("carol", "permessage-deflate")
        publish(sender, "dfl.redis", f"2 {BIG}", 2)
        assert plain.frame()[0] == 0x81
        second = live.frame()
        assert second[0] == 0xC1
        before = messages_figures(srv)["compression"]["compressions"]
        again = join("dave", "permessage-deflate", since=0, epoch=plain.reply["data"]["epoch"])
        first = again.frame()
        assert first[0] == 0x81 and json.loads(first[1])["data"]["content"] == f"1 {BIG}"
        assert again.frame() == second  # the bytes this worker compressed live
        assert messages_figures(srv)["compression"]["compressions"] == before
    finally:
        for ws in opened:
            ws.close()


def test_redis_recovery_never_replays_a_compressed_frame_of_an_older_epoch(
    make_server: Callable[..., Server], redis_url: str
) -> None:
    """The channel's Redis keys go (another worker's `forget`, or they expired) while this
    worker keeps members, so offsets start again at 1: a recovery must replay what Redis
    holds at an offset, never the compressed frame this worker kept for that offset before."""
    srv = make_server(BROKER_URL=redis_url, RATE_LIMIT_MESSAGES="100000")
    opened: list[WS] = []

    def join(user: str, offer: str | None, **query: Any) -> WS:
        ws = WS(srv, offer, token=srv.token(user), channel="dfl.epoch", **query)
        ws.reply = ws.until("connection", "connect")[1]
        opened.append(ws)
        return ws

    try:
        sender = join("bob", None)
        live = join("carol", "permessage-deflate")
        publish(sender, "dfl.epoch", f"old {BIG}", 1)
        assert live.frame()[0] == 0xC1  # compressed, and kept for a recovery at offset 1
        client = redis.Redis.from_url(redis_url)
        try:
            assert client.delete(*_keys("dfl.epoch")) == 2
        finally:
            client.close()
        publish(sender, "dfl.epoch", "new", 2)  # offset 1 again, small: not compressed
        compressed, msg = live.until("message", "send")
        assert not compressed and msg["data"]["metadata"]["offset"] == 1
        again = join("dave", "permessage-deflate")
        epoch = again.reply["data"]["epoch"]
        opened.remove(again)
        again.close()
        late = join("erin", "permessage-deflate", since=0, epoch=epoch)
        _, replayed = late.until("message", "send")
        assert replayed["data"]["content"] == "new"
    finally:
        for ws in opened:
            ws.close()
