"""Peer: a straightforward picows + orjson pub/sub server (the way picows' docs show it).

Each connection joins the channel named by the `channel` query parameter of its URL (other
parameters are ignored). Every text message is parsed with orjson, re-serialized and sent to
every member of the sender's channel with `WSTransport.send` (one send per member).

Run: python picows_app.py PORT
"""

from __future__ import annotations

import sys
from urllib.parse import parse_qs, urlsplit

import orjson
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

CHANNELS: dict[str, set[WSTransport]] = {}


def channel_of(path: bytes) -> str:
    query = parse_qs(urlsplit(path.decode("latin-1")).query)
    return query.get("channel", ["default"])[-1]


class Member(WSListener):
    def __init__(self, channel: str) -> None:
        super().__init__()
        self.channel = channel
        self.members = CHANNELS.setdefault(channel, set())

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.members.add(transport)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.members.discard(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            out = orjson.dumps(orjson.loads(frame.get_payload_as_bytes()))
            for member in self.members:
                member.send(WSMsgType.TEXT, out)
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()


async def main(port: int) -> None:
    def listener_factory(request: WSUpgradeRequest) -> Member:
        return Member(channel_of(request.path))

    server = await ws_create_server(listener_factory, "127.0.0.1", port, backlog=4096)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
