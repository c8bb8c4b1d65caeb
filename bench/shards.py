"""Publishes through 1 Redis, 2 shards and a 3-node Redis Cluster: the Redis CPU each costs.

Three layouts, each one aether-fast worker (`HISTORY_SIZE=100`) pinned to CPU 0 with its own
Redis side, the Redis processes pinned to CPU 1 beside the C load generator (as
bench/redis_cpu.py measures): `1 shard` (one `redis-server`), `2 shards` (`BROKER_URL` a list
of two) and `3-node cluster` (three masters, no replicas, `BROKER_URL=redis+cluster://…`
seeds). The load generator's `rtt` mode: C connections, each on its own channel with echo=1,
publishing and waiting for their own message; the layouts take turns, round after round,
and the median of the rounds is reported. For each round the utime + stime of every
redis-server (`/proc/<pid>/stat`) is read before and after: publishes per Redis CPU-second,
per process and in total, and µs of Redis CPU per publish.

What the figures mean on a 2-core machine: the publishes/s a layout achieves is bounded by
the machine (one worker on CPU 0, every Redis and the load generator sharing CPU 1), not by
Redis, so it does not grow with the shards here. The capacity figure is
`projected_publishes_per_s`: published ÷ the CPU of the busiest Redis process, the
publishes/s the layout carries once its busiest Redis saturates a core of its own.

A server that does not know `redis+cluster://` (check-config refuses it) gets the row
`not measured: server lacks redis+cluster`; the cluster is started and checked
(`cluster_state:ok`) all the same. Every process started here is stopped by its PID.

Usage: python bench/shards.py [--rounds 3] [--duration 3] [--conns 50] [--tree DIR]
(also run by `make bench-workers`, bench/workers.py).
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from redis_cpu import proc_cpu_s, script_calls  # noqa: E402
from workers import SECRET, loadgen, serve_pinned, urls, wait_port  # noqa: E402

RESULTS = ROOT / "bench" / "results"
REDIS_CPU = "1"
HISTORY_SIZE = 100
NOT_MEASURED = "not measured: server lacks redis+cluster"


def free_port_pair() -> int:
    """A free port P whose cluster bus port P + 10000 is free as well."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port with a free cluster bus port")


