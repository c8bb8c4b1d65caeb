"""The shard router of a BROKER_URL list (aether_fast/brokers/redis_shards.py): Jump consistent
hash and FNV-1a against published values, channel -> shard the same whatever the order or
spelling of the list, spread and consistency when a shard is added, and the health of the
shards together. Building `Shards` opens no connection (redis-py's pool connects on use)."""

from __future__ import annotations

import itertools

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from aether_fast.brokers.base import BROKER_SHARD_UNAVAILABLE, BROKER_UNAVAILABLE
from aether_fast.brokers.redis_shards import Shards, canonical, fnv1a_64, jump_hash

#: (key, buckets, bucket): the reference implementation's values, as other implementations
#: test them (e.g. ClickHouse's jumpConsistentHash and the Rust jump-consistent-hash crate).
JUMP_VECTORS = [
    (1, 1, 0),
    (42, 57, 43),
    (256, 1024, 520),
    (0xDEAD10CC, 1, 0),
    (0xDEAD10CC, 666, 361),
    (16045690984833335023, 255, 237),
    (0, 60, 0),
    (1, 60, 55),
    (2, 60, 46),
]


@pytest.mark.parametrize(("key", "buckets", "bucket"), JUMP_VECTORS)
def test_jump_hash_known_values(key: int, buckets: int, bucket: int) -> None:
    assert jump_hash(key, buckets) == bucket


def test_fnv1a_64_known_values() -> None:
    assert fnv1a_64(b"") == 0xCBF29CE484222325
    assert fnv1a_64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a_64(b"foobar") == 0x85944171F73967E8


def test_jump_hash_moves_keys_only_to_the_new_bucket() -> None:
    """The property the docs promise for resharding: from n to n+1 shards a channel stays or
    moves to the new shard, about 1/(n+1) of them."""
    keys = [fnv1a_64(f"chat.room{i}".encode()) for i in range(3000)]
    for n in (1, 2, 3, 7):
        before = [jump_hash(k, n) for k in keys]
        after = [jump_hash(k, n + 1) for k in keys]
        moved = [a for b, a in zip(before, after, strict=True) if a != b]
        assert set(moved) <= {n}, (n, set(moved))
        assert abs(len(moved) / len(keys) - 1 / (n + 1)) < 0.05, (n, len(moved))


URLS = ["redis://10.0.0.3:6379/0", "redis://:pw@10.0.0.1:6380/0", "rediss://10.0.0.2:6379/2"]
CHANNELS = [f"news.{i}" for i in range(200)] + ["chat", "é😀", "a:b-c_d.e"]


def placement(shards: Shards) -> dict[str, str]:
    """Channel -> the shard's server (by URL without credentials)."""
    return {ch: shards.link(ch).url.replace(":pw@", "") for ch in CHANNELS}


def test_a_channel_goes_to_the_same_shard_whatever_the_order_of_the_list() -> None:
    first = placement(Shards(URLS))
    for order in itertools.permutations(URLS):
        shards = Shards(list(order))
        assert placement(shards) == first, order
        assert shards.home.url == "redis://:pw@10.0.0.1:6380/0"  # canonical: host, port, db
        assert [link.shard for link in shards.links] == [0, 1, 2]
    # every shard holds some of them
    assert len(set(first.values())) == 3


def test_credentials_scheme_and_spelling_do_not_change_the_order() -> None:
    """Nodes may write a shard with other credentials or the defaults spelled out: they
    still agree (config.shard_key normalises host case, port 6379 and database 0)."""
    a = Shards(["redis://Redis-B", "redis://user:secret@redis-a:6379/0"])
    b = Shards(["rediss://redis-a", "redis://:other@redis-b:6379/0?socket_timeout=3"])
    assert [link.shard for link in a.links] == [0, 1]
    for ch in CHANNELS:
        assert a.index(ch) == b.index(ch), ch
    assert "redis-a" in a.home.url and "redis-a" in b.home.url
    assert canonical(["redis://b", "redis://a:6380", "redis://a"]) == [
        "redis://a",
        "redis://a:6380",
        "redis://b",
    ]


def test_channels_spread_over_the_shards() -> None:
    shards = Shards(URLS)
    counts = [0, 0, 0]
    for i in range(6000):
        counts[shards.index(f"room-{i}")] += 1
    assert all(c > 6000 * 0.28 for c in counts), counts
    # the index is remembered, and the same after being forgotten
    assert all(shards.index(f"room-{i}") == shards.index(f"room-{i}") for i in range(50))


def test_one_url_is_one_link_with_no_shard_number() -> None:
    shards = Shards(["redis://127.0.0.1:1/0"])
    assert len(shards.links) == 1 and shards.home is shards.links[0]
    assert shards.home.shard is None  # its log lines are as before: no shard fields
    assert {shards.index(ch) for ch in CHANNELS} == {0}
    with pytest.raises(ValueError):
        Shards([])


def test_health_of_the_shards_together() -> None:
    """Degraded with broker_unavailable when every shard is down (or the only one),
    broker_shard_unavailable when some are; healthy when all work."""
    single = Shards(["redis://127.0.0.1:1/0"])
    assert single.health() == ("degraded", BROKER_UNAVAILABLE)  # not connected yet
    single.home.recovered("commands")
    assert single.health() == ("healthy", "")

    shards = Shards(URLS)
    assert shards.health() == ("degraded", BROKER_UNAVAILABLE)  # none connected yet
    for link in shards.links:
        link.recovered("commands")
    assert shards.health() == ("healthy", "")
    shards.links[2].degraded(RedisConnectionError("redis: connection lost"), "pubsub")
    assert shards.health() == ("degraded", BROKER_SHARD_UNAVAILABLE)
    shards.home.degraded(RedisConnectionError("redis: connection lost"))
    assert shards.health() == ("degraded", BROKER_SHARD_UNAVAILABLE)  # the home is one too
    shards.links[1].degraded(RedisConnectionError("redis: connection lost"))
    assert shards.health() == ("degraded", BROKER_UNAVAILABLE)
    for i, link in enumerate(shards.links):
        link.recovered("commands")
        link.recovered("pubsub")
        assert shards.health()[0] == ("healthy" if i == 2 else "degraded")
