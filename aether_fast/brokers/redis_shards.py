"""The shards of the Redis broker: which Redis server holds a channel.

BROKER_URL may list several Redis servers, the shards. Everything of one channel lives on
one of them: its offset and epoch, its history, its dedupe windows and the pub/sub channel
of its publications (`redis.RedisBroker` sends each to the channel's link). Every node must
map a channel to the same shard, so:
- the shards are put in canonical order first, by the server and database each URL names
  (`config.shard_key`), never by the order of the list nor by credentials: nodes that list
  the same shards in any order agree. Every node must list the same shards;
- a channel's shard is the Jump consistent hash (Lamping & Veach, "A Fast, Minimal Memory,
  Consistent Hash Algorithm", 2014) of the 64-bit FNV-1a hash of its name's UTF-8 bytes,
  over the number of shards. Adding a shard moves about 1/(n+1) of the channels, each to the
  new shard; their history stays behind (a new epoch on the new one).

Cluster-wide state (the cluster table and its heartbeat, the per-user connection counts, the
channel configs and their change channel) has one home: the first shard in canonical order
(`home`), the only link `redis_cluster.RedisCluster` uses.

`Shards` is the router (channel -> link). Redis Cluster mode (`redis+cluster://`, channel ->
master by hash slot) is another router with its own broker: `redis_slots.py`. With one URL
there is one link and `index` answers 0 at once: no other connection, no other behaviour.

The cluster's heartbeat keeps the home's command connection alive (drops it when Redis
hangs, opens it again, says when it works); `start` runs the same, once a second, for each
other shard, so a shard that comes back is healthy again without traffic.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Final

from redis.exceptions import RedisError

from aether_fast.brokers.base import BROKER_SHARD_UNAVAILABLE, BROKER_UNAVAILABLE
from aether_fast.brokers.redis_link import RedisLink
from aether_fast.config import shard_key

_MASK64: Final = (1 << 64) - 1
_FNV_OFFSET: Final = 0xCBF29CE484222325
_FNV_PRIME: Final = 0x100000001B3
#: Channels whose shard is remembered (a dict lookup instead of hashing on each publish);
#: forgotten all at once past this many.
INDEX_CACHE: Final = 65536


def fnv1a_64(data: bytes) -> int:
    """The 64-bit FNV-1a hash of `data`."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & _MASK64
    return h


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash: the bucket in 0..buckets-1 of the 64-bit `key` (Lamping & Veach,
    2014). From n to n+1 buckets a key either stays or moves to bucket n."""
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & _MASK64
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return b


def canonical(urls: Sequence[str]) -> list[str]:
    """`urls` in canonical order (`config.shard_key`): the same for every node."""
    return sorted(urls, key=shard_key)


class Shards:
    """The links of BROKER_URL's Redis servers in canonical order, and which one holds a
    channel (see the module docstring)."""

    def __init__(self, urls: Sequence[str]) -> None:
        if not urls:
            raise ValueError("no Redis URL")
        ordered = canonical(urls)
        single = len(ordered) == 1
        #: one link per shard, in canonical order
        self.links: tuple[RedisLink, ...] = tuple(
            RedisLink(url, None if single else i) for i, url in enumerate(ordered)
        )
        #: the home of the cluster-wide state: the first shard
        self.home = self.links[0]
        self._single = single
        self._index: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def index(self, channel: str) -> int:
        """The place of `channel`'s shard in `links`."""
        if self._single:
            return 0
        shard = self._index.get(channel)
        if shard is None:
            if len(self._index) >= INDEX_CACHE:
                self._index.clear()
            shard = jump_hash(fnv1a_64(channel.encode()), len(self.links))
            self._index[channel] = shard
        return shard

    def link(self, channel: str) -> RedisLink:
        """The link of `channel`'s shard."""
        return self.links[self.index(channel)]

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open every link (raises if one cannot be reached: every shard must answer at
        start-up), then keep the shards other than the home alive."""
        try:
            for link in self.links:
                await link.start()
        except BaseException:
            for link in self.links:
                await link.close()
            raise
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._keep_alive(link)) for link in self.links[1:]]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for link in self.links:
            await link.close()

    async def _keep_alive(self, link: RedisLink) -> None:
        """What the cluster's heartbeat does for the home, for another shard, once a second:
        drop its command connection when Redis stopped answering, open it again when lost
        (publishes to its channels fail at once meanwhile), and say when it works again."""
        while True:
            link.drop_stalled()
            try:
                await link.commands()
                link.recovered("commands")
            except (RedisError, OSError) as exc:
                link.degraded(exc)
            await asyncio.sleep(1.0)

    # -- health ----------------------------------------------------------------------------

    def health(self) -> tuple[str, str]:
        """Healthy when every shard is; BROKER_UNAVAILABLE when none is (or the only one is
        not), BROKER_SHARD_UNAVAILABLE when some are not: their channels are refused, the
        others' work. Which shard, and why, is in the log (`broker_degraded`, `shard`)."""
        if self._single:
            return self.home.health()
        down = sum(1 for link in self.links if link.health()[0] != "healthy")
        if down == 0:
            return ("healthy", "")
        if down == len(self.links):
            return ("degraded", BROKER_UNAVAILABLE)
        return ("degraded", BROKER_SHARD_UNAVAILABLE)
