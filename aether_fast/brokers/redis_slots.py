"""Redis Cluster mode: `BROKER_URL=redis+cluster://host:port,host:port` (its seed nodes;
`rediss+cluster://` for TLS to every node).

(Not to be confused with `redis_cluster.RedisCluster`, aether's own cluster table of
workers; this module is about Redis's cluster, hence "slots".)

Three parts:
- `Slots`, the router (channel -> link): which master serves each of the 16384 hash slots
  (CLUSTER SLOTS, asked of any node it knows, else of the seeds), a `RedisLink` per master
  (its command connection, its subscriber, its pool). A channel's slot is that of its hash
  tag `{<channel>}`: every key of a channel (`redis._keys`, the dedupe windows) and its
  pub/sub channel (`aether:pub:{<channel>}`) carry it, so all of a channel is in one slot
  and on one master (channel names have no braces: the tag is the whole name). The table
  is read again on a MOVED reply, on a lost connection and on a refused subscription (at
  once, coalesced), while anything is unhealthy (once a second) and every 5 s otherwise; a
  node that serves no slot any more has its link closed, a new master gets one.
- `SlotsBroker`, the message log (`redis.RedisBroker`'s scripts and guarantees) routed by
  slot. A script's keys must all be in one slot (else CROSSSLOT), so the publishes of a
  loop pass are batched per slot: one script call per slot, all the calls of one master
  written in one write (the command connection writes once per loop pass). A MOVED or ASK
  reply means the script did not run: the batch is sent again to the node named (ASKING
  first for ASK; TRYAGAIN after a short wait), at most `MAX_HOPS` times; sequence dedupe
  makes any retry idempotent. Everything else that is not an answer (a lost connection, a
  slot with no master, CLUSTERDOWN) fails the batch with `BrokerUnavailable`: never a false
  ack. Publications go out with SPUBLISH (Redis >= 7 sharded pub/sub): a message stays on
  its shard (classic PUBLISH is broadcast to every node of a cluster) and is received with
  SSUBSCRIBE on the master of its slot.
- Subscriptions follow slots: when a slot moves (Redis sends `sunsubscribe` for each
  channel of it, or refuses a re-subscription with MOVED) or its master dies, each channel
  of this worker's members is subscribed again on the slot's new master, after the table
  is read again. What was published in between was missed, as after a lost subscriber:
  the members see a gap in the offsets and join again with `since` (docs/protocol.md §7),
  which replays it from the history. While a channel with members here has no confirmed
  subscription on its slot's master, or a slot has no reachable master, /health is
  `degraded` with `broker_cluster_degraded`: delivery cannot stop silently behind a green
  health check (Centrifugo's most reported fault after a failover).

The cluster-wide state (the cluster table of workers, their heartbeat, per-user counts and
the channel configs, `redis_cluster.RedisCluster`) lives under keys with one fixed hash tag,
`aether:{aether}:...` (`STATE_PREFIX`): one slot, so its MULTI pipelines are valid; it is
reached through `StateHome`, which stands in for the home link and sends everything to the
master of that slot as the table says now. Config-change notices use classic PUBLISH, which
a cluster broadcasts to every node: every link watches `aether:config`, so a notice is heard
while any master is up (a change heard twice is read twice: harmless).

The single-Redis and sharded paths (`redis.RedisBroker`, `redis_shards.Shards`) are not
touched by any of this: cluster mode is another broker class, chosen once at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from aether_fast import logs
from aether_fast.brokers import resp
from aether_fast.brokers.base import (
    BROKER_CLUSTER_DEGRADED,
    BROKER_UNAVAILABLE,
    BrokerUnavailable,
    PublishResult,
    Recovery,
    new_epoch,
)
from aether_fast.brokers.redis import (
    _POSITION,
    _POSITION_SHA,
    _PUBLISH,
    BATCH_MAX,
    PUB,
    PUB_B,
    PackedCache,
    Pending,
    _keys,
    _Lane,
    channel_ttls_ms,
    deliver,
    publish_args,
    recovery,
    settle,
    unpublished,
)
from aether_fast.brokers.redis_link import PREFIX, RedisLink

SLOTS: Final = 16384
#: The prefix of the cluster-wide state's keys in cluster mode: one hash slot.
STATE_PREFIX: Final = PREFIX + "{aether}:"
#: Redirects (MOVED/ASK/TRYAGAIN) one call follows before it fails.
MAX_HOPS: Final = 5
#: Seconds between two reads of the slot table while everything is healthy.
REFRESH_S: Final = 5.0
#: Shortest time between two reads of the slot table asked for by failures.
REFRESH_GAP_S: Final = 0.1
#: Channels whose slot is remembered; forgotten all at once past this many.
SLOT_CACHE: Final = 65536

# The publish script, with SPUBLISH: the publication stays on its slot's master.
_PUBLISH_SHARDED: Final = _PUBLISH.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")
assert _PUBLISH_SHARDED != _PUBLISH
_PUBLISH_SHARDED_SHA: Final = hashlib.sha1(_PUBLISH_SHARDED.encode()).hexdigest()


def channel_slot(channel: str) -> int:
    """The hash slot of every key of `channel` (its tag `{channel}`)."""
    return int(key_slot(f"{{{channel}}}".encode()))


def pub_channel(channel: str) -> str:
    """The sharded pub/sub channel of `channel`'s publications (in its slot)."""
    return f"{PUB}{{{channel}}}"


