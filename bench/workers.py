"""WORKERS=2 against WORKERS=1 through Redis, on this machine, under the same load generator.

Both configurations run with the Redis broker (so the comparison is about workers, not
about brokers): a `redis-server` of our own on a free port, aether-fast with BROKER_URL, and
the C load generator. Nothing is pinned: the two workers need both cores, so the load
generator and Redis share them (the CPU of the servers, of Redis and of the load generator
is reported). Layouts: one worker, WORKERS=2, and two nodes (two servers of one worker each,
on two ports, sharing the Redis: odd connections go to the second). Scenarios: connections
set up per second (each with its own JWT, joining its own channel), round trips with 50
connections (echo=1, each on its own channel), and fan-out 1 -> 1000 with 64 in flight.
Then bench/redis_cpu.py: Redis CPU per published message with and without history, and
round trips through Redis against the memory broker, in the same run.

Writes bench/results/workers-<time>.json and prints one JSON line with the ratios.
Usage: python bench/workers.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "bench" / "build" / "loadgen"
RESULTS = ROOT / "bench" / "results"
SECRET = "bench-workers-secret-bench-workers-secret-0123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def urls(tmp: Path, name: str, count: int, *, channel: str | None, echo: bool) -> Path:
    sys.path.insert(0, str(ROOT))
    from aether_fast.auth import mint_token
    from aether_fast.config import load_config

    config = load_config({"JWT_SECRET": SECRET})
    path = tmp / f"urls-{name}.txt"
    lines = []
    for i in range(count):
        token = mint_token(config, f"{name}-{i}", ttl_s=3600)
        ch = channel or f"{name}-{i}"
        lines.append(
            f"/ws?token={token}&client_id={name}-c{i}&channel={ch}" + ("&echo=1" if echo else "")
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def loadgen(
    mode: str, port: int, url_file: Path, pid: int, *, cpu: str | None = None, **opts: Any
) -> dict[str, Any]:
    """Run the load generator (pinned to `cpu` when given); its first JSON line."""
    argv = ["taskset", "-c", cpu] if cpu is not None else []
    argv += [
        str(LOADGEN),
        mode,
        "--port",
        str(port),
        "--urls",
        str(url_file),
        "--server-pid",
        str(pid),
        "--ready-frames",
        "1",
        "--timeout",
        "120",
    ]
    for key, value in opts.items():
        argv += [f"--{key}", str(value)]
    out = subprocess.run(argv, capture_output=True, timeout=180, check=True).stdout
    result: dict[str, Any] = json.loads(out.decode().splitlines()[0])
    return result


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes and their children, from /proc."""
    total = 0
    for pid in pids:
        for p in [pid, *children(pid)]:
            try:
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids]


def start(port: int, redis_url: str, tmp: Path, workers: int, node: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "WS_HOST": "127.0.0.1",
        "WS_PORT": str(port),
        "METRICS_PORT": str(free_port()),
        "JWT_SECRET": SECRET,
        "BROKER_URL": redis_url,
        "WORKERS": str(workers),
        "NODE_ID": node,
        "RATE_LIMIT_MESSAGES": "0",
        "RATE_LIMIT_CONNECTIONS": "0",
        "LOG_LEVEL": "warn",
        "DATA_DIR": str(tmp / f"data-{node}"),
    }
    return subprocess.Popen([sys.executable, "-m", "aether_fast", "serve"], env=env)


def serve_pinned(
    tmp: Path, env: dict[str, str], tree: Path = ROOT
) -> tuple[subprocess.Popen[bytes], int]:
    """One aether-fast worker (of the source tree `tree`) pinned to CPU 0 (no busy polling),
    no rate limits, `env` on top; returns once its port listens. Its process and port."""
    port = free_port()
    full = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "JWT_SECRET": SECRET,
        "WS_HOST": "127.0.0.1",
        "WS_PORT": str(port),
        "METRICS_PORT": str(free_port()),
        "RATE_LIMIT_MESSAGES": "0",
        "RATE_LIMIT_CONNECTIONS": "0",
        "LOG_LEVEL": "warn",
        "DATA_DIR": str(tmp / f"data-{port}"),
        **env,
    }
    argv = ["taskset", "-c", "0", sys.executable, "-m", "aether_fast", "serve"]
    proc = subprocess.Popen(argv, env=full, cwd=tmp)
    wait_port(port)
    return proc, port


