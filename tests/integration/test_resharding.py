"""Adding a shard (docs/operations.md §14, *Shards*, *Adding a shard*): what moves and what
stays. A server on one Redis publishes on two channels; it is restarted with a second Redis
added to BROKER_URL. The channel the router keeps on the first shard recovers its missed
publications under its epoch; the channel it moves to the new shard starts there under a new
epoch at offset 0 (a client recovering with the old epoch gets `recovered: false` and no
replay), while its old keys stay behind on the old shard. Real `redis-server` processes on
free ports owned by this module.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator

import pytest

from aether_fast.brokers.redis_shards import canonical
from tests.conftest import Server
from tests.integration.cluster_helpers import messages
from tests.integration.helpers import joined
from tests.integration.redis_fixture import RedisServer
from tests.integration.test_shards import acks, channel_on
from tests.integration.wsclient import Client

Shards = tuple[RedisServer, RedisServer]


@pytest.fixture(scope="module")
def two_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shards]:
    """Two redis-server processes, in canonical order: the first is the one-shard layout's."""
    made = [RedisServer(tmp_path_factory.mktemp(f"reshard{i}")) for i in range(2)]
    try:
        first = canonical([r.url(0) for r in made])[0]
        old, new = sorted(made, key=lambda r: r.url(0) != first)
        for r in (old, new):
            r.flushall()
        yield old, new
    finally:
        for r in made:
            r.stop(signal.SIGKILL)


def test_adding_a_shard_moves_some_channels_to_a_new_epoch_and_keeps_the_others(
    make_server: Callable[..., Server], two_redis: Shards
) -> None:
    old, new = two_redis
    stay, move = channel_on(0, "rs.stay."), channel_on(1, "rs.move.")
    one = make_server(NODE_ID="one-shard", BROKER_URL=old.url(0))
    epochs: dict[str, str] = {}
    with Client(one.ws_url, token=one.token("pub"), client_id="pub") as pub:
        joined(pub)
        for ch in (stay, move):
            pub.join(ch)
            epochs[ch] = str(joined(pub, ch)["epoch"])
            for i in range(1, 4):
                pub.publish(ch, f"{ch} {i}")
            assert [a["offset"] for a in acks(pub, 3)] == [1, 2, 3]
    one.stop()
    moved_keys = [k for k in old.client().keys(f"aether:ch:{{{move}}}:*")]
    assert moved_keys, "the moved channel's state was written to the old shard"

    # the same data, a second shard added: `move` is now on it, `stay` is not
    two = make_server(NODE_ID="two-shards", BROKER_URL=f"{old.url(0)},{new.url(0)}")
    with Client(two.ws_url, token=two.token("r1"), channel=stay, since=2, epoch=epochs[stay]) as r:
        got = joined(r, stay)
        assert (got["recovered"], got["epoch"], got["offset"]) == (True, epochs[stay], 3), got
        assert [m["data"]["content"] for m in messages(r, 1)] == [f"{stay} 3"]
    with Client(two.ws_url, token=two.token("r2"), channel=move, since=2, epoch=epochs[move]) as r:
        got = joined(r, move)
        assert got["recovered"] is False and got["epoch"] != epochs[move], got
        assert got["offset"] == 0, got
        r.nothing(0.3)  # no replay: the history stayed on the old shard
    with Client(two.ws_url, token=two.token("pub"), client_id="pub2") as pub:
        joined(pub)
        for ch, offset in ((stay, 4), (move, 1)):
            pub.join(ch)
            joined(pub, ch)
            pub.publish(ch, "after")
            assert acks(pub, 1)[0]["offset"] == offset
    # the moved channel's old keys are still on the old shard (they expire by their TTLs)
    assert sorted(old.client().keys(f"aether:ch:{{{move}}}:*")) == sorted(moved_keys)
    assert new.client().keys(f"aether:ch:{{{move}}}:*")
