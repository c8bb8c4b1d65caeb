"""The connections one worker keeps to Redis, shared by the message log (`redis.py`) and
the cluster (`redis_cluster.py`): each of them calls this object's public methods, neither
reads the other's state.

- `redis`: redis-py's pool, for everything that is not per message (the cluster table, the
  channel configs, deletes);
- the command connection (`resp.py`): publishes and positions, in the order they are made.
  It is opened again on demand (`commands`: one attempt per half second while Redis is
  down), with the scripts it runs loaded at each connect; the cluster's heartbeat drops it
  when Redis stops answering (`drop_stalled`) and opens it again;
- the subscriber (`resp.py`): the channels a part watches for as long as the link lives
  (`watch`: the config changes) and the publication channels the broker subscribes to and
  drops (`subscribe`, `unsubscribe`). It is connected again forever, with a growing backoff,
  and everything wanted is subscribed again;
- health: what is broken, by part ("commands", "pubsub"); healthy only when both work. The
  text of a fault goes to the log once per change, /health shows only the reason code.

A link is one Redis server: with shards (a BROKER_URL list) each has its own link, named by
its place in the canonical order (`shard`, in its log lines), and `redis_shards.Shards`
says which link holds a channel. A Redis Cluster master's link (`node`, made by
`redis_slots.Slots`) subscribes sharded (SSUBSCRIBE, one channel per command) and reports a
subscription Redis dropped or refused because its slot moved (`on_lost`). The broker opens
the links (`start`, with its own start) and closes them (`close`); the cluster uses the
home's in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Set
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from aether_fast import logs
from aether_fast.brokers import resp
from aether_fast.brokers.base import BROKER_UNAVAILABLE
from aether_fast.config import shard_key

#: Every key and pub/sub channel of aether-fast in Redis starts with this.
PREFIX = "aether:"
#: Connections to Redis per worker (a caller waits for a free one rather than failing).
POOL_SIZE = 32
#: A command unanswered this long means Redis hangs: the connection is dropped.
STALL_S = 5.0


#: Errors a cluster node answers a sharded subscription with when the channel's slot is not
#: (or no longer) its own, or the subscription is not allowed (an ACL): the subscription is
#: lost, not the connection.
_SLOT_ERRORS = ("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN", "CROSSSLOT", "NOPERM")


class RedisLink:
    def __init__(self, url: str, shard: int | None = None, *, node: str | None = None) -> None:
        self.url = url
        #: this Redis's place among the shards (None: the only one); in its log lines, with
        #: the server it names (no credentials)
        self.shard = shard
        self._where: dict[str, object] = (
            {} if shard is None else {"shard": shard, "redis": shard_key(url)}
        )
        #: a Redis Cluster master (`redis_slots.Slots`, its "host:port"): the channels of
        #: `subscribe` are sharded (SSUBSCRIBE, one channel per command: each is in its own
        #: slot), and a slot that moves away drops their subscription (`on_lost`)
        self.node = node
        self._sharded = node is not None
        if node is not None:
            self._where = {"node": node}
        self._sub_cmd = "SSUBSCRIBE" if node is not None else "SUBSCRIBE"
        #: sharded: the channels sent with SSUBSCRIBE (True) or SUNSUBSCRIBE (False) and not
        #: yet answered, in order (an error reply names no channel: it answers the oldest;
        #: a node answers SUNSUBSCRIBE of a slot it lost with MOVED, too)
        self._sent: deque[tuple[bool, str]] = deque()
        #: sharded: where a subscription goes that Redis dropped or refused (its slot moved)
        self.on_lost: Callable[[str], None] = lambda channel: None
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=POOL_SIZE, timeout=5, socket_timeout=5
        )
        #: redis-py's pool: everything that is not per message
        self.redis: aioredis.Redis = aioredis.Redis.from_pool(pool)
        #: scripts loaded on the command connection at each connect (`load_scripts`)
        self._scripts: tuple[str, ...] = ()
        self._cmd: resp.RespConnection | None = None
        self._cmd_lock = asyncio.Lock()
        self._cmd_retry_at = 0.0
        #: the subscriber connection; None while it is being reconnected
        self._sub: resp.RespConnection | None = None
        #: channels subscribed with `subscribe` and confirmed, and those waiting for Redis
        self._subscribed: set[str] = set()
        self._confirm: dict[str, asyncio.Future[None]] = {}
        #: channels subscribed with `watch`: (on_message, on_resubscribed) by channel
        self._watched: dict[bytes, tuple[Callable[[bytes], None], Callable[[], None]]] = {}
        #: where the messages of the channels of `subscribe` go (`listen`)
        self._on_message: Callable[[bytes, bytes], None] = lambda target, data: None
        #: the watched channels Redis confirmed once, and the future `start` waits on: resolved
        #: when it has confirmed each of them
        self._watched_heard: set[bytes] = set()
        self._heard: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: what is broken, by part ("commands", "pubsub"): healthy only when both work
        self._faults: dict[str, str] = {"commands": "redis: not connected yet"}

    # -- set-up, by the parts that use the link (before `start`) ---------------------------

    def load_scripts(self, *scripts: str) -> None:
        """Load `scripts` on the command connection each time it connects."""
        self._scripts += scripts

    def watch(
        self, channel: str, on_message: Callable[[bytes], None], on_resubscribed: Callable[[], None]
    ) -> None:
        """Keep `channel` subscribed for as long as the link lives (subscribed first, before
        any other). Its messages go to `on_message(data)`; `on_resubscribed()` runs each time
        the subscription is back after the subscriber was lost: whatever was published in
        between was missed."""
        self._watched[channel.encode()] = (on_message, on_resubscribed)

    def listen(self, on_message: Callable[[bytes, bytes], None]) -> None:
        """The messages of the channels subscribed with `subscribe` go to
        `on_message(channel, data)`."""
        self._on_message = on_message

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (raises if Redis cannot be reached), open the command connection and the
        subscriber, and wait until Redis confirms the watched channels: nothing published
        on them from then on is missed."""
        await self.redis.ping()
        self._cmd = await self._open_commands()
        self._heard = asyncio.get_running_loop().create_future()
        if not self._watched:
            self._heard.set_result(None)
        self._sub = await self._open_subscriber()
        try:
            await asyncio.wait_for(self._heard, STALL_S)
        except TimeoutError as exc:
            raise RedisConnectionError("redis: SUBSCRIBE was not confirmed") from exc
        self._faults.clear()
        self._tasks = [asyncio.get_running_loop().create_task(self._subscriber_forever())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in (self._cmd, self._sub):
            if conn is not None:
                conn.abort()
        await self.redis.aclose()

    # -- health ----------------------------------------------------------------------------

    def health(self) -> tuple[str, str]:
        if self._faults:
            return ("degraded", BROKER_UNAVAILABLE)
        return ("healthy", "")

    def degraded(self, exc: BaseException, part: str = "commands") -> None:
        """`part` fails: the full text goes to the log, once per change of it (not per
        retry, nor per request); /health shows only the reason code."""
        reason = f"redis: {exc.__class__.__name__}: {exc}"
        if self._faults.get(part) != reason:
            logs.log("error", "broker_degraded", "broker", part=part, reason=reason, **self._where)
        self._faults[part] = reason

    def recovered(self, part: str) -> None:
        """`part` works again. The subscriber counts apart from commands: until it is back,
        publications for this worker's members would be lost, so it is not healthy yet."""
        if self._faults.pop(part, None) is not None and not self._faults:
            logs.log("info", "broker_recovered", "broker", **self._where)

    # -- the command connection ------------------------------------------------------------

    @property
    def command_connection(self) -> resp.RespConnection | None:
        """The command connection as it is now (None before `start`), connected or not."""
        return self._cmd

    def usable_now(self) -> resp.RespConnection | None:
        """The command connection, if it is connected and nobody is opening it again (a
        caller waiting for it goes first: to go after the earlier calls keeps the order)."""
        conn = self._cmd
        if conn is None or not conn.connected or self._cmd_lock.locked():
            return None
        return conn

    async def commands(self) -> resp.RespConnection:
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

    def drop_stalled(self) -> None:
        """Drop the command connection if Redis left a command unanswered for STALL_S: the
        calls waiting on it fail, and the next one connects again."""
        if self._cmd is not None and self._cmd.stalled(STALL_S):
            self._cmd.abort()

    async def _open_commands(self) -> resp.RespConnection:
        conn = await resp.connect(self.url, timeout=STALL_S)
        try:
            async with asyncio.timeout(STALL_S):  # the lock is held meanwhile
                for script in self._scripts:
                    await conn.call("SCRIPT", "LOAD", script)
        except BaseException as exc:
            conn.abort()
            if isinstance(exc, TimeoutError):
                raise RedisConnectionError("redis: SCRIPT LOAD was not answered") from exc
            raise
        return conn

    # -- the subscriber --------------------------------------------------------------------

    @property
    def subscribed(self) -> Set[str]:
        """The channels subscribed with `subscribe` that Redis confirmed (not the watched)."""
        return self._subscribed

    async def subscribe(self, channel: str) -> None:
        """Subscribe to `channel` and wait until Redis confirms it. An attempt that failed
        or was never confirmed is forgotten, so the next call asks again."""
        if channel in self._subscribed:
            return
        waiter = self._confirm.get(channel)
        try:
            if waiter is None:
                sub = self._sub
                if sub is None:
                    raise RedisConnectionError("redis: the subscriber is reconnecting")
                waiter = self._confirm[channel] = asyncio.get_running_loop().create_future()
                sub.send(self._sub_cmd, channel)
                if self._sharded:
                    self._sent.append((True, channel))
            await asyncio.wait_for(asyncio.shield(waiter), 5)
        except (RedisError, OSError, TimeoutError) as exc:
            if waiter is not None and self._confirm.get(channel) is waiter:
                del self._confirm[channel]
                if not waiter.done():
                    waiter.set_exception(exc)  # the callers waiting on it fail now, too
                    waiter.exception()  # retrieved: no "never retrieved" warning
            raise

    def unsubscribe(self, channels: list[str]) -> None:
        """Stop receiving `channels` (a later `subscribe` goes after this, and Redis answers
        in that order)."""
        self._subscribed.difference_update(channels)
        if self._sub is not None:
            with contextlib.suppress(RedisError):
                if self._sharded:
                    for channel in channels:  # one slot per command
                        self._sub.send("SUNSUBSCRIBE", channel)
                        self._sent.append((False, channel))
                else:
                    self._sub.send("UNSUBSCRIBE", *channels)

    async def _open_subscriber(self) -> resp.RespConnection:
        """Connect the subscriber and subscribe again to everything wanted, the watched
        channels first. It is healthy again when Redis confirms the first (`_on_push`), or
        answers a PING when nothing is wanted (a shard none of whose channels has members
        here watches nothing)."""
        sub = await resp.connect(self.url, self._on_push)
        wanted = [*(c.decode() for c in self._watched), *(self._subscribed | set(self._confirm))]
        self._subscribed.clear()
        if self._sharded:
            self._sent.clear()
            watched = [c.decode() for c in self._watched]
            if watched:
                sub.send("SUBSCRIBE", *watched)
            for channel in wanted[len(watched) :]:
                sub.send("SSUBSCRIBE", channel)
                self._sent.append((True, channel))
            if not wanted:
                sub.send("PING")
        elif wanted:
            sub.send("SUBSCRIBE", *wanted)
        else:
            sub.send("PING")
        return sub

    async def _subscriber_forever(self) -> None:
        backoff = 0.1
        opened = time.monotonic()
        while True:
            if self._sub is not None:
                await self._sub.closed
                self._sub = None
                self.degraded(
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
                self.degraded(exc, "pubsub")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _on_push(self, reply: Any) -> None:
        """Everything Redis sends the subscriber, in the order it sends it."""
        if isinstance(reply, hiredis.ReplyError):  # e.g. max clients: this connection is no use
            if self._sharded and str(reply).startswith(_SLOT_ERRORS):
                self._refused(str(reply))
                return
            self.degraded(RedisConnectionError(f"redis: {reply}"), "pubsub")
            if self._sub is not None:
                self._sub.abort()
            return
        try:
            if reply == b"PONG":  # the PING of a subscriber with nothing to subscribe
                self.recovered("pubsub")
                return
            kind = reply[0]
            if kind == b"message" or kind == b"smessage":
                target: bytes = reply[1]
                watcher = self._watched.get(target)
                if watcher is not None:
                    watcher[0](reply[2])
                else:
                    self._on_message(target, reply[2])
            elif kind == b"ssubscribe":
                self.recovered("pubsub")
                channel = reply[1].decode()
                self._answered((True, channel))
                self._subscribed.add(channel)
                waiter = self._confirm.pop(channel, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            elif kind == b"sunsubscribe":
                channel = reply[1].decode()
                if channel in self._subscribed:  # not asked for: its slot moved away
                    self._subscribed.discard(channel)
                    self.on_lost(channel)
                else:
                    self._answered((False, channel))
            elif kind == b"subscribe":
                # the first confirmation on a new connection is that of a watched channel
                # (subscribed first): from then on the subscriber works
                self.recovered("pubsub")
                target = reply[1]
                watcher = self._watched.get(target)
                if watcher is None:
                    channel = target.decode()
                    self._subscribed.add(channel)
                    waiter = self._confirm.pop(channel, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
                elif target in self._watched_heard:
                    watcher[1]()  # subscribed again after a loss: messages were missed
                else:
                    self._watched_heard.add(target)
                    heard = self._heard
                    everyone = len(self._watched_heard) == len(self._watched)
                    if everyone and heard is not None and not heard.done():
                        heard.set_result(None)  # `start` waits for it
        except Exception as exc:  # a bad message must not stop the subscriber
            logs.log("error", "pubsub_message_failed", "broker", error=repr(exc))

    def _refused(self, text: str) -> None:
        """A cluster node refused the oldest SSUBSCRIBE not yet answered (its slot is not
        the node's): whoever waits for it fails; a subscription asked for again after a
        loss is lost (`on_lost`: it is made on the slot's owner)."""
        if not self._sent:
            return
        asked, channel = self._sent.popleft()
        if not asked:  # a SUNSUBSCRIBE of a slot the node lost: nothing was subscribed
            return
        waiter = self._confirm.pop(channel, None)
        if waiter is not None:
            if not waiter.done():
                waiter.set_exception(ResponseError(text))  # "MOVED <slot> <host:port>" ...
                waiter.exception()  # retrieved: no "never retrieved" warning
        else:
            self.on_lost(channel)

    def _answered(self, sent: tuple[bool, str]) -> None:
        """Redis answered `sent` (the oldest not yet answered, but for a reply lost in a
        reconnection)."""
        if self._sent and self._sent[0] == sent:
            self._sent.popleft()
        elif sent in self._sent:
            self._sent.remove(sent)
