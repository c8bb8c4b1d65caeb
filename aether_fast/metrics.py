"""Metrics: the JSON figures of /metrics/* and the Prometheus exposition on METRICS_PORT.

What it owns: the shapes of those answers. The figures themselves are `Status`'s (status.py:
this worker's from the Hub's C counters, the others' from the cluster table), summed with
its one helper, `status.total`. Rule: nothing here is called per message; counters are
kept in C by the hot path and read only at scrape or request time (a prometheus-client
custom collector, no prometheus-client call per message).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from aether_fast._core import Hub
from aether_fast.config import Config
from aether_fast.http.front import Request, Response
from aether_fast.protocol import ErrorCode
from aether_fast.status import Status, compression_ratio, total


class Metrics:
    def __init__(self, hub: Hub, status: Status) -> None:
        self._hub = hub
        self._status = status

    def view(self, name: str, admin: bool = False) -> dict[str, Any]:
        """The JSON of /metrics/{name} for the whole node: every worker's figures summed
        (this worker's live, the others' from the cluster table, at most a second old).
        Figures only: channel names (the per-channel list) only when `admin`."""
        workers = self._status.node_workers()
        about = {
            "node": self._status.node_id,
            "answered_by": self._status.worker_id,
            "workers": len(workers),
        }
        if name == "connections":
            return {
                "active": total("connections_active", workers),
                "total": total("connections_total", workers),
                "slow_reader_closes": total("slow_reader_closes", workers),
                **about,
            }
        if name == "messages":
            return {
                "received": total("messages_received", workers),
                "published": total("messages_published", workers),
                "delivered": total("deliveries", workers),
                "bytes_out": total("bytes_out", workers),
                "bytes_out_uncompressed": total("bytes_out_uncompressed", workers),
                "compression": {
                    "compressions": total("compressions", workers),
                    "deliveries": total("deliveries_compressed", workers),
                    "bytes_in": total("compress_bytes_in", workers),
                    "bytes_out": total("compress_bytes_out", workers),
                    "ratio": compression_ratio(
                        total("compress_bytes_out", workers), total("compress_bytes_in", workers)
                    ),
                    "seconds": round(total("compress_seconds", workers), 6),
                    "inflated": total("messages_inflated", workers),
                },
                "rate_limited": total("rate_limited", workers),
                "messages_per_second": round(total("messages_per_second", workers), 2),
                **about,
            }
        if name == "channels":
            members: dict[str, int] = {}
            for w in workers:
                for cname, count in w["members"].items():
                    members[cname] = members.get(cname, 0) + count
            hub = self._hub
            channels = []
            for cname in sorted(set(members) | set(hub.channel_names())):
                ch = hub.channel(cname)
                channels.append(
                    {
                        "name": cname,
                        "members": members.get(cname, 0),
                        "messages": ch.published if ch is not None else 0,
                    }
                )
            if not admin:
                return {"active": len(channels), **about}
            return {"active": len(channels), "channels": channels, **about}
        by_code: dict[str, int] = {}
        for w in workers:
            for code, count in w["stats"].get("errors_by_code", {}).items():
                by_code[code] = by_code.get(code, 0) + count
        return {"total": total("errors", workers), "by_code": by_code, **about}


#: (kind, name, help, field of Status.local_stats): every per-worker figure on METRICS_PORT.
_FAMILIES: tuple[tuple[str, str, str, str], ...] = (
    ("gauge", "aether_connections_active", "Open WebSocket connections.", "connections_active"),
    ("counter", "aether_connections", "WebSocket connections accepted.", "connections_total"),
    ("gauge", "aether_channels_active", "Channels with live state.", "channels"),
    ("counter", "aether_messages_received", "Client messages received.", "messages_received"),
    ("counter", "aether_messages_published", "Messages accepted.", "messages_published"),
    ("counter", "aether_deliveries", "Frames queued to members by fan-out.", "deliveries"),
    ("counter", "aether_bytes_out", "Bytes of fan-out frames queued.", "bytes_out"),
    (
        "counter",
        "aether_bytes_out_uncompressed",
        "Bytes of fan-out frames had none been compressed (permessage-deflate).",
        "bytes_out_uncompressed",
    ),
    (
        "counter",
        "aether_deliveries_compressed",
        "Fan-out frames queued compressed.",
        "deliveries_compressed",
    ),
    (
        "counter",
        "aether_compressions",
        "Publications compressed (once per window size in use).",
        "compressions",
    ),
    ("counter", "aether_compress_bytes_in", "Bytes given to the compressor.", "compress_bytes_in"),
    ("counter", "aether_compress_bytes_out", "Bytes the compressor made.", "compress_bytes_out"),
    ("counter", "aether_compress_seconds", "Time spent compressing.", "compress_seconds"),
    (
        "counter",
        "aether_messages_inflated",
        "Compressed client messages inflated.",
        "messages_inflated",
    ),
    (
        "gauge",
        "aether_compression_ratio",
        "Compressed bytes per input byte of the compressions (0 before any).",
        "compression_ratio",
    ),
    ("counter", "aether_rate_limited", "Messages refused by a rate limit.", "rate_limited"),
    (
        "counter",
        "aether_slow_reader_disconnects",
        "Connections closed 4008 (send buffer over limit).",
        "slow_reader_closes",
    ),
    ("gauge", "aether_uptime_seconds", "Seconds since the worker started.", "uptime_s"),
    ("gauge", "aether_up", "1 when the worker is healthy, 0 when degraded or down.", "healthy"),
)


class HubCollector:
    """Reads the hot path's counters at scrape time."""

    def __init__(self, status: Status, config: Config) -> None:
        self._status = status
        self._config = config

    def collect(self) -> Iterator[Metric]:
        # every worker of this node: this one from its C counters, the others from the
        # cluster table they publish each second (a scrape may land on any worker)
        workers = [w["stats"] for w in self._status.node_workers()]
        node = str(self._status.node_id)

        for kind, name, doc, field in _FAMILIES:
            metric = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                name, doc, labels=["node", "worker"]
            )
            for w in workers:
                metric.add_metric([node, str(w["worker"])], float(w.get(field, 0)))
            yield metric
        errors = CounterMetricFamily(
            "aether_errors", "Error messages sent, by code.", labels=["node", "worker", "code"]
        )
        for w in workers:
            counts = w.get("errors_by_code", {})
            for code in sorted({*counts, ErrorCode.INTERNAL_ERROR}):
                errors.add_metric([node, str(w["worker"]), code], counts.get(code, 0))
        yield errors
        # MAX_CONNECTIONS is one setting for every worker of a node: the denominator of the
        # connection-saturation alert, so the rule needs no copy of it
        limit = GaugeMetricFamily(
            "aether_connections_limit",
            "Open WebSocket connections a worker accepts (MAX_CONNECTIONS).",
            labels=["node", "worker"],
        )
        for w in workers:
            limit.add_metric([node, str(w["worker"])], float(self._config.max_connections))
        yield limit
        yield _workers(node, len(workers))


def _workers(node: str, n: int) -> Metric:
    metric = GaugeMetricFamily("aether_workers", "Live workers of this node.", labels=["node"])
    metric.add_metric([node], n)
    return metric


class PrometheusRouter:
    """The only route of METRICS_PORT: GET /metrics in prometheus-client's text format."""

    def __init__(self, status: Status, config: Config) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(HubCollector(status, config))

    def handle(self, request: Request) -> Response:
        if request.path != "/metrics":
            return Response.error(404, ErrorCode.INVALID_MESSAGE, "not found", "only /metrics here")
        if request.method not in ("GET", "HEAD"):
            return Response.method_not_allowed(request.method, ("GET",))
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
