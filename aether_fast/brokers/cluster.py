"""The cluster contract: what this worker knows of the other workers, apart from messages.

A `Cluster` names this worker (`node_id`, `worker_id`), answers the Node's questions about
the others (connections per limit key, members per channel, their latest figures) and is the
one part that calls back up with `events.ClusterEvents`: `app.wire` hands it the Node
(`bind`). The message log (publish, recover, history) is the `Broker`'s (`base.py`).

It lives here, beside `base.py`, because each implementation comes with a broker and shares
its backend: `SingleWorker` below goes with the memory broker (one worker: nobody else to
know about), `redis_cluster.RedisCluster` with the Redis broker (the cluster table and the
channel configs in the same Redis, over the same connections, `redis_link.py`).
"""

from __future__ import annotations

import os
import socket
from typing import Any, Protocol

from aether_fast.events import ClusterEvents


class Cluster(Protocol):
    """One interface for one worker alone and for workers meeting in Redis."""

    #: this machine's name in the cluster (status, metrics)
    node_id: str
    #: this worker's name: unique among the live workers of the cluster
    worker_id: str

    async def start(self) -> None:
        """Join the cluster (called after `Broker.start`, which opens the connections)."""
        ...

    async def close(self) -> None:
        """Leave the cluster (called before `Broker.close`)."""
        ...

    def bind(self, node: ClusterEvents) -> None:
        """Called once by `app.wire`: the worker the cluster may call back
        (`events.ClusterEvents`: local_session, on_config_change, local_figures)."""
        ...

    def remote_connections(self, key: str) -> int:
        """Connections of user/IP `key` on other workers (0 with one worker)."""
        ...

    def remote_members(self, channel: str) -> int:
        """Members of `channel` on other workers (0 with one worker)."""
        ...

    def remote_table(self) -> dict[str, dict[str, Any]]:
        """Every other live worker's latest figures, by worker id ({} with one worker)."""
        ...


class SingleWorker:
    """The cluster of one worker (the memory broker): there is no other worker, so nothing
    to ask, to count or to be told; `bind` keeps nothing."""

    def __init__(self) -> None:
        self.node_id = socket.gethostname()
        self.worker_id = f"{self.node_id}:{os.getpid()}"

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def bind(self, node: ClusterEvents) -> None:
        return None  # one worker: nothing to ask it

    def remote_connections(self, key: str) -> int:
        return 0

    def remote_members(self, channel: str) -> int:
        return 0

    def remote_table(self) -> dict[str, dict[str, Any]]:
        return {}
