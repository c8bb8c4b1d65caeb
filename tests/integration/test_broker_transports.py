"""BROKER_URL's other transports end to end (docs/operations.md §14): a real redis-server on a
unix socket (`unix://`), and one that speaks only TLS (`rediss://`, with a CA and certificates
made for the test, the client's own certificate required: `tls-auth-clients yes`).

Through each, two servers publish and subscribe across processes, a retry on the other server
is acked with its original offset, a late client recovers what it missed, the cluster table
sees both, and the keys land in the database the URL names. Every connection a worker makes
to Redis honours the URL: redis-py's pool (cluster table, configs) as well as the lean
connections of brokers/resp.py (publishes, positions, the subscriber), which once ignored the
`ssl_*` parameters. A TLS URL that does not say whom to trust, or says so wrongly, stops the
start with one line, as does a query parameter no connection would honour.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import trustme

from tests.conftest import SECRET, Server
from tests.integration.cluster_helpers import messages, start_pair, wait_cluster
from tests.integration.helpers import expect, joined
from tests.integration.test_cli import cli_env, run
from tests.integration.wsclient import Client
from tools.common import free_port

DB = 3


@dataclass
class Transport:
    """A running redis-server and how to reach it."""

    name: str
    url: str  # BROKER_URL, database DB
    client: Callable[[], redis.Redis]  # a sync client on database DB
    proc: subprocess.Popen[bytes]
    log: Path


def _start(
    args: list[str], log: Path, client: Callable[[], redis.Redis]
) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not on PATH (apt-get install redis-server)"
    proc = subprocess.Popen(
        [binary, "--save", "", "--appendonly", "no", "--logfile", str(log), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with client() as r:
                if r.ping():
                    return proc
        except redis.RedisError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"redis-server {args} did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed none of these


def _pki(d: Path) -> Pki:
    ca, other = trustme.CA(), trustme.CA()
    server, client = ca.issue_cert("127.0.0.1"), ca.issue_cert("aether-worker")
    pki = Pki(*(d / n for n in ("ca.pem", "srv.pem", "srv.key", "cli.pem", "cli.key", "o.pem")))
    ca.cert_pem.write_to_path(str(pki.ca))
    other.cert_pem.write_to_path(str(pki.other_ca))
    server.cert_chain_pems[0].write_to_path(str(pki.server_cert))
    server.private_key_pem.write_to_path(str(pki.server_key))
    client.cert_chain_pems[0].write_to_path(str(pki.client_cert))
    client.private_key_pem.write_to_path(str(pki.client_key))
    return pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _pki(tmp_path_factory.mktemp("pki"))


def _tls_query(pki: Pki, ca: Path | None = None) -> str:
    return (
        f"ssl_ca_certs={ca or pki.ca}&ssl_certfile={pki.client_cert}&ssl_keyfile={pki.client_key}"
    )


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Transport]:
    d = tmp_path_factory.mktemp("rtls")
    port = free_port()

    def client() -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=port,
            db=DB,
            ssl=True,
            ssl_ca_certs=str(pki.ca),
            ssl_certfile=str(pki.client_cert),
            ssl_keyfile=str(pki.client_key),
            socket_timeout=5,
        )

    args = ["--port", "0", "--bind", "127.0.0.1", "--tls-port", str(port), "--dir", str(d)]
    args += ["--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key)]
    args += ["--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", "yes"]
    proc = _start(args, d / "redis.log", client)
    url = f"rediss://127.0.0.1:{port}/{DB}?{_tls_query(pki)}"
    try:
        yield Transport("tls", url, client, proc, d / "redis.log")
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def unix_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Transport]:
    d = tmp_path_factory.mktemp("runix")
    sock = d / "redis.sock"

    def client() -> redis.Redis:
        return redis.Redis(unix_socket_path=str(sock), db=DB, socket_timeout=5)

    args = ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700", "--dir", str(d)]
    proc = _start(args, d / "redis.log", client)
    try:
        yield Transport("unix", f"unix://{sock}?db={DB}", client, proc, d / "redis.log")
    finally:
        _stop(proc)


@pytest.fixture(params=["unix", "tls"])
def transport(request: pytest.FixtureRequest) -> Transport:
    found: Transport = request.getfixturevalue(f"{request.param}_redis")
    with found.client() as r:
        r.flushall()
    return found


def test_publish_subscribe_retry_and_recover_across_two_servers(
    make_server: Callable[..., Server], transport: Transport
) -> None:
    a, b = start_pair(
        make_server, "tr-a", "tr-b", BROKER_URL=transport.url, RATE_LIMIT_MESSAGES="100000"
    )
    wait_cluster(a, 2, 2)  # the cluster table: redis-py's pool
    wait_cluster(b, 2, 2)
    ch = f"tr.{transport.name}"
    with Client(b.ws_url, token=b.token("tr-watch"), channel=ch) as watcher:
        first = joined(watcher, ch)
        with Client(a.ws_url, token=a.token("tr-pub"), client_id="tr-1", channel=ch) as pub:
            joined(pub, ch)
            for i in range(1, 4):
                pub.publish(ch, f"m{i}", sequence=i)
                ack = expect(pub, "message", "ack")["data"]["metadata"]
                assert (ack["offset"], ack["sequence"]) == (i, i), ack
        got = messages(watcher, 3)
        assert [m["data"]["content"] for m in got] == ["m1", "m2", "m3"]
        assert [m["data"]["metadata"]["offset"] for m in got] == [1, 2, 3]
        assert got[1]["data"]["metadata"]["client_id"] == "tr-1"

        # the ack of m2 was "lost": the sender retries it through the other server
        with Client(b.ws_url, token=b.token("tr-pub"), client_id="tr-1", channel=ch) as again:
            joined(again, ch)
            again.publish(ch, "m2", sequence=2, action="retry")
            dup = expect(again, "message", "ack")["data"]["metadata"]
            assert (dup["offset"], dup["sequence"]) == (2, 2), dup
            watcher.nothing(0.3)  # not published twice

    # a client that saw m1 recovers the rest on either server
    for srv in (a, b):
        late = Client(
            srv.ws_url, token=srv.token("tr-late"), channel=ch, since=1, epoch=first["epoch"]
        )
        with late:
            hello = joined(late, ch)
            assert hello["recovered"] is True and hello["offset"] == 3, hello
            replayed = [late.recv()["data"] for _ in range(2)]
            assert [m["content"] for m in replayed] == ["m2", "m3"]
            assert [m["metadata"]["offset"] for m in replayed] == [2, 3]

    # everything went to the database the URL names
    with transport.client() as r:
        assert r.exists(f"aether:ch:{{{ch}}}:meta") and r.exists(f"aether:ch:{{{ch}}}:hist")
        assert r.keys("aether:worker:*"), "no cluster table in the URL's database"
        r.execute_command("SELECT", 0)
        assert not r.keys("aether:*"), "keys written to database 0"


def _serve_fails(tmp_path: Path, broker_url: str) -> str:
    """`aether-fast serve` with this BROKER_URL must refuse to start: its output."""
    env = cli_env(tmp_path, JWT_SECRET=SECRET, BROKER_URL=broker_url)
    done = run(["serve"], env, tmp_path, 30)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "Traceback" not in out, out
    lines = [x for x in out.splitlines() if x.startswith("aether-fast:")]
    assert len(lines) == 1 and "BROKER_URL" in lines[0], out
    return lines[0]


def test_tls_url_that_trusts_the_wrong_ca_stops_the_start(
    tmp_path: Path, tls_redis: Transport, pki: Pki
) -> None:
    base = tls_redis.url.split("?", 1)[0]
    # no CA named: the system's CAs do not know the test's
    assert "certificate verify failed" in _serve_fails(tmp_path, base).lower()
    # another CA
    wrong = f"{base}?{_tls_query(pki, pki.other_ca)}"
    assert "certificate verify failed" in _serve_fails(tmp_path, wrong).lower()
    # no client certificate, which this Redis requires
    line = _serve_fails(tmp_path, f"{base}?ssl_ca_certs={pki.ca}")
    assert "cannot use Redis" in line


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("redis://127.0.0.1:6379/0?ssl_ca_certs=/etc/hostname", "'ssl_ca_certs' is not supported"),
        ("redis://127.0.0.1:6379/0?socket_timeout=2", "'socket_timeout' is not supported"),
        ("redis://127.0.0.1:6379/0?db=x", "the db must be a database number"),
        ("redis://127.0.0.1:6379/cache", "database number"),
        ("redis://127.0.0.1:99999/0", "port"),
        ("rediss://127.0.0.1:6379/0?ssl_ca_certs=/nonexistent.pem", "cannot read"),
        ("rediss://127.0.0.1:6379/0?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
        ("unix://?db=1", "path"),
    ],
)
def test_broker_url_that_no_connection_would_honour_stops_the_start(
    tmp_path: Path, url: str, fragment: str
) -> None:
    assert fragment in _serve_fails(tmp_path, url)
