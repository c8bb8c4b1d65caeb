"""The Redis broker: the message log of more workers and more machines sharing one Redis.

It keeps every guarantee of `base.Broker` across the cluster:
- offsets, the epoch, history and the dedupe window live in Redis and are changed by one Lua
  script (one call for the publishes of a loop pass), each publish atomically: offset
  assigned, history appended (a capped stream; none with `history_size` 0), the sequence
  remembered, the publication PUBLISHed. A publish that Redis did not confirm raises, so
  the sender gets an error, never a false ack; a join recovers at most `history_size`
  publications, as with the memory broker;
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

from aether_fast._core import Packed, encode_text_frame, publication_halves, utc_timestamp
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
#: where a message's timestamp is in its keys + args (the ack of a new publish carries it)
_TS = 10


# One call publishes a batch (every publish of one loop pass, up to BATCH_MAX): Redis spends
# ~10-25 µs setting up each script call, more than the commands of one message. What one
# message costs Redis is what bench/redis_cpu.py measures (docs/performance.md, *Redis CPU
# per publish*): each `redis.call` (~0.3 µs at least), each argument (~0.1 µs), each string
# Lua builds, each number it formats.
# ARGV 1-4, once per call: history ttl ms, dedupe ttl ms, channel state ttl ms (meta), a new
#   epoch (used only by a channel that has none)
# Per message, KEYS (3): meta (hash: seq, epoch), hist (stream), dedupe (slot -> "seq|offset|ts")
#   ARGV (8): sequence, dedupe slot (sequence mod the window), history size, pubsub channel,
#   sender, json head, json tail, timestamp
# Returns one entry per message: the offset (an integer) when it was published now, or
# "offset|timestamp" (a string) of the original when it is a duplicate.
# Every key written gets its TTL here, once per key and call (all messages of a call share
# its clock): PEXPIREAT with Redis's own TIME, so the TTL is exactly the one PEXPIRE would
# set. A channel with history_size 0 has no history stream: no XADD, no TTL for it.
# The history is trimmed with `MAXLEN ~` (whole stream nodes): it may hold a few more than
# history_size entries, which `recover` does not replay (`_POSITION` gets the size).
_PUBLISH = """
local now = redis.call('TIME')
now = now[1] * 1000 + math.floor(now[2] / 1000)
local hist_at = string.format('%d', now + ARGV[1])
local dedupe_at = string.format('%d', now + ARGV[2])
local meta_at = string.format('%d', now + ARGV[3])
local ttl_set = {}
local out = {}
for i = 0, #KEYS / 3 - 1 do
  local meta, hist, dedupe = KEYS[i * 3 + 1], KEYS[i * 3 + 2], KEYS[i * 3 + 3]
  local a = 4 + i * 8
  local seq, slot = ARGV[a + 1], ARGV[a + 2]
  -- 'h', the highest sequence accepted, is the window's first field: found at once even
  -- while the hash is a listpack (scanned field by field). Above it, a sequence is new
  -- without a look at its slot. (Doubles: rounding keeps the order, so a sequence past 2^53
  -- is at worst looked up.) A window begun without 'h' (by an earlier version) never gets
  -- one: its highest sequence is not known.
  local high = tonumber(redis.call('HGET', dedupe, 'h'))
  local above = high and tonumber(seq) > high
  local first = not high and redis.call('EXISTS', dedupe) == 0
  local held = not above and redis.call('HGET', dedupe, slot)
  local bar = held and string.find(held, '|', 1, true)
  if bar and string.sub(held, 1, bar - 1) == seq then
    out[i + 1] = string.sub(held, bar + 1)
  else
    local offset = redis.call('HINCRBY', meta, 'seq', 1)
    if offset == 1 and redis.call('HSETNX', meta, 'epoch', ARGV[4]) == 1 then
      redis.call('DEL', hist)  -- a new epoch (first publish, or Redis lost the channel)
    end
    if not ttl_set[meta] then
      ttl_set[meta] = true
      redis.call('PEXPIREAT', meta, meta_at)
    end
    local o = string.format('%d', offset)
    local payload = ARGV[a + 6] .. o .. ARGV[a + 7]
    if ARGV[a + 3] ~= '0' then
      redis.call('XADD', hist, 'MAXLEN', '~', ARGV[a + 3], o .. '-1', 'p', payload)
      if not ttl_set[hist] then
        ttl_set[hist] = true
        redis.call('PEXPIREAT', hist, hist_at)
      end
    end
    if above or first then
      redis.call('HSET', dedupe, 'h', seq, slot, seq .. '|' .. o .. '|' .. ARGV[a + 8])
    else
      redis.call('HSET', dedupe, slot, seq .. '|' .. o .. '|' .. ARGV[a + 8])
    end
    if not ttl_set[dedupe] then
      ttl_set[dedupe] = true
      redis.call('PEXPIREAT', dedupe, dedupe_at)
    end
    redis.call('PUBLISH', ARGV[a + 4], ARGV[a + 5] .. '\\n' .. o .. '\\n' .. payload)
    out[i + 1] = offset
  end
