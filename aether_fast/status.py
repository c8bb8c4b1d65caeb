"""Status: this worker's figures, and the node's and the cluster's made from them.

What it owns: this worker's identity (`node_id`, `worker_id`) and uptime, its messages per
second (measured by the Node's timer, `measure_rates`), its count of open connections per
limit key (kept by the Node's connection limit, published in the cluster table), its row
of the cluster table (`local_figures`), the rows of this node's workers (`node_workers`),
`total` (the one sum of a figure over this worker and the others, which `metrics.py` uses
too), the counts of `system/status` (`status_counts`), the body of `/ws/status` and the
health of `/health`.
Rule: nothing here is called per message: the Hub's C counters are read when a figure is
asked for. It changes nothing but its own counts; it reads the Hub, the broker (its
health), the cluster (this worker's names, the other workers' rows) and the drain flag of
`Operations`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aether_fast._core import Hub, compression_stats
from aether_fast.brokers.base import Broker
from aether_fast.brokers.cluster import Cluster
from aether_fast.operations import Operations


@dataclass(slots=True)
class Rates:
    """Messages per second, measured by the Node's timer from the Hub's counters."""

    published_prev: int = 0
    stamp: float = field(default_factory=time.monotonic)
    per_second: float = 0.0


def compression_ratio(compressed: float, plain: float) -> float:
    """Compressed bytes per input byte of the compressions (0.0 before any)."""
    return round(compressed / plain, 4) if plain else 0.0


def total(figure: str, rows: Iterable[dict[str, Any]]) -> Any:
    """`figure` (a field of `Status.local_stats`) summed over cluster-table rows: this
    worker's (`Status.local_figures`) and the other workers' (`Cluster.remote_table`). A row
    without it (another version's) counts 0."""
    return sum(row["stats"].get(figure, 0) for row in rows)


class Status:
    def __init__(self, hub: Hub, broker: Broker, cluster: Cluster, operations: Operations) -> None:
        self.hub = hub
        self.broker = broker
        self.cluster = cluster
        self.operations = operations
        self.started_at = time.time()
        self.node_id: str = cluster.node_id
        self.worker_id: str = cluster.worker_id
        self.rates = Rates()
        self._per_key: dict[str, int] = {}

    # -- kept by the Node ------------------------------------------------------------------

    def measure_rates(self) -> None:
        """Once a second (the Node's timer): messages per second since the last call."""
        now = time.monotonic()
        published = self.hub.messages_published
        dt = now - self.rates.stamp
        if dt > 0:
            self.rates.per_second = (published - self.rates.published_prev) / dt
        self.rates.published_prev = published
        self.rates.stamp = now

    def connections_of(self, key: str) -> int:
        """Open connections of limit key `key` (node.limit_key) on this worker."""
        return self._per_key.get(key, 0)

    def connection_opened(self, key: str) -> None:
        self._per_key[key] = self._per_key.get(key, 0) + 1

    def connection_closed(self, key: str) -> int:
        """One connection of `key` fewer; returns how many it still has here."""
        left = self._per_key.pop(key, 1) - 1
        if left > 0:
            self._per_key[key] = left
        return max(left, 0)

    # -- figures ---------------------------------------------------------------------------

    def health(self) -> tuple[str, str]:
        if self.operations.shutting_down:
            return ("down", "shutting_down")
        return self.broker.health()

    def local_stats(self) -> dict[str, Any]:
        """This worker's figures (also what it publishes to the cluster table)."""
        return {
            "node": self.node_id,
            "worker": self.worker_id,
            "pid": os.getpid(),
            "connections_active": self.hub.active_connections,
            "connections_total": self.hub.connections_total,
            "messages_per_second": round(self.rates.per_second, 2),
            "messages_received": self.hub.messages_in,
            "messages_published": self.hub.messages_published,
            "deliveries": self.hub.deliveries,
            "bytes_out": self.hub.bytes_out,
            **self.compression_figures(),
            "rate_limited": self.hub.rate_limited,
            "slow_reader_closes": self.hub.slow_reader_closes,
            "errors": self.hub.errors_total,
            "errors_by_code": self.hub.error_counts_snapshot(),
            "channels": len(self.hub.channel_names()),
            "uptime_s": round(time.time() - self.started_at, 3),
            "healthy": self.health()[0] == "healthy",
        }

    def compression_figures(self) -> dict[str, Any]:
        """permessage-deflate: the fan-out bytes had nothing been compressed, the deliveries
        that got a compressed frame, and the compressions themselves (one per publication
        and window size in use): their input and output bytes, ratio and time; and the
        compressed messages clients sent that were inflated."""
        z = compression_stats()
        return {
            "bytes_out_uncompressed": self.hub.bytes_out_plain,
            "deliveries_compressed": self.hub.deliveries_compressed,
            "compressions": z["compressions"],
            "compress_bytes_in": z["compress_bytes_in"],
            "compress_bytes_out": z["compress_bytes_out"],
            "compress_seconds": round(z["compress_seconds"], 6),
            "compression_ratio": compression_ratio(z["compress_bytes_out"], z["compress_bytes_in"]),
            "messages_inflated": z["inflated_messages"],
        }

    def local_figures(self) -> dict[str, Any]:
        """This worker's row of the cluster table (the Node answers the broker with it)."""
        members = {}
        for name in self.hub.channel_names():
            ch = self.hub.channel(name)
            if ch is not None and ch.member_count:
                members[name] = ch.member_count
        return {"stats": self.local_stats(), "conns": dict(self._per_key), "members": members}

    def node_workers(self) -> list[dict[str, Any]]:
        """The rows of every live worker of this node (this one first)."""
        others = self.cluster.remote_table()
        mine = [w for w in others.values() if w["stats"].get("node") == self.node_id]
        return [self.local_figures(), *mine]

    def status_counts(self) -> dict[str, Any]:
        """The counts of `system/status` and `/ws/status`: this node's workers together."""
        workers = self.node_workers()
        channels = set(self.hub.channel_names())
        for w in workers[1:]:
            channels.update(w["members"])
        return {
            "connections": {
                "active": total("connections_active", workers),
                "total": total("connections_total", workers),
            },
            "channels": {
                "active": len(channels),
                "messages_per_second": round(total("messages_per_second", workers), 2),
            },
        }

    def status(self) -> dict[str, Any]:
        """The body of `/ws/status`."""
        state, reason = self.health()
        body: dict[str, Any] = {"status": state, **self.status_counts()}
        body["uptime_s"] = round(time.time() - self.started_at, 3)
        body["broker"] = self.broker.name
        body["node"] = self.node_id
        body["answered_by"] = self.worker_id
        workers = self.node_workers()
        body["workers"] = [w["stats"] for w in workers]
        cluster = self.cluster.remote_table()
        if cluster:
            body["cluster"] = {
                "workers": len(cluster) + 1,
                "nodes": len({w["stats"].get("node") for w in cluster.values()} | {self.node_id}),
                "connections": total("connections_active", [workers[0], *cluster.values()]),
            }
        if reason:
            body["reason"] = reason
        return body
