"""The `aether-fast` command: check-config, bad settings, token, and start-up failures."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.conftest import ROOT, SECRET, Server
from tests.integration.wsclient import Client
from tools.common import free_port, wait_listening

ADMIN_TOKEN = "static-admin-token-do-not-print-0123456789"
REDIS_PASSWORD = "redis-password-do-not-print"


def cli_env(tmp: Path, **env: str) -> dict[str, str]:
    """A clean environment for the CLI: none of the caller's AETHER settings leak in."""
    from aether_fast.config import SETTINGS

    base = {k: v for k, v in os.environ.items() if k not in {s.env for s in SETTINGS}}
    return {
        **base,
        "PYTHONPATH": str(ROOT),
        "WS_HOST": "127.0.0.1",
        "WS_PORT": str(free_port()),
        "METRICS_PORT": str(free_port()),
        "DATA_DIR": str(tmp / "data"),
        **env,
    }


def run(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "aether_fast", *args],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"`aether-fast {' '.join(args)}` did not exit within {timeout}s: {exc.stdout!r}"
        ) from None


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {text!r}"
    return lines[0]


# -- check-config -----------------------------------------------------------------------------


def test_check_config_prints_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    env = cli_env(
        tmp_path,
        JWT_SECRET=SECRET,
        ADMIN_TOKEN=ADMIN_TOKEN,
        WS_PORT="8123",
        RATE_LIMIT_MESSAGES="7",
        ENABLE_METRICS="false",
        BROKER_URL=f"redis://user:{REDIS_PASSWORD}@localhost:6379/0",
    )
    out = run(["check-config"], env, tmp_path)
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    assert config["ws_port"] == 8123
    assert config["rate_limit_messages"] == 7
    assert config["enable_metrics"] is False
    assert config["ws_host"] == "127.0.0.1"
    assert config["ws_path"] == "/ws"  # a default
    assert config["jwt_algorithm"] == "HS256"
    assert config["jwt_secret"] == "***"
    assert config["admin_token"] == "***"
    both = out.stdout + out.stderr
    for secret in (SECRET, ADMIN_TOKEN, REDIS_PASSWORD):
        assert secret not in both, f"secret printed: {secret}"
    assert "localhost:6379" in config["broker_url"]


def test_check_config_without_secret_prints_no_generated_secret(tmp_path: Path) -> None:
    out = run(["check-config"], cli_env(tmp_path), tmp_path)
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    assert config["jwt_secret"] == "***"  # secrets print as "***", set or generated
    assert config["ws_port"] > 0


BAD_VALUES = [
    ({"WS_PORT": "abc"}, "WS_PORT"),
    ({"WS_PORT": "70000"}, "WS_PORT"),
    ({"RATE_LIMIT_MESSAGES": "-1"}, "RATE_LIMIT_MESSAGES"),
    ({"ENABLE_METRICS": "maybe"}, "ENABLE_METRICS"),
    ({"JWT_ALGORITHM": "none"}, "JWT_ALGORITHM"),
    ({"JWT_ALGORITHM": "HS1"}, "JWT_ALGORITHM"),
    ({"WORKERS": "0"}, "WORKERS"),
    ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
    ({"SHUTDOWN_TIMEOUT_S": "soon"}, "SHUTDOWN_TIMEOUT_S"),
    ({"JWT_SECRET": "tiny-secret-XYZ"}, "JWT_SECRET"),
    ({"ADMIN_TOKEN": "tiny-secret-XYZ"}, "ADMIN_TOKEN"),
]


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize(
    ("bad", "variable"), BAD_VALUES, ids=[f"{v}={next(iter(b.values()))}" for b, v in BAD_VALUES]
)
def test_bad_setting_exits_2_naming_the_variable(
    tmp_path: Path, command: str, bad: dict[str, str], variable: str
) -> None:
    env = cli_env(tmp_path, **{"JWT_SECRET": SECRET, **bad})
    out = run([command], env, tmp_path, timeout=15)
    assert out.returncode == 2, (out.returncode, out.stdout[-1000:], out.stderr)
    line = one_line(out.stderr)
    assert variable in line, line
    assert "Traceback" not in out.stderr + out.stdout
    assert "tiny-secret-XYZ" not in out.stdout + out.stderr  # a secret is never echoed
    if command == "check-config":
        assert out.stdout.strip() == "", "config printed despite the error"


