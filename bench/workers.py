"""WORKERS=2 against WORKERS=1 through Redis, on this machine, under the same load generator.

All layouts run with the Redis broker (so the comparison is about workers, not about
brokers): a `redis-server` of our own on a free port, aether-fast with BROKER_URL, and the C
load generator. Nothing is pinned: the two workers need both cores, so the load generator and
Redis share them (the CPU of the servers, of Redis and of the load generator is reported).
Layouts: one worker, WORKERS=2, and two nodes (two servers of one worker each, on two ports,
sharing the Redis: odd connections go to the second). Scenarios: connections set up (each
with its own JWT, joining its own channel), round trips with 50 connections (echo=1, each on
its own channel), and fan-out 1 -> 1000 with 64 in flight. The layouts take turns, round
after round (`Size.rounds`), and the median of the rounds is reported.

Two kinds of figure: throughput (connections/s, round trips/s, deliveries/s), which on a
2-core machine is bounded by the machine, not by the workers; and efficiency, the work done
per server CPU-second (utime + stime of every server process: the supervisor and its
workers, from /proc), which is what WORKERS=2 must keep (goal: >= 0.9x of one worker).

Then bench/redis_cpu.py (Redis CPU per published message with and without history, round
trips through Redis against the memory broker) and bench/shards.py (publishes through 1
shard, 2 shards and a 3-node Redis Cluster), in the same run.

Writes bench/results/workers-<time>.json and workers-latest.md (the tables) and prints them.
Usage: python bench/workers.py [--quick | --smoke] [--rounds N]   (--smoke writes nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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


def run(layout: str, redis_url: str, redis_pid: int, tmp: Path, size: Size) -> dict[str, Any]:
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

    from redis_cpu import script_calls

    redis_port = int(redis_url.rsplit(":", 1)[1].split("/", 1)[0])

    def measure(name: str, mode: str, url_file: Path, **opts: Any) -> dict[str, Any]:
        calls = script_calls(redis_port)
        before = cpu_seconds(pids), cpu_seconds([redis_pid]), time.monotonic()
        out = loadgen(mode, ports[0], url_file, pids[0], **opts, **extra)
        spent = time.monotonic() - before[2]
        server_cpu = cpu_seconds(pids) - before[0]
        result[name + "_server_cpu_s"] = round(server_cpu, 3)
        result[name + "_server_cpu_util"] = round(server_cpu / spent, 2)
        result[name + "_redis_cpu_util"] = round((cpu_seconds([redis_pid]) - before[1]) / spent, 2)
        result[name + "_script_calls"] = script_calls(redis_port) - calls
        return out

    try:
        for port in ports:
            wait_port(port)
        time.sleep(1.5)  # every worker listening
        conns = size.conns
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
            duration=size.rtt_s,
        )
        subs = size.subs
        fan = measure(
            "fanout",
            "fanout",
            urls(tmp, f"fan{tag}", subs + 1, channel=f"f{tag}", echo=False),
            subs=subs,
            windows=64,
            messages=size.messages,
            # every message is sent however slow the machine is (the load generator's default
            # stops sending after 5 s): the 1001 joins are then the same share of every round
            duration=90,
        )
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
        for server in servers:
            server.wait(30)
    rtt_phase = rtt["phases"][0]
    fan_phase = fan["phases"][0]

    def per_cpu_s(count: float, name: str) -> float | None:
        cpu = result[name + "_server_cpu_s"]
        return round(count / cpu) if cpu > 0 else None

    result.update(
        {
            "connections": connect.get("connected"),
            "deliveries": fan_phase.get("deliveries"),
            "round_trips": rtt_phase.get("round_trips"),
            "connections_per_server_cpu_s": per_cpu_s(connect.get("connected", 0), "connect"),
            "deliveries_per_server_cpu_s": per_cpu_s(fan_phase.get("deliveries", 0), "fanout"),
            "round_trips_per_server_cpu_s": per_cpu_s(rtt_phase.get("round_trips", 0), "rtt"),
            # the publishes each worker's script call carried: what a call's cost is shared by
            "rtt_publishes_per_script_call": (
                round(rtt_phase.get("round_trips", 0) / result["rtt_script_calls"], 1)
                if result["rtt_script_calls"]
                else None
            ),
            "connections_per_s": connect.get("connections_per_s"),
            "connections_failed": connect.get("failed"),
            "round_trips_per_s_50_conns": rtt_phase.get("round_trips_per_s"),
            "fanout_1000_w64_deliveries_per_s": fan_phase.get("deliveries_per_s"),
            "fanout_lost": fan_phase.get("lost"),
            "fanout_messages": fan_phase.get("messages"),
            "loadgen_cpu_s": [rtt_phase.get("loadgen_cpu_s"), fan_phase.get("loadgen_cpu_s")],
        }
    )
    return result


@dataclass(frozen=True, slots=True)
class Size:
    """How much each part of a run does: `full` (make bench-workers), `quick`, `smoke`."""

    rounds: int  # the layouts take turns this many times; the median of the rounds is kept
    conns: int  # connections set up in the connect scenario
    rtt_s: float  # seconds of round trips, 50 connections
    subs: int  # fan-out members
    messages: int  # fan-out messages
    cost_rounds: int  # bench/redis_cpu.py and bench/shards.py: rounds
    cost_s: float  # and seconds of each


SIZES = {
    "full": Size(3, 3000, 3.0, 1000, 20000, 3, 3.0),
    "quick": Size(1, 1000, 2.0, 1000, 2000, 2, 1.5),
    "smoke": Size(1, 100, 0.5, 50, 200, 1, 0.5),
}
LAYOUTS = ("1 worker", "2 workers", "2 nodes")
#: the figures whose medians and ratios are reported: (key, higher is better)
FIGURES = (
    "connections_per_s",
    "round_trips_per_s_50_conns",
    "fanout_1000_w64_deliveries_per_s",
    "connections_per_server_cpu_s",
    "deliveries_per_server_cpu_s",
    "round_trips_per_server_cpu_s",
    "connect_server_cpu_util",
    "connect_redis_cpu_util",
    "rtt_server_cpu_util",
    "rtt_redis_cpu_util",
    "fanout_server_cpu_util",
    "fanout_redis_cpu_util",
    "rtt_publishes_per_script_call",
)
#: efficiency (work per server CPU-second), WORKERS=2 against 1: the goal
EFFICIENCY_GOAL = 0.9


def medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over the rounds of one layout, and every round."""
    out: dict[str, Any] = {"layout": rounds[0]["layout"]}
    for key in FIGURES:
        values = [float(r[key]) for r in rounds if r.get(key) is not None]
        out[key] = round(statistics.median(values), 2) if values else None
    out["lost"] = sum(int(r.get("fanout_lost") or 0) for r in rounds)
    out["connections_failed"] = sum(int(r.get("connections_failed") or 0) for r in rounds)
    out["rounds"] = rounds
    return out


