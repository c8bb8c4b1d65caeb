"""WORKERS=N (docs/operations.md §14): a supervisor and N worker processes sharing one port
over Redis.

The workers share the port (SO_REUSEPORT) and meet in Redis: status and Prometheus report
the whole node; clients spread over the workers still get each other's messages; a worker
killed with SIGKILL is restarted, its clients can come back, and its per-user connection
counts are released; SIGTERM to the supervisor drains every worker and exits 0, and a
SIGKILL to it has the kernel send each worker SIGTERM (they drain and free the port); settings
that cannot work stop start-up with exit status 2 and a line naming the variable. (Without
BROKER_URL the supervisor starts a Redis of its own: test_private_redis.py.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed

from tests.conftest import SECRET, Server
from tests.integration.cluster_helpers import (
    WORKER_TTL_S,
    first_answer,
    messages,
    only_expected_errors,
    prometheus_samples,
    refused_eventually,
    status,
    wait_node,
    worker_pids,
)
from tests.integration.helpers import closing_all, drain, expect, joined, wait_for
from tests.integration.redis_fixture import RedisServer, db_of
from tests.integration.test_cli import cli_env, run
from tests.integration.wsclient import Client
from tools.common import free_port

NODE = "wnode"


def start_workers(make_server: Callable[..., Server], redis_url: str, **env: str) -> Server:
    """A supervisor with two workers; returns once /ws/status lists both."""
    srv = make_server(WORKERS="2", BROKER_URL=redis_url, NODE_ID=NODE, **env)
    wait_node(srv, lambda b: len(b["workers"]) == 2, timeout=15.0)
    return srv


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Running (a zombie not yet reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_leftovers(pids: list[int]) -> None:
    """SIGKILL each of `pids` (children of a supervisor a test killed) still running, if it
    still runs the program it runs now (not a PID reused since)."""
    for pid, name in [(pid, comm(pid)) for pid in pids]:
        if name and alive(pid) and comm(pid) == name:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:`port`: a socket of ours can bind it (SO_REUSEADDR
    passes the TIME_WAIT of closed connections, never a listener)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def spread(srv: Server, n: int) -> dict[int, int]:
    """Poll until the node's workers together report `n` connections, both some; returns
    connections by worker pid."""
    body = wait_node(
        srv,
        lambda b: (
            len(b["workers"]) == 2
            and sum(w["connections_active"] for w in b["workers"]) == n
            and all(w["connections_active"] > 0 for w in b["workers"])
        ),
    )
    return {int(w["pid"]): int(w["connections_active"]) for w in body["workers"]}


def is_closed(c: Client, timeout: float) -> bool:
    """True if the server side went away within `timeout` (frames before it are skipped)."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            c.ws.recv(timeout=left)
    except TimeoutError:
        return False
    except ConnectionClosed:
        return True


# -- start-up and spreading -------------------------------------------------------------------


def test_supervisor_runs_two_workers_that_share_the_port(
    make_server: Callable[..., Server], redis_url: str
) -> None:
    srv = start_workers(make_server, redis_url)
    body = status(srv)
    pids = worker_pids(body)
    assert len(set(pids)) == 2 and srv.proc is not None and srv.proc.pid not in pids, body
    assert all(parent_of(pid) == srv.proc.pid for pid in pids)  # the supervisor's children
    assert {w["node"] for w in body["workers"]} == {NODE}
    assert body["node"] == NODE
    assert body["answered_by"] in {w["worker"] for w in body["workers"]}, body
    workers = {w["worker"] for w in body["workers"]}

    # Prometheus on METRICS_PORT: the whole node, one row per worker
    def scrape() -> str:
        code, text, _ = srv.http("GET", "/metrics", port=srv.metrics_port)
        assert code == 200, text
        assert isinstance(text, str)
        return text

    text = wait_for(
        lambda: (
            (t := scrape())
            and prometheus_samples(t, "aether_workers") == [({"node": NODE}, 2.0)]
            and t
        )
    )
    rows = prometheus_samples(text, "aether_connections_active")
    assert {r[0]["worker"] for r in rows} == workers, rows
    assert {r[0]["node"] for r in rows} == {NODE}

    # ~20 clients on the one port land on both workers and still hear each other
    ch = "w.fan"
    fan = [
        Client(srv.ws_url, token=srv.token(f"u{i}"), client_id=f"c{i}", channel=ch)
        for i in range(20)
    ]
    with closing_all(fan) as clients:
        for c in clients:
            joined(c, ch)
        by_worker = spread(srv, 20)
        assert set(by_worker) == set(pids), by_worker
        # the node's count, whichever worker answers
        wait_node(srv, lambda b: b["connections"]["active"] == 20)
        for i, c in enumerate(clients):
            c.publish(ch, f"from c{i}")
        ack_offsets = []
        for c in clients:
            frames = [c.recv() for _ in range(20)]  # its ack and 19 deliveries
            acks = [f for f in frames if f["action"] == "ack"]
            got = [f for f in frames if f["action"] == "send"]
            assert len(acks) == 1 and len(got) == 19, frames
            offsets = [m["data"]["metadata"]["offset"] for m in got]
            assert offsets == sorted(offsets) and len(set(offsets)) == 19
            ack_offsets.append(acks[0]["data"]["metadata"]["offset"])
            assert ack_offsets[-1] not in offsets  # no copy of its own
        assert sorted(ack_offsets) == list(range(1, 21))
        for c in clients:
            c.nothing(0.05)
        # the Prometheus rows add up to the node's connections
        rows = prometheus_samples(scrape(), "aether_connections_active")
        assert sum(v for _, v in rows) == 20, rows


