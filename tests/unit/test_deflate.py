"""ext/deflate.pxi on its own: a compressed frame inflates to the plain one for every window
size, and the inflater's verdicts: the message, over MAX_MESSAGE_BYTES, past the hard limit
(a zip bomb: inflating stops), invalid data."""

from __future__ import annotations

import zlib

import pytest

from aether_fast._core import compress_frame, encode_text_frame, inflate_payload


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
