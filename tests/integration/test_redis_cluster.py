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
- a slot moved to a master that refuses the subscription: /health stays degraded until the
  subscription is back (delivery never stops behind a green health check);
- bad redis+cluster:// forms exit 2 with one line that prints no credentials;
- review: a refused SUNSUBSCRIBE does not fail the next SSUBSCRIBE; a join follows MOVED;
  joins in a MOVED loop share the reads of the slot table; EVAL after NOSCRIPT on an ASK
  target; a sender's order across MOVED; nothing reopened after close.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from redis.exceptions import RedisError

from aether_fast.brokers.base import PublishResult
from aether_fast.brokers.redis_link import RedisLink
from aether_fast.brokers.redis_slots import Slots, SlotsBroker, channel_slot, pub_channel
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


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[ClusterProcs]:
    """Three masters speaking only TLS (asked for before `make_server`: stopped after the
    servers, which must not see it go)."""
    procs = ClusterProcs(tmp_path / "tls", masters=3, replicas=0, tls=True)
    try:
        yield procs
    finally:
        procs.stop()


@pytest.fixture
def ha_cluster(tmp_path: Path) -> Iterator[ClusterProcs]:
    """Three masters with a replica each (the failover test)."""
    procs = ClusterProcs(tmp_path / "ha", masters=3, replicas=1)
    try:
        yield procs
    finally:
        procs.stop()


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


def join_all(clients: Iterable[Client], chans: Iterable[str]) -> None:
    """Each client's welcome, then each joins each channel (the reply awaited)."""
    everyone = list(clients)
    for c in everyone:
        joined(c)
    for ch in chans:
        for c in everyone:
            c.join(ch)
            joined(c, ch)


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
    chans = [
        channel_on(cluster3, m, f"rc.{i}.", skip=k) for i, m in enumerate(masters) for k in (0, 1)
    ]
    seeds = [n.addr for n in masters]
    a = make_server(NODE_ID="node-a", BROKER_URL="redis+cluster://" + ",".join(seeds))
    # B is two workers (a supervisor) naming the seeds the other way round
    b = make_server(
        NODE_ID="node-b", WORKERS="2", BROKER_URL="redis+cluster://" + ",".join(reversed(seeds))
    )
    with (
        Client(a.ws_url, token=a.token("pub"), client_id="pub") as pub,
        Client(b.ws_url, token=b.token("mb")) as mb,
    ):
        join_all((pub, mb), chans)
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
                    # A, and the worker of B that mb is on (and maybe its other, which a
                    # recovery above joined through)
                    assert shard_subscribers(node, ch) in (2, 3)
                else:
                    assert keys == [], keys
                    assert shard_subscribers(node, ch) == 0
        # the cluster-wide state: one slot, on one master; a config change made on A is
        # announced (classic PUBLISH, relayed by every master) and applied on B
        cfg = chans[-1] + ".cfg"
        assert a.create_channel(name=cfg, require_auth=False, max_connections=1) == 201
        wait_for(lambda: b.http("GET", f"/ws/channels/{cfg}", token=b.admin())[0] == 200)

        def anonymous_join() -> str:
            """`joined`, or the code of the error a join with no token gets."""
            with Client(b.ws_url, channel=cfg) as anon:
                first = anon.recv()
            if first.get("type") == "error":
                return str(first["code"])
            return "joined" if first["data"].get("channel") == cfg else "not joined"

        # B applies it (anonymous allowed) on each of its workers once it heard the notice
        # and read the config (the GET above may have been answered by the other worker)
        wait_for(lambda: anonymous_join() == "joined")
        for _ in range(6):  # the last one's close may not be seen yet: CHANNEL_FULL
            assert wait_for(lambda: (code := anonymous_join()) != "CHANNEL_FULL" and code) == (
                "joined"
            )
        state = [n for n in masters if n.client().keys("aether:{aether}:*")]
        assert len(state) == 1
        with state[0].client() as r:
            wait_for(lambda: r.zcard("aether:{aether}:workers") == 3)  # A's one, B's two
            assert (
                json.loads(r.hget("aether:{aether}:channels", cfg) or b"{}")["max_connections"] == 1
            )
    for srv in (a, b):
        assert healthy(srv)