def wait_serving(p: subprocess.Popen[str], port: int) -> None:
    """Returns once `serve` listens on `port`; fails with its output if it exits first."""
    wait_listening(p, port, 15, lambda: str(p.communicate()) if p.poll() is not None else "")


def test_serve_flags_override_the_environment(
    tmp_path: Path, procs: list[subprocess.Popen[Any]]
) -> None:
    env = cli_env(tmp_path, JWT_SECRET=SECRET)
    env_port, flag_port = int(env["WS_PORT"]), free_port()
    p = spawn_serve(env, tmp_path, procs, "--port", str(flag_port))
    wait_serving(p, flag_port)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", env_port), timeout=0.5).close()
    p.send_signal(signal.SIGTERM)
    code, _, err = finish(p)
    assert code == 0, err


def test_bad_serve_flag_exits_2(tmp_path: Path) -> None:
    out = run(["serve", "--port", "0"], cli_env(tmp_path, JWT_SECRET=SECRET), tmp_path, timeout=15)
    assert out.returncode == 2, (out.returncode, out.stderr)
    line = one_line(out.stderr)
    assert line.startswith("aether-fast: configuration error: WS_PORT: "), line
    assert "Traceback" not in out.stderr


# -- token ------------------------------------------------------------------------------------


def test_token_is_accepted_by_the_server(server: Server, tmp_path: Path) -> None:
    env = cli_env(tmp_path, JWT_SECRET=SECRET)
    out = run(
        ["token", "--sub", "alice", "--admin", "--channels", "chat.*", "--ttl", "60"], env, tmp_path
    )
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token.count(".") == 2 and "\n" not in token, out.stdout

    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["admin"] is True
    assert claims["channels"] == ["chat.*"]
    assert abs(claims["exp"] - time.time() - 60) < 10, claims

    with Client(server.ws_url, token=token, channel="chat.lobby") as c:
        hello = c.recv_until("connection", "connect")
        assert hello["data"]["user_id"] == "alice" and hello["data"]["channel"] == "chat.lobby"
        c.join("other.room")  # outside the channels claim
        err = c.recv_until("error")
        assert err["code"] == "FORBIDDEN", err
    code, body, _ = server.http("GET", "/ws/channels", token=token)  # the admin claim works
    assert code == 200, body


def test_token_defaults_to_a_non_admin_any_channel_token(server: Server, tmp_path: Path) -> None:
    out = run(["token", "--sub", "bob"], cli_env(tmp_path, JWT_SECRET=SECRET), tmp_path)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "bob" and not claims.get("admin") and "channels" not in claims
    assert claims["exp"] > time.time() + 60
    code, _, _ = server.http("GET", "/ws/channels", token=token)
    assert code == 403
    with Client(server.ws_url, token=token, channel="any.room") as c:
        assert c.recv_until("connection", "connect")["data"]["user_id"] == "bob"


def test_token_without_secret_refuses(tmp_path: Path) -> None:
    out = run(["token", "--sub", "alice"], cli_env(tmp_path), tmp_path)
    assert out.returncode != 0
    assert out.stdout.strip() == "", "a token was printed anyway"
    assert "JWT_SECRET" in out.stderr
    assert "accept" in out.stderr.lower(), out.stderr
    assert "Traceback" not in out.stderr


# -- serve ------------------------------------------------------------------------------------


def test_serve_without_secret_warns_and_serves(make_server: Callable[..., Server]) -> None:
    srv = make_server(JWT_SECRET="")  # empty counts as unset
    code, body, _ = srv.http("GET", "/health")
    assert code == 200 and body["status"] == "healthy"
    warnings = [
        line
        for line in srv.log_lines()
        if line.get("level") == "warn" and "JWT_SECRET" in json.dumps(line)
    ]
    assert warnings, srv.log_text()
    # tokens signed with another secret are refused, the server keeps going
    with Client(srv.ws_url, token=srv.token("alice"), channel="room") as c:
        err = c.recv_until("error")
        assert err["code"] == "AUTH_INVALID", err
        assert c.closed_with() == 4001
    code, body, _ = srv.http("GET", "/ws/status")
    assert code == 200


