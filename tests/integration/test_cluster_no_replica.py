"""A Redis Cluster master lost without a replica (docs/operations.md §15, *When a part
fails*): with Redis's default `cluster-require-full-coverage yes`, once the other masters
mark it failed they refuse every slot, so the channels of the masters that are still up are
refused too (`INTERNAL_ERROR`, never a false ack) and /health is degraded; when the master
is back (restarted on its node file, without persistence) everything publishes again: the
surviving masters' channels where they were, the returned master's under a new epoch.
A real 3-master cluster of tests/integration/redis_cluster_fixture.py; unlike a shard, whose
loss stops only its own channels (tests/integration/test_shards.py).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import Server
from tests.integration.cluster_helpers import only_expected_errors
from tests.integration.helpers import expect_error, joined, wait_for
from tests.integration.redis_cluster_fixture import ClusterProcs, Node
from tests.integration.test_redis_cluster import acks, channel_on, health, healthy
from tests.integration.wsclient import Client


@pytest.fixture
def no_replicas(tmp_path: Path) -> Iterator[ClusterProcs]:
    """Three masters, no replicas (asked for before `make_server`: stopped after it)."""
    procs = ClusterProcs(tmp_path / "norep", masters=3, replicas=0)
    try:
        yield procs
    finally:
        procs.stop()


def cluster_state(node: Node) -> str:
    with node.client() as r:
        return str(r.execute_command("CLUSTER INFO").get("cluster_state"))


def restart(node: Node) -> None:
    """The same redis-server command again: the same port and node file (its slots), no data."""
    node.proc = subprocess.Popen(
        node.proc.args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )


def test_a_master_lost_without_a_replica_stops_every_channel_until_it_is_back(
    no_replicas: ClusterProcs, make_server: Callable[..., Server]
) -> None:
    procs = no_replicas
    victim, survivor, _ = procs.masters()
    down, up = channel_on(procs, victim, "nr.down."), channel_on(procs, survivor, "nr.up.")
    seeds = ",".join(n.addr for n in procs.masters())
    srv = make_server(BROKER_URL=f"redis+cluster://{seeds}", RATE_LIMIT_MESSAGES="100000")
    srv.allow_errors = True  # the lost master is logged at error level
    with Client(srv.ws_url, token=srv.token("pub"), client_id="pub") as pub:
        joined(pub)
        for ch in (down, up):
            pub.join(ch)
            joined(pub, ch)
            pub.publish(ch, "before")
            assert acks(pub, 1)[0]["offset"] == 1

        victim.kill()
        wait_for(lambda: cluster_state(survivor) == "fail", timeout=20.0, interval=0.1)
        # the surviving master's channel is refused as well: Redis serves no slot now
        seq = pub.publish(up, "refused")
        err = expect_error(pub, "INTERNAL_ERROR", timeout=15.0)
        assert err["details"]["component"] == "broker", err
        assert (err["details"]["channel"], err["details"]["sequence"]) == (up, seq), err
        wait_for(lambda: health(srv)[0] == 503, timeout=15.0, interval=0.1)
        assert health(srv)[1]["status"] == "degraded"

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