class RedisProcs:
    """`count` redis-servers of our own pinned to CPU 1, standalone or the masters of a cluster
    (`--cluster-replicas 0`), each in its own directory of `tmp`. Stopped by PID."""

    def __init__(self, tmp: Path, count: int, *, cluster: bool = False) -> None:
        self.cluster = cluster
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            for _ in range(count):
                port = free_port_pair()
                home = tmp / f"redis-{port}"
                home.mkdir(parents=True)
                argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
                argv += ["--save", "", "--appendonly", "no", "--dir", str(home)]
                if cluster:
                    argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
                    argv += ["--cluster-node-timeout", "2000"]
                self.procs.append(
                    subprocess.Popen(
                        ["taskset", "-c", REDIS_CPU, *argv],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
                self.ports.append(port)
            for port in self.ports:
                wait_port(port)
            if cluster:
                self._create()
        except BaseException:
            self.stop()
            raise

    def _cli(self, port: int, *args: str) -> str:
        argv = ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout

    def _create(self) -> None:
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *nodes,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=60,
            check=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [self._cli(p, "cluster", "info") for p in self.ports]
            if all("cluster_state:ok" in s for s in states):
                return
            time.sleep(0.1)
        raise RuntimeError("the cluster did not reach cluster_state:ok within 30 s")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def broker_url(self) -> str:
        if self.cluster:
            return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)
        return ",".join(f"redis://127.0.0.1:{p}/0" for p in self.ports)

    def keys(self) -> list[int]:
        """DBSIZE of each: how the channels' keys spread over the processes."""
        return [int(self._cli(p, "dbsize").strip() or 0) for p in self.ports]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def config_refusal(broker_url: str, tree: Path = ROOT) -> str | None:
    """None when `aether-fast check-config` (of the source tree `tree`) accepts this
    BROKER_URL, else its last line."""
    env = {**os.environ, "PYTHONPATH": str(tree), "JWT_SECRET": SECRET, "BROKER_URL": broker_url}
    done = subprocess.run(
        [sys.executable, "-m", "aether_fast", "check-config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tree,
    )
    if done.returncode == 0:
        return None
    lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit {done.returncode}"


#: the layouts: name -> (redis-server processes, a cluster)
LAYOUTS: dict[str, tuple[int, bool]] = {
    "1 shard": (1, False),
    "2 shards": (2, False),
    "3-node cluster": (3, True),
}


def measure(
    *, rounds: int = 3, duration: float = 3.0, conns: int = 50, tree: Path = ROOT
) -> dict[str, Any]:
    """Every layout of LAYOUTS, `rounds` times in turn: medians, and every sample.
    `tree`: the source tree whose servers run (another branch's, built)."""
    tmp = Path(tempfile.mkdtemp(prefix="aether-shards-"))
    redis: dict[str, RedisProcs] = {}
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    skipped: dict[str, str] = {}
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in LAYOUTS}
    keys: dict[str, list[int]] = {}
    try:
        for name, (count, cluster) in LAYOUTS.items():
            redis[name] = RedisProcs(tmp / name.replace(" ", "-"), count, cluster=cluster)
        for name, procs in redis.items():
            refusal = config_refusal(procs.broker_url(), tree)
            if refusal is not None:
                skipped[name] = f"{NOT_MEASURED} ({refusal})" if procs.cluster else refusal
                continue
            env = {"BROKER_URL": procs.broker_url(), "HISTORY_SIZE": str(HISTORY_SIZE)}
            servers[name] = serve_pinned(tmp, env, tree)
        time.sleep(1.0)
        lines = {
            name: urls(tmp, name.replace(" ", "").replace("-", ""), conns, channel=None, echo=True)
            for name in servers
        }
        for _ in range(rounds):
            for name, (proc, port) in servers.items():
                pids, rports = redis[name].pids, redis[name].ports
                calls = sum(script_calls(p) for p in rports)
                before = [proc_cpu_s(pid) for pid in pids]
                out = loadgen(
                    "rtt",
                    port,
                    lines[name],
                    proc.pid,
                    cpu=REDIS_CPU,
                    conns=conns,
                    duration=duration,
                )
                spent = [proc_cpu_s(pid) - b for pid, b in zip(pids, before, strict=True)]
                calls = sum(script_calls(p) for p in rports) - calls
                phase = out["phases"][0]
                published = int(phase["round_trips"]) + int(phase["lost"])
                total = sum(spent)
                samples[name].append(
                    {
                        "published": published,
                        "lost": int(phase["lost"]),
                        "publishes_per_script_call": round(published / calls, 1) if calls else 0,
                        "publishes_per_s": float(phase["round_trips_per_s"]),
                        "server_cpu_util": float(phase.get("server_cpu_util", 0.0)),
                        "redis_cpu_s": [round(s, 3) for s in spent],
                        "redis_us_per_publish": round(total * 1e6 / max(1, published), 2),
                        "publishes_per_redis_cpu_s": round(published / total) if total else None,
                        "projected_publishes_per_s": (
                            round(published / max(spent)) if max(spent) > 0 else None
                        ),
                    }
                )
        keys = {name: redis[name].keys() for name in servers}
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in servers.values():
            proc.wait(30)
        for procs in redis.values():
            procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    rows: dict[str, Any] = {}
    for name in LAYOUTS:
        if name in skipped:
            rows[name] = {"measured": False, "reason": skipped[name]}
            continue
        got = samples[name]

        def med(key: str, got: list[dict[str, Any]] = got) -> float:
            return round(statistics.median(float(s[key] or 0) for s in got), 2)

        per_proc = [
            round(statistics.median(s["redis_cpu_s"][i] for s in got), 3)
            for i in range(LAYOUTS[name][0])
        ]
        rows[name] = {
            "measured": True,
            "publishes_per_s": med("publishes_per_s"),
            "server_cpu_util": med("server_cpu_util"),
            "redis_us_per_publish": med("redis_us_per_publish"),
            "publishes_per_script_call": med("publishes_per_script_call"),
            "publishes_per_redis_cpu_s": med("publishes_per_redis_cpu_s"),
            "projected_publishes_per_s": med("projected_publishes_per_s"),
            "redis_cpu_s_per_process": per_proc,
            "publishes_per_redis_cpu_s_per_process": [
                round(statistics.median(s["published"] for s in got) / c) if c else None
                for c in per_proc
            ],
            "keys_per_process": keys.get(name, []),
            "lost": sum(int(s["lost"]) for s in got),
        }
    return {
        "conns": conns,
        "duration_s": duration,
        "rounds": rounds,
        "history_size": HISTORY_SIZE,
        "layouts": rows,
        "samples": samples,
    }


def markdown(result: dict[str, Any]) -> list[str]:
    """The table of `measure`'s result, as docs/performance.md shows it."""
    out = [
        f"Publishes through Redis: {result['conns']} connections on their own channels, "
        f"`HISTORY_SIZE={result['history_size']}`, median of {result['rounds']} rounds "
        f"of {result['duration_s']} s",
        "",
        "| layout | publishes/s (2-core bound) | publishes per script call "
        "| Redis µs/publish (total) "
        "| publishes per Redis CPU-s (total) | Redis CPU-s per process "
        "| publishes per Redis CPU-s, per process | projected publishes/s (busiest Redis "
        "on its own core) | keys per process |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["layouts"].items():
        if not row["measured"]:
            out.append(f"| {name} | {row['reason']} | | | | | | | |")
            continue
        per = ", ".join(f"{c:.2f}" for c in row["redis_cpu_s_per_process"])
        rates = row["publishes_per_redis_cpu_s_per_process"]
        per_rate = ", ".join(f"{r / 1000:.0f}k" for r in rates)
        out.append(
            f"| {name} | {row['publishes_per_s'] / 1000:.1f}k | {row['publishes_per_script_call']} "
            f"| {row['redis_us_per_publish']} "
            f"| {row['publishes_per_redis_cpu_s'] / 1000:.0f}k | {per} | {per_rate} "
            f"| {row['projected_publishes_per_s'] / 1000:.0f}k "
            f"| {', '.join(map(str, row['keys_per_process']))} |"
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--tree", type=Path, default=ROOT, help="the source tree to run (built)")
    args = p.parse_args()
    for tool in ("redis-server", "redis-cli", "taskset"):
        if shutil.which(tool) is None:
            print(f"bench/shards.py: {tool} is missing", file=sys.stderr)
            return 2
    result = measure(rounds=args.rounds, duration=args.duration, conns=args.conns, tree=args.tree)
    result["tree"] = str(args.tree)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (RESULTS / f"shards-{stamp}.json").write_text(json.dumps(result, indent=1))
    print("\n".join(markdown(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