def test_a_cluster_over_tls(tls_cluster: ClusterProcs, make_server: Callable[..., Server]) -> None:
    """rediss+cluster://: every connection (seeds, discovered masters, pools) is TLS with
    the CA of the URL; channels on every master publish and recover across machines."""
    procs = tls_cluster
    chans = [channel_on(procs, m, f"rc.tls.{i}.") for i, m in enumerate(procs.masters())]
    seeds = [n.addr for n in procs.masters()]
    assert procs.url.startswith("rediss+cluster://")
    a = make_server(NODE_ID="node-a", BROKER_URL=procs.url)
    # B names one seed only: it finds the other masters itself
    assert procs.tls is not None
    b = make_server(
        NODE_ID="node-b", BROKER_URL=f"rediss+cluster://{seeds[-1]}?ssl_ca_certs={procs.tls.ca}"
    )
    with (
        Client(a.ws_url, token=a.token("pub"), client_id="pub") as pub,
        Client(b.ws_url, token=b.token("mb")) as mb,
    ):
        join_all((pub, mb), chans)
        for ch in chans:
            pub.publish(ch, f"{ch} over tls")
        assert sorted(m["offset"] for m in acks(pub, len(chans))) == [1] * len(chans)
        got = messages(mb, len(chans))
        assert sorted(m["data"]["content"] for m in got) == sorted(f"{c} over tls" for c in chans)
        for ch in chans:
            replay, recovered = history(b, ch, since=0)
            assert recovered and [g["data"]["content"] for g in replay] == [f"{ch} over tls"]
    for srv in (a, b):
        assert healthy(srv)


# -- a slot moves to another master ------------------------------------------------------------


def offsets_until(c: Client, last: int, timeout: float = 15.0) -> list[int]:
    """The offsets `c` receives until `last` comes."""
    got: list[int] = []
    deadline = time.monotonic() + timeout
    while not got or got[-1] != last:
        left = deadline - time.monotonic()
        assert left > 0, f"offset {last} never came: {got}"
        got.append(messages(c, 1, left)[0]["data"]["metadata"]["offset"])
    return got


def test_a_slot_migrated_while_publishing_loses_nothing_acked(
    make_server: Callable[..., Server], cluster3: ClusterProcs
) -> None:
    src, dst, _ = cluster3.masters()
    ch = channel_on(cluster3, src, "rc.mig.")
    slot = channel_slot(ch)
    a, b = nodes(make_server, cluster3)
    with (
        Client(a.ws_url, token=a.token("pub"), client_id="pub", channel=ch) as pub,
        Client(a.ws_url, token=a.token("ma"), channel=ch) as ma,
        Client(b.ws_url, token=b.token("mb"), channel=ch) as mb,
    ):
        for c in (pub, ma, mb):
            joined(c, ch)
        contents: dict[int, str] = {}

        def burst(first: int) -> None:
            for i in range(first, first + 10):
                pub.publish(ch, f"m{i}")
            for meta, i in zip(acks(pub, 10), range(first, first + 10), strict=True):
                contents[meta["offset"]] = f"m{i}"

        burst(1)
        for m in (ma, mb):
            assert [g["data"]["metadata"]["offset"] for g in messages(m, 10)] == list(range(1, 11))

        # the slot half moved: its keys are on dst, src still owns it and answers ASK
        cluster3.migrate_slot(slot, dst, finish=False)
        with dst.client() as r_dst, src.client() as r_src:
            assert r_dst.execute_command("CLUSTER COUNTKEYSINSLOT", slot) >= 3
            assert r_src.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0
        burst(11)  # acked: followed to dst with ASKING
        with Client(b.ws_url, token=b.token("ask"), channel=ch) as j:  # a join reads dst too
            assert joined(j, ch)["offset"] == 20
        # a third machine, no member of `ch`: it read the table while src owned the slot
        third = make_server(NODE_ID="node-c", BROKER_URL=cluster3.url)
        assert third.create_channel(name=ch) == 201

        # the move is finished: src answers MOVED, the subscriptions follow the slot
        cluster3.finish_migration(slot, src, dst)
        assert cluster3.owner(slot) is dst
        # C has no subscription Redis could drop: its table is stale, src answers MOVED
        code, view, _ = third.http("GET", f"/ws/channels/{ch}", token=third.admin())
        assert code == 200 and view["offset"] == 20, (code, view)
        wait_for(lambda: shard_subscribers(dst, ch) == 2, timeout=15.0)
        assert shard_subscribers(src, ch) == 0
        burst(21)
        assert sorted(contents) == list(range(1, 31))
        for m in (ma, mb):
            got = offsets_until(m, 30)
            assert got[-10:] == list(range(21, 31)) and len(set(got)) == len(got), got

        # nothing acked is lost: a join with `since` gets every one of them, in order
        for srv in (a, b):
            replay, recovered = history(srv, ch, since=10)
            assert recovered
            assert [(g["data"]["metadata"]["offset"], g["data"]["content"]) for g in replay] == [
                (o, contents[o]) for o in range(11, 31)
            ]
            wait_for(partial(healthy, srv), timeout=15.0)
        with src.client() as r:
            assert r.keys(f"*{{{ch}}}*") == []


