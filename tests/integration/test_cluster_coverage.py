"""A Redis Cluster master lost (docs/operations.md §15, *When a part fails*): with Redis's
default `cluster-require-full-coverage yes`, once the other masters mark it failed they
refuse every slot until a master serves its slots again, so the channels of the masters
that are still up are refused too (`INTERNAL_ERROR`, never a false ack) and /health is
degraded:

- without a replica, until the master is back (restarted here on its node file, without
  persistence): then the surviving masters' channels go on at their next offset and the
  returned master's start over;
- with a replica, until the replica is promoted (held back here with
  `cluster-replica-no-failover` so that the window is not a race; normally about a second
  after the master is marked failed): then every channel publishes again.

Real clusters of tests/integration/redis_cluster_fixture.py. A shard's loss, by contrast,
stops only its own channels (tests/integration/test_shards.py).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from aether_fast.brokers.redis_slots import channel_slot
from tests.conftest import Server
from tests.integration.cluster_helpers import only_expected_errors
from tests.integration.helpers import expect_error, joined, wait_for
from tests.integration.redis_cluster_fixture import ClusterProcs, Node
from tests.integration.test_redis_cluster import acks, channel_on, health, healthy
from tests.integration.wsclient import Client


def _three_masters(path: Path, replicas: int) -> Iterator[ClusterProcs]:
    procs = ClusterProcs(path, masters=3, replicas=replicas)
    try:
        yield procs
    finally:
        procs.stop()


@pytest.fixture
def no_replicas(tmp_path: Path) -> Iterator[ClusterProcs]:
    """Three masters, no replicas (asked for before `make_server`: stopped after it)."""
    yield from _three_masters(tmp_path / "norep", 0)


@pytest.fixture
def with_replicas(tmp_path: Path) -> Iterator[ClusterProcs]:
    """Three masters with a replica each."""
    yield from _three_masters(tmp_path / "rep", 1)


def cluster_state(node: Node) -> str:
    with node.client() as r:
        return str(r.execute_command("CLUSTER INFO").get("cluster_state"))


def restart(node: Node) -> None:
    """The same redis-server command again: the same port and node file (its slots), no data."""
    node.proc = subprocess.Popen(
        node.proc.args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )


def server_and_publisher(
    procs: ClusterProcs, make_server: Callable[..., Server], *channels: str
) -> tuple[Server, Client]:
    """A server on the cluster, and a client that joined `channels` and got offset 1 on each."""
    seeds = ",".join(n.addr for n in procs.masters())
    srv = make_server(BROKER_URL=f"redis+cluster://{seeds}", RATE_LIMIT_MESSAGES="100000")
    srv.allow_errors = True  # the lost master is logged at error level
    pub = Client(srv.ws_url, token=srv.token("pub"), client_id="pub")
    joined(pub)
    for ch in channels:
        pub.join(ch)
        joined(pub, ch)
        pub.publish(ch, "before")
        assert acks(pub, 1)[0]["offset"] == 1
    return srv, pub


def refused_while_the_cluster_is_down(srv: Server, pub: Client, survivor: Node, ch: str) -> int:
    """Once `survivor` says the cluster failed, a publish on its channel `ch` is refused and
    /health is degraded. The refused message's sequence."""
    wait_for(lambda: cluster_state(survivor) == "fail", timeout=20.0, interval=0.05)
    seq = pub.publish(ch, "refused")
    err = expect_error(pub, "INTERNAL_ERROR", timeout=15.0)
    assert err["details"]["component"] == "broker", err
    assert (err["details"]["channel"], err["details"]["sequence"]) == (ch, seq), err
    wait_for(lambda: health(srv)[0] == 503, timeout=15.0, interval=0.1)
    assert health(srv)[1]["status"] == "degraded"
    return seq


def test_a_master_lost_without_a_replica_stops_every_channel_until_it_is_back(
    no_replicas: ClusterProcs, make_server: Callable[..., Server]
) -> None:
    procs = no_replicas
    victim, survivor, _ = procs.masters()
    down, up = channel_on(procs, victim, "nr.down."), channel_on(procs, survivor, "nr.up.")
    srv, pub = server_and_publisher(procs, make_server, down, up)
    with pub:
        victim.kill()
        seq = refused_while_the_cluster_is_down(srv, pub, survivor, up)

        restart(victim)
        procs.wait_ok(timeout=30.0)
        wait_for(partial(healthy, srv), timeout=30.0, interval=0.1)
        # the survivor kept its channel: the refused message, sent again, is its offset 2
        pub.publish(up, "again", sequence=seq, action="retry")
        assert acks(pub, 1)[0]["offset"] == 2
        # the returned master had no persistence: its channel starts over
        pub.publish(down, "after")
        assert acks(pub, 1)[0]["offset"] == 1
    only_expected_errors(srv, "broker_degraded")


def test_a_master_lost_with_a_replica_stops_every_channel_until_the_replica_takes_over(
    with_replicas: ClusterProcs, make_server: Callable[..., Server]
) -> None:
    procs = with_replicas
    victim, survivor, _ = procs.masters()
    replica = procs.replica_of(victim)
    down, up = channel_on(procs, victim, "rp.down."), channel_on(procs, survivor, "rp.up.")
    srv, pub = server_and_publisher(procs, make_server, down, up)
    with pub:
        with victim.client() as r:  # the replica has the channel's offset 1
            assert r.execute_command("WAIT", 1, 5000) == 1
        with replica.client() as r:  # the window held open until the outage has been seen
            r.config_set("cluster-replica-no-failover", "yes")
        victim.kill()
        seq = refused_while_the_cluster_is_down(srv, pub, survivor, up)

        with replica.client() as r:
            r.config_set("cluster-replica-no-failover", "no")
        wait_for(lambda: procs.owner(channel_slot(down)) is replica, timeout=30.0)
        procs.wait_ok(timeout=30.0)
        wait_for(partial(healthy, srv), timeout=30.0, interval=0.1)
        pub.publish(up, "again", sequence=seq, action="retry")
        assert acks(pub, 1)[0]["offset"] == 2
        pub.publish(down, "after")  # the replica had the channel: its next offset
        assert acks(pub, 1)[0]["offset"] == 2
    only_expected_errors(srv, "broker_degraded")
