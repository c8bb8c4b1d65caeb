"""The embedded in-memory broker: one worker, no dependencies.

It keeps every guarantee of `base.Broker` inside this process: offsets, history and the
dedupe window live in dicts here and are lost on restart, which is why the epoch is new each
time the process starts. Publishing is synchronous: the frame is encoded once and handed to
`Hub.deliver` before the sender's ack is queued, so members see it no later than the ack.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from aether_fast._core import encode_publication, utc_timestamp
from aether_fast.brokers.base import PublishResult, Recovery

#: The number of accepted sequences remembered per (user, client_id, channel).
DEDUP_WINDOW = 1024


@dataclass(slots=True)
class _Log:
    """One channel's offset, epoch and history."""

    epoch: str
    offset: int = 0
    history: deque[tuple[int, float, bytes]] = field(default_factory=deque)


@dataclass(slots=True)
class _Window:
    """Sequences accepted from one (user, client_id, channel): sequence -> (offset, ts)."""

    seen: OrderedDict[int, tuple[int, str]] = field(default_factory=OrderedDict)
    touched: float = 0.0


class MemoryBroker:
    name = "memory"

    def __init__(self, hub: Any, *, history_ttl_s: float, dedup_ttl_s: float) -> None:
        self._hub = hub
        self._history_ttl = history_ttl_s
        self._dedup_ttl = dedup_ttl_s
        self._logs: dict[str, _Log] = {}
        self._windows: dict[tuple[object, str, str], _Window] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def health(self) -> tuple[str, str]:
        return ("healthy", "")

    def bind(self, node: Any) -> None:
        return None

    def remote_connections(self, key: str) -> int:
        return 0

    def remote_members(self, channel: str) -> int:
        return 0

    def remote_table(self) -> dict[str, dict[str, Any]]:
        return {}

    def _log(self, channel: str) -> _Log:
        log = self._logs.get(channel)
        if log is None:
            # a log made anew (first use, or after `sweep` forgot an idle one) has an epoch
            # of its own, so offsets it hands out again are never mistaken for old ones
            log = self._logs[channel] = _Log(epoch=secrets.token_hex(4))
        return log

    def publish(self, channel: Any, sender: Any, sequence: int, content: str) -> PublishResult:
        name: str = channel.name
        key = (sender.user_id, sender.client_id, name)
        now = time.monotonic()
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window()
        window.touched = now
        seen = window.seen.get(sequence)
        if seen is not None:
            return (seen[0], seen[1], True)

        log = self._log(name)
        log.offset += 1
        ts = utc_timestamp()
        frame = encode_publication(
            name, content, sequence, ts, log.offset, sender.client_id, sender.user_id
        )
        size = channel.config.history_size
        if size > 0:
            log.history.append((log.offset, now, frame))
            while len(log.history) > size:
                log.history.popleft()
        window.seen[sequence] = (log.offset, ts)
        if len(window.seen) > DEDUP_WINDOW:
            window.seen.popitem(last=False)
        self._hub.deliver(channel, frame, None if sender.echo else sender, log.offset)
        return (log.offset, ts, False)

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
        self._logs[channel] = _Log(epoch=secrets.token_hex(4))
        for key in [k for k in self._windows if k[2] == channel]:
            del self._windows[key]

    def _expire_history(self, log: _Log, now: float) -> None:
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
