"""The write floor: a bare picows server that only writes pre-built frames.

No JSON, no validation, no per-member work per message. A text message from a member becomes
one unmasked server frame (header + the received payload), appended to its channel's batch;
once per loop pass each channel's batch is joined into one bytes object and written to every
member with one write each, straight to the underlying transport. That is the least a Python
server on this event loop can do per delivery, so aether-fast's distance to it is its own
overhead.

Run: python write_floor.py PORT
"""

from __future__ import annotations

import asyncio
import struct
import sys
from urllib.parse import parse_qs, urlsplit

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server


class Channel:
    __slots__ = ("batch", "members")

    def __init__(self) -> None:
        self.members: dict[WSTransport, asyncio.Transport] = {}
        self.batch: list[bytes] = []


CHANNELS: dict[str, Channel] = {}
DIRTY: list[Channel] = []


def frame_for(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x81, n) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


def flush() -> None:
    dirty = DIRTY[:]
    DIRTY.clear()
    for channel in dirty:
        data = b"".join(channel.batch)
        channel.batch.clear()
        for raw in channel.members.values():
            raw.write(data)


class Member(WSListener):
    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self.channel = channel

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.channel.members[transport] = transport.underlying_transport

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.channel.members.pop(transport, None)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            channel = self.channel
            if not channel.batch:
                if not DIRTY:
                    asyncio.get_running_loop().call_soon(flush)
                DIRTY.append(channel)
            channel.batch.append(frame_for(frame.get_payload_as_bytes()))
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()


async def main(port: int) -> None:
    def listener_factory(request: WSUpgradeRequest) -> Member:
        query = parse_qs(urlsplit(request.path.decode("latin-1")).query)
        name = query.get("channel", ["default"])[-1]
        channel = CHANNELS.get(name)
        if channel is None:
            channel = CHANNELS[name] = Channel()
        return Member(channel)

    server = await ws_create_server(
        listener_factory,
        "127.0.0.1",
        port,
        read_buffer_init_size=2048,
        use_aiofastnet=False,
        backlog=4096,
    )
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
