"""The calls back up are wired by the composition root alone (aether_fast/events.py,
docs/architecture.md "Calls back up"): building a Node connects nothing, `app.wire` does,
and the cluster (not the broker) is what it binds to the Node."""

from __future__ import annotations

import ast
import os
import socket
from pathlib import Path

from aether_fast.app import control_plane, wire
from aether_fast.auth import Authenticator
from aether_fast.brokers.base import Broker
from aether_fast.brokers.cluster import Cluster
from aether_fast.brokers.redis import RedisBroker
from aether_fast.brokers.redis_cluster import RedisCluster
from aether_fast.brokers.redis_shards import Shards
from tests.conftest import ROOT
from tests.unit.support import make_hub, memory_worker


def test_node_does_not_wire_itself_app_wire_does(tmp_path: Path) -> None:
    with memory_worker(tmp_path) as w:
        hub, broker, cluster = w.hub, w.broker, w.cluster
        node = w.control_plane().node
        assert hub.node is None and hub.broker is None  # not wired yet
        wire(hub, node, broker, cluster)
        assert hub.node is node and hub.broker is broker
        assert node.cluster is cluster

        # the Redis cluster holds the Node's ClusterEvents once bound (no connection needed)
        hub = make_hub(w.loop)
        shards = Shards(["redis://127.0.0.1:1"])
        redis_cluster = RedisCluster(shards.home)
        redis = RedisBroker(
            hub, shards, redis_cluster, history_ttl_s=60, dedup_ttl_s=60, channel_state_ttl_s=60
        )
        auth = Authenticator(w.config)
        parts = control_plane(w.config, hub, redis, redis_cluster, w.store, auth)
        node = parts.node
        assert redis_cluster.local_figures() == {}  # the default before bind
        assert redis_cluster.local_session(None, "c") is None
        wire(hub, node, redis, redis_cluster)
        assert hub.broker is redis
        assert redis_cluster.local_session == node.local_session
        assert redis_cluster.on_config == node.on_config_change
        assert redis_cluster.local_figures == node.local_figures
        assert parts.status.node_id == redis_cluster.node_id
        assert parts.status.worker_id == redis_cluster.worker_id


def test_the_memory_broker_goes_with_the_single_worker_cluster(tmp_path: Path) -> None:
    """One worker: the Node counts only its own connections and members, its status has no
    cluster, and it is named after the host; the memory broker has no cluster calls left."""
    with memory_worker(tmp_path) as w:
        parts, broker, cluster = w.wired(), w.broker, w.cluster
        assert cluster.remote_connections("u:alice") == 0
        assert cluster.remote_members("news") == 0
        assert cluster.remote_table() == {}
        assert parts.status.node_id == socket.gethostname()
        assert parts.status.worker_id == f"{socket.gethostname()}:{os.getpid()}"
        status = parts.status.status()
        assert "cluster" not in status and status["node"] == socket.gethostname()
        assert [row["worker"] for row in status["workers"]] == [parts.status.worker_id]
        for name in ("bind", "remote_connections", "remote_members", "remote_table", "node_id"):
            assert not hasattr(broker, name), name


def test_the_broker_and_cluster_protocols_are_apart() -> None:
    """The Broker is the message log; what a worker knows of the others is the Cluster's."""
    log = {"name", "start", "close", "publish", "position", "recover", "forget", "health"}
    assert _members(Broker) == log | {"sweep"}
    assert _members(Cluster) == {
        "node_id",
        "worker_id",
        "start",
        "close",
        "bind",
        "remote_connections",
        "remote_members",
        "remote_table",
    }


def _members(protocol: type) -> set[str]:
    names = {n for n in vars(protocol) if not n.startswith("_")}
    return names | set(getattr(protocol, "__annotations__", {}))


#: The modules of the Redis side: each reaches the others through their public names only.
REDIS_SIDE = (
    "aether_fast/brokers/redis.py",
    "aether_fast/brokers/redis_cluster.py",
    "aether_fast/brokers/redis_link.py",
    "aether_fast/brokers/redis_shards.py",
    "aether_fast/stores/redis.py",
    "aether_fast/app.py",
)


def test_no_module_reads_another_objects_private_attributes() -> None:
    """`x._name` only on `self` (the Redis store once read the broker's `_configs` and
    `_redis`): the link, the broker, the cluster and the store talk through public methods."""
    bad = []
    for rel in REDIS_SIDE:
        tree = ast.parse((ROOT / rel).read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id == "self")
            ):
                bad.append(f"{rel}:{node.lineno}: .{node.attr}")
    assert not bad, bad
