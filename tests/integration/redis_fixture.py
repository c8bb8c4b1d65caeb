"""A real redis-server for the cluster tests, started by the test session on a free port.

`redis_server` (session scope) is the process: its URL, `stop()`/`start()` on the same port
(the fault tests stop it mid-traffic), `flushall()`, and a sync client. It is killed by its
PID at the end of the session. `redis_url` (per test) hands each test its own database
number, flushed before the test, so no test sees another's offsets, configs or cluster table
(pub/sub is not per database, but the servers of one test are stopped before the next starts).

A missing `redis-server` binary fails these tests loudly: they are never skipped.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

DATABASES = 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One `redis-server --port P --save "" --appendonly no` process that the tests own."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not on PATH: the Redis integration tests need a real Redis "
                "(e.g. `apt-get install redis-server`); they are not skipped"
            )
        self.binary = binary
        self.dir = workdir
        self.port = _free_port()
        self.log_path = workdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._next_db = 0
        self._ping_error = ""
        self.start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start redis-server on `self.port` and wait until it answers PING."""
        assert not self.running, "redis-server is already running"
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--databases",
                str(DATABASES),
                "--dir",
                str(self.dir),
                "--logfile",
                str(self.log_path),
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL)  # not left running when the session gives up on it
                raise RuntimeError(
                    f"redis-server did not answer PING ({self._ping_error}): {self.log()}"
                )
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop the process (by its PID) and wait until it is gone and the port is closed."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError as exc:
            self._ping_error = repr(exc)
            return False

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=5)

    def flushall(self) -> None:
        with self.client() as r:
            r.flushall()

    def fresh_db(self) -> int:
        """A database number no earlier test of this session used, flushed."""
        db = self._next_db % DATABASES
        self._next_db += 1
        with self.client(db) as r:
            r.flushdb()
        return db

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""


def db_of(url: str) -> int:
    """The database number of a `redis_url`."""
    return int(url.rsplit("/", 1)[1])


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield srv
    finally:
        srv.stop(signal.SIGKILL)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """This test's own, empty Redis database (a test that stopped Redis and failed before
    starting it again does not take the next test down with it)."""
    if not redis_server.running:
        redis_server.start()
    return redis_server.url(redis_server.fresh_db())