def run(layout: str, redis_url: str, redis_pid: int, tmp: Path, quick: bool) -> dict[str, Any]:
    """`layout`: "1 worker", "2 workers" (WORKERS=2, one port) or "2 nodes" (two servers of
    one worker each on two ports, sharing the Redis; odd connections go to the second)."""
    tag = layout.replace(" ", "")
    ports = [free_port()]
    servers = []
    if layout == "2 nodes":
        ports.append(free_port())
        servers = [start(p, redis_url, tmp, 1, f"{tag}-{i}") for i, p in enumerate(ports)]
    else:
        servers = [start(ports[0], redis_url, tmp, int(layout[0]), tag)]
    # load generator options, as `loadgen` takes them: the second node's port
    extra: dict[str, Any] = {"port2": ports[1]} if len(ports) > 1 else {}
    pids = [s.pid for s in servers]
    result: dict[str, Any] = {"layout": layout}

    def measure(name: str, mode: str, url_file: Path, **opts: Any) -> dict[str, Any]:
        before = cpu_seconds(pids), cpu_seconds([redis_pid]), time.monotonic()
        out = loadgen(mode, ports[0], url_file, pids[0], **opts, **extra)
        spent = time.monotonic() - before[2]
        result[name + "_server_cpu_util"] = round((cpu_seconds(pids) - before[0]) / spent, 2)
        result[name + "_redis_cpu_util"] = round((cpu_seconds([redis_pid]) - before[1]) / spent, 2)
        return out

    try:
        for port in ports:
            wait_port(port)
        time.sleep(1.5)  # every worker listening
        conns = 1000 if quick else 3000
        connect = measure(
            "connect",
            "connect",
            urls(tmp, f"conn{tag}", conns, channel=None, echo=False),
            conns=conns,
            hold=0,
            concurrency=64,
        )
        rtt = measure(
            "rtt",
            "rtt",
            urls(tmp, f"rtt{tag}", 50, channel=None, echo=True),
            conns=50,
            duration=2 if quick else 5,
        )
        subs = 1000
        fan = measure(
            "fanout",
            "fanout",
            urls(tmp, f"fan{tag}", subs + 1, channel=f"f{tag}", echo=False),
            subs=subs,
            windows=64,
            messages=2000 if quick else 10000,
        )
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
        for server in servers:
            server.wait(30)
    rtt_phase = rtt["phases"][0]
    fan_phase = fan["phases"][0]
    result.update(
        {
            "connections_per_s": connect.get("connections_per_s"),
            "connections_failed": connect.get("failed"),
            "round_trips_per_s_50_conns": rtt_phase.get("round_trips_per_s"),
            "fanout_1000_w64_deliveries_per_s": fan_phase.get("deliveries_per_s"),
            "fanout_lost": fan_phase.get("lost"),
            "loadgen_cpu_s": [rtt_phase.get("loadgen_cpu_s"), fan_phase.get("loadgen_cpu_s")],
        }
    )
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if shutil.which("redis-server") is None:
        print("bench/workers.py: redis-server is missing", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="aether-workers-"))
    rport = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_port(rport)
        url = f"redis://127.0.0.1:{rport}/0"
        one = run("1 worker", url, redis.pid, tmp, args.quick)
        two = run("2 workers", url, redis.pid, tmp, args.quick)
        nodes = run("2 nodes", url, redis.pid, tmp, args.quick)
    finally:
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    def ratio(other: dict[str, Any], key: str) -> float | None:
        a, b = one.get(key), other.get(key)
        return round(b / a, 2) if a and b else None

    keys = {
        "connections": "connections_per_s",
        "round_trips": "round_trips_per_s_50_conns",
        "fanout": "fanout_1000_w64_deliveries_per_s",
    }
    # Redis CPU per publish (history / none) and round trips memory vs Redis, in one run
    from redis_cpu import measure

    cost = measure(rounds=2 if args.quick else 5, duration=1.5 if args.quick else 3.0)
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "one_worker": one,
        "two_workers": two,
        "two_nodes": nodes,
        "ratio_two_workers": {k: ratio(two, v) for k, v in keys.items()},
        "ratio_two_nodes": {k: ratio(nodes, v) for k, v in keys.items()},
        "redis_cpu": cost,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"workers-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json").write_text(
        json.dumps(result, indent=1)
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
