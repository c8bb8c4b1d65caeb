"""Redis Cluster mode (docs/operations.md §14, *Redis Cluster*): BROKER_URL=redis+cluster://
names seed nodes of a real cluster of `redis-server --cluster-enabled yes` processes that
this module starts (tests/integration/redis_cluster_fixture.py), and two server processes
("machines") list the seeds in opposite orders.

- channels on every master publish, deliver across machines, recover with `since` and
  deduplicate retries; each channel's keys and its sharded pub/sub channel are on its
  slot's master only; the cluster-wide state is in one slot;
- a slot of a live channel migrated to another master while publishing: acks go on
  (ASK while the slot is half moved, MOVED after), the members' subscriptions follow the
  slot, and a join with `since` gets every acked message;
- issue 14 item 7: a master SIGKILLed after its replica caught up: its channels' publishes
  are refused (no false ack) and /health is degraded until the replica is promoted; then
  they publish again, members receive again, and `since` recovers every acked message;
- bad redis+cluster:// forms exit 2 with one line that prints no credentials.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from aether_fast.brokers.redis_slots import channel_slot
from tests.conftest import SECRET, Server
from tests.integration.cluster_helpers import messages, only_expected_errors, status
from tests.integration.helpers import expect, expect_error, joined, wait_for
from tests.integration.redis_cluster_fixture import ClusterProcs, Node
from tests.integration.test_cli import cli_env, one_line, run
from tests.integration.wsclient import Client

Pair = tuple[Server, Server]


@pytest.fixture(scope="module")
def rcluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcs]:
    """Three masters, no replicas (the migration and routing tests)."""
    procs = ClusterProcs(tmp_path_factory.mktemp("rcluster"), masters=3, replicas=0)
    try:
        yield procs
    finally:
        procs.stop()


@pytest.fixture
def cluster3(rcluster: ClusterProcs) -> ClusterProcs:
    """The three masters, ok and empty."""
    rcluster.wait_ok()
    for node in rcluster.masters():
        with node.client() as r:
            r.flushall()
    return rcluster


def nodes(make_server: Callable[..., Server], procs: ClusterProcs, **env: str) -> Pair:
    """Machine A lists the seeds in one order, machine B in the other."""
    seeds = [n.addr for n in procs.masters()]
    common = {"RATE_LIMIT_MESSAGES": "100000", **env}
    a = make_server(NODE_ID="node-a", BROKER_URL="redis+cluster://" + ",".join(seeds), **common)
    b = make_server(
        NODE_ID="node-b", BROKER_URL="redis+cluster://" + ",".join(reversed(seeds)), **common
    )
    return a, b


def channel_on(procs: ClusterProcs, master: Node, prefix: str, skip: int = 0) -> str:
    """A channel name whose slot `master` serves now."""
    for i in range(10000):
        name = f"{prefix}{i}"
        if procs.owner(channel_slot(name)) is master:
            if skip == 0:
                return name
            skip -= 1
    raise AssertionError("no such channel name")


def acks(c: Client, n: int) -> list[dict[str, Any]]:
    return [expect(c, "message", "ack", timeout=10.0)["data"]["metadata"] for _ in range(n)]


def health(srv: Server) -> tuple[int, Any]:
    code, body, _ = srv.http("GET", "/health")
    return code, body


def degraded_with(srv: Server, reason: str) -> bool:
    return health(srv) == (503, {"status": "degraded", "reason": reason})


def healthy(srv: Server) -> bool:
    return health(srv) == (200, {"status": "healthy"})


def history(srv: Server, ch: str, since: int = 0) -> tuple[list[dict[str, Any]], bool]:
    """What a join with `since` gets: the replayed messages and `recovered`."""
    with Client(srv.ws_url, token=srv.token("peek"), channel=ch) as c:
        epoch = str(joined(c, ch)["epoch"])
    with Client(srv.ws_url, token=srv.token("rec"), channel=ch, since=since, epoch=epoch) as r:
        data = joined(r, ch)
        got = messages(r, data["offset"] - since) if data["recovered"] else []
        return got, bool(data["recovered"])


def shard_subscribers(node: Node, ch: str) -> int:
    target = f"aether:pub:{{{ch}}}"
    with node.client() as r:
        got = r.execute_command("PUBSUB SHARDNUMSUB", target)  # [(channel, n)]
    return int(got[0][1])


# -- every channel on its slot's master --------------------------------------------------------


def test_channels_on_every_master_work_across_machines(
    make_server: Callable[..., Server], cluster3: ClusterProcs
) -> None:
    masters = cluster3.masters()
    assert len(masters) == 3
    chans = [channel_on(cluster3, m, f"rc.{i}.", skip=k) for i, m in enumerate(masters) for k in (0, 1)]
    a, b = nodes(make_server, cluster3)
    with (
        Client(a.ws_url, token=a.token("pub"), client_id="pub") as pub,
        Client(b.ws_url, token=b.token("mb")) as mb,
    ):
        joined(pub)
        joined(mb)
        for ch in chans:
            for c in (pub, mb):
                c.join(ch)
                joined(c, ch)
        for i in range(5):
            for ch in chans:
                pub.publish(ch, f"{ch} m{i}")
        got = acks(pub, 5 * len(chans))
        by_channel: dict[str, list[int]] = {}
        for m in messages(mb, 5 * len(chans)):
            by_channel.setdefault(m["data"]["channel"], []).append(m["data"]["metadata"]["offset"])
        assert by_channel == {ch: [1, 2, 3, 4, 5] for ch in chans}, by_channel
        assert len(got) == 5 * len(chans)

        # recovery on B of what A published; a retry on B of what A acked is not published again
        for ch in chans:
            replay, recovered = history(b, ch, since=2)
            assert recovered
            assert [m["data"]["content"] for m in replay] == [f"{ch} m{i}" for i in (2, 3, 4)]
        ch = chans[0]
        with Client(a.ws_url, token=a.token("ret"), client_id="dup-1", channel=ch) as s:
            joined(s, ch)
            s.publish(ch, "once", sequence=7)
            first = acks(s, 1)[0]
        assert first["offset"] == 6
        with Client(b.ws_url, token=b.token("ret"), client_id="dup-1", channel=ch) as s:
            joined(s, ch)
            s.publish(ch, "once", sequence=7, action="retry")
            assert acks(s, 1)[0] == first
        assert messages(mb, 1)[0]["data"]["content"] == "once"
        mb.nothing(0.3)

        # each channel's keys and its sharded pub/sub channel are on its slot's master only
        for ch in chans:
            owner = cluster3.owner(channel_slot(ch))
            for node in masters:
                with node.client() as r:
                    keys = sorted(k.decode() for k in r.keys(f"*{{{ch}}}*"))
                if node is owner:
                    assert keys[:2] == [f"aether:ch:{{{ch}}}:hist", f"aether:ch:{{{ch}}}:meta"]
                    assert shard_subscribers(node, ch) == 2  # A and B
                else:
                    assert keys == [], keys
        # the cluster-wide state: one slot, on one master
        state = [n for n in masters if n.client().keys("aether:{aether}:*")]
        assert len(state) == 1
        with state[0].client() as r:
            assert r.zcard("aether:{aether}:workers") == 2
    for srv in (a, b):
        assert healthy(srv)
