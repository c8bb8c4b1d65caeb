"""A sharded broker (docs/operations.md §14, *Shards*): BROKER_URL lists two Redis servers,
real `redis-server` processes on free ports owned by this module, and two server processes
("machines") list them in opposite orders.

Channels on both shards publish, recover with `since` and deduplicate retries across the
machines, and each channel's keys and pub/sub exist on its shard only; the cluster table
and the configs live on the home shard (the first in canonical order) only. One shard
killed mid-traffic degrades only its channels (publishes and joins refused with the
documented error, /health `degraded` with `broker_shard_unavailable`) while the other's
keep publishing and delivering with nothing lost; when it comes back it is used again.

Which shard a channel is on is computed with the router's hash functions, which
tests/unit/test_shard_router.py checks against published values.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from aether_fast.brokers.redis_shards import canonical, fnv1a_64, jump_hash
from tests.conftest import SECRET, Server
from tests.integration.cluster_helpers import (
    messages,
    only_expected_errors,
    pub_members_late,
    reader_leaves_after_five,
    status,
    wait_cluster,
)
from tests.integration.helpers import expect, expect_error, joined, wait_for
from tests.integration.redis_fixture import RedisServer
from tests.integration.test_cli import cli_env, one_line, run
from tests.integration.wsclient import Client

Pair = tuple[Server, Server]
Shards = tuple[RedisServer, RedisServer]


@pytest.fixture(scope="module")
def shard_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shards]:
    """Two redis-server processes, in canonical order (the home first)."""
    made = [RedisServer(tmp_path_factory.mktemp(f"shard{i}")) for i in range(2)]
    try:
        first = canonical([r.url(0) for r in made])[0]
        home, other = sorted(made, key=lambda r: r.url(0) != first)
        yield home, other
    finally:
        for r in made:
            r.stop(signal.SIGKILL)


@pytest.fixture
def shards(shard_servers: Shards) -> Shards:
    """Both shards running and empty."""
    for r in shard_servers:
        if not r.running:  # a failed test must not leave one down for the next
            r.start()
        r.flushall()
    return shard_servers


def nodes(make_server: Callable[..., Server], shards: Shards, **env: str) -> Pair:
    """Machine A lists the shards home first, machine B the other way round."""
    urls = [r.url(0) for r in shards]
    common = {"RATE_LIMIT_MESSAGES": "100000", **env}
    a = make_server(NODE_ID="node-a", BROKER_URL=",".join(urls), **common)
    b = make_server(NODE_ID="node-b", BROKER_URL=",".join(reversed(urls)), **common)
    return a, b


def channel_on(shard: int, prefix: str) -> str:
    """A channel name that the router puts on `shard` of 2."""
    for i in range(1000):
        name = f"{prefix}{i}"
        if jump_hash(fnv1a_64(name.encode()), 2) == shard:
            return name
    raise AssertionError("no such channel name")


def acks(c: Client, n: int) -> list[dict[str, Any]]:
    """The metadata of the next `n` acks (nothing else expected in between)."""
    return [expect(c, "message", "ack", timeout=10.0)["data"]["metadata"] for _ in range(n)]


def health(srv: Server) -> tuple[int, Any]:
    code, body, _ = srv.http("GET", "/health")
    return code, body


def degraded_with(srv: Server, reason: str) -> bool:
    return health(srv) == (503, {"status": "degraded", "reason": reason})


def healthy(srv: Server) -> bool:
    return health(srv) == (200, {"status": "healthy"})


# -- everything of a channel on its shard ---------------------------------------------------


def test_channels_work_across_machines_listing_the_shards_in_any_order(
    make_server: Callable[..., Server], shards: Shards
) -> None:
    home, other = shards
    a, b = nodes(make_server, shards)
    on_home, on_other = channel_on(0, "sh.home."), channel_on(1, "sh.other.")
    for ch in (on_home, on_other):
        reader = {"token": a.token("reader"), "client_id": "reader-1", "channel": ch}
        with (
            Client(a.ws_url, token=a.token("pub"), client_id="pub", channel=ch) as pub,
            Client(b.ws_url, token=b.token("mb"), channel=ch) as mb,
        ):
            joined(pub, ch)
            joined(mb, ch)
            # publications from A reach B: both machines put the channel on the same shard
            epoch = reader_leaves_after_five(a.ws_url, reader, pub, ch)
            assert [m["offset"] for m in acks(pub, 10)] == list(range(1, 11))
            got = messages(mb, 10)
            assert [m["data"]["content"] for m in got] == [f"m{i}" for i in range(1, 11)]

            # the reader comes back on B with what it saw on A
            with Client(b.ws_url, **reader, since=5, epoch=epoch) as r:
                data = joined(r, ch)
                assert data["recovered"] is True and data["epoch"] == epoch, data
                got = messages(r, 5)
                assert [m["data"]["content"] for m in got] == [f"m{i}" for i in range(6, 11)]

            # a retry on B of what was acked on A: the original offset, not published again
            with Client(a.ws_url, token=a.token("ret"), client_id="dup-1", channel=ch) as s:
                joined(s, ch)
                s.publish(ch, "once", sequence=7)
                first = acks(s, 1)[0]
            assert messages(mb, 1)[0]["data"]["metadata"]["offset"] == first["offset"] == 11
            with Client(b.ws_url, token=b.token("ret"), client_id="dup-1", channel=ch) as s:
                joined(s, ch)
                s.publish(ch, "once", sequence=7, action="retry")
                assert acks(s, 1)[0] == first
            mb.nothing(0.3)

            # its keys and its pub/sub channel are on its own shard, none on the other
            own, foreign = (home, other) if ch == on_home else (other, home)
            with own.client() as r_own, foreign.client() as r_foreign:
                keys = sorted(k.decode() for k in r_own.keys(f"*{{{ch}}}*"))
                assert keys[:2] == [f"aether:ch:{{{ch}}}:hist", f"aether:ch:{{{ch}}}:meta"], keys
                assert [k.split(":")[1] for k in keys[2:]] == ["dedupe"] * 2, keys  # 2 senders
                assert r_foreign.keys(f"*{{{ch}}}*") == []
                target = f"aether:pub:{ch}"
                assert r_own.pubsub_numsub(target) == [(target.encode(), 2)]  # A and B
                assert r_foreign.pubsub_numsub(target) == [(target.encode(), 0)]


def test_cluster_table_and_configs_live_on_the_home_shard_only(
    make_server: Callable[..., Server], shards: Shards
) -> None:
    home, other = shards
    a, b = nodes(make_server, shards)
    wait_cluster(a, 2, 2)
    wait_cluster(b, 2, 2)
    ch = channel_on(1, "sh.cfg.")  # a channel of the other shard: its config is still home's
    assert a.create_channel(name=ch, require_auth=False, max_connections=1) == 201
    wait_for(lambda: b.http("GET", f"/ws/channels/{ch}", token=b.admin())[0] == 200)
    with Client(b.ws_url, channel=ch) as anon:  # B applies it: anonymous allowed, one member
        joined(anon, ch)
    with home.client() as r_home, other.client() as r_other:
        assert json.loads(r_home.hget("aether:channels", ch) or b"{}")["max_connections"] == 1
        assert r_home.zcard("aether:workers") == 2
        assert len(r_home.keys("aether:worker:*")) >= 2
        assert r_home.pubsub_numsub("aether:config") == [(b"aether:config", 2)]
        assert r_other.keys("aether:channels") == []
        assert r_other.keys("aether:worker*") == []
        assert r_other.pubsub_numsub("aether:config") == [(b"aether:config", 0)]


# -- one shard down --------------------------------------------------------------------------


def test_one_shard_down_degrades_only_its_channels_then_recovers(
    make_server: Callable[..., Server], shards: Shards
) -> None:
    _, other = shards
    a, b = nodes(make_server, shards)
    a.allow_errors = b.allow_errors = True  # the lost shard is logged at error level
    up, down = channel_on(0, "sh.up."), channel_on(1, "sh.down.")
    with pub_members_late(a, b, up, late_on=b) as (pub, ma, mb, late):
        for c in (pub, ma, mb):
            c.join(down)
            joined(c, down)

        # a stream of publishes alternating between the two shards' channels; the other
        # shard is frozen (SIGSTOP) in the middle of it, then killed by its PID
        half = 20
        sent: dict[int, str] = {}  # sequence -> channel
        for i in range(half):
            for ch in (up, down):
                sent[pub.publish(ch, f"{ch} {i}")] = ch
        answers = [pub.recv(10.0) for _ in range(2 * half)]
        assert all((m["type"], m["action"]) == ("message", "ack") for m in answers), answers
        assert other.proc is not None
        other.proc.send_signal(signal.SIGSTOP)
        try:
            second: dict[int, str] = {}
            for i in range(half, 2 * half):
                for ch in (up, down):
                    second[pub.publish(ch, f"{ch} {i}")] = ch
            # the home shard's channel is not held up by the frozen one
            acked_meanwhile = [expect(pub, "message", "ack", timeout=10.0) for _ in range(half)]
            assert {m["data"]["channel"] for m in acked_meanwhile} == {up}
        finally:
            other.stop(signal.SIGKILL)
        refused = [expect_error(pub, "INTERNAL_ERROR", timeout=15.0) for _ in range(half)]
        for err in refused:
            assert err["details"]["component"] == "broker", err
            assert err["details"]["channel"] == down, err
        assert sorted(e["details"]["sequence"] for e in refused) == sorted(
            s for s, ch in second.items() if ch == down
        )
        ups = [m["data"]["metadata"] for m in acked_meanwhile]
        assert [m["offset"] for m in ups] == list(range(half + 1, 2 * half + 1)), ups

        # the members got every acked publication of each channel once, in offset order;
        # nothing of what was refused
        for m in (ma, mb):
            got = messages(m, 3 * half)
            by_channel: dict[str, list[int]] = {up: [], down: []}
            for g in got:
                by_channel[g["data"]["channel"]].append(g["data"]["metadata"]["offset"])
            assert by_channel == {
                up: list(range(1, 2 * half + 1)),
                down: list(range(1, half + 1)),
            }, by_channel
            m.nothing(0.3)

        # both machines say which kind of trouble, never where: that is in the log
        for srv in (a, b):
            wait_for(partial(degraded_with, srv, "broker_shard_unavailable"), timeout=10.0)
            st = status(srv)
            assert (st["status"], st["reason"]) == ("degraded", "broker_shard_unavailable"), st
            assert f":{other.port}" not in json.dumps(st), st
            logged = [o for o in srv.log_lines() if o.get("event") == "broker_degraded"]
            assert logged and all(o["data"]["details"]["shard"] == 1 for o in logged), logged
            assert all(f":{other.port}" in o["data"]["details"]["redis"] for o in logged)

        # the live shard's channel keeps publishing, delivering and recovering
        pub.publish(up, "still here")
        assert acks(pub, 1)[0]["offset"] == 2 * half + 1
        for m in (ma, mb):
            assert messages(m, 1)[0]["data"]["content"] == "still here"
        epoch = joined_epoch(b, up)
        with Client(b.ws_url, token=b.token("rec"), channel=up, since=2 * half, epoch=epoch) as r:
            assert joined(r, up)["recovered"] is True
            assert messages(r, 1)[0]["data"]["content"] == "still here"
        # admin: a channel's view on the live shard is read; the list, which reads every
        # live channel's position, is refused while one of them is on the dead shard
        assert a.http("GET", f"/ws/channels/{up}", token=a.admin())[0] == 200
        assert a.http("GET", f"/ws/channels/{down}", token=a.admin())[0] == 503
        assert a.http("GET", "/ws/channels", token=a.admin())[0] == 503
        # the dead shard's channels refuse publishes and joins with the documented errors
        seq = pub.publish(down, "refused")
        err = expect_error(pub, "INTERNAL_ERROR")
        assert (err["details"]["channel"], err["details"]["sequence"]) == (down, seq), err
        late.join(channel_on(1, "sh.late."))
        err = expect_error(late, "INTERNAL_ERROR")
        assert err["details"]["reason"] == "broker_unavailable", err
        late.join(channel_on(0, "sh.late."))
        joined(late)
        ma.nothing(0.2)

        # the shard comes back (empty: no persistence): healthy again by itself, and the
        # members that stayed get its channel's publications again (resubscribed)
        other.start()
        for srv in (a, b):
            wait_for(partial(healthy, srv), timeout=20.0, interval=0.1)
        pub.publish(down, "after", sequence=seq, action="retry")
        assert acks(pub, 1)[0]["offset"] == 1  # a new epoch on the restarted shard
        for m in (ma, mb):
            got = messages(m, 1)[0]["data"]
            assert (got["channel"], got["content"]) == (down, "after"), got
        mb.publish(up, "from b")
        expect(mb, "message", "ack")
        assert messages(ma, 1)[0]["data"]["content"] == "from b"
    for srv in (a, b):
        only_expected_errors(srv, "broker_degraded")


def joined_epoch(srv: Server, channel: str) -> str:
    with Client(srv.ws_url, token=srv.token("peek"), channel=channel) as c:
        return str(joined(c, channel)["epoch"])


def test_home_shard_down_stops_config_changes_not_the_other_shards_channels(
    make_server: Callable[..., Server], shards: Shards
) -> None:
    home, _ = shards
    a, b = nodes(make_server, shards)
    a.allow_errors = b.allow_errors = True
    up, down = channel_on(1, "sh.up."), channel_on(0, "sh.down.")
    with (
        Client(a.ws_url, token=a.token("pub"), channel=up) as pub,
        Client(b.ws_url, token=b.token("mb"), channel=up) as mb,
    ):
        joined(pub, up)
        joined(mb, up)
        home.stop(signal.SIGKILL)
        for srv in (a, b):
            wait_for(partial(degraded_with, srv, "broker_shard_unavailable"), timeout=10.0)
        # configs live on the home: a write is refused (503), not half done
        cfg = {"name": "sh.cfg", "max_connections": 0, "message_rate_limit": 0}
        code, body, _ = a.http("POST", "/ws/channels", cfg, token=a.admin())
        assert code == 503 and body["details"]["component"] == "broker", (code, body)
        # the other shard's channel works across the machines
        for i in range(5):
            pub.publish(up, f"up {i}")
        assert [m["offset"] for m in acks(pub, 5)] == [1, 2, 3, 4, 5]
        assert [m["data"]["content"] for m in messages(mb, 5)] == [f"up {i}" for i in range(5)]
        # the home shard's channels are refused (the ack and the error may come in either
        # order: they are answered by different shards)
        pub.publish(up, "x")
        pub.join(down)
        answers = {m["type"]: m for m in (pub.recv(10.0), pub.recv(10.0))}
        assert answers["message"]["data"]["metadata"]["offset"] == 6, answers
        err = answers["error"]
        assert err["code"] == "INTERNAL_ERROR" and err["details"]["channel"] == down, err

        home.start()
        for srv in (a, b):
            wait_for(partial(healthy, srv), timeout=20.0, interval=0.1)
        code, body, _ = a.http("POST", "/ws/channels", cfg, token=a.admin())
        assert code == 201, body
        pub.join(down)
        joined(pub, down)
    for srv in (a, b):
        only_expected_errors(srv, "broker_degraded")


def test_a_shard_none_of_whose_channels_is_joined_comes_back_healthy(
    make_server: Callable[..., Server], shards: Shards
) -> None:
    """Its subscriber has nothing to subscribe again: Redis answering a PING is what says it
    works again."""
    urls = [r.url(0) for r in shards]
    srv = make_server(BROKER_URL=",".join(urls))
    srv.allow_errors = True
    _, other = shards
    other.stop(signal.SIGKILL)
    wait_for(partial(degraded_with, srv, "broker_shard_unavailable"), timeout=10.0)
    other.start()
    wait_for(partial(healthy, srv), timeout=20.0, interval=0.1)
    ch = channel_on(1, "sh.idle.")
    with Client(srv.ws_url, token=srv.token("idle"), channel=ch) as c:
        joined(c, ch)
        c.publish(ch, "works")
        assert acks(c, 1)[0]["offset"] == 1
    only_expected_errors(srv, "broker_degraded")


# -- the list is checked before anything starts ----------------------------------------------


def test_check_config_prints_the_shards_in_canonical_order_and_refuses_bad_lists(
    tmp_path: Path,
) -> None:
    listed = "redis://:pw-do-not-print@127.0.0.2:6379/0, redis://127.0.0.1:6380/1"
    out = run(["check-config"], cli_env(tmp_path, JWT_SECRET=SECRET, BROKER_URL=listed), tmp_path)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)["broker_url"]
    assert shown == "redis://127.0.0.1:6380/1,redis://:***@127.0.0.2:6379/0", shown
    assert "pw-do-not-print" not in out.stdout + out.stderr

    for bad, fragment in (
        ("redis://h:6379/0,redis://:pw-do-not-print@H", "names h:6379 db 0 again"),
        ("redis://a,,redis://b", "entry 2 of 3: empty"),
        ("redis://a,http://:pw-do-not-print@b", "entry 2 of 2: must be a URL starting with"),
    ):
        for command in (["check-config"], ["serve"]):
            out = run(command, cli_env(tmp_path, JWT_SECRET=SECRET, BROKER_URL=bad), tmp_path)
            assert out.returncode == 2, (command, bad, out.stdout, out.stderr)
            line = one_line(out.stderr)
            assert line.startswith("aether-fast: configuration error: BROKER_URL: "), line
            assert fragment in line and "pw-do-not-print" not in line, line