def node_url(seed_url: str, addr: str) -> str:
    """The redis:// URL of the node at `addr` ("host:port"): a seed URL's credentials
    and options with that host and port."""
    parts = urlsplit(seed_url)
    auth = parts.netloc.rpartition("@")[0]
    host, _, port = addr.rpartition(":")
    if ":" in host:  # IPv6, as Redis writes it ("::1:7000"): a URL brackets it
        addr = f"[{host}]:{port}"
    return urlunsplit(
        (parts.scheme, f"{auth}@{addr}" if auth else addr, parts.path, parts.query, "")
    )


def slot_owners(table: list[Any], asked: str) -> list[str | None]:
    """The master ("host:port") of each slot from CLUSTER SLOTS, asked of the node at host
    `asked`: an empty endpoint is that host (as Redis says); "?" (Redis 7's unknown
    endpoint) or a master without a port is no known master (None: the slot's channels
    are refused, /health is degraded), never an address to connect to; so is an entry
    that is not what Redis writes (a broken or hostile node: no exception per read)."""
    owners: list[str | None] = [None] * SLOTS
    for entry in table:
        try:
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            port = int(master[1]) if len(master) > 1 and master[1] is not None else 0
        except (TypeError, ValueError, IndexError, UnicodeDecodeError):
            continue
        if host == "?" or not 0 < port < 65536 or not 0 <= start <= end < SLOTS:
            continue
        owners[start : end + 1] = [f"{host or asked}:{port}"] * (end - start + 1)
    return owners


def _redirect(exc: BaseException) -> tuple[str, str] | None:
    """("MOVED" | "ASK" | "TRYAGAIN", "host:port") of a cluster redirect, else None."""
    if not isinstance(exc, ResponseError) or isinstance(exc, NoScriptError):
        return None
    words = str(exc).split()
    if words and words[0] in ("MOVED", "ASK") and len(words) >= 3:
        return words[0], words[2]
    if words and words[0] == "TRYAGAIN":
        return "TRYAGAIN", ""
    return None