# -- issue 14 item 7: a master killed, its replica promoted ------------------------------------


def test_a_killed_master_fails_over_and_nothing_acked_is_lost(
    ha_cluster: ClusterProcs, make_server: Callable[..., Server]
) -> None:
    procs = ha_cluster
    victim, other, _ = procs.masters()
    down = channel_on(procs, victim, "rc.down.")
    up = channel_on(procs, other, "rc.up.")
    replica = procs.replica_of(victim)
    a, b = nodes(make_server, procs)
    a.allow_errors = b.allow_errors = True  # the lost master is logged at error level
    with (
        Client(a.ws_url, token=a.token("pub"), client_id="pub") as pub,
        Client(a.ws_url, token=a.token("ma")) as ma,
        Client(b.ws_url, token=b.token("mb")) as mb,
    ):
        for c in (pub, ma, mb):
            joined(c)
            for ch in (down, up):
                c.join(ch)
                joined(c, ch)
        for i in range(10):
            pub.publish(down, f"d{i}")
            pub.publish(up, f"u{i}")
        assert sorted(m["offset"] for m in acks(pub, 20)) == sorted([*range(1, 11)] * 2)
        for m in (ma, mb):
            messages(m, 20)
        acked = {o: f"d{o - 1}" for o in range(1, 11)}  # each channel's offsets in order

        # the replica has every write of its master (WAIT, then the offsets agree)
        with victim.client() as r:
            assert r.execute_command("WAIT", 1, 5000) == 1
            master_offset = r.info("replication")["master_repl_offset"]
        with replica.client() as r:
            assert r.info("replication")["slave_repl_offset"] == master_offset
            # no failover until the outage has been seen (then it is allowed again)
            r.config_set("cluster-replica-no-failover", "yes")
        # the other masters serve their slots while this one is down (docs/operations.md
        # advises it; with Redis's default, `yes`, every slot is refused once the master is
        # marked failed: tests/integration/test_cluster_coverage.py)
        for node in procs.nodes:
            if node is not victim:
                with node.client() as r:
                    r.config_set("cluster-require-full-coverage", "no")
        victim.kill()

        # the outage: its channels' publishes are refused, never acked; /health degraded
        for srv in (a, b):
            wait_for(partial(degraded_with, srv, "broker_cluster_degraded"), timeout=10.0)
            assert f":{victim.port}" not in json.dumps(status(srv))
        seq = pub.publish(down, "refused")
        err = expect_error(pub, "INTERNAL_ERROR", timeout=10.0)
        assert err["details"]["component"] == "broker", err
        assert (err["details"]["channel"], err["details"]["sequence"]) == (down, seq), err
        pub.publish(up, "u-during")  # the other masters' channels work on
        assert acks(pub, 1)[0]["offset"] == 11
        for m in (ma, mb):
            assert messages(m, 1)[0]["data"]["content"] == "u-during"

        # the replica takes over; both machines are healthy again by themselves
        with replica.client() as r:
            r.config_set("cluster-replica-no-failover", "no")
        wait_for(lambda: procs.owner(channel_slot(down)) is replica, timeout=30.0)
        procs.wait_ok(timeout=30.0)
        for srv in (a, b):
            wait_for(partial(healthy, srv), timeout=20.0, interval=0.1)
        # healthy means subscribed again: both machines' subscriptions are on the new master
        assert shard_subscribers(replica, down) == 2

        # publishes work again, in the same epoch (the history survived), and reach the
        # members of both machines (their subscriptions followed the slot)
        pub.publish(down, "after", sequence=seq, action="retry")
        assert acks(pub, 1)[0]["offset"] == 11
        acked[11] = "after"
        for m in (ma, mb):
            got = messages(m, 1)[0]["data"]
            assert (got["channel"], got["content"]) == (down, "after"), got

        # clients recovering with `since` get every acked message, nothing refused
        for srv in (a, b):
            replay, recovered = history(srv, down, since=0)
            assert recovered
            assert {g["data"]["metadata"]["offset"]: g["data"]["content"] for g in replay} == (
                acked
            )
    for srv in (a, b):
        only_expected_errors(srv, "broker_degraded")


