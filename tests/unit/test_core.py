"""The compiled hot path's pure parts: frames, publications, timestamps, rate buckets, and the
memory broker's offsets, history, recovery and dedupe (a real Hub, no sockets)."""

from __future__ import annotations

import asyncio
import json
import random
import re
import struct
from collections.abc import Callable, Iterator

import pytest

from aether_fast._core import (
    Channel,
    Hub,
    RateBucket,
    Session,
    encode_ack,
    encode_json_frame,
    encode_publication,
    encode_text_frame,
    publication_halves,
    utc_timestamp,
)
from aether_fast.auth import Claims
from aether_fast.brokers.base import DEDUP_WINDOW
from aether_fast.brokers.memory import MemoryBroker
from aether_fast.config import load_config
from aether_fast.stores.base import default_channel_config
from tests.unit.support import make_hub


def parse_frame(frame: bytes) -> tuple[int, bool, bytes]:
    """Reference decoder for one unmasked server frame (RFC 6455 §5.2)."""
    b0, b1 = frame[0], frame[1]
    assert b1 & 0x80 == 0, "server frames are never masked"
    n = b1 & 0x7F
    pos = 2
    if n == 126:
        (n,) = struct.unpack(">H", frame[2:4])
        pos = 4
    elif n == 127:
        (n,) = struct.unpack(">Q", frame[2:10])
        pos = 10
    payload = frame[pos:]
    assert len(payload) == n
    return b0 & 0x0F, bool(b0 & 0x80), payload


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_header_for_every_length_class(size: int) -> None:
    payload = b"x" * size
    opcode, fin, body = parse_frame(encode_text_frame(payload))
    assert (opcode, fin, body) == (1, True, payload)


def test_smallest_header_is_used() -> None:
    assert len(encode_text_frame(b"a" * 125)) == 125 + 2
    assert len(encode_text_frame(b"a" * 126)) == 126 + 4
    assert len(encode_text_frame(b"a" * 65536)) == 65536 + 10


def test_publication_is_the_fan_out_shape() -> None:
    frame = encode_publication("chat", "hé", 7, "2026-01-01T00:00:00.000Z", 3, "c1", "alice")
    _, _, payload = parse_frame(frame)
    assert json.loads(payload) == {
        "type": "message",
        "action": "send",
        "data": {
            "channel": "chat",
            "content": "hé",
            "metadata": {
                "sequence": 7,
                "timestamp": "2026-01-01T00:00:00.000Z",
                "offset": 3,
                "client_id": "c1",
                "user_id": "alice",
            },
        },
    }


def test_json_frame() -> None:
    assert json.loads(parse_frame(encode_json_frame({"a": [1, 2]}))[2]) == {"a": [1, 2]}


@pytest.mark.parametrize(
    ("channel", "seq", "offset"),
    [("chat", 1, 1), ("a" * 128, 2**64 - 1, 2**62), ("A-z_0.9:x", 0, 123456789)],
)
def test_ack_frame_is_what_orjson_makes_of_the_ack(channel: str, seq: int, offset: int) -> None:
    ts = "2026-11-26T03:04:05.678Z"
    body = {"channel": channel, "metadata": {"sequence": seq, "offset": offset, "timestamp": ts}}
    expected = encode_json_frame({"type": "message", "action": "ack", "data": body})
    assert encode_ack(channel, seq, offset, ts) == expected


def test_utc_timestamp_is_iso_8601_utc_with_millis() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", utc_timestamp())


