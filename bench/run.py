"""The benchmark runner: aether-fast and its peers under one C load generator.

    python bench/run.py            # full: every scenario, 3 runs (make bench)
    python bench/run.py --quick    # the same scenarios, 1 run, shorter (make bench-quick)
    python bench/run.py --smoke    # every scenario tiny, for CI (make bench-smoke)

Each server runs pinned to CPU 0 (`taskset -c 0`), the load generator (bench/loadgen.c) to
CPU 1, and this runner stays on CPU 1 too. Scenarios (see docs/performance.md):

- fanout: 1 publisher, S subscribers on one channel, W messages in flight: deliveries/s until
  every subscriber has every message, and any loss;
- latency: 1000 subscribers, fixed publish rates: publish-to-receive p50/p99/max;
- rtt: 1 and 50 connections, each publishing and waiting for its own message (echo=1);
- connections: server RSS per idle connection at 5000 and 15000, and connections set up/s.

Results go to bench/results/: <timestamp>.json (everything, with machine, CPU model, commit and
versions), latest.md (the tables: median of the runs with min-max) and PNG charts. Only the
processes this runner started are stopped, each by its PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS = BENCH / "peers"
LOADGEN_SRC = BENCH / "loadgen.c"
LOADGEN = BENCH / "build" / "loadgen"
RESULTS = BENCH / "results"

SECRET = "bench-secret-bench-secret-bench-secret-0123456789"
SERVER_CPU = 0
LOADGEN_CPU = 1
#: source addresses 127.0.0.2 .. 127.0.0.(1 + SRC_IPS): past the ephemeral-port limit
SRC_IPS = 8
#: the load generator counts as the bottleneck from this CPU share of its core on
LOADGEN_BOUND = 0.90
DASH = "\u2013"  # an en dash: "no value" in tables
OWN_SERVERS = ("aether-fast", "write-floor")
#: a cell is marked noisy when something else used more than this share of a CPU meanwhile
NOISY = 0.15

Json = dict[str, Any]


# ---------------------------------------------------------------------------- profiles


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    runs: int
    fanout_subs: tuple[int, ...]
    windows: tuple[int, ...]
    fanout_deliveries: int  # per window: messages = deliveries / S, within the bounds below
    fanout_messages: tuple[int, int]
    fanout_duration: float  # the publisher stops sending after this many seconds
    latency_subs: int
    rates: tuple[int, ...]
    latency_duration: float
    rtt_conns: tuple[int, ...]
    rtt_duration: float
    conn_counts: tuple[int, ...]
    grace: float
    settle: float
    micro: tuple[str, ...]
    warmup: float = 0.1  # warm-up messages before the fan-out windows, as a share of M
    noisy_retries: int = 1  # an invocation during which something else used a CPU is rerun

    def messages_for(self, subs: int) -> int:
        lo, hi = self.fanout_messages
        return max(lo, min(hi, self.fanout_deliveries // subs))


PROFILES: dict[str, Profile] = {
    "full": Profile(
        name="full",
        runs=3,
        fanout_subs=(100, 1000, 5000),
        windows=(16, 64),
        fanout_deliveries=4_000_000,
        fanout_messages=(200, 40_000),
        fanout_duration=8.0,
        latency_subs=1000,
        rates=(50, 200),
        latency_duration=10.0,
        rtt_conns=(1, 50),
        rtt_duration=5.0,
        conn_counts=(5000, 15000),
        grace=8.0,
        settle=1.0,
        micro=("--benchmark-min-rounds=20", "--benchmark-max-time=1.0"),
    ),
    "quick": Profile(
        name="quick",
        runs=1,
        fanout_subs=(100, 1000, 5000),
        windows=(16, 64),
        fanout_deliveries=600_000,
        fanout_messages=(100, 6_000),
        fanout_duration=0.5,
        latency_subs=1000,
        rates=(50, 200),
        latency_duration=0.5,
        rtt_conns=(1, 50),
        rtt_duration=0.5,
        conn_counts=(5000, 15000),
        grace=3.0,
        settle=0.3,
        micro=("--benchmark-min-rounds=5", "--benchmark-max-time=0.1"),
        warmup=0.0,
    ),
    "smoke": Profile(
        name="smoke",
        runs=1,
        fanout_subs=(20,),
        windows=(4, 16),
        fanout_deliveries=400,
        fanout_messages=(20, 20),
        fanout_duration=2.0,
        latency_subs=20,
        rates=(50, 200),
        latency_duration=0.2,
        rtt_conns=(1, 5),
        rtt_duration=0.2,
        conn_counts=(50,),
        grace=3.0,
        settle=0.2,
        micro=("--benchmark-disable",),
        warmup=0.0,
        noisy_retries=0,
    ),
}

SCENARIOS = ("fanout", "latency", "rtt", "connections")


# ---------------------------------------------------------------------------- servers


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


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


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


def _node_version() -> str:
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


def _py(script: str) -> Callable[[int], list[str]]:
    return lambda port: [sys.executable, str(PEERS / script), str(port)]


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
        version=lambda: "aether-fast " + _pyproject_version(),
    ),
    ServerSpec(
        name="write-floor",
        description="bare picows: pre-built frames, one joined write per member per loop pass",
        command=_py("write_floor.py"),
        check=lambda: _import_check("picows", "uvloop"),
        version=lambda: f"picows {_dist_version('picows')}",
    ),
    ServerSpec(
        name="picows",
        description="picows + orjson, WSTransport.send per member",
        command=_py("picows_app.py"),
        check=lambda: _import_check("picows", "uvloop", "orjson"),
        version=lambda: f"picows {_dist_version('picows')}",
    ),
    ServerSpec(
        name="websockets",
        description="websockets (asyncio API) + orjson, websockets.broadcast()",
        command=_py("websockets_app.py"),
        check=lambda: _import_check("websockets.asyncio.server", "uvloop", "orjson"),
        version=lambda: f"websockets {_dist_version('websockets')}",
    ),
    ServerSpec(
        name="aiohttp",
        description="aiohttp WebSocketResponse + orjson, send_str per member",
        command=_py("aiohttp_app.py"),
        check=lambda: _import_check("aiohttp", "uvloop", "orjson"),
        version=lambda: f"aiohttp {_dist_version('aiohttp')}",
    ),
    ServerSpec(
        name="socketify",
        description="socketify (uWebSockets) + orjson, uWS pub/sub app.publish()",
        command=_py("socketify_app.py"),
        check=lambda: _import_check("socketify", "orjson"),
        version=lambda: f"socketify {_dist_version('socketify')}",
    ),
    ServerSpec(
        name="node-ws",
        description="Node.js ws + JSON.parse/stringify, send per open member",
        command=lambda port: ["node", str(PEERS / "ws_app.js"), str(port)],
        check=_node_check,
        version=_node_version,
    ),
)


def _pyproject_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    return found.group(1) if found else "?"


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
        _STARTED.add(self.proc)
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
        _STARTED.discard(self.proc)
        self._log.close()


_STARTED: set[subprocess.Popen[bytes]] = set()


def _stop_started() -> None:
    """End every process this runner started and that still runs (by PID)."""
    for proc in list(_STARTED):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        _STARTED.discard(proc)


# ---------------------------------------------------------------------------- load generator


def build_loadgen() -> Path:
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= LOADGEN_SRC.stat().st_mtime:
        return LOADGEN
    LOADGEN.parent.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "gcc")
    subprocess.run(
        [cc, "-O2", "-Wall", "-Wextra", "-o", str(LOADGEN), str(LOADGEN_SRC)], check=True
    )
    return LOADGEN


class LoadgenError(RuntimeError):
    pass


def loadgen_args(mode: str, port: int, urls: Path, server: ServerProcess, **opts: Any) -> list[str]:
    argv = [
        str(LOADGEN),
        mode,
        "--port",
        str(port),
        "--urls",
        str(urls),
        "--src-ips",
        str(SRC_IPS),
        "--server-pid",
        str(server.pid),
        "--ready-frames",
        str(server.spec.ready_frames),
    ]
    for key, value in opts.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return pinned(LOADGEN_CPU, argv)


def run_loadgen(argv: list[str], timeout: float) -> Json:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _STARTED.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise LoadgenError(f"loadgen did not finish within {timeout:.0f} s") from None
    finally:
        _STARTED.discard(proc)
    if proc.returncode != 0:
        raise LoadgenError(f"loadgen exited {proc.returncode}: {err.decode().strip()[-300:]}")
    try:
        result: Json = json.loads(out.decode().splitlines()[0])
    except (IndexError, ValueError):
        raise LoadgenError(f"loadgen printed no JSON: {out.decode()[:300]}") from None
    return result


def _noise(result: Json) -> float:
    """The most CPU something else used on either CPU during a phase of `result`."""
    worst = 0.0
    for ph in result.get("phases", []):
        if float(ph["seconds"]) < 0.25 or float(ph.get("cpu0_busy", -1)) < 0:
            continue
        if float(ph["server_cpu_util"]) < 0:
            continue
        worst = max(
            worst,
            float(ph["cpu0_busy"]) - float(ph["server_cpu_util"]),
            float(ph["cpu1_busy"]) - float(ph["loadgen_cpu_util"]),
        )
    return worst


def run_loadgen_clean(argv: list[str], timeout: float, retries: int) -> Json:
    """`run_loadgen`, rerun up to `retries` times while other work disturbed it; the least
    disturbed result is kept (each is marked noisy in the report if it still was)."""
    best = run_loadgen(argv, timeout)
    for _ in range(retries):
        if _noise(best) <= NOISY:
            break
        _say(f"    noisy ({_noise(best):.0%} of a CPU used by something else): once more")
        again = run_loadgen(argv, timeout)
        if _noise(again) < _noise(best):
            best = again
    return best


def _read_line(fd: int, timeout: float) -> str:
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise LoadgenError("loadgen printed nothing in time")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
    return buf.decode()


# ---------------------------------------------------------------------------- URL files


class Urls:
    """URL-line files for the load generator: one line per connection, each with its own
    JWT (sub unique per line and per file), client_id and channel. Peers ignore the extras."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._n = 0
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from aether_fast.auth import mint_token
        from aether_fast.config import load_config

        self._config = load_config({"JWT_SECRET": SECRET})
        self._mint = mint_token

    def make(self, count: int, channel: str | None = None, *, echo: bool = False) -> Path:
        self._n += 1
        tag = f"b{os.getpid()}x{self._n}"
        path = self.tmp / f"urls-{tag}.txt"
        lines = []
        for i in range(count):
            token = self._mint(self._config, f"{tag}-{i}", ttl_s=6 * 3600)
            ch = channel if channel is not None else f"{tag}-{i}"
            line = f"/ws?token={token}&client_id={tag}-c{i}&channel={ch}"
            lines.append(line + ("&echo=1" if echo else ""))
        path.write_text("\n".join(lines) + "\n")
        return path


