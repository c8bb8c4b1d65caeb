"""Peer: socketify (uWebSockets) with uWS' own pub/sub (`subscribe` / `app.publish`).

Each connection subscribes to the topic named by the `channel` query parameter of its URL,
taken in the upgrade handler. Every text message is parsed with orjson, re-serialized and
published to the topic, which uWS sends to every subscriber (the sender included).

With `--compress` it offers permessage-deflate with uWS' shared compressor
(`CompressOptions.SHARED_COMPRESSOR`: one deflate stream for the whole loop, no context kept
between messages) and publishes with `compress=True`: a subscriber that negotiated it gets a
compressed frame, compressed for that subscriber (uWS compresses a publication once per
subscriber in this mode), the others the plain one.

Run: python socketify_app.py PORT [--compress]
"""

from __future__ import annotations

import sys
from typing import Any

import orjson
from socketify import App, AppListenOptions, CompressOptions, OpCode

app = App()


def upgrade(res: Any, req: Any, socket_context: Any) -> None:
    key = req.get_header("sec-websocket-key")
    protocol = req.get_header("sec-websocket-protocol")
    extensions = req.get_header("sec-websocket-extensions")
    channel = req.get_query("channel") or "default"
    res.upgrade(key, protocol, extensions, socket_context, channel)


def ws_open(ws: Any) -> None:
    ws.subscribe(ws.get_user_data())


COMPRESS = "--compress" in sys.argv[2:]


def ws_message(ws: Any, message: str | bytes, opcode: OpCode) -> None:
    if opcode == OpCode.TEXT:
        body = orjson.dumps(orjson.loads(message))
        app.publish(ws.get_user_data(), body, OpCode.TEXT, COMPRESS)


def main(port: int) -> None:
    app.ws(
        "/*",
        {
            "compression": (
                CompressOptions.SHARED_COMPRESSOR if COMPRESS else CompressOptions.DISABLED
            ),
            "max_payload_length": 2**20,
            "idle_timeout": 120,
            "max_backpressure": 2**20,
            "upgrade": upgrade,
            "open": ws_open,
            "message": ws_message,
        },
    )
    app.listen(AppListenOptions(port=port, host="127.0.0.1"), lambda config: None)
    app.run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
