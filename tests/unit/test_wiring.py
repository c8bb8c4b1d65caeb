"""The calls back up are wired by the composition root alone (aether_fast/events.py,
docs/architecture.md "Calls back up"): building a Node connects nothing, `app.wire` does."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aether_fast._core import Hub
from aether_fast.app import wire
from aether_fast.auth import Authenticator
from aether_fast.brokers.memory import MemoryBroker
from aether_fast.brokers.redis import RedisBroker
from aether_fast.config import load_config
from aether_fast.node import Node
from aether_fast.stores.sqlite import ChannelStore


def _hub(loop: asyncio.AbstractEventLoop) -> Hub:
    return Hub(
        loop,
        send_buffer_limit=1 << 20,
        max_message_bytes=65536,
        conn_capacity=0,
        conn_window=60,
        global_rate=0,
        refresh_notice=60,
    )


def test_node_does_not_wire_itself_app_wire_does(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    config = load_config({"JWT_SECRET": "x" * 40, "DATA_DIR": str(tmp_path)})
    store = ChannelStore(str(tmp_path))
    store.open()
    try:
        hub = _hub(loop)
        broker = MemoryBroker(hub, history_ttl_s=60, dedup_ttl_s=60)
        node = Node(config, hub, broker, store, Authenticator(config))
        assert hub.node is None and hub.broker is None  # not wired yet
        wire(hub, node, broker)
        assert hub.node is node and hub.broker is broker

        # the Redis broker holds the Node's ClusterEvents once bound (no connection needed)
        hub = _hub(loop)
        redis = RedisBroker(
            hub, "redis://127.0.0.1:1", history_ttl_s=60, dedup_ttl_s=60, channel_state_ttl_s=60
        )
        node = Node(config, hub, redis, store, Authenticator(config))
        assert redis.local_figures() == {}  # the default before bind
        wire(hub, node, redis)
        assert redis.local_session == node.local_session
        assert redis.on_config == node.on_config_change
        assert redis.local_figures == node.local_figures
    finally:
        store.close()
        loop.close()
