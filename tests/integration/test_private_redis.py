"""WORKERS=N without BROKER_URL (docs/operations.md §14): the supervisor's private Redis.

The supervisor starts `redis-server` as its child on a unix socket in DATA_DIR (AOF on, no
TCP port) and hands the workers BROKER_URL=unix://…: clients spread over the workers hear
each other; history and channel configs survive a restart of the whole server; SIGTERM
drains the workers and then stops Redis, leaving no process, and so does a SIGKILL to the
supervisor (the kernel's SIGTERM to each child); a Redis killed with SIGKILL is restarted
and the workers resume; no `redis-server` on PATH is exit 2 with a line that says what to
do; a socket path too long for sun_path moves to the temporary directory.
Every process is started, found (/proc) and killed by its PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import SECRET, Server
from tests.integration.cluster_helpers import (
    messages,
    only_expected_errors,
    status,
    wait_node,
    worker_pids,
)
from tests.integration.helpers import closing_all, drain, expect, joined, wait_for
from tests.integration.test_cli import cli_env, run
from tests.integration.test_workers import (
    alive,
    comm,
    kill_leftovers,
    parent_of,
    port_free,
    run_serve,
    spread,
)
from tests.integration.wsclient import Client

NODE = "pnode"
#: clients a test spreads over the two workers: the kernel puts all of them on one worker
#: with probability 2**(1 - N) (2**-15 here; with 8 it failed one run in about a hundred)
N = 16


def start(make_server: Callable[..., Server], **env: str) -> Server:
    """A supervisor with two workers and no BROKER_URL; returns once both are in the table."""
    srv = make_server(WORKERS="2", BROKER_URL="", NODE_ID=NODE, **env)
    wait_node(srv, lambda b: len(b["workers"]) == 2 and b["status"] == "healthy", timeout=20.0)
    return srv


def redis_child(srv: Server) -> int | None:
    """The PID of the supervisor's redis-server child, if it has one right now."""
    found = [pid for pid in srv.children() if comm(pid) == "redis-server"]
    assert len(found) <= 1, found
    return found[0] if found else None


def private_client(srv: Server) -> redis.Redis:
    return redis.Redis(
        unix_socket_path=str(srv.data_dir / "redis" / "redis.sock"), socket_timeout=5
    )


@contextlib.contextmanager
def members(srv: Server, ch: str, name: str) -> Iterator[list[Client]]:
    """N clients (user and client id `name`0, `name`1, ...) that joined `ch` on connecting;
    closed when the block ends."""
    clients = [
        Client(srv.ws_url, token=srv.token(f"{name}{i}"), client_id=f"{name}{i}", channel=ch)
        for i in range(N)
    ]
    with closing_all(clients):
        for c in clients:
            joined(c, ch)
        yield clients


def each_hears_the_others(clients: list[Client], ch: str, text: str, timeout: float) -> None:
    """Client i publishes "`text` i" on `ch`; each client gets what all the others published
    (once each), whichever worker they are on."""
    for i, c in enumerate(clients):
        c.publish(ch, f"{text} {i}")
    for i, c in enumerate(clients):
        got = [m["data"]["content"] for m in messages(c, len(clients) - 1, timeout=timeout)]
        assert sorted(got) == sorted(f"{text} {j}" for j in range(len(clients)) if j != i), got


def one_hears_another(srv: Server, ch: str, text: str) -> None:
    """Two members of `ch`: what one publishes, the other gets."""
    with (
        Client(srv.ws_url, token=srv.token("a"), channel=ch) as a,
        Client(srv.ws_url, token=srv.token("b"), channel=ch) as b,
    ):
        joined(a, ch)
        joined(b, ch)
        a.publish(ch, text)
        assert messages(b, 1)[0]["data"]["content"] == text


@pytest.fixture
def cleanup() -> Iterator[list[int]]:
    """PIDs a test leaves to kill (orphans of a supervisor it killed): each is killed if it
    still runs the program it ran when the test was over (not a PID reused since)."""
    pids: list[int] = []
    yield pids
    kill_leftovers(pids)


# -- the workers meet in it -------------------------------------------------------------------