# ---------------------------------------------------------------------------- scenarios


@dataclass(slots=True)
class Sample:
    server: str
    run: int
    scenario: str
    case: str
    metrics: dict[str, float | int | bool | None]
    raw: Json | None = None
    error: str | None = None

    def to_json(self) -> Json:
        return {
            "server": self.server,
            "run": self.run,
            "scenario": self.scenario,
            "case": self.case,
            "metrics": self.metrics,
            "error": self.error,
            "loadgen": self.raw,
        }


def _phase_common(ph: Json) -> dict[str, float | int | bool | None]:
    util = float(ph["loadgen_cpu_util"])
    frames = int(ph["rx_frames"])
    # the server's CPU time comes from /proc in clock ticks (10 ms): meaningless for a short phase
    long_enough = float(ph["seconds"]) >= 0.25
    server_util = float(ph["server_cpu_util"]) if long_enough else None
    # what else ran on the two CPUs meanwhile (other processes, interrupts not charged to ours)
    other: float | None = None
    if long_enough and server_util is not None and float(ph.get("cpu0_busy", -1)) >= 0:
        other = max(float(ph["cpu0_busy"]) - server_util, float(ph["cpu1_busy"]) - util, 0.0)
    return {
        "other_cpu": round(other, 3) if other is not None else None,
        "noisy": other is not None and other > NOISY,
        "loadgen_cpu_util": round(util, 3),
        "server_cpu_util": round(server_util, 3) if server_util is not None else None,
        "loadgen_bound": util >= LOADGEN_BOUND,
        "lost": int(ph["lost"]),
        "timed_out": bool(ph["timed_out"]),
        "frames_per_read": round(frames / max(1, int(ph["rx_reads"])), 2),
        "bytes_per_frame": round(int(ph["rx_bytes"]) / max(1, frames), 1),
        "disconnected": int(ph["disconnected"]),
    }


