"""The restart schedule the supervisor keeps for each child (aether_fast/supervision.py):
the wait after a death starts at BACKOFF_MIN_S, doubles with each restart up to
BACKOFF_MAX_S, and a child up for HEALTHY_AFTER_S brings it back to the start."""

from __future__ import annotations

from aether_fast.supervision import BACKOFF_MAX_S, BACKOFF_MIN_S, HEALTHY_AFTER_S, Restarter


def crash_loop(r: Restarter, now: float, deaths: int) -> tuple[list[float], float]:
    """A child that dies at once after each start: the waits announced, and the time."""
    waits: list[float] = []
    for _ in range(deaths):
        wait = r.died(now)
        assert wait is not None
        waits.append(wait)
        assert r.died(now + 0.01) is None  # the same death, seen again: nothing new
        assert not r.due(now + wait - 0.01) and r.due(now + wait)
        now += wait
        r.restarting()
        r.started_at(now)
        assert not r.due(now)
    return waits, now


def test_a_crash_loop_waits_twice_as_long_each_time_up_to_the_cap() -> None:
    r = Restarter()
    r.started_at(100.0)
    waits, _ = crash_loop(r, 100.0, 8)
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert (BACKOFF_MIN_S, BACKOFF_MAX_S) == (0.5, 10.0)


def test_a_child_up_long_enough_starts_the_schedule_again() -> None:
    r = Restarter()
    r.started_at(0.0)
    _, now = crash_loop(r, 0.0, 4)
    assert r.backoff == 8.0  # four restarts made: 0.5 * 2**4
    r.up(now + HEALTHY_AFTER_S - 1)  # not yet
    assert r.backoff == 8.0
    r.up(now + HEALTHY_AFTER_S + 1)
    assert r.backoff == BACKOFF_MIN_S
    assert r.died(now + HEALTHY_AFTER_S + 2) == BACKOFF_MIN_S


def test_a_restart_that_fails_waits_the_next_step() -> None:
    """The private Redis's binary gone at a restart: `died` again after `restarting`."""
    r = Restarter(1.0, 3.0, 60.0)
    r.started_at(0.0)
    assert r.died(5.0) == 1.0
    r.restarting()  # the start fails
    assert r.died(6.0) == 2.0 and r.due(8.0)
    r.restarting()
    assert r.died(8.0) == 3.0  # capped
