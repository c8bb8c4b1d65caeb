"""The Redis Cluster router (aether_fast/brokers/redis_slots.py): every key and the pub/sub
channel of a channel hash to one slot, the slot is Redis's (CRC16 of the hash tag, against
Redis's documented values), redirects are read right, and node URLs keep a seed URL's
credentials. Building `Slots` opens no connection."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from redis.crc import key_slot
from redis.exceptions import NoScriptError, ResponseError

from aether_fast.brokers.base import BROKER_UNAVAILABLE
from aether_fast.brokers.redis import _keys, sender_key
from aether_fast.brokers.redis_link import PREFIX
from aether_fast.brokers.redis_slots import (
    STATE_PREFIX,
    Slots,
    _redirect,
    channel_slot,
    node_url,
    pub_channel,
    slot_owners,
)

NAMES = ["foo", "a", "chat.room-1", "x:y:z", "_", "A" * 128, "9-9.9_9:9"]


def test_channel_slot_is_redis_key_slot_of_the_name() -> None:
    # CLUSTER KEYSLOT foo = 12182, somekey = 11058 (redis.io, CLUSTER KEYSLOT)
    assert channel_slot("foo") == 12182
    assert channel_slot("somekey") == 11058


@pytest.mark.parametrize("name", NAMES)
def test_every_key_of_a_channel_is_in_its_slot(name: str) -> None:
    slot = channel_slot(name)
    who = sender_key("user\x1fodd", "client-1")
    keys = [*_keys(name), f"{PREFIX}dedupe:{{{name}}}:{who}", pub_channel(name)]
    assert {key_slot(k.encode()) for k in keys} == {slot}, keys


def test_the_cluster_wide_state_is_in_one_slot() -> None:
    keys = ["channels", "workers", "worker:n:1:ab", "worker:n:1:ab:limit_conns", "worker:x:members"]
    assert len({key_slot((STATE_PREFIX + k).encode()) for k in keys}) == 1


def test_redirects() -> None:
    assert _redirect(ResponseError("MOVED 3999 127.0.0.1:6381")) == ("MOVED", "127.0.0.1:6381")
    assert _redirect(ResponseError("ASK 3999 10.0.0.2:7000")) == ("ASK", "10.0.0.2:7000")
    assert _redirect(ResponseError("TRYAGAIN Multiple keys request during rehashing")) == (
        "TRYAGAIN",
        "",
    )
    assert _redirect(ResponseError("CLUSTERDOWN The cluster is down")) is None
    assert _redirect(NoScriptError("NOSCRIPT No matching script")) is None
    assert _redirect(ConnectionError("MOVED 1 a:1")) is None


def test_node_urls_keep_the_seeds_credentials_and_options() -> None:
    seed = "redis://u:pw@10.0.0.1:7000?username=u"
    assert node_url(seed, "10.0.0.9:7005") == "redis://u:pw@10.0.0.9:7005?username=u"
    assert node_url("redis://10.0.0.1:7000", "10.0.0.9:7005") == "redis://10.0.0.9:7005"


def test_node_urls_of_ipv6_masters_are_bracketed() -> None:
    # Redis names an IPv6 node "::1:7001" (CLUSTER SLOTS host + port, MOVED): a URL of it
    # without brackets is no URL (host "", port "1:7001")
    url = node_url("redis://u:pw@[::1]:7000?username=u", "::1:7001")
    assert url == "redis://u:pw@[::1]:7001?username=u"
    parts = urlsplit(url)
    assert (parts.hostname, parts.port) == ("::1", 7001)
    assert node_url("rediss://[fd00::1]:7000", "fd00::2:7002") == "rediss://[fd00::2]:7002"


def test_slot_table_endpoints() -> None:
    """CLUSTER SLOTS as Redis 7 may write it: an empty endpoint is the node asked,
    "?" (unknown endpoint: cluster-preferred-endpoint-type without an announced one) is no
    master to connect to, hostnames and IPv6 are kept as given."""
    table = [
        [0, 99, [b"", 7000, b"id0"]],
        [100, 199, [b"?", 7001, b"id1"]],
        [200, 299, [b"node-2.example", 7002, b"id2"]],
        [300, 16383, [b"::1", 7003, b"id3"]],
    ]
    owners = slot_owners(table, "10.1.1.1")
    assert owners[0] == owners[99] == "10.1.1.1:7000"
    assert owners[100] is None and owners[199] is None
    assert owners[200] == "node-2.example:7002"
    assert owners[300] == owners[16383] == "::1:7003"
    # a broken answer (a port of 0, a range past the last slot) names no master
    assert set(slot_owners([[0, 16383, [b"h", 0]], [5, 99999, [b"h", 1]]], "x")) == {None}
    # nor does an entry that is not CLUSTER SLOTS at all (no exception: the next read is
    # the same, and the keep-alive would log it once a second)
    garbage = [[b"x", 5, [b"h", 1]], [0, 5, b"h"], [0, 5, []], [0, 5, [b"\xff", 1]], [0], 7]
    assert set(slot_owners([*garbage, [6, 9, [b"h", b"7000"]]], "x")[:10]) == {None, "h:7000"}


def test_no_master_known_is_unavailable() -> None:
    slots = Slots(["redis://127.0.0.1:1"])
    assert slots.health() == ("degraded", BROKER_UNAVAILABLE)
    assert slots.link_of(channel_slot("foo")) is None
    with pytest.raises(ValueError):
        Slots([])