# -- the URL is checked before anything starts ------------------------------------------------


def test_bad_cluster_urls_exit_2_with_one_line_and_no_credentials(tmp_path: Path) -> None:
    good = "redis+cluster://:pw-do-not-print@127.0.0.1:7000,127.0.0.1:7001"
    out = run(["check-config"], cli_env(tmp_path, JWT_SECRET=SECRET, BROKER_URL=good), tmp_path)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)["broker_url"]
    assert shown == "redis+cluster://:***@127.0.0.1:7000,127.0.0.1:7001", shown
    for bad, fragment in (
        ("redis+cluster://:pw-do-not-print@a:1,redis://b:2", "seed 2 of 2: a redis+cluster://"),
        ("redis://:pw-do-not-print@b:2,redis+cluster://a:1", "entry 2 of 2: redis+cluster://"),
        ("redis+cluster://:pw-do-not-print@a:1/2", "database 0 only"),
        ("redis+cluster://:pw-do-not-print@a:1,,b:2", "seed 2 of 3: empty"),
        ("redis+cluster://:pw-do-not-print@a:1,a:1", "names a:1 again"),
        ("redis+cluster://:pw-do-not-print@a", "must be host:port"),
        ("redis+cluster://a:1?password=pw-do-not-print&db=1", "'db' is not supported"),
        ("redis+cluster://a:1?password=pw-do-not-print&ssl_ca_certs=x", "'ssl_ca_certs'"),
        ("rediss+cluster://:pw-do-not-print@a:1?ssl_ca_certs=/nonexistent", "cannot read"),
    ):
        for command in (["check-config"], ["serve"]):
            out = run(command, cli_env(tmp_path, JWT_SECRET=SECRET, BROKER_URL=bad), tmp_path)
            assert out.returncode == 2, (command, bad, out.stdout, out.stderr)
            line = one_line(out.stderr)
            assert line.startswith("aether-fast: configuration error: BROKER_URL: "), line
            assert fragment in line and "pw-do-not-print" not in line, line


def test_health_stays_degraded_until_a_moved_channels_subscription_is_back(
    make_server: Callable[..., Server], cluster3: ClusterProcs
) -> None:
    """Delivery must not stop behind a green /health: the slot moves to a master that
    refuses the subscription (an ACL), so members here would hear nothing; /health says
    so until the subscription is made, then the members hear the channel again."""
    src, dst, _ = cluster3.masters()
    ch = channel_on(cluster3, src, "rc.acl.")
    slot = channel_slot(ch)
    srv = make_server(BROKER_URL=cluster3.url)
    with (
        Client(srv.ws_url, token=srv.token("m"), channel=ch) as m,
        Client(srv.ws_url, token=srv.token("pub"), client_id="pub", channel=ch) as pub,
    ):
        joined(m, ch)
        joined(pub, ch)
        with dst.client() as r:
            r.execute_command("ACL SETUSER default -ssubscribe")
        try:
            cluster3.migrate_slot(slot, dst)
            wait_for(partial(degraded_with, srv, "broker_cluster_degraded"), timeout=10.0)
            pub.publish(ch, "published while nobody listens")
            assert acks(pub, 1)[0]["offset"] == 1
            for _ in range(3):  # it stays so: the subscription is tried again and refused
                time.sleep(0.5)
                assert degraded_with(srv, "broker_cluster_degraded")
        finally:
            with dst.client() as r:
                r.execute_command("ACL SETUSER default +ssubscribe")
        wait_for(partial(healthy, srv), timeout=10.0)
        assert shard_subscribers(dst, ch) == 1
        pub.publish(ch, "heard again")
        assert messages(m, 1)[0]["data"]["metadata"]["offset"] == 2  # 1 was missed live
        replay, recovered = history(srv, ch, since=0)
        assert recovered and [g["data"]["content"] for g in replay] == [
            "published while nobody listens",
            "heard again",
        ]


