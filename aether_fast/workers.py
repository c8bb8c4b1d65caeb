"""WORKERS=N: a supervisor process and N worker processes sharing one port.

What it owns: starting the workers (each is `aether-fast serve` run again with
AETHER_WORKER_INDEX set; they bind the port with SO_REUSEPORT and meet in Redis), restarting
one that dies with a growing backoff (supervision.py's Restarter), forwarding SIGTERM/SIGINT
for a graceful drain, and the exit status: 0 when every worker drained, 2 when a worker could
not start at all.
Without BROKER_URL it first starts the private Redis the workers meet in (private_redis.py:
BROKER_URL=unix://… in their environment), restarts it when it dies and stops it last, once
the workers are gone; no worker is (re)started while it does not answer.
Rule: the supervisor holds no client and no socket; it only watches processes. None of its
children outlives it: if it is killed, the kernel sends each SIGTERM (supervision.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aether_fast import logs
from aether_fast.config import Config
from aether_fast.private_redis import BINARY, PrivateRedis, PrivateRedisError, find_binary
from aether_fast.supervision import Restarter, die_with_parent

WORKER_ENV = "AETHER_WORKER_INDEX"
#: A worker that exits within this many seconds of its start with status 2 could not start
#: (bad config, port in use, Redis unreachable): the supervisor gives up instead of looping
#: (unless the private Redis was down meanwhile).
START_GRACE_S = 3.0


@dataclass(slots=True)
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    restarter: Restarter = field(default_factory=Restarter)


def is_worker() -> bool:
    return WORKER_ENV in os.environ


def supervise(config: Config, argv: Sequence[str]) -> int:
    """Run `config.workers` workers until SIGTERM/SIGINT; returns the exit status."""
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    env = dict(os.environ)
    redis: PrivateRedis | None = None
    if config.broker_url is None:
        redis = PrivateRedis(
            config.data_dir,
            find_binary(),
            maxmemory_mb=config.private_redis_maxmemory_mb,
            restarter=Restarter(),
        )
        try:
            redis.open()
            redis.start()
            redis.wait_ready(lambda: stopping)
        except PrivateRedisError as err:
            redis.stop()
            print(f"aether-fast: {err}", file=sys.stderr)
            return 2
        except OSError as err:  # its log not writable, the binary not executable
            redis.stop()
            print(f"aether-fast: the private {BINARY} cannot start: {err}", file=sys.stderr)
            return 2
        env["BROKER_URL"] = redis.url
    status = 0
    if not stopping:
        status = _run(config, argv, env, redis, lambda: stopping)
    if redis is not None:
        redis.stop()  # last: the workers drained with their broker still there
    logs.log("info", "supervisor_stopped", "workers", status=status)
    return status


def _run(
    config: Config,
    argv: Sequence[str],
    env: dict[str, str],
    redis: PrivateRedis | None,
    stopping: Callable[[], bool],
) -> int:
    """Start the workers, keep them (and the private Redis) running until `stopping()`,
    then drain them; returns the exit status."""

    def spawn(index: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "aether_fast", "serve", *argv],
            env={**env, WORKER_ENV: str(index)},
            # a supervisor killed (SIGKILL, OOM) takes its workers along: each gets SIGTERM
            # from the kernel and drains, and the port is free for the next supervisor
            preexec_fn=die_with_parent(),
        )

    workers = [_Worker(i, spawn(i)) for i in range(config.workers)]
    now = time.monotonic()
    for w in workers:
        w.restarter.started_at(now)
    logs.log("info", "supervisor_started", "workers", workers=[w.proc.pid for w in workers])
    status = 0
    while not stopping():
        time.sleep(0.1)
        now = time.monotonic()
        if redis is not None:
            redis.poll(now)
        for w in workers:
            code = w.proc.poll()
            restarter = w.restarter
            if code is None:
                restarter.up(now)
                continue
            # a worker that could not reach the private Redis while it was down (or dying)
            # was not misconfigured: it is restarted once Redis answers again
            redis_trouble = redis is not None and redis.last_trouble >= restarter.started - 1.0
            if code == 2 and now - restarter.started < START_GRACE_S and not redis_trouble:
                logs.log("error", "worker_cannot_start", "workers", index=w.index, status=code)
                return _drain(config, workers, 2)
            wait = restarter.died(now)
            if wait is not None:
                logs.log(
                    "error",
                    "worker_died",
                    "workers",
                    index=w.index,
                    pid=w.proc.pid,
                    status=code,
                    restart_in_s=wait,
                )
            elif restarter.due(now) and (redis is None or redis.healthy):
                w.proc = spawn(w.index)
                restarter.restarting()
                restarter.started_at(now)
                logs.log("info", "worker_restarted", "workers", index=w.index, pid=w.proc.pid)
    return _drain(config, workers, status)


def _drain(config: Config, workers: list[_Worker], status: int) -> int:
    """SIGTERM to every live worker, then wait for all (killed past the drain's time)."""
    for w in workers:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + config.shutdown_timeout_s + 5
    for w in workers:
        try:
            w.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
            status = status or 1
    return status
