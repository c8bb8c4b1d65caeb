"""Operations: the metrics deploy/ names exist in a real scrape; backup, wipe and restore of the
channel store; the health command; `make load`; `make dev-watch`; the debug build switch of
`make dev-debug`; and the Dockerfile's build steps run in a fresh venv."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aether_fast.config import SETTINGS, load_config
from aether_fast.stores.base import parse_channel_config
from aether_fast.stores.sqlite import DB_FILE, ChannelStore, DataDirLock, read_backup
from tests.conftest import ROOT, SECRET, Server
from tests.deploy import referenced_metrics, scraped_names
from tests.dockerfile import Ignore, context_files, parse
from tests.integration.helpers import wait_for
from tests.integration.wsclient import Client
from tools.common import free_port

VENV = Path(sys.executable).parent.parent


def clean_env(**env: str) -> dict[str, str]:
    """The caller's environment without any aether-fast setting, plus `env`."""
    names = {s.env for s in SETTINGS}
    base = {k: v for k, v in os.environ.items() if k not in names and k != "PYTHONPATH"}
    return {**base, **env}


def cli(args: list[str], timeout: float = 30, /, **env: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "aether_fast", *args],
            env=clean_env(PYTHONPATH=str(ROOT), **env),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"aether-fast {args} did not exit within {timeout}s") from exc


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def scrape(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body.decode()


# -- deploy/: every metric the alerts and the dashboard use is served -------------------------


def test_every_metric_in_deploy_exists_in_a_real_scrape(
    make_server: Callable[..., Server],
) -> None:
    srv = make_server()
    # some traffic, so that the scrape is not only of zero-valued families
    client = Client(srv.ws_url, token=srv.token("alice"), client_id="ops-1", channel="ops")
    client.recv_until("connection", "connect")
    client.send("not json")
    client.recv_until("error")
    code, text, _ = srv.http("GET", "/metrics", port=srv.metrics_port)
    client.ws.close()
    assert code == 200
    served = scraped_names(text)
    uses = referenced_metrics()
    assert len(uses) >= 8, uses
    missing = {name: sorted(where) for name, where in uses.items() if name not in served}
    assert not missing, f"deploy/ uses metrics the server does not export: {missing}"
    # and the labels the rules aggregate by are on the samples
    for label in ("node", "worker", "code"):
        assert re.search(rf'\baether_\w+{{[^}}]*\b{label}="', text), label


# -- backup and restore -------------------------------------------------------------------


NEWS = {
    "name": "news",
    "max_connections": 1,
    "message_rate_limit": 2.5,
    "require_auth": False,
    "history_size": 7,
    "presence": True,
}
CHAT = {
    "name": "chat.room1",
    "max_connections": 50,
    "message_rate_limit": 0,
    "require_auth": True,
    "history_size": 0,
    "presence": False,
}


def channel_configs(srv: Server) -> dict[str, dict[str, Any]]:
    code, body, _ = srv.http("GET", "/ws/channels", token=srv.admin())
    assert code == 200, body
    keys = set(NEWS)
    return {c["name"]: {k: c[k] for k in keys} for c in body["channels"] if c["configured"]}


def test_backup_wipe_restore_brings_channels_and_limits_back(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    srv = make_server()
    for body in (NEWS, CHAT):
        code, answer, _ = srv.http("POST", "/ws/channels", body, token=srv.admin())
        assert code == 201, answer
    data = str(srv.data_dir)

    # online: the server keeps running while the backup is taken
    backups = tmp_path / "backups"
    backups.mkdir()
    out = cli(["backup", str(backups)], DATA_DIR=data)
    assert out.returncode == 0, out.stderr
    (backup,) = backups.iterdir()
    assert re.fullmatch(r"channels-\d{8}T\d{6}Z\.sqlite3", backup.name), backup.name
    assert "backed up 2 channels" in out.stdout and str(backup) in out.stdout
    assert srv.http("GET", "/health")[0] == 200

    # a restore under the running server is refused and changes nothing
    out = cli(["restore", str(backup)], DATA_DIR=data)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "stop the server first" in out.stderr and "Traceback" not in out.stderr
    assert channel_configs(srv) == {"news": NEWS, "chat.room1": CHAT}

    # wipe: the store is gone and a server started now has no channels
    assert srv.stop() == 0
    shutil.rmtree(srv.data_dir)
    srv.start()
    assert channel_configs(srv) == {}
    assert srv.stop() == 0

    out = cli(["restore", str(backup)], DATA_DIR=data)
    assert out.returncode == 0, out.stderr
    assert f"restored 2 channels from {backup}" in out.stdout
    srv.start()
    assert channel_configs(srv) == {"news": NEWS, "chat.room1": CHAT}

    # the limits are enforced again: news takes one member and needs no token
    first = Client(srv.ws_url, client_id="reader-1", channel="news")
    assert first.recv()["data"]["channel"] == "news"
    second = Client(srv.ws_url, client_id="reader-2", channel="news")
    refused = second.recv_until("error")
    assert refused["code"] == "CHANNEL_FULL", refused
    first.ws.close()
    second.ws.close()


def test_restore_keeps_the_replaced_store_and_refuses_bad_backups(tmp_path: Path) -> None:
    data = tmp_path / "data"
    seed = tmp_path / "seed"
    config = load_config({"JWT_SECRET": SECRET})
    store = ChannelStore(str(seed))
    store.open()
    store.put(parse_channel_config(NEWS, config))
    store.close()
    backup = tmp_path / "b.sqlite3"
    assert cli(["backup", str(backup)], DATA_DIR=str(seed)).returncode == 0

    store = ChannelStore(str(data))
    store.open()
    store.put(parse_channel_config(CHAT, config))
    store.close()

    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"not a backup" * 100)
    for bad in (garbage, tmp_path / "missing.sqlite3", data / DB_FILE):
        out = cli(["restore", str(bad)], DATA_DIR=str(data))
        assert out.returncode == 2, (bad, out.stdout, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and str(bad) in out.stderr, out.stderr
    assert sorted(p.name for p in data.iterdir() if "pre-restore" in p.name) == []

    out = cli(["restore", str(backup)], DATA_DIR=str(data))
    assert out.returncode == 0, out.stderr
    (kept,) = [p for p in data.iterdir() if ".pre-restore-" in p.name]
    assert str(kept) in out.stderr
    assert [c.name for c in read_backup(str(kept))] == ["chat.room1"]
    assert [c.name for c in read_backup(str(data / DB_FILE))] == ["news"]


def test_restore_recovers_from_a_corrupt_store(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    srv = make_server()
    assert srv.http("POST", "/ws/channels", NEWS, token=srv.admin())[0] == 201
    backup = tmp_path / "news.sqlite3"
    assert cli(["backup", str(backup)], DATA_DIR=str(srv.data_dir)).returncode == 0
    assert srv.stop() == 0

    db = srv.data_dir / DB_FILE
    db.write_bytes(b"\xa5" * 8192)  # the disk ate it
    for name in (DB_FILE + "-wal", DB_FILE + "-shm"):
        (srv.data_dir / name).unlink(missing_ok=True)
    refused = cli(["serve"], DATA_DIR=str(srv.data_dir), JWT_SECRET=SECRET, **_ports())
    assert refused.returncode == 2 and "restore it from a backup" in refused.stderr

    out = cli(["restore", str(backup)], DATA_DIR=str(srv.data_dir))
    assert out.returncode == 0, out.stderr
    (broken,) = [p for p in srv.data_dir.iterdir() if ".broken-" in p.name]
    assert broken.read_bytes() == b"\xa5" * 8192, "the damaged file is kept for inspection"
    assert "moved to" in out.stderr and str(broken) in out.stderr
    srv.start()
    assert channel_configs(srv) == {"news": NEWS}


def _ports() -> dict[str, str]:
    return {"WS_HOST": "127.0.0.1", "WS_PORT": str(free_port()), "METRICS_PORT": str(free_port())}


def test_a_server_does_not_start_during_a_restore(tmp_path: Path) -> None:
    lock = DataDirLock(str(tmp_path))
    lock.acquire(exclusive=True)  # what `aether-fast restore` holds while it runs
    try:
        out = cli(["serve"], DATA_DIR=str(tmp_path), JWT_SECRET=SECRET, **_ports())
    finally:
        lock.release()
    assert out.returncode == 2, out.stdout[-500:] + out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("aether-fast: DATA_DIR:") and "aether-fast restore" in line, line


@pytest.mark.parametrize("command", ["backup", "restore"])
def test_backup_and_restore_say_redis_is_not_theirs(command: str, tmp_path: Path) -> None:
    out = cli(
        [command, str(tmp_path / "x.sqlite3")],
        DATA_DIR=str(tmp_path / "data"),
        BROKER_URL="redis://127.0.0.1:1/0",
        JWT_SECRET=SECRET,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "SQLite channel store only" in line and "aether:channels" in line, line
    assert not (tmp_path / "data").exists() and not (tmp_path / "x.sqlite3").exists()


def test_backup_without_a_store_exits_2(tmp_path: Path) -> None:
    out = cli(["backup", str(tmp_path / "b.sqlite3")], DATA_DIR=str(tmp_path / "none"))
    assert out.returncode == 2
    assert "no channel store to back up" in out.stderr
    assert not (tmp_path / "none").exists(), "a backup must not create an empty store"


# -- the health command (the container's HEALTHCHECK) ------------------------------------------


def test_health_command_against_a_real_server(make_server: Callable[..., Server]) -> None:
    srv = make_server()
    env = {"WS_HOST": "0.0.0.0", "WS_PORT": str(srv.port), "JWT_SECRET": SECRET}
    out = cli(["health"], **env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"status": "healthy"}
    assert srv.stop() == 0
    out = cli(["health", "--timeout", "1"], **env)
    assert out.returncode == 1
    assert "health" in out.stderr and str(srv.port) in out.stderr


class _Canned(http.server.BaseHTTPRequestHandler):
    answers: dict[str, tuple[int, bytes]] = {}

    def do_GET(self) -> None:
        status, body = self.answers[self.path]
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def canned() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    _Canned.answers = {
        "/degraded": (503, b'{"status":"degraded","reason":"broker_unavailable"}'),
        "/down": (503, b'{"status":"down","reason":"shutting_down"}'),
        "/odd": (200, b"<html>not us</html>"),
    }
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.parametrize(
    ("path", "flags", "code"),
    [
        ("/degraded", [], 0),  # alive: a restart would not bring Redis back
        ("/degraded", ["--strict"], 1),
        ("/down", [], 1),
        ("/odd", [], 1),
    ],
)
def test_health_command_states(canned: str, path: str, flags: list[str], code: int) -> None:
    out = cli(["health", "--url", canned + path, *flags], JWT_SECRET=SECRET)
    assert out.returncode == code, (out.stdout, out.stderr)


# -- make load ----------------------------------------------------------------------------


def make(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", "--no-print-directory", f"VENV={VENV}", *args],
        cwd=ROOT,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_make_load_runs_a_bounded_load_and_stops(make_server: Callable[..., Server]) -> None:
    srv = make_server()
    started = time.monotonic()
    out = make(
        "load",
        f"URL=127.0.0.1:{srv.port}",
        "LOAD_ARGS=--connections 60 --duration 2 --channels 3 --rate 2 --json",
        JWT_SECRET=SECRET,
    )
    took = time.monotonic() - started
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True, summary
    assert summary["connections"] == {"requested": 60, "opened": 60}
    sent = summary["messages"]["sent"]
    assert sent >= 60 * 2 and summary["messages"]["acked"] == sent
    # 60 connections over 3 channels: each message reaches the 19 other members
    assert summary["deliveries"]["received"] == summary["deliveries"]["expected"] == sent * 19
    assert summary["ack_latency_ms"]["p99"] is not None
    assert took < 2 + 10 + 5 + 10, took
    text = scrape(srv.metrics_port)
    received = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("aether_messages_received_total")
    )
    assert received >= sent


def test_load_reports_failure(make_server: Callable[..., Server]) -> None:
    srv = make_server()  # channels need a token, and the run has none
    out = subprocess.run(
        [
            *(sys.executable, "-m", "tools.load"),
            *("--url", f"127.0.0.1:{srv.port}", "--connections", "5", "--duration", "1", "--json"),
        ],
        env=clean_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    summary = json.loads(out.stdout)
    assert summary["ok"] is False and summary["connections"]["opened"] == 0
    assert summary["connect_failures"] == {"refused: AUTH_REQUIRED": 5}
    assert "JWT_SECRET is not set" in out.stderr


# -- make dev-watch -------------------------------------------------------------------------


def worker_label(port: int) -> str | None:
    try:
        text = scrape(port)
    except OSError:
        return None
    found = re.search(r'^aether_up\{[^}]*worker="([^"]+)"', text, re.M)
    return found.group(1) if found else None


def test_dev_watch_restarts_the_server_on_a_source_change(
    tmp_path: Path, procs: list[subprocess.Popen[Any]]
) -> None:
    watched = tmp_path / "src"
    watched.mkdir()
    ports = _ports()
    metrics = int(ports["METRICS_PORT"])
    env = clean_env(PYTHONPATH=str(ROOT), JWT_SECRET=SECRET, DATA_DIR=str(tmp_path / "d"))
    watcher = subprocess.Popen(
        # --no-build: the work tree's extension is shared with other running servers
        [sys.executable, str(ROOT / "tools" / "dev_watch.py"), "--no-build", str(watched)],
        env={**env, **ports},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(watcher)
    first = wait_for(lambda: worker_label(metrics), timeout=60)
    (watched / "notes.txt").write_text("not a source file")
    time.sleep(1.0)
    assert worker_label(metrics) == first, "restarted for a file that is not a source"
    (watched / "module.py").write_text("x = 1\n")
    second = wait_for(lambda: (w := worker_label(metrics)) != first and w, timeout=30)
    assert second and second != first
    watcher.send_signal(signal.SIGTERM)
    assert watcher.wait(30) == 0
    assert not listening(int(ports["WS_PORT"])), "the server outlived its watcher"
    assert watcher.stderr is not None
    err = watcher.stderr.read()
    watcher.stderr.close()
    assert "changed" in err and "module.py" in err and "notes.txt" not in err, err
    assert err.count("server started") == 2, err


# -- make dev-debug: the debug build switch ----------------------------------------------------


def test_dev_debug_target_sets_debug_build_and_asyncio_debug() -> None:
    out = make("-n", "dev-debug")
    assert out.returncode == 0, out.stderr
    build, serve = [line for line in out.stdout.splitlines() if not line.startswith("echo")]
    assert build.startswith("AETHER_DEBUG_BUILD=1 ") and "build_ext --inplace" in build
    assert "PYTHONASYNCIODEBUG=1" in serve and "aether-fast serve" in serve


@pytest.mark.slow
def test_debug_build_switch_rebuilds_both_ways(tmp_path: Path) -> None:
    """setup.py regenerates and recompiles when AETHER_DEBUG_BUILD changes, although no
    source changed (Cython and setuptools compare timestamps only)."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "ext", tmp_path / "ext", ignore=shutil.ignore_patterns("*.c", "*.html"))
    shutil.copytree(
        ROOT / "aether_fast",
        tmp_path / "aether_fast",
        ignore=shutil.ignore_patterns("*.so", "__pycache__"),
    )
    core_c = tmp_path / "ext" / "core.c"

    def setup(*args: str, debug: bool) -> None:
        env = clean_env(PYTHONWARNINGS="ignore")
        if debug:
            env["AETHER_DEBUG_BUILD"] = "1"
        out = subprocess.run(
            [sys.executable, "setup.py", "-q", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]

    setup("--version", debug=False)  # a release C file (setup.py cythonizes on every run)
    assert "__Pyx_TraceLine(" not in core_c.read_text()
    release_mtime = core_c.stat().st_mtime_ns
    setup("build_ext", "--inplace", debug=True)
    assert core_c.stat().st_mtime_ns != release_mtime
    assert "__Pyx_TraceLine(" in core_c.read_text(), "the debug build did not regenerate"
    assert (tmp_path / "build" / "aether-build-mode").read_text().strip() == "debug"
    (so,) = (tmp_path / "aether_fast").glob("_core*.so")
    probe = subprocess.run(
        [sys.executable, "-c", "import aether_fast._core as c; print(c.__file__)"],
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probe.returncode == 0 and probe.stdout.strip() == str(so), probe.stderr
    setup("--version", debug=False)  # and back
    assert "__Pyx_TraceLine(" not in core_c.read_text()
    assert (tmp_path / "build" / "aether-build-mode").read_text().strip() == "release"


# -- the Dockerfile's build, without Docker ---------------------------------------------------


@pytest.mark.slow
def test_dockerfile_build_steps_in_a_fresh_venv(
    tmp_path: Path, procs: list[subprocess.Popen[Any]]
) -> None:
    """The build stage's COPY and RUN steps on the .dockerignore'd context, with a fresh
    venv standing in for the image's Python; then the runtime stage's ENV, ENTRYPOINT, CMD,
    HEALTHCHECK and STOPSIGNAL against the environment it built."""
    docker = parse((ROOT / "Dockerfile").read_text())
    build, runtime = docker.stage("build"), docker.stages[-1]
    files = context_files(ROOT, Ignore((ROOT / ".dockerignore").read_text()))

    workdir = build.last("WORKDIR")
    assert workdir is not None
    src = tmp_path / "image" / workdir.args.lstrip("/")
    src.mkdir(parents=True)
    for copy in build.all("COPY"):
        *sources, dest = copy.words()
        target = src / dest
        for source in sources:
            matched = [f for f in files if f == source.rstrip("/") or f.startswith(source)]
            assert matched, f"COPY {source}: nothing in the build context"
            for f in matched:
                rel = f[len(source) :] if source.endswith("/") else Path(f).name
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / f, target / rel)
    assert not list(src.rglob("*.so")) and not list(src.rglob("*.c"))

    python = tmp_path / "python"  # the image's interpreter: python with pip, nothing else
    subprocess.run([sys.executable, "-m", "venv", str(python)], check=True, timeout=120)
    venv = tmp_path / "opt-aether"
    build_env = clean_env(**{**build.env(), "VIRTUAL_ENV": str(venv)})
    build_env["PATH"] = f"{python / 'bin'}:{build_env['PATH']}"
    for run in build.all("RUN"):
        out = subprocess.run(
            ["/bin/sh", "-c", run.args],
            cwd=src,
            env=build_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, f"RUN {run.args}\n{out.stdout[-3000:]}{out.stderr[-3000:]}"

    runtime_env = clean_env(
        **{
            **runtime.env(),
            "VIRTUAL_ENV": str(venv),
            "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
            "DATA_DIR": str(tmp_path / "data"),
        }
    )
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import aether_fast._core as c; print(c.__file__)"],
        cwd=tmp_path,
        env=runtime_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(venv)), where.stdout  # not the work tree's

    entry, cmd = runtime.last("ENTRYPOINT"), runtime.last("CMD")
    assert entry is not None and cmd is not None
    entry_form, cmd_form = entry.exec_form, cmd.exec_form
    assert entry_form and cmd_form
    entrypoint = [str(venv / "bin" / entry_form[0]), *entry_form[1:]]
    out = subprocess.run(
        [*entrypoint, "check-config"], env=runtime_env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    assert (config["ws_host"], config["ws_port"], config["metrics_port"]) == ("0.0.0.0", 8000, 9090)
    assert config["data_dir"] == str(tmp_path / "data")

    ports = _ports()
    serve_env = {**runtime_env, **ports, "JWT_SECRET": SECRET}
    server = subprocess.Popen(
        [*entrypoint, *cmd_form],
        env=serve_env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    procs.append(server)
    wait_for(lambda: listening(int(ports["WS_PORT"])) or server.poll() is not None, timeout=30)
    assert server.poll() is None, "the image's server did not start"

    check = runtime.last("HEALTHCHECK")
    assert check is not None and check.exec_form is not None
    probe_cmd = [str(venv / "bin" / check.exec_form[0]), *check.exec_form[1:]]
    probe = subprocess.run(probe_cmd, env=serve_env, capture_output=True, text=True, timeout=30)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert json.loads(probe.stdout)["status"] == "healthy"
    # the wheel carries the JS client, copied in by the build from its one source
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['WS_PORT']}/client.js", timeout=10) as r:
        assert r.read() == (ROOT / "clients" / "js" / "aether-client.js").read_bytes()
    packaged = list(venv.rglob("aether_fast/static/aether-client.js"))
    assert len(packaged) == 1, packaged

    stop = runtime.last("STOPSIGNAL")
    assert stop is not None
    server.send_signal(signal.Signals[stop.args])
    assert server.wait(30) == 0
    probe = subprocess.run(probe_cmd, env=serve_env, capture_output=True, text=True, timeout=30)
    assert probe.returncode == 1, "unhealthy once stopped"
