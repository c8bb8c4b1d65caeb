"""The composition root: builds every part of one worker from a Config and wires them.

What it owns: start-up order (logs, store, hub, broker, cluster, the control plane's three
parts, HTTP front, metrics port), signal handling and graceful shutdown. Rule: this is the
only module that constructs the parts (`control_plane` builds Operations, Status and the
Node, for tests too); everything else receives what it needs.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
import ssl
import time
from dataclasses import dataclass

from aether_fast import logs
from aether_fast._core import Hub, set_compression_level
from aether_fast.auth import Authenticator
from aether_fast.brokers.base import Broker
from aether_fast.brokers.cluster import Cluster, SingleWorker
from aether_fast.brokers.memory import MemoryBroker
from aether_fast.brokers.redis import RedisBroker
from aether_fast.brokers.redis_cluster import RedisCluster
from aether_fast.brokers.redis_shards import Shards
from aether_fast.brokers.redis_slots import STATE_PREFIX, Slots, SlotsBroker, StateHome
from aether_fast.config import Config, cluster_seed_urls
from aether_fast.http import front
from aether_fast.http.front import PendingSockets, Port, front_factory
from aether_fast.http.routes import Router
from aether_fast.http.upgrade import WebSocketUpgrader
from aether_fast.metrics import Metrics, PrometheusRouter
from aether_fast.node import Node
from aether_fast.operations import Operations
from aether_fast.status import Status
from aether_fast.stores.base import Store
from aether_fast.stores.redis import RedisChannelStore
from aether_fast.stores.sqlite import ChannelStore


@dataclass(slots=True)
class Worker:
    """A started worker: what `serve` needs to stop it again."""

    config: Config
    hub: Hub
    node: Node
    operations: Operations
    store: Store
    servers: list[asyncio.Server]

    @property
    def port(self) -> int:
        sock = self.servers[0].sockets[0]
        return int(sock.getsockname()[1])


def _tls(config: Config) -> ssl.SSLContext | None:
    if not config.tls_cert_file or not config.tls_key_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    return ctx


def _port(
    config: Config, name: str, router: front.Router, upgrader: front.Upgrader | None, max_body: int
) -> Port:
    """What the sockets of the port `name` share: the first request's deadline, the cap on
    pending sockets and the keep-alive idle close are every port's (HANDSHAKE_TIMEOUT_S,
    MAX_PENDING_CONNECTIONS[_PER_PEER], HTTP_KEEPALIVE_IDLE_S)."""
    pending = PendingSockets(
        config.max_pending_connections, config.max_pending_connections_per_peer, name
    )
    return Port(
        router,
        upgrader,
        max_body,
        config.handshake_timeout_s,
        pending,
        config.http_keepalive_idle_s,
    )


def _listen(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening socket. SO_REUSEPORT only where several workers share the port: on one
    worker it would let a second server start silently on the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


@dataclass(slots=True)
class ControlPlane:
    """The three Python parts above the Hub: the session control plane (`node`, the one
    the sessions and the cluster call back up), the REST operations and the figures."""

    node: Node
    operations: Operations
    status: Status


def control_plane(
    config: Config,
    hub: Hub,
    broker: Broker,
    cluster: Cluster,
    store: Store,
    auth: Authenticator,
) -> ControlPlane:
    """Build the control plane's parts, each given the ones below it (Operations, then
    Status, then the Node). Connects no call back up: `wire` does."""
    operations = Operations(hub, broker, store)
    status = Status(hub, broker, cluster, operations)
    node = Node(config, hub, broker, cluster, store, auth, status, operations)
    return ControlPlane(node, operations, status)


def wire(hub: Hub, node: Node, broker: Broker, cluster: Cluster) -> None:
    """Connect the calls back up (aether_fast/events.py): the sessions report to the Node
    through `Hub.node`, publish through `Hub.broker`, and the cluster asks the Node about
    this worker. Done here only, once the parts exist; tests that build a Node call it too."""
    hub.node = node
    hub.broker = broker
    cluster.bind(node)


#: Allocations between two young-generation collections (CPython's default is 700): a
#: connection's set-up makes a few hundred objects, and each collection walks them all.
GC_YOUNG_THRESHOLD = 20_000


def _tune_gc() -> None:
    """What exists once the server is up (modules, the hub, the config) lives as long as
    the process: freeze it out of the collector's scans. Collections then cost what the
    live connections hold, and happen less often; they used to take ~6% of connection
    set-up and put their pauses into the latency's tail."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def start(config: Config) -> Worker:
    """Open the store and both ports; raises StoreError/OSError when that is impossible."""
    loop = asyncio.get_running_loop()
    hub = Hub(
        loop,
        send_buffer_limit=config.send_buffer_limit_bytes,
        max_message_bytes=config.max_message_bytes,
        conn_capacity=float(config.rate_limit_messages),
        conn_window=float(config.rate_limit_window_s),
        global_rate=float(config.rate_limit_global_messages),
        refresh_notice=float(config.token_refresh_notice_s),
        busy_poll_s=config.busy_poll_us / 1e6,
    )
    hub.compression = config.compression
    hub.compression_min_bytes = config.compression_min_bytes
    set_compression_level(config.compression_level)
    broker: Broker
    cluster: Cluster
    store: Store
    if config.broker_url:
        # the broker and the cluster share the links' connections (one link per shard; the
        # cluster's state on the first, the home); neither knows the other's state: the
        # broker asks the cluster whether a sender is here, the store asks the cluster for
        # the configs
        # (Redis Cluster mode: the router by hash slot and its broker, redis_slots.py)
        ttls = {
            "history_ttl_s": config.history_ttl_s,
            "dedup_ttl_s": config.dedup_ttl_s,
            "channel_state_ttl_s": config.channel_state_ttl_s,
        }
        if config.broker_cluster:
            assert config.broker_url is not None
            slots = Slots(cluster_seed_urls(config.broker_url))
            redis_cluster = RedisCluster(
                StateHome(slots), node_id=config.node_id, prefix=STATE_PREFIX
            )
            broker = SlotsBroker(hub, slots, redis_cluster, **ttls)
        else:
            shards = Shards(config.broker_urls)
            redis_cluster = RedisCluster(shards.home, node_id=config.node_id)
            broker = RedisBroker(hub, shards, redis_cluster, **ttls)
        await broker.start()  # opens the links
        await redis_cluster.start()
        cluster, store = redis_cluster, RedisChannelStore(redis_cluster)
    else:
        broker = MemoryBroker(
            hub, history_ttl_s=config.history_ttl_s, dedup_ttl_s=config.dedup_ttl_s
        )
        cluster = SingleWorker()
        await broker.start()
        await cluster.start()
        sqlite_store = ChannelStore(config.data_dir)
        sqlite_store.open()
        store = sqlite_store
    auth = Authenticator(config)
    parts = control_plane(config, hub, broker, cluster, store, auth)
    node = parts.node
    wire(hub, node, broker, cluster)
    metrics = Metrics(hub, parts.status)
    router = Router(config, parts.operations, parts.status, auth, metrics)
    upgrader = WebSocketUpgrader(config, hub, node, auth)
    _tune_gc()  # before the ports open: nothing to wait for once clients can connect
    tls = _tls(config)
    servers = [
        await loop.create_server(
            front_factory(_port(config, "ws", router, upgrader, config.max_http_body_bytes)),
            sock=_listen(config.ws_host, config.ws_port, reuse_port=config.workers > 1),
            ssl=tls,
            # a stalled handshake is closed; the front's first-request deadline, which
            # runs from the accept, covers the handshake as well
            ssl_handshake_timeout=config.handshake_timeout_s if tls else None,
            backlog=4096,
        )
    ]
    if config.enable_metrics:
        prom = PrometheusRouter(parts.status, config)
        servers.append(
            await loop.create_server(
                front_factory(_port(config, "metrics", prom, None, 1024)),
                sock=_listen(config.metrics_host, config.metrics_port, config.workers > 1),
            )
        )
    node.start()
    worker = Worker(config, hub, node, parts.operations, store, servers)
    logs.log(
        "info",
        "server_started",
        "app",
        host=config.ws_host,
        port=worker.port,
        ws_path=config.ws_path,
        metrics_port=config.metrics_port if config.enable_metrics else None,
        tls=tls is not None,
        broker=broker.name,
    )
    return worker


async def stop(worker: Worker) -> None:
    """Graceful shutdown: stop accepting, notice + close 1001 to every client, flush, wait
    for them to go (at most SHUTDOWN_TIMEOUT_S), then close the store."""
    for server in worker.servers:
        server.close()
    n = worker.operations.begin_shutdown()
    worker.hub.flush()
    deadline = time.monotonic() + worker.config.shutdown_timeout_s
    while worker.hub.active_connections and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for s in worker.hub.session_list():
        s.transport.disconnect(False)
    await worker.node.stop()
    await worker.node.cluster.close()  # before the broker: it closes the connections
    await worker.node.broker.close()
    worker.store.close()
    logs.log("info", "server_stopped", "app", closed_connections=n)


async def serve(config: Config) -> int:
    """Run one worker until SIGTERM/SIGINT; returns the exit status."""
    loop = asyncio.get_running_loop()
    # handlers first: a SIGTERM that arrives once the port listens (or while Redis is still
    # being reached) is a drain, not the default kill
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    worker = await start(config)
    await stopping.wait()
    logs.log("info", "shutdown_requested", "app")
    await stop(worker)
    return 0