def render(result: dict[str, Any]) -> str:
    """The markdown of a run (bench/results/workers-latest.md)."""
    from shards import markdown as shards_markdown

    one, two, nodes = result["one_worker"], result["two_workers"], result["two_nodes"]

    def num(value: float) -> str:
        return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k"

    def cell(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        return "—" if value is None else num(value)

    def spread(row: dict[str, Any], key: str) -> str:
        """The median and, over more than one round, the rounds' min-max."""
        values = [float(r[key]) for r in row["rounds"] if r.get(key) is not None]
        if len(values) < 2:
            return cell(row, key)
        return f"{cell(row, key)} ({num(min(values))}-{num(max(values))})"

    def ratio(row: dict[str, Any], key: str) -> str:
        a, b = one.get(key), row.get(key)
        return f"{b / a:.2f}x" if a and b else "—"

    lines = [
        f"# make bench-workers, {result['when']} ({result['size']}, median of "
        f"{result['rounds']} rounds)",
        "",
        "## Efficiency: work per server CPU-second (utime + stime of every server process)",
        "",
        f"Goal: WORKERS=2 ÷ WORKERS=1 >= {EFFICIENCY_GOAL}x. Median of the rounds (their "
        "min-max); the ratio is of the medians.",
        "",
        "| figure | 1 worker | 2 workers | ratio | 2 nodes | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for label, key in (
        ("deliveries per server CPU-s (fan-out 1 → 1000)", "deliveries_per_server_cpu_s"),
        ("connection set-ups per server CPU-s", "connections_per_server_cpu_s"),
        ("round trips per server CPU-s (50 connections)", "round_trips_per_server_cpu_s"),
    ):
        lines.append(
            f"| {label} | {spread(one, key)} | {spread(two, key)} "
            f"| {ratio(two, key)} | {spread(nodes, key)} | {ratio(nodes, key)} |"
        )
    calls = [row.get("rtt_publishes_per_script_call") for row in (one, two, nodes)]
    lines += [
        "",
        "Round trips: publishes per script call (each worker's calls to Redis; a call's fixed "
        f"cost is shared by them): 1 worker {calls[0]}, 2 workers {calls[1]}, 2 nodes {calls[2]}.",
    ]
    lines += [
        "",
        "## Throughput (bounded by this 2-core machine: servers, Redis and the load generator"
        " share it)",
        "",
        "| figure (server / Redis CPU, share of a core) | 1 worker | 2 workers | ratio "
        "| 2 nodes | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for label, key, util in (
        ("connections/s", "connections_per_s", "connect"),
        ("round trips/s, 50 connections", "round_trips_per_s_50_conns", "rtt"),
        ("fan-out deliveries/s, 1 → 1000, W=64", "fanout_1000_w64_deliveries_per_s", "fanout"),
    ):
        cells = []
        for row in (one, two, nodes):
            cpu = f"({row.get(util + '_server_cpu_util')}, {row.get(util + '_redis_cpu_util')})"
            cells.append(f"{cell(row, key)} {cpu}")
        lines.append(
            f"| {label} | {cells[0]} | {cells[1]} | {ratio(two, key)} | {cells[2]} "
            f"| {ratio(nodes, key)} |"
        )
    lost = sum(r["lost"] for r in (one, two, nodes))
    failed = sum(r["connections_failed"] for r in (one, two, nodes))
    lines += ["", f"Fan-out messages lost: {lost}; connections failed: {failed}.", ""]
    cost = result["redis_cpu"]
    lines += [
        "## Redis CPU per publish (bench/redis_cpu.py)",
        "",
        "| | with history (100) | without history |",
        "|---|---|---|",
        f"| µs of Redis CPU per publish | {cost['redis_us_per_publish_history']} "
        f"| {cost['redis_us_per_publish_no_history']} |",
        f"| publishes per script call (the batch sharing a call's cost) "
        f"| {cost['publishes_per_script_call_history']} "
        f"| {cost['publishes_per_script_call_no_history']} |",
        f"| publishes/s one Redis core carries (1e6 ÷ µs) "
        f"| {1e6 / cost['redis_us_per_publish_history'] / 1000:.0f}k "
        f"| {1e6 / cost['redis_us_per_publish_no_history'] / 1000:.0f}k |",
        "",
        "## 1 shard, 2 shards, a 3-node Redis Cluster (bench/shards.py)",
        "",
        *shards_markdown(result["shards"]),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    size_arg = p.add_mutually_exclusive_group()
    size_arg.add_argument("--quick", action="store_true", help="1 round, shorter")
    size_arg.add_argument("--smoke", action="store_true", help="tiny: it must work, no figures")
    p.add_argument("--rounds", type=int, default=None, help="override the rounds")
    args = p.parse_args()
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    size = SIZES[name]
    rounds = args.rounds if args.rounds is not None else size.rounds
    for tool in ("redis-server", "redis-cli", "taskset"):
        if shutil.which(tool) is None:
            print(f"bench/workers.py: {tool} is missing", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="aether-workers-"))
    rport = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    runs: dict[str, list[dict[str, Any]]] = {layout: [] for layout in LAYOUTS}
    try:
        wait_port(rport)
        url = f"redis://127.0.0.1:{rport}/0"
        for i in range(rounds):
            for layout in LAYOUTS:
                runs[layout].append(run(layout, url, redis.pid, tmp, size))
                print(f"round {i + 1} {layout}: {json.dumps(runs[layout][-1])}", flush=True)
    finally:
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    one, two, nodes = (medians(runs[layout]) for layout in LAYOUTS)

    def ratios(other: dict[str, Any]) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for key in FIGURES:
            a, b = one.get(key), other.get(key)
            out[key] = round(b / a, 2) if a and b else None
        return out

    # Redis CPU per publish (history / none) and round trips memory vs Redis, in one run;
    # then publishes through 1 shard, 2 shards and a 3-node cluster
    from redis_cpu import measure
    from report import git_commit
    from shards import measure as measure_shards

    cost = measure(rounds=size.cost_rounds, duration=size.cost_s)
    shards = measure_shards(rounds=size.cost_rounds, duration=size.cost_s)
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "size": name,
        "rounds": rounds,
        "commit": git_commit(),
        "one_worker": one,
        "two_workers": two,
        "two_nodes": nodes,
        "ratio_two_workers": ratios(two),
        "ratio_two_nodes": ratios(nodes),
        "efficiency_goal": EFFICIENCY_GOAL,
        "redis_cpu": cost,
        "shards": shards,
    }
    text = render(result)
    print(text)
    lost = one["lost"] + two["lost"] + nodes["lost"]
    if args.smoke:
        print(f"bench-workers smoke: {rounds} round(s), {lost} lost")
        return 1 if lost else 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (RESULTS / f"workers-{stamp}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "workers-latest.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
