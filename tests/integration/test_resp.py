"""brokers/resp.py against a real redis-server: replies matched to commands in order,
errors that do not stop the connection, a lost connection failing what waits, AUTH with a
user and SELECT from the URL, and the subscriber mode."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from aether_fast.brokers import resp
from tests.integration.redis_fixture import RedisServer, db_of


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_replies_come_back_in_order_and_an_error_stops_nothing(redis_url: str) -> None:
    async def main() -> None:
        conn = await resp.connect(redis_url)
        first = [conn.call("INCR", "resp:n") for _ in range(200)]
        bad = conn.call("NOSUCHCOMMAND", "x")
        noscript = conn.call("EVALSHA", "0" * 40, 0)
        after = conn.call("INCR", "resp:n")
        assert await asyncio.gather(*first) == list(range(1, 201))
        with pytest.raises(ResponseError, match="unknown command"):
            await bad
        with pytest.raises(NoScriptError):
            await noscript
        assert await after == 201
        got: list[tuple[Any, BaseException | None]] = []
        conn.request(lambda reply, exc: got.append((reply, exc)), "GET", "resp:n")
        conn.request(lambda reply, exc: got.append((reply, exc)), "HGET", "resp:n", "f")
        assert await conn.call("PING") == b"PONG"
        assert got[0] == (b"201", None)
        assert got[1][0] is None and isinstance(got[1][1], ResponseError)  # WRONGTYPE
        conn.abort()
        await conn.closed

    run(main())


def test_a_lost_connection_fails_every_waiting_command(
    redis_url: str, redis_server: RedisServer
) -> None:
    async def main() -> None:
        conn = await resp.connect(redis_url)
        await conn.call("CLIENT", "SETNAME", "resp-victim")
        blocked = conn.call("BLPOP", "resp:nothing", 0)  # waits until the connection dies
        handled: list[BaseException | None] = []
        conn.request(lambda _reply, exc: handled.append(exc), "PING")
        with redis_server.client() as admin:
            for c in admin.client_list():
                if c.get("name") == "resp-victim":
                    admin.client_kill_filter(_id=c["id"])
        with pytest.raises(RedisConnectionError, match="connection lost"):
            await blocked
        await asyncio.wait_for(conn.closed, 5)
        assert isinstance(handled[0], RedisConnectionError)
        assert not conn.connected
        with pytest.raises(RedisConnectionError, match="not connected"):
            conn.call("PING")

    run(main())


def test_url_user_password_and_database(redis_url: str, redis_server: RedisServer) -> None:
    db = db_of(redis_url)
    with redis_server.client() as admin:
        admin.acl_setuser(
            "resp-user", enabled=True, passwords=["+s3cret"], keys=["~*"], commands=["+@all"]
        )
    url = f"redis://resp-user:s3cret@127.0.0.1:{redis_server.port}/{db}"
    wrong = f"redis://resp-user:nope@127.0.0.1:{redis_server.port}/{db}"

    async def main() -> None:
        conn = await resp.connect(url)
        assert await conn.call("SET", "resp:who", "me") == b"OK"
        assert await conn.call("ACL", "WHOAMI") == b"resp-user"
        conn.abort()
        with pytest.raises(ResponseError):
            await resp.connect(wrong)

    run(main())
    with redis_server.client(db) as r:
        assert r.get("resp:who") == b"me"  # SELECT took the URL's database
    with pytest.raises(RedisConnectionError):  # nothing listens on port 1
        run(resp.connect("redis://127.0.0.1:1/0", timeout=1.0))


def test_subscriber_gets_every_push_in_order(redis_url: str, redis_server: RedisServer) -> None:
    async def main() -> None:
        pushes: list[Any] = []
        sub = await resp.connect(redis_url, pushes.append)
        sub.send("SUBSCRIBE", "resp:a", "resp:b")
        for _ in range(100):
            if len(pushes) == 2:
                break
            await asyncio.sleep(0.01)
        with redis_server.client() as r:
            for i in range(50):
                r.publish("resp:a" if i % 2 else "resp:b", str(i))
        for _ in range(200):
            if len(pushes) == 52:
                break
            await asyncio.sleep(0.01)
        assert pushes[:2] == [[b"subscribe", b"resp:a", 1], [b"subscribe", b"resp:b", 2]]
        assert [p[2] for p in pushes[2:]] == [str(i).encode() for i in range(50)]
        sub.abort()

    run(main())
