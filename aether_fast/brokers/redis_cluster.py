"""The cluster of workers meeting in Redis (`cluster.Cluster`): the cluster table, its
heartbeat, and the channel configs every worker shares.

The cluster table: every second each worker writes its figures (connections, connection
counts per limit key, per-channel member counts) under keys that expire after
`WORKER_TTL_S`, and reads everyone else's. Limits that span workers
(RATE_LIMIT_CONNECTIONS, a channel's max_connections) use those figures, so they are exact
on one worker and at most a second stale across workers; a dead worker's counts vanish
with its keys. The same heartbeat drops a command connection that Redis stopped answering
and opens it again (`redis_link.RedisLink`), so the health comes back without traffic.

Channel configs live in the hash `aether:channels`, with a local copy that every worker
refreshes when told on `aether:config` (watched on the link's subscriber, read again in
full after the subscriber was lost). `stores/redis.py` reads and writes them through the
public methods below (`config`, `configs`, `put_config`, `delete_config`).

All of it has one home: with shards (a BROKER_URL list, `redis_shards.py`) the link it is
given is the first shard's in canonical order, and this state lives on no other shard
(every node must list the same shards). While the home is down the configs cannot change
(writes raise BrokerUnavailable) and the other workers' figures stay as last read; the
other shards' channels work on. With a Redis Cluster (`redis_slots.py`) its keys carry one
hash tag (`aether:{aether}:...`, the `prefix`), and its link is `redis_slots.StateHome`.

The Redis broker asks it whether the sender of a publication is here (`local_session`);
the bound worker (`bind`, by `app.wire`) answers that and the rest of `ClusterEvents`.
Everything goes through redis-py's pool of the link; the link is opened by the broker, so
`start` comes after the broker's and `close` before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import orjson
from redis.exceptions import RedisError

from aether_fast.brokers.base import BrokerUnavailable
from aether_fast.brokers.redis_link import PREFIX, RedisLink
from aether_fast.events import ClusterEvents
from aether_fast.stores.base import ChannelConfig

CONFIG_CHANNEL = PREFIX + "config"
CHANNELS_HASH = PREFIX + "channels"
#: Suffix of a worker's hash of connection counts by limit key (`u:<sub>` or `ip:<peer>`,
#: node.limit_key). Earlier builds wrote `:conns`, keyed by the bare sub: during a rolling
#: upgrade old and new workers do not read each other's counts (docs/operations.md §14), so
#: none mistakes a key of the other format for one of its own.
CONNS_SUFFIX = ":limit_conns"
WORKER_TTL_S = 5


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Home(Protocol):
    """What the cluster uses of its link: a `RedisLink` (one Redis, or the home shard), or
    `redis_slots.StateHome` in Redis Cluster mode."""

    @property
    def redis(self) -> Any: ...

    def watch(
        self, channel: str, on_message: Callable[[bytes], None], on_resubscribed: Callable[[], None]
    ) -> None: ...

    def drop_stalled(self) -> None: ...

    async def commands(self) -> Any: ...

    def degraded(self, exc: BaseException, part: str = "commands") -> None: ...

    def recovered(self, part: str) -> None: ...


class RedisCluster:
    def __init__(
        self, link: Home | RedisLink, *, node_id: str | None = None, prefix: str = PREFIX
    ) -> None:
        self._link: Home = link
        #: the keys of the cluster-wide state: `aether:...`, or `aether:{aether}:...` in Redis
        #: Cluster mode (one hash slot, so its MULTI and multi-key reads stay valid)
        self._channels_hash = prefix + "channels"  # CHANNELS_HASH with the default prefix
        self._workers_zset = prefix + "workers"
        self._prefix = prefix
        self.node_id = node_id or socket.gethostname()
        self.worker_id = f"{self.node_id}:{os.getpid()}:{secrets.token_hex(3)}"
        self._tasks: list[asyncio.Task[None]] = []
        self._remote: dict[str, dict[str, Any]] = {}
        self._configs: dict[str, ChannelConfig] = {}
        #: the bound worker's `ClusterEvents` (set by `bind`), held as bound methods; the
        #: broker's subscriber calls `local_session` for each publication it receives
        self.local_session: Callable[[str | None, str], Any] = lambda u, c: None
        self.on_config: Callable[[str, ChannelConfig | None], None] = lambda n, c: None
        self.local_figures: Callable[[], dict[str, Any]] = dict
        # subscribed to config changes before the configs are read (`start`): none is missed
        link.watch(CONFIG_CHANNEL, self._config_changed, self._config_resubscribed)

    def bind(self, node: ClusterEvents) -> None:
        self.local_session = node.local_session
        self.on_config = node.on_config_change
        self.local_figures = node.local_figures

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the channel configs and start the heartbeat (the link is open: the broker
        started it, and its subscriber hears config changes already)."""
        await self._load_configs()
        self._tasks.append(asyncio.get_running_loop().create_task(self._heartbeat_forever()))

    async def close(self) -> None:
        """Stop the heartbeat and leave the cluster table at once (the keys would expire)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            await self._link.redis.zrem(self._workers_zset, self.worker_id)
            await self._link.redis.delete(*self._worker_keys())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    # -- the cluster table -----------------------------------------------------------------

    def _worker_keys(self) -> list[str]:
        base = f"{self._prefix}worker:{self.worker_id}"
        return [base, base + CONNS_SUFFIX, base + ":members"]

    async def _heartbeat_forever(self) -> None:
        link = self._link
        me = asyncio.current_task()
        while True:
            # first: when Redis hangs the heartbeat below fails, and the publishes waiting on
            # the command connection must be failed all the same
            link.drop_stalled()
            try:
                await self._heartbeat()
                await link.commands()
                link.recovered("commands")
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                link.degraded(exc)
            if me is not None and me.cancelling():
                # redis-py may finish a pipeline it was cancelled in and swallow the
                # cancellation: `close` would wait for this loop forever
                raise asyncio.CancelledError
            await asyncio.sleep(1.0)

    async def _heartbeat(self) -> None:
        figures = self.local_figures()
        stats, conns, members = self._worker_keys()
        now = time.time()
        redis = self._link.redis
        async with redis.pipeline(transaction=True) as pipe:
            pipe.delete(stats, conns, members)
            pipe.hset(stats, mapping={"stats": orjson.dumps(figures.get("stats", {}))})
            if figures.get("conns"):
                pipe.hset(conns, mapping=figures["conns"])
            if figures.get("members"):
                pipe.hset(members, mapping=figures["members"])
            for key in (stats, conns, members):
                pipe.expire(key, WORKER_TTL_S)
            pipe.zadd(self._workers_zset, {self.worker_id: now})
            pipe.zremrangebyscore(self._workers_zset, 0, now - WORKER_TTL_S)
            pipe.zrange(self._workers_zset, 0, -1)
            results = await pipe.execute()
        others = [w.decode() for w in results[-1]]
        others = [w for w in others if w != self.worker_id]
        remote: dict[str, dict[str, Any]] = {}
        async with redis.pipeline(transaction=False) as pipe:
            for wid in others:
                base = f"{self._prefix}worker:{wid}"
                pipe.hget(base, "stats")
                pipe.hgetall(base + CONNS_SUFFIX)
                pipe.hgetall(base + ":members")
            answers = await pipe.execute()
        for i, wid in enumerate(others):
            raw_stats, raw_conns, raw_members = answers[3 * i : 3 * i + 3]
            if raw_stats is None:
                continue
            remote[wid] = {
                "stats": orjson.loads(raw_stats),
                "conns": {k.decode(): int(v) for k, v in raw_conns.items()},
                "members": {k.decode(): int(v) for k, v in raw_members.items()},
            }
        self._remote = remote

    def remote_connections(self, key: str) -> int:
        return sum(w["conns"].get(key, 0) for w in self._remote.values())

    def remote_members(self, channel: str) -> int:
        return sum(w["members"].get(channel, 0) for w in self._remote.values())

    def remote_table(self) -> dict[str, dict[str, Any]]:
        """The latest figures of every other live worker, by worker id."""
        return self._remote

    # -- channel configs: the shared hash and this worker's copy ---------------------------

    def config(self, name: str) -> ChannelConfig | None:
        """Channel `name`'s config, from the local copy."""
        return self._configs.get(name)

    def configs(self) -> list[ChannelConfig]:
        """Every config, sorted by name, from the local copy."""
        return [self._configs[n] for n in sorted(self._configs)]

    async def put_config(self, cfg: ChannelConfig) -> bool:
        """Store `cfg` in Redis and tell every worker (True: created). BrokerUnavailable when
        Redis did not confirm it."""
        redis = self._link.redis
        try:
            raw = orjson.dumps(cfg.to_json())
            created = bool(await redis.hset(self._channels_hash, cfg.name, raw))
            self._configs[cfg.name] = cfg
            await redis.publish(CONFIG_CHANNEL, cfg.name)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"channel config not stored: {exc}") from exc
        return created

    async def delete_config(self, name: str) -> bool:
        """Delete `name`'s config in Redis and tell every worker (True: it existed).
        BrokerUnavailable when Redis did not confirm it."""
        redis = self._link.redis
        try:
            existed = bool(await redis.hdel(self._channels_hash, name))
            self._configs.pop(name, None)
            await redis.publish(CONFIG_CHANNEL, name)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"channel config not deleted: {exc}") from exc
        return existed

    def _config_changed(self, data: bytes) -> None:
        """A message on `aether:config`: the name of a config another worker changed."""
        self._spawn(self._reload_config(data.decode()))

    def _config_resubscribed(self) -> None:
        """The subscriber is back after a loss: changes made meanwhile were missed."""
        self._spawn(self._refresh_configs())

    async def _load_configs(self) -> None:
        raw = await self._link.redis.hgetall(self._channels_hash)
        self._configs = {_text(k): ChannelConfig(**orjson.loads(v)) for k, v in raw.items()}

    async def _refresh_configs(self) -> None:
        """Read every config again and apply those that changed (again a second later, until
        Redis answers)."""
        before = self._configs
        while True:
            try:
                await self._load_configs()
                break
            except (RedisError, OSError):
                await asyncio.sleep(1.0)
        for name in set(before) | set(self._configs):
            if before.get(name) != self._configs.get(name):
                self.on_config(name, self._configs.get(name))

    async def _reload_config(self, name: str) -> None:
        raw = await self._link.redis.hget(self._channels_hash, name)
        cfg = ChannelConfig(**orjson.loads(raw)) if raw is not None else None
        if cfg is None:
            self._configs.pop(name, None)
        else:
            self._configs[name] = cfg
        self.on_config(name, cfg)