def spawn_serve(
    env: dict[str, str], cwd: Path, procs: list[subprocess.Popen[Any]], *flags: str
) -> subprocess.Popen[str]:
    """`aether-fast serve` with `flags`, its output piped; stopped at teardown by `procs`."""
    p = subprocess.Popen(
        [sys.executable, "-m", "aether_fast", "serve", *flags],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(p)
    return p


def finish(p: subprocess.Popen[str], timeout: float = 15) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(
            f"serve did not exit within {timeout}s: {out[-1000:]} {err[-1000:]}"
        ) from None
    return p.returncode, out, err


def test_corrupt_store_exits_2_naming_data_dir(
    tmp_path: Path, procs: list[subprocess.Popen[Any]]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "channels.sqlite3").write_bytes(b"this is not an sqlite database\x00\xff" * 200)
    p = spawn_serve(cli_env(tmp_path, JWT_SECRET=SECRET), tmp_path, procs)
    code, out, err = finish(p)
    assert code == 2, (code, out[-1000:], err)
    line = one_line(err)
    assert "DATA_DIR" in line, line
    assert f"DATA_DIR: {data / 'channels.sqlite3'}: corrupt" in line, line
    assert "Traceback" not in out + err


def test_data_dir_that_is_a_file_exits_2(
    tmp_path: Path, procs: list[subprocess.Popen[Any]]
) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("a file, not a directory")
    p = spawn_serve(cli_env(tmp_path, JWT_SECRET=SECRET), tmp_path, procs)
    code, out, err = finish(p)
    assert code == 2, (code, out[-1000:], err)
    assert "DATA_DIR" in one_line(err)
    assert "Traceback" not in out + err


@pytest.mark.parametrize("variable", ["WS_PORT", "METRICS_PORT"])
def test_port_in_use_exits_cleanly(
    tmp_path: Path, procs: list[subprocess.Popen[Any]], variable: str
) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        env = cli_env(tmp_path, JWT_SECRET=SECRET, **{variable: str(port)})
        p = spawn_serve(env, tmp_path, procs)
        code, out, err = finish(p)
    assert code != 0, (code, out[-1000:], err)
    line = one_line(err)
    # the one line says why (it does not name the port: see the report of issue 13)
    assert line.startswith("aether-fast: cannot listen: ") and "in use" in line, line
    assert "Traceback" not in out + err


def test_second_server_on_the_same_port_is_refused(
    server: Server, tmp_path: Path, procs: list[subprocess.Popen[Any]]
) -> None:
    """Starting a second, independent server on a port that one already serves must fail,
    not silently share the port (its clients would not see each other's messages)."""
    env = cli_env(tmp_path, JWT_SECRET=SECRET, WS_PORT=str(server.port))
    p = spawn_serve(env, tmp_path, procs)
    try:
        code, out, err = finish(p, timeout=5)
    except AssertionError as exc:
        raise AssertionError(
            f"a second server started on port {server.port} in use: {exc}"
        ) from None
    assert code != 0, (code, out[-1000:], err)
    assert "Traceback" not in out + err
    one_line(err)


def test_serve_exits_0_on_sigterm(tmp_path: Path, procs: list[subprocess.Popen[Any]]) -> None:
    env = cli_env(tmp_path, JWT_SECRET=SECRET)
    p = spawn_serve(env, tmp_path, procs)
    wait_serving(p, int(env["WS_PORT"]))
    p.send_signal(signal.SIGTERM)
    code, out, err = finish(p)
    assert code == 0, (out[-1000:], err)
    assert err.strip() == "", err
    events = [json.loads(line)["event"] for line in out.splitlines() if line.strip()]
    assert "server_started" in events, events