def test_bucket_allows_capacity_then_refuses_with_wait() -> None:
    b = RateBucket(3, 1.0, 100.0)
    assert [b.try_take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = b.try_take(100.0)
    assert wait == pytest.approx(1 / 3)
    assert b.try_take(100.0 + wait) == 0.0  # refilled exactly one token


def test_bucket_refills_to_capacity_only() -> None:
    b = RateBucket(2, 10.0, 0.0)
    assert b.try_take(0.0) == 0.0 and b.try_take(0.0) == 0.0
    assert b.try_take(1000.0) == 0.0
    assert b.try_take(1000.0) == 0.0
    assert b.try_take(1000.0) > 0.0


def test_zero_capacity_means_no_limit() -> None:
    b = RateBucket(0, 1.0, 0.0)
    assert all(b.try_take(0.0) == 0.0 for _ in range(10000))


def sender(hub: Hub, user: str, client_id: str) -> Session:
    """A session that is not connected: publishing needs only who sent it."""
    return Session(hub, client_id, Claims(user, 2e9, False, None), "127.0.0.1")


@pytest.fixture
def broker() -> Iterator[tuple[MemoryBroker, Hub, Channel]]:
    loop = asyncio.new_event_loop()
    hub = make_hub(loop, conn_window=1, busy_poll_s=0.0)
    config = load_config({"JWT_SECRET": "x" * 40, "HISTORY_SIZE": "5"})
    channel = hub.add_channel("chat", default_channel_config("chat", config))
    yield MemoryBroker(hub, history_ttl_s=3600, dedup_ttl_s=300), hub, channel
    loop.close()


def test_offsets_are_gapless_and_counted(broker: tuple[MemoryBroker, Hub, Channel]) -> None:
    b, hub, ch = broker
    alice = sender(hub, "alice", "a1")
    offsets = [b.publish(ch, alice, seq, f"m{seq}")[0] for seq in range(1, 6)]
    assert offsets == [1, 2, 3, 4, 5]
    assert hub.messages_published == 5
    assert b.position("chat")[0] == 5


def test_duplicate_sequence_returns_the_original_offset(
    broker: tuple[MemoryBroker, Hub, Channel],
) -> None:
    b, hub, ch = broker
    alice = sender(hub, "alice", "a1")
    first = b.publish(ch, alice, 1, "x")
    b.publish(ch, sender(hub, "bob", "b1"), 1, "y")  # another client's sequence 1 is its own
    again = b.publish(ch, alice, 1, "x")
    assert again == (first[0], first[1], True)
    assert hub.messages_published == 2


def test_dedupe_window_is_bounded(broker: tuple[MemoryBroker, Hub, Channel]) -> None:
    b, hub, ch = broker
    alice = sender(hub, "alice", "a1")
    for seq in range(DEDUP_WINDOW + 1):
        b.publish(ch, alice, seq, "x")
    assert b.publish(ch, alice, DEDUP_WINDOW, "x")[2] is True
    assert b.publish(ch, alice, 0, "x")[2] is False  # fell out of the window


def test_dedupe_window_grows_with_use(broker: tuple[MemoryBroker, Hub, Channel]) -> None:
    b, hub, ch = broker
    alice = sender(hub, "alice", "a1")
    start = 1_764_000_000_000_000  # clients start their sequences at the clock in µs
    for seq in range(start, start + 3):
        b.publish(ch, alice, seq, "x")
    (window,) = b._windows.values()
    assert (window.remembered, window.capacity) == (3, 16)  # little sent, little held
    for seq in range(start + 3, start + 5000):
        b.publish(ch, alice, seq, "x")
    assert (window.remembered, window.capacity) == (DEDUP_WINDOW, DEDUP_WINDOW)
    assert all(
        b.publish(ch, alice, s, "x")[2] for s in range(start + 5000 - DEDUP_WINDOW, start + 5000)
    )
    assert not b.publish(ch, alice, start + 5000 - DEDUP_WINDOW - 1, "x")[2]


@pytest.mark.parametrize("pattern", ["counter", "stride", "random", "clock"])
def test_dedupe_window_matches_a_reference_of_the_last_1024(
    broker: tuple[MemoryBroker, Hub, Channel], pattern: str
) -> None:
    """Whatever the sequences look like, a retry is recognised exactly while it is among
    the last 1024 sequences accepted (docs/protocol.md §6: the last 1024)."""
    from collections import OrderedDict

    b, hub, ch = broker
    alice = sender(hub, "alice", "a1")
    rng = random.Random(pattern)
    makers: dict[str, Callable[[int], int]] = {
        "counter": lambda i: i,
        "stride": lambda i: i << 20,  # all equal modulo any table size
        "random": lambda i: rng.getrandbits(64),
        "clock": lambda i: 1_764_000_000_000_000 + i * 1000 + rng.randrange(1000),
    }
    make = makers[pattern]
    reference: OrderedDict[int, tuple[int, str]] = OrderedDict()
    sent: list[int] = []
    for i in range(6000):
        if sent and rng.random() < 0.3:
            seq = sent[-1 - min(len(sent) - 1, int(rng.expovariate(1 / 600)))]  # a retry
        else:
            seq = make(i)
        offset, ts, dup = b.publish(ch, alice, seq, "x")
        if seq in reference:
            assert (offset, ts, dup) == (*reference[seq], True), (i, seq)
        else:
            assert dup is False, (i, seq)
            reference[seq] = (offset, ts)
            if len(reference) > DEDUP_WINDOW:
                reference.popitem(last=False)
            sent.append(seq)


def test_duplicate_keeps_its_timestamp_and_offset_across_growth(
    broker: tuple[MemoryBroker, Hub, Channel],
) -> None:
    b, hub, ch = broker
    alice = sender(hub, "alice", "a1")
    first = [b.publish(ch, alice, seq, "x") for seq in (5, 2**64 - 1, 0)]
    for seq in range(100, 140):  # grows the window twice
        b.publish(ch, alice, seq, "x")
    again = [b.publish(ch, alice, seq, "x") for seq in (5, 2**64 - 1, 0)]
    assert again == [(o, ts, True) for o, ts, _ in first]


def test_recovery_replays_missed_in_order(broker: tuple[MemoryBroker, Hub, Channel]) -> None:
    b, hub, ch = broker
    alice = sender(hub, "alice", "a1")
    for seq in range(1, 5):
        b.publish(ch, alice, seq, f"m{seq}")
    _offset, epoch = b.position("chat")
    rec = b.recover("chat", 2, epoch)
    assert rec.recovered and rec.offset == 4 and rec.epoch == epoch
    assert [
        json.loads(parse_frame(f if isinstance(f, bytes) else f.plain)[2])["data"]["content"]
        for f in rec.frames
    ] == ["m3", "m4"]
    assert b.recover("chat", 4, epoch).recovered is True
    assert b.recover("chat", 4, epoch).frames == []


def test_recovery_fails_on_other_epoch_or_trimmed_history(
    broker: tuple[MemoryBroker, Hub, Channel],
) -> None:
    b, hub, ch = broker
    alice = sender(hub, "alice", "a1")
    for seq in range(1, 9):  # history_size is 5
        b.publish(ch, alice, seq, "x")
    _, epoch = b.position("chat")
    assert b.recover("chat", 1, epoch).recovered is False
    assert b.recover("chat", 3, epoch).recovered is True
    other = b.recover("chat", 7, "not-" + epoch)
    assert (other.recovered, other.frames, other.offset, other.epoch) == (False, [], 8, epoch)


def test_forget_starts_a_new_epoch(broker: tuple[MemoryBroker, Hub, Channel]) -> None:
    b, hub, ch = broker
    b.publish(ch, sender(hub, "alice", "a1"), 1, "x")
    _, epoch = b.position("chat")
    b.forget("chat")
    offset, new_epoch = b.position("chat")
    assert offset == 0 and new_epoch != epoch


def test_sweep_forgets_what_joins_of_unused_channels_left(
    broker: tuple[MemoryBroker, Hub, Channel],
) -> None:
    """Channel hoarding with the embedded broker: a join makes a live channel and a log (its
    position); once nobody is in them and they hold no history, the timer's sweep and
    drop_empty forget both. A channel with history keeps its log until HISTORY_TTL_S."""
    b, hub, ch = broker
    config = load_config({"JWT_SECRET": "x" * 40})
    member = sender(hub, "alice", "a1")
    for i in range(500):
        name = f"hoard.{i}"
        live = hub.add_channel(name, default_channel_config(name, config))
        hub.join(member, live)
        assert b.recover(name, None, None).offset == 0
    b.publish(ch, member, 1, "kept")  # "chat" has history and no member either
    assert len(b._logs) == 501
    b.sweep()
    assert len(b._logs) == 501  # members still in them: nothing is dropped
    for name in member.joined():
        hub.leave(member, name)
    b.sweep()
    assert hub.drop_empty() == 501
    assert hub.channel_count == 0
    assert list(b._logs) == ["chat"]


def test_busy_poll_spins_after_a_flush_then_stops() -> None:
    loop = asyncio.new_event_loop()
    try:
        hub = make_hub(loop, conn_window=1, busy_poll_s=0.02)
        hub.flush()
        assert hub.spinning
        loop.run_until_complete(asyncio.sleep(0.1))
        assert not hub.spinning  # it stopped by itself once the window passed
    finally:
        loop.close()


def test_busy_poll_off_never_spins() -> None:
    loop = asyncio.new_event_loop()
    try:
        hub = make_hub(loop, conn_window=1, busy_poll_s=0.0)
        hub.flush()
        assert not hub.spinning
    finally:
        loop.close()


def test_socket_options_work_on_the_descriptor() -> None:
    """What picows' connection_made sets through the hand-off view reaches the socket."""
    import socket

    from aether_fast._core import _SocketOptions

    with socket.socket() as s:
        opts = _SocketOptions(s.fileno())
        assert opts.fileno() == s.fileno()
        opts.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert opts.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        with pytest.raises(OSError):
            opts.setsockopt(socket.IPPROTO_TCP, 9999, 1)
    with pytest.raises(OSError):
        _SocketOptions(-1).getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def test_new_epochs_are_distinct_8_hex_digits() -> None:
    from aether_fast.brokers.base import new_epoch

    epochs = [new_epoch() for _ in range(10000)]
    assert len(set(epochs)) == len(epochs)
    assert all(re.fullmatch(r"[0-9a-f]{8}", e) for e in epochs)


@pytest.mark.parametrize(
    ("content", "sequence", "client_id", "user_id"),
    [
        ("hello", 1, "c1", "alice"),
        ('quo"te \\ back\nline \x00\x1f é 😀 \u2028', 2**64 - 1, "A-z_0.9:x", "bøb"),
        ("", 0, "c", 42),
        ("x" * 70000, 123, "c", None),  # a 64-bit length header
    ],
)
def test_publication_frame_is_what_orjson_makes_of_the_dict(
    content: str, sequence: int, client_id: str, user_id: object
) -> None:
    ts = "2026-11-26T03:04:05.678Z"
    expected = encode_json_frame(
        {
            "type": "message",
            "action": "send",
            "data": {
                "channel": "room.1",
                "content": content,
                "metadata": {
                    "sequence": sequence,
                    "timestamp": ts,
                    "offset": 99,
                    "client_id": client_id,
                    "user_id": user_id,
                },
            },
        }
    )
    got = encode_publication("room.1", content, sequence, ts, 99, client_id, user_id)  # type: ignore[arg-type]
    assert got == expected
    # the Redis broker's halves, joined around the offset as its script does: the same text
    head, tail = publication_halves("room.1", content, sequence, ts, client_id, user_id)  # type: ignore[arg-type]
    assert head + b"99" + tail == parse_frame(expected)[2]


@pytest.mark.parametrize("sequence", [-1, 2**64])
def test_publication_sequence_outside_64_bits_is_refused(sequence: int) -> None:
    # Session.publish lets only non-negative integers through, and orjson reads nothing
    # beyond 2**64 - 1 as an integer: such a sequence never reaches the encoder from a client
    with pytest.raises(OverflowError):
        encode_publication("room.1", "x", sequence, "2026-11-26T03:04:05.678Z", 1, "c", "u")