# -- review: the sharded subscriber's bookkeeping, on a real master ----------------------------


def test_a_refused_sunsubscribe_does_not_fail_the_next_subscription(
    cluster3: ClusterProcs,
) -> None:
    """A master answers SUNSUBSCRIBE of a channel whose slot it lost with MOVED (an error
    that names no channel): that must not be taken for the answer to the SSUBSCRIBE sent
    after it, which would refuse a join on a healthy master (or mark a channel lost)."""
    src, dst, _ = cluster3.masters()
    gone = channel_on(cluster3, dst, "rc.gone.")  # not src's slot: src answers MOVED
    mine = channel_on(cluster3, src, "rc.mine.")

    async def scenario() -> set[str]:
        link = RedisLink(f"redis://{src.addr}", node=src.addr)
        lost: list[str] = []
        link.on_lost = lost.append
        await link.start()
        try:
            link.unsubscribe([pub_channel(gone)])
            await link.subscribe(pub_channel(mine))  # failed with "MOVED ..." before
            await link.commands()
            assert lost == []
            return set(link.subscribed)
        finally:
            await link.close()

    assert asyncio.run(scenario()) == {pub_channel(mine)}


def cluster_slots_calls(procs: ClusterProcs) -> int:
    """How many CLUSTER SLOTS the live masters have answered (INFO commandstats)."""
    total = 0
    for node in procs.masters():
        with node.client() as r:
            total += int(r.info("commandstats").get("cmdstat_cluster|slots", {}).get("calls", 0))
    return total


def test_joins_in_a_redirect_loop_share_the_reads_of_the_slot_table(
    make_server: Callable[..., Server], cluster3: ClusterProcs
) -> None:
    """A broken cluster answers MOVED forever (src gave a slot to dst, which has not taken
    it: each sends the subscription to the other). Many joins of its channel at once must
    not read the slot table once per join and hop (a storm on every master): they share
    the reads; and each join fails with an error, none hangs."""
    src, dst, _ = cluster3.masters()
    ch = channel_on(cluster3, src, "rc.loop.")
    slot = channel_slot(ch)
    src_id, dst_id = cluster3.node_id(src), cluster3.node_id(dst)
    srv = make_server(BROKER_URL=cluster3.url)
    joins = 16
    with dst.client() as t, src.client() as s:
        t.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        s.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
    try:
        before = cluster_slots_calls(cluster3)
        clients = [Client(srv.ws_url, token=srv.token(f"j{i}")) for i in range(joins)]
        try:
            for c in clients:
                c.join(ch)
            for c in clients:
                error = c.recv_until("error")  # the join refused as a broker fault
                assert error["details"]["reason"] == "broker_unavailable", error
        finally:
            for c in clients:
                c.close()
        reads = cluster_slots_calls(cluster3) - before
        # one read per join and hop would be joins * MAX_HOPS (80); shared: a few per hop
        assert reads <= 30, reads
    finally:
        with dst.client() as t, src.client() as s:
            t.execute_command("CLUSTER SETSLOT", slot, "NODE", src_id)
            s.execute_command("CLUSTER SETSLOT", slot, "NODE", src_id)
        cluster3.wait_ok()


