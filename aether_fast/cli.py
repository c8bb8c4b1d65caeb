"""The `aether-fast` command: serve, token, check-config, health, backup, restore.

Rule: the CLI only turns arguments into a Config (flags override the environment) and calls
the composition root (or the channel store, for backup and restore); a bad setting is one
line on stderr naming the variable, exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

import orjson

from aether_fast.brokers.redis_cluster import CHANNELS_HASH
from aether_fast.brokers.redis_slots import STATE_PREFIX
from aether_fast.config import Config, ConfigError, load_config, masked

#: serve's flags -> Config field names
_SERVE_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--host", "ws_host", str, "address to listen on (WS_HOST)"),
    ("--port", "ws_port", int, "port for WebSocket and REST (WS_PORT)"),
    ("--path", "ws_path", str, "WebSocket path (WS_PATH)"),
    ("--metrics-port", "metrics_port", int, "Prometheus port (METRICS_PORT)"),
    ("--data-dir", "data_dir", str, "where the channel store lives (DATA_DIR)"),
    ("--log-level", "log_level", str, "debug|info|warn|error (LOG_LEVEL)"),
    ("--workers", "workers", int, "worker processes (WORKERS)"),
    ("--broker-url", "broker_url", str, "redis://... for more workers/machines (BROKER_URL)"),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aether-fast", description="Real-time messaging server.")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the server")
    for flag, dest, kind, help_text in _SERVE_FLAGS:
        serve.add_argument(flag, dest=dest, type=kind, default=None, help=help_text)
    token = sub.add_parser("token", help="print a development token signed with the configured key")
    token.add_argument("--sub", required=True, help="the user id")
    token.add_argument("--admin", action="store_true", help="add the admin claim")
    token.add_argument("--channels", default=None, help="comma-separated glob patterns (chat.*)")
    token.add_argument("--ttl", type=float, default=None, help="seconds until it expires")
    sub.add_parser("check-config", help="print the effective config, secrets masked")
    health = sub.add_parser(
        "health", help="ask the server configured by the environment for GET /health"
    )
    health.add_argument("--url", default=None, help="the URL to ask instead (http[s]://...)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    health.add_argument(
        "--strict", action="store_true", help="count a degraded server as unhealthy too"
    )
    backup = sub.add_parser("backup", help="copy the SQLite channel store to PATH (online)")
    backup.add_argument("path", help="backup file to write, or an existing directory")
    backup.add_argument("--data-dir", dest="data_dir", default=None, help="(DATA_DIR)")
    restore = sub.add_parser(
        "restore", help="replace the SQLite channel store with a backup (server stopped)"
    )
    restore.add_argument("path", help="a file written by `aether-fast backup`")
    restore.add_argument("--data-dir", dest="data_dir", default=None, help="(DATA_DIR)")
    return p


def _config(overrides: dict[str, object] | None = None) -> Config:
    return load_config(os.environ, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            overrides = {dest: getattr(args, dest) for _, dest, _, _ in _SERVE_FLAGS}
            return _serve(_config(overrides), list(argv if argv is not None else sys.argv[2:]))
        if args.command == "token":
            return _token(_config(), args)
        if args.command == "health":
            return _health(_config(), args)
        if args.command == "backup":
            return _backup(_config({"data_dir": args.data_dir}), args.path)
        if args.command == "restore":
            return _restore(_config({"data_dir": args.data_dir}), args.path)
        config = _config()
        _check_private_redis(config)
        print(orjson.dumps(masked(config), option=orjson.OPT_INDENT_2).decode())
        return 0
    except ConfigError as err:
        print(f"aether-fast: configuration error: {err}", file=sys.stderr)
        return 2


def _check_private_redis(config: Config) -> None:
    """WORKERS > 1 without BROKER_URL needs redis-server on PATH (ConfigError otherwise)."""
    if config.workers > 1 and config.broker_url is None:
        from aether_fast.private_redis import find_binary

        find_binary()


def _token(config: Config, args: argparse.Namespace) -> int:
    from aether_fast.auth import mint_token

    if config.jwt_secret_generated:
        print(
            "aether-fast: JWT_SECRET is not set: a token minted now would not be accepted by a "
            "server (it generates its own secret). Set JWT_SECRET for both.",
            file=sys.stderr,
        )
        return 2
    channels = [c.strip() for c in args.channels.split(",") if c.strip()] if args.channels else None
    try:
        print(mint_token(config, args.sub, admin=args.admin, channels=channels, ttl_s=args.ttl))
    except ValueError as err:
        print(f"aether-fast: {err}", file=sys.stderr)
        return 2
    return 0


def _serve(config: Config, argv: list[str]) -> int:
    import uvloop
    from redis.exceptions import RedisError

    from aether_fast import logs
    from aether_fast.app import serve
    from aether_fast.stores.base import StoreError
    from aether_fast.workers import is_worker, supervise

    logs.setup_logging(config.log_level)
    if config.jwt_secret_generated:
        logs.log(
            "warn",
            "jwt_secret_generated",
            "config",
            reason="JWT_SECRET is not set; a random secret was generated for this process, so "
            "tokens from `aether-fast token` will not be accepted. Set JWT_SECRET.",
        )
    if config.workers > 1 and not is_worker():
        _check_private_redis(config)
        return supervise(config, argv[1:] if argv[:1] == ["serve"] else argv)
    try:
        return uvloop.run(serve(config))
    except StoreError as err:
        print(f"aether-fast: DATA_DIR: {err}", file=sys.stderr)
        return 2
    except RedisError as err:
        print(f"aether-fast: BROKER_URL: cannot use Redis: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"aether-fast: cannot listen: {err}", file=sys.stderr)
        return 2


def _health(config: Config, args: argparse.Namespace) -> int:
    """Exit 0 when the server answers `GET /health` with healthy (or degraded, unless
    --strict), 1 otherwise: the container HEALTHCHECK. Degraded (Redis unreachable) counts
    as alive by default because restarting the worker would not bring Redis back."""
    url = args.url
    context: ssl.SSLContext | None = None
    if url is None:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(config.ws_host, config.ws_host)
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if config.tls_cert_file else "http"
        url = f"{scheme}://{host}:{config.ws_port}/health"
    if url.startswith("https:"):
        # a liveness probe of our own process: the certificate names the public host
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=args.timeout, context=context) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read()
    except (OSError, ValueError) as err:
        print(f"aether-fast: health: {url}: {err}", file=sys.stderr)
        return 1
    text = body.decode("utf-8", "replace").strip()
    print(text)
    try:
        state = orjson.loads(body).get("status")
    except (orjson.JSONDecodeError, AttributeError):
        state = None
    if status == 200 and state == "healthy":
        return 0
    if state == "degraded" and not args.strict:
        return 0
    return 1


def _not_sqlite(config: Config) -> str | None:
    """Why backup/restore do not apply to this config (the channel configs live in Redis)."""
    if config.broker_url:
        key = (STATE_PREFIX + "channels") if config.broker_cluster else CHANNELS_HASH
        where = f"with BROKER_URL set the channel configs live in Redis (hash {key})"
    elif config.workers > 1:
        where = (
            "with WORKERS > 1 and no BROKER_URL the channel configs live in the private Redis "
            "(its AOF in DATA_DIR/redis)"
        )
    else:
        return None
    return (
        f"covers the SQLite channel store only; {where}: back up Redis instead "
        "(docs/operations.md §16)"
    )


def _backup(config: Config, path: str) -> int:
    """Copy DATA_DIR's channel store to `path` with SQLite's online backup: safe while a
    server runs. Written to a temporary file beside `path`, then renamed over it."""
    from aether_fast.stores.base import StoreError
    from aether_fast.stores.sqlite import DB_FILE, ChannelStore

    note = _not_sqlite(config)
    if note is not None:
        print(f"aether-fast: backup {note}", file=sys.stderr)
        return 2
    source = os.path.join(config.data_dir, DB_FILE)
    if not os.path.isfile(source):
        print(f"aether-fast: DATA_DIR: {source}: no channel store to back up", file=sys.stderr)
        return 2
    if os.path.isdir(path):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        path = os.path.join(path, f"channels-{stamp}.sqlite3")
    tmp = f"{path}.tmp-{os.getpid()}"
    store = ChannelStore(config.data_dir)
    try:
        store.open()
        count = len(store.list())
        store.backup(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(os.path.dirname(os.path.abspath(path)))
    except (StoreError, OSError) as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        print(f"aether-fast: backup failed: {err}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(f"backed up {_channels(count)} to {path}")
    return 0


def _restore(config: Config, path: str) -> int:
    """Replace DATA_DIR's channel store with the backup at `path`.

    Refused while a server uses DATA_DIR (it holds DATA_DIR's lock); a bad backup is refused
    before anything is touched. The store being replaced, if it held any channel, is kept
    beside it (`channels.sqlite3.pre-restore-<time>`), or moved aside (`….broken-<time>`) when it
    cannot even be opened (the recovery case: corrupt file).
    """
    from aether_fast.stores.base import StoreError, StoreLocked
    from aether_fast.stores.sqlite import DB_FILE, ChannelStore, DataDirLock, read_backup

    note = _not_sqlite(config)
    if note is not None:
        print(f"aether-fast: restore {note}", file=sys.stderr)
        return 2
    try:
        read_backup(path)  # refuse a bad backup before touching anything
    except StoreError as err:
        print(f"aether-fast: restore: {err}", file=sys.stderr)
        return 2
    live = os.path.join(config.data_dir, DB_FILE)
    if os.path.exists(live) and os.path.realpath(live) == os.path.realpath(path):
        print(f"aether-fast: restore: {path}: is the live database itself", file=sys.stderr)
        return 2
    lock = DataDirLock(config.data_dir)
    store = ChannelStore(config.data_dir, lock=lock)
    try:
        try:
            os.makedirs(config.data_dir, exist_ok=True)
        except OSError as err:
            raise StoreError(f"{config.data_dir}: cannot create data directory: {err}") from None
        lock.acquire(exclusive=True)
        existed = os.path.isfile(live)
        try:
            store.open()
        except StoreError as err:
            if not existed:
                raise
            aside = _move_aside(live, "broken")
            _note(f"the current store could not be opened ({err}); moved to {aside}")
            store.open()
        else:
            if existed and store.list():
                kept = _aside_name(live, "pre-restore")
                store.backup(kept)
                _note(f"the replaced store was saved to {kept}")
        store.restore(path)
        count = len(store.list())
    except StoreLocked as err:
        print(f"aether-fast: restore refused: {err}", file=sys.stderr)
        return 2
    except (StoreError, OSError) as err:
        print(f"aether-fast: restore failed: {err}", file=sys.stderr)
        return 2
    finally:
        store.close()
        lock.release()
    print(f"restored {_channels(count)} from {path} into {live}")
    return 0


def _note(text: str) -> None:
    print(f"aether-fast: {text}", file=sys.stderr, flush=True)


def _channels(n: int) -> str:
    return f"{n} channel" if n == 1 else f"{n} channels"


def _aside_name(path: str, tag: str) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name, n = f"{path}.{tag}-{stamp}", 1
    while os.path.exists(name):
        n += 1
        name = f"{path}.{tag}-{stamp}.{n}"
    return name


def _move_aside(path: str, tag: str) -> str:
    """Rename a database and its -wal/-shm files together; returns the new name."""
    aside = _aside_name(path, tag)
    for suffix in ("-wal", "-shm", ""):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, aside + suffix)
    return aside


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
