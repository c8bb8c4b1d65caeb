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
- connections: server RSS per idle connection at 5000 and 15000, and connections set up/s;
- fanout-deflate: 1 -> 1000 with a 2 KB JSON content, aether-fast and socketify without and
  with permessage-deflate: deliveries/s, bytes on the wire and CPU per delivery;
- connections-deflate: idle RSS per connection, plain and deflate-negotiated.

Results go to bench/results/: <timestamp>.json (everything, with machine, CPU model, commit and
versions), latest.md (the tables: median of the runs with min-max) and PNG charts. Only the
processes this runner started are stopped, each by its PID.

This file is the command line and the order of a run; bench/servers.py starts and stops the
servers, bench/scenarios.py runs the load generator for each scenario, bench/report.py
writes the results.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from report import build_report, cpu_busy, write_report
from scenarios import (
    PROFILES,
    SCENARIOS,
    Sample,
    Urls,
    build_loadgen,
    make_urls,
    run_micro,
    run_server,
    say,
)
from servers import BENCH, LOADGEN_CPU, SERVERS, Json, available_servers, stop_started

RESULTS = BENCH / "results"
OWN_SERVERS = ("aether-fast", "aether-fast-deflate", "write-floor")


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="aether-bench-") as tmp:
        yield Path(tmp)


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
            say(f"{name}: not available: {info['reason']}")

    busy_before = cpu_busy()
    if busy_before > 0.1:
        say(f"warning: the machine is {busy_before:.0%} busy before the run: results are noisy")
    samples: list[Sample] = []
    micro: Json | None = None
    try:
        with _workdir() as tmp:
            if not args.no_micro:
                say("micro benchmarks")
                micro = run_micro(profile, tmp)
            maker = Urls(tmp)
            for run in range(runs):
                say(f"run {run + 1}/{runs}: minting tokens")
                urls = make_urls(maker, profile, scenarios)
                for spec in specs:
                    samples += run_server(spec, tmp, urls, profile, run, scenarios)
    finally:
        stop_started()

    report = build_report(
        stamp=stamp,
        runs=runs,
        profile=profile,
        scenarios=scenarios,
        busy_before=busy_before,
        servers=server_info,
        micro=micro,
        samples=samples,
    )
    json_path, markdown = write_report(report, out_dir, charts=not args.smoke, started=started)
    print(markdown)
    if scratch is None:
        say(f"wrote {json_path} and {out_dir / 'latest.md'} in {report['meta']['elapsed_s']} s")

    # in the smoke, our own code (aether-fast, the write floor, the runner and the load
    # generator) must work; a third-party peer that fails is reported, not fatal
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    failures = [s for s in samples if s.error and s.server in OWN_SERVERS]
    for s in samples:
        if s.error and s.server not in OWN_SERVERS:
            say(f"warning: {s.server} {s.scenario} {s.case}: {s.error}")
    if args.smoke:
        lost = [s for s in samples if s.server.startswith("aether-fast") and s.metrics.get("lost")]
        bad_micro = micro is not None and micro.get("returncode") != 0
        for s in failures:
            say(f"FAIL {s.server} {s.scenario} {s.case}: {s.error}")
        for s in lost:
            say(f"FAIL aether-fast lost messages in {s.scenario} {s.case}: {s.metrics['lost']}")
        if bad_micro and micro is not None:
            say(f"FAIL micro benchmarks: {micro.get('error', '')[-1000:]}")
        if failures or lost or bad_micro:
            return 1
        print(f"bench-smoke: {len(samples)} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
