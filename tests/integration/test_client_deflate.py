"""permessage-deflate in aether_fast.client (issue 15).

Against real servers: with deflate negotiated a large publication crosses the wire
compressed both ways (the client's own frame up, the server's delivery down: seen by a
WireTap relay and the server's byte counters) and arrives intact; a client with
`compression=False` beside it gets the same publication plain; a client against a server
with COMPRESSION=false works, plain.

Against `FakeServer`, a few lines of raw socket in this file (it is not what is under test),
for what a real server never does: answers the client must refuse (an extension it did not
offer, unknown or invalid parameters, an answer to a client that offered nothing), a zip
bomb past `max_message_bytes` (closed 1009, inflating stops at the bound), RSV1 without
deflate (1002), data that does not inflate (1007), and context takeover kept across
messages when the server does not reset its window.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import resource
import struct
import zlib
from collections.abc import Callable
from typing import Any

import pytest

from aether_fast.client import AetherClient, AetherError, Deflate, Message
from tests.conftest import Server
from tests.integration.helpers import Op, build_frame
from tests.integration.test_python_client import FAST, run, until
from tests.integration.wiretap import WireTap

#: ~4 KB of JSON-ish text, far over COMPRESSION_MIN_BYTES (512) and very compressible
BIG = json.dumps(
    [{"id": i, "user": f"user-{i:04d}", "status": "online", "tags": ["x", "y"]} for i in range(70)]
)


def metrics(srv: Server) -> dict[str, Any]:
    status, body, _ = srv.http("GET", "/metrics/messages")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


# -- real servers --------------------------------------------------------------------------


def test_publication_crosses_compressed_and_arrives_intact(
    make_server: Callable[..., Server],
) -> None:
    srv = make_server(WORKERS="1")

    async def main() -> None:
        got_bob: list[Message] = []
        got_carol: list[Message] = []
        with WireTap(("127.0.0.1", srv.port)) as tap:
            alice = AetherClient(tap.url(), token=srv.token("alice"), channels=["dz"], **FAST)
            bob = AetherClient(
                tap.url(),
                token=srv.token("bob"),
                channels=["dz"],
                on_message=got_bob.append,
                **FAST,
            )
            carol = AetherClient(
                srv.ws_url,
                token=srv.token("carol"),
                channels=["dz"],
                on_message=got_carol.append,
                compression=False,
                **FAST,
            )
            for c in (alice, bob, carol):
                await c.connect(timeout=10)
            # the server's answer, as the client settled it: no context kept either way
            assert bob.deflate == Deflate(True, True, 15, 15)
            assert carol.deflate is None
            before = metrics(srv)
            await alice.publish("dz", BIG)
            await alice.publish("dz", "small")  # under both thresholds: plain
            await until(lambda: len(got_bob) == 2 and len(got_carol) == 2)
            assert [m.content for m in got_bob] == [BIG, "small"]
            assert [m.content for m in got_carol] == [BIG, "small"]
            after = metrics(srv)
            # the server compressed the big delivery for bob alone (carol: plain, alice: no echo)
            assert after["delivered"] - before["delivered"] == 4
            assert after["compression"]["deliveries"] - before["compression"]["deliveries"] == 1
            plain = after["bytes_out_uncompressed"] - before["bytes_out_uncompressed"]
            sent = after["bytes_out"] - before["bytes_out"]
            assert sent < plain - len(BIG) // 2, (sent, plain)
            # on the wire: alice's big publication went up compressed, bob's copy came down
            # compressed; the small ones crossed plain
            tapped = tap.snapshot()
            up = [
                (m["data"]["content"], z)
                for t in tapped
                for m, z in zip(t.up, t.up_compressed, strict=True)
                if m.get("type") == "message"
            ]
            assert up == [(BIG, True), ("small", False)]
            down = [
                (m["data"]["content"], z)
                for t in tapped
                for m, z in zip(t.down, t.down_compressed, strict=True)
                if (m.get("type"), m.get("action")) == ("message", "send")
            ]
            assert down == [(BIG, True), ("small", False)]
            for c in (alice, bob, carol):
                await c.close()

    run(main())


def test_client_against_a_server_without_compression(make_server: Callable[..., Server]) -> None:
    srv = make_server(WORKERS="1", COMPRESSION="false")

    async def main() -> None:
        got: list[Message] = []
        async with (
            AetherClient(srv.ws_url, token=srv.token("alice"), channels=["dz"], **FAST) as alice,
            AetherClient(
                srv.ws_url,
                token=srv.token("bob"),
                channels=["dz"],
                on_message=got.append,
                **FAST,
            ) as bob,
        ):
            assert alice.compression and alice.deflate is None and bob.deflate is None
            await alice.publish("dz", BIG)
            await until(lambda: len(got) == 1)
            assert got[0].content == BIG
        m = metrics(srv)
        assert m["compression"]["deliveries"] == 0
        assert m["bytes_out"] == m["bytes_out_uncompressed"] > len(BIG)

    run(main())


def test_a_publication_over_the_servers_limit_is_refused_not_looped(
    make_server: Callable[..., Server],
) -> None:
    """A compressed publication over the server's MAX_MESSAGE_BYTES once inflated is
    answered MESSAGE_TOO_LARGE (the socket stays, as for a plain one: no reconnect and
    resend loop), and later, smaller publications still go compressed and are acked."""
    srv = make_server(WORKERS="1", MAX_MESSAGE_BYTES="3000")

    async def main() -> None:
        with WireTap(("127.0.0.1", srv.port)) as tap:
            async with AetherClient(
                tap.url(), token=srv.token("alice"), channels=["dz.limit"], **FAST
            ) as alice:
                with pytest.raises(AetherError) as refused:
                    await alice.publish("dz.limit", "y" * 5000)
                assert refused.value.code == "MESSAGE_TOO_LARGE"
                ack = await alice.publish("dz.limit", "z" * 2000)
                assert ack.offset == 1
            sent = [
                (len(m["data"]["content"]), z)
                for t in tap.snapshot()
                for m, z in zip(t.up, t.up_compressed, strict=True)
                if m.get("type") == "message"
            ]
            assert sent[-1] == (2000, True), sent

    run(main())


# -- a fake server for what a real one never sends -----------------------------------------


class FakeServer:
    """Accepts WebSocket upgrades on 127.0.0.1 and answers each with `answer` as its
    `Sec-WebSocket-Extensions` (None: no such header), then writes `frames` (raw bytes).
    Records the client's offers and the close code of each close frame it gets back."""

    def __init__(self, answer: str | None, frames: list[bytes]) -> None:
        self.answer = answer
        self.frames = frames
        self.offers: list[str | None] = []
        self.closes: list[int] = []
        self.pongs: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> FakeServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await asyncio.sleep(0)  # the handlers see their sockets closed

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/ws"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            headers = {}
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            self.offers.append(headers.get("sec-websocket-extensions"))
            accept = base64.b64encode(
                hashlib.sha1(
                    (headers["sec-websocket-key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()
                ).digest()
            ).decode()
            response = (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
            )
            if self.answer is not None:
                response += f"Sec-WebSocket-Extensions: {self.answer}\r\n"
            writer.write((response + "\r\n").encode() + b"".join(self.frames))
            while True:  # the client's frames: keep the close codes
                b0, b1 = await reader.readexactly(2)
                n = b1 & 0x7F
                if n == 126:
                    (n,) = struct.unpack("!H", await reader.readexactly(2))
                elif n == 127:
                    (n,) = struct.unpack("!Q", await reader.readexactly(8))
                key = await reader.readexactly(4) if b1 & 0x80 else b"\0\0\0\0"
                data = bytes(b ^ key[i % 4] for i, b in enumerate(await reader.readexactly(n)))
                if b0 & 0x0F == Op.CLOSE and len(data) >= 2:
                    self.closes.append(struct.unpack("!H", data[:2])[0])
                elif b0 & 0x0F == Op.PONG:
                    self.pongs.append(data)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def deflated(text: str, compressor: Any = None) -> bytes:
    """`text` as one permessage-deflate message body (RFC 7692 §7.2.1)."""
    z = compressor or zlib.compressobj(9, zlib.DEFLATED, -15)
    out: bytes = z.compress(text.encode()) + z.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def server_frame(payload: bytes, rsv1: bool = False) -> bytes:
    return build_frame(Op.TEXT, payload, rsv=4 if rsv1 else 0, mask=False)


async def errors_from(fake: FakeServer, **kw: Any) -> tuple[list[AetherError], AetherClient]:
    """A client against `fake` until it reported an error; the errors and the client."""
    errors: list[AetherError] = []
    client = AetherClient(fake.url, token="t", on_error=errors.append, backoff_initial=30, **kw)
    task = asyncio.ensure_future(client.connect())
    await until(lambda: bool(errors))
    await client.close()
    with pytest.raises(AetherError):
        await task
    return errors, client


@pytest.mark.parametrize(
    ("compression", "answer", "why"),
    [
        (True, "x-webkit-deflate-frame", "did not offer"),
        (True, "permessage-deflate; server_no_context_takeover; foo", "unknown"),
        (True, "permessage-deflate; server_max_window_bits=7", "8..15"),
        (True, "permessage-deflate; server_max_window_bits", "8..15"),
        (True, "permessage-deflate; client_no_context_takeover=1", "takes no value"),
        (True, "permessage-deflate; server_max_window_bits=9; server_max_window_bits=9", "twice"),
        (True, "permessage-deflate, permessage-deflate", "more than one"),
        (False, "permessage-deflate", "did not offer"),
    ],
)
def test_an_answer_the_client_did_not_allow_fails_the_handshake(
    compression: bool, answer: str, why: str
) -> None:
    async def main() -> None:
        async with FakeServer(answer, []) as fake:
            errors, client = await errors_from(fake, compression=compression)
            assert fake.offers[0] == (
                "permessage-deflate; client_max_window_bits" if compression else None
            )
            assert errors[0].code == "EXTENSION_REFUSED" and why in errors[0].message, errors
            assert client.deflate is None and client.state == "closed"

    run(main())


def test_a_zip_bomb_inflates_no_further_than_the_bound() -> None:
    """A ~250 KB frame that inflates to 256 MiB: the client inflates at most
    max_message_bytes (+1) of it, closes with 1009 and delivers nothing; its peak memory
    grows by far less than the bomb."""
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b"\0" * (1 << 20)
    bomb = b"".join(z.compress(chunk) for _ in range(256)) + z.flush(zlib.Z_SYNC_FLUSH)
    frame = server_frame(bomb[:-4], rsv1=True)
    assert len(frame) < 400_000

    async def main() -> None:
        got: list[dict[str, Any]] = []
        async with FakeServer("permessage-deflate; server_no_context_takeover", [frame]) as fake:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
            errors, _ = await errors_from(fake, max_message_bytes=1 << 20, on_system=got.append)
            grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
            assert fake.closes == [1009]
            assert errors[0].code == "INBOUND_TOO_LARGE" and "once inflated" in errors[0].message
            assert got == []
            assert grown < 64 * 1024, f"peak memory grew by {grown} KiB"

    run(main())


#: what the fake server sends -> (its extension answer, its frames, the client's close code,
#: the error code the client reports)
HOSTILE: dict[str, tuple[str | None, bytes, int, str]] = {
    "rsv1 without deflate": (
        None,
        server_frame(deflated(BIG), rsv1=True),
        1002,
        "PROTOCOL_ERROR",
    ),
    "not deflate data": (
        "permessage-deflate",
        server_frame(b"\xff\xfe not deflate", rsv1=True),
        1007,
        "PROTOCOL_ERROR",
    ),
    "rsv1 on a ping": (
        "permessage-deflate",
        build_frame(Op.PING, b"", rsv=4, mask=False),
        1002,
        "PROTOCOL_ERROR",
    ),
    "rsv1 on a continuation": (
        "permessage-deflate",
        build_frame(Op.TEXT, deflated(BIG)[:50], fin=False, rsv=4, mask=False)
        + build_frame(Op.CONT, deflated(BIG)[50:], rsv=4, mask=False),
        1002,
        "PROTOCOL_ERROR",
    ),
    "rsv2": ("permessage-deflate", build_frame(Op.TEXT, b"{}", rsv=2, mask=False), 1002, ""),
    "plain message over the bound": (
        None,
        build_frame(Op.TEXT, b"x" * 200_000, fin=False, mask=False)
        + build_frame(Op.CONT, b"x" * 200_000, mask=False),
        1009,
        "INBOUND_TOO_LARGE",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_frames_close_the_socket(case: str) -> None:
    answer, frame, close_code, error = HOSTILE[case]

    async def main() -> None:
        async with FakeServer(answer, [frame]) as fake:
            errors, _ = await errors_from(fake, max_message_bytes=256 * 1024)
            assert fake.closes == [close_code]
            assert errors[0].details["close_code"] == close_code, errors
            assert errors[0].code == (error or "PROTOCOL_ERROR"), errors

    run(main())


def test_inflating_keeps_the_window_when_the_server_does() -> None:
    """Without server_no_context_takeover the server's second message may refer back to its
    first (here it is little more than one back-reference): one inflater spans them."""
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    notices = [{"type": "system", "action": "broadcast", "data": {"text": BIG}}] * 2
    frames = [server_frame(deflated(json.dumps(n), z), rsv1=True) for n in notices]
    assert len(frames[1]) < 100 < len(frames[0])
    frames.append(build_frame(Op.PING, b"still there?", mask=False))

    async def main() -> None:
        async with FakeServer("permessage-deflate", frames) as fake:
            got: list[dict[str, Any]] = []
            client = AetherClient(fake.url, token="t", on_system=got.append, backoff_initial=30)
            task = asyncio.ensure_future(client.connect())
            await until(lambda: len(got) == 2)
            assert got == notices
            assert client.deflate == Deflate(False, False, 15, 15)
            await until(lambda: fake.pongs == [b"still there?"])  # the client answers pings
            await client.close()
            with pytest.raises(AetherError):
                await task

    run(main())


def test_a_fragmented_binary_message_is_ignored_whole() -> None:
    """Binary is not part of the protocol: the client ignores such a message, continuation
    frames and all (a plain one whose last frame is a whole notice, a compressed one), and
    its pieces never join the text message after it (nor its RSV1)."""
    notice = {"type": "system", "action": "broadcast", "data": {"text": "after"}}
    stray = json.dumps({"type": "system", "action": "broadcast", "data": {"text": "stray"}})
    frames = [
        build_frame(Op.BINARY, b"", fin=False, mask=False),
        build_frame(Op.CONT, stray.encode(), mask=False),
        build_frame(Op.BINARY, deflated(stray)[:10], fin=False, rsv=4, mask=False),
        build_frame(Op.CONT, deflated(stray)[10:], mask=False),
        server_frame(json.dumps(notice).encode()),
        build_frame(Op.PING, b"still there?", mask=False),
    ]

    async def main() -> None:
        async with FakeServer("permessage-deflate", frames) as fake:
            got: list[dict[str, Any]] = []
            client = AetherClient(fake.url, token="t", on_system=got.append, backoff_initial=30)
            task = asyncio.ensure_future(client.connect())
            await until(lambda: fake.pongs == [b"still there?"])
            assert got == [notice]
            assert fake.closes == []
            await client.close()
            with pytest.raises(AetherError):
                await task

    run(main())
