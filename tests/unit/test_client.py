"""aether_fast.client without sockets: backoff, token expiry, per-channel dedupe."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import zlib

import pytest

from aether_fast.client import (
    GAP_WINDOW,
    AetherClient,
    Deflate,
    ExtensionRefused,
    _Channel,
    _compress,
    parse_deflate_answer,
    token_expiry,
)


def _client(**kw: object) -> AetherClient:
    async def make() -> AetherClient:
        return AetherClient("ws://127.0.0.1:1/ws", **kw)  # type: ignore[arg-type]

    return asyncio.run(make())


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    c = _client(backoff_initial=0.1, backoff_max=1.0, backoff_factor=2.0, jitter=0.5)
    for attempt in range(1, 12):
        base = min(1.0, 0.1 * 2 ** (attempt - 1))
        samples = [c.backoff_delay(attempt) for _ in range(50)]
        assert all(base / 2 <= d <= base for d in samples), (attempt, samples[:3])
        assert len(set(samples)) > 1  # spread
    plain = _client(jitter=0.0)
    assert [plain.backoff_delay(a) for a in (1, 2, 3, 7, 8, 30)] == [0.5, 1, 2, 30, 30, 30]


def test_sequences_start_at_the_clock() -> None:
    c = _client()
    assert abs(c._sequence / 1e6 - time.time()) < 5
    assert _client(first_sequence=1)._sequence == 0


def _jwt(claims: dict[str, object]) -> str:
    def b64(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'HS256'})}.{b64(claims)}.sig"


def test_token_expiry() -> None:
    assert token_expiry(_jwt({"sub": "a", "exp": 1234567890})) == 1234567890.0
    assert token_expiry(_jwt({"sub": "a"})) is None
    assert token_expiry("garbage") is None
    assert token_expiry("a.!!!.c") is None


def test_offsets_delivered_once_even_out_of_order() -> None:
    ch = _Channel("c", floor=0)
    assert [ch.take_offset(o) for o in (1, 3, 2, 2, 3, 1, 4)] == [
        True,
        True,
        True,
        False,
        False,
        False,
        True,
    ]
    assert ch.floor == 4 and ch.above == set()


def test_the_floor_waits_for_a_missing_offset() -> None:
    """The position never passes an offset that has not come, however many later ones do
    (the client, not the channel, bounds them: GAP_WINDOW); once it comes, the floor moves
    over everything received above it."""
    ch = _Channel("c", floor=0)
    assert all(ch.take_offset(o) for o in range(2, 3 * GAP_WINDOW))
    assert ch.floor == 0 and len(ch.above) == 3 * GAP_WINDOW - 2
    assert ch.take_offset(1) and ch.floor == 3 * GAP_WINDOW - 1 and ch.above == set()
    assert not ch.take_offset(1) and not ch.take_offset(5)


def test_settle_after_a_jump() -> None:
    """A join reply that sets the floor forward (nothing replayed) drops what is below it and
    moves over what was received right above it."""
    ch = _Channel("c", floor=0)
    for o in (3, 5, 6, 9):
        ch.take_offset(o)
    ch.floor = 4
    ch.settle()
    assert ch.floor == 6 and ch.above == {9}


def test_sender_sequence_window() -> None:
    ch = _Channel("c")
    assert ch.take_key(("u", "c1", 1)) and not ch.take_key(("u", "c1", 1))
    assert ch.take_key(("u", "c2", 1))  # another sender
    for i in range(5000):
        ch.take_key(("v", "c", i))
    assert len(ch.seen) == 4096
    assert ch.take_key(("u", "c1", 1))  # forgotten past the window


def test_deflate_answers_the_client_accepts() -> None:
    assert parse_deflate_answer([], offered=True) is None  # declined: plain
    assert parse_deflate_answer(["permessage-deflate"], offered=True) == Deflate()
    both = "Permessage-Deflate; Server_No_Context_Takeover ;client_no_context_takeover"
    assert parse_deflate_answer([both], offered=True) == Deflate(True, True)
    windows = 'permessage-deflate; server_max_window_bits="10"; client_max_window_bits=9'
    assert parse_deflate_answer([windows], offered=True) == Deflate(False, False, 10, 9)


def test_deflate_answers_the_client_refuses() -> None:
    for answer, offered in [
        (["permessage-deflate"], False),  # nothing was offered
        (["x-webkit-deflate-frame"], True),
        (["permessage-deflate", "permessage-deflate"], True),
        (["permessage-deflate; server_max_window_bits=16"], True),
        (["permessage-deflate; client_max_window_bits"], True),  # the answer needs a value
        (["permessage-deflate; client_max_window_bits=015"], True),
        (["permessage-deflate; server_max_window_bits=09"], True),  # RFC 7692 §7.1.2.1: no 0 first
        (["permessage-deflate; server_no_context_takeover=yes"], True),
        (["permessage-deflate; mystery"], True),
    ]:
        with pytest.raises(ExtensionRefused) as refused:
            parse_deflate_answer(answer, offered=offered)
        assert refused.value.code == "EXTENSION_REFUSED", answer


def test_outbound_compression_round_trips() -> None:
    payload = json.dumps({"data": ["same words again"] * 100}).encode()
    for bits in (9, 12, 15):
        packed = _compress(payload, bits)
        assert packed is not None and len(packed) < len(payload) // 4
        inflater = zlib.decompressobj(-bits)  # the server's window is as small as it allowed
        assert inflater.decompress(packed + b"\x00\x00\xff\xff") == payload
    assert _compress(payload, 8) is None  # zlib cannot keep to a 256-byte window