class Slots:
    """The masters of a Redis Cluster and the slot table (see the module docstring)."""

    def __init__(self, seeds: list[str]) -> None:
        if not seeds:
            raise ValueError("no seed node")
        #: redis:// URLs of BROKER_URL's seed nodes (BROKER_URL's list, with its credentials)
        self.seeds = seeds
        #: one link per master in use, by "host:port"
        self.links: dict[str, RedisLink] = {}
        #: the master of each slot, by "host:port" (None: not known / not served)
        self._owner: list[str | None] = [None] * SLOTS
        #: the values of `_owner` (None among them while a slot has no master)
        self._masters: frozenset[str | None] = frozenset([None])
        self._slot_cache: dict[str, int] = {}
        self._scripts: tuple[str, ...] = ()
        self._watches: list[tuple[str, Callable[[bytes], None], Callable[[], None]]] = []
        self._listen: Callable[[bytes, bytes], None] = lambda target, data: None
        self._on_lost: Callable[[str], None] = lambda channel: None
        #: called after each read of the table (the broker moves subscriptions)
        self.on_topology: Callable[[], None] = lambda: None
        #: whether the broker still has subscriptions to move (the table is read again
        #: once a second meanwhile)
        self.unsettled: Callable[[], bool] = lambda: False
        self._refresh_task: asyncio.Task[None] | None = None
        self._refresh_lock = asyncio.Lock()
        self._refreshed_at = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        #: links being opened, by "host:port"
        self._opening: dict[str, asyncio.Task[RedisLink]] = {}
        #: masters of the table that could not be reached (logged once each)
        self._unreachable: set[str] = set()
        #: faults of the cluster-wide state (`StateHome`), by part
        self.home_faults: dict[str, str] = {}
        #: `close` was called: no read of the table and no link from then on (a publish
        #: failed by the closing links asks for a read, which would open them all again)
        self._closed = False

    # -- set-up (before `start`): applied to every link, now and later ---------------------

    def load_scripts(self, *scripts: str) -> None:
        self._scripts += scripts

    def watch(
        self, channel: str, on_message: Callable[[bytes], None], on_resubscribed: Callable[[], None]
    ) -> None:
        self._watches.append((channel, on_message, on_resubscribed))

    def listen(
        self, on_message: Callable[[bytes, bytes], None], on_lost: Callable[[str], None]
    ) -> None:
        self._listen = on_message
        self._on_lost = on_lost

    # -- routing ---------------------------------------------------------------------------

    def slot(self, channel: str) -> int:
        slot = self._slot_cache.get(channel)
        if slot is None:
            if len(self._slot_cache) >= SLOT_CACHE:
                self._slot_cache.clear()
            slot = self._slot_cache[channel] = channel_slot(channel)
        return slot

    def link_of(self, slot: int) -> RedisLink | None:
        """The link of `slot`'s master, as the table says now (None: none known)."""
        addr = self._owner[slot]
        return None if addr is None else self.links.get(addr)

    async def master(self, slot: int) -> RedisLink:
        """The link of `slot`'s master; with none known, after the table is read again
        (`refreshed`); raises when there is still none."""
        link = self.link_of(slot)
        if link is None:
            await self.refreshed()
            link = self.link_of(slot)
            if link is None:
                raise RedisConnectionError("redis cluster: the slot has no master")
        return link

    def moved(self, slot: int, addr: str) -> None:
        """A MOVED reply: `slot` is served by `addr` now (the whole table is read again)."""
        self._owner[slot] = addr
        self._masters = self._masters | {addr}
        self.request_refresh()

    async def link_at(self, addr: str) -> RedisLink:
        """The link of the node at `addr`, opened if there is none yet."""
        link = self.links.get(addr)
        if link is None:
            link = await self._open_link(addr)
        return link

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the slot table from a seed and open a link to every master (raises if no
        seed answers, or a master cannot be reached: the whole cluster must answer at
        start-up), then keep them alive."""
        try:
            await self.refresh(strict=True)
        except BaseException:
            await self._close_links(list(self.links.values()))
            raise
        self._tasks.append(asyncio.get_running_loop().create_task(self._keep_alive()))

    async def close(self) -> None:
        self._closed = True
        tasks: list[asyncio.Task[Any]] = [*self._tasks, *self._opening.values()]
        if self._refresh_task is not None:
            tasks.append(self._refresh_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._close_links(list(self.links.values()))
        self.links.clear()

    async def _close_links(self, links: list[RedisLink]) -> None:
        for link in links:
            with contextlib.suppress(Exception):
                await link.close()

    async def _open_link(self, addr: str) -> RedisLink:
        """The link of `addr`, opened once however many ask at the same time."""
        if self._closed:
            raise RedisConnectionError("redis cluster: the broker is closing")
        opening = self._opening.get(addr)
        if opening is None:
            opening = asyncio.get_running_loop().create_task(self._new_link(addr))
            self._opening[addr] = opening
            opening.add_done_callback(lambda _: self._opening.pop(addr, None))
        return await asyncio.shield(opening)

    async def _new_link(self, addr: str) -> RedisLink:
        link = RedisLink(node_url(self.seeds[0], addr), node=addr)
        link.load_scripts(*self._scripts)
        for channel, on_message, on_resubscribed in self._watches:
            link.watch(channel, on_message, on_resubscribed)
        link.listen(self._listen)
        link.on_lost = self._on_lost
        try:
            await link.start()
            if self._closed:
                raise RedisConnectionError("redis cluster: the broker is closing")
        except BaseException:
            await link.close()
            raise
        self.links[addr] = link
        return link

    # -- the slot table --------------------------------------------------------------------

    def request_refresh(self) -> None:
        """Read the table again soon (once, however many ask meanwhile)."""
        if self._closed:
            return
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = asyncio.get_running_loop().create_task(self._refresh_quietly())

    async def refreshed(self) -> None:
        """Wait for a read of the table asked for now: the one read shared by everyone who
        asks meanwhile (at most one per REFRESH_GAP_S), never one per caller: a join or a
        script that meets a redirect or a slot without a master waits for it, so many at
        once (or a cluster answering MOVED forever) cost Redis one CLUSTER SLOTS, not one
        each. A failed read raises nothing: the caller finds the table unchanged."""
        self.request_refresh()
        task = self._refresh_task
        if task is not None:
            await asyncio.shield(task)  # a caller cancelled does not cancel the others' read

    async def _refresh_quietly(self) -> None:
        # at most one read per REFRESH_GAP_S, however many failed publishes ask for one
        wait = self._refreshed_at + REFRESH_GAP_S - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        with contextlib.suppress(RedisError, OSError):
            await self.refresh()

    async def refresh(self, *, strict: bool = False) -> None:
        """Read CLUSTER SLOTS, open links to new masters, close those of nodes that serve
        nothing any more, then tell the broker (`on_topology`)."""
        async with self._refresh_lock:
            if self._closed:
                raise RedisConnectionError("redis cluster: the broker is closing")
            table, asked = await self._read_table()
            owners = slot_owners(table, asked)
            # new masters' links opened together: one that does not answer costs the lock
            # (and the joins waiting on `refreshed`) one connect timeout, not one per master
            new = sorted({a for a in owners if a is not None} - set(self.links))
            opened = await asyncio.gather(*map(self._open_link, new), return_exceptions=True)
            for addr, exc in zip(new, opened, strict=True):
                if not isinstance(exc, BaseException):
                    self._unreachable.discard(addr)
                    continue
                if strict or not isinstance(exc, (RedisError, OSError)):
                    raise exc
                if addr not in self._unreachable:  # once, not at each read of the table
                    self._unreachable.add(addr)
                    logs.log(
                        "error",
                        "broker_degraded",
                        "broker",
                        part="node",
                        node=addr,
                        reason=f"redis: {exc.__class__.__name__}: {exc}",
                    )
            self._owner = owners
            self._masters = frozenset(owners)
            self._refreshed_at = time.monotonic()
            serving = self._masters
            gone = [link for addr, link in self.links.items() if addr not in serving]
            for link in gone:
                assert link.node is not None
                del self.links[link.node]
        self.on_topology()
        await self._close_links(gone)

    async def _read_table(self) -> tuple[list[Any], str]:
        """CLUSTER SLOTS from a healthy master, else from any node known, else a seed; and
        the host asked (a node whose endpoint is "" is at that host, as Redis says)."""
        errors: list[str] = []
        known = sorted(self.links.values(), key=lambda link: link.health()[0] != "healthy")
        for link in known:
            conn = link.usable_now()
            if conn is None:
                continue
            try:
                async with asyncio.timeout(2.0):
                    table = await conn.call("CLUSTER", "SLOTS")
                if table:
                    return list(table), link.node.rpartition(":")[0] if link.node else ""
            except (RedisError, OSError, TimeoutError) as exc:
                errors.append(repr(exc))
        for url in self.seeds:
            try:
                conn = await resp.connect(url, timeout=2.0)
            except (RedisError, OSError) as exc:
                errors.append(repr(exc))
                continue
            try:
                async with asyncio.timeout(2.0):
                    table = await conn.call("CLUSTER", "SLOTS")
                if table:
                    return list(table), urlsplit(url).hostname or ""
                errors.append("CLUSTER SLOTS: empty")
            except (RedisError, OSError, TimeoutError) as exc:
                errors.append(repr(exc))
            finally:
                conn.abort()
        raise RedisConnectionError(f"redis cluster: no node answered CLUSTER SLOTS: {errors}")

    async def _keep_alive(self) -> None:
        """Once a second: each master's command connection dropped when Redis stopped
        answering, opened again when lost, its health said; the table read again while
        anything is unhealthy, and every REFRESH_S anyway."""
        while True:
            try:
                await self._keep_alive_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in one round must not end the keep-alive
                logs.log("error", "broker_keepalive_failed", "broker", error=repr(exc))
            await asyncio.sleep(1.0)

    async def _keep_alive_once(self) -> None:
        for link in list(self.links.values()):
            link.drop_stalled()
            try:
                await link.commands()
                link.recovered("commands")
            except (RedisError, OSError) as exc:
                link.degraded(exc)
        due = time.monotonic() - self._refreshed_at >= REFRESH_S
        if due or self.unsettled() or self.health()[0] != "healthy":
            with contextlib.suppress(RedisError, OSError):
                await self.refresh()

    # -- health ----------------------------------------------------------------------------

    def health(self) -> tuple[str, str]:
        """Healthy when every slot has a master whose link works (and the cluster-wide
        state answers); BROKER_UNAVAILABLE when no master works; else
        BROKER_CLUSTER_DEGRADED: the channels of some slots are refused."""
        working = {addr for addr, link in self.links.items() if link.health()[0] == "healthy"}
        if not working:
            return ("degraded", BROKER_UNAVAILABLE)
        if self.home_faults or any(addr not in working for addr in self._masters):
            return ("degraded", BROKER_CLUSTER_DEGRADED)
        return ("healthy", "")


class StateHome:
    """The home of the cluster-wide state in cluster mode, as `redis_cluster.RedisCluster`
    uses a link: `redis` is the pool of the master of the state's slot as the table says
    now; config notices are watched on every master (`Slots.watch`); the keep-alive is the
    router's."""

    def __init__(self, slots: Slots) -> None:
        self._slots = slots
        self._slot = int(key_slot(STATE_PREFIX.encode()))

    def _link(self) -> RedisLink:
        link = self._slots.link_of(self._slot)
        if link is None:
            self._slots.request_refresh()
            raise RedisConnectionError("redis cluster: the state's slot has no master")
        return link

    @property
    def redis(self) -> Any:
        return self._link().redis

    def watch(
        self, channel: str, on_message: Callable[[bytes], None], on_resubscribed: Callable[[], None]
    ) -> None:
        self._slots.watch(channel, on_message, on_resubscribed)

    def drop_stalled(self) -> None:
        return None

    async def commands(self) -> resp.RespConnection:
        return await self._link().commands()

    def degraded(self, exc: BaseException, part: str = "commands") -> None:
        reason = f"redis: {exc.__class__.__name__}: {exc}"
        if self._slots.home_faults.get(part) != reason:
            logs.log("error", "broker_degraded", "broker", part=f"state {part}", reason=reason)
        self._slots.home_faults[part] = reason
        self._slots.request_refresh()

    def recovered(self, part: str) -> None:
        if self._slots.home_faults.pop(part, None) is not None:
            logs.log("info", "broker_recovered", "broker", part=f"state {part}")


