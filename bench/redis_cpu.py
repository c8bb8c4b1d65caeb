"""Redis CPU per published message, and round trips through Redis against the memory broker.

A `redis-server` of our own (on a free port, or a Unix socket with `--unix`) pinned to CPU 1,
aether-fast servers pinned to CPU 0 (one worker each: one with BROKER_URL and
`HISTORY_SIZE=100`, one with BROKER_URL and `HISTORY_SIZE=0`, one with the memory broker) and
the C load generator pinned to CPU 1 beside Redis, in its `rtt` mode: 50 connections, each
on its own channel with echo=1, publishing and waiting for their own message. For each round
the redis-server process's utime + stime (`/proc/<pid>/stat`) is read before and after the
load generator runs: Redis CPU time ÷ messages published = µs of Redis CPU per publish. CPU
time, not wall time, so a busy shared machine changes it little; the servers take turns,
round after round, and the median of the rounds is reported. The same runs give round
trips/s for each server: the Redis broker's against the memory broker's, in the same run.

What one round costs Redis besides the publishes (50 joins, their SUBSCRIBEs, the cluster
heartbeat, Redis's own timer) is under 0.1 µs per message at these rates.

Usage: python bench/redis_cpu.py [--rounds 5] [--duration 3] [--conns 50] [--unix] [--tree DIR]
(also run by `make bench-workers`, bench/workers.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from workers import free_port, loadgen, serve_pinned, urls, wait_port  # noqa: E402

RESULTS = ROOT / "bench" / "results"
#: the configurations measured: name -> (BROKER_URL wanted, HISTORY_SIZE)
LAYOUTS: dict[str, tuple[bool, int]] = {
    "redis_history": (True, 100),
    "redis_no_history": (True, 0),
    "memory": (False, 100),
}


def proc_cpu_s(pid: int) -> float:
    """utime + stime of one process (all its threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def script_calls(port: int) -> int:
    """EVAL + EVALSHA calls a redis-server has run (`INFO commandstats`): every publish
    call of a worker is one, so published ÷ calls = publishes per call, the batch whose
    per-call cost (about 10-70 µs) each publish shares."""
    argv = ["redis-cli", "-h", "127.0.0.1", "-p", str(port), "info", "commandstats"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout
    total = 0
    for line in out.splitlines():
        name, _, stats = line.strip().partition(":")
        if name in ("cmdstat_eval", "cmdstat_evalsha"):
            total += int(stats.split(",", 1)[0].removeprefix("calls="))
    return total


class Redis:
    """A redis-server of our own, on a free port or on a Unix socket in `tmp`."""

    def __init__(self, tmp: Path, *, unix: bool = False) -> None:
        self.port = free_port()
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(tmp)]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        if unix:
            sock = tmp / "redis.sock"
            argv += ["--unixsocket", str(sock), "--unixsocketperm", "700"]
            self.url = f"unix://{sock}?db=0"
        # on CPU 1 with the load generator, the server alone on CPU 0 (as docs/performance.md
        # measures round trips through Redis)
        self.proc = subprocess.Popen(["taskset", "-c", "1", *argv], stdout=subprocess.DEVNULL)
        wait_port(self.port)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def measure(
    *,
    rounds: int = 5,
    duration: float = 3.0,
    conns: int = 50,
    unix: bool = False,
    tree: Path = ROOT,
) -> dict[str, Any]:
    """Every layout of LAYOUTS, `rounds` times in turn; the medians and every sample.
    `tree`: the source tree whose servers run (another commit's, built, to compare)."""
    tmp = Path(tempfile.mkdtemp(prefix="aether-redis-cpu-"))
    redis = Redis(tmp, unix=unix)
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in LAYOUTS}
    try:
        for name, (use_redis, history) in LAYOUTS.items():
            env = {"HISTORY_SIZE": str(history)}
            if use_redis:
                env["BROKER_URL"] = redis.url
            servers[name] = serve_pinned(tmp, env, tree)
        time.sleep(1.0)
        lines = {name: urls(tmp, name, conns, channel=None, echo=True) for name in LAYOUTS}
        for _ in range(rounds):
            for name in LAYOUTS:
                proc, port = servers[name]
                calls = script_calls(redis.port)
                before = proc_cpu_s(redis.pid)
                out = loadgen(
                    "rtt", port, lines[name], proc.pid, cpu="1", conns=conns, duration=duration
                )
                spent = proc_cpu_s(redis.pid) - before
                calls = script_calls(redis.port) - calls
                phase = out["phases"][0]
                published = int(phase["round_trips"]) + int(phase["lost"])
                samples[name].append(
                    {
                        "published": published,
                        "publishes_per_script_call": round(published / calls, 1) if calls else 0.0,
                        "round_trips_per_s": float(phase["round_trips_per_s"]),
                        "redis_cpu_s": round(spent, 3),
                        "redis_us_per_publish": round(spent * 1e6 / max(1, published), 2),
                        "server_cpu_util": float(phase.get("server_cpu_util", 0.0)),
                    }
                )
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in servers.values():
            proc.wait(30)
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def median(name: str, key: str) -> float:
        return round(statistics.median(s[key] for s in samples[name]), 2)

    memory_rtt = median("memory", "round_trips_per_s")
    result: dict[str, Any] = {
        "conns": conns,
        "duration_s": duration,
        "rounds": rounds,
        "redis_url_kind": "unix" if unix else "tcp",
        "redis_us_per_publish_history": median("redis_history", "redis_us_per_publish"),
        "redis_us_per_publish_no_history": median("redis_no_history", "redis_us_per_publish"),
        "publishes_per_script_call_history": median("redis_history", "publishes_per_script_call"),
        "publishes_per_script_call_no_history": median(
            "redis_no_history", "publishes_per_script_call"
        ),
        "round_trips_per_s_memory": memory_rtt,
        "round_trips_per_s_redis_history": median("redis_history", "round_trips_per_s"),
        "round_trips_per_s_redis_no_history": median("redis_no_history", "round_trips_per_s"),
        "samples": samples,
    }
    for name in ("redis_history", "redis_no_history"):
        ratio = median(name, "round_trips_per_s") / memory_rtt if memory_rtt else 0.0
        result[f"rtt_ratio_{name}_to_memory"] = round(ratio, 2)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--unix", action="store_true", help="BROKER_URL=unix://… instead of TCP")
    p.add_argument("--tree", type=Path, default=ROOT, help="the source tree to run (built)")
    args = p.parse_args()
    if shutil.which("redis-server") is None:
        print("bench/redis_cpu.py: redis-server is missing", file=sys.stderr)
        return 2
    result = measure(
        rounds=args.rounds, duration=args.duration, conns=args.conns, unix=args.unix, tree=args.tree
    )
    result["tree"] = str(args.tree)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (RESULTS / f"redis-cpu-{stamp}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
