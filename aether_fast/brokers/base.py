"""The broker contract: what every broker guarantees to the Hub and the Node.

A broker is the message log: it owns, per channel, the offset counter, the epoch, the
history and the dedupe window. What a worker knows of the other workers (the cluster table,
the calls back up to the Node) is the `Cluster`'s (`cluster.py`).

Guarantees (every implementation keeps all of them):
- Ordering: publications of one channel are delivered to local members in offset order, and
  offsets are 1, 2, 3, ... without gaps for as long as the epoch stays the same.
- Exactly once per member: a publication is handed to `Hub.deliver` once per worker that has
  members of the channel; a (user, client_id, channel, sequence) already accepted within the
  dedupe window (`DEDUP_WINDOW`) is not published again, and its original offset is
  returned.
- Atomicity: offset assignment, the history append and the dedupe record happen together;
  a publish that cannot be made durable raises instead of returning an offset.
- The epoch changes exactly when a channel's history is lost (a restart of the memory
  broker, a flushed Redis). Recovery compares it with the client's.

`publish` returns a `PublishResult` tuple for a synchronous broker, or an awaitable of one.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:  # _core imports this module: no import of it at run time
    from aether_fast._core import Packed

#: The dedupe window: the number of accepted sequences each broker remembers per (user,
#: client_id, channel), the last ones whatever their pattern (docs/protocol.md §6). The memory
#: broker's `_core.DedupeWindow` holds at most this many (a power of two: its tables double
#: up to it); the Redis broker keeps one slot per `sequence % DEDUP_WINDOW`.
DEDUP_WINDOW: Final = 1024

#: The reason code of a broker that cannot be reached (its details are logged, not shown).
BROKER_UNAVAILABLE = "broker_unavailable"
#: The reason code of a sharded Redis broker some of whose shards (not all) cannot be
#: reached: their channels are refused, the others work (which shard is logged, not shown).
BROKER_SHARD_UNAVAILABLE = "broker_shard_unavailable"
#: The reason code of a Redis Cluster broker (`redis+cluster://`) with a slot whose master
#: cannot be reached, or a channel with members here whose subscription is not (yet) back
#: on its slot's master after the slot moved: some channels are refused or not delivered.
BROKER_CLUSTER_DEGRADED = "broker_cluster_degraded"


class BrokerUnavailable(RuntimeError):
    """The broker did not confirm an operation (Redis unreachable): nothing the caller could
    rely on was done. REST answers it with 503, a publish with an error instead of an ack."""


_EPOCH_START: Final = secrets.randbits(32)
_epochs = itertools.count(1)


def new_epoch() -> str:
    """A new epoch: 8 hex digits, each one new within this process (a random start per
    process, then a counter; workers are separate processes) and as unlikely to repeat one
    of another process as a random draw, without asking the OS for randomness each time
    (the Redis broker sends a candidate with every publish)."""
    return f"{(_EPOCH_START + next(_epochs)) & 0xFFFFFFFF:08x}"


#: (offset, timestamp, duplicate): what the sender's ack carries.
PublishResult = tuple[int, str, bool]


@dataclass(frozen=True, slots=True)
class Recovery:
    """What a join with `since`/`epoch` gets back."""

    # encoded publication frames after `since`, in offset order; a publication compressed
    # for deflate members comes as its `Packed` (each member gets its own variant)
    frames: list[bytes | Packed]
    offset: int  # the channel's current offset
    epoch: str  # the channel's current epoch
    recovered: bool  # True when every missed publication is in `frames`


class Broker(Protocol):
    """One interface for the memory and the Redis broker (see the module docstring): the
    message log, and nothing about the other workers."""

    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def publish(
        self, channel: Any, sender: Any, sequence: int, content: str
    ) -> PublishResult | Awaitable[PublishResult]: ...

    def position(self, channel: str) -> tuple[int, str] | Awaitable[tuple[int, str]]:
        """The channel's current (offset, epoch)."""
        ...

    def recover(
        self, channel: str, since: int | None, epoch: str | None
    ) -> Recovery | Awaitable[Recovery]:
        """The channel's position and, with `since`, the publications after it. An
        asynchronous broker also makes sure this worker receives the channel's live
        publications before it reads the position, so nothing falls in between."""
        ...

    def forget(self, channel: str) -> Awaitable[None] | None:
        """Drop a deleted channel's history (its offsets restart under a new epoch)."""
        ...

    def health(self) -> tuple[str, str]:
        """("healthy" | "degraded" | "down", reason code): the code is public (/health,
        /ws/status), so it is one of a fixed set (BROKER_UNAVAILABLE,
        BROKER_SHARD_UNAVAILABLE, BROKER_CLUSTER_DEGRADED) and never the
        text of an exception, which names hosts and ports: that goes to the log."""
        ...

    def sweep(self) -> None:
        """Periodic housekeeping (called by the Node's timer every few seconds)."""
        ...