def test_a_join_follows_moved_when_the_slot_moved_before_the_table_was_read(
    make_server: Callable[..., Server], cluster3: ClusterProcs
) -> None:
    """A slot moved while no member here listened (so no `sunsubscribe` told the router):
    the next join's SSUBSCRIBE is answered MOVED by the old master. The join follows it to
    the new master (as publishes do) instead of failing with broker_unavailable."""
    src, dst, _ = cluster3.masters()
    ch = channel_on(cluster3, src, "rc.late.")
    srv = make_server(BROKER_URL=cluster3.url)
    assert healthy(srv)
    cluster3.migrate_slot(channel_slot(ch), dst)  # the router reads the table every 5 s
    with (
        Client(srv.ws_url, token=srv.token("m"), channel=ch) as m,
        Client(srv.ws_url, token=srv.token("pub"), client_id="pub", channel=ch) as pub,
    ):
        joined(m, ch)
        joined(pub, ch)
        assert shard_subscribers(dst, ch) == 1
        pub.publish(ch, "on the new master")
        assert messages(m, 1)[0]["data"]["content"] == "on the new master"


def test_nothing_is_opened_again_after_close(cluster3: ClusterProcs) -> None:
    """Closing the links fails the publishes in flight, and each failure asks for a read
    of the slot table: after `close` that read must not open a link to every master again
    (connections left open by a stopped worker, a task still running at loop end)."""
    seeds = [f"redis://{n.addr}" for n in cluster3.masters()]

    async def scenario() -> tuple[int, int]:
        slots = Slots(seeds)
        await slots.start()
        opened = len(slots.links)
        await slots.close()
        slots.request_refresh()  # what `_published` does for a batch the closing failed
        await slots.refreshed()
        with contextlib.suppress(RedisError, OSError):
            await slots.refresh()
        left = len(slots.links)
        await slots.close()  # (leaves nothing open, whatever the outcome)
        return opened, left

    assert asyncio.run(scenario()) == (3, 0)


def test_a_publish_asked_to_a_node_without_the_script_is_acked(
    make_server: Callable[..., Server], cluster3: ClusterProcs
) -> None:
    """Mid-migration the channel's keys are on dst, which has lost its scripts (SCRIPT
    FLUSH, a restart): the publish follows ASK, meets NOSCRIPT, and sends the script
    itself; that EVAL must go with ASKING too, else dst answers MOVED back to src and the
    publish is refused after its hops although both masters work."""
    src, dst, _ = cluster3.masters()
    ch = channel_on(cluster3, src, "rc.noscript.")
    slot = channel_slot(ch)
    srv = make_server(BROKER_URL=cluster3.url)
    with Client(srv.ws_url, token=srv.token("pub"), client_id="pub", channel=ch) as pub:
        joined(pub, ch)
        pub.publish(ch, "one")
        assert acks(pub, 1)[0]["offset"] == 1
        cluster3.migrate_slot(slot, dst, finish=False)
        try:
            with dst.client() as r:
                r.script_flush()
            pub.publish(ch, "two")
            assert acks(pub, 1)[0]["offset"] == 2
        finally:
            cluster3.finish_migration(slot, src, dst)


def test_a_senders_order_holds_across_moved(cluster3: ClusterProcs) -> None:
    """Publish A meets MOVED (the slot moved, the table is stale); publish B of the same
    sender is made in the same loop pass, after the MOVED reply was read: the table names
    the new master now, so B goes there at once; A must still go first (offset A < B).
    (The router's `moved` is where B is made: the pass of a client's next frame.)"""
    src, dst, _ = cluster3.masters()
    ch = channel_on(cluster3, src, "rc.order.")
    seeds = [f"redis://{n.addr}" for n in cluster3.masters()]

    class Hub:
        def channel(self, name: str) -> None:
            return None

    channel = SimpleNamespace(name=ch, config=SimpleNamespace(history_size=10))
    sender = SimpleNamespace(identity="u", client_id="c", user_id="u")

    async def scenario() -> tuple[int, int]:
        slots = Slots(seeds)
        broker = SlotsBroker(Hub(), slots, None, history_ttl_s=60, dedup_ttl_s=60)
        await broker.start()
        try:
            cluster3.migrate_slot(channel_slot(ch), dst)  # the router still names src
            later: list[asyncio.Future[PublishResult]] = []
            moved = slots.moved

            def moved_then_publish(slot: int, addr: str) -> None:
                moved(slot, addr)
                later.append(broker.publish(channel, sender, 2, "B"))

            slots.moved = moved_then_publish  # type: ignore[method-assign]
            first = await broker.publish(channel, sender, 1, "A")
            second = await later[0]
            return first[0], second[0]
        finally:
            await broker.close()

    assert asyncio.run(scenario()) == (1, 2)
