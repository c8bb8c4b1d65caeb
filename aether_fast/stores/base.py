"""The channel-store contract: what a channel config is, how a REST body becomes one, and
what the Node needs of a store (`Store`), kept by `sqlite.py` (one worker, `DATA_DIR`) and
`redis.py` (every worker, through the Redis cluster's config hash).

Rule: a ChannelConfig is only ever built by `parse_channel_config` (from a REST body) or
`default_channel_config` (auto-create), so every stored config is valid. The SQLite store
raises StoreError (naming the file and the cause) when it cannot be used; the Redis store
raises `brokers.base.BrokerUnavailable` when Redis does not confirm a write.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Final, Protocol

from aether_fast.config import Config
from aether_fast.protocol import NAME_RULE, valid_channel

# Limits the compiled hot path can hold in C ints/doubles.
_MAX_CONNECTIONS: Final = 2**31 - 1
_MAX_RATE: Final = 1e9
_MAX_HISTORY: Final = 100000


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    """One channel's settings; 0 means "no limit" for max_connections and message_rate_limit."""

    name: str
    max_connections: int
    message_rate_limit: float
    require_auth: bool
    history_size: int
    presence: bool
    # permessage-deflate for this channel's publications (COMPRESSION must be on too); a
    # default, so configs stored before it existed read as on
    compression: bool = True

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "max_connections": self.max_connections,
            "message_rate_limit": self.message_rate_limit,
            "require_auth": self.require_auth,
            "history_size": self.history_size,
            "presence": self.presence,
            "compression": self.compression,
        }


class StoreError(Exception):
    """The channel store cannot be used; the message names the file and the cause."""


class StoreLocked(StoreError):
    """DATA_DIR's lock is held by another process in a conflicting mode."""


class FieldError(ValueError):
    """A REST body field is missing or invalid (answered with 400)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def default_channel_config(name: str, config: Config) -> ChannelConfig:
    """The config a channel gets when auto-created on first join."""
    return ChannelConfig(
        name=name,
        max_connections=config.channel_default_max_connections,
        message_rate_limit=float(config.channel_default_message_rate_limit),
        require_auth=config.channel_default_require_auth,
        history_size=config.history_size,
        presence=config.channel_default_presence,
    )


def _int_field(body: dict[str, object], field: str, fallback: int, hi: int) -> int:
    if field not in body:
        return fallback
    value = body[field]
    # bool is an int subclass in Python but not a count in JSON.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
        raise FieldError(field, f"must be an integer in 0..{hi}")
    return value


def _number_field(body: dict[str, object], field: str, fallback: float, hi: float) -> float:
    if field not in body:
        return fallback
    value = body[field]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 <= value <= hi
    ):
        raise FieldError(field, f"must be a number in 0..{hi:g}")
    return float(value)


def _bool_field(body: dict[str, object], field: str, fallback: bool) -> bool:
    if field not in body:
        return fallback
    value = body[field]
    if not isinstance(value, bool):
        raise FieldError(field, "must be true or false")
    return value


_FIELDS: Final = frozenset(
    {
        "name",
        "max_connections",
        "message_rate_limit",
        "require_auth",
        "history_size",
        "presence",
        "compression",
    }
)


def parse_channel_config(
    body: object, config: Config, existing: ChannelConfig | None = None
) -> ChannelConfig:
    """Validate a `POST /ws/channels` body into a ChannelConfig, or raise FieldError.

    Fields left out keep `existing`'s values (an update) or take the Config defaults (a new
    channel). Unknown fields are refused so a typo is not silently ignored.
    """
    if not isinstance(body, dict):
        raise FieldError("body", "must be a JSON object")
    for key in sorted(str(k) for k in body):
        if key not in _FIELDS:
            raise FieldError(key, "unknown field")
    if "name" not in body:
        raise FieldError("name", "is required")
    name = body["name"]
    if not isinstance(name, str) or not valid_channel(name):
        raise FieldError("name", f"must be {NAME_RULE}")
    if existing is not None and existing.name != name:
        raise FieldError("name", "does not match the channel being updated")
    base = existing if existing is not None else default_channel_config(name, config)
    return ChannelConfig(
        name=name,
        max_connections=_int_field(body, "max_connections", base.max_connections, _MAX_CONNECTIONS),
        message_rate_limit=_number_field(
            body, "message_rate_limit", base.message_rate_limit, _MAX_RATE
        ),
        require_auth=_bool_field(body, "require_auth", base.require_auth),
        history_size=_int_field(body, "history_size", base.history_size, _MAX_HISTORY),
        presence=_bool_field(body, "presence", base.presence),
        compression=_bool_field(body, "compression", base.compression),
    )


class Store(Protocol):
    """What the Node needs of a channel store: reads answered at once, writes that a
    remote store (Redis) may answer later."""

    def get(self, name: str) -> ChannelConfig | None: ...

    def list(self) -> builtins.list[ChannelConfig]: ...

    def put(self, cfg: ChannelConfig) -> bool | Awaitable[bool]: ...

    def delete(self, name: str) -> bool | Awaitable[bool]: ...

    def close(self) -> None: ...
