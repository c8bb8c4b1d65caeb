"""Before and after in one run: an earlier commit against the working tree, alternating.

The earlier commit is checked out with `git worktree` into a temporary directory and its
extension built there; both trees then run under the same interpreter (this venv), the same
load generator (bench/build/loadgen) and the same Redis, server on CPU 0 and load generator
on CPU 1, old and new taking turns `--rounds` times so that drift on a noisy machine hits
both. Each round measures:

- through Redis (one worker): round trips with 50 connections (echo=1, each on its own
  channel) and fan-out 1 -> 1000 with 64 in flight;
- with the in-memory broker: round trips with 50 connections and with 1; connections set up
  per second (5000, each with its own JWT, each joining its own channel) and the server's
  RSS per idle connection once they are all open.

Writes bench/results/before-after-<time>.json (every round, medians, ratios) and prints the
table. Usage: python bench/before_after.py REV [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
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

from workers import SECRET, free_port, loadgen, serve_pinned, wait_port  # noqa: E402

LOADGEN = ROOT / "bench" / "build" / "loadgen"
RESULTS = ROOT / "bench" / "results"


def mint(tmp: Path) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT))
    from aether_fast.auth import mint_token
    from aether_fast.config import load_config

    config = load_config({"JWT_SECRET": SECRET})

    def write(name: str, count: int, line: str) -> Path:
        path = tmp / f"{name}.txt"
        tokens = (mint_token(config, f"{name}{i}", ttl_s=7200) for i in range(count))
        path.write_text("".join(line.format(i=i, t=t) for i, t in enumerate(tokens)))
        return path

    return {
        "rtt": write("r", 50, "/ws?token={t}&client_id=rc{i}&channel=rch{i}&echo=1\n"),
        "fan": write("f", 1001, "/ws?token={t}&client_id=fc{i}&channel=fan\n"),
        "conn": write("k", 5000, "/ws?token={t}&client_id=kc{i}&channel=kch{i}\n"),
    }


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start(tree: Path, tmp: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    proc, port = serve_pinned(tmp, {"MAX_CONNECTIONS": "19000", **env}, tree)
    time.sleep(0.5)
    return proc, port


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def one_round(tree: Path, tmp: Path, urls: dict[str, Path], redis_port: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    subprocess.run(["redis-cli", "-p", str(redis_port), "flushall"], capture_output=True)
    proc, port = start(tree, tmp, {"BROKER_URL": f"redis://127.0.0.1:{redis_port}/0"})
    try:
        time.sleep(1)
        rtt = loadgen("rtt", port, urls["rtt"], proc.pid, cpu="1", conns=50, duration=4)["phases"][
            0
        ]
        out["redis_round_trips_50"] = rtt["round_trips_per_s"]
        fan = loadgen(
            "fanout", port, urls["fan"], proc.pid, cpu="1", subs=1000, windows=64, messages=5000
        )
        out["redis_fanout_1000_w64"] = fan["phases"][0]["deliveries_per_s"]
        out["redis_fanout_lost"] = fan["phases"][0]["lost"]
    finally:
        stop(proc)
    proc, port = start(tree, tmp, {})
    try:
        rtt = loadgen("rtt", port, urls["rtt"], proc.pid, cpu="1", conns=50, duration=4)["phases"][
            0
        ]
        out["round_trips_50"] = rtt["round_trips_per_s"]
        rtt = loadgen("rtt", port, urls["rtt"], proc.pid, cpu="1", conns=1, duration=3)["phases"][0]
        out["round_trips_1"] = rtt["round_trips_per_s"]
        base = rss_kib(proc.pid)
        argv = ["taskset", "-c", "1", str(LOADGEN), "connect", "--port", str(port), "--urls"]
        argv += [str(urls["conn"]), "--server-pid", str(proc.pid), "--ready-frames", "1"]
        argv += ["--conns", "5000", "--hold", "5", "--concurrency", "256"]
        holder = subprocess.Popen(argv, stdout=subprocess.PIPE)
        assert holder.stdout is not None
        first = json.loads(holder.stdout.readline().decode())
        time.sleep(1)
        out["connections_per_s"] = first["connections_per_s"]
        out["kib_per_idle_connection"] = round((rss_kib(proc.pid) - base) / first["connected"], 2)
        holder.wait(60)
    finally:
        stop(proc)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("rev", help="the commit to compare the working tree with")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="aether-before-after-"))
    old = tmp / "old"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "-f", str(old), args.rev], check=True
    )
    redis = None
    try:
        subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=old, check=True
        )
        urls = mint(tmp)
        redis_port = free_port()
        redis = subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        wait_port(redis_port)
        rounds: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
        for i in range(args.rounds):
            for name, tree in (("before", old), ("after", ROOT)):
                rounds[name].append(one_round(tree, tmp, urls, redis_port))
                print(f"round {i + 1} {name}: {rounds[name][-1]}", flush=True)
    finally:
        if redis is not None:
            redis.terminate()
            redis.wait(10)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)])
        shutil.rmtree(tmp, ignore_errors=True)
    medians = {}
    for key in rounds["after"][0]:
        before = statistics.median(r[key] for r in rounds["before"])
        after = statistics.median(r[key] for r in rounds["after"])
        medians[key] = {
            "before": before,
            "after": after,
            "ratio": round(after / before, 2) if before else None,
        }
        print(f"{key:26s} {before:>12} -> {after:>12}  x{medians[key]['ratio']}")
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"before-after-{stamp}.json").write_text(
        json.dumps(
            {"before": args.rev, "after": commit, "rounds": rounds, "medians": medians}, indent=1
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
