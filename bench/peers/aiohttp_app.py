"""Peer: aiohttp's WebSocket server (`web.WebSocketResponse`).

Each connection joins the channel named by the `channel` query parameter of its URL (any
path). Every text message is parsed with orjson, re-serialized once, and sent with
`send_str` to every member of the sender's channel.

Run: python aiohttp_app.py PORT
"""

from __future__ import annotations

import sys

import orjson
import uvloop
from aiohttp import WSMsgType, web

CHANNELS: dict[str, set[web.WebSocketResponse]] = {}


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(compress=False, max_msg_size=2**20)
    await ws.prepare(request)
    members = CHANNELS.setdefault(request.query.get("channel", "default"), set())
    members.add(ws)
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                out = orjson.dumps(orjson.loads(msg.data)).decode()
                for member in list(members):
                    if not member.closed:
                        await member.send_str(out)
    finally:
        members.discard(ws)
    return ws


def main(port: int) -> None:
    app = web.Application()
    app.router.add_get("/{tail:.*}", websocket_handler)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, backlog=4096)


if __name__ == "__main__":
    uvloop.install()
    main(int(sys.argv[1]))
