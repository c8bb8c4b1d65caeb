"""The channel store of workers meeting in Redis: the configs in the hash `aether:channels`.

The hash, this worker's copy of it and the notices on `aether:config` belong to the cluster
(`brokers/redis_cluster.py`: every worker must see a change, and the Node hears it through
`ClusterEvents.on_config_change`); this store answers the Node's `Store` calls through the
cluster's public methods only. Reads come from the local copy at once; a write is
confirmed by Redis (or raises `BrokerUnavailable`, answered 503) and announced to every
worker. There is nothing to open nor to close: the connections are the link's, opened and
closed with the broker.
"""

from __future__ import annotations

import builtins

from aether_fast.brokers.redis_cluster import RedisCluster
from aether_fast.stores.base import ChannelConfig


class RedisChannelStore:
    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = cluster

    def open(self) -> None:
        return None

    def close(self) -> None:
        return None

    def get(self, name: str) -> ChannelConfig | None:
        return self._cluster.config(name)

    def list(self) -> builtins.list[ChannelConfig]:
        return self._cluster.configs()

    async def put(self, cfg: ChannelConfig) -> bool:
        """Store `cfg` (True: created), announced to every worker."""
        return await self._cluster.put_config(cfg)

    async def delete(self, name: str) -> bool:
        """Delete `name`'s config (True: it existed), announced to every worker."""
        return await self._cluster.delete_config(name)
