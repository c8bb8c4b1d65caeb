"""The `aether-fast` command: serve, token, check-config.

Rule: the CLI only turns arguments into a Config (flags override the environment) and calls
the composition root; a bad setting is one line on stderr naming the variable, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import orjson

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
        print(orjson.dumps(masked(_config()), option=orjson.OPT_INDENT_2).decode())
        return 0
    except ConfigError as err:
        print(f"aether-fast: configuration error: {err}", file=sys.stderr)
        return 2


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
    from aether_fast.store import StoreError
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
