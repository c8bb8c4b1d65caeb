"""The Redis broker: more workers and more machines sharing one Redis server.

It keeps every guarantee of `base.Broker` across the cluster:
- offsets, the epoch, history and the dedupe window live in Redis and are changed by one Lua
  script per publish, atomically: offset assigned, history appended (a capped stream), the
  sequence remembered, the publication PUBLISHed. A publish that Redis did not confirm
  raises, so the sender gets an error, never a false ack;
- each worker SUBSCRIBEs only to the channels its members joined, and waits for Redis to
  confirm the subscription before it reads a joining member's position, so nothing published
  in between is missed; Redis delivers one channel's publications in PUBLISH order;
- a flushed Redis has no epoch key: the next publish or join writes a new epoch, and clients
  recovering with the old one get `recovered: false`.

The cluster table: every second each worker writes its figures (connections, per-user
connection counts, per-channel member counts) under keys that expire after
`WORKER_TTL_S`, and reads everyone else's. Limits that span workers
(RATE_LIMIT_CONNECTIONS, a channel's max_connections) use those figures, so they are exact
on one worker and at most a second stale across workers; a dead worker's counts vanish
with its keys.

Channel configs live in the hash `aether:channels`, with a local copy that every worker
refreshes when told on `aether:config`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from aether_fast import logs
from aether_fast._core import encode_text_frame, utc_timestamp
from aether_fast.brokers.base import BrokerUnavailable, PublishResult, Recovery
from aether_fast.brokers.memory import DEDUP_WINDOW
from aether_fast.store import ChannelConfig

PREFIX = "aether:"
PUB = PREFIX + "pub:"
CONFIG_CHANNEL = PREFIX + "config"
CHANNELS_HASH = PREFIX + "channels"
WORKERS_ZSET = PREFIX + "workers"
WORKER_TTL_S = 5
#: Connections to Redis per worker (a caller waits for a free one rather than failing).
POOL_SIZE = 32


def _epoch_prelude(new_epoch_arg: int) -> str:
    """Lua shared by the scripts (KEYS: seq, epoch, hist): the channel's epoch, or a new one
    from ARGV[new_epoch_arg] when Redis lost it, with the offsets and history reset."""
    return f"""
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[{new_epoch_arg}]
  redis.call('SET', KEYS[2], epoch)
  redis.call('DEL', KEYS[1], KEYS[3])
end"""


# KEYS: seq, epoch, hist, dedupe hash, dedupe list
# ARGV: sequence, history size, history ttl ms, dedupe ttl ms, pubsub channel, sender,
#       json head, json tail, new epoch, timestamp, dedupe window
_PUBLISH = (
    _epoch_prelude(9)
    + """
local prev = redis.call('HGET', KEYS[4], ARGV[1])
if prev then
  return {prev, epoch, 1}
end
local offset = redis.call('INCR', KEYS[1])
local payload = ARGV[7] .. offset .. ARGV[8]
local size = tonumber(ARGV[2])
if size > 0 then
  redis.call('XADD', KEYS[3], 'MAXLEN', size, offset .. '-1', 'p', payload)
  if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', KEYS[3], ARGV[3]) end
end
local seen = offset .. '|' .. ARGV[10]
redis.call('HSET', KEYS[4], ARGV[1], seen)
redis.call('RPUSH', KEYS[5], ARGV[1])
if redis.call('LLEN', KEYS[5]) > tonumber(ARGV[11]) then
  redis.call('HDEL', KEYS[4], redis.call('LPOP', KEYS[5]))
end
redis.call('PEXPIRE', KEYS[4], ARGV[4])
redis.call('PEXPIRE', KEYS[5], ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[6] .. '\\n' .. offset .. '\\n' .. payload)
return {seen, epoch, 0}
"""
)

# KEYS: seq, epoch, hist   ARGV: since (-1: none), new epoch
_POSITION = (
    _epoch_prelude(2)
    + """
local offset = tonumber(redis.call('GET', KEYS[1]) or '0')
local since = tonumber(ARGV[1])
local entries = {}
if since >= 0 and since < offset then
  entries = redis.call('XRANGE', KEYS[3], (since + 1) .. '-1', '+')
