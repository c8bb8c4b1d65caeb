"""One frozen `Config` built from environment variables and CLI flags, validated once.

Rule: every setting is declared exactly once, in `SETTINGS` (name, parser, default, meaning);
the environment variable is the upper-case name. `Config` lists the typed fields and has no
defaults of its own: `load_config` fills each one from its row. `load_config` either returns
a Config in which every value is valid and consistent with the others, or raises
`ConfigError` naming the one variable at fault. Nothing else in the server reads `os.environ`.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Final
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import jwt.algorithms
import jwt.exceptions


class ConfigError(Exception):
    """A setting is missing, malformed or inconsistent; `str()` is one line for the operator."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable
        self.message = message


@dataclass(frozen=True, slots=True)
class Config:
    """The server's settings. Build it with `load_config`, which fills every field: the
    defaults and meanings are the `SETTINGS` rows (`describe()`), not written here."""

    ws_host: str
    ws_port: int
    ws_path: str
    jwt_secret: str
    jwt_secret_generated: bool
    jwt_algorithm: str
    jwt_expires_s: int
    jwt_public_key: str | None
    jwt_private_key: str | None
    jwt_audience: str | None
    jwt_issuer: str | None
    jwt_leeway_s: float
    token_refresh_notice_s: float
    rate_limit_connections: int
    rate_limit_messages: int
    rate_limit_window_s: float
    rate_limit_global_messages: int
    enable_metrics: bool
    metrics_host: str
    metrics_port: int
    max_message_bytes: int
    max_http_body_bytes: int
    max_connections: int
    max_pending_connections: int
    max_pending_connections_per_peer: int
    max_channels_per_connection: int
    max_channels: int
    dedup_ttl_s: int
    channel_auto_create: bool
    channel_default_require_auth: bool
    channel_default_max_connections: int
    channel_default_message_rate_limit: float
    channel_default_presence: bool
    history_size: int
    history_ttl_s: int
    channel_state_ttl_s: int
    data_dir: str
    allowed_origins: tuple[str, ...]
    handshake_timeout_s: float
    http_keepalive_idle_s: float
    ping_interval_s: float
    send_buffer_limit_bytes: int
    busy_poll_us: int
    compression: bool
    compression_min_bytes: int
    compression_level: int
    shutdown_timeout_s: float
    workers: int
    broker_url: str | None
    private_redis_maxmemory_mb: int
    node_id: str | None
    log_level: str
    admin_token: str | None
    tls_cert_file: str | None
    tls_key_file: str | None
    echo_path: str | None

    @property
    def broker_cluster(self) -> bool:
        """BROKER_URL names a Redis Cluster's seed nodes (`redis+cluster://`)."""
        return bool(self.broker_url and self.broker_url.startswith(CLUSTER_SCHEMES))

    @property
    def broker_urls(self) -> tuple[str, ...]:
        """BROKER_URL's Redis servers (shards) in canonical order, the home first; () when
        unset or a Redis Cluster (its seeds are `cluster_seed_urls`'). One URL: a tuple of it
        alone."""
        if not self.broker_url or self.broker_cluster:
            return ()
        return tuple(self.broker_url.split(","))


# -- parsers: each takes the raw value (a str from the environment, or a typed CLI value) and
# -- returns the typed value, or raises ValueError whose text completes "NAME: <text>".

Parser = Callable[[object], object]

_INT32_MAX: Final = 2**31 - 1
_TRUE: Final = frozenset({"true", "1", "yes", "on"})
_FALSE: Final = frozenset({"false", "0", "no", "off"})

