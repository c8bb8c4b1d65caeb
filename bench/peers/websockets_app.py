"""Peer: the `websockets` library (asyncio API) with its `broadcast()` helper.

Each connection joins the channel named by the `channel` query parameter of its URL. Every
text message is parsed with orjson, re-serialized and handed to `websockets.broadcast` for
every member of the sender's channel (bytes sent as text, as its docs advise for JSON).

Run: python websockets_app.py PORT
"""

from __future__ import annotations

import sys
from urllib.parse import parse_qs, urlsplit

import orjson
import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve

CHANNELS: dict[str, set[ServerConnection]] = {}


async def handler(websocket: ServerConnection) -> None:
    path = websocket.request.path if websocket.request is not None else "/"
    channel = parse_qs(urlsplit(path).query).get("channel", ["default"])[-1]
    members = CHANNELS.setdefault(channel, set())
    members.add(websocket)
    try:
        async for message in websocket:
            if isinstance(message, str):
                broadcast(members, orjson.dumps(orjson.loads(message)), text=True)
    finally:
        members.discard(websocket)


async def main(port: int) -> None:
    async with serve(
        handler, "127.0.0.1", port, compression=None, max_size=2**20, backlog=4096
    ) as server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