end
return {offset, epoch, entries}
"""
)


def _keys(channel: str) -> tuple[str, str, str]:
    base = f"{PREFIX}ch:{{{channel}}}:"
    return base + "seq", base + "epoch", base + "hist"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def sender_key(user_id: str | None, client_id: str) -> str:
    return f"{user_id or ''}\x1f{client_id}"


class RedisBroker:
    name = "redis"

    def __init__(
        self,
        hub: Any,
        url: str,
        *,
        history_ttl_s: float,
        dedup_ttl_s: float,
        node_id: str | None = None,
    ) -> None:
        self._hub = hub
        self._url = url
        self._history_ttl_ms = int(history_ttl_s * 1000)
        self._dedup_ttl_ms = max(1000, int(dedup_ttl_s * 1000))
        self.node_id = node_id or socket.gethostname()
        self.worker_id = f"{self.node_id}:{os.getpid()}:{secrets.token_hex(3)}"
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=POOL_SIZE, timeout=5, socket_timeout=5
        )
        self._redis: aioredis.Redis = aioredis.Redis.from_pool(pool)
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=False)
        self._publish = self._redis.register_script(_PUBLISH)
        self._position = self._redis.register_script(_POSITION)
        self._subscribed: set[str] = set()
        self._confirm: dict[str, asyncio.Future[None]] = {}
        #: publishes waiting for the pipeline, in the order they were made
        self._outbox: list[tuple[list[Any], asyncio.Future[Any]]] = []
        self._draining = False
        self._tasks: list[asyncio.Task[None]] = []
        #: what is broken, by part ("commands", "pubsub"): healthy only when both work
        self._faults: dict[str, str] = {"commands": "redis: not connected yet"}
        self._remote: dict[str, dict[str, Any]] = {}
        self._configs: dict[str, ChannelConfig] = {}
        #: set by the Node: local_session(user_id, client_id) and apply_config(cfg)
        self.local_session: Callable[[str | None, str], Any] = lambda u, c: None
        self.on_config: Callable[[str, ChannelConfig | None], None] = lambda n, c: None
        self.local_figures: Callable[[], dict[str, Any]] = dict

    def bind(self, node: Any) -> None:
        self.local_session = node.local_session
        self.on_config = node.on_config_change
        self.local_figures = node.local_figures

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (raises if Redis cannot be reached at start-up), load the channel
        configs, and start the subscriber and the heartbeat."""
        await self._redis.ping()
        await self._load_configs()
        await self._pubsub.subscribe(CONFIG_CHANNEL)
        self._faults.clear()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen_forever()),
            loop.create_task(self._heartbeat_forever()),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            await self._redis.zrem(WORKERS_ZSET, self.worker_id)
            await self._redis.delete(*self._worker_keys())
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self._redis.aclose()

    def health(self) -> tuple[str, str]:
        for reason in self._faults.values():
            return ("degraded", reason)
        return ("healthy", "")

    def _degraded(self, exc: BaseException, part: str = "commands") -> None:
        reason = f"redis: {exc.__class__.__name__}: {exc}"
        if not self._faults:
            logs.log("error", "broker_degraded", "broker", reason=reason)
        self._faults[part] = reason

    def _recovered(self, part: str) -> None:
        """`part` works again. The subscriber counts apart from commands: until it is back,
        publications for this worker's members would be lost, so it is not healthy yet."""
        if self._faults.pop(part, None) is not None and not self._faults:
            logs.log("info", "broker_recovered", "broker")

    # -- publish ---------------------------------------------------------------------------

    async def publish(
        self, channel: Any, sender: Any, sequence: int, content: str
    ) -> PublishResult:
        name: str = channel.name
        ts = utc_timestamp()
        head = b'{"type":"message","action":"send","data":{"metadata":{"offset":'
        tail = (
            b',"sequence":'
            + orjson.dumps(sequence)
            + b',"timestamp":'
            + orjson.dumps(ts)
            + b',"client_id":'
            + orjson.dumps(sender.client_id)
            + b',"user_id":'
            + orjson.dumps(sender.user_id)
            + b'},"channel":'
            + orjson.dumps(name)
            + b',"content":'
            + orjson.dumps(content)
            + b"}}"
        )
        seq_key, epoch_key, hist_key = _keys(name)
        dedupe = f"{PREFIX}dedupe:{{{name}}}:{sender_key(sender.user_id, sender.client_id)}"
        call = [
            seq_key,
            epoch_key,
            hist_key,
            dedupe,
            dedupe + ":order",
            sequence,
            channel.config.history_size,
            self._history_ttl_ms,
            self._dedup_ttl_ms,
            PUB + name,
            sender_key(sender.user_id, sender.client_id),
            head,
            tail,
            secrets.token_hex(4),
            ts,
            DEDUP_WINDOW,
        ]
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._outbox.append((call, done))
        if not self._draining:
            self._draining = True
            self._spawn(self._drain_outbox())
        try:
            seen, _epoch, duplicate = await done
        except (RedisError, OSError) as exc:
            self._degraded(exc)
            raise BrokerUnavailable("broker unavailable: the message was not published") from exc
        offset, _, stamp = seen.decode().partition("|")
        return (int(offset), stamp, bool(duplicate))

    async def _drain_outbox(self) -> None:
        """Run the queued publishes as pipelines, one at a time and in the order they were
        made: a sender's messages get offsets in the order it sent them (concurrent calls
        on a pool of connections would reach Redis in any order), and a burst needs one
        connection and one round trip instead of one each."""
        batch: list[tuple[list[Any], asyncio.Future[Any]]] = []
        try:
            while self._outbox:
                batch, self._outbox = self._outbox, []
                try:
                    results = await self._run_publishes([call for call, _ in batch])
                except (RedisError, OSError) as exc:
                    results = [exc] * len(batch)
                for (_, done), result in zip(batch, results, strict=True):
                    if done.done():
                        continue
                    if isinstance(result, BaseException):
                        done.set_exception(result)
                    else:
                        done.set_result(result)
                batch = []
        finally:
            self._draining = False
            # only when cancelled (the broker is closing): nobody would answer these
            for _, done in [*batch, *self._outbox]:
                if not done.done():
                    done.set_exception(RedisConnectionError("the broker is closing"))
            self._outbox = []

    async def _run_publishes(self, calls: list[list[Any]]) -> list[Any]:
        sha = self._publish.sha
        async with self._redis.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(sha, 5, *call)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            # a restarted Redis has forgotten the script: load it, run those again in order
            await self._redis.script_load(_PUBLISH)
            async with self._redis.pipeline(transaction=False) as pipe:
                for i in missing:
                    pipe.evalsha(sha, 5, *calls[i])
                again = await pipe.execute(raise_on_error=False)
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    # -- positions and recovery ------------------------------------------------------------

    async def recover(self, channel: str, since: int | None, epoch: str | None) -> Recovery:
        await self._subscribe(channel)
        seq_key, epoch_key, hist_key = _keys(channel)
        try:
            offset, current, entries = await self._position(
                keys=[seq_key, epoch_key, hist_key],
                args=[-1 if since is None else since, secrets.token_hex(4)],
            )
        except (RedisError, OSError) as exc:
            self._degraded(exc)
            raise
        current_epoch = current.decode()
        offset = int(offset)
        if since is None or (epoch is not None and epoch != current_epoch):
            return Recovery([], offset, current_epoch, False)
        if since >= offset:
            return Recovery([], offset, current_epoch, since == offset)
        frames = [encode_text_frame(fields[1]) for _id, fields in entries]
        first = int(entries[0][0].split(b"-")[0]) if entries else 0
        complete = len(frames) == offset - since and first == since + 1
        return Recovery(frames if complete else [], offset, current_epoch, complete)

    async def position(self, channel: str) -> tuple[int, str]:
        seq_key, epoch_key, hist_key = _keys(channel)
        try:
            offset, epoch, _ = await self._position(
                keys=[seq_key, epoch_key, hist_key], args=[-1, secrets.token_hex(4)]
            )
        except (RedisError, OSError) as exc:
            self._degraded(exc)
            raise BrokerUnavailable(f"channel position not read: {exc}") from exc
        return (int(offset), epoch.decode())

    async def forget(self, channel: str) -> None:
        try:
            await self._redis.delete(*_keys(channel))
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"channel history not deleted: {exc}") from exc

    # -- subscriptions ---------------------------------------------------------------------

    async def _subscribe(self, channel: str) -> None:
        """Subscribe to `channel` and wait until Redis confirms it. An attempt that failed
        or was never confirmed is forgotten, so the next join asks again."""
        if channel in self._subscribed:
            return
        waiter = self._confirm.get(channel)
        try:
            if waiter is None:
                waiter = self._confirm[channel] = asyncio.get_running_loop().create_future()
                await self._pubsub.subscribe(PUB + channel)
            await asyncio.wait_for(asyncio.shield(waiter), 5)
        except (RedisError, OSError, TimeoutError) as exc:
            if waiter is not None and self._confirm.get(channel) is waiter:
                del self._confirm[channel]
                if not waiter.done():
                    waiter.set_exception(exc)  # the joins waiting on it fail now, too
                    waiter.exception()  # retrieved: no "never retrieved" warning
            raise

    def sweep(self) -> None:
        """Unsubscribe from channels that no longer have a member on this worker."""
        idle = [
            c
            for c in self._subscribed
            if self._hub.channel(c) is None or self._hub.channel(c).member_count == 0
        ]
        if idle:
            self._subscribed.difference_update(idle)
            self._spawn(self._unsubscribe(idle))

    async def _unsubscribe(self, channels: list[str]) -> None:
        # a join may have asked for one of them again since `sweep` chose them
        still_idle = [c for c in channels if c not in self._subscribed and c not in self._confirm]
        if still_idle:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.unsubscribe(*(PUB + c for c in still_idle))

    async def _listen_forever(self) -> None:
        backoff = 0.1
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
                self._recovered("pubsub")
                if message is not None:
                    self._on_message(message)
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._degraded(exc, "pubsub")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                await self._resubscribe()
            except Exception as exc:  # a bad message must not stop the subscriber
                logs.log("error", "pubsub_message_failed", "broker", error=repr(exc))

    async def _resubscribe(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            channels = [PUB + c for c in self._subscribed] + [CONFIG_CHANNEL]
            self._subscribed.clear()
            await self._pubsub.subscribe(*channels)

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        target: bytes = message["channel"]
        if kind == b"subscribe" or kind == "subscribe":
            name = target.decode()
            if name.startswith(PUB):
                channel = name[len(PUB) :]
                self._subscribed.add(channel)
                waiter = self._confirm.pop(channel, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            return
        if kind != "message" and kind != b"message":
            return
        data: bytes = message["data"]
        if target == CONFIG_CHANNEL.encode():
            self._spawn(self._reload_config(data.decode()))
            return
        name = target.decode()[len(PUB) :]
        ch = self._hub.channel(name)
        if ch is None:
            return
        sender, _, rest = data.partition(b"\n")
        offset, _, payload = rest.partition(b"\n")
        user, _, client = sender.decode().partition("\x1f")
        origin = self.local_session(user or None, client)
        exclude = origin if origin is not None and not origin.echo else None
        self._hub.deliver(ch, encode_text_frame(payload), exclude, int(offset))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    # -- the cluster table -----------------------------------------------------------------

    def _worker_keys(self) -> list[str]:
        base = f"{PREFIX}worker:{self.worker_id}"
        return [base, base + ":conns", base + ":members"]

    async def _heartbeat_forever(self) -> None:
        while True:
            try:
                await self._heartbeat()
                self._recovered("commands")
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._degraded(exc)
            await asyncio.sleep(1.0)

    async def _heartbeat(self) -> None:
        figures = self.local_figures()
        stats, conns, members = self._worker_keys()
        now = time.time()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(stats, conns, members)
            pipe.hset(stats, mapping={"stats": orjson.dumps(figures.get("stats", {}))})
            if figures.get("conns"):
                pipe.hset(conns, mapping=figures["conns"])
            if figures.get("members"):
                pipe.hset(members, mapping=figures["members"])
            for key in (stats, conns, members):
                pipe.expire(key, WORKER_TTL_S)
            pipe.zadd(WORKERS_ZSET, {self.worker_id: now})
            pipe.zremrangebyscore(WORKERS_ZSET, 0, now - WORKER_TTL_S)
            pipe.zrange(WORKERS_ZSET, 0, -1)
            results = await pipe.execute()
        others = [w.decode() for w in results[-1]]
        others = [w for w in others if w != self.worker_id]
        remote: dict[str, dict[str, Any]] = {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for wid in others:
                base = f"{PREFIX}worker:{wid}"
                pipe.hget(base, "stats")
                pipe.hgetall(base + ":conns")
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

    # -- channel configs -------------------------------------------------------------------

    async def _load_configs(self) -> None:
        raw = await self._redis.hgetall(CHANNELS_HASH)
        self._configs = {_text(k): ChannelConfig(**orjson.loads(v)) for k, v in raw.items()}

    async def _reload_config(self, name: str) -> None:
        raw = await self._redis.hget(CHANNELS_HASH, name)
        cfg = ChannelConfig(**orjson.loads(raw)) if raw is not None else None
        if cfg is None:
            self._configs.pop(name, None)
        else:
            self._configs[name] = cfg
        self.on_config(name, cfg)


class RedisChannelStore:
    """Channel configs in Redis: reads from the local copy, writes to Redis and announced
    to every worker on `aether:config`."""

    def __init__(self, broker: RedisBroker) -> None:
        self._broker = broker

    def open(self) -> None:
        return None

    def close(self) -> None:
        return None

    def get(self, name: str) -> ChannelConfig | None:
        return self._broker._configs.get(name)

    def list(self) -> list[ChannelConfig]:
        return [self._broker._configs[n] for n in sorted(self._broker._configs)]

    async def put(self, cfg: ChannelConfig) -> bool:
        r = self._broker._redis
        try:
            created = bool(await r.hset(CHANNELS_HASH, cfg.name, orjson.dumps(cfg.to_json())))
            self._broker._configs[cfg.name] = cfg
            await r.publish(CONFIG_CHANNEL, cfg.name)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"channel config not stored: {exc}") from exc
        return created

    async def delete(self, name: str) -> bool:
        r = self._broker._redis
        try:
            existed = bool(await r.hdel(CHANNELS_HASH, name))
            self._broker._configs.pop(name, None)
            await r.publish(CONFIG_CHANNEL, name)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"channel config not deleted: {exc}") from exc
        return existed
