"""The private Redis of `WORKERS=N` without `BROKER_URL` (docs/operations.md §14).

What it owns: finding `redis-server`; where its files live (`DATA_DIR/redis`: the AOF, its
log, a lock) and its socket (`DATA_DIR/redis/redis.sock`, or a fresh directory under the
temporary directory when that path passes the 107 bytes a unix socket path may have);
starting it as the supervisor's child (no TCP port, a 0700 unix socket, AOF on, memory
bounded); watching it (PING over the socket each second; three unanswered in a row or an exit
and it is restarted with a growing backoff: supervision.py's Restarter, the workers'
schedule); stopping it (SIGTERM, then wait).
Rule: like the supervisor it holds no client; the workers reach it at `BROKER_URL=unix://…`
and reconnect by themselves when it comes back. It never outlives the supervisor: it is
stopped after the workers, and the kernel sends it SIGTERM if the supervisor dies
(PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Final
from urllib.parse import quote

from aether_fast import logs
from aether_fast.config import ConfigError
from aether_fast.supervision import Restarter, die_with_parent

BINARY: Final = "redis-server"
SUBDIR: Final = "redis"
SOCKET_NAME: Final = "redis.sock"
LOG_NAME: Final = "redis.log"
LOCK_NAME: Final = "supervisor.lock"
#: sun_path holds 108 bytes with the terminating NUL; redis-server refuses anything longer
SUN_PATH_MAX: Final = 107
PING_EVERY_S: Final = 1.0
PING_TIMEOUT_S: Final = 2.0
#: PINGs unanswered in a row before a running redis-server is killed and started again
UNANSWERED_LIMIT: Final = 3
#: how long a fresh redis-server may take to answer its first PING (LOADING answers, while it
#: reads a large AOF, do not count against it)
READY_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 15.0


class PrivateRedisError(Exception):
    """The private Redis cannot be set up or started; `str()` is one line for the operator,
    naming the variable at fault where there is one."""


def find_binary() -> str:
    """The `redis-server` on PATH, or ConfigError naming WORKERS and the way out."""
    found = shutil.which(BINARY)
    if found is None:
        raise ConfigError(
            "WORKERS",
            f"more than one worker without BROKER_URL starts a private {BINARY}, and there is "
            f"no {BINARY} on PATH: install it (Debian: apt-get install redis-server) or set "
            "BROKER_URL=redis://host:6379/0 to use a Redis of your own",
        )
    return found


def ping(path: str, timeout: float = PING_TIMEOUT_S) -> str:
    """ "PONG", "LOADING" (up, still reading its AOF) or "" (no answer) from the socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
    except OSError:
        return ""
    if reply.startswith(b"+PONG"):
        return "PONG"
    if reply.startswith(b"-LOADING"):
        return "LOADING"
    return ""


def _fits(path: str) -> bool:
    return len(os.fsencode(path)) <= SUN_PATH_MAX


