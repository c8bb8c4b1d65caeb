"""What several unit test modules and bench/micro share: an RSA key pair, a Hub on a loop
without sockets."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from aether_fast._core import Hub


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
    loop: Any,
    *,
    conn_capacity: float = 0,
    conn_window: float = 60,
    busy_poll_s: float = 0.0,
) -> Hub:
    """A Hub with the server's usual buffer and message limits and no global rate limit.
    `loop` is what the Hub takes: an asyncio loop, or a stand-in with its `call_soon` and
    `call_later` (bench/micro)."""
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