HMAC_ALGORITHMS: Final = ("HS256", "HS384", "HS512")
ASYMMETRIC_ALGORITHMS: Final = (
    "RS256",
    "RS384",
    "RS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
ALGORITHMS: Final = HMAC_ALGORITHMS + ASYMMETRIC_ALGORITHMS
LOG_LEVELS: Final = ("debug", "info", "warn", "error")
BROKER_SCHEMES: Final = ("redis://", "rediss://", "unix://")
#: BROKER_URL of a Redis Cluster: `redis+cluster://[user:pass@]host:port,host:port[?...]`.
CLUSTER_SCHEME: Final = "redis+cluster://"
#: ... over TLS (every node, with the `ssl_*` options of rediss://).
CLUSTER_TLS_SCHEME: Final = "rediss+cluster://"
CLUSTER_SCHEMES: Final = (CLUSTER_SCHEME, CLUSTER_TLS_SCHEME)


def _int(lo: int, hi: int = _INT32_MAX) -> Parser:
    expect = (
        f"must be an integer in {lo}..{hi}" if hi != _INT32_MAX else f"must be an integer >= {lo}"
    )

    def parse(raw: object) -> int:
        if isinstance(raw, bool):
            raise ValueError(expect)
        if isinstance(raw, int):
            value = raw
        elif isinstance(raw, str):
            try:
                value = int(raw.strip(), 10)
            except ValueError:
                raise ValueError(expect) from None
        else:
            raise ValueError(expect)
        if not lo <= value <= hi:
            raise ValueError(expect)
        return value

    return parse


def _float(lo: float, *, exclusive: bool = False, hi: float = 1e12) -> Parser:
    bound = f"> {lo:g}" if exclusive else f">= {lo:g}"
    if hi != 1e12:
        bound += f" and <= {hi:g}"
    expect = f"must be a number {bound}"

    def parse(raw: object) -> float:
        if isinstance(raw, bool):
            raise ValueError(expect)
        if isinstance(raw, (int, float)):
            value = float(raw)
        elif isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                raise ValueError(expect) from None
        else:
            raise ValueError(expect)
        if not math.isfinite(value) or value < lo or (exclusive and value == lo) or value > hi:
            raise ValueError(expect)
        return value

    return parse


def _bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError("must be one of true/false, 1/0, yes/no, on/off")


def _text(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError("must be a string")
    return raw


def _host(raw: object) -> str:
    text = _text(raw).strip()
    if not text or any(c.isspace() for c in text):
        raise ValueError("must be a host name or IP address")
    return text


def _url_path(raw: object) -> str:
    text = _text(raw)
    if not text.startswith("/") or any(c.isspace() or c in "?#" for c in text):
        raise ValueError("must be a URL path starting with '/' (no spaces, '?' or '#')")
    return text


def _algorithm(raw: object) -> str:
    text = _text(raw).strip()
    if text.lower() == "none":
        raise ValueError("'none' is never accepted: tokens must be signed")
    for name in ALGORITHMS:
        if text.lower() == name.lower():
            return name
    raise ValueError(f"must be one of {', '.join(ALGORITHMS)}")


def _pem(raw: object) -> str:
    text = _text(raw)
    # PEM keys put in one-line environment variables often carry literal "\n" escapes.
    if "-----BEGIN" in text and "\n" not in text and "\\n" in text:
        text = text.replace("\\n", "\n")
    return text


def _origins(raw: object) -> tuple[str, ...]:
    if isinstance(raw, str):
        items = [part.strip() for part in raw.split(",")]
    elif isinstance(raw, (list, tuple)):
        items = [_text(part).strip() for part in raw]
    else:
        raise ValueError("must be a comma-separated list of origins")
    result: list[str] = []
    for item in items:
        if not item:
            continue
        if item == "*":
            return ()
        low = item.lower()
        scheme, sep, rest = low.partition("://")
        if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
            raise ValueError(
                f"entry {item!r} is not an origin like https://example.com (scheme://host[:port], "
                "no path or trailing slash)"
            )
        if low not in result:
            result.append(low)
    return tuple(result)


def _log_level(raw: object) -> str:
    text = _text(raw).strip().lower()
    if text == "warning":
        return "warn"
    if text not in LOG_LEVELS:
        raise ValueError(f"must be one of {'|'.join(LOG_LEVELS)}")
    return text


#: Query parameters of BROKER_URL: every connection to Redis (the pool and the lean ones of
#: brokers/resp.py) honours them; anything else is refused rather than half applied.
BROKER_URL_OPTIONS: Final = ("db", "username", "password")
#: ... and with rediss:// (TLS), those of redis-py's SSLConnection that say whom to trust.
BROKER_TLS_OPTIONS: Final = (
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
)
_BROKER_TLS_FILES: Final = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_BROKER_BOOLS: Final = ("true", "false", "yes", "no", "1", "0")


def _one_broker_url(text: str) -> str:
    """One entry of BROKER_URL, checked as every connection to Redis will read it."""
    if not text.startswith(BROKER_SCHEMES) or text.endswith("://"):
        raise ValueError(f"must be a URL starting with {', '.join(BROKER_SCHEMES)}")
    # the messages below never quote the URL: it may hold a password
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 (urllib checks the port only when asked)
    except ValueError as e:
        raise ValueError(f"bad port ({e})") from None
    allowed = BROKER_URL_OPTIONS + (BROKER_TLS_OPTIONS if parts.scheme == "rediss" else ())
    query = parse_qsl(parts.query, keep_blank_values=True)
    for name, _ in query:
        if name not in allowed:
            raise ValueError(
                f"query parameter {name!r} is not supported with {parts.scheme}:// "
                f"(supported: {', '.join(allowed)})"
            )
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("unix:// needs the socket's path, e.g. unix:///run/redis/redis.sock")
    elif parts.path.strip("/") and not parts.path.strip("/").isdigit():
        raise ValueError("the path must be a database number, e.g. redis://host:6379/0")
    from redis.asyncio.connection import parse_url  # the parser every connection uses

    try:
        options = parse_url(text)
    except ValueError as e:
        raise ValueError(str(e)) from None
    if options.get("ssl_cert_reqs", "required") not in ("none", "optional", "required"):
        raise ValueError("ssl_cert_reqs must be none, optional or required")
    for name, value in query:
        # redis-py reads any other word as true ("off" too): only the unambiguous ones
        if name == "ssl_check_hostname" and value.lower() not in _BROKER_BOOLS:
            raise ValueError(f"ssl_check_hostname must be one of {', '.join(_BROKER_BOOLS)}")
        if name in _BROKER_TLS_FILES:
            try:
                with open(value, "rb") as fh:
                    fh.read(1)
            except OSError as e:
                raise ValueError(f"{name}: cannot read {value!r}: {e.strerror or e}") from None
    return text


def shard_key(url: str) -> str:
    """The Redis server and database a BROKER_URL entry names, however it is written (as
    redis-py reads it): `host:port db N` (host in lower case, port 6379 and database 0 by
    default) or `unix:<path> db N`. Credentials, the scheme and other options do not count.
    Two entries with one key are one shard, and shards are ordered by it (the canonical
    order, `brokers/redis_shards.py`). ValueError on a port or database that is no number."""
    parts = urlsplit(url)
    db = next((value for name, value in parse_qsl(parts.query) if name == "db"), None)
    if db is not None and not db.strip().isdigit():
        raise ValueError("the db must be a database number")
    if parts.scheme == "unix":
        return f"unix:{unquote(parts.path)} db {int(db or 0)}"
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError("the port must be a number in 1..65535") from None
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    if db is None:  # redis-py: the path's number when the query names no db
        path = parts.path.replace("/", "")
        db = path if path.isdigit() else "0"
    return f"{host}:{port} db {int(db)}"


def cluster_seed_urls(url: str) -> list[str]:
    """The redis:// (rediss:// with TLS) URL of each seed node of a `redis+cluster://` or
    `rediss+cluster://` BROKER_URL (its credentials and options each), in the order given.
    ValueError (never quoting the URL: it may hold a password) when it is not one."""
    tls = url.startswith(CLUSTER_TLS_SCHEME)
    if not url.startswith(CLUSTER_SCHEMES):
        raise ValueError(f"must start with {CLUSTER_SCHEME} or {CLUSTER_TLS_SCHEME}")
    scheme = "rediss" if tls else "redis"
    allowed = ("username", "password", *(BROKER_TLS_OPTIONS if tls else ()))
    rest, _, query = url[len(CLUSTER_TLS_SCHEME if tls else CLUSTER_SCHEME) :].partition("?")
    auth, at, hosts = rest.rpartition("@")
    if "," in auth:
        raise ValueError("credentials go before the first seed only (user:password@host:port,...)")
    entries = [h.strip() for h in hosts.split(",")]
    seen: set[str] = set()
    seeds = []
    for i, host in enumerate(entries, 1):
        where = f"seed {i} of {len(entries)}: " if len(entries) > 1 else ""
        if "://" in host:
            raise ValueError(
                f"{where}a redis+cluster:// list names seed nodes as host:port only "
                "(not mixed with other URLs; a cluster is one broker, not shards)"
            )
        if not host:
            raise ValueError(f"{where}empty: seed nodes are host:port separated by single commas")
        if "/" in host:
            raise ValueError(f"{where}a Redis Cluster has database 0 only: no /db path")
        if "@" in host:
            raise ValueError(f"{where}credentials go before the first seed only")
        parts = urlsplit(f"{scheme}://{host}")
        try:
            port = parts.port
        except ValueError as e:
            raise ValueError(f"{where}bad port ({e})") from None
        if port is None or not parts.hostname:
            raise ValueError(f"{where}must be host:port")
        key = f"{parts.hostname.lower()}:{port}"
        if key in seen:
            raise ValueError(f"{where}names {key} again: every seed must be listed once")
        seen.add(key)
        for name, _ in parse_qsl(query, keep_blank_values=True):
            if name not in allowed:
                raise ValueError(
                    f"query parameter {name!r} is not supported with {scheme}+cluster:// "
                    f"(supported: {', '.join(allowed)})"
                )
        seed = f"{scheme}://{auth}{at}{host}" + (f"?{query}" if query else "")
        try:
            _one_broker_url(seed)
        except ValueError as e:
            raise ValueError(f"{where}{e}") from None
        seeds.append(seed)
    return seeds


def _broker_url(raw: object) -> str:
    """One Redis URL, or a comma-separated list of them (shards), returned in canonical order
    (`shard_key`: the first is the home of the cluster-wide state) joined by commas; a single
    URL is returned as given; a `redis+cluster://` URL (seed nodes) as given. The entries are
    never echoed (they may hold a password)."""
    text = _text(raw).strip()
    if text.startswith(CLUSTER_SCHEMES):
        cluster_seed_urls(text)
        return text
    entries = [part.strip() for part in _text(raw).split(",")]
    expect = f"must be a URL starting with {', '.join(BROKER_SCHEMES)}"
    keys: dict[str, str] = {}
    for i, url in enumerate(entries, 1):
        where = f"entry {i} of {len(entries)}: " if len(entries) > 1 else ""
        if not url:
            raise ValueError(f"{where}empty: a list is URLs separated by single commas")
        if url.startswith(CLUSTER_SCHEMES):
            raise ValueError(
                f"{where}redis+cluster:// must be the only URL: "
                "redis+cluster://host:port,host:port names a cluster's seed nodes"
            )
        if not url.startswith(BROKER_SCHEMES) or url.endswith("://"):
            raise ValueError(f"{where}{expect}")
        try:
            key = shard_key(url)
            _one_broker_url(url)
        except ValueError as e:
            raise ValueError(f"{where}{e}") from None
        if key in keys:
            raise ValueError(f"{where}names {key} again: every shard must be listed once")
        keys[key] = url
    if len(entries) == 1:
        return entries[0]
    return ",".join(keys[key] for key in sorted(keys))


#: Shortest ADMIN_TOKEN accepted: a static credential must not be guessable.
ADMIN_TOKEN_MIN_CHARS: Final = 32


def _admin_token(raw: object) -> str:
    text = _text(raw)
    if len(text) < ADMIN_TOKEN_MIN_CHARS:
        raise ValueError(
            f"must be at least {ADMIN_TOKEN_MIN_CHARS} characters (got {len(text)}); "
            "use e.g. `openssl rand -hex 32`"
        )
    return text


def _path(raw: object) -> str:
    text = _text(raw)
    if not text.strip():
        raise ValueError("must be a non-empty path")
    return text


@dataclass(frozen=True, slots=True)
class Setting:
    """One configurable value: its field name (env var = `name.upper()`), parser and meaning."""

    name: str
    parse: Parser
    default: object
    doc: str
    default_text: str | None = None
    secret: bool = False

    @property
    def env(self) -> str:
        return self.name.upper()


SETTINGS: Final[tuple[Setting, ...]] = (
    Setting("ws_host", _host, "0.0.0.0", "address the WebSocket/HTTP port binds to"),
    Setting("ws_port", _int(1, 65535), 8000, "the WebSocket/HTTP port"),
    Setting("ws_path", _url_path, "/ws", "URL path of the WebSocket endpoint"),
    Setting(
        "jwt_secret",
        _text,
        None,
        "HMAC key for HS* algorithms (at least the hash size: 32 bytes for HS256)",
        default_text="random, generated at start (tokens die with the process)",
        secret=True,
    ),
    Setting("jwt_algorithm", _algorithm, "HS256", f"JWT algorithm, pinned: {'|'.join(ALGORITHMS)}"),
    Setting("jwt_expires_s", _int(1), 3600, "lifetime of tokens made by `aether-fast token`"),
    Setting("jwt_public_key", _pem, None, "PEM public key for RS*/ES*/EdDSA", default_text=""),
    Setting(
        "jwt_public_key_file",
        _path,
        None,
        "file holding the PEM public key (instead of JWT_PUBLIC_KEY)",
        default_text="",
    ),
    Setting(
        "jwt_private_key",
        _pem,
        None,
        "PEM private key, only for `aether-fast token` with RS*/ES*/EdDSA",
        default_text="",
        secret=True,
    ),
    Setting(
        "jwt_private_key_file",
        _path,
        None,
        "file holding the PEM private key (instead of JWT_PRIVATE_KEY)",
        default_text="",
    ),
    Setting("jwt_audience", _text, None, "required `aud` claim, when set", default_text=""),
    Setting("jwt_issuer", _text, None, "required `iss` claim, when set", default_text=""),
    Setting("jwt_leeway_s", _float(0), 0.0, "clock skew allowed on exp/nbf/iat, seconds"),
    Setting(
        "token_refresh_notice_s",
        _float(0),
        60.0,
        "a warning notice is sent this long before a connection's token expires (0 = none)",
    ),
    Setting(
        "rate_limit_connections",
        _int(0),
        100,
        "concurrent connections per user (per IP when anonymous); 0 = no limit",
    ),
    Setting(
        "rate_limit_messages",
        _int(0),
        50,
        "inbound messages and pings per user (per peer address when anonymous), all their"
        " connections on a worker together, per RATE_LIMIT_WINDOW_S; 0 = no limit",
    ),
    Setting(
        "rate_limit_window_s",
        _float(0, exclusive=True),
        60.0,
        "window of RATE_LIMIT_MESSAGES, seconds",
    ),
    Setting(
        "rate_limit_global_messages",
        _int(0),
        0,
        "messages per second for the whole server; 0 = no limit",
    ),
    Setting("enable_metrics", _bool, True, "serve Prometheus /metrics on METRICS_PORT"),
    Setting(
        "metrics_host", _host, None, "address the metrics port binds to", default_text="WS_HOST"
    ),
    Setting("metrics_port", _int(1, 65535), 9090, "the Prometheus metrics port"),
    Setting(
        "max_message_bytes", _int(1, 1 << 30), 65536, "largest inbound WebSocket message, bytes"
    ),
    Setting("max_http_body_bytes", _int(1, 1 << 30), 1048576, "largest HTTP request body, bytes"),
    Setting("max_connections", _int(1), 10000, "open WebSocket connections per worker"),
    Setting(
        "max_pending_connections",
        _int(1),
        4096,
        "sockets not yet upgraded (TLS handshake, HTTP) per worker and port; past it closed",
    ),
    Setting(
        "max_pending_connections_per_peer",
        _int(0),
        512,
        "of those, sockets from one peer address (HTTP; TLS: once its handshake is done); "
        "past it closed; 0 = no per-address share",
    ),
    Setting(
        "max_channels_per_connection",
        _int(1),
        128,
        "channels one connection may be a member of at once (more: CHANNEL_LIMIT)",
    ),
    Setting(
        "max_channels",
        _int(1),
        100000,
        "live channels per worker; a join that would add one more gets CHANNEL_LIMIT",
    ),
    Setting("dedup_ttl_s", _int(0), 300, "how long accepted sequences are remembered, seconds"),
    Setting("channel_auto_create", _bool, True, "create an unknown channel on first join"),
    Setting(
        "channel_default_require_auth",
        _bool,
        True,
        "new channels refuse connections without a token",
    ),
    Setting(
        "channel_default_max_connections",
        _int(0),
        0,
        "members per new channel; 0 = no limit",
    ),
    Setting(
        "channel_default_message_rate_limit",
        _float(0),
        0.0,
        "messages per second into a new channel, all publishers; 0 = no limit",
    ),
    Setting("channel_default_presence", _bool, False, "new channels announce joins and leaves"),
    Setting(
        "history_size", _int(0, 100000), 100, "messages kept per channel for recovery; 0 = none"
    ),
    Setting("history_ttl_s", _int(0), 3600, "how long history is kept, seconds; 0 = no expiry"),
    Setting(
        "channel_state_ttl_s",
        _int(1),
        86400,
        "Redis: a channel's offset, epoch and history expire this long after its last join "
        "or publish (at least HISTORY_TTL_S and DEDUP_TTL_S), seconds",
    ),
    Setting(
        "data_dir",
        _path,
        "./data",
        "directory of the embedded channel store (SQLite), or of the private Redis (redis/)",
    ),
    Setting(
        "allowed_origins",
        _origins,
        (),
        "comma-separated Origins allowed to open a WebSocket; empty or * = any",
        default_text="",
    ),
    Setting(
        "handshake_timeout_s",
        _float(0, exclusive=True),
        5.0,
        "time allowed for the HTTP request/upgrade",
    ),
    Setting(
        "http_keepalive_idle_s",
        _float(0, exclusive=True, hi=86400),
        30.0,
        "an HTTP keep-alive connection idle this long after an answer is closed, seconds",
    ),
    Setting("ping_interval_s", _float(0), 20.0, "server ping interval, seconds; 0 = no pings"),
    Setting(
        "send_buffer_limit_bytes",
        _int(1),
        1048576,
        "bytes per connection that the kernel has not taken (after each write) before it is "
        "closed with 4008; a recovery replay is written as the socket drains, taking at most "
        "half of this",
    ),
    Setting(
        "busy_poll_us",
        _int(0, 100000),
        0,
        "after sending, keep polling without sleeping this long, microseconds; 0 = off",
    ),
    Setting(
        "compression",
        _bool,
        True,
        "accept permessage-deflate (RFC 7692); publications are compressed once per window size",
    ),
    Setting(
        "compression_min_bytes",
        _int(0, 1 << 30),
        512,
        "smallest publication (JSON bytes) compressed for deflate members",
    ),
    Setting("compression_level", _int(0, 9), 1, "zlib level of that compression, 0-9"),
    Setting("shutdown_timeout_s", _float(0), 10.0, "time allowed for a graceful shutdown, seconds"),
    Setting(
        "workers",
        _int(1, 1024),
        1,
        "worker processes sharing the port; >1 without BROKER_URL starts a private redis-server "
        "(on PATH) for them",
    ),
    Setting(
        "broker_url",
        _broker_url,
        None,
        "redis://, rediss:// or unix:// URL of the shared broker, or a comma-separated list "
        "of them (shards: every node must list the same ones), or "
        "redis+cluster:// or rediss+cluster://host:port,host:port (a Redis Cluster's seeds); "
        "unset = in-memory (one worker) or the private redis-server (WORKERS > 1)",
        default_text="",
        secret=True,
    ),
    Setting(
        "private_redis_maxmemory_mb",
        _int(0),
        512,
        "WORKERS > 1 without BROKER_URL: the private redis-server's memory bound, MiB (past it "
        "the state of the channels least recently used is evicted first); 0 = no bound",
    ),
    Setting(
        "node_id",
        _text,
        None,
        "this machine's name in the cluster (status, metrics); default: the host name",
        default_text="host name",
    ),
    Setting("log_level", _log_level, "info", f"{'|'.join(LOG_LEVELS)}"),
    Setting(
        "admin_token",
        _admin_token,
        None,
        "static Bearer token accepted as admin on the REST routes (at least 32 characters)",
        default_text="",
        secret=True,
    ),
    Setting(
        "tls_cert_file",
        _path,
        None,
        "PEM certificate chain: serve wss:// and https://",
        default_text="",
    ),
    Setting("tls_key_file", _path, None, "PEM private key for TLS_CERT_FILE", default_text=""),
    Setting(
        "echo_path",
        _url_path,
        None,
        "URL path of a plain echo WebSocket (conformance tests); unset = off",
        default_text="",
    ),
)

_BY_NAME: Final[dict[str, Setting]] = {s.name: s for s in SETTINGS}


def describe() -> list[tuple[str, str, str]]:
    """(ENV_NAME, default as text, meaning) for every setting, in declaration order."""
    rows: list[tuple[str, str, str]] = []
    for s in SETTINGS:
        if s.default_text is not None:
            default = s.default_text
        elif isinstance(s.default, bool):
            default = "true" if s.default else "false"
        elif isinstance(s.default, float):
            default = f"{s.default:g}"
        else:
            default = str(s.default)
        rows.append((s.env, default, s.doc))
    return rows


def _read_text_file(variable: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as e:
        raise ConfigError(variable, f"cannot read {path!r}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(variable, f"{path!r} is not a UTF-8 text (PEM) file") from None


def _check_readable(variable: str, path: str) -> None:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as e:
        raise ConfigError(variable, f"cannot read {path!r}: {e.strerror or e}") from None


def _check_key(variable: str, algorithm: str, key: str, kind: str) -> None:
    """Load the key now, so a bad key stops start-up instead of failing every token."""
    # A private key must not sit in a setting that check-config prints, and vice versa.
    if kind == "public" and "PRIVATE KEY" in key:
        raise ConfigError(variable, "holds a private key: give the public key")
    if kind == "private" and "PRIVATE KEY" not in key:
        raise ConfigError(variable, "is not a PEM private key")
    alg = jwt.algorithms.get_default_algorithms()[algorithm]
    try:
        prepared = alg.prepare_key(key)
    except (ValueError, TypeError, jwt.exceptions.PyJWTError) as e:
        raise ConfigError(variable, f"not a usable {kind} key for {algorithm}: {e}") from None
    except Exception as e:  # cryptography raises assorted types for malformed PEM
        raise ConfigError(
            variable, f"not a usable {kind} key for {algorithm}: {type(e).__name__}"
        ) from None
    weakness = alg.check_key_length(prepared)
    if weakness:
        raise ConfigError(variable, weakness)


def _hmac_min_bytes(algorithm: str) -> int:
    return int(algorithm[2:]) // 8


def _any_host(host: str) -> bool:
    return host in ("0.0.0.0", "::", "[::]", "*")


def load_config(env: Mapping[str, str], overrides: Mapping[str, object] | None = None) -> Config:
    """Build the Config from `env` (usually os.environ) and CLI `overrides` (field names).

    Empty strings and None count as unset. Raises ConfigError naming the variable at fault.
    """
    raw: dict[str, object] = {}
    for s in SETTINGS:
        text = env.get(s.env)
        if text is not None and text != "":
            raw[s.name] = text
    for name, given in (overrides or {}).items():
        if name not in _BY_NAME:
            raise ConfigError(name.upper(), "unknown setting")
        if given is None or given == "":
            continue
        raw[name] = given

    values: dict[str, object] = {}
    for s in SETTINGS:
        if s.name not in raw:
            values[s.name] = s.default
            continue
        value = raw[s.name]
        try:
            values[s.name] = s.parse(value)
        except ValueError as e:
            shown = "" if s.secret else f", got {value!r}"
            raise ConfigError(s.env, f"{e}{shown}") from None

    algorithm = str(values["jwt_algorithm"])

    # Keys: inline value or file, never both.
    for base in ("jwt_public_key", "jwt_private_key"):
        inline, path = values.pop(base), values.pop(f"{base}_file")
        if inline is not None and path is not None:
            raise ConfigError(base.upper(), f"set {base.upper()} or {base.upper()}_FILE, not both")
        if path is not None:
            values[base] = _pem(_read_text_file(f"{base.upper()}_FILE", str(path)))
        else:
            values[base] = inline

    generated = False
    if algorithm in HMAC_ALGORITHMS:
        secret = values["jwt_secret"]
        need = _hmac_min_bytes(algorithm)
        if secret is None:
            values["jwt_secret"] = secrets.token_urlsafe(max(32, need))
            generated = True
        elif len(str(secret).encode()) < need:
            raise ConfigError(
                "JWT_SECRET",
                f"must be at least {need} bytes for {algorithm} (RFC 7518 section 3.2), "
                f"got {len(str(secret).encode())} bytes",
            )
    else:
        if values["jwt_secret"] is None:
            values["jwt_secret"] = ""
        public = values["jwt_public_key"]
        if public is None:
            raise ConfigError(
                "JWT_PUBLIC_KEY",
                f"required for {algorithm}: set JWT_PUBLIC_KEY or JWT_PUBLIC_KEY_FILE",
            )
        _check_key("JWT_PUBLIC_KEY", algorithm, str(public), "public")
        private = values["jwt_private_key"]
        if private is not None:
            _check_key("JWT_PRIVATE_KEY", algorithm, str(private), "private")
    values["jwt_secret_generated"] = generated

    if values["metrics_host"] is None:
        values["metrics_host"] = values["ws_host"]
    if (
        values["enable_metrics"]
        and values["metrics_port"] == values["ws_port"]
        and (
            values["metrics_host"] == values["ws_host"]
            or _any_host(str(values["metrics_host"]))
            or _any_host(str(values["ws_host"]))
        )
    ):
        raise ConfigError("METRICS_PORT", f"must differ from WS_PORT ({values['ws_port']})")

    workers = values["workers"]
    if generated and (
        values["broker_url"] is not None or (isinstance(workers, int) and workers > 1)
    ):
        # each process would generate its own secret: a token would work on one worker only
        raise ConfigError(
            "JWT_SECRET", "must be set when WORKERS > 1 or BROKER_URL is set (shared by all)"
        )

    cert, cert_key = values["tls_cert_file"], values["tls_key_file"]
    if (cert is None) != (cert_key is None):
        missing = "TLS_KEY_FILE" if cert_key is None else "TLS_CERT_FILE"
        raise ConfigError(missing, "TLS_CERT_FILE and TLS_KEY_FILE must be set together")
    if cert is not None and cert_key is not None:
        _check_readable("TLS_CERT_FILE", str(cert))
        _check_readable("TLS_KEY_FILE", str(cert_key))

    if values["echo_path"] is not None and values["echo_path"] == values["ws_path"]:
        raise ConfigError("ECHO_PATH", "must differ from WS_PATH")

    return Config(**values)  # type: ignore[arg-type]


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        elif userinfo:
            # redis://x@host: some clients read a lone userinfo as the password.
            userinfo = "***"
        netloc = f"{userinfo}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if k.lower() in ("password", "pass", "pwd") else v) for k, v in pairs],
            safe="*",
        )
    if netloc == parts.netloc and query == parts.query:
        return url  # nothing to hide (and urlunsplit would drop the "//" of unix:///path)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _mask_cluster_url(url: str) -> str:
    """A redis+cluster:// URL (one URL naming several hosts) with its credentials hidden."""
    scheme = CLUSTER_TLS_SCHEME if url.startswith(CLUSTER_TLS_SCHEME) else CLUSTER_SCHEME
    rest, mark, query = url[len(scheme) :].partition("?")
    auth, at, hosts = rest.rpartition("@")
    if auth:
        auth = auth.split(":", 1)[0] + ":***" if ":" in auth else "***"
    if query:
        query = _mask_url(f"redis://h?{query}").partition("?")[2]
    return f"{scheme}{auth}{at}{hosts}{mark}{query}"


_SECRET_FIELDS: Final = frozenset({"jwt_secret", "jwt_private_key", "admin_token"})


def masked(config: Config) -> dict[str, object]:
    """Every field, with secrets replaced by "***" (None and "" stay): for check-config."""
    result: dict[str, object] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if value and f.name in _SECRET_FIELDS:
            value = "***"
        elif value and f.name == "broker_url" and str(value).startswith(CLUSTER_SCHEMES):
            value = _mask_cluster_url(str(value))
        elif value and f.name == "broker_url":
            value = ",".join(_mask_url(url) for url in str(value).split(","))
        result[f.name] = value
    return result