def _check_connected(result: Json, need: int) -> str | None:
    if result["connected"] < need:
        return f"only {result['connected']} of {need} connected: {result['error']}"
    if not result["phases"]:
        return f"no phase ran: {result['error']}"
    return None


def scenario_fanout(
    server: ServerProcess, urls: dict[str, Path], profile: Profile, run: int
) -> list[Sample]:
    samples = []
    for subs in profile.fanout_subs:
        messages = profile.messages_for(subs)
        argv = loadgen_args(
            "fanout",
            server.port,
            urls[f"fanout-{subs}"],
            server,
            subs=subs,
            messages=messages,
            windows=profile.windows,
            duration=profile.fanout_duration,
            grace=profile.grace,
            warmup=max(10, int(messages * profile.warmup)) if profile.warmup > 0 else 0,
            timeout=120,
        )
        cases = [f"S={subs} W={w}" for w in profile.windows]
        try:
            result = run_loadgen_clean(argv, 200, profile.noisy_retries)
        except LoadgenError as e:
            samples += [Sample(server.spec.name, run, "fanout", c, {}, None, str(e)) for c in cases]
            continue
        problem = _check_connected(result, subs + 1)
        by_window = {ph["window"]: ph for ph in result["phases"]}
        for w, case in zip(profile.windows, cases, strict=True):
            ph = by_window.get(w)
            if ph is None:
                samples.append(
                    Sample(server.spec.name, run, "fanout", case, {}, result, problem or "no data")
                )
                continue
            metrics = {
                "deliveries_per_s": round(float(ph["deliveries_per_s"]), 1),
                "deliveries": int(ph["deliveries"]),
                "messages": int(ph["messages"]),
                "seconds": round(float(ph["seconds"]), 4),
                **_phase_common(ph),
            }
            samples.append(Sample(server.spec.name, run, "fanout", case, metrics, ph, problem))
    return samples


def scenario_latency(
    server: ServerProcess, urls: dict[str, Path], profile: Profile, run: int
) -> list[Sample]:
    argv = loadgen_args(
        "latency",
        server.port,
        urls["latency"],
        server,
        subs=profile.latency_subs,
        rates=profile.rates,
        duration=profile.latency_duration,
        grace=profile.grace,
        timeout=120,
    )
    cases = [f"{r}/s" for r in profile.rates]
    try:
        result = run_loadgen_clean(argv, 200, profile.noisy_retries)
    except LoadgenError as e:
        return [Sample(server.spec.name, run, "latency", c, {}, None, str(e)) for c in cases]
    problem = _check_connected(result, profile.latency_subs + 1)
    by_rate = {ph["rate"]: ph for ph in result["phases"]}
    samples = []
    for rate, case in zip(profile.rates, cases, strict=True):
        ph = by_rate.get(rate)
        if ph is None:
            samples.append(Sample(server.spec.name, run, "latency", case, {}, result, problem))
            continue
        metrics = {
            "p50_ms": round(float(ph["p50_us"]) / 1e3, 3),
            "p90_ms": round(float(ph["p90_us"]) / 1e3, 3),
            "p99_ms": round(float(ph["p99_us"]) / 1e3, 3),
            "max_ms": round(float(ph["max_us"]) / 1e3, 3),
            "deliveries": int(ph["deliveries"]),
            "send_lag_max_ms": round(float(ph["send_lag_max_us"]) / 1e3, 3),
            # the same samples timed at their arrival in the socket (kernel timestamp): what
            # the load generator's own read backlog adds is the difference
            "arrival_p50_ms": round(float(ph["arrival_p50_us"]) / 1e3, 3),
            "arrival_p99_ms": round(float(ph["arrival_p99_us"]) / 1e3, 3),
            **_phase_common(ph),
        }
        samples.append(Sample(server.spec.name, run, "latency", case, metrics, ph, problem))
    return samples