def test_json_metrics_report_the_whole_node(
    make_server: Callable[..., Server], redis_url: str
) -> None:
    srv = start_workers(make_server, redis_url)
    with closing_all([Client(srv.ws_url, token=srv.token(f"j{i}")) for i in range(12)]) as clients:
        for c in clients:
            joined(c)
        spread(srv, 12)

        def node_figures() -> dict[str, Any] | None:
            code, body, _ = srv.http("GET", "/metrics/connections")
            assert code == 200, body
            return dict(body) if body.get("active") == 12 else None

        body = wait_for(node_figures, timeout=5.0, interval=0.1)
        assert body.get("node") == NODE, body
        assert isinstance(body.get("answered_by"), str), body


# -- a worker dies ----------------------------------------------------------------------------


def test_killed_worker_is_restarted_and_its_connection_counts_released(
    make_server: Callable[..., Server], redis_url: str, redis_server: RedisServer
) -> None:
    limit = 3
    srv = start_workers(make_server, redis_url, RATE_LIMIT_CONNECTIONS=str(limit))
    # the supervisor logs the death of the worker this test kills at error level
    srv.allow_errors = True
    ch = "w.kill"
    others = [
        Client(srv.ws_url, token=srv.token(f"k{i}"), client_id=f"k{i}", channel=ch)
        for i in range(10)
    ]
    mine = [Client(srv.ws_url, token=srv.token("kuser"), channel=ch) for _ in range(limit)]
    db = db_of(redis_url)
    with closing_all(others + mine) as everyone:
        for c in everyone:
            joined(c, ch)
        before = spread(srv, len(everyone))
        ids = {int(w["pid"]): str(w["worker"]) for w in status(srv)["workers"]}

        # the cluster table in Redis says on which workers kuser's connections are
        def kuser_by_pid() -> dict[int, int] | None:
            with redis_server.client(db) as r:
                counts = {
                    pid: int(r.hget(f"aether:worker:{wid}:limit_conns", "u:kuser") or 0)
                    for pid, wid in ids.items()
                }
            return counts if sum(counts.values()) == limit else None

        counts = wait_for(kuser_by_pid, timeout=5.0, interval=0.1)
        victim = max(counts, key=lambda pid: counts[pid])
        survivor = next(pid for pid in before if pid != victim)
        # kuser is at its limit on the whole node
        extra, _ = refused_eventually(
            lambda: first_answer(srv.ws_url, token=srv.token("kuser")), "CONNECTION_LIMIT"
        )
        assert drain(extra)[1] == 4029

        os.kill(victim, signal.SIGKILL)
        closed = [c for c in everyone if is_closed(c, 0.1)]
        deadline = time.monotonic() + 5
        while len(closed) < before[victim] and time.monotonic() < deadline:
            closed += [c for c in everyone if c not in closed and is_closed(c, 0.05)]
        assert len(closed) == before[victim], (len(closed), before)
        assert sum(1 for c in mine if c in closed) == counts[victim]
        alive = [c for c in everyone if c not in closed]
        assert len(alive) == before[survivor]

        # the members on the other worker still hear each other
        speaker = alive[0]
        speaker.publish(ch, "still here")
        expect(speaker, "message", "ack")
        for c in alive[1:]:
            assert messages(c, 1)[0]["data"]["content"] == "still here"

        # the supervisor starts a new worker; the dead one leaves the table
        body = wait_node(
            srv,
            lambda b: len(b["workers"]) == 2 and victim not in worker_pids(b),
            timeout=WORKER_TTL_S + 8,
        )
        new_pid = next(pid for pid in worker_pids(body) if pid != survivor)
        assert srv.proc is not None and parent_of(new_pid) == srv.proc.pid

        # the disconnected clients come back and work, wherever they land
        back = []
        for c in closed:
            if c in mine:
                continue
            name = c.url.split("client_id=")[1].split("&")[0]
            again = Client(srv.ws_url, token=srv.token(name), client_id=name, channel=ch)
            back.append(again)
            joined(again, ch)
        speaker.publish(ch, "welcome back")
        expect(speaker, "message", "ack")
        for c in back + alive[1:]:
            assert messages(c, 1)[0]["data"]["content"] == "welcome back"
        if back:
            back[0].publish(ch, "back again")
            expect(back[0], "message", "ack")
            for c in alive:
                assert messages(c, 1)[0]["data"]["content"] == "back again"

        # kuser's connections on the dead worker no longer count: it may open as many
        # as it lost (once the dead worker's figures expire), and not one more
        def open_kuser() -> Client | None:
            c, msg = first_answer(srv.ws_url, token=srv.token("kuser"))
            if msg["type"] == "connection":
                return c
            c.close()
            return None

        for _ in range(counts[victim]):
            mine.append(wait_for(open_kuser, timeout=WORKER_TTL_S + 4, interval=0.3))
        extra, _ = refused_eventually(
            lambda: first_answer(srv.ws_url, token=srv.token("kuser")), "CONNECTION_LIMIT"
        )
        assert drain(extra)[1] == 4029
        everyone += back
        only_expected_errors(srv, "worker_died")


