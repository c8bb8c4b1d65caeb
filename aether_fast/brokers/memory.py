"""The embedded in-memory broker: one worker, no dependencies.

It keeps every guarantee of `base.Broker` inside this process: offsets, history and the
dedupe window live here and are lost on restart, which is why the epoch is new each time the
process starts. It goes with `cluster.SingleWorker` (no other worker to know about).
Publishing is synchronous: the frame is encoded once and handed to
`Hub.deliver` before the sender's ack is queued, so members see it no later than the ack.

The per-message part (dedupe, offset, history, deliver) is compiled: `publish` is
`_core.MemoryLogs.publish`, and the logs and windows it keeps are read here for recovery,
sweeps and deletes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aether_fast._core import ChannelLog, DedupeWindow, MemoryLogs
from aether_fast.brokers.base import PublishResult, Recovery


class MemoryBroker:
    name = "memory"

    def __init__(self, hub: Any, *, history_ttl_s: float, dedup_ttl_s: float) -> None:
        self._hub = hub
        self._history_ttl = history_ttl_s
        self._dedup_ttl = dedup_ttl_s
        state = MemoryLogs(hub)
        self._state = state
        self._logs: dict[str, ChannelLog] = state.logs
        self._windows: dict[tuple[object, str, str], DedupeWindow] = state.windows
        # the sessions call this directly: a compiled method, no Python frame per message
        self.publish: Callable[[Any, Any, int, str], PublishResult] = state.publish

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def health(self) -> tuple[str, str]:
        return ("healthy", "")

    def _log(self, channel: str) -> ChannelLog:
        return self._state.log(channel)

    def position(self, channel: str) -> tuple[int, str]:
        log = self._log(channel)
        return (log.offset, log.epoch)

    def recover(self, channel: str, since: int | None, epoch: str | None) -> Recovery:
        log = self._log(channel)
        self._expire_history(log, time.monotonic())
        if since is None:
            return Recovery([], log.offset, log.epoch, False)
        if epoch is not None and epoch != log.epoch:
            return Recovery([], log.offset, log.epoch, False)
        if since >= log.offset:
            return Recovery([], log.offset, log.epoch, since == log.offset)
        missed = [frame for offset, _, frame in log.history if offset > since]
        complete = len(missed) == log.offset - since
        return Recovery(missed if complete else [], log.offset, log.epoch, complete)

    def forget(self, channel: str) -> None:
        self._logs[channel] = ChannelLog()
        for key in [k for k in self._windows if k[2] == channel]:
            del self._windows[key]

    def _expire_history(self, log: ChannelLog, now: float) -> None:
        if self._history_ttl <= 0:
            return  # HISTORY_TTL_S=0: no expiry
        limit = now - self._history_ttl
        while log.history and log.history[0][1] < limit:
            log.history.popleft()

    def sweep(self) -> None:
        """Drop dedupe windows idle for longer than DEDUP_TTL_S, and the logs of channels
        that have no member here and no history left (called by the Node's timer)."""
        now = time.monotonic()
        limit = now - self._dedup_ttl
        stale = [k for k, w in self._windows.items() if w.touched < limit]
        for k in stale:
            del self._windows[k]
        for name in list(self._logs):
            log = self._logs[name]
            self._expire_history(log, now)
            ch = self._hub.channel(name)
            if not log.history and (ch is None or ch.member_count == 0):
                del self._logs[name]
