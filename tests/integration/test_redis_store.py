"""stores/redis.py against a real redis-server: the channel store of workers meeting in Redis
works through the cluster's public interface alone (`RedisCluster.config`, `configs`,
`put_config`, `delete_config`, over the link's connections), with no broker in the process:
a write lands in the hash `aether:channels` and every other worker hears it through
`ClusterEvents.on_config_change`; reads come from the worker's copy; a write Redis does not
confirm raises BrokerUnavailable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest

from aether_fast._core import Session
from aether_fast.brokers.base import BrokerUnavailable
from aether_fast.brokers.redis_cluster import CHANNELS_HASH, RedisCluster
from aether_fast.brokers.redis_link import RedisLink
from aether_fast.stores.base import ChannelConfig
from aether_fast.stores.redis import RedisChannelStore
from tests.integration.redis_fixture import RedisServer, db_of

WAIT_S = 10.0  # generous: the machine is shared


def cfg(name: str, max_connections: int = 0) -> ChannelConfig:
    return ChannelConfig(
        name=name,
        max_connections=max_connections,
        message_rate_limit=0.0,
        require_auth=False,
        history_size=10,
        presence=True,
    )


class Events:
    """What a Node answers its cluster (`events.ClusterEvents`), recording config changes."""

    def __init__(self) -> None:
        self.changes: asyncio.Queue[tuple[str, ChannelConfig | None]] = asyncio.Queue()

    def local_session(self, identity: str | None, client_id: str) -> Session | None:
        return None

    def on_config_change(self, name: str, cfg: ChannelConfig | None) -> None:
        self.changes.put_nowait((name, cfg))

    def local_figures(self) -> dict[str, Any]:
        return {"stats": {"node": "test"}, "conns": {}, "members": {}}

    async def hear(self, name: str, cfg: ChannelConfig | None) -> None:
        """Wait until the cluster reports (name, cfg). A notice names the channel only: the
        worker reads the config then, so a notice may already carry a later write's value."""

        async def until() -> None:
            while await self.changes.get() != (name, cfg):
                pass

        await asyncio.wait_for(until(), WAIT_S)


@asynccontextmanager
async def worker(url: str) -> AsyncIterator[tuple[RedisChannelStore, Events]]:
    """One worker's store: a link (opened here, as the broker would) and its cluster."""
    link = RedisLink(url)
    cluster = RedisCluster(link, node_id="store-test")
    events = Events()
    cluster.bind(events)
    await link.start()
    await cluster.start()
    try:
        yield RedisChannelStore(cluster), events
    finally:
        # bounded: a heartbeat cancelled inside a redis-py pipeline once kept close waiting
        await asyncio.wait_for(cluster.close(), WAIT_S)
        await link.close()


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


def test_a_write_reaches_redis_and_every_worker(redis_url: str, redis_server: RedisServer) -> None:
    async def main() -> None:
        async with worker(redis_url) as (a, heard_by_a), worker(redis_url) as (b, heard_by_b):
            assert await a.put(cfg("news")) is True
            assert await a.put(cfg("news", 5)) is False  # an update
            assert a.get("news") == cfg("news", 5)  # the writer's copy, at once
            with redis_server.client(db_of(redis_url)) as r:
                stored = r.hget(CHANNELS_HASH, "news")
            assert stored is not None and orjson.loads(stored) == cfg("news", 5).to_json()

            # the other worker hears the writes and reads from its copy
            await heard_by_b.hear("news", cfg("news", 5))
            assert b.get("news") == cfg("news", 5)
            assert await b.put(cfg("alpha")) is True
            assert [c.name for c in b.list()] == ["alpha", "news"]
            await heard_by_a.hear("alpha", cfg("alpha"))
            assert a.list() == b.list()

            assert await a.delete("news") is True
            await heard_by_b.hear("news", None)
            assert b.get("news") is None and a.get("news") is None
            assert await b.delete("news") is False
            with redis_server.client(db_of(redis_url)) as r:
                assert r.hget(CHANNELS_HASH, "news") is None

    run(main)


def test_a_new_worker_reads_the_stored_configs_and_answers_from_its_copy(
    redis_url: str, redis_server: RedisServer
) -> None:
    async def main() -> None:
        async with worker(redis_url) as (a, _):
            await a.put(cfg("chat.room1", 3))
        async with worker(redis_url) as (b, _):
            assert b.list() == [cfg("chat.room1", 3)]
            # a change nobody announced is not seen: reads never go to Redis
            with redis_server.client(db_of(redis_url)) as r:
                r.hset(CHANNELS_HASH, "chat.room1", orjson.dumps(cfg("chat.room1", 9).to_json()))
            assert b.get("chat.room1") == cfg("chat.room1", 3)

    run(main)


def test_a_write_redis_does_not_confirm_raises_broker_unavailable() -> None:
    async def main() -> None:
        link = RedisLink("redis://127.0.0.1:1/0")  # nothing listens on port 1
        store = RedisChannelStore(RedisCluster(link))
        try:
            with pytest.raises(BrokerUnavailable, match="channel config not stored"):
                await store.put(cfg("news"))
            with pytest.raises(BrokerUnavailable, match="channel config not deleted"):
                await store.delete("news")
            assert store.get("news") is None and store.list() == []
        finally:
            await link.close()

    run(main)
