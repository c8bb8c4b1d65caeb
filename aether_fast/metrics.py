"""Metrics: the JSON figures of /metrics/* and the Prometheus exposition on METRICS_PORT.

What it owns: turning the Hub's C counters into figures. Rule: nothing here is called per
message; counters are kept in C by the hot path and read only at scrape or request time
(a prometheus-client custom collector, no prometheus-client call per message).
"""

from __future__ import annotations

import os
import time
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
from aether_fast.http.front import Request, Response
from aether_fast.protocol import ErrorCode


class Metrics:
    def __init__(self, hub: Hub, node: Any) -> None:
        self._hub = hub
        self._node = node

    def view(self, name: str) -> dict[str, Any]:
        hub = self._hub
        if name == "connections":
            return {
                "active": hub.active_connections,
                "total": hub.connections_total,
                "slow_reader_closes": hub.slow_reader_closes,
            }
        if name == "messages":
            return {
                "received": hub.messages_in,
                "published": hub.messages_published,
                "delivered": hub.deliveries,
                "bytes_out": hub.bytes_out,
                "rate_limited": hub.rate_limited,
                "messages_per_second": round(self._node.rates.per_second, 2),
            }
        if name == "channels":
            channels = []
            for cname in sorted(hub.channel_names()):
                ch = hub.channel(cname)
                if ch is not None:
                    channels.append(
                        {"name": cname, "members": ch.member_count, "messages": ch.published}
                    )
            return {"active": len(channels), "channels": channels}
        return {"total": hub.errors_total, "by_code": hub.error_counts_snapshot()}


class HubCollector:
    """Reads the hot path's counters at scrape time."""

    def __init__(self, hub: Hub, node: Any) -> None:
        self._hub = hub
        self._node = node

    def collect(self) -> Iterator[Metric]:
        hub = self._hub
        labels = ["worker"]
        worker = [str(os.getpid())]

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(worker, value)
            return c

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(worker, value)
            return g

        yield gauge(
            "aether_connections_active", "Open WebSocket connections.", hub.active_connections
        )
        yield counter(
            "aether_connections", "WebSocket connections accepted.", hub.connections_total
        )
        yield gauge("aether_channels_active", "Channels with live state.", len(hub.channel_names()))
        yield counter("aether_messages_received", "Client messages received.", hub.messages_in)
        yield counter(
            "aether_messages_published", "Messages accepted and published.", hub.messages_published
        )
        yield counter("aether_deliveries", "Frames queued to members by fan-out.", hub.deliveries)
        yield counter("aether_bytes_out", "Bytes of fan-out frames queued.", hub.bytes_out)
        yield counter("aether_rate_limited", "Messages refused by a rate limit.", hub.rate_limited)
        yield counter(
            "aether_slow_reader_disconnects",
            "Connections closed 4008 (send buffer over limit).",
            hub.slow_reader_closes,
        )
        errors = CounterMetricFamily(
            "aether_errors", "Error messages sent, by code.", labels=["worker", "code"]
        )
        counts = hub.error_counts_snapshot()
        for code in sorted({*counts, ErrorCode.INTERNAL_ERROR}):
            errors.add_metric([worker[0], code], counts.get(code, 0))
        yield errors
        state, _ = self._node.health()
        yield gauge(
            "aether_up",
            "1 when the node is healthy, 0 when degraded or down.",
            1 if state == "healthy" else 0,
        )
        yield gauge(
            "aether_uptime_seconds",
            "Seconds since the worker started.",
            time.time() - self._node.started_at,
        )


class PrometheusRouter:
    """The only route of METRICS_PORT: GET /metrics in prometheus-client's text format."""

    def __init__(self, hub: Hub, node: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(HubCollector(hub, node))

    def handle(self, request: Request) -> Response:
        if request.path != "/metrics":
            return Response.error(404, ErrorCode.INVALID_MESSAGE, "not found", "only /metrics here")
        if request.method not in ("GET", "HEAD"):
            return Response.error(
                405,
                ErrorCode.INVALID_MESSAGE,
                "method not allowed",
                "GET only",
                (("Allow", "GET"),),
            )
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
