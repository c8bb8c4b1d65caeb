"""The Node: one worker's session control plane, between the compiled Hub and the Python parts.

What it owns: everything a session does that is not `message/send` (open, join with ACLs,
auto-create, channel caps and recovery, leave, refresh, `system/status`, a client's
`system/broadcast`, close), replacement of a duplicate client_id, the per-user connection
limit and inbound budgets, presence notices on join, leave and close, and the
once-a-second timer. It uses two parts below it, which `app.py` builds and hands it:
`Operations` (operations.py: removals, broadcasts, channel configs) and `Status`
(status.py: the figures and the per-key connection counts).
Rule: the Node never touches a socket; it talks to clients only through `Session.send_*`,
`Session.close` and `Hub.deliver`, so every frame keeps its place in the member's outbox.
The sessions and the cluster call back up only through `events.SessionEvents` and
`events.ClusterEvents`, which the Node implements (answering `on_config_change` through
`Operations`, `local_figures` through `Status`); `app.wire` connects them.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Coroutine
from typing import Any

from aether_fast import logs, protocol
from aether_fast._core import Budget, Channel, Connection, Hub, Session
from aether_fast.auth import Authenticator, AuthError, Claims, channel_allowed
from aether_fast.brokers.base import BROKER_UNAVAILABLE, Broker, Recovery
from aether_fast.brokers.cluster import Cluster
from aether_fast.config import Config
from aether_fast.operations import REMOVED_NOT_ALLOWED, Operations, presence
from aether_fast.protocol import (
    CLIENT_MESSAGES,
    CloseCode,
    ErrorCode,
    Invalid,
    optional_offset,
    optional_str,
    require_channel,
    require_severity,
    require_str,
)
from aether_fast.status import Status
from aether_fast.stores.base import ChannelConfig, Store, default_channel_config

_CONTROL = CLIENT_MESSAGES - {("message", "send"), ("message", "retry")}

#: Starts the identity of an anonymous session; the 64 random bits after it are never shown,
#: so no client (anonymous, or with any `sub`) can name another connection's identity.
ANONYMOUS = "\x1e"


def limit_key(user_id: str | None, peer: str) -> str:
    """Whose connections and inbound budget a session counts in: `u:<sub>` for a token's
    user, `ip:<address>` for an anonymous client. The two are kept apart by their prefix:
    a token whose sub is `ip:1.2.3.4` is a user, never the anonymous clients of that
    address. The keys are also those of the cluster table
    (brokers/redis_cluster.py `CONNS_SUFFIX`)."""
    return f"ip:{peer}" if user_id is None else f"u:{user_id}"


class Node:
    def __init__(
        self,
        config: Config,
        hub: Hub,
        broker: Broker,
        cluster: Cluster,
        store: Store,
        auth: Authenticator,
        status: Status,
        operations: Operations,
    ) -> None:
        self.config = config
        self.hub = hub
        self.broker = broker
        self.cluster = cluster
        self.store = store
        self.auth = auth
        self.status = status
        self.operations = operations
        # inbound budgets by limit key: kept while the key has a connection here, and after
        # its last one closes until full again (swept by the timer), so reconnecting does
        # not refill them; `_idle` holds (when surely full, key) of keys left without one
        self._budgets: dict[str, Budget] = {}
        self._idle: deque[tuple[float, str]] = deque()
        self._live: dict[tuple[object, str], Session] = {}
        self._timer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._dropped_at = -1.0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().create_task(self._tick_forever())

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            await asyncio.gather(self._timer, return_exceptions=True)
        logs.SECURITY.flush(force=True)  # the counts of the last second are not lost

    async def _tick_forever(self) -> None:
        ticks = 0
        interval = self.config.ping_interval_s
        last_ping = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            ping_round = interval > 0 and time.monotonic() - last_ping >= interval - 0.5
            if ping_round:
                last_ping = time.monotonic()
            try:
                self.hub.tick(time.time(), ping_round)
                self._sweep_budgets()
                self.status.measure_rates()
                logs.SECURITY.flush()
                if ticks % 10 == 0:
                    self.broker.sweep()
                    self.hub.drop_empty()
            except Exception as exc:  # the timer must survive a bug in one round
                logs.log("error", "timer_failed", "node", error=repr(exc))

    # -- sessions --------------------------------------------------------------------------

    @property
    def shutting_down(self) -> bool:
        """The worker is draining (`Operations.begin_shutdown`): no one is admitted."""
        return self.operations.shutting_down

    def new_client_id(self) -> str:
        return secrets.token_hex(8)

    def on_open(self, s: Session) -> None:
        if s.auth_error is not None:
            code, reason = s.auth_error
            self._refuse(s, code, "authentication failed", reason, CloseCode.AUTH)
            return
        if self.shutting_down:
            s.send_error(ErrorCode.SERVER_BUSY, "server is shutting down", "node", "shutdown", None)
            s.close(CloseCode.GOING_AWAY, "server shutting down")
            return
        if s.claims is not None:
            s.expires_at = s.claims.expires_at + self.config.jwt_leeway_s
        else:
            # an anonymous client proves nothing: it replaces nobody and shares no one's
            # dedupe window, whatever client_id it names (docs/protocol.md §6)
            s.identity = ANONYMOUS + secrets.token_hex(8)
        live_key = (s.identity, s.client_id)
        old = self._live.get(live_key)
        if old is not None:
            # the newer connection replaces the older one before limits are counted
            old.send_json(protocol.status("replaced by a newer connection", "warning"))
            old.close(CloseCode.REPLACED, "replaced by a newer connection")
            self._release_key(old)
        key = limit_key(s.user_id, s.peer)
        count = self.status.connections_of(key) + self.cluster.remote_connections(key)
        limit = self.config.rate_limit_connections
        if 0 < limit <= count:
            self.security_event(s, "connection_limit", f"{count} connections")
            s.send_error(
                ErrorCode.CONNECTION_LIMIT,
                "too many connections",
                "ratelimit",
                "connections",
                {"limit": limit},
            )
            s.close(CloseCode.CONNECTION_LIMIT, "connection limit")
            return
        self.status.connection_opened(key)
        s.limit_key = key
        s.budget = self._budget(key)
        self._live[live_key] = s
        logs.log("debug", "connection_opened", "node", client_id=s.client_id, user_id=s.user_id)
        initial: dict[str, Any] | None = s.initial
        if initial is not None:
            s.initial = None  # an idle connection keeps nothing it no longer needs
            refused = self.join(
                s, initial["channel"], initial.get("since"), initial.get("epoch"), opening=True
            )
            # the URL's channel is part of the upgrade: an auth refusal ends the connection
            if refused == ErrorCode.AUTH_REQUIRED:
                s.close(CloseCode.AUTH, "authentication required")
            elif refused == ErrorCode.FORBIDDEN:
                s.close(CloseCode.FORBIDDEN, "channel not allowed")
            return
        self._greet(s)

    def _greet(self, s: Session) -> None:
        """The first frame after open when no channel was joined with it."""
        s.send_json(protocol.connected(s.client_id, s.user_id, None, None, None))

    def _release_key(self, s: Session) -> None:
        key = s.limit_key
        if key is None:
            return
        s.limit_key = None
        if self.status.connection_closed(key) == 0 and key in self._budgets:
            # an empty budget is full again after one window at the latest
            self._idle.append((time.monotonic() + self.hub.conn_window, key))

    def _budget(self, key: str) -> Budget | None:
        """The inbound budget of `key`, shared by all its sessions on this worker (None when
        RATE_LIMIT_MESSAGES is 0: no limit)."""
        if self.hub.conn_capacity <= 0:
            return None
        budget = self._budgets.get(key)
        if budget is None:
            budget = Budget(self.hub.conn_capacity, self.hub.conn_window)
            self._budgets[key] = budget
        return budget

    def _sweep_budgets(self) -> None:
        """Forget the budgets of keys without a connection here once they are full again:
        memory is bounded by the keys seen within one RATE_LIMIT_WINDOW_S."""
        now = time.monotonic()
        idle = self._idle
        while idle and idle[0][0] <= now:
            _, key = idle.popleft()
            budget = self._budgets.get(key)
            # a key that connected again is live; one that left again has a later entry
            if budget is not None and not self.status.connections_of(key) and budget.full():
                del self._budgets[key]

    def local_session(self, identity: str | None, client_id: str) -> Session | None:
        """The live local session of (Session.identity, client_id), if this worker has it."""
        return self._live.get((identity, client_id))

    def local_figures(self) -> dict[str, Any]:
        """What this worker tells the cluster table each second (`Status.local_figures`)."""
        return self.status.local_figures()

    def on_config_change(self, name: str, cfg: ChannelConfig | None) -> None:
        """Another worker changed (cfg) or deleted (None) channel `name`."""
        if cfg is not None:
            self.operations.apply_config(cfg)
        else:
            self.operations.remove_members(name)

    def on_close(self, s: Session) -> None:
        for name in s.joined():
            ch = self.hub.channel(name)
            if ch is not None and ch.presence:
                presence(self.hub, ch, s, "disconnect")
        self._release_key(s)
        live_key = (s.identity, s.client_id)
        if self._live.get(live_key) is s:
            del self._live[live_key]

    def _refuse(self, s: Session, code: str, message: str, reason: str, close: int) -> None:
        self.security_event(s, "auth_failed", reason)
        s.send_error(code, message, "auth", reason, None)
        s.close(close, message)

    def security_event(self, s: Connection, event: str, reason: str) -> None:
        """Log a security event at warn, through the throttle of `logs.security`: at most a
        line a second per event, the rest counted, so a flood cannot flood the log."""
        logs.security(
            event,
            client_id=getattr(s, "client_id", None),
            user_id=getattr(s, "user_id", None),
            peer=s.peer,
            reason=reason,
        )

    # -- control messages ------------------------------------------------------------------

    def on_control(self, s: Session, mtype: object, action: object, data: dict[str, Any]) -> None:
        pair = (mtype, action)
        if not isinstance(mtype, str) or not isinstance(action, str) or pair not in _CONTROL:
            if not isinstance(mtype, str) or not isinstance(action, str):
                reason = "type and action must be strings"
            else:
                reason = f"unknown type/action: {mtype}/{action}"
            s.send_error(
                ErrorCode.INVALID_MESSAGE, "invalid message", "protocol", reason, {"field": "type"}
            )
            return
        try:
            if pair == ("connection", "connect"):
                channel = require_channel(data)
                self.join(s, channel, optional_offset(data, "since"), optional_str(data, "epoch"))
            elif pair == ("connection", "disconnect"):
                self.leave(s, require_channel(data))
            elif pair == ("connection", "refresh"):
                self.refresh(s, require_str(data, "token", 16384))
            elif pair == ("system", "status"):
                s.send_json(protocol.status("ok", "info", **self.status.status_counts()))
            else:
                self.client_broadcast(s, data)
        except Invalid as bad:
            details: dict[str, object] = {"field": bad.field}
            if isinstance(data.get("channel"), str):
                details["channel"] = data["channel"]
            s.send_error(bad.code, "invalid message", "protocol", bad.reason, details)

    def channel_config(self, name: str) -> ChannelConfig | None:
        """The config of channel `name`: live, stored, or the defaults if auto-create is on."""
        live: Channel | None = self.hub.channel(name)
        if live is not None:
            cfg: ChannelConfig = live.config
            return cfg
        stored = self.store.get(name)
        if stored is not None:
            return stored
        if self.config.channel_auto_create:
            return default_channel_config(name, self.config)
        return None

    def join(
        self,
        s: Session,
        name: str,
        since: int | None,
        epoch: str | None,
        opening: bool = False,
    ) -> str | None:
        """Join `s` to channel `name` and reply connection/connect (with recovery when
        `since` is given). On refusal the error is sent and its code returned."""
        cfg = self.channel_config(name)
        if cfg is None:
            return self._refuse_join(
                s, name, ErrorCode.CHANNEL_NOT_FOUND, "no such channel", opening
            )
        claims: Claims | None = s.claims
        if cfg.require_auth and claims is None:
            return self._refuse_join(s, name, ErrorCode.AUTH_REQUIRED, "this channel needs a token")
        if not channel_allowed(claims, name):
            return self._refuse_join(s, name, ErrorCode.FORBIDDEN, "token does not allow it")
        ch = self.hub.channel(name)
        # a member's re-join without `since` asks for the position only: its delivery goes
        # on untouched (no hold, no replay), so nothing on its way to it is dropped
        only_position = since is None and s.is_member(name)
        if not s.is_member(name):
            refused = self._over_channel_limit(s, name, ch is None, opening)
            if refused is not None:
                return refused
            if ch is None:
                ch = self.hub.add_channel(name, cfg)
            members = ch.member_count + self.cluster.remote_members(name)
            if 0 < ch.max_connections <= members:
                return self._refuse_join(
                    s, name, ErrorCode.CHANNEL_FULL, "max_connections", opening
                )
            self.hub.join(s, ch)
            if ch.presence:
                presence(self.hub, ch, s, "connect")
        recovery = self.broker.recover(name, since, epoch)
        if isinstance(recovery, Recovery):
            self._joined(s, name, since, recovery, only_position)
        else:
            # an asynchronous broker: live frames are held until the replay is sent, and
            # what the client sends until the reply (at open: the reply is its first frame;
            # later: a publication sent right after the join comes after it, not lost
            # below the position the join reads), docs/protocol.md §2
            if not only_position:
                s.hold(name)
            s.hold_messages(opening)
            self._spawn(self._join_later(s, name, since, recovery, opening, only_position))
        return None

    def _over_channel_limit(
        self, s: Session, name: str, new_channel: bool, opening: bool
    ) -> str | None:
        """Refuse (CHANNEL_LIMIT) a join past MAX_CHANNELS_PER_CONNECTION, or one that would
        add a live channel past MAX_CHANNELS; None when the join may go on."""
        per_connection = self.config.max_channels_per_connection
        if len(s.channels) >= per_connection:
            reason, limit = "channels_per_connection", per_connection
        elif new_channel and self._worker_full():
            reason, limit = "channels_per_worker", self.config.max_channels
        else:
            return None
        self.security_event(s, "channel_limit", f"{reason} {limit}")
        return self._refuse_join(
            s, name, ErrorCode.CHANNEL_LIMIT, reason, opening, {"limit": limit}
        )

    def _worker_full(self) -> bool:
        """MAX_CHANNELS live channels already. Channels left empty are dropped by the timer;
        at the cap they are dropped at once, at most once a second."""
        if self.hub.channel_count < self.config.max_channels:
            return False
        now = time.monotonic()
        if now - self._dropped_at >= 1.0:
            self._dropped_at = now
            self.hub.drop_empty()
        return self.hub.channel_count >= self.config.max_channels

    async def _join_later(
        self,
        s: Session,
        name: str,
        since: int | None,
        pending: Awaitable[Recovery],
        opening: bool = False,
        only_position: bool = False,
    ) -> None:
        try:
            await self._answer_join(s, name, since, pending, opening, only_position)
        finally:
            # the join's reply, or its error, is out: now what came meanwhile (once no
            # other join holds it)
            self._release_messages(s)

    async def _answer_join(
        self,
        s: Session,
        name: str,
        since: int | None,
        pending: Awaitable[Recovery],
        opening: bool,
        only_position: bool,
    ) -> None:
        try:
            recovery = await pending
        except Exception as exc:
            if not only_position:  # a member asking for the position stays one
                s.release(name, -1)
                self.hub.leave(s, name)
            # the exception's text names the broker's host: the broker logged it (once per
            # change, as broker_degraded); the client gets the reason code
            logs.log("debug", "join_failed", "broker", channel=name, error=repr(exc))
            if opening:
                self._greet(s)  # the connection stays open: it still gets its first frame
            s.send_error(
                ErrorCode.INTERNAL_ERROR,
                "cannot join channel: broker unavailable",
                "broker",
                BROKER_UNAVAILABLE,
                {"channel": name},
            )
            return
        if s.is_member(name):
            self._joined(s, name, since, recovery, only_position)  # the replay ends the holding
        elif not only_position:
            s.drop_held(name)

    def _release_messages(self, s: Session) -> None:
        """A join is answered: what the client sent meanwhile is handled now, in order, if
        no other join holds it. A bug there closes the connection (1011), as it would on
        arrival."""
        try:
            s.release_messages()
        except Exception as exc:
            logs.log("error", "held_messages_failed", "node", error=repr(exc))
            s.close(CloseCode.INTERNAL, "internal error")

    def _joined(
        self,
        s: Session,
        name: str,
        since: int | None,
        recovery: Recovery,
        only_position: bool = False,
    ) -> None:
        """The reply to a join, then the replay of missed publications (written as the
        socket drains; live publications of the channel wait for it, `Session.replay`).
        `only_position` (a member's re-join without `since`, so no frames): the reply alone,
        the member's live publications untouched."""
        frames, recovered = recovery.frames, recovery.recovered
        if frames and not s.replay_fits(name, frames):
            # the connection's replays already waiting, and this one, pass the cap: answered
            # as if the history were gone (the client reloads and continues from `offset`)
            frames, recovered = [], False
            self.security_event(s, "replay_limit", name)
        s.send_json(
            protocol.connected(
                s.client_id,
                s.user_id,
                name,
                recovery.offset,
                recovery.epoch,
                recovered if since is not None else None,
            )
        )
        if not only_position:
            s.replay(name, frames, recovery.offset)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refuse_join(
        self,
        s: Session,
        name: str,
        code: str,
        reason: str,
        opening: bool = False,
        extra: dict[str, object] | None = None,
    ) -> str:
        if code in (ErrorCode.AUTH_REQUIRED, ErrorCode.FORBIDDEN):
            self.security_event(s, code.lower(), name)
        elif opening:
            self._greet(s)  # the connection stays open: it still gets its first frame
        details: dict[str, object] = {"channel": name, **(extra or {})}
        s.send_error(code, f"cannot join channel: {reason}", "channel", reason, details)
        return code

    def leave(self, s: Session, name: str) -> None:
        if not s.is_member(name):
            s.send_error(
                ErrorCode.NOT_A_MEMBER,
                "not a member of this channel",
                "channel",
                "not a member",
                {"channel": name},
            )
            return
        ch = self.hub.channel(name)
        if ch is not None and ch.presence:
            presence(self.hub, ch, s, "disconnect")
        self.hub.leave(s, name)
        s.send_json(protocol.disconnected(s.client_id, s.user_id, name))

    def refresh(self, s: Session, token: str) -> None:
        try:
            claims = self.auth.verify(token)
        except AuthError as err:
            self.security_event(s, "refresh_failed", err.reason)
            s.send_error(err.code, "refresh token refused", "auth", err.reason, None)
            return
        if s.claims is not None and claims.user_id != s.user_id:
            self.security_event(s, "refresh_failed", "sub differs")
            s.send_error(
                ErrorCode.AUTH_INVALID,
                "refresh token refused",
                "auth",
                "the new token has another sub",
                None,
            )
            return
        if s.claims is None:
            s.send_error(
                ErrorCode.AUTH_INVALID,
                "refresh token refused",
                "auth",
                "an anonymous connection cannot refresh",
                None,
            )
            return
        s.claims = claims
        s.expires_at = claims.expires_at + self.config.jwt_leeway_s
        s.warned = False
        s.send_json(protocol.refreshed(claims.expires_at))
        # the new claims decide from now on: channels they no longer allow are left
        for name in s.joined():
            if not channel_allowed(claims, name):
                self.operations.evict(s, name, REMOVED_NOT_ALLOWED)

    def client_broadcast(self, s: Session, data: dict[str, Any]) -> None:
        claims: Claims | None = s.claims
        if claims is None or not claims.admin:
            self.security_event(s, "forbidden", "broadcast without admin")
            s.send_error(
                ErrorCode.FORBIDDEN, "broadcast needs an admin token", "auth", "not admin", None
            )
            return
        message = require_str(data, "message")
        severity = require_severity(data)
        channel = data.get("channel")
        if channel is not None:
            channel = require_channel(data)
        self.operations.broadcast(message, severity, channel)