# -- shutdown ---------------------------------------------------------------------------------


def test_sigterm_to_the_supervisor_drains_every_worker(
    make_server: Callable[..., Server], redis_url: str
) -> None:
    # started with the flags this time: `serve --workers 2 --broker-url ...`
    srv = make_server("--workers", "2", "--broker-url", redis_url, NODE_ID=NODE)
    wait_node(srv, lambda b: len(b["workers"]) == 2, timeout=15.0)
    term = [Client(srv.ws_url, token=srv.token(f"t{i}"), channel="w.term") for i in range(16)]
    with closing_all(term) as clients:
        for c in clients:
            joined(c, "w.term")
        pids = sorted(spread(srv, 16))
        assert srv.stop(signal.SIGTERM) == 0, srv.log_text()[-2000:]
        for c in clients:
            got, code = drain(c)
            assert code == 1001, (got, code)
            assert any(m.get("type") == "system" for m in got), got
        for pid in pids:  # both workers exited and were reaped by the supervisor
            assert not Path(f"/proc/{pid}").exists()
        events = [line.get("event") for line in srv.log_lines()]
        assert events.count("server_stopped") == 2, events
        assert "supervisor_stopped" in events


def test_a_killed_supervisor_takes_its_workers_along(
    make_server: Callable[..., Server], redis_url: str
) -> None:
    """SIGKILL to the supervisor (no drain of its own): the kernel sends each worker SIGTERM
    (PR_SET_PDEATHSIG), so they drain and exit, and the port is free for the next one."""
    srv = start_workers(make_server, redis_url)
    assert srv.proc is not None
    pids = worker_pids(status(srv))
    assert sorted(pids) == sorted(srv.children()), (pids, srv.children())
    try:
        with Client(srv.ws_url, token=srv.token("orphan"), channel="w.orphan") as c:
            joined(c, "w.orphan")
            os.kill(srv.proc.pid, signal.SIGKILL)
            srv.proc.wait()
            got, code = drain(c)
            assert code == 1001, (got, code)  # its worker drained it
        wait_for(lambda: not any(alive(pid) for pid in pids), timeout=15.0, interval=0.1)
        assert port_free(srv.port) and port_free(srv.metrics_port)
        events = [line.get("event") for line in srv.log_lines()]
        assert events.count("server_stopped") == 2, events
    finally:
        kill_leftovers(pids)


# -- start-up errors --------------------------------------------------------------------------


def run_serve(tmp_path: Path, env: dict[str, str], timeout: float = 30) -> tuple[int, str]:
    """`aether-fast serve` that must refuse to start: its exit status and its output."""
    done = run(["serve"], cli_env(tmp_path, **env), tmp_path, timeout)
    return done.returncode, done.stdout + done.stderr


def test_workers_without_a_jwt_secret_is_a_start_up_error(tmp_path: Path, redis_url: str) -> None:
    code, out = run_serve(tmp_path, {"WORKERS": "2", "BROKER_URL": redis_url})
    assert code == 2, out
    assert any("JWT_SECRET" in x for x in out.splitlines()), out
    assert "Traceback" not in out


def test_unreachable_redis_is_a_start_up_error(tmp_path: Path) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    for workers in ("1", "2"):
        # it must not hang: run_serve's own timeout (30 s) fails the test if it does (no
        # tighter wall-clock bound: speed is the bench's, and a busy machine once took 15 s)
        code, out = run_serve(
            tmp_path, {"WORKERS": workers, "BROKER_URL": closed, "JWT_SECRET": SECRET}
        )
        assert code == 2, (workers, out)
        lines = [x for x in out.splitlines() if x.startswith("aether-fast:")]
        assert lines and all("BROKER_URL" in x and "Redis" in x for x in lines), out
        assert "Traceback" not in out