def test_two_workers_meet_in_the_private_redis(make_server: Callable[..., Server]) -> None:
    srv = start(make_server)
    assert srv.proc is not None
    body = status(srv)
    assert body["broker"] == "redis", body
    pids = worker_pids(body)
    assert all(parent_of(pid) == srv.proc.pid for pid in pids)
    rpid = redis_child(srv)
    assert rpid is not None, srv.children()

    # on the unix socket in DATA_DIR, AOF in DATA_DIR/redis, no TCP port, memory bounded
    with private_client(srv) as r:
        got = {k: r.config_get(k)[k] for k in ("port", "appendonly", "dir", "maxmemory")}
        policy = r.config_get("maxmemory-policy")["maxmemory-policy"]
    assert got == {
        "port": "0",
        "appendonly": "yes",
        "dir": str(srv.data_dir / "redis"),
        "maxmemory": str(512 * 1024 * 1024),
    }, got
    assert policy == "volatile-lru"
    listening = Path("/proc/net/tcp").read_text() + Path("/proc/net/tcp6").read_text()
    inodes = {
        os.readlink(f"/proc/{rpid}/fd/{fd}")[len("socket:[") : -1]
        for fd in os.listdir(f"/proc/{rpid}/fd")
        if os.readlink(f"/proc/{rpid}/fd/{fd}").startswith("socket:[")
    }
    tcp_inodes = {line.split()[9] for line in listening.splitlines()[1:]}
    assert not inodes & tcp_inodes, "redis-server holds a TCP socket"
    assert (srv.data_dir / "redis" / "appendonlydir").is_dir()

    # clients on both workers: every publication reaches every other member, whichever
    # worker it was published on
    with members(srv, "p.fan", "c") as clients:
        by_worker = spread(srv, N)
        assert set(by_worker) == set(pids), by_worker
        each_hears_the_others(clients, "p.fan", "from", timeout=10.0)


# -- it survives a restart --------------------------------------------------------------------


def test_history_and_configs_survive_a_restart_of_the_server(
    make_server: Callable[..., Server],
) -> None:
    srv = start(make_server)
    admin = srv.admin()
    code, body, _ = srv.http(
        "POST", "/ws/channels", {"name": "p.keep", "history_size": 10}, token=admin
    )
    assert code == 201, body
    writer = Client(srv.ws_url, token=srv.token("w"), client_id="w1", channel="p.keep")
    try:
        epoch = joined(writer, "p.keep")["epoch"]
        for i in range(3):
            writer.publish("p.keep", f"kept {i}")
            assert expect(writer, "message", "ack")["data"]["metadata"]["offset"] == i + 1
    finally:
        writer.close()

    # SIGTERM: exit 0 (generous: Redis's last fsync of its AOF waits for a busy disk); then a
    # new supervisor, a new redis-server, new workers
    assert srv.stop(timeout=60) == 0, srv.log_text()[-2000:]
    srv.start()
    wait_node(srv, lambda b: len(b["workers"]) == 2 and b["status"] == "healthy", timeout=20.0)

    code, body, _ = srv.http("GET", "/ws/channels/p.keep", token=admin)
    assert code == 200 and body["history_size"] == 10 and body["configured"], body
    reader = Client(
        srv.ws_url, token=srv.token("r"), client_id="r1", channel="p.keep", since=0, epoch=epoch
    )
    try:
        reply = joined(reader, "p.keep")
        assert reply["recovered"] is True and reply["epoch"] == epoch, reply
        assert reply["offset"] == 3, reply
        replay = messages(reader, 3)
        assert [m["data"]["content"] for m in replay] == [f"kept {i}" for i in range(3)]
        assert [m["data"]["metadata"]["offset"] for m in replay] == [1, 2, 3]
    finally:
        reader.close()


# -- it is stopped last -----------------------------------------------------------------------


