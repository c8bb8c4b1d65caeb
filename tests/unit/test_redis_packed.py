"""The Redis broker's kept compressed frames (`redis.deliver`): at most the channel's
`history_size` of them, fewer when it shrinks, none when it is 0, none once the channel has
no member here (a real Hub with a deflate member, no sockets; Redis is never connected)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import pytest

from aether_fast._core import Hub, Session
from aether_fast.auth import Claims
from aether_fast.brokers.redis import PUB_B, PackedCache, RedisBroker, deliver
from aether_fast.brokers.redis_cluster import RedisCluster
from aether_fast.brokers.redis_link import RedisLink
from aether_fast.brokers.redis_shards import Shards
from aether_fast.config import load_config
from aether_fast.stores.base import default_channel_config
from tests.unit.support import make_hub


@pytest.fixture
def hub() -> Iterator[Hub]:
    loop = asyncio.new_event_loop()
    try:
        yield make_hub(loop)
    finally:
        loop.close()


def test_kept_compressed_frames_follow_history_size(hub: Hub) -> None:
    config = default_channel_config("c", load_config({"JWT_SECRET": "x" * 40}))
    ch = hub.add_channel("c", dataclasses.replace(config, history_size=5))
    member = Session(hub, "m1", Claims("u", 2e9, False, None), "127.0.0.1")
    member.deflate = 15
    assert hub.join(member, ch)
    cluster = RedisCluster(RedisLink("redis://127.0.0.1:1"))
    kept: dict[str, PackedCache] = {}
    big = b'"' + b"x" * 2000 + b'"'  # over COMPRESSION_MIN_BYTES: compressed

    def publish(offset: int, payload: bytes) -> None:
        deliver(hub, cluster, ch, b"\x1fsender\n%d\n" % offset + payload, kept)

    for offset in range(1, 9):
        publish(offset, big)
    assert list(kept["c"]) == [4, 5, 6, 7, 8]
    ch.configure(dataclasses.replace(config, history_size=2))
    publish(9, b'"small"')  # not compressed: nothing kept for it, and the rest shrinks
    assert list(kept["c"]) == [7, 8]
    publish(7, b'"small"')  # offset 7 again (a new epoch): the old frame is not its
    assert list(kept["c"]) == [8]
    ch.configure(dataclasses.replace(config, history_size=0))
    publish(10, big)
    assert "c" not in kept


def test_sweep_drops_the_frames_kept_for_a_channel_with_no_member_here(hub: Hub) -> None:
    """Even one whose subscription is no longer listed (lost with a moved slot)."""
    config = default_channel_config("c", load_config({"JWT_SECRET": "x" * 40}))
    ch = hub.add_channel("c", config)
    member = Session(hub, "m1", Claims("u", 2e9, False, None), "127.0.0.1")
    member.deflate = 15
    assert hub.join(member, ch)
    shards = Shards(["redis://127.0.0.1:1"])  # never connected
    broker = RedisBroker(hub, shards, RedisCluster(shards.home), history_ttl_s=60, dedup_ttl_s=60)
    broker._on_message(PUB_B + b"c", b"\x1fsender\n1\n" + b'"' + b"x" * 2000 + b'"')
    assert list(broker._packed) == ["c"]
    broker.sweep()
    assert list(broker._packed) == ["c"]  # a member here: kept
    hub.leave(member, "c")
    broker.sweep()
    assert broker._packed == {}
