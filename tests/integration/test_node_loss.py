"""A whole node lost (docs/operations.md §14, "a node (machine) lost"): two servers on one
real Redis, one killed with SIGKILL by its PID — no graceful exit, no supervisor to restart
it, nothing removed from Redis by the dead process. The survivor's cluster view drops it once
its heartbeat keys expire (WORKER_TTL_S), and its clients' connections stop counting against
RATE_LIMIT_CONNECTIONS on the survivor. (A worker killed under a supervisor, which restarts
it, is tests/integration/test_workers.py.)"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from tests.conftest import Server
from tests.integration.cluster_helpers import (
    WORKER_TTL_S,
    first_answer,
    refused_eventually,
    start_pair,
    status,
    wait_cluster,
    wait_status,
)
from tests.integration.helpers import drain, joined, wait_for
from tests.integration.redis_fixture import RedisServer, db_of
from tests.integration.wsclient import Client


def test_lost_node_leaves_the_cluster_table_and_its_connection_counts_go(
    make_server: Callable[..., Server], redis_url: str, redis_server: RedisServer
) -> None:
    limit = 2
    a, b = start_pair(
        make_server, "lost-a", "lost-b", BROKER_URL=redis_url, RATE_LIMIT_CONNECTIONS=str(limit)
    )
    wait_cluster(a, 2, 2)
    wait_cluster(b, 2, 2)
    lost_worker = str(status(a)["answered_by"])

    def open_on(srv: Server) -> Callable[[], tuple[Client, dict[str, Any]]]:
        return lambda: first_answer(srv.ws_url, token=srv.token("nl-user"))

    opened: list[Client] = []
    try:
        # the user's connections, all on A; and someone else on B
        for _ in range(limit):
            c, hello = open_on(a)()
            opened.append(c)
            assert hello["type"] == "connection", hello
        other = Client(b.ws_url, token=b.token("nl-other"))
        opened.append(other)
        joined(other)
        wait_status(b, lambda s: s.get("cluster", {}).get("connections") == limit + 1)
        # B counts A's connections: the user is at its limit there too
        extra, err = refused_eventually(open_on(b), "CONNECTION_LIMIT")
        assert err["details"]["reason"] == "connections", err
        assert drain(extra)[1] == 4029

        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGKILL)  # the whole node, at once
        a.proc.wait(10)

        # B's view: A's worker is gone once its heartbeat keys have expired
        body = wait_cluster(b, 1, 1, timeout=WORKER_TTL_S + 10)
        assert "cluster" not in body, body  # no other worker left to sum up
        assert body["connections"]["active"] == 1, body  # B's own connection
        with redis_server.client(db_of(redis_url)) as r:
            assert r.zscore("aether:workers", lost_worker) is None
            wait_for(lambda: not r.keys(f"aether:worker:{lost_worker}*"), timeout=5.0)

        # the user's connections on A no longer count: it may open `limit` on B, not one more
        for _ in range(limit):
            c, hello = open_on(b)()
            opened.append(c)
            assert hello["type"] == "connection", hello
        extra, err = refused_eventually(open_on(b), "CONNECTION_LIMIT")
        assert drain(extra)[1] == 4029
        # B goes on serving its own clients as before
        assert status(b)["status"] == "healthy"
    finally:
        for c in opened:
            c.close()