def scenario_rtt(
    server: ServerProcess, urls: dict[str, Path], profile: Profile, run: int
) -> list[Sample]:
    argv = loadgen_args(
        "rtt",
        server.port,
        urls["rtt"],
        server,
        conns=profile.rtt_conns,
        duration=profile.rtt_duration,
        grace=profile.grace,
        timeout=120,
    )
    cases = [f"C={c}" for c in profile.rtt_conns]
    try:
        result = run_loadgen_clean(argv, 200, profile.noisy_retries)
    except LoadgenError as e:
        return [Sample(server.spec.name, run, "rtt", c, {}, None, str(e)) for c in cases]
    problem = _check_connected(result, max(profile.rtt_conns))
    by_conns = {ph["conns"]: ph for ph in result["phases"]}
    samples = []
    for conns, case in zip(profile.rtt_conns, cases, strict=True):
        ph = by_conns.get(conns)
        if ph is None:
            samples.append(Sample(server.spec.name, run, "rtt", case, {}, result, problem))
            continue
        if not problem and int(ph["round_trips"]) == 0:
            problem = "no round trip completed (is echo to the sender supported?)"
        metrics = {
            "round_trips_per_s": round(float(ph["round_trips_per_s"]), 1),
            "round_trips": int(ph["round_trips"]),
            "p50_us": round(float(ph["p50_us"]), 1),
            "p99_us": round(float(ph["p99_us"]), 1),
            **_phase_common(ph),
        }
        samples.append(Sample(server.spec.name, run, "rtt", case, metrics, ph, problem))
    return samples