class SlotsBroker:
    """The Redis broker of cluster mode (see the module docstring): `redis.RedisBroker`'s
    scripts and answers, routed by hash slot."""

    name = "redis"

    def __init__(
        self,
        hub: Any,
        slots: Slots,
        cluster: Any,
        *,
        history_ttl_s: float,
        dedup_ttl_s: float,
        channel_state_ttl_s: float = 86400,
    ) -> None:
        self._hub = hub
        self._slots = slots
        self._cluster = cluster
        self._history_ttl_ms, self._dedup_ttl_ms, self._state_ttl_ms = channel_ttls_ms(
            history_ttl_s, dedup_ttl_s, channel_state_ttl_s
        )
        self._ttls = (self._history_ttl_ms, self._dedup_ttl_ms, self._state_ttl_ms)
        #: this loop pass's publishes, by slot
        self._batches: dict[int, list[Pending]] = {}
        #: one lane per master (its parked batches), by link
        self._lanes: dict[RedisLink, _Lane] = {}
        #: channels with members here -> the link their subscription is on (or being made)
        self._subs: dict[str, RedisLink] = {}
        #: channels whose subscription was lost (slot moved, master gone): not yet back
        self._lost: set[str] = set()
        self._moving: set[str] = set()
        #: the compressed variants this worker made, by channel (`redis.deliver`)
        self._packed: dict[str, PackedCache] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        slots.load_scripts(_PUBLISH_SHARDED, _POSITION)
        slots.listen(self._on_message, self._on_lost)
        slots.on_topology = self._follow
        slots.unsettled = lambda: bool(self._lost)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._slots.start()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._slots.close()

    def health(self) -> tuple[str, str]:
        state = self._slots.health()
        if state[0] == "healthy" and self._lost:
            return ("degraded", BROKER_CLUSTER_DEGRADED)
        return state

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    # -- publish ---------------------------------------------------------------------------

    def publish(
        self, channel: Any, sender: Any, sequence: int, content: str
    ) -> asyncio.Future[PublishResult]:
        name: str = channel.name
        call = publish_args(channel, sender, sequence, content, pub_channel(name))
        loop = self._loop or asyncio.get_running_loop()
        done: asyncio.Future[PublishResult] = loop.create_future()
        slot = self._slots.slot(name)
        batch = self._batches.get(slot)
        if batch is None:
            if not self._batches:
                loop.call_soon(self._send_batches)
            batch = self._batches[slot] = []
        batch.append((call, done))
        return done

    def _send_batches(self) -> None:
        batches, self._batches = self._batches, {}
        for slot, batch in batches.items():
            for start in range(0, len(batch), BATCH_MAX):
                self._send(slot, batch[start : start + BATCH_MAX], None, 0)

    def _send(
        self,
        slot: int,
        batch: list[Pending],
        link: RedisLink | None,
        hops: int,
        asking: bool = False,
        how: str = "EVALSHA",
    ) -> None:
        """Send one slot's batch to its master (or to `link`, named by a redirect)."""
        if link is None:
            link = self._slots.link_of(slot)
        if link is None:
            self._slots.request_refresh()
            unpublished(batch, RedisConnectionError("redis cluster: the slot has no master"))
            return
        lane = self._lanes.get(link)
        if lane is None:
            lane = self._lanes[link] = _Lane(link)
        conn = None if lane.parked else link.usable_now()
        if conn is None:
            lane.parked += 1
            self._spawn(self._send_when_connected(lane, slot, batch, hops, asking, how))
            return
        self._write(conn, link, slot, batch, hops, asking, how)

    async def _send_when_connected(
        self, lane: _Lane, slot: int, batch: list[Pending], hops: int, asking: bool, how: str
    ) -> None:
        try:
            conn = await lane.link.commands()
        except (RedisError, OSError) as exc:
            self._slots.request_refresh()
            unpublished(batch, exc)
            return
        except BaseException:
            unpublished(batch, RedisConnectionError("the broker is closing"))
            raise
        finally:
            lane.parked -= 1
        self._write(conn, lane.link, slot, batch, hops, asking, how)

    def _write(
        self,
        conn: resp.RespConnection,
        link: RedisLink,
        slot: int,
        batch: list[Pending],
        hops: int,
        asking: bool,
        how: str,
    ) -> None:
        keys = [key for call, _ in batch for key in call[:3]]
        args = [arg for call, _ in batch for arg in call[3:]]
        script = _PUBLISH_SHARDED_SHA if how == "EVALSHA" else _PUBLISH_SHARDED
        handler = partial(self._published, link, slot, batch, hops, asking, how)
        try:
            if asking:
                conn.request(_ignore, "ASKING")
            conn.request(handler, how, script, len(keys), *keys, *self._ttls, new_epoch(), *args)
        except RedisError as exc:
            handler(None, exc)

    def _published(
        self,
        link: RedisLink,
        slot: int,
        batch: list[Pending],
        hops: int,
        asking: bool,
        how: str,
        reply: Any,
        exc: BaseException | None,
    ) -> None:
        """The script's answer: settled; a redirect followed; anything else fails the batch
        (BrokerUnavailable, never a false ack)."""
        if exc is None:
            settle(batch, reply)
            return
        if isinstance(exc, NoScriptError) and how == "EVALSHA":
            # on the node an ASK named: ASKING again, else it answers MOVED (to the source)
            self._send(slot, batch, link, hops, asking=asking, how="EVAL")
            return
        redirect = _redirect(exc)
        if redirect is not None and hops < MAX_HOPS:
            kind, addr = redirect
            if kind == "MOVED":
                self._slots.moved(slot, addr)
            target = None if kind == "TRYAGAIN" else self._slots.links.get(addr)
            if target is not None:
                # sent now, not from a task: a publish of this slot made in this loop pass
                # goes to `addr` too (the table says so now) and must go after it (a
                # sender's order); a master with no link yet refuses those meanwhile
                self._send(slot, batch, target, hops + 1, asking=kind == "ASK")
            else:
                self._spawn(self._follow_redirect(slot, batch, hops + 1, kind, addr))
            return
        if not isinstance(exc, ResponseError):
            link.degraded(exc)
        self._slots.request_refresh()
        unpublished(batch, exc)

    async def _follow_redirect(
        self, slot: int, batch: list[Pending], hops: int, kind: str, addr: str
    ) -> None:
        try:
            if kind == "TRYAGAIN":  # keys of the slot half migrated: soon all on one side
                await asyncio.sleep(0.05)
                link = None
            else:
                link = await self._slots.link_at(addr)
        except (RedisError, OSError) as exc:
            unpublished(batch, exc)
            return
        except BaseException:
            unpublished(batch, RedisConnectionError("the broker is closing"))
            raise
        self._send(slot, batch, link, hops, asking=kind == "ASK")

    # -- positions and recovery ------------------------------------------------------------

    async def _script(self, slot: int, script: str, sha: str, numkeys: int, args: list[Any]) -> Any:
        """Run a script on `slot`'s master, following redirects."""
        link = self._slots.link_of(slot)
        asking = False
        for _hop in range(MAX_HOPS + 1):
            if link is None:
                link = await self._slots.master(slot)
            conn = await link.commands()
            try:
                if asking:
                    await conn.call("ASKING")
                try:
                    return await conn.call("EVALSHA", sha, numkeys, *args)
                except NoScriptError:
                    if asking:
                        await conn.call("ASKING")
                    return await conn.call("EVAL", script, numkeys, *args)
            except ResponseError as exc:
                redirect = _redirect(exc)
                if redirect is None:
                    raise
                kind, addr = redirect
                asking = kind == "ASK"
                if kind == "MOVED":
                    self._slots.moved(slot, addr)
                if kind == "TRYAGAIN":
                    await asyncio.sleep(0.05)
                else:
                    link = await self._slots.link_at(addr)
        raise RedisConnectionError("redis cluster: too many redirects")

    async def _subscribe(self, channel: str) -> None:
        """Subscribe to `channel`'s publications on its slot's master (again on the new one
        when Redis says the slot moved) and remember where."""
        slot = self._slots.slot(channel)
        target = pub_channel(channel)
        for _ in range(MAX_HOPS):
            link = await self._slots.master(slot)
            old = self._subs.get(channel)
            if old is not None and old is not link and old in self._slots.links.values():
                old.unsubscribe([target])
            self._subs[channel] = link
            try:
                await link.subscribe(target)
                return
            except ResponseError as exc:
                if _redirect(exc) is None:
                    self._lost.add(channel)  # members here may rely on it: not healthy
                    raise
                await self._slots.refreshed()
            except (RedisError, OSError):
                self._lost.add(channel)
                raise
        self._lost.add(channel)
        raise RedisConnectionError("redis cluster: too many redirects")

    async def recover(self, channel: str, since: int | None, epoch: str | None) -> Recovery:
        await self._subscribe(channel)
        since_arg = -1 if since is None else since
        ch = self._hub.channel(channel)
        size = -1 if ch is None else ch.config.history_size
        slot = self._slots.slot(channel)
        answer = await self._script(
            slot,
            _POSITION,
            _POSITION_SHA,
            2,
            [*_keys(channel), since_arg, new_epoch(), self._state_ttl_ms, size],
        )
        return recovery(since, epoch, answer, self._packed.get(channel))

    async def position(self, channel: str) -> tuple[int, str]:
        try:
            offset, epoch, _ = await self._script(
                self._slots.slot(channel),
                _POSITION,
                _POSITION_SHA,
                2,
                [*_keys(channel), -1, new_epoch(), self._state_ttl_ms, -1],
            )
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"channel position not read: {exc}") from exc
        return (int(offset), epoch.decode())

    async def forget(self, channel: str) -> None:
        self._packed.pop(channel, None)
        link = self._slots.link_of(self._slots.slot(channel))
        try:
            if link is None:
                raise RedisConnectionError("redis cluster: the slot has no master")
            await link.redis.delete(*_keys(channel))
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"channel history not deleted: {exc}") from exc

    # -- subscriptions ---------------------------------------------------------------------

    def sweep(self) -> None:
        """Unsubscribe from channels that no longer have a member on this worker."""
        for name, link in list(self._subs.items()):
            ch = self._hub.channel(name)
            if ch is None or ch.member_count == 0:
                del self._subs[name]
                self._lost.discard(name)
                self._packed.pop(name, None)
                link.unsubscribe([pub_channel(name)])

    def _on_lost(self, target: str) -> None:
        """A link's subscription to `target` was dropped or refused by Redis (its slot
        moved): made again on the slot's master once the table is read again."""
        name = target[len(PUB) + 1 : -1]
        if name in self._subs:
            self._lost.add(name)
            self._slots.request_refresh()

    def _follow(self) -> None:
        """The table was read: every subscription whose slot is served by another master
        now (or that was lost) is made again there."""
        links = set(self._slots.links.values())
        for gone in [k for k, lane in self._lanes.items() if k not in links and not lane.parked]:
            del self._lanes[gone]
        for name, link in list(self._subs.items()):
            owner = self._slots.link_of(self._slots.slot(name))
            if link not in links:
                self._lost.add(name)  # its master is gone: what it sent meanwhile is missed
            if owner is not link or name in self._lost:
                self._lost.add(name)
                if owner is not None and name not in self._moving:
                    self._moving.add(name)
                    self._spawn(self._move(name))

    async def _move(self, name: str) -> None:
        try:
            await self._subscribe(name)
            self._lost.discard(name)
        except (RedisError, OSError):
            pass  # still lost: /health says so; tried again after the next read of the table
        finally:
            self._moving.discard(name)

    def _on_message(self, target: bytes, data: bytes) -> None:
        """A publication from a master's subscriber: to this worker's members of its
        channel (not to its sender when that is here and does not want its echo)."""
        ch = self._hub.channel(target[len(PUB_B) + 1 : -1].decode())
        if ch is None:
            return
        deliver(self._hub, self._cluster, ch, data, self._packed)


def _ignore(reply: Any, exc: BaseException | None) -> None:
    """The answer to ASKING (an error there shows in the call after it)."""
