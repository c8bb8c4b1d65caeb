"""What the supervisor of `WORKERS=N` does alike for each child process it runs (the
workers, workers.py; the private Redis, private_redis.py).

What it owns: `Restarter`, the restart schedule of one child: a death waits the backoff
before the restart, each restart doubles it (up to BACKOFF_MAX_S), a child up for
HEALTHY_AFTER_S brings it back to BACKOFF_MIN_S.
Rule: no process, no I/O, no clock of its own: the caller says what it saw and when
(monotonic seconds), starts the process and logs.
"""

from __future__ import annotations

from typing import Final

BACKOFF_MIN_S: Final = 0.5
BACKOFF_MAX_S: Final = 10.0
#: A child that ran this long resets its backoff.
HEALTHY_AFTER_S: Final = 30.0


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
