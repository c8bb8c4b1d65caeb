"""The Redis broker: the message log of more workers and more machines sharing one Redis.

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

The connections are the links' (`redis_link.RedisLink`, one per shard, opened by `start`,
closed by `close`): everything of a channel goes to the link of its shard
(`redis_shards.Shards`, the router; one link with one URL): publishes and positions on its
command connection (one script call per shard and loop pass, a `_Lane` each), publications
on its subscriber, deletes on redis-py's pool. The cluster table and the channel configs
are the cluster's (`redis_cluster.RedisCluster`, on the home shard), which the subscriber
asks whether the sender of a publication is here (its echo setting).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Coroutine
from functools import partial
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from aether_fast._core import encode_text_frame, publication_halves, utc_timestamp
from aether_fast.brokers import resp
from aether_fast.brokers.base import (
    DEDUP_WINDOW,
    BrokerUnavailable,
    PublishResult,
    Recovery,
    new_epoch,
)
from aether_fast.brokers.redis_cluster import RedisCluster
from aether_fast.brokers.redis_link import PREFIX, RedisLink
from aether_fast.brokers.redis_shards import Shards

PUB = PREFIX + "pub:"
PUB_B = PUB.encode()
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


def sender_key(identity: str | None, client_id: str) -> str:
    """A sender in Redis (dedupe keys, the pubsub messages): its Session.identity and
    client_id. client_id has no \\x1f, so the last one splits them."""
    return f"{identity or ''}\x1f{client_id}"


class _Lane:
    """One shard's publishes: those of this loop pass (`batch`, sent together by
    `_send_batch`), and how many batches wait for its command connection (`parked`): while
    any wait, later ones queue behind them (the link's lock alone cannot say so: it is free
    before its next waiter runs)."""

    __slots__ = ("batch", "link", "parked")

    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self.batch: list[Pending] = []
        self.parked = 0


class RedisBroker:
    name = "redis"

    def __init__(
        self,
        hub: Any,
        shards: Shards,
        cluster: RedisCluster,
        *,
        history_ttl_s: float,
        dedup_ttl_s: float,
        channel_state_ttl_s: float = 86400,
    ) -> None:
        self._hub = hub
        self._shards = shards
        self._cluster = cluster
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
        #: one lane per shard, in the order of `shards.links`
        self._lanes = [_Lane(link) for link in shards.links]
        self._single = len(self._lanes) == 1
        self._tasks: list[asyncio.Task[None]] = []
        for link in shards.links:
            link.load_scripts(_PUBLISH, _POSITION)
            link.listen(self._on_message)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the links (raises if a shard cannot be reached at start-up): each one's
        command connection with the scripts loaded, and its subscriber."""
        await self._shards.start()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._shards.close()

    def health(self) -> tuple[str, str]:
        return self._shards.health()

    def _lane(self, channel: str) -> _Lane:
        """The lane of `channel`'s shard."""
        return self._lanes[0] if self._single else self._lanes[self._shards.index(channel)]

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
        lane = self._lanes[0] if self._single else self._lanes[self._shards.index(name)]
        if not lane.batch:
            loop.call_soon(self._send_batch, lane)
        lane.batch.append((call, done))
        return done

    def _send_batch(self, lane: _Lane) -> None:
        """Send this loop pass's publishes to one shard, in the order they were made. While
        its command connection reconnects they wait for it (the link's lock), behind the
        batches before them."""
        batch, lane.batch = lane.batch, []
        conn = self._usable_now(lane)
        if conn is None:
            lane.parked += 1
            self._spawn(self._send_when_connected(lane, batch))
            return
        for start in range(0, len(batch), BATCH_MAX):
            self._run_batch(lane, conn, batch[start : start + BATCH_MAX], "EVALSHA")

    async def _send_when_connected(self, lane: _Lane, batch: list[Pending]) -> None:
        try:
            conn = await lane.link.commands()
        except (RedisError, OSError) as exc:
            self._published(lane, batch, "EVAL", None, exc)
            return
        except BaseException:  # cancelled (the broker is closing)
            closing = RedisConnectionError("the broker is closing")
            self._published(lane, batch, "EVAL", None, closing)
            raise
        finally:
            lane.parked -= 1
        for start in range(0, len(batch), BATCH_MAX):
            self._run_batch(lane, conn, batch[start : start + BATCH_MAX], "EVALSHA")

    def _run_batch(
        self, lane: _Lane, conn: resp.RespConnection, batch: list[Pending], how: str
    ) -> None:
        keys = [key for call, _ in batch for key in call[:3]]
        args = [arg for call, _ in batch for arg in call[3:]]
        script = _PUBLISH_SHA if how == "EVALSHA" else _PUBLISH
        handler = partial(self._published, lane, batch, how)
        try:
            conn.request(handler, how, script, len(keys), *keys, *args)
        except RedisError as exc:
            handler(None, exc)

    def _published(
        self, lane: _Lane, batch: list[Pending], how: str, reply: Any, exc: BaseException | None
    ) -> None:
        """The publish script's answer: each future gets (offset, timestamp, duplicate), or
        BrokerUnavailable when Redis did not confirm it (never a false ack)."""
        if exc is None:
            for (_, done), (seen, duplicate) in zip(batch, reply, strict=True):
                if not done.done():
                    offset, _, stamp = seen.decode().partition("|")
                    done.set_result((int(offset), stamp, bool(duplicate)))
            return
        conn = lane.link.command_connection
        if isinstance(exc, NoScriptError) and how == "EVALSHA" and conn is not None:
            # SCRIPT FLUSH since this connection loaded it: send the script itself, once
            self._run_batch(lane, conn, batch, "EVAL")
            return
        lane.link.degraded(exc)
        for _, done in batch:
            if not done.done():
                failure = BrokerUnavailable("broker unavailable: the message was not published")
                failure.__cause__ = exc
                done.set_exception(failure)

    async def _script(
        self, lane: _Lane, script: str, sha: str, numkeys: int, args: list[Any]
    ) -> Any:
        """Run a Lua script on the command connection of `lane`'s shard. Calls are written in
        the order they are made (while it reconnects, they queue on the link's lock in that
        order too), and Redis runs them in that order: a sender's messages get offsets in the
        order it sent them, and a burst goes out in one write."""
        conn = self._usable_now(lane) or await lane.link.commands()
        try:
            return await conn.call("EVALSHA", sha, numkeys, *args)
        except NoScriptError:  # SCRIPT FLUSH since this connection loaded it
            return await (await lane.link.commands()).call("EVAL", script, numkeys, *args)

    def _usable_now(self, lane: _Lane) -> resp.RespConnection | None:
        """The command connection of `lane`'s shard, if a call may be written on it now:
        usable (the link), and no batch of ours still waiting for it (to go after them is to
        keep the order)."""
        if lane.parked:
            return None
        return lane.link.usable_now()

    # -- positions and recovery ------------------------------------------------------------

    async def recover(self, channel: str, since: int | None, epoch: str | None) -> Recovery:
        lane = self._lane(channel)
        await lane.link.subscribe(PUB + channel)
        since_arg = -1 if since is None else since
        try:
            offset, current, entries = await self._script(
                lane,
                _POSITION,
                _POSITION_SHA,
                2,
                [*_keys(channel), since_arg, new_epoch(), self._state_ttl_ms],
            )
        except (RedisError, OSError) as exc:
            lane.link.degraded(exc)
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
        lane = self._lane(channel)
        try:
            offset, epoch, _ = await self._script(
                lane,
                _POSITION,
                _POSITION_SHA,
                2,
                [*_keys(channel), -1, new_epoch(), self._state_ttl_ms],
            )
        except (RedisError, OSError) as exc:
            lane.link.degraded(exc)
            raise BrokerUnavailable(f"channel position not read: {exc}") from exc
        return (int(offset), epoch.decode())

    async def forget(self, channel: str) -> None:
        try:
            await self._lane(channel).link.redis.delete(*_keys(channel))
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"channel history not deleted: {exc}") from exc

    # -- subscriptions ---------------------------------------------------------------------

    def sweep(self) -> None:
        """Unsubscribe from channels that no longer have a member on this worker."""
        for link in self._shards.links:
            idle = []
            for target in link.subscribed:
                ch = self._hub.channel(target[len(PUB) :])
                if ch is None or ch.member_count == 0:
                    idle.append(target)
            if idle:
                link.unsubscribe(idle)

    def _on_message(self, target: bytes, data: bytes) -> None:
        """A publication from a link's subscriber: to this worker's members of its
        channel (not to its sender when that is here and does not want its echo)."""
        ch = self._hub.channel(target[len(PUB_B) :].decode())
        if ch is None:
            return
        sender, _, rest = data.partition(b"\n")
        offset, _, payload = rest.partition(b"\n")
        identity, _, client = sender.decode().rpartition("\x1f")
        origin = self._cluster.local_session(identity or None, client)
        exclude = origin if origin is not None and not origin.echo else None
        self._hub.deliver(ch, encode_text_frame(payload), exclude, int(offset))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)