class Holder:
    """A load generator in `connect` mode holding its connections until stdin closes."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        _STARTED.add(self.proc)

    def opened(self, timeout: float) -> Json:
        assert self.proc.stdout is not None
        line = _read_line(self.proc.stdout.fileno(), timeout).splitlines()
        if not line:
            raise LoadgenError(f"loadgen exited {self.proc.poll()} before connecting")
        result: Json = json.loads(line[0])
        return result

    def release(self) -> Json:
        """Close stdin (the load generator closes its connections and exits); its last line."""
        out = b""
        try:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=60)  # it prints a few lines: no pipe fills up
            out = self.proc.stdout.read()
        finally:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            _STARTED.discard(self.proc)
        lines = [json.loads(ln) for ln in out.decode().splitlines() if ln.strip()]
        return lines[-1] if lines else {}


def scenario_connections(
    spec: ServerSpec, tmp: Path, urls: dict[str, Path], profile: Profile, run: int
) -> list[Sample]:
    """One fresh server, warmed with 100 connections (then closed); its RSS is the baseline.
    Idle connections are then added step by step (each joined to one channel, each with its
    own JWT) up to every count of the profile, and the RSS taken at each: KiB per connection
    is (RSS - baseline) / connections. The connections/s of a step is that of the
    connections it added (a later step opens its own on top of those already held)."""
    samples: list[Sample] = []
    cases = [f"N={n}" for n in profile.conn_counts]
    try:
        server = start_server(spec, tmp)
    except RuntimeError as e:
        return [Sample(spec.name, run, "connections", c, {}, None, str(e)) for c in cases]
    holders: list[tuple[Holder, int]] = []
    try:
        run_loadgen(
            loadgen_args("connect", server.port, urls["warm"], server, conns=100, hold=0), 120
        )
        time.sleep(profile.settle)
        rss0 = server.rss_kib()
        total = 0
        for count, case in zip(profile.conn_counts, cases, strict=True):
            add = count - total
            holder = Holder(
                loadgen_args(
                    "connect",
                    server.port,
                    urls[f"conn-{count}"],
                    server,
                    conns=add,
                    hold=180,
                    concurrency=256,
                    timeout=120,
                    connect_timeout=90,
                )
            )
            holders.append((holder, add))
            first = holder.opened(150)
            connected = int(first["connected"])
            total += connected
            time.sleep(profile.settle)
            rss = server.rss_kib()
            problem = None
            if connected < add:
                problem = f"only {connected} of {add} connected: {first['error']}"
            if not server.alive():
                problem = f"server died: {server.tail()}"
            metrics: dict[str, float | int | bool | None] = {
                "kib_per_conn": round((rss - rss0) / max(1, total), 2),
                "connections_per_s": round(float(first["connections_per_s"]), 1),
                "connect_seconds": round(float(first["connect_seconds"]), 3),
                "connected": total,
                "added": connected,
                "rss_before_kib": rss0,
                "rss_after_kib": rss,
            }
            samples.append(Sample(spec.name, run, "connections", case, metrics, first, problem))
            _say(f"    {case}: {total} connections held")
            if problem:
                break
    except (LoadgenError, ValueError, KeyError, OSError, subprocess.TimeoutExpired) as e:
        done = {s.case for s in samples}
        samples += [
            Sample(spec.name, run, "connections", c, {}, None, repr(e))
            for c in cases
            if c not in done
        ]
    finally:
        closed_while_idle = 0
        for holder, _ in holders:
            held = holder.release()
            closed_while_idle += int(held.get("disconnected", 0))
        if closed_while_idle:
            for sample in samples:
                sample.error = (sample.error or "") + f" {closed_while_idle} closed while idle"
        server.stop()
    return samples


# ---------------------------------------------------------------------------- machine facts


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    """The checked-out commit, read from .git (no git process is run)."""
    git = ROOT / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        ref_file = git / ref
        if ref_file.exists():
            return ref_file.read_text().strip()
        packed = git / "packed-refs"
        if packed.exists():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
    except (OSError, IndexError):
        return None
    return None


def machine_info() -> Json:
    mem = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = line.split(":", 1)[1].strip()
    cc = os.environ.get("CC", "gcc")
    cc_version = ""
    if shutil.which(cc):
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        cc_version = out.stdout.splitlines()[0] if out.stdout else ""
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "kernel": platform.release(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "memory": mem,
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "compiler": cc_version,
        "server_cpu": SERVER_CPU,
        "loadgen_cpu": LOADGEN_CPU,
    }


def cpu_busy(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over `seconds` (other work on the machine skews the results)."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return idle, sum(fields)

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return -1.0
    total = total1 - total0
    return round(1.0 - (idle1 - idle0) / total, 3) if total > 0 else -1.0


def package_versions() -> dict[str, str]:
    names = (
        "picows",
        "uvloop",
        "orjson",
        "httptools",
        "PyJWT",
        "Cython",
        "websockets",
        "aiohttp",
        "socketify",
        "matplotlib",
        "pytest-benchmark",
    )
    versions = {name: _dist_version(name) for name in names}
    versions["aether-fast"] = _pyproject_version()
    node = _node_version()
    if node:
        versions["node"] = node
    return versions


def parsebench() -> Json:
    out = subprocess.run(
        pinned(LOADGEN_CPU, [str(LOADGEN), "parsebench"]), capture_output=True, timeout=60
    )
    result: Json = json.loads(out.stdout.decode().splitlines()[0])
    return result


# ---------------------------------------------------------------------------- micro


def run_micro(profile: Profile, tmp: Path) -> Json:
    """pytest-benchmark over bench/micro, pinned to the server CPU."""
    out_json = tmp / "micro.json"
    argv = pinned(
        SERVER_CPU,
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:randomly",
            str(BENCH / "micro"),
            *profile.micro,
        ],
    )
    if "--benchmark-disable" not in profile.micro:
        argv += [f"--benchmark-json={out_json}"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    result: Json = {"returncode": done.returncode, "output": done.stdout[-2000:]}
    if done.returncode != 0:
        result["error"] = (done.stdout + done.stderr)[-2000:]
    if out_json.exists():
        data = json.loads(out_json.read_text())
        result["benchmarks"] = [
            {
                "name": b["name"],
                "median_us": round(b["stats"]["median"] * 1e6, 4),
                "min_us": round(b["stats"]["min"] * 1e6, 4),
                "max_us": round(b["stats"]["max"] * 1e6, 4),
                "ops_per_s": round(b["stats"]["ops"], 1),
                "rounds": b["stats"]["rounds"],
                "description": (b.get("extra_info") or {}).get("what", ""),
            }
            for b in data["benchmarks"]
        ]
    return result


# ---------------------------------------------------------------------------- summary and report


def summarize(samples: list[Sample]) -> dict[str, dict[str, Json]]:
    """server -> "scenario case" -> {"metrics": {name: {median, min, max, n}}, "errors", "runs"}"""
    groups: dict[tuple[str, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.server, f"{s.scenario} {s.case}"), []).append(s)
    out: dict[str, dict[str, Json]] = {}
    for (server, key), group in groups.items():
        good = [s for s in group if s.metrics]
        metrics: dict[str, Json] = {}
        names = {m for s in good for m in s.metrics}
        for name in sorted(names):
            values = [s.metrics[name] for s in good if s.metrics.get(name) is not None]
            if not values:
                continue
            if all(isinstance(v, bool) for v in values):
                metrics[name] = {"any": any(values), "n": len(values)}
                continue
            nums = [float(v) for v in values if isinstance(v, (int, float))]
            metrics[name] = {
                "median": statistics.median(nums),
                "min": min(nums),
                "max": max(nums),
                "n": len(nums),
            }
        errors = [s.error for s in group if s.error]
        out.setdefault(server, {})[key] = {
            "metrics": metrics,
            "errors": errors,
            "runs": len(group),
        }
    return out


def _num(x: float, digits: int = 3) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.{digits - 1}f}M"
    if x >= 1e4:
        return f"{x / 1e3:.0f}k"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _cell(entry: Json | None, metric: str, fmt: Callable[[float], str] = _num) -> str:
    if entry is None:
        return DASH
    m = entry["metrics"].get(metric)
    if m is None or "median" not in m:
        return "error" if entry["errors"] else DASH
    text = fmt(m["median"])
    if m["n"] > 1:
        text += f" ({fmt(m['min'])}\u2013{fmt(m['max'])})"
    marks = []
    lost = entry["metrics"].get("lost")
    if lost and lost["max"] > 0:
        marks.append(f"lost {int(lost['max'])}")
    if entry["metrics"].get("loadgen_bound", {}).get("any"):
        marks.append("†")
    if entry["metrics"].get("timed_out", {}).get("any"):
        marks.append("timeout")
    if entry["metrics"].get("noisy", {}).get("any"):
        marks.append("~")
    if entry["errors"]:
        marks.append("!")
    return text + (" " + " ".join(marks) if marks else "")


def _ms(x: float) -> str:
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def render_markdown(report: Json) -> str:
    summary: dict[str, dict[str, Json]] = report["summary"]
    profile: Json = report["profile"]
    meta: Json = report["meta"]
    servers = [s for s in report["servers"] if report["servers"][s]["available"]]
    missing = {s: v["reason"] for s, v in report["servers"].items() if not v["available"]}

    def get(server: str, key: str) -> Json | None:
        return summary.get(server, {}).get(key)

    out = [
        f"# Benchmark results ({profile['name']}, {report['runs']} run"
        f"{'s' if report['runs'] != 1 else ''})",
        "",
        f"{report['timestamp']} · commit `{(meta['commit'] or 'unknown')[:12]}` · "
        f"{meta['machine']['cpu_model']} ({meta['machine']['cpus']} CPUs) · "
        f"Python {meta['machine']['python']} · kernel {meta['machine']['kernel']}",
        "",
        f"Server on CPU {SERVER_CPU}, load generator on CPU {LOADGEN_CPU}. Cells: median"
        + (" (min\u2013max)" if report["runs"] > 1 else "")
        + f" of {report['runs']} run{'s' if report['runs'] != 1 else ''}. "
        f"`†` the load generator used ≥ {LOADGEN_BOUND:.0%} of its core (it, not the server, "
        "may be the limit); `~` something else used more than "
        f"{NOISY:.0%} of a CPU meanwhile (noisy); `lost N` messages missing at the end; "
        "`timeout` the phase ended before every message arrived; `!` an error (see the JSON).",
        "",
        *(
            [
                f"**Noisy**: the machine was {meta['cpu_busy_before']:.0%} busy just before the "
                "run (other processes share these 2 cores).",
                "",
            ]
            if meta.get("cpu_busy_before", 0) > 0.1
            else []
        ),
        f"Load generator alone (parsebench, in-memory, 1 core): "
        f"{_num(report['loadgen_parsebench']['frames_per_s'])} frames/s counted, "
        f"{_num(report['loadgen_parsebench']['frames_per_s_with_scan'])} frames/s with the "
        "timestamp scan.",
        "",
        "## Fan-out: deliveries/s (1 publisher → S subscribers, W messages in flight)",
        "",
    ]
    fan_keys = [f"fanout S={s} W={w}" for s in profile["fanout_subs"] for w in profile["windows"]]
    header = ["server", *[k.removeprefix("fanout ") for k in fan_keys]]
    rows = [
        [name, *[_cell(get(name, k), "deliveries_per_s") for k in fan_keys]] for name in servers
    ]
    out += _table(header, rows)
    if "aether-fast" in servers and "write-floor" in servers:
        ratio_row = ["aether-fast / write-floor"]
        for k in fan_keys:
            a, f = get("aether-fast", k), get("write-floor", k)
            try:
                ratio = (
                    a["metrics"]["deliveries_per_s"]["median"]  # type: ignore[index]
                    / f["metrics"]["deliveries_per_s"]["median"]  # type: ignore[index]
                )
                ratio_row.append(f"{ratio:.0%}")
            except (KeyError, TypeError, ZeroDivisionError):
                ratio_row.append(DASH)
        out += ["", *_table(header, [ratio_row])]
    out += [
        "",
        f"## Latency: publish → receive, ms ({profile['latency_subs']} subscribers, "
        "fixed publish rate)",
        "",
    ]
    lat_keys = [f"latency {r}/s" for r in profile["rates"]]
    header = ["server"]
    for k in lat_keys:
        rate = k.removeprefix("latency ")
        header += [f"{rate} p50", f"{rate} p99", f"{rate} max", f"{rate} p99 on arrival"]
    rows = []
    for name in servers:
        row = [name]
        for k in lat_keys:
            entry = get(name, k)
            row += [_cell(entry, "p50_ms", _ms), _cell(entry, "p99_ms", _ms)]
            row += [_cell(entry, "max_ms", _ms), _cell(entry, "arrival_p99_ms", _ms)]
        rows.append(row)
    out += _table(header, rows)
    out += [
        "",
        "Timed when the load generator reads each frame; *on arrival*: the same samples timed by "
        "the kernel's receive timestamp (SO_TIMESTAMPNS), without the load generator's own "
        "read backlog.",
    ]
    out += ["", "## Round trips: publish and receive its own message (echo=1)", ""]
    rtt_keys = [f"rtt C={c}" for c in profile["rtt_conns"]]
    header = ["server"]
    for k in rtt_keys:
        c = k.removeprefix("rtt C=")
        header += [f"{c} conn{'s' if c != '1' else ''}: round trips/s", "p50 µs"]
    rows = []
    for name in servers:
        row = [name]
        for k in rtt_keys:
            entry = get(name, k)
            row += [_cell(entry, "round_trips_per_s"), _cell(entry, "p50_us")]
        rows.append(row)
    out += _table(header, rows)
    out += ["", "## Connections: server RSS per idle connection, and set-up rate", ""]
    conn_keys = [f"connections N={n}" for n in profile["conn_counts"]]
    header = ["server"]
    for k in conn_keys:
        n = k.removeprefix("connections N=")
        header += [f"KiB/conn @{n}", f"conns/s @{n}"]
    rows = []
    for name in servers:
        row = [name]
        for k in conn_keys:
            entry = get(name, k)
            row += [_cell(entry, "kib_per_conn"), _cell(entry, "connections_per_s")]
        rows.append(row)
    out += _table(header, rows)
    out += [
        "",
        "aether-fast verifies a JWT (HS256, a distinct token per connection) and joins the "
        "channel on each; the peers have no authentication.",
        "",
        "## CPU use during the measured part (median share of one core: server / load generator)",
        "",
    ]
    cpu_keys = fan_keys + lat_keys + rtt_keys
    header = ["server", *[k.split(" ", 1)[1] if k.startswith("fanout") else k for k in cpu_keys]]
    rows = []
    for name in servers:
        row = [name]
        for k in cpu_keys:
            entry = get(name, k)
            try:
                m = entry["metrics"]  # type: ignore[index]
                row.append(
                    f"{m['server_cpu_util']['median']:.0%} / {m['loadgen_cpu_util']['median']:.0%}"
                )
            except (KeyError, TypeError):
                row.append(DASH)
        rows.append(row)
    out += _table(header, rows)
    bound = [
        f"{name} {key}"
        for name in servers
        for key, entry in summary.get(name, {}).items()
        if entry["metrics"].get("loadgen_bound", {}).get("any")
    ]
    out += [
        "",
        "Load generator as the bottleneck: "
        + (", ".join(bound) if bound else f"nowhere (it stayed under {LOADGEN_BOUND:.0%})")
        + ".",
    ]
    micro = report.get("micro") or {}
    if micro.get("benchmarks"):
        out += ["", "## Micro benchmarks (pytest-benchmark, in-process, null transports)", ""]
        rows = [
            [b["name"], f"{b['median_us']:.3f}", _num(b["ops_per_s"]), b["description"]]
            for b in micro["benchmarks"]
        ]
        out += _table(["benchmark", "median µs", "ops/s", "what"], rows)
    elif micro.get("error"):
        out += ["", "## Micro benchmarks", "", "Failed: see the JSON (`micro.error`)."]
    errors = [
        f"- {name} {key}: {err}"
        for name in servers
        for key, entry in summary.get(name, {}).items()
        for err in entry["errors"][:1]
    ]
    if errors:
        out += ["", "## Errors", "", *errors]
    if missing:
        out += ["", "## Not available here", ""]
        out += [f"- {name}: {reason}" for name, reason in missing.items()]
    out += ["", "## Servers", ""]
    for name, info in report["servers"].items():
        out.append(f"- **{name}** ({info['version']}): {info['description']}")
    out += ["", f"Charts: {', '.join(report.get('charts', [])) or 'none'}.", ""]
    return "\n".join(out)


def render_charts(report: Json, out_dir: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    summary: dict[str, dict[str, Json]] = report["summary"]
    profile: Json = report["profile"]
    servers = [s for s in report["servers"] if report["servers"][s]["available"]]
    made: list[str] = []

    def bars(
        filename: str,
        title: str,
        keys: list[str],
        labels: list[str],
        metric: str,
        ylabel: str,
        log: bool = False,
        scale: float = 1.0,
    ) -> None:
        fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(keys) + 3), 4.5))
        width = 0.8 / max(1, len(servers))
        for i, name in enumerate(servers):
            xs, ys, lo, hi = [], [], [], []
            for j, key in enumerate(keys):
                m = summary.get(name, {}).get(key, {}).get("metrics", {}).get(metric)
                if not m or "median" not in m:
                    continue
                xs.append(j + (i - (len(servers) - 1) / 2) * width)
                ys.append(m["median"] * scale)
                lo.append((m["median"] - m["min"]) * scale)
                hi.append((m["max"] - m["median"]) * scale)
            if xs:
                ax.bar(xs, ys, width, label=name, yerr=[lo, hi] if report["runs"] > 1 else None)
        if not ax.patches:
            plt.close(fig)
            return
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(labels)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(out_dir / filename, dpi=110)
        plt.close(fig)
        made.append(filename)

    fan = [(s, w) for s in profile["fanout_subs"] for w in profile["windows"]]
    bars(
        "fanout.png",
        "Fan-out: deliveries/s (higher is better)",
        [f"fanout S={s} W={w}" for s, w in fan],
        [f"S={s}\nW={w}" for s, w in fan],
        "deliveries_per_s",
        "deliveries/s",
        log=True,
    )
    for q in ("p50", "p99"):
        bars(
            f"latency_{q}.png",
            f"Latency {q}, {profile['latency_subs']} subscribers (lower is better)",
            [f"latency {r}/s" for r in profile["rates"]],
            [f"{r} msg/s" for r in profile["rates"]],
            f"{q}_ms",
            "ms",
            log=True,
        )
    bars(
        "rtt.png",
        "Round trips/s (higher is better)",
        [f"rtt C={c}" for c in profile["rtt_conns"]],
        [f"{c} conn" for c in profile["rtt_conns"]],
        "round_trips_per_s",
        "round trips/s",
    )
    bars(
        "connections.png",
        "Server RSS per idle connection (lower is better)",
        [f"connections N={n}" for n in profile["conn_counts"]],
        [f"{n} conns" for n in profile["conn_counts"]],
        "kib_per_conn",
        "KiB per connection",
    )
    return made


# ---------------------------------------------------------------------------- main


def available_servers(only: set[str] | None) -> tuple[list[ServerSpec], dict[str, Json]]:
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
        }
        if reason is None:
            usable.append(spec)
    return usable, info


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="aether-bench-") as tmp:
        yield Path(tmp)


def run_server(
    spec: ServerSpec,
    tmp: Path,
    urls: dict[str, Path],
    profile: Profile,
    run: int,
    scenarios: Sequence[str],
) -> list[Sample]:
    samples: list[Sample] = []
    steps: list[tuple[str, Callable[[ServerProcess, dict[str, Path], Profile, int], list[Sample]]]]
    steps = [
        ("fanout", scenario_fanout),
        ("latency", scenario_latency),
        ("rtt", scenario_rtt),
    ]
    steps = [s for s in steps if s[0] in scenarios]
    server: ServerProcess | None = None
    try:
        for name, fn in steps:
            if server is None or not server.alive():
                if server is not None:
                    samples.append(
                        Sample(spec.name, run, name, "restart", {}, None, f"died: {server.tail()}")
                    )
                    server.stop()
                server = start_server(spec, tmp)
            _say(f"  {spec.name}: {name}")
            samples += fn(server, urls, profile, run)
    except RuntimeError as e:
        samples.append(Sample(spec.name, run, "start", "-", {}, None, str(e)))
    finally:
        if server is not None:
            server.stop()
    if "connections" in scenarios:
        _say(f"  {spec.name}: connections")
        samples += scenario_connections(spec, tmp, urls, profile, run)
    return samples


_T0 = time.monotonic()


def _say(text: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {text}", file=sys.stderr, flush=True)


def make_urls(maker: Urls, profile: Profile, scenarios: Sequence[str]) -> dict[str, Path]:
    urls: dict[str, Path] = {}
    if "fanout" in scenarios:
        for subs in profile.fanout_subs:
            urls[f"fanout-{subs}"] = maker.make(subs + 1, f"fanout-{subs}")
    if "latency" in scenarios:
        urls["latency"] = maker.make(profile.latency_subs + 1, "latency")
    if "rtt" in scenarios:
        urls["rtt"] = maker.make(max(profile.rtt_conns), None, echo=True)
    if "connections" in scenarios:
        urls["warm"] = maker.make(100, "idle")
        held = 0
        for count in profile.conn_counts:  # each step adds its own connections
            urls[f"conn-{count}"] = maker.make(count - held, "idle")
            held = count
    return urls


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1 run, shorter phases (< 3 min)")
    mode.add_argument("--smoke", action="store_true", help="every scenario tiny (CI, < 60 s)")
    p.add_argument("--runs", type=int, default=None, help="override the number of runs")
    p.add_argument("--only", default=None, help="comma-separated server names")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    p.add_argument("--no-micro", action="store_true", help="skip the pytest-benchmark part")
    p.add_argument("--out", type=Path, default=None, help="results directory")
    args = p.parse_args(argv)

    profile = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
    runs = args.runs if args.runs is not None else profile.runs
    if runs < 1:
        p.error("--runs must be >= 1")
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    only = {s.strip() for s in args.only.split(",")} if args.only else None
    if only is not None and not only <= {s.name for s in SERVERS}:
        p.error(f"--only: known servers are {', '.join(s.name for s in SERVERS)}")
    if list(profile.conn_counts) != sorted(set(profile.conn_counts)):
        p.error("the profile's conn_counts must be ascending")
    if (os.cpu_count() or 1) < 2:
        p.error("needs 2 CPUs: the server on CPU 0, the load generator on CPU 1")
    if shutil.which("taskset") is None:
        p.error("taskset is missing (util-linux)")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.sched_setaffinity(0, {LOADGEN_CPU})
    build_loadgen()
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    # the smoke's tiny numbers never replace real results: they go to a directory removed at exit
    scratch = Path(tempfile.mkdtemp(prefix="aether-bench-smoke-")) if args.smoke else None
    out_dir: Path = args.out or scratch or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)

    specs, server_info = available_servers(only)
    for name, info in server_info.items():
        if not info["available"]:
            _say(f"{name}: not available: {info['reason']}")

    busy_before = cpu_busy()
    if busy_before > 0.1:
        _say(f"warning: the machine is {busy_before:.0%} busy before the run: results are noisy")
    samples: list[Sample] = []
    micro: Json | None = None
    try:
        with _workdir() as tmp:
            if not args.no_micro:
                _say("micro benchmarks")
                micro = run_micro(profile, tmp)
            maker = Urls(tmp)
            for run in range(runs):
                _say(f"run {run + 1}/{runs}: minting tokens")
                urls = make_urls(maker, profile, scenarios)
                for spec in specs:
                    samples += run_server(spec, tmp, urls, profile, run, scenarios)
    finally:
        _stop_started()

    report: Json = {
        "timestamp": stamp,
        "runs": runs,
        "profile": {
            "name": profile.name,
            "fanout_subs": list(profile.fanout_subs),
            "windows": list(profile.windows),
            "fanout_messages": {s: profile.messages_for(s) for s in profile.fanout_subs},
            "fanout_duration_s": profile.fanout_duration,
            "latency_subs": profile.latency_subs,
            "rates": list(profile.rates),
            "latency_duration_s": profile.latency_duration,
            "rtt_conns": list(profile.rtt_conns),
            "rtt_duration_s": profile.rtt_duration,
            "conn_counts": list(profile.conn_counts),
            "scenarios": scenarios,
        },
        "meta": {
            "machine": machine_info(),
            "commit": git_commit(),
            "versions": package_versions(),
            "loadgen_bound_threshold": LOADGEN_BOUND,
            "cpu_busy_before": busy_before,
            "cpu_busy_after": cpu_busy(),
            "loadavg_after": list(os.getloadavg()),
            "elapsed_s": None,
        },
        "loadgen_parsebench": parsebench(),
        "servers": server_info,
        "micro": micro,
        "samples": [s.to_json() for s in samples],
        "summary": summarize(samples),
    }
    report["charts"] = render_charts(report, out_dir) if not args.smoke else []
    report["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    json_path = out_dir / f"{stamp}{'-' + profile.name if profile.name != 'full' else ''}.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    markdown = render_markdown(report)
    (out_dir / "latest.md").write_text(markdown)
    print(markdown)
    if scratch is None:
        _say(f"wrote {json_path} and {out_dir / 'latest.md'} in {report['meta']['elapsed_s']} s")

    # in the smoke, our own code (aether-fast, the write floor, the runner and the load
    # generator) must work; a third-party peer that fails is reported, not fatal
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    failures = [s for s in samples if s.error and s.server in OWN_SERVERS]
    for s in samples:
        if s.error and s.server not in OWN_SERVERS:
            _say(f"warning: {s.server} {s.scenario} {s.case}: {s.error}")
    if args.smoke:
        lost = [s for s in samples if s.server == "aether-fast" and s.metrics.get("lost")]
        bad_micro = micro is not None and micro.get("returncode") != 0
        for s in failures:
            _say(f"FAIL {s.server} {s.scenario} {s.case}: {s.error}")
        for s in lost:
            _say(f"FAIL aether-fast lost messages in {s.scenario} {s.case}: {s.metrics['lost']}")
        if bad_micro and micro is not None:
            _say(f"FAIL micro benchmarks: {micro.get('error', '')[-1000:]}")
        if failures or lost or bad_micro:
            return 1
        print(f"bench-smoke: {len(samples)} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