end
return out
"""

# KEYS: meta, hist   ARGV: since (-1: none), new epoch, channel state ttl ms, history size
# (-1: not known here). A join (or a read of the position) keeps the meta key alive like a
# publish does. Only the last `history size` offsets are read: the stream may hold a few more
# (`MAXLEN ~`), which are not replayed, as the memory broker would not have them.
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
local size = tonumber(ARGV[4])
local entries = {}
if since >= 0 and since < offset and (size < 0 or offset - since <= size) then
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


def channel_ttls_ms(
    history_ttl_s: float, dedup_ttl_s: float, channel_state_ttl_s: float
) -> tuple[int, int, int]:
    """The TTLs (ms) of a channel's history, dedupe windows and meta key. Every key of a
    channel expires (nothing a join or publish leaves is kept forever). The meta key
    (offset, epoch) lives longest: once it is gone, the next join or publish starts a new
    epoch, which clients see as "history lost" — so it must not go before the history it
    numbers, nor before a dedupe record that names one of its offsets. History with
    HISTORY_TTL_S=0 ("no expiry") lives as long as the meta key."""
    dedup_ms = max(1000, int(dedup_ttl_s * 1000))
    state_ms = max(int(channel_state_ttl_s * 1000), int(history_ttl_s * 1000), dedup_ms)
    return (int(history_ttl_s * 1000) or state_ms, dedup_ms, state_ms)


def settle(batch: list[Pending], reply: Any) -> None:
    """The publish script's answer to `batch`: each future gets (offset, timestamp,
    duplicate)."""
    for (call, done), got in zip(batch, reply, strict=True):
        if done.done():
            continue
        if type(got) is int:  # published now, at the timestamp it was sent with
            done.set_result((got, call[_TS], False))
        else:  # a duplicate: the original's "offset|timestamp"
            offset, _, stamp = got.decode().partition("|")
            done.set_result((int(offset), stamp, True))


def unpublished(batch: list[Pending], exc: BaseException) -> None:
    """Redis did not confirm `batch`: each future gets BrokerUnavailable (never a false
    ack)."""
    for _, done in batch:
        if not done.done():
            failure = BrokerUnavailable("broker unavailable: the message was not published")
            failure.__cause__ = exc
            done.set_exception(failure)


def recovery(
    since: int | None, epoch: str | None, position: Any, packed: PackedCache | None = None
) -> Recovery:
    """A join's `Recovery` from the position script's answer (offset, epoch, entries); a
    publication this worker compressed for deflate members is replayed as its `Packed`
    from `packed` (never compressed again), the others as their plain frames."""
    offset, current, entries = position
    current_epoch = current.decode()
    offset = int(offset)
    if since is None or (epoch is not None and epoch != current_epoch):
        return Recovery([], offset, current_epoch, False)
    if since >= offset:
        return Recovery([], offset, current_epoch, since == offset)
    frames: list[bytes | Packed] = []
    for entry_id, fields in entries:
        frame = encode_text_frame(fields[1])
        item = packed.get(int(entry_id.split(b"-")[0])) if packed else None
        # only the very publication Redis holds: offsets start again at 1 in a new epoch
        # (the keys expired, or another worker's `forget`), and the cache knows no epoch
        frames.append(item if item is not None and item.plain == frame else frame)
    first = int(entries[0][0].split(b"-")[0]) if entries else 0
    complete = len(frames) == offset - since and first == since + 1
    return Recovery(frames if complete else [], offset, current_epoch, complete)


def publish_args(channel: Any, sender: Any, sequence: int, content: str, target: str) -> list[Any]:
    """The keys and arguments of one message of the publish script (see `_PUBLISH`), its
    publication PUBLISHed (SPUBLISHed in a Redis Cluster) to `target`."""
    name: str = channel.name
    ts = utc_timestamp()
    head, tail = publication_halves(name, content, sequence, ts, sender.client_id, sender.user_id)
    meta_key, hist_key = _keys(name)
    who = sender_key(sender.identity, sender.client_id)
    return [
        meta_key,
        hist_key,
        f"{PREFIX}dedupe:{{{name}}}:{who}",
        sequence,
        sequence % DEDUP_WINDOW,
        channel.config.history_size,
        target,
        who,
        head,
        tail,
        ts,
    ]


#: offset -> the `Packed` of a publication of one channel this worker compressed
PackedCache = dict[int, Packed]


def deliver(
    hub: Any, cluster: RedisCluster, ch: Any, data: bytes, kept: dict[str, PackedCache]
) -> None:
    """A publication from Redis's pub/sub (`sender\noffset\npayload`) to this worker's
    members of `ch` (not to its sender when that is here and does not want its echo). The
    compressed variants made for deflate members are kept for the last `history_size`
    offsets of the channel in `kept` (Redis keeps the JSON only), so a recovery replays
    them without compressing again; a publication this worker did not compress is replayed
    plain, which RFC 7692 allows."""
    sender, _, rest = data.partition(b"\n")
    offset, _, payload = rest.partition(b"\n")
    identity, _, client = sender.decode().rpartition("\x1f")
    origin = cluster.local_session(identity or None, client)
    exclude = origin if origin is not None and not origin.echo else None
    at = int(offset)
    packed = hub.deliver(ch, encode_text_frame(payload), exclude, at)
    size = max(0, ch.history_size)
    cache = kept.get(ch.name)
    if packed is not None and size > 0:
        if cache is None:
            cache = kept[ch.name] = {}
        cache.pop(at, None)  # an offset of an older epoch goes, so insertion order stays age
        cache[at] = packed
    elif cache is not None:
        cache.pop(at, None)  # kept for this offset in an older epoch: not this publication
    if cache is not None:
        while len(cache) > size:  # oldest first (history_size may have shrunk)
            del cache[next(iter(cache))]
        if not cache:
            del kept[ch.name]


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
        self._history_ttl_ms, self._dedup_ttl_ms, self._state_ttl_ms = channel_ttls_ms(
            history_ttl_s, dedup_ttl_s, channel_state_ttl_s
        )
        #: the publish script's first arguments, once per call (its new epoch is set per call)
        self._ttls = (self._history_ttl_ms, self._dedup_ttl_ms, self._state_ttl_ms)
        #: one lane per shard, in the order of `shards.links`
        self._lanes = [_Lane(link) for link in shards.links]
        self._single = len(self._lanes) == 1
        self._tasks: list[asyncio.Task[None]] = []
        # channel -> {offset: Packed}: the compressed variants of the publications this
        # worker delivered to deflate members, at most history_size per channel, so that a
        # recovery replays them without compressing (Redis keeps the JSON only: a
        # publication this worker did not compress is replayed plain, which RFC 7692 allows)
        self._packed: dict[str, PackedCache] = {}
        #: the loop `start` ran in: each publish needs it
        self._loop: asyncio.AbstractEventLoop | None = None
        for link in shards.links:
            link.load_scripts(_PUBLISH, _POSITION)
            link.listen(self._on_message)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the links (raises if a shard cannot be reached at start-up): each one's
        command connection with the scripts loaded, and its subscriber."""
        self._loop = asyncio.get_running_loop()
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
        call = publish_args(channel, sender, sequence, content, PUB + name)
        loop = self._loop or asyncio.get_running_loop()  # (3.11 asks the OS for its pid)
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
            conn.request(handler, how, script, len(keys), *keys, *self._call_args, *args)
        except RedisError as exc:
            handler(None, exc)

    def _published(
        self, lane: _Lane, batch: list[Pending], how: str, reply: Any, exc: BaseException | None
    ) -> None:
        """The publish script's answer: each future gets (offset, timestamp, duplicate), or
        BrokerUnavailable when Redis did not confirm it (never a false ack)."""
        if exc is None:
            settle(batch, reply)
            return
        conn = lane.link.command_connection
        if isinstance(exc, NoScriptError) and how == "EVALSHA" and conn is not None:
            # SCRIPT FLUSH since this connection loaded it: send the script itself, once
            self._run_batch(lane, conn, batch, "EVAL")
            return
        lane.link.degraded(exc)
        unpublished(batch, exc)

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

    @property
    def _call_args(self) -> tuple[Any, ...]:
        """The publish script's arguments shared by the messages of one call: the TTLs and a
        new epoch (each call its own, so no two epochs of one channel are the same)."""
        return (*self._ttls, new_epoch())

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
        ch = self._hub.channel(channel)
        size = -1 if ch is None else ch.config.history_size
        try:
            answer = await self._script(
                lane,
                _POSITION,
                _POSITION_SHA,
                2,
                [*_keys(channel), since_arg, new_epoch(), self._state_ttl_ms, size],
            )
        except (RedisError, OSError) as exc:
            lane.link.degraded(exc)
            raise
        return recovery(since, epoch, answer, self._packed.get(channel))

    async def position(self, channel: str) -> tuple[int, str]:
        lane = self._lane(channel)
        try:
            offset, epoch, _ = await self._script(
                lane,
                _POSITION,
                _POSITION_SHA,
                2,
                [*_keys(channel), -1, new_epoch(), self._state_ttl_ms, -1],
            )
        except (RedisError, OSError) as exc:
            lane.link.degraded(exc)
            raise BrokerUnavailable(f"channel position not read: {exc}") from exc
        return (int(offset), epoch.decode())

    async def forget(self, channel: str) -> None:
        self._packed.pop(channel, None)
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
        # the compressed frames kept for channels with no member here (whether or not their
        # subscription is still listed: one lost with a moved slot is not)
        for name in list(self._packed):
            ch = self._hub.channel(name)
            if ch is None or ch.member_count == 0:
                del self._packed[name]

    def _on_message(self, target: bytes, data: bytes) -> None:
        """A publication from a link's subscriber: to this worker's members of its
        channel (not to its sender when that is here and does not want its echo)."""
        ch = self._hub.channel(target[len(PUB_B) :].decode())
        if ch is None:
            return
        deliver(self._hub, self._cluster, ch, data, self._packed)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)
