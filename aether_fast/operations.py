"""Operations: what the REST routes (docs/operations.md §4) and the shutdown do to channels
and connections.

What it owns: channel configs stored and applied (`configure_channel`, `apply_config`,
`delete_channel`), the removal of members a change no longer allows (a delete, a
`require_auth` switch, and for the Node a narrower refreshed token: `evict`), the admin
broadcast (also what a client's `system/broadcast` sends), the channel views of
`/ws/channels`, the shutdown notice and the drain flag (`shutting_down`), and the presence
frame (`presence`, which the Node sends too).
Rule: like the Node, it never touches a socket; it talks to clients only through
`Session.send_*`, `Session.close` and `Hub.deliver`. It knows neither the Node nor the
routes: the Node and the routes call it, and `app.py` builds it.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

from aether_fast import logs, protocol
from aether_fast._core import Channel, Hub, Session, encode_json_frame
from aether_fast.brokers.base import Broker
from aether_fast.protocol import CloseCode
from aether_fast.stores.base import ChannelConfig, Store

T = TypeVar("T")

#: The `reason` of a connection/disconnect the server sends when it removes a member
#: (docs/protocol.md §4), and the system/status warning that follows it.
REMOVED_DELETED = "channel deleted"
REMOVED_NOT_ALLOWED = "not allowed by the new token"
REMOVED_AUTH_REQUIRED = "channel requires auth"
_REMOVED_TEXT = {
    REMOVED_DELETED: "channel {} was deleted",
    REMOVED_NOT_ALLOWED: "removed from channel {}: the refreshed token does not allow it",
    REMOVED_AUTH_REQUIRED: "removed from channel {}: it now requires a token",
}


async def _maybe(value: T | Awaitable[T]) -> T:
    """The value of a call that a synchronous part answers at once and an asynchronous
    part (the Redis broker) answers later."""
    if isinstance(value, Awaitable):
        return await value
    return value


def presence(hub: Hub, ch: Channel, s: Session, action: str) -> None:
    """Tell the other members of `ch` that `s` joined (`connect`) or left (`disconnect`)."""
    frame = encode_json_frame(protocol.presence(action, s.client_id, s.user_id, ch.name))
    hub.deliver(ch, frame, s)


class Operations:
    def __init__(self, hub: Hub, broker: Broker, store: Store) -> None:
        self.hub = hub
        self.broker = broker
        self.store = store
        #: set by `begin_shutdown`: the Node admits no one, health answers down
        self.shutting_down = False

    def broadcast(self, message: str, severity: str, channel: str | None) -> int:
        """Send a system/broadcast notice to every connection, or to one channel's members.
        Returns how many connections it was queued for."""
        frame = encode_json_frame(protocol.broadcast(message, severity, channel))
        if channel is None:
            n: int = self.hub.deliver_all(frame)
            return n
        ch = self.hub.channel(channel)
        if ch is None:
            return 0
        count: int = ch.member_count
        self.hub.deliver(ch, frame, None)
        return count

    async def configure_channel(self, cfg: ChannelConfig) -> bool:
        """Store `cfg` (True: created) and apply it to the live channel."""
        created = await _maybe(self.store.put(cfg))
        self.apply_config(cfg)
        return created

    def apply_config(self, cfg: ChannelConfig) -> None:
        """A config changed (here, or on another worker): the live channel takes it, and a
        channel that now requires auth loses its anonymous members (they are told)."""
        ch = self.hub.channel(cfg.name)
        if ch is None:
            return
        self.hub.add_channel(cfg.name, cfg)
        if cfg.require_auth:
            anonymous = [m for m in ch.member_list() if m.claims is None]
            for m in anonymous:
                self.evict(m, cfg.name, REMOVED_AUTH_REQUIRED)
            if anonymous:
                logs.log(
                    "info",
                    "members_removed",
                    "node",
                    channel=cfg.name,
                    count=len(anonymous),
                    reason=REMOVED_AUTH_REQUIRED,
                )

    async def delete_channel(self, name: str) -> bool:
        """Delete the config, remove this worker's members (they are told), drop history."""
        existed = await _maybe(self.store.delete(name))
        removed = self.remove_members(name)
        if existed or removed:
            await _maybe(self.broker.forget(name))
        return existed or removed

    def remove_members(self, name: str) -> bool:
        """Remove every local member of channel `name`, telling each; False if none."""
        removed: list[Session] = self.hub.drop_channel(name)
        for s in removed:
            self._tell_removed(s, name, REMOVED_DELETED)
        return bool(removed)

    def evict(self, s: Session, name: str, reason: str) -> None:
        """Remove `s` from channel `name` (the server's decision, not its own leave): the
        other members see it leave (presence), and it is told why (`reason`, one of the
        REMOVED_* above)."""
        ch = self.hub.channel(name)
        if ch is not None and ch.presence:
            presence(self.hub, ch, s, "disconnect")
        self.hub.leave(s, name)
        self._tell_removed(s, name, reason)

    def _tell_removed(self, s: Session, name: str, reason: str) -> None:
        """The notice of a removal: connection/disconnect with `reason` (a client does not
        rejoin), then a system/status warning saying it in words."""
        s.send_json(protocol.disconnected(s.client_id, s.user_id, name, reason))
        s.send_json(protocol.status(_REMOVED_TEXT[reason].format(name), "warning"))

    async def channel_view(self, name: str) -> dict[str, Any] | None:
        stored = self.store.get(name)
        live: Channel | None = self.hub.channel(name)
        if stored is None and live is None:
            return None
        cfg: ChannelConfig = stored if stored is not None else live.config  # type: ignore[union-attr]
        offset, epoch = await _maybe(self.broker.position(name))
        return {
            **cfg.to_json(),
            "configured": stored is not None,
            "members": live.member_count if live is not None else 0,
            "messages": live.published if live is not None else 0,
            "offset": offset,
            "epoch": epoch,
        }

    async def channel_views(self) -> list[dict[str, Any]]:
        names = {c.name for c in self.store.list()} | set(self.hub.channel_names())
        views = [await self.channel_view(n) for n in sorted(names)]
        return [v for v in views if v is not None]

    def begin_shutdown(self) -> int:
        """Tell every client the server is going away and close each with 1001."""
        self.shutting_down = True
        connections = self.hub.session_list()
        notice = protocol.status("server shutting down", "warning")
        for c in connections:
            if isinstance(c, Session):
                c.send_json(notice)
            c.close(CloseCode.GOING_AWAY, "server shutting down")
        return len(connections)
