"""Helpers for the tests with a Redis broker (more workers, more machines).

Figures that span workers travel through the cluster table, which every worker refreshes
once a second (and whose entries expire after WORKER_TTL_S): everything that depends on it
is polled with a deadline, never awaited with a fixed sleep.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from websockets.exceptions import ConnectionClosed

from tests.conftest import Server
from tests.integration.helpers import joined
from tests.integration.wsclient import Client

#: the brokers' WORKER_TTL_S: a dead worker's figures are gone from the table after this long
WORKER_TTL_S = 5.0


def start_pair(
    make_server: Callable[..., Server], node_a: str, node_b: str, **env: str
) -> tuple[Server, Server]:
    """Two servers ("machines") with the same settings and their own NODE_ID. One after the
    other: each takes its free ports only once the previous one holds its own."""
    return make_server(NODE_ID=node_a, **env), make_server(NODE_ID=node_b, **env)


def status(srv: Server) -> dict[str, Any]:
    code, body, _ = srv.http("GET", "/ws/status")
    assert code == 200, body
    assert isinstance(body, dict), body
    return body


def wait_status(
    srv: Server, cond: Callable[[dict[str, Any]], Any], timeout: float = 8.0
) -> dict[str, Any]:
    """Poll /ws/status until `cond(body)` holds; the last body is in the failure message."""
    deadline = time.monotonic() + timeout
    while True:
        body = status(srv)
        if cond(body):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"/ws/status never satisfied the condition: {body}")
        time.sleep(0.1)


def wait_node(
    srv: Server, cond: Callable[[dict[str, Any]], Any], workers: int = 2, timeout: float = 8.0
) -> dict[str, Any]:
    """Poll /ws/status until `cond` holds in answers from `workers` different workers in a
    row: which worker answers is up to the kernel (SO_REUSEPORT), and each worker's view of
    the others is up to a second old."""
    streak: set[str] = set()
    deadline = time.monotonic() + timeout
    while True:
        body = status(srv)
        if cond(body):
            streak.add(body["answered_by"])
            if len(streak) >= workers:
                return body
        else:
            streak.clear()
        if time.monotonic() > deadline:
            raise AssertionError(f"/ws/status never satisfied the condition: {body}")
        time.sleep(0.05)


def cluster_size(body: dict[str, Any]) -> tuple[int, int]:
    """(workers, nodes) of the cluster view in a /ws/status body ((1, 1) without one)."""
    cluster = body.get("cluster") or {}
    return int(cluster.get("workers", 1)), int(cluster.get("nodes", 1))


def wait_cluster(srv: Server, workers: int, nodes: int, timeout: float = 8.0) -> dict[str, Any]:
    return wait_status(srv, lambda b: cluster_size(b) == (workers, nodes), timeout)


def worker_pids(body: dict[str, Any]) -> list[int]:
    return sorted(int(w["pid"]) for w in body["workers"])


def messages(c: Client, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The next `n` message/send deliveries; other frames (acks) are skipped."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"only {len(got)} of {n} messages arrived: {got[-3:]}")
        msg = c.recv(left)
        if (msg["type"], msg.get("action")) == ("message", "send"):
            got.append(msg)
        else:
            assert (msg["type"], msg.get("action")) == ("message", "ack"), msg
    return got


def reader_leaves_after_five(url: str, reader: dict[str, Any], pub: Client, ch: str) -> str:
    """`reader` (Client keyword arguments) joins `ch` at `url` and gets `pub`'s m1..m5 with
    offsets 1..5, then leaves; `pub` publishes m6..m10 while it is away. The channel's epoch."""
    with Client(url, **reader) as r:
        epoch = str(joined(r, ch)["epoch"])
        for i in range(1, 6):
            pub.publish(ch, f"m{i}")
        got = messages(r, 5)
        assert [m["data"]["metadata"]["offset"] for m in got] == [1, 2, 3, 4, 5]
    for i in range(6, 11):
        pub.publish(ch, f"m{i}")
    return epoch


@contextlib.contextmanager
def pub_members_late(
    a: Server, b: Server, ch: str, late_on: Server
) -> Iterator[tuple[Client, Client, Client, Client]]:
    """On `ch`, all joined: a publisher (client_id "pub") and a member on `a`, a member on
    `b`; and a client on `late_on` that joined no channel yet. Closed when the block ends."""
    with (
        Client(a.ws_url, token=a.token("pub"), client_id="pub", channel=ch) as pub,
        Client(a.ws_url, token=a.token("ma"), channel=ch) as ma,
        Client(b.ws_url, token=b.token("mb"), channel=ch) as mb,
        Client(late_on.ws_url, token=late_on.token("late")) as late,
    ):
        for c in (pub, ma, mb):
            joined(c, ch)
        joined(late)
        yield pub, ma, mb, late


def refused_eventually(
    attempt: Callable[[], tuple[Client, dict[str, Any]]],
    code: str,
    timeout: float = 6.0,
) -> tuple[Client, dict[str, Any]]:
    """Repeat `attempt` (which opens or joins and returns the client and the answer) until
    the answer is the error `code`: a limit that spans workers is only as fresh as the
    cluster table. A probe that was let in is closed before the next try."""
    deadline = time.monotonic() + timeout
    while True:
        c, msg = attempt()
        if msg.get("type") == "error" and msg.get("code") == code:
            return c, msg
        c.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"never refused with {code}; last answer: {msg}")
        time.sleep(0.2)


def first_answer(url: str, **params: Any) -> tuple[Client, dict[str, Any]]:
    """Open a connection and read its first frame."""
    c = Client(url, **params)
    try:
        return c, c.recv()
    except ConnectionClosed:
        return c, {"type": "closed"}


def only_expected_errors(srv: Server, *events: str) -> None:
    """A test that causes error lines on purpose (`allow_errors`) still checks that they are
    the ones it caused: no traceback, no other error."""
    bad = [
        line
        for line in srv.log_lines()
        if (line.get("level") in ("error", "raw") or "Traceback" in str(line))
        and line.get("event") not in events
    ]
    assert not bad, f"unexpected error lines: {bad[:5]}"


def prometheus_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of metric `name` in a Prometheus text exposition: (labels, value)."""
    out = []
    pattern = re.compile(r"^" + re.escape(name) + r"\{([^}]*)\} (\S+)$")
    for line in text.splitlines():
        m = pattern.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out.append((labels, float(m.group(2))))
    return out
