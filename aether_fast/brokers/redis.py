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
  recovering with the old one get `recovered: false`;
- every key of a channel has a TTL, refreshed by each publish (the meta key by each join
  too): a channel nobody uses leaves nothing behind after CHANNEL_STATE_TTL_S, and its
  next use starts a new epoch, as after a flush.

The cluster table: every second each worker writes its figures (connections, connection
counts per limit key, per-channel member counts) under keys that expire after
`WORKER_TTL_S`, and reads everyone else's. Limits that span workers
(RATE_LIMIT_CONNECTIONS, a channel's max_connections) use those figures, so they are exact
on one worker and at most a second stale across workers; a dead worker's counts vanish
with its keys.

Channel configs live in the hash `aether:channels`, with a local copy that every worker
refreshes when told on `aether:config`.

Two clients: the per-message traffic (publishes, positions, the subscriber) runs on two
lean connections of `resp.py`; everything else (the cluster table, configs, deletes) on
redis-py's pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import hiredis
import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from aether_fast import logs
from aether_fast._core import encode_text_frame, publication_halves, utc_timestamp
from aether_fast.brokers import resp
from aether_fast.brokers.base import (
    BROKER_UNAVAILABLE,
    DEDUP_WINDOW,
    BrokerUnavailable,
    PublishResult,
    Recovery,
    new_epoch,
)
from aether_fast.events import ClusterEvents
from aether_fast.stores.base import ChannelConfig

PREFIX = "aether:"
PUB = PREFIX + "pub:"
PUB_B = PUB.encode()
CONFIG_CHANNEL = PREFIX + "config"
CONFIG_CHANNEL_B = CONFIG_CHANNEL.encode()
CHANNELS_HASH = PREFIX + "channels"
WORKERS_ZSET = PREFIX + "workers"
#: Suffix of a worker's hash of connection counts by limit key (`u:<sub>` or `ip:<peer>`,
#: node.limit_key). Earlier builds wrote `:conns`, keyed by the bare sub: during a rolling
#: upgrade old and new workers do not read each other's counts (docs/operations.md §14), so
#: none mistakes a key of the other format for one of its own.
CONNS_SUFFIX = ":limit_conns"
WORKER_TTL_S = 5
#: Connections to Redis per worker (a caller waits for a free one rather than failing).
POOL_SIZE = 32
#: A command unanswered this long means Redis hangs: the connection is dropped.
STALL_S = 5.0
#: Publishes per script call at most (a script blocks Redis while it runs).
BATCH_MAX = 64

#: (keys + args of one message, the future its sender waits on)
Pending = tuple[list[Any], "asyncio.Future[PublishResult]"]


# One call publishes a batch (every publish of one loop pass, up to BATCH_MAX): Redis spends
# ~25 µs setting up each script call, more than the commands themselves.
# KEYS, 3 per message: meta (hash: seq, epoch), hist (stream), dedupe (slot -> "seq|offset|ts")
# ARGV, 12 per message: sequence, history size, history ttl ms, dedupe ttl ms, pubsub channel,
#   sender, json head, json tail, new epoch, timestamp, dedupe slot (sequence mod the window),
#   channel state ttl ms (meta)
# Returns {seen, duplicate} per message, seen = "offset|timestamp". Eight commands a message
# at most: each costs Redis CPU, and Redis is shared by every worker. Every key written gets
# its TTL here (see `RedisBroker` for why the meta key outlives the others).
_PUBLISH = """
local out = {}
for i = 0, #KEYS / 3 - 1 do
  local meta, hist, dedupe = KEYS[i * 3 + 1], KEYS[i * 3 + 2], KEYS[i * 3 + 3]
  local a = i * 12
  local seq, slot = ARGV[a + 1], ARGV[a + 11]
  local held = redis.call('HGET', dedupe, slot)
  local bar = held and string.find(held, '|', 1, true)
  if bar and string.sub(held, 1, bar - 1) == seq then
    out[i + 1] = {string.sub(held, bar + 1), 1}
  else
    local offset = redis.call('HINCRBY', meta, 'seq', 1)
    if offset == 1 and redis.call('HSETNX', meta, 'epoch', ARGV[a + 9]) == 1 then
      redis.call('DEL', hist)  -- a new epoch (first publish, or Redis lost the channel)
    end
    redis.call('PEXPIRE', meta, ARGV[a + 12])
    local payload = ARGV[a + 7] .. offset .. ARGV[a + 8]
    local size = tonumber(ARGV[a + 2])
    if size > 0 then
      redis.call('XADD', hist, 'MAXLEN', size, offset .. '-1', 'p', payload)
      redis.call('PEXPIRE', hist, ARGV[a + 3])
    end
    local seen = offset .. '|' .. ARGV[a + 10]
    redis.call('HSET', dedupe, slot, seq .. '|' .. seen)
    redis.call('PEXPIRE', dedupe, ARGV[a + 4])
    redis.call('PUBLISH', ARGV[a + 5], ARGV[a + 6] .. '\\n' .. offset .. '\\n' .. payload)
    out[i + 1] = {seen, 0}
  end
end
return out
"""

# KEYS: meta, hist   ARGV: since (-1: none), new epoch, channel state ttl ms
# A join (or a read of the position) keeps the meta key alive like a publish does.
_POSITION = """
local meta = redis.call('HMGET', KEYS[1], 'seq', 'epoch')
local epoch = meta[2]
local offset = tonumber(meta[1] or '0')
if not epoch then
  epoch = ARGV[2]
  offset = 0
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('HSET', KEYS[1], 'seq', 0, 'epoch', epoch)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local since = tonumber(ARGV[1])
local entries = {}
if since >= 0 and since < offset then
  entries = redis.call('XRANGE', KEYS[2], (since + 1) .. '-1', '+')
end
return {offset, epoch, entries}
"""


_PUBLISH_SHA = hashlib.sha1(_PUBLISH.encode()).hexdigest()
_POSITION_SHA = hashlib.sha1(_POSITION.encode()).hexdigest()


def _keys(channel: str) -> tuple[str, str]:
    """The channel's meta hash (offset, epoch) and history stream; one hash slot."""
    base = f"{PREFIX}ch:{{{channel}}}:"
    return base + "meta", base + "hist"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def sender_key(identity: str | None, client_id: str) -> str:
    """A sender in Redis (dedupe keys, the pubsub messages): its Session.identity and
    client_id. client_id has no \\x1f, so the last one splits them."""
    return f"{identity or ''}\x1f{client_id}"


class RedisBroker:
    name = "redis"

    def __init__(
        self,
        hub: Any,
        url: str,
        *,
        history_ttl_s: float,
        dedup_ttl_s: float,
        channel_state_ttl_s: float = 86400,
        node_id: str | None = None,
    ) -> None:
        self._hub = hub
        self._url = url
        self._dedup_ttl_ms = max(1000, int(dedup_ttl_s * 1000))
        # Every key of a channel expires (nothing a join or publish leaves is kept forever).
        # The meta key (offset, epoch) lives longest: once it is gone, the next join or
        # publish starts a new epoch, which clients see as "history lost" — so it must not
        # go before the history it numbers, nor before a dedupe record that names one of its
        # offsets. History with HISTORY_TTL_S=0 ("no expiry") lives as long as the meta key.
        self._state_ttl_ms = max(
            int(channel_state_ttl_s * 1000), int(history_ttl_s * 1000), self._dedup_ttl_ms
        )
        self._history_ttl_ms = int(history_ttl_s * 1000) or self._state_ttl_ms
        self.node_id = node_id or socket.gethostname()
        self.worker_id = f"{self.node_id}:{os.getpid()}:{secrets.token_hex(3)}"
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=POOL_SIZE, timeout=5, socket_timeout=5
        )
        self._redis: aioredis.Redis = aioredis.Redis.from_pool(pool)
        #: publishes and positions, in the order they are made (see resp.py)
        self._cmd: resp.RespConnection | None = None
        self._cmd_lock = asyncio.Lock()
        self._cmd_retry_at = 0.0
        #: publishes of this loop pass, sent together by `_send_batch`
        self._batch: list[Pending] = []
        #: batches waiting for the command connection; while any wait, later ones queue
        #: behind them (the lock alone cannot say so: it is free before its next waiter runs)
        self._parked = 0
        #: the subscriber connection; None while it is being reconnected
        self._sub: resp.RespConnection | None = None
        self._subscribed: set[str] = set()
        self._confirm: dict[str, asyncio.Future[None]] = {}
        #: resolved when Redis confirms the subscription to config changes (at start)
        self._config_heard: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: what is broken, by part ("commands", "pubsub"): healthy only when both work
        self._faults: dict[str, str] = {"commands": "redis: not connected yet"}
        self._remote: dict[str, dict[str, Any]] = {}
        self._configs: dict[str, ChannelConfig] = {}
        #: the bound worker's `ClusterEvents` (set by `bind`), held as bound methods
        self.local_session: Callable[[str | None, str], Any] = lambda u, c: None
        self.on_config: Callable[[str, ChannelConfig | None], None] = lambda n, c: None
        self.local_figures: Callable[[], dict[str, Any]] = dict

    def bind(self, node: ClusterEvents) -> None:
        self.local_session = node.local_session
        self.on_config = node.on_config_change
        self.local_figures = node.local_figures

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (raises if Redis cannot be reached at start-up), load the channel
        configs, and start the subscriber and the heartbeat."""
        await self._redis.ping()
        self._cmd = await self._open_commands()
        # subscribed to config changes before the configs are read: none is missed
        self._config_heard = asyncio.get_running_loop().create_future()
        self._sub = await self._open_subscriber()
        try:
            await asyncio.wait_for(self._config_heard, STALL_S)
        except TimeoutError as exc:
            raise RedisConnectionError("redis: SUBSCRIBE was not confirmed") from exc
        await self._load_configs()
        self._faults.clear()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._subscriber_forever()),
            loop.create_task(self._heartbeat_forever()),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            await self._redis.zrem(WORKERS_ZSET, self.worker_id)
            await self._redis.delete(*self._worker_keys())
        for conn in (self._cmd, self._sub):
            if conn is not None:
                conn.abort()
        await self._redis.aclose()

    def health(self) -> tuple[str, str]:
        if self._faults:
            return ("degraded", BROKER_UNAVAILABLE)
        return ("healthy", "")

    def _degraded(self, exc: BaseException, part: str = "commands") -> None:
        """`part` fails: the full text goes to the log, once per change of it (not per
        retry, nor per request); /health shows only the reason code."""
        reason = f"redis: {exc.__class__.__name__}: {exc}"
        if self._faults.get(part) != reason:
            logs.log("error", "broker_degraded", "broker", part=part, reason=reason)
        self._faults[part] = reason

    def _recovered(self, part: str) -> None:
        """`part` works again. The subscriber counts apart from commands: until it is back,
        publications for this worker's members would be lost, so it is not healthy yet."""
        if self._faults.pop(part, None) is not None and not self._faults:
            logs.log("info", "broker_recovered", "broker")

    # -- publish ---------------------------------------------------------------------------

    def publish(
        self, channel: Any, sender: Any, sequence: int, content: str
    ) -> asyncio.Future[PublishResult]:
        name: str = channel.name
        ts = utc_timestamp()
        head, tail = publication_halves(
            name, content, sequence, ts, sender.client_id, sender.user_id
        )
        meta_key, hist_key = _keys(name)
        who = sender_key(sender.identity, sender.client_id)
        call = [
            meta_key,
            hist_key,
            f"{PREFIX}dedupe:{{{name}}}:{who}",
            sequence,
            channel.config.history_size,
            self._history_ttl_ms,
            self._dedup_ttl_ms,
            PUB + name,
            who,
            head,
            tail,
            new_epoch(),
            ts,
            sequence % DEDUP_WINDOW,
            self._state_ttl_ms,
        ]
        loop = asyncio.get_running_loop()
        done: asyncio.Future[PublishResult] = loop.create_future()
        if not self._batch:
            loop.call_soon(self._send_batch)
        self._batch.append((call, done))
        return done

    def _send_batch(self) -> None:
        """Send this loop pass's publishes, in the order they were made. While the command
        connection reconnects they wait on its lock, behind the batches before them."""
        batch, self._batch = self._batch, []
        conn = self._usable_now()
        if conn is None:
            self._parked += 1
            self._spawn(self._send_when_connected(batch))
            return
        for start in range(0, len(batch), BATCH_MAX):
            self._run_batch(conn, batch[start : start + BATCH_MAX], "EVALSHA")

    async def _send_when_connected(self, batch: list[Pending]) -> None:
        try:
            conn = await self._commands()
        except (RedisError, OSError) as exc:
            self._published(batch, "EVAL", None, exc)
            return
        except BaseException:  # cancelled (the broker is closing)
            self._published(batch, "EVAL", None, RedisConnectionError("the broker is closing"))
            raise
        finally:
            self._parked -= 1
        for start in range(0, len(batch), BATCH_MAX):
            self._run_batch(conn, batch[start : start + BATCH_MAX], "EVALSHA")

    def _run_batch(self, conn: resp.RespConnection, batch: list[Pending], how: str) -> None:
        keys = [key for call, _ in batch for key in call[:3]]
        args = [arg for call, _ in batch for arg in call[3:]]
        script = _PUBLISH_SHA if how == "EVALSHA" else _PUBLISH
        handler = partial(self._published, batch, how)
        try:
            conn.request(handler, how, script, len(keys), *keys, *args)
        except RedisError as exc:
            handler(None, exc)

    def _published(
        self, batch: list[Pending], how: str, reply: Any, exc: BaseException | None
    ) -> None:
        """The publish script's answer: each future gets (offset, timestamp, duplicate), or
        BrokerUnavailable when Redis did not confirm it (never a false ack)."""
        if exc is None:
            for (_, done), (seen, duplicate) in zip(batch, reply, strict=True):
                if not done.done():
                    offset, _, stamp = seen.decode().partition("|")
                    done.set_result((int(offset), stamp, bool(duplicate)))
            return
        if isinstance(exc, NoScriptError) and how == "EVALSHA" and self._cmd is not None:
            # SCRIPT FLUSH since this connection loaded it: send the script itself, once
            self._run_batch(self._cmd, batch, "EVAL")
            return
        self._degraded(exc)
        for _, done in batch:
            if not done.done():
                failure = BrokerUnavailable("broker unavailable: the message was not published")
                failure.__cause__ = exc
                done.set_exception(failure)

    async def _script(self, script: str, sha: str, numkeys: int, args: list[Any]) -> Any:
        """Run a Lua script on the command connection. Calls are written in the order they
        are made (while it reconnects, they queue on the lock in that order too), and Redis
        runs them in that order: a sender's messages get offsets in the order it sent
        them, and a burst goes out in one write."""
        conn = self._usable_now() or await self._commands()
        try:
            return await conn.call("EVALSHA", sha, numkeys, *args)
        except NoScriptError:  # SCRIPT FLUSH since this connection loaded it
            return await (await self._commands()).call("EVAL", script, numkeys, *args)

    def _usable_now(self) -> resp.RespConnection | None:
        """The command connection, if a call may be written on it now: connected, and no
        earlier call still waiting for it (to go after them is to keep the order)."""
        conn = self._cmd
        if conn is None or not conn.connected or self._parked or self._cmd_lock.locked():
            return None
        return conn

    async def _commands(self) -> resp.RespConnection:
        """The command connection, opened again if it was lost. While Redis is down, one
        attempt per half second: the calls in between fail at once."""
        async with self._cmd_lock:
            if self._cmd is not None and self._cmd.connected:
                return self._cmd
            if time.monotonic() < self._cmd_retry_at:
                raise RedisConnectionError("redis: not connected (reconnecting)")
            try:
                self._cmd = await self._open_commands()
            except (RedisError, OSError):
                self._cmd_retry_at = time.monotonic() + 0.5
                raise
            return self._cmd

    async def _open_commands(self) -> resp.RespConnection:
        conn = await resp.connect(self._url, timeout=STALL_S)
        try:
            async with asyncio.timeout(STALL_S):  # the lock is held meanwhile
                for script in (_PUBLISH, _POSITION):
                    await conn.call("SCRIPT", "LOAD", script)
        except BaseException as exc:
            conn.abort()
            if isinstance(exc, TimeoutError):
                raise RedisConnectionError("redis: SCRIPT LOAD was not answered") from exc
            raise
        return conn

    # -- positions and recovery ------------------------------------------------------------

    async def recover(self, channel: str, since: int | None, epoch: str | None) -> Recovery:
        await self._subscribe(channel)
        since_arg = -1 if since is None else since
        try:
            offset, current, entries = await self._script(
                _POSITION,
                _POSITION_SHA,
                2,
                [*_keys(channel), since_arg, new_epoch(), self._state_ttl_ms],
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
        try:
            offset, epoch, _ = await self._script(
                _POSITION, _POSITION_SHA, 2, [*_keys(channel), -1, new_epoch(), self._state_ttl_ms]
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
                sub = self._sub
                if sub is None:
                    raise RedisConnectionError("redis: the subscriber is reconnecting")
                waiter = self._confirm[channel] = asyncio.get_running_loop().create_future()
                sub.send("SUBSCRIBE", PUB + channel)
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
            # a later join sends SUBSCRIBE after this, and Redis answers in that order
            if self._sub is not None:
                with contextlib.suppress(RedisError):
                    self._sub.send("UNSUBSCRIBE", *(PUB + c for c in idle))

    async def _open_subscriber(self) -> resp.RespConnection:
        """Connect the subscriber and subscribe again to everything this worker wants. It is
        healthy again when Redis confirms the first of them (see `_on_push`)."""
        sub = await resp.connect(self._url, self._on_push)
        wanted = self._subscribed | set(self._confirm)
        self._subscribed.clear()
        sub.send("SUBSCRIBE", CONFIG_CHANNEL, *(PUB + c for c in wanted))
        return sub

    async def _subscriber_forever(self) -> None:
        backoff = 0.1
        opened = time.monotonic()
        while True:
            if self._sub is not None:
                await self._sub.closed
                self._sub = None
                self._degraded(
                    RedisConnectionError("redis: the subscriber was disconnected"), "pubsub"
                )
                if time.monotonic() - opened < 5.0:  # dropped at once (maxclients, a proxy)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                else:
                    backoff = 0.1
            try:
                self._sub = await self._open_subscriber()
                opened = time.monotonic()
            except (RedisError, OSError) as exc:
                self._degraded(exc, "pubsub")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _on_push(self, reply: Any) -> None:
        """Everything Redis sends the subscriber, in the order it sends it."""
        if isinstance(reply, hiredis.ReplyError):  # e.g. max clients: this connection is no use
            self._degraded(RedisConnectionError(f"redis: {reply}"), "pubsub")
            if self._sub is not None:
                self._sub.abort()
            return
        try:
            kind = reply[0]
            if kind == b"message":
                self._on_message(reply[1], reply[2])
            elif kind == b"subscribe":
                target: bytes = reply[1]
                if target == CONFIG_CHANNEL_B:
                    if self._config_heard is None or self._config_heard.done():
                        # subscribed again after a loss: changes made meanwhile were missed
                        self._spawn(self._refresh_configs())
                    else:
                        self._config_heard.set_result(None)
                    self._recovered("pubsub")
                elif target.startswith(PUB_B):
                    channel = target[len(PUB_B) :].decode()
                    self._subscribed.add(channel)
                    waiter = self._confirm.pop(channel, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
        except Exception as exc:  # a bad message must not stop the subscriber
            logs.log("error", "pubsub_message_failed", "broker", error=repr(exc))

    def _on_message(self, target: bytes, data: bytes) -> None:
        if target == CONFIG_CHANNEL_B:
            self._spawn(self._reload_config(data.decode()))
            return
        ch = self._hub.channel(target[len(PUB_B) :].decode())
        if ch is None:
            return
        sender, _, rest = data.partition(b"\n")
        offset, _, payload = rest.partition(b"\n")
        identity, _, client = sender.decode().rpartition("\x1f")
        origin = self.local_session(identity or None, client)
        exclude = origin if origin is not None and not origin.echo else None
        self._hub.deliver(ch, encode_text_frame(payload), exclude, int(offset))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    # -- the cluster table -----------------------------------------------------------------

    def _worker_keys(self) -> list[str]:
        base = f"{PREFIX}worker:{self.worker_id}"
        return [base, base + CONNS_SUFFIX, base + ":members"]

    async def _heartbeat_forever(self) -> None:
        while True:
            # first: when Redis hangs the heartbeat below fails, and the publishes waiting on
            # the command connection must be failed all the same
            if self._cmd is not None and self._cmd.stalled(STALL_S):
                self._cmd.abort()
            try:
                await self._heartbeat()
                await self._commands()
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

    # -- channel configs -------------------------------------------------------------------

    async def _load_configs(self) -> None:
        raw = await self._redis.hgetall(CHANNELS_HASH)
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
