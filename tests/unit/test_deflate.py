"""ext/deflate.pxi on its own: a compressed frame inflates to the plain one for every window
size, and the inflater's verdicts: the message, over MAX_MESSAGE_BYTES, past the hard limit
(a zip bomb: inflating stops), invalid data; a session whose window bits are out of range
cannot join a channel."""

from __future__ import annotations

import asyncio
import zlib

import pytest

from aether_fast._core import Session, compress_frame, encode_text_frame, inflate_payload
from aether_fast.auth import Claims
from aether_fast.config import load_config
from aether_fast.stores.base import default_channel_config
from tests.unit.support import make_hub


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return (c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]


@pytest.mark.parametrize("bits", range(9, 16))
def test_compressed_frame_inflates_to_the_plain_one(bits: int) -> None:
    payload = b'{"content":"' + bytes(range(32, 127)) * 300 + b'"}'
    plain = encode_text_frame(payload)
    frame = compress_frame(plain, bits)
    assert frame[0] == 0xC1 and frame[1] == 126  # FIN, RSV1, text; a 16-bit length
    body = frame[4:]
    assert int.from_bytes(frame[2:4], "big") == len(body) < len(payload)
    assert not body.endswith(b"\x00\x00\xff\xff")
    assert zlib.decompressobj(-bits).decompress(body + b"\x00\x00\xff\xff") == payload
    assert inflate_payload(body, len(payload)) == ("ok", payload)


def test_verdicts() -> None:
    assert inflate_payload(deflate(b"a" * 100), 100) == ("ok", b"a" * 100)
    assert inflate_payload(deflate(b"a" * 101), 100) == ("over", None)
    # the hard limit is max(4 x the limit, 1 MiB)
    assert inflate_payload(deflate(b"a" * (1 << 20)), 100) == ("over", None)
    assert inflate_payload(deflate(b"a" * ((1 << 20) + 1)), 100) == ("bomb", None)
    assert inflate_payload(deflate(b"\0" * 50_000_000), 65536) == ("bomb", None)
    assert inflate_payload(b"\xff\xff\xff", 100) == ("bad", None)
    # a stream the client ended (BFINAL) is fine; data after its end is not
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    ended = c.compress(b"hello") + c.flush()
    assert inflate_payload(ended, 100) == ("ok", b"hello")
    assert inflate_payload(ended + b"xx", 100) == ("bad", None)
    assert inflate_payload(deflate(b""), 100) == ("ok", b"")


def test_a_session_with_window_bits_out_of_range_cannot_join() -> None:
    """`Hub.deliver` picks each member's frame from arrays indexed by its window bits."""
    loop = asyncio.new_event_loop()
    try:
        hub = make_hub(loop)
        ch = hub.add_channel(
            "c", default_channel_config("c", load_config({"JWT_SECRET": "x" * 40}))
        )
        member = Session(hub, "m1", Claims("u", 2e9, False, None), "127.0.0.1")
        for bits in (16, -1, 1000):
            member.deflate = bits
            with pytest.raises(ValueError, match="window bits"):
                hub.join(member, ch)
        member.deflate = 8
        assert hub.join(member, ch)
        assert ch.member_count == 1
    finally:
        loop.close()


@pytest.mark.parametrize("frame", [b"", b"\x81", b"\x81\x7e\x00", b"\x81\x7f" + b"\x00" * 7])
def test_compress_frame_refuses_what_is_not_a_whole_frame(frame: bytes) -> None:
    with pytest.raises(ValueError):
        compress_frame(frame, 15)
