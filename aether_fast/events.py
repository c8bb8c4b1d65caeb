"""The upward interfaces: the only calls a lower layer makes on the control plane.

Everything else goes down (the Node calls the sessions, the Hub, the broker and the
cluster). Two parts call back up, each through one of these protocols, and the Node
implements both:
- `SessionEvents`, through `Hub.node`: what a `Session` (ext/session.pxi) reports;
- `ClusterEvents`, given to `Cluster.bind` (brokers/cluster.py): what the cluster of workers
  asks of this one.
`app.py` wires them (`wire`), so no part sets up its own callers. docs/architecture.md
"Calls back up" says when each call is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from aether_fast._core import Connection, Session
    from aether_fast.stores.base import ChannelConfig


class SessionEvents(Protocol):
    """What a session reports to the control plane (none of it per publication)."""

    def on_open(self, s: Session) -> None:
        """The WebSocket is open (picows' `on_ws_connected`)."""
        ...

    def on_close(self, s: Session) -> None:
        """The connection is gone, whatever closed it."""
        ...

    def on_control(self, s: Session, mtype: object, action: object, data: dict[str, Any]) -> None:
        """A valid message that is not `message/send` or `message/retry`."""
        ...

    def security_event(self, s: Connection, event: str, reason: str) -> None:
        """A refusal worth a security log line (`rate_limited`, `rate_limit_close`,
        `slow_reader`); `s` is a Session, or the EchoSession of `ECHO_PATH`."""
        ...


class ClusterEvents(Protocol):
    """What the cluster asks of this worker (`RedisCluster`, for itself and for the Redis
    broker's subscriber; `SingleWorker`, the memory broker's, asks nothing)."""

    def local_session(self, identity: str | None, client_id: str) -> Session | None:
        """The live local session of (Session.identity, client_id), if this worker has it."""
        ...

    def on_config_change(self, name: str, cfg: ChannelConfig | None) -> None:
        """Another worker changed (cfg) or deleted (None) channel `name`."""
        ...

    def local_figures(self) -> dict[str, Any]:
        """This worker's row of the cluster table, sent each second."""
        ...
