"""permessage-deflate against a hostile client, on real sockets: inflate edge cases (empty,
stored blocks, BFINAL then trailing data, exactly the limit and one past), control frames
between compressed fragments, hostile `Sec-WebSocket-Extensions` headers; none leaves a
traceback in the log."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable

import pytest

from tests.conftest import Server
from tests.integration.test_ws_deflate import ANSWER, WS, deflate, publish


def stored(data: bytes) -> bytes:
    """`data` as one compressed message of stored (uncompressed) blocks."""
    c = zlib.compressobj(0, zlib.DEFLATED, -15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    return out[:-4]


def message(channel: str, content: str, seq: int) -> bytes:
    return json.dumps(
        {
            "type": "message",
            "action": "send",
            "data": {"channel": channel, "content": content, "metadata": {"sequence": seq}},
        }
    ).encode()


def clean_log(srv: Server) -> None:
    text = srv.log_text()
    assert "Traceback" not in text, text


def test_inflate_edge_cases(make_server: Callable[..., Server]) -> None:
    srv = make_server(RATE_LIMIT_MESSAGES="100000")
    ws = WS(srv, "permessage-deflate", token=srv.token("alice"), channel="dfl.edge")
    try:
        ws.until("connection", "connect")
        # empty compressed messages (no payload; the single 00 byte of RFC 7692 §7.2.3.6)
        # are the empty message: not JSON
        for payload in (b"", b"\x00"):
            ws.send_frame(payload, b0=0xC1)
            assert ws.until("error")[1]["code"] == "INVALID_JSON"
        # stored blocks inflate as well
        ws.send_frame(stored(message("dfl.edge", "stored", 1)), b0=0xC1)
        assert ws.until("message", "ack")[1]["data"]["metadata"]["sequence"] == 1
        # a final block (BFINAL) is allowed at the end of the message
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        final = c.compress(message("dfl.edge", "final", 2)) + c.flush(zlib.Z_FINISH)
        ws.send_frame(final, b0=0xC1)
        assert ws.until("message", "ack")[1]["data"]["metadata"]["sequence"] == 2
        # exactly MAX_MESSAGE_BYTES once inflated is accepted; one byte more is too large
        body = message("dfl.edge", "", 3)
        pad = 65536 - len(body)
        exact = message("dfl.edge", "x" * pad, 3)
        assert len(exact) == 65536
        ws.send_frame(deflate(exact), b0=0xC1)
        assert ws.until("message", "ack")[1]["data"]["metadata"]["sequence"] == 3
        ws.send_frame(deflate(message("dfl.edge", "x" * (pad + 1), 4)), b0=0xC1)
        assert ws.until("error")[1]["code"] == "MESSAGE_TOO_LARGE"
        # pings and a pong between compressed fragments
        data = deflate(message("dfl.edge", "fragmented", 5))
        ws.send_frame(data[:3], b0=0x41)
        ws.send_frame(b"p", b0=0x89)
        assert ws.frame() == (0x8A, b"p")
        ws.send_frame(b"", b0=0x8A)
        ws.send_frame(data[3:6], b0=0x00)
        ws.send_frame(data[6:], b0=0x80)
        assert ws.until("message", "ack")[1]["data"]["metadata"]["sequence"] == 5
        # BFINAL, then more data in the same message: not valid deflate data
        ws.send_frame(final + deflate(b"more"), b0=0xC1)
        assert ws.close_code() == 1007
    finally:
        ws.close()
    clean_log(srv)


@pytest.mark.parametrize(
    ("header", "answer"),
    [
        # huge: one element with thousands of parameters, and thousands of elements
        ("permessage-deflate" + "; client_max_window_bits" * 600, None),
        ("foo, " * 3000 + "permessage-deflate", None),  # past the 16 offers read
        ("permessage-deflate; " + "x" * 15000, None),
        # read up to 2048 characters: an offer past them (or cut by them) is not read
        ("x" * 2100 + ", permessage-deflate", None),
        (["x" * 2030, "permessage-deflate"], None),
        (["x" * 2000, "permessage-deflate"], ANSWER),
        ("permessage-deflate; server_max_window_bits=10; " + " " * 2100 + "mystery", None),
        ('permessage-deflate; server_max_window_bits="1' + "5" * 10000 + '"', None),
        # quotes
        ('permessage-deflate; client_max_window_bits="10"', ANSWER),
        ('permessage-deflate; server_max_window_bits="', None),
        ('permessage-deflate; server_max_window_bits=""', None),
        ('"permessage-deflate"', None),
        ('permessage-deflate; server_max_window_bits="1,2", permessage-deflate', ANSWER),
        # bad tokens and values
        ("permessage-deflate; server_max_window_bits=+9", None),
        # RFC 7692 §7.1.2.1: a decimal integer without leading zeroes
        ("permessage-deflate; server_max_window_bits=09", None),
        ("permessage-deflate; client_max_window_bits=010", None),
        ("permessage-deflate; server_max_window_bits=\uff11\uff10", None),  # fullwidth
        ("permessage-deflate;;", None),
        ("permessage-deflate; =10", None),
        (", , ;, permessage-deflate", ANSWER),
        ("PerMessage-Deflate; Server_Max_Window_Bits=11", f"{ANSWER}; server_max_window_bits=11"),
        ("\xff\xfe", None),
    ],
)
def test_hostile_extension_headers(server: Server, header: str, answer: str | None) -> None:
    ws = WS(server, header, token=server.token("alice"))
    try:
        assert ws.extensions == answer
        ws.until("connection", "connect")
    finally:
        ws.close()
    clean_log(server)


def test_publish_after_compressed_and_plain_messages_interleave(server: Server) -> None:
    """The worker's one scratch buffer: an inflated message's publication compressed for
    members while the next compressed message is inflated."""
    ws = WS(server, "permessage-deflate", token=server.token("alice"), channel="dfl.zbuf")
    other = WS(
        server,
        "permessage-deflate; server_max_window_bits=9",
        token=server.token("bob"),
        channel="dfl.zbuf",
    )
    try:
        ws.until("connection", "connect")
        other.until("connection", "connect")
        texts = [f"{i} " + f"abc{i} " * 400 for i in range(5)]
        for i, text in enumerate(texts):
            publish(ws, "dfl.zbuf", text, i + 1, compressed=bool(i % 2))
        for text in texts:
            _, msg = other.until("message", "send")
            assert msg["data"]["content"] == text
    finally:
        ws.close()
        other.close()


def test_a_flood_of_small_compressed_messages_that_inflate_big_is_closed(
    make_server: Callable[..., Server],
) -> None:
    """Each is inflated (past MAX_MESSAGE_BYTES, up to the frame hard limit: about a
    millisecond) before the budget is charged; the budget and its strikes close the flood,
    so the CPU it costs is bounded by RATE_LIMIT_MESSAGES, not by how fast it is sent."""
    srv = make_server(RATE_LIMIT_MESSAGES="5")
    ws = WS(srv, "permessage-deflate", token=srv.token("alice"), channel="dfl.flood")
    try:
        ws.until("connection", "connect")
        over = deflate(b"x" * (900 * 1024))  # 900 KiB once inflated, about 1 KB sent
        assert len(over) < 2048
        for _ in range(200):
            ws.send_frame(over, b0=0xC1)
        errors = 0
        for _ in range(300):
            b0, payload = ws.frame()
            if b0 & 0x0F == 8:
                assert int.from_bytes(payload[:2], "big") == 1008
                break
            errors += 1
        else:
            raise AssertionError("no close")
        assert errors <= 5 + 10 + 1  # the budget, the strikes, one notice
    finally:
        ws.close()
    clean_log(srv)
