"""WORKERS=N: a supervisor process and N worker processes sharing one port.

What it owns: starting the workers (each is `aether-fast serve` run again with
AETHER_WORKER_INDEX set; they bind the port with SO_REUSEPORT and meet in Redis), restarting
one that dies with a growing backoff, forwarding SIGTERM/SIGINT for a graceful drain, and
the exit status: 0 when every worker drained, 2 when a worker could not start at all.
Rule: the supervisor holds no client and no socket; it only watches processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from aether_fast import logs
from aether_fast.config import Config

WORKER_ENV = "AETHER_WORKER_INDEX"
#: A worker that exits within this many seconds of its start with status 2 could not start
#: (bad config, port in use, Redis unreachable): the supervisor gives up instead of looping.
START_GRACE_S = 3.0
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 10.0
#: A worker that ran this long resets its backoff.
HEALTHY_AFTER_S = 30.0


@dataclass(slots=True)
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    started: float
    backoff: float = BACKOFF_MIN_S
    restart_at: float = 0.0


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

    def spawn(index: int) -> subprocess.Popen[bytes]:
        env = {**os.environ, WORKER_ENV: str(index)}
        return subprocess.Popen([sys.executable, "-m", "aether_fast", "serve", *argv], env=env)

    now = time.monotonic()
    workers = [_Worker(i, spawn(i), now) for i in range(config.workers)]
    logs.log("info", "supervisor_started", "workers", workers=[w.proc.pid for w in workers])
    status = 0
    while not stopping:
        time.sleep(0.1)
        now = time.monotonic()
        for w in workers:
            code = w.proc.poll()
            if code is None:
                if now - w.started > HEALTHY_AFTER_S:
                    w.backoff = BACKOFF_MIN_S
                continue
            if code == 2 and now - w.started < START_GRACE_S:
                logs.log("error", "worker_cannot_start", "workers", index=w.index, status=code)
                stopping, status = True, 2
                break
            if w.restart_at == 0.0:
                w.restart_at = now + w.backoff
                logs.log(
                    "error",
                    "worker_died",
                    "workers",
                    index=w.index,
                    pid=w.proc.pid,
                    status=code,
                    restart_in_s=w.backoff,
                )
            elif now >= w.restart_at:
                w.proc, w.started, w.restart_at = spawn(w.index), now, 0.0
                w.backoff = min(w.backoff * 2, BACKOFF_MAX_S)
                logs.log("info", "worker_restarted", "workers", index=w.index, pid=w.proc.pid)
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
    logs.log("info", "supervisor_stopped", "workers", status=status)
    return status
