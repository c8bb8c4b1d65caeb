"""A bounded connection flood for the abuse tests: opens N WebSocket connections to
127.0.0.1:PORT/ws as fast as it can, prints {"open": n, "refused_503": n, "failed": n} as
one JSON line, holds the open ones until stdin closes (or HOLD seconds), then exits."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys


async def one(port: int, i: int, held: list[asyncio.StreamWriter], counts: dict[str, int]) -> None:
    src = f"127.0.0.{2 + i // 25000}"
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0)), 30
        )
    except (OSError, TimeoutError):
        counts["failed"] += 1
        return
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        counts["failed"] += 1
        writer.close()
        return
    if head.startswith(b"HTTP/1.1 101"):
        counts["open"] += 1
        held.append(writer)
    elif head.startswith(b"HTTP/1.1 503"):
        counts["refused_503"] += 1
        writer.close()
    else:
        counts["failed"] += 1
        writer.close()


async def main() -> None:
    port, n, hold = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    counts = {"open": 0, "refused_503": 0, "failed": 0}
    held: list[asyncio.StreamWriter] = []
    for start in range(0, n, 500):
        await asyncio.gather(
            *(one(port, i, held, counts) for i in range(start, min(n, start + 500)))
        )
    print(json.dumps(counts), flush=True)
    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    await asyncio.wait([stdin_closed], timeout=hold)
    for w in held:
        w.close()
    os._exit(0)


asyncio.run(main())
