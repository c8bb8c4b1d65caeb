"""What several unit test modules share: an RSA key pair, a Hub on a loop without sockets,
channel configs and an open channel store."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from aether_fast._core import Hub
from aether_fast.store import ChannelConfig, ChannelStore


def rsa_pems() -> tuple[str, str]:
    """A fresh 2048-bit RSA key pair as PEM text: (private PKCS#8, public SubjectPublicKeyInfo)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


def make_hub(
    loop: asyncio.AbstractEventLoop,
    *,
    conn_capacity: float = 0,
    conn_window: float = 60,
    busy_poll_s: float = 0.0,
) -> Hub:
    """A Hub with the server's usual buffer and message limits and no global rate limit."""
    return Hub(
        loop,
        send_buffer_limit=1 << 20,
        max_message_bytes=65536,
        conn_capacity=conn_capacity,
        conn_window=conn_window,
        global_rate=0,
        refresh_notice=60,
        busy_poll_s=busy_poll_s,
    )


def cfg(name: str = "chat", **changes: Any) -> ChannelConfig:
    """A channel's settings, none of them 0 or a default, with `changes`."""
    base = ChannelConfig(
        name=name,
        max_connections=10,
        message_rate_limit=5.0,
        require_auth=True,
        history_size=50,
        presence=False,
    )
    return dataclasses.replace(base, **changes)


def open_store(data_dir: Path | str, *configs: ChannelConfig) -> ChannelStore:
    """A ChannelStore on `data_dir`, opened, holding `configs`."""
    store = ChannelStore(str(data_dir))
    store.open()
    for config in configs:
        store.put(config)
    return store
