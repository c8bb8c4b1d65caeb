"""What several unit test modules and bench/micro share: an RSA key pair, a Hub on a loop
without sockets, one worker's parts with the memory broker (`memory_worker`), channel configs
and an open channel store, an asyncio transport that sends nothing (optionally keeping what is
written), and a reader of the server frames written to it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from aether_fast._core import Hub
from aether_fast.app import ControlPlane, control_plane, wire
from aether_fast.auth import Authenticator
from aether_fast.brokers.cluster import SingleWorker
from aether_fast.brokers.memory import MemoryBroker
from aether_fast.config import Config, load_config
from aether_fast.stores.base import ChannelConfig
from aether_fast.stores.sqlite import ChannelStore


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


@dataclasses.dataclass
class MemoryWorker:
    """One worker's parts below its control plane, with the memory broker and the
    single-worker cluster: what `app.control_plane` is given."""

    loop: asyncio.AbstractEventLoop
    config: Config
    store: ChannelStore
    hub: Hub
    broker: MemoryBroker
    cluster: SingleWorker

    def control_plane(self) -> ControlPlane:
        """The control plane on these parts, not wired yet (`app.wire` does that)."""
        auth = Authenticator(self.config)
        return control_plane(self.config, self.hub, self.broker, self.cluster, self.store, auth)

    def wired(self) -> ControlPlane:
        """The control plane on these parts, wired by `app.wire`."""
        parts = self.control_plane()
        wire(self.hub, parts.node, self.broker, self.cluster)
        return parts


@contextlib.contextmanager
def memory_worker(data_dir: Path, **env: str) -> Iterator[MemoryWorker]:
    """A new loop, the config of `env` (a JWT_SECRET given, DATA_DIR `data_dir`), the channel
    store open there, a Hub on the loop with the config's per-connection rate limit, the
    memory broker and the single-worker cluster. The store and the loop are closed after."""
    loop = asyncio.new_event_loop()
    config = load_config({"JWT_SECRET": "x" * 40, "DATA_DIR": str(data_dir), **env})
    store = open_store(data_dir)
    try:
        hub = make_hub(
            loop,
            conn_capacity=float(config.rate_limit_messages),
            conn_window=float(config.rate_limit_window_s),
        )
        broker = MemoryBroker(hub, history_ttl_s=60, dedup_ttl_s=60)
        yield MemoryWorker(loop, config, store, hub, broker, SingleWorker())
    finally:
        store.close()
        loop.close()


class _NoSocket:
    def fileno(self) -> int:
        return -1


class NullTransport(asyncio.Transport):
    """An asyncio transport that accepts every write and sends nothing: a Connection on it
    writes through `write` (its socket's fd is -1). With `sock`, that socket is what
    `get_extra_info("socket")` reports (a server may write to its fd); with `record`, the
    bytes written are kept in `data`, in order."""

    def __init__(self, sock: socket.socket | None = None, record: bool = False) -> None:
        super().__init__()
        self.written = 0
        self.data: bytearray | None = bytearray() if record else None
        self.closed = False
        self._socket: Any = sock if sock is not None else _NoSocket()

    def write(self, data: Any) -> None:
        self.written += 1
        if self.data is not None:
            self.data += data

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        return None  # nothing is ever buffered here: a paced replay goes on at each flush

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._socket
        return default


def server_frames(data: bytes | bytearray) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each server frame in `data`: unmasked, unfragmented, as the
    server writes them (RFC 6455 §5.2)."""
    frames = []
    i = 0
    while i < len(data):
        assert data[i] & 0x80, "a server frame is never fragmented"
        opcode, n = data[i] & 0x0F, data[i + 1]
        assert not n & 0x80, "a server frame is never masked"
        i += 2
        if n == 126:
            n, i = int.from_bytes(data[i : i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(data[i : i + 8], "big"), i + 8
        frames.append((opcode, bytes(data[i : i + n])))
        i += n
    assert i == len(data), "a frame was cut short"
    return frames


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
