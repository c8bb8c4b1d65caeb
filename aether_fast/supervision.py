"""What the supervisor of `WORKERS=N` does alike for each child process it runs (the
workers, workers.py; the private Redis, private_redis.py).

What it owns: `Restarter`, the restart schedule of one child: a death waits the backoff
before the restart, each restart doubles it (up to BACKOFF_MAX_S), a child up for
HEALTHY_AFTER_S brings it back to BACKOFF_MIN_S; `die_with_parent`, what makes a child
go when the supervisor does, however it dies (SIGKILL included): the kernel sends the child
SIGTERM (Linux's PR_SET_PDEATHSIG).
Rule: no process, no I/O, no clock of its own: the caller says what it saw and when
(monotonic seconds), starts the process and logs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import Final

BACKOFF_MIN_S: Final = 0.5
BACKOFF_MAX_S: Final = 10.0
#: A child that ran this long resets its backoff.
HEALTHY_AFTER_S: Final = 30.0
_PR_SET_PDEATHSIG: Final = 1


def die_with_parent() -> Callable[[], None] | None:
    """The `preexec_fn` of a child that must not outlive this process: in the child, before
    exec, it asks the kernel for SIGTERM when this process dies (prctl PR_SET_PDEATHSIG,
    which exec keeps), and exits at once if this process died before that took effect (the
    child has been handed to another parent: no signal would come). None where there is no
    such call (not Linux): the child may outlive a supervisor that is killed."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:  # in the child, before exec
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before prctl
            os._exit(1)

    return preexec


class Restarter:
    """When to start one child again. `started_at` at each start; `up` while it runs well;
    `died` when it is seen dead; `due` says when the restart may be made, `restarting` that
    it is being made."""

    __slots__ = ("backoff", "backoff_max", "backoff_min", "healthy_after", "restart_at", "started")

    def __init__(
        self,
        backoff_min: float = BACKOFF_MIN_S,
        backoff_max: float = BACKOFF_MAX_S,
        healthy_after: float = HEALTHY_AFTER_S,
    ) -> None:
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.healthy_after = healthy_after
        #: the wait before the next restart
        self.backoff = backoff_min
        #: when the child was last started
        self.started = 0.0
        #: when its pending restart is due; 0.0: none pending
        self.restart_at = 0.0

    def started_at(self, now: float) -> None:
        """The child was (re)started at `now`."""
        self.started, self.restart_at = now, 0.0

    def up(self, now: float) -> None:
        """The child is running well at `now`: up for `healthy_after`, the backoff resets."""
        if now - self.started > self.healthy_after:
            self.backoff = self.backoff_min

    def died(self, now: float) -> float | None:
        """The child is seen dead at `now` (or could not be started again): the seconds until
        its restart when this is news (to log), None when a restart is already pending."""
        if self.restart_at != 0.0:
            return None
        self.restart_at = now + self.backoff
        return self.backoff

    def due(self, now: float) -> bool:
        """Whether the pending restart may be made at `now`."""
        return self.restart_at != 0.0 and now >= self.restart_at

    def restarting(self) -> None:
        """The pending restart is being made: the next one waits twice as long."""
        self.backoff = min(self.backoff * 2, self.backoff_max)
        self.restart_at = 0.0
