"""The servers under test for bench/run.py: aether-fast and the peers of bench/peers/.

`SERVERS` says how to start each one on a port, whether it can run here (and why not) and
its version (`deflate`: the load generator offers permessage-deflate to it; `only`: the
scenarios it takes part in, when not every one); `start_server` starts one pinned to
`SERVER_CPU` (`taskset -c 0`) and waits for its listener; `pinned` is the same pinning for
the load generator (`LOADGEN_CPU`). Every process the runner starts (servers and load
generators) is kept in `STARTED` until it is stopped, and `stop_started` ends those still
running, each by its PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS = BENCH / "peers"

SECRET = "bench-secret-bench-secret-bench-secret-0123456789"
SERVER_CPU = 0
LOADGEN_CPU = 1

Json = dict[str, Any]


@dataclass(slots=True)
class ServerSpec:
    """One server under test: how to start it on a port, and whether it can run here."""

    name: str
    description: str
    command: Callable[[int], list[str]]
    check: Callable[[], str | None]  # None: available; else the reason it is not
    env: Callable[[int, Path], dict[str, str]] = field(default=lambda port, tmp: {})
    ready_frames: int = 0  # data frames a connection gets before it is joined (aether: 1)
    version: Callable[[], str] = field(default=lambda: "")
    deflate: bool = False  # the load generator offers permessage-deflate (a compression row)
    only: tuple[str, ...] = ()  # the scenarios it takes part in, when not every one


def dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def pyproject_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    return found.group(1) if found else "?"


def _import_check(*modules: str) -> str | None:
    code = "; ".join(f"import {m}" for m in modules)
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return f"importing {', '.join(modules)} timed out"
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        return f"cannot import {', '.join(modules)}: {lines[-1] if lines else 'failed'}"
    return None


def _node_check() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed (apt-get install nodejs npm)"
    if not (PEERS / "node_modules" / "ws" / "package.json").exists():
        return "bench/peers/node_modules/ws is missing: run `npm install --prefix bench/peers`"
    return None


def node_version() -> str:
    node = shutil.which("node")
    if node is None:
        return ""
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    ws = PEERS / "node_modules" / "ws" / "package.json"
    ws_version = json.loads(ws.read_text())["version"] if ws.exists() else "missing"
    return f"node {out.stdout.strip()}, ws {ws_version}"


def _aether_env(port: int, tmp: Path) -> dict[str, str]:
    return {
        "PYTHONPATH": str(ROOT),
        "WS_HOST": "127.0.0.1",
        "WS_PORT": str(port),
        "METRICS_PORT": str(free_port()),
        "DATA_DIR": str(tmp / f"data-{port}"),
        "JWT_SECRET": SECRET,
        "RATE_LIMIT_MESSAGES": "0",
        "RATE_LIMIT_CONNECTIONS": "0",
        "MAX_CONNECTIONS": "19000",
        # docs/operations.md §15, "Busy polling"; BUSY_POLL_US=0 in the environment compares
        "BUSY_POLL_US": os.environ.get("BUSY_POLL_US", "100"),
        "LOG_LEVEL": "info",
    }


def _py(script: str, *args: str) -> Callable[[int], list[str]]:
    return lambda port: [sys.executable, str(PEERS / script), str(port), *args]


#: the settings of aether-fast's permessage-deflate (docs/operations.md) in its deflate row
AETHER_DEFLATE_ENV = {"COMPRESSION": "1"}


def _aether_deflate_env(port: int, tmp: Path) -> dict[str, str]:
    return {**_aether_env(port, tmp), **AETHER_DEFLATE_ENV}


def _aether_deflate_check() -> str | None:
    """None when this aether-fast has permessage-deflate (its Config has `compression`)."""
    reason = _import_check("aether_fast._core", "aether_fast.app")
    if reason is not None:
        return reason
    code = (
        "import dataclasses, sys; from aether_fast.config import Config; "
        "sys.exit(0 if 'compression' in {f.name for f in dataclasses.fields(Config)} else 3)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, cwd=ROOT)
    if done.returncode != 0:
        return "this aether-fast has no permessage-deflate (no COMPRESSION setting)"
    return None


#: the scenarios of the permessage-deflate comparison (bench/scenarios.py)
DEFLATE_ONLY = ("fanout-deflate", "connections-deflate")


SERVERS: tuple[ServerSpec, ...] = (
    ServerSpec(
        name="aether-fast",
        description="python -m aether_fast serve: JWT per connection, validation, offsets, "
        "history (HISTORY_SIZE=100), metrics on; RATE_LIMIT_MESSAGES=0, "
        "RATE_LIMIT_CONNECTIONS=0, MAX_CONNECTIONS=19000, BUSY_POLL_US=100",
        command=lambda port: [sys.executable, "-m", "aether_fast", "serve"],
        check=lambda: _import_check("aether_fast._core", "aether_fast.app"),
        env=_aether_env,
        ready_frames=1,
        version=lambda: "aether-fast " + pyproject_version(),
    ),
    ServerSpec(
        name="write-floor",
        description="bare picows: pre-built frames, one joined write per member per loop pass",
        command=_py("write_floor.py"),
        check=lambda: _import_check("picows", "uvloop"),
        version=lambda: f"picows {dist_version('picows')}",
    ),
    ServerSpec(
        name="picows",
        description="picows + orjson, WSTransport.send per member",
        command=_py("picows_app.py"),
        check=lambda: _import_check("picows", "uvloop", "orjson"),
        version=lambda: f"picows {dist_version('picows')}",
    ),
    ServerSpec(
        name="websockets",
        description="websockets (asyncio API) + orjson, websockets.broadcast()",
        command=_py("websockets_app.py"),
        check=lambda: _import_check("websockets.asyncio.server", "uvloop", "orjson"),
        version=lambda: f"websockets {dist_version('websockets')}",
    ),
    ServerSpec(
        name="aiohttp",
        description="aiohttp WebSocketResponse + orjson, send_str per member",
        command=_py("aiohttp_app.py"),
        check=lambda: _import_check("aiohttp", "uvloop", "orjson"),
        version=lambda: f"aiohttp {dist_version('aiohttp')}",
    ),
    ServerSpec(
        name="socketify",
        description="socketify (uWebSockets) + orjson, uWS pub/sub app.publish()",
        command=_py("socketify_app.py"),
        check=lambda: _import_check("socketify", "orjson"),
        version=lambda: f"socketify {dist_version('socketify')}",
    ),
    ServerSpec(
        name="aether-fast-deflate",
        description="aether-fast as above with permessage-deflate on "
        + ", ".join(f"{k}={v}" for k, v in AETHER_DEFLATE_ENV.items())
        + ": a publication compressed once for every member that negotiated it",
        command=lambda port: [sys.executable, "-m", "aether_fast", "serve"],
        check=_aether_deflate_check,
        env=_aether_deflate_env,
        ready_frames=1,
        version=lambda: "aether-fast " + pyproject_version(),
        deflate=True,
        only=DEFLATE_ONLY,
    ),
    ServerSpec(
        name="socketify-deflate",
        description="socketify as above with CompressOptions.SHARED_COMPRESSOR and "
        "app.publish(compress=True): uWS compresses a publication once per subscriber",
        command=_py("socketify_app.py", "--compress"),
        check=lambda: _import_check("socketify", "orjson"),
        version=lambda: f"socketify {dist_version('socketify')}",
        deflate=True,
        only=DEFLATE_ONLY,
    ),
    ServerSpec(
        name="node-ws",
        description="Node.js ws + JSON.parse/stringify, send per open member",
        command=lambda port: ["node", str(PEERS / "ws_app.js"), str(port)],
        check=_node_check,
        version=node_version,
    ),
)


def available_servers(only: set[str] | None) -> tuple[list[ServerSpec], dict[str, Json]]:
    """The servers of `only` (all when None) that can run here, and for each of them whether
    it is available (else why not), its description and its version (the report's `servers`)."""
    usable = []
    info: dict[str, Json] = {}
    for spec in SERVERS:
        if only is not None and spec.name not in only:
            continue
        reason = spec.check()
        info[spec.name] = {
            "available": reason is None,
            "reason": reason,
            "description": spec.description,
            "version": spec.version() if reason is None else "",
            "deflate": spec.deflate,
            "only": list(spec.only),
        }
        if reason is None:
            usable.append(spec)
    return usable, info


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpu: int, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv]