def test_sigterm_drains_the_workers_then_stops_redis_leaving_no_process(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    data = tmp_path / "data #1 ?x"  # what a URL would mistake: BROKER_URL percent-encodes it
    srv = start(make_server, DATA_DIR=str(data))
    assert (data / "redis" / "redis.sock").is_socket()
    children = srv.children()
    rpid = redis_child(srv)
    assert rpid is not None and len(children) == 3, children  # two workers and Redis
    with members(srv, "p.term", "t") as clients:
        spread(srv, N)
        assert srv.stop(signal.SIGTERM, timeout=60) == 0, srv.log_text()[-2000:]
        for c in clients:
            got, code = drain(c)
            assert code == 1001, (got, code)
    for pid in children:  # the workers and redis-server exited and were reaped
        assert not Path(f"/proc/{pid}").exists(), (pid, comm(pid))
    events = [line.get("event") for line in srv.log_lines()]
    stopped = [i for i, e in enumerate(events) if e == "server_stopped"]
    assert len(stopped) == 2, events
    # Redis went after both workers had drained, and before the supervisor ended
    assert (
        max(stopped) < events.index("private_redis_stopped") < events.index("supervisor_stopped")
    ), events
    assert not (data / "redis" / "redis.sock").exists()  # redis-server removed it


def test_a_killed_supervisor_leaves_neither_its_redis_nor_its_workers_behind(
    make_server: Callable[..., Server], cleanup: list[int]
) -> None:
    srv = start(make_server)
    srv.allow_errors = True  # its workers may lose Redis while they drain: broker_degraded
    assert srv.proc is not None
    rpid = redis_child(srv)
    assert rpid is not None
    children = srv.children()
    assert len(children) == 3, children  # two workers and Redis
    cleanup += children  # should any stay
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait()
    # the kernel tells each (PR_SET_PDEATHSIG): Redis writes its AOF and exits, the workers
    # drain and exit
    wait_for(lambda: not any(alive(pid) for pid in children), timeout=15.0, interval=0.1)
    assert port_free(srv.port) and port_free(srv.metrics_port)


# -- it dies ----------------------------------------------------------------------------------


def test_killed_private_redis_is_restarted_and_the_workers_resume(
    make_server: Callable[..., Server],
) -> None:
    srv = start(make_server)
    srv.allow_errors = True  # the death of Redis is logged at error level, by all three
    ch = "p.kill"
    with members(srv, ch, "k") as clients:
        spread(srv, N)
        old = redis_child(srv)
        assert old is not None
        os.kill(old, signal.SIGKILL)

        # the supervisor starts a new one (its child, same socket); both workers report
        # healthy again: their broker reconnected
        new = wait_for(lambda: (p := redis_child(srv)) and p != old and p, timeout=20.0)
        assert srv.proc is not None and parent_of(new) == srv.proc.pid
        wait_node(srv, lambda b: b["status"] == "healthy" and len(b["workers"]) == 2, timeout=30)

        def health_ok() -> bool:
            return all(srv.http("GET", "/health")[0] == 200 for _ in range(6))

        wait_for(health_ok, timeout=20.0, interval=0.2)

        # the members kept their connections, and publishing works again on both workers
        each_hears_the_others(clients, ch, "after", timeout=15.0)
        events = [line.get("event") for line in srv.log_lines()]
        assert "private_redis_died" in events, events
        assert "worker_died" not in events, events  # the workers rode it out
        only_expected_errors(srv, "private_redis_died", "broker_degraded")


def test_a_hung_private_redis_is_killed_and_restarted(
    make_server: Callable[..., Server],
) -> None:
    srv = start(make_server)
    srv.allow_errors = True
    old = redis_child(srv)
    assert old is not None
    os.kill(old, signal.SIGSTOP)  # alive, its socket accepts, nothing answers
    try:
        new = wait_for(lambda: (p := redis_child(srv)) and p != old and p, timeout=40.0)
        assert not alive(old)  # killed by the supervisor, not left stopped
    finally:
        if alive(old) and comm(old) == "redis-server":
            os.kill(old, signal.SIGCONT)
    assert new != old
    wait_node(srv, lambda b: b["status"] == "healthy" and len(b["workers"]) == 2, timeout=30)
    one_hears_another(srv, "p.hung", "after the hang")
    events = [line.get("event") for line in srv.log_lines()]
    assert "private_redis_unresponsive" in events, events
    only_expected_errors(srv, "private_redis_unresponsive", "private_redis_died", "broker_degraded")


# -- start-up errors --------------------------------------------------------------------------


def test_no_redis_server_on_path_is_exit_2_naming_it(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {"WORKERS": "2", "JWT_SECRET": SECRET, "PATH": str(empty)}
    code, out = run_serve(tmp_path, env)
    assert code == 2, out
    lines = [x for x in out.splitlines() if x.startswith("aether-fast:")]
    assert len(lines) == 1, out
    assert "redis-server" in lines[0] and "BROKER_URL" in lines[0] and "WORKERS" in lines[0]
    assert "Traceback" not in out
    assert not (tmp_path / "data" / "redis").exists()  # nothing was started or made

    # check-config says the same
    check = run(["check-config"], cli_env(tmp_path, **env), tmp_path, 30)
    assert check.returncode == 2, check
    assert check.stdout.strip() == ""
    assert check.stderr.strip() == lines[0]


def test_a_redis_that_cannot_start_is_exit_2_with_the_tail_of_its_log(tmp_path: Path) -> None:
    aof = tmp_path / "data" / "redis" / "appendonlydir"
    aof.mkdir(parents=True)
    (aof / "appendonly.aof.manifest").write_text("not a manifest\n")  # a damaged AOF
    code, out = run_serve(tmp_path, {"WORKERS": "2", "JWT_SECRET": SECRET})
    assert code == 2, out
    line = next(x for x in out.splitlines() if x.startswith("aether-fast:"))
    assert "redis-server exited with status 1 at start" in line, out
    assert "redis.log" in line and "manifest" in line, line  # why, from its own log
    assert "Traceback" not in out
    assert "supervisor_started" not in out and "server_started" not in out  # no worker
    assert oct((tmp_path / "data" / "redis").stat().st_mode & 0o777) == "0o700"


def test_a_second_supervisor_on_the_same_data_dir_is_refused(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    srv = start(make_server)
    code, out = run_serve(
        tmp_path, {"WORKERS": "2", "JWT_SECRET": SECRET, "DATA_DIR": str(srv.data_dir)}
    )
    assert code == 2, out
    line = next(x for x in out.splitlines() if x.startswith("aether-fast:"))
    assert "DATA_DIR" in line and "in use" in line, out
    assert "Traceback" not in out
    # the first one was not disturbed
    wait_node(srv, lambda b: b["status"] == "healthy" and len(b["workers"]) == 2)
    with private_client(srv) as r:
        assert r.ping()


def test_a_socket_path_too_long_for_sun_path_moves_to_the_temporary_directory(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    srv = start(make_server, DATA_DIR=str(deep))
    moved = next(
        line["data"]["details"]["socket"]
        for line in srv.log_lines()
        if line.get("event") == "private_redis_socket_moved"
    )
    assert len(os.fsencode(moved)) <= 107 and Path(moved).is_socket(), moved
    assert (deep / "redis" / "appendonlydir").is_dir()  # the AOF stays in DATA_DIR
    with redis.Redis(unix_socket_path=moved, socket_timeout=5) as r:
        assert r.config_get("dir")["dir"] == str(deep / "redis")
    one_hears_another(srv, "p.long", "through the moved socket")
    assert srv.stop(timeout=60) == 0
    assert not Path(moved).parent.exists()  # its directory is removed at stop

    # and when even the temporary directory is too deep: exit 2, naming DATA_DIR
    tmpdir = tmp_path / ("t" * 60) / ("u" * 60)
    tmpdir.mkdir(parents=True)
    code, out = run_serve(
        tmp_path,
        {"WORKERS": "2", "JWT_SECRET": SECRET, "DATA_DIR": str(deep), "TMPDIR": str(tmpdir)},
    )
    assert code == 2, out
    line = next(x for x in out.splitlines() if x.startswith("aether-fast:"))
    assert "DATA_DIR" in line and "107 bytes" in line, out
    assert "Traceback" not in out
    assert not list(tmpdir.iterdir())  # the temporary directory it tried was removed


def test_backup_and_restore_say_the_configs_are_in_the_private_redis(tmp_path: Path) -> None:
    env = cli_env(tmp_path, WORKERS="2", JWT_SECRET=SECRET)
    for args in (["backup", str(tmp_path)], ["restore", str(tmp_path / "x.sqlite3")]):
        out = run(args, env, tmp_path, 30)
        assert out.returncode == 2, out
        assert "private Redis" in out.stderr and "DATA_DIR/redis" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