class PrivateRedis:
    """One supervisor's redis-server: `open`, `start`, `wait_ready`, then `poll` from the
    supervisor's loop until `stop`."""

    def __init__(
        self,
        data_dir: str,
        binary: str,
        *,
        maxmemory_mb: int,
        restarter: Restarter,
    ) -> None:
        self.dir = os.path.join(os.path.abspath(data_dir), SUBDIR)
        self.binary = binary
        self.maxmemory_mb = maxmemory_mb
        self.log_path = os.path.join(self.dir, LOG_NAME)
        self.socket_path = os.path.join(self.dir, SOCKET_NAME)
        #: when to start it again after a death (the workers' schedule)
        self.restarter = restarter
        self.proc: subprocess.Popen[bytes] | None = None
        #: the last time it was seen dead or unresponsive (monotonic); 0 = never
        self.last_trouble = 0.0
        self.answered = False
        self._unanswered = 0
        self._next_ping = 0.0
        self._lock_fd: int | None = None
        self._socket_dir: str | None = None  # the temporary directory of a moved socket

    @property
    def url(self) -> str:
        """The workers' BROKER_URL (the path percent-encoded: a DATA_DIR may hold # or ?)."""
        return f"unix://{quote(self.socket_path)}"

    @property
    def healthy(self) -> bool:
        """Running and its last PING answered PONG."""
        return self.proc is not None and self.proc.poll() is None and self.answered

    # -- set-up ----------------------------------------------------------------------------

    def open(self) -> None:
        """Create DATA_DIR/redis, take its lock, choose the socket path."""
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            os.chmod(self.dir, 0o700)  # the AOF holds every message: the server's user only
        except OSError as e:
            raise PrivateRedisError(
                f"DATA_DIR: {self.dir}: cannot create the private Redis's directory: "
                f"{e.strerror or e}"
            ) from None
        lock = os.path.join(self.dir, LOCK_NAME)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise PrivateRedisError(f"DATA_DIR: {lock}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise PrivateRedisError(
                f"DATA_DIR: {self.dir} is in use by another aether-fast supervisor (it holds "
                f"{lock}): give each its own DATA_DIR"
            ) from None
        self._lock_fd = fd
        if not _fits(self.socket_path):
            self._socket_dir = tempfile.mkdtemp(prefix="aether-redis-")
            moved = os.path.join(self._socket_dir, SOCKET_NAME)
            if not _fits(moved):
                raise PrivateRedisError(
                    f"DATA_DIR: the private Redis's socket {self.socket_path} is longer than "
                    f"the {SUN_PATH_MAX} bytes a unix socket path may have, and so is {moved}: "
                    "use a shorter DATA_DIR (or TMPDIR), or set BROKER_URL"
                )
            logs.log(
                "warn",
                "private_redis_socket_moved",
                "workers",
                socket=moved,
                reason=f"{self.socket_path} is longer than {SUN_PATH_MAX} bytes",
            )
            self.socket_path = moved
        # a redis-server left by an earlier supervisor that was killed is told to stop by the
        # kernel (PR_SET_PDEATHSIG): give it the time to write its AOF and go
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while ping(self.socket_path, 0.5):
            if time.monotonic() > deadline:
                raise PrivateRedisError(
                    f"DATA_DIR: a redis-server not started by this supervisor answers on "
                    f"{self.socket_path}: stop it first"
                )
            time.sleep(0.1)

    def _command(self) -> list[str]:
        return [
            self.binary,
            "--port",
            "0",
            "--unixsocket",
            self.socket_path,
            "--unixsocketperm",
            "700",
            "--dir",
            self.dir,
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--maxmemory",
            f"{self.maxmemory_mb}mb",
            # every key of a channel has a TTL, the channel configs have none: past the
            # bound the state of the channels least recently used goes first
            "--maxmemory-policy",
            "volatile-lru",
            "--logfile",
            self.log_path,
            "--loglevel",
            "notice",
            "--daemonize",
            "no",
        ]

    # -- running ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start redis-server (it answers PING a moment later: `wait_ready`, `poll`)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                # its own session: a Ctrl-C on the terminal reaches the workers, which drain,
                # and not Redis, which is stopped after them
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        now = time.monotonic()
        self.restarter.started_at(now)
        self.answered = False
        self._unanswered, self._next_ping = 0, now
        logs.log(
            "info",
            "private_redis_started",
            "workers",
            pid=self.proc.pid,
            socket=self.socket_path,
            dir=self.dir,
        )

    def wait_ready(self, stopping: Callable[[], bool]) -> None:
        """Wait until it answers PONG; PrivateRedisError if it exits or stays silent."""
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not stopping():
            answer = ping(self.socket_path, 0.5)
            if answer == "PONG":
                self._ready()
                return
            code = self.proc.poll()
            if code is not None:
                raise PrivateRedisError(
                    f"the private {BINARY} exited with status {code} at start ({self.log_path}: "
                    f"{self.log_tail(2) or 'empty'})"
                )
            if answer == "LOADING":
                deadline = time.monotonic() + READY_TIMEOUT_S
            elif time.monotonic() > deadline:
                raise PrivateRedisError(
                    f"the private {BINARY} did not answer on {self.socket_path} within "
                    f"{READY_TIMEOUT_S:g} s ({self.log_path}: {self.log_tail(1) or 'empty'})"
                )
            time.sleep(0.05)

    def _ready(self) -> None:
        self.answered, self._unanswered = True, 0
        assert self.proc is not None
        logs.log("info", "private_redis_ready", "workers", pid=self.proc.pid)

    def poll(self, now: float) -> None:
        """One look from the supervisor's loop: restart it when dead, PING it when due."""
        proc = self.proc
        if proc is None:
            return
        code = proc.poll()
        if code is not None:
            wait = self.restarter.died(now)
            if wait is not None:
                self.answered, self.last_trouble = False, now
                logs.log(
                    "error",
                    "private_redis_died",
                    "workers",
                    pid=proc.pid,
                    status=code,
                    restart_in_s=wait,
                    log_tail=self.log_tail(3),
                )
            elif self.restarter.due(now):
                self.restarter.restarting()
                try:
                    self.start()
                except OSError as e:  # the binary gone, DATA_DIR unwritable: try again later
                    logs.log(
                        "error",
                        "private_redis_cannot_start",
                        "workers",
                        reason=str(e),
                        restart_in_s=self.restarter.died(now),
                    )
            return
        if now < self._next_ping:
            return
        answer = ping(self.socket_path)
        self._next_ping = time.monotonic() + PING_EVERY_S
        if answer == "PONG":
            if not self.answered:
                self._ready()
            self._unanswered = 0
            self.restarter.up(now)
            return
        if answer == "LOADING":
            return
        self._unanswered += 1
        self.answered, self.last_trouble = False, now
        if self._unanswered >= UNANSWERED_LIMIT:
            # hung (or its socket gone): killed here, restarted by the next poll
            logs.log(
                "error",
                "private_redis_unresponsive",
                "workers",
                pid=proc.pid,
                unanswered_pings=self._unanswered,
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        """SIGTERM (it fsyncs the AOF and removes its socket), wait, SIGKILL if it must; then
        drop the lock and a moved socket's directory."""
        proc = self.proc
        if proc is not None:
            began = time.monotonic()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            logs.log(
                "info",
                "private_redis_stopped",
                "workers",
                pid=proc.pid,
                status=proc.returncode,
                took_s=round(time.monotonic() - began, 3),  # its last fsync of the AOF
            )
            self.proc = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def log_tail(self, lines: int) -> str:
        """The last `lines` lines of its log, for the operator's error line."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 4096))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return ""
        kept = [line.strip() for line in text.splitlines() if line.strip()]
        return " | ".join(kept[-lines:])