def start_server(spec: ServerSpec, tmp: Path) -> ServerProcess:
    """Start `spec` on a free port; a port taken meanwhile is retried on another one."""
    for attempt in range(3):
        try:
            return ServerProcess(spec, tmp, listen_timeout=30 if attempt == 2 else 10)
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class ServerProcess:
    """A started server. `stop()` ends it by its PID (SIGTERM, then SIGKILL)."""

    def __init__(self, spec: ServerSpec, tmp: Path, listen_timeout: float = 30) -> None:
        self.spec = spec
        self.port = free_port()
        self.log_path = tmp / f"{spec.name}-{self.port}.log"
        env = {**os.environ, **spec.env(self.port, tmp)}
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            pinned(SERVER_CPU, spec.command(self.port)),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        STARTED.add(self.proc)
        deadline = time.monotonic() + listen_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{spec.name} exited with {self.proc.returncode}: {self.tail()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                break
            if time.monotonic() > deadline:
                tail = self.tail()
                self.stop()
                raise RuntimeError(f"{spec.name}: no listener after {listen_timeout:.0f} s: {tail}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def tail(self, lines: int = 5) -> str:
        if not self._log.closed:
            self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        STARTED.discard(self.proc)
        self._log.close()


#: the processes this runner started and has not stopped yet: servers and load generators
STARTED: set[subprocess.Popen[bytes]] = set()


def stop_started() -> None:
    """End every process this runner started and that still runs (by PID)."""
    for proc in list(STARTED):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        STARTED.discard(proc)
