"""Connection floods against a server whose descriptor limit the test sets (RLIMIT_NOFILE,
whatever the machine's): up to MAX_CONNECTIONS every upgrade is held and past it each one is
a clean 503 before the upgrade; with MAX_CONNECTIONS above the descriptor limit, every
descriptor the server has left is held and each socket past that is refused at the accept,
with no log storm, while the server serves everyone else throughout and afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Server
from tests.integration.helpers import wait_for
from tests.integration.wsclient import Client

FLOOD = Path(__file__).with_name("flood_client.py")


def flood(srv: Server, n: int) -> tuple[subprocess.Popen[str], dict[str, int]]:
    proc = subprocess.Popen(
        [sys.executable, str(FLOOD), str(srv.port), str(n), "120"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    return proc, json.loads(line)


def release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    proc.wait(30)
    proc.stdout.close()


def open_fds(srv: Server) -> int:
    assert srv.proc is not None
    return len(os.listdir(f"/proc/{srv.proc.pid}/fd"))


def active(srv: Server) -> int:
    return int(srv.http("GET", "/ws/status")[1]["connections"]["active"])


def drained(srv: Server) -> bool:
    """No connection left open (False while the server has no descriptor for the request)."""
    try:
        return active(srv) == 0
    except OSError:
        return False


def test_flood_to_and_past_max_connections(make_server: Callable[..., Server]) -> None:
    srv = make_server(
        fd_limit=4096,  # room for every socket of this test: MAX_CONNECTIONS is what bites
        MAX_CONNECTIONS="1000",
        RATE_LIMIT_CONNECTIONS="0",
        PING_INTERVAL_S="0",
        HANDSHAKE_TIMEOUT_S="30",  # the machine may be busy: this test is about capacity
    )
    with Client(srv.ws_url, token=srv.token("bystander"), channel="calm") as bystander:
        bystander.recv()
        held, counts = flood(srv, 999)  # the bystander holds the 1000th place
        try:
            assert counts == {"open": 999, "refused_503": 0, "failed": 0}, counts
            assert active(srv) == 1000
            # past MAX_CONNECTIONS: every upgrade is a clean 503, none is held
            more, counts = flood(srv, 300)
            release(more)
            assert counts == {"open": 0, "refused_503": 300, "failed": 0}, counts
            assert active(srv) == 1000
            bystander.publish("calm", "still here")
            assert bystander.recv()["action"] == "ack"
        finally:
            release(held)
    wait_for(lambda: active(srv) == 0, 30)
    with Client(srv.ws_url, token=srv.token("after"), channel="calm") as after:
        assert after.recv()["data"]["channel"] == "calm"
    lines = srv.log_lines()
    assert len(lines) < 100, f"{len(lines)} log lines: a log storm"


def test_flood_past_the_fd_limit(make_server: Callable[..., Server]) -> None:
    limit = 1024
    srv = make_server(
        fd_limit=limit,
        MAX_CONNECTIONS="5000",  # above the descriptor limit: the limit is what bites
        RATE_LIMIT_CONNECTIONS="0",
        PING_INTERVAL_S="0",
        HANDSHAKE_TIMEOUT_S="30",
    )
    with Client(srv.ws_url, token=srv.token("bystander"), channel="calm") as bystander:
        bystander.recv()
        room = limit - open_fds(srv)  # descriptors the server has left
        assert 900 < room < limit, room
        held, counts = flood(srv, room + 200)
        try:
            # each descriptor left holds one connection; each socket past them is refused at
            # the accept (closed with no answer), never a half-served or 101-then-dead one
            assert counts["refused_503"] == 0, counts
            assert room - 3 <= counts["open"] <= room, (room, counts)
            assert counts["failed"] == room + 200 - counts["open"], counts
            assert open_fds(srv) >= limit - 3
            # the connections already open are served throughout
            bystander.publish("calm", "still here")
            assert bystander.recv()["action"] == "ack"
        finally:
            release(held)
    # the descriptors come back: the server accepts and serves again
    wait_for(lambda: drained(srv), 30)
    with Client(srv.ws_url, token=srv.token("after"), channel="calm") as after:
        assert after.recv()["data"]["channel"] == "calm"
    lines = srv.log_lines()
    assert len(lines) < 100, f"{len(lines)} log lines: a log storm"
