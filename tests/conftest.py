"""Shared fixtures: a real aether-fast server process on free ports of 127.0.0.1.

`server` is one server for a test module (with a message budget no module exhausts);
`make_server(*flags, **env)` starts a server with its own settings for one test;
`redis_server`/`redis_url` (tests/integration/redis_fixture.py) give the cluster tests a
real Redis. Each server writes its JSON log to a file; at teardown
the log must hold no error-level line unless the test said it expects some
(`srv.allow_errors = True`): an unhandled exception in the loop fails the test that caused it.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.integration.redis_fixture import redis_server, redis_url  # noqa: F401 (fixtures)
from tools.common import free_ports, json_lines, read_log, token, wait_listening

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-test-secret-test-secret-0123456789"


class Server:
    """A running `aether-fast serve` and the helpers tests use to talk to it."""

    def __init__(
        self,
        tmp: Path,
        env: dict[str, str],
        args: Sequence[str] = (),
        *,
        fd_limit: int | None = None,
    ) -> None:
        self.tmp = tmp
        self.args = list(args)  # command-line flags of `serve`
        self.fd_limit = fd_limit  # the process's RLIMIT_NOFILE (soft and hard), if set
        self.port, self.metrics_port = free_ports(2)
        self.data_dir = tmp / "data"
        self.log_path = tmp / f"server-{self.port}.log"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "WS_HOST": "127.0.0.1",
            "WS_PORT": str(self.port),
            "METRICS_PORT": str(self.metrics_port),
            "JWT_SECRET": SECRET,
            "DATA_DIR": str(self.data_dir),
            "LOG_LEVEL": "info",
            **env,
        }
        self.allow_errors = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    # -- process ---------------------------------------------------------------------------

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the child)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aether_fast", "serve", *self.args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.tmp,
            preexec_fn=None if self.fd_limit is None else self._limit_fds,
        )
        log.close()
        wait_listening(self.proc, self.port, 15, self.log_text)

    def _limit_fds(self) -> None:
        """In the child, before exec: the server's descriptor limit, whatever the machine's."""
        assert self.fd_limit is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.fd_limit, self.fd_limit))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for child in self.children():  # a supervisor's workers must not outlive it
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def children(self) -> list[int]:
        """PIDs of the server's child processes (a supervisor's workers)."""
        assert self.proc is not None
        found: list[int] = []
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                found += [int(pid) for pid in task.read_text().split()]
        return found

    def restart(self) -> None:
        assert self.stop() == 0
        self.start()

    def log_text(self) -> str:
        return read_log(self.log_path)

    def log_lines(self) -> list[dict[str, Any]]:
        return json_lines(self.log_text())

    def check_log(self) -> None:
        bad = [
            line
            for line in self.log_lines()
            if line.get("level") in ("error", "raw") or "Traceback" in json.dumps(line)
        ]
        if bad and not self.allow_errors:
            raise AssertionError(f"server logged errors: {bad[:5]}")

    # -- clients ---------------------------------------------------------------------------

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def token(
        self,
        sub: str = "alice",
        *,
        admin: bool = False,
        channels: list[str] | None = None,
        ttl: float = 3600,
        secret: str = SECRET,
        **claims: Any,
    ) -> str:
        if admin:
            claims["admin"] = True
        if channels is not None:
            claims["channels"] = channels
        return token(secret, sub, ttl, **claims)

    def http(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        raw: bytes | None = None,
        port: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(
            f"http://127.0.0.1:{port or self.port}{path}", data=data, method=method
        )
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                text = resp.read()
                status, hdrs = resp.status, dict(resp.headers)
        except urllib.error.HTTPError as err:
            text = err.read()
            status, hdrs = err.code, dict(err.headers)
        ctype = hdrs.get("Content-Type", "")
        return status, (json.loads(text) if "json" in ctype else text.decode()), hdrs

    def admin(self) -> str:
        return self.token("root", admin=True)

    def create_channel(self, **cfg: Any) -> int:
        """The admin creates or updates a channel with `cfg`: 201 or 200, which it returns."""
        status, body, _ = self.http("POST", "/ws/channels", cfg, token=self.admin())
        assert status in (200, 201), body
        return int(status)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # a module's tests share this server and its few user names: the per-user inbound budget
    # (RATE_LIMIT_MESSAGES, every frame) would be one module's, not one client's; tests of
    # the budget start their own server (`make_server`) with the limits they test
    srv = Server(tmp_path_factory.mktemp("srv"), {"RATE_LIMIT_MESSAGES": "100000"})
    yield srv
    code = srv.stop()
    srv.check_log()
    assert code == 0, srv.log_text()[-2000:]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[Any]]]:
    """Processes a test started; killed at teardown if it left them running."""
    started: list[subprocess.Popen[Any]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    made: list[Server] = []

    def make(*args: str, fd_limit: int | None = None, **env: str) -> Server:
        """A server with these environment variables (and `serve` flags in `args`), and
        `fd_limit` as its RLIMIT_NOFILE if given."""
        srv = Server(tmp_path, {k: str(v) for k, v in env.items()}, args, fd_limit=fd_limit)
        made.append(srv)
        return srv

    yield make
    # stop every server before checking any log: a failed check must not leave one running
    for srv in made:
        srv.stop()
    for srv in made:
        srv.check_log()
