"""The scenarios of bench/run.py: what each one runs with the C load generator (bench/loadgen.c).

- `PROFILES`: the sizes of a full, quick and smoke run (subscribers, windows, rates,
  connections, durations);
- the load generator: `build_loadgen` compiles it when stale, `loadgen_args` builds its
  command line (pinned to the load generator's CPU), `run_loadgen_clean` runs it once more
  while something else disturbed it (`NOISY`), `Holder` keeps a `connect` run's
  connections open, `parsebench` measures its own parse ceiling;
- `Urls`: its URL-line files, one JWT per connection;
- `scenario_fanout`, `scenario_latency`, `scenario_rtt` (one server process for the three,
  restarted when it died: `run_server`) and `scenario_connections` (a fresh server): each
  turns the load generator's phases into `Sample`s, one per case;
- permessage-deflate (issue 15): `scenario_fanout_deflate` (1 → S with a 2 KB JSON content,
  the deflate rows offering the extension) and `scenario_connections_deflate` (idle RSS per
  connection, plain and deflate-negotiated, each on a fresh server); `takes_part` says which
  server runs which scenario;
- `run_micro`: the pytest-benchmark micro benchmarks (bench/micro), pinned to the server CPU.

The numbers are not judged here: bench/report.py summarizes and renders them.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servers import (
    BENCH,
    LOADGEN_CPU,
    ROOT,
    SECRET,
    SERVER_CPU,
    STARTED,
    Json,
    ServerProcess,
    ServerSpec,
    pinned,
    start_server,
)

LOADGEN_SRC = BENCH / "loadgen.c"
LOADGEN = BENCH / "build" / "loadgen"
#: source addresses 127.0.0.2 .. 127.0.0.(1 + SRC_IPS): past the ephemeral-port limit
SRC_IPS = 8
#: the load generator counts as the bottleneck from this CPU share of its core on
LOADGEN_BOUND = 0.90
#: a cell is marked noisy when something else used more than this share of a CPU meanwhile
NOISY = 0.15

#: one sample's numbers, by name
Metrics = dict[str, float | int | bool | None]


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
    # permessage-deflate (fanout-deflate, connections-deflate)
    deflate_subs: int = 1000
    deflate_windows: tuple[int, ...] = (16, 64)
    deflate_messages: int = 3000
    deflate_duration: float = 4.0  # the publisher stops sending after this many seconds
    json_content: int = 2048  # bytes of JSON in each publication's content
    deflate_conns: int = 5000  # idle connections, plain and deflate-negotiated

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
        deflate_messages=600,
        deflate_duration=1.0,
        deflate_conns=2000,
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
        deflate_subs=20,
        deflate_windows=(4, 16),
        deflate_messages=20,
        deflate_duration=2.0,
        deflate_conns=50,
    ),
}

SCENARIOS = ("fanout", "latency", "rtt", "connections", "fanout-deflate", "connections-deflate")
#: the rows of fanout-deflate: aether-fast and socketify without and with permessage-deflate
DEFLATE_ROWS = ("aether-fast", "aether-fast-deflate", "socketify", "socketify-deflate")


def takes_part(spec: ServerSpec, scenario: str) -> bool:
    """Whether `spec` runs `scenario`: a spec with `only` runs those; fanout-deflate runs on
    DEFLATE_ROWS, connections-deflate on the deflate specs; the rest on every other spec."""
    if spec.only:
        return scenario in spec.only
    if scenario == "fanout-deflate":
        return spec.name in DEFLATE_ROWS
    return scenario != "connections-deflate"


_T0 = time.monotonic()


def say(text: str) -> None:
    """A progress line on stderr, with the seconds since the runner started."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- load generator


def build_loadgen() -> Path:
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= LOADGEN_SRC.stat().st_mtime:
        return LOADGEN
    LOADGEN.parent.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "gcc")
    subprocess.run(
        [cc, "-O2", "-Wall", "-Wextra", "-o", str(LOADGEN), str(LOADGEN_SRC), "-lz"], check=True
    )
    return LOADGEN


class LoadgenError(RuntimeError):
    pass


def loadgen_args(mode: str, server: ServerProcess, urls: Path, **opts: Any) -> list[str]:
    """The load generator's command line against `server`, pinned to its CPU; each option
    `name=value` becomes `--name value` (`_` as `-`, a list or tuple joined with commas)."""
    argv = [
        str(LOADGEN),
        mode,
        "--port",
        str(server.port),
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
        if isinstance(value, bool):  # a flag: given when True
            argv += [f"--{key.replace('_', '-')}"] if value else []
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return pinned(LOADGEN_CPU, argv)


def run_loadgen(argv: list[str], timeout: float) -> Json:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    STARTED.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise LoadgenError(f"loadgen did not finish within {timeout:.0f} s") from None
    finally:
        STARTED.discard(proc)
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
        say(f"    noisy ({_noise(best):.0%} of a CPU used by something else): once more")
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


class Holder:
    """A load generator in `connect` mode holding its connections until stdin closes."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        STARTED.add(self.proc)

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
            STARTED.discard(self.proc)
        lines = [json.loads(ln) for ln in out.decode().splitlines() if ln.strip()]
        return lines[-1] if lines else {}


def parsebench() -> Json:
    """The load generator alone, in memory: frames/s it can count (its parse ceiling)."""
    out = subprocess.run(
        pinned(LOADGEN_CPU, [str(LOADGEN), "parsebench"]), capture_output=True, timeout=60
    )
    result: Json = json.loads(out.stdout.decode().splitlines()[0])
    return result


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


def make_urls(maker: Urls, profile: Profile, scenarios: Sequence[str]) -> dict[str, Path]:
    """The URL files a run of `scenarios` needs, by the name the scenarios read them under."""
    urls: dict[str, Path] = {}
    if "fanout" in scenarios:
        for subs in profile.fanout_subs:
            urls[f"fanout-{subs}"] = maker.make(subs + 1, f"fanout-{subs}")
    if "latency" in scenarios:
        urls["latency"] = maker.make(profile.latency_subs + 1, "latency")
    if "rtt" in scenarios:
        urls["rtt"] = maker.make(max(profile.rtt_conns), None, echo=True)
    if "fanout-deflate" in scenarios:
        urls["fanout-deflate"] = maker.make(profile.deflate_subs + 1, "fanout-deflate")
    if "connections-deflate" in scenarios:
        urls["deflate-warm"] = maker.make(100, "idle")
        urls["deflate-idle"] = maker.make(profile.deflate_conns, "idle")
    if "connections" in scenarios:
        urls["warm"] = maker.make(100, "idle")
        held = 0
        for count in profile.conn_counts:  # each step adds its own connections
            urls[f"conn-{count}"] = maker.make(count - held, "idle")
            held = count
    return urls


# ---------------------------------------------------------------------------- scenarios


@dataclass(slots=True)
class Sample:
    server: str
    run: int
    scenario: str
    case: str
    metrics: Metrics
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


def _phase_common(ph: Json) -> Metrics:
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


def _phase_samples(
    server: ServerProcess,
    run: int,
    scenario: str,
    argv: list[str],
    profile: Profile,
    *,
    need: int,
    by: str,
    cases: Sequence[tuple[int, str]],
    metrics: Callable[[Json], Metrics],
    check: Callable[[Json], str | None] = lambda ph: None,
    no_phase: str | None = None,
    check_run: Callable[[Json], str | None] = lambda result: None,
    run_metrics: Callable[[Json], Metrics] = lambda result: {},
) -> list[Sample]:
    """One load generator run with `need` connections whose phases are `cases`: (the value
    of the phase's field `by`, the case's name). A Sample per case: `metrics(phase)`, or an
    error when the run failed or its phase is missing. The run's problem (too few
    connected, no phase) goes with every case; `check(phase)` may add one, which goes with
    that case and the later ones; `no_phase` is the error of a missing phase otherwise.
    `check_run(result)` may add a problem of the whole run, `run_metrics(result)` metrics of
    the whole run to every case."""
    name = server.spec.name
    try:
        result = run_loadgen_clean(argv, 200, profile.noisy_retries)
    except LoadgenError as e:
        return [Sample(name, run, scenario, case, {}, None, str(e)) for _, case in cases]
    problem = _check_connected(result, need) or check_run(result)
    phases = {ph[by]: ph for ph in result["phases"]}
    samples = []
    for value, case in cases:
        ph = phases.get(value)
        if ph is None:
            samples.append(Sample(name, run, scenario, case, {}, result, problem or no_phase))
            continue
        problem = problem or check(ph)
        values = {**metrics(ph), **run_metrics(result)}
        samples.append(Sample(name, run, scenario, case, values, ph, problem))
    return samples


def _fanout_metrics(ph: Json) -> Metrics:
    return {
        "deliveries_per_s": round(float(ph["deliveries_per_s"]), 1),
        "deliveries": int(ph["deliveries"]),
        "messages": int(ph["messages"]),
        "seconds": round(float(ph["seconds"]), 4),
        **_phase_common(ph),
    }


def scenario_fanout(
    server: ServerProcess, urls: dict[str, Path], profile: Profile, run: int
) -> list[Sample]:
    samples = []
    for subs in profile.fanout_subs:
        messages = profile.messages_for(subs)
        argv = loadgen_args(
            "fanout",
            server,
            urls[f"fanout-{subs}"],
            subs=subs,
            messages=messages,
            windows=profile.windows,
            duration=profile.fanout_duration,
            grace=profile.grace,
            warmup=max(10, int(messages * profile.warmup)) if profile.warmup > 0 else 0,
            timeout=120,
        )
        cases = [(w, f"S={subs} W={w}") for w in profile.windows]
        samples += _phase_samples(
            server,
            run,
            "fanout",
            argv,
            profile,
            need=subs + 1,
            by="window",
            cases=cases,
            metrics=_fanout_metrics,
            no_phase="no data",
        )
    return samples


def _latency_metrics(ph: Json) -> Metrics:
    return {
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


def scenario_latency(
    server: ServerProcess, urls: dict[str, Path], profile: Profile, run: int
) -> list[Sample]:
    argv = loadgen_args(
        "latency",
        server,
        urls["latency"],
        subs=profile.latency_subs,
        rates=profile.rates,
        duration=profile.latency_duration,
        grace=profile.grace,
        timeout=120,
    )
    cases = [(r, f"{r}/s") for r in profile.rates]
    return _phase_samples(
        server,
        run,
        "latency",
        argv,
        profile,
        need=profile.latency_subs + 1,
        by="rate",
        cases=cases,
        metrics=_latency_metrics,
    )


def _rtt_metrics(ph: Json) -> Metrics:
    return {
        "round_trips_per_s": round(float(ph["round_trips_per_s"]), 1),
        "round_trips": int(ph["round_trips"]),
        "p50_us": round(float(ph["p50_us"]), 1),
        "p99_us": round(float(ph["p99_us"]), 1),
        **_phase_common(ph),
    }


def _no_round_trip(ph: Json) -> str | None:
    if int(ph["round_trips"]) == 0:
        return "no round trip completed (is echo to the sender supported?)"
    return None


def scenario_rtt(
    server: ServerProcess, urls: dict[str, Path], profile: Profile, run: int
) -> list[Sample]:
    argv = loadgen_args(
        "rtt",
        server,
        urls["rtt"],
        conns=profile.rtt_conns,
        duration=profile.rtt_duration,
        grace=profile.grace,
        timeout=120,
    )
    cases = [(c, f"C={c}") for c in profile.rtt_conns]
    return _phase_samples(
        server,
        run,
        "rtt",
        argv,
        profile,
        need=max(profile.rtt_conns),
        by="conns",
        cases=cases,
        metrics=_rtt_metrics,
        check=_no_round_trip,
    )


def _deflate_problem(spec: ServerSpec, result: Json) -> str | None:
    """What is wrong with permessage-deflate in a run: a deflate row whose connections did
    not all negotiate it, a sample check that failed, or no publication checked at all."""
    offer, checks = result["deflate"], result["samples"]
    if spec.deflate and int(offer["negotiated"]) < int(result["connected"]):
        return (
            f"offered permessage-deflate: {offer['negotiated']} of {result['connected']} "
            f"connections negotiated it (the answer: {offer['response']})"
        )
    if int(checks["errors"]):
        return f"{checks['errors']} sample checks failed: {checks['first_error']}"
    if not int(checks["ok"]):
        return "no publication was checked on the sample connections"
    return None


def _deflate_run_metrics(result: Json) -> Metrics:
    checks = result["samples"]
    out = int(checks["out_bytes"])
    return {
        "negotiated": int(result["deflate"]["negotiated"]),
        "content_bytes": int(result["content_bytes"]),
        "samples_checked": int(checks["frames"]),
        "sample_errors": int(checks["errors"]),
        # compressed payload / inflated payload of the checked frames (None: none compressed)
        "inflate_ratio": round(int(checks["in_bytes"]) / out, 3) if out else None,
    }


def _fanout_deflate_metrics(ph: Json) -> Metrics:
    """The fan-out metrics, and per delivery: the bytes on the wire (frame header + payload),
    the server's and the load generator's CPU time (µs; None for a phase too short for the
    server's 10 ms clock ticks); the share of frames that came compressed."""
    frames = max(1, int(ph["rx_frames"]))
    deliveries = max(1, int(ph["deliveries"]))
    long_enough = float(ph["seconds"]) >= 0.25 and float(ph["server_cpu_s"]) >= 0
    return {
        **_fanout_metrics(ph),
        "wire_bytes_per_delivery": round(int(ph["data_wire_bytes"]) / frames, 1),
        "compressed_share": round(int(ph["compressed_frames"]) / frames, 3),
        "server_cpu_us_per_delivery": (
            round(float(ph["server_cpu_s"]) * 1e6 / deliveries, 3) if long_enough else None
        ),
        "loadgen_cpu_us_per_delivery": round(float(ph["loadgen_cpu_s"]) * 1e6 / deliveries, 3),
    }


def scenario_fanout_deflate(
    server: ServerProcess, urls: dict[str, Path], profile: Profile, run: int
) -> list[Sample]:
    """1 publisher -> deflate_subs subscribers, a 2 KB JSON content (--json-content), the
    deflate rows offering permessage-deflate: deliveries/s, wire bytes and CPU per delivery;
    a few subscribers inflate and check every frame they get (bench/loadgen.c)."""
    spec = server.spec
    subs = profile.deflate_subs
    messages = profile.deflate_messages
    argv = loadgen_args(
        "fanout",
        server,
        urls["fanout-deflate"],
        subs=subs,
        messages=messages,
        windows=profile.deflate_windows,
        duration=profile.deflate_duration,
        grace=profile.grace,
        warmup=max(10, int(messages * profile.warmup)) if profile.warmup > 0 else 0,
        timeout=120,
        json_content=profile.json_content,
        deflate=spec.deflate,
    )

    def nothing_compressed(ph: Json) -> str | None:
        if spec.deflate and not int(ph["compressed_frames"]):
            return "permessage-deflate negotiated, but no frame came compressed"
        return None

    return _phase_samples(
        server,
        run,
        "fanout-deflate",
        argv,
        profile,
        need=subs + 1,
        by="window",
        cases=[(w, f"S={subs} W={w}") for w in profile.deflate_windows],
        metrics=_fanout_deflate_metrics,
        check=nothing_compressed,
        no_phase="no data",
        check_run=lambda result: _deflate_problem(spec, result),
        run_metrics=_deflate_run_metrics,
    )


def scenario_connections_deflate(
    spec: ServerSpec, tmp: Path, urls: dict[str, Path], profile: Profile, run: int
) -> list[Sample]:
    """Idle RSS per connection on a deflate row: `scenario_connections` with deflate_conns
    plain connections on one fresh server, then as many offering permessage-deflate (every
    one must negotiate it) on another."""
    n = profile.deflate_conns
    samples: list[Sample] = []
    for offer, label in ((False, "plain"), (True, "deflate")):
        samples += scenario_connections(
            spec,
            tmp,
            urls,
            profile,
            run,
            scenario="connections-deflate",
            steps=[(n, f"{label} N={n}", "deflate-idle")],
            warm="deflate-warm",
            deflate=offer,
        )
    return samples


def scenario_connections(
    spec: ServerSpec,
    tmp: Path,
    urls: dict[str, Path],
    profile: Profile,
    run: int,
    *,
    scenario: str = "connections",
    steps: Sequence[tuple[int, str, str]] = (),
    warm: str = "warm",
    deflate: bool = False,
) -> list[Sample]:
    """One fresh server, warmed with 100 connections (then closed); its RSS is the baseline.
    Idle connections are then added step by step (each joined to one channel, each with its
    own JWT) up to every count of the profile, and the RSS taken at each: KiB per connection
    is (RSS - baseline) / connections. The connections/s of a step is that of the
    connections it added (a later step opens its own on top of those already held).
    `steps` (count, case, URL file) replace the profile's conn_counts; with `deflate` every
    connection (the warm ones too) offers permessage-deflate and must negotiate it."""
    samples: list[Sample] = []
    if not steps:
        steps = [(n, f"N={n}", f"conn-{n}") for n in profile.conn_counts]
    cases = [case for _, case, _ in steps]
    try:
        server = start_server(spec, tmp)
    except RuntimeError as e:
        return [Sample(spec.name, run, scenario, c, {}, None, str(e)) for c in cases]
    holders: list[tuple[Holder, int]] = []
    try:
        warm_argv = loadgen_args("connect", server, urls[warm], conns=100, hold=0, deflate=deflate)
        run_loadgen(warm_argv, 120)
        time.sleep(profile.settle)
        rss0 = server.rss_kib()
        total = 0
        for count, case, url_key in steps:
            add = count - total
            holder = Holder(
                loadgen_args(
                    "connect",
                    server,
                    urls[url_key],
                    conns=add,
                    hold=180,
                    concurrency=256,
                    timeout=120,
                    connect_timeout=90,
                    deflate=deflate,
                )
            )
            holders.append((holder, add))
            first = holder.opened(150)
            connected = int(first["connected"])
            total += connected
            time.sleep(profile.settle)
            rss = server.rss_kib()
            problem = None
            negotiated = int(first["deflate"]["negotiated"])
            if connected < add:
                problem = f"only {connected} of {add} connected: {first['error']}"
            elif deflate and negotiated < connected:
                answer = first["deflate"]["response"]
                problem = f"{negotiated} of {connected} negotiated permessage-deflate ({answer})"
            if not server.alive():
                problem = f"server died: {server.tail()}"
            metrics: Metrics = {
                "kib_per_conn": round((rss - rss0) / max(1, total), 2),
                "connections_per_s": round(float(first["connections_per_s"]), 1),
                "connect_seconds": round(float(first["connect_seconds"]), 3),
                "connected": total,
                "added": connected,
                "rss_before_kib": rss0,
                "rss_after_kib": rss,
                "negotiated": negotiated,
            }
            samples.append(Sample(spec.name, run, scenario, case, metrics, first, problem))
            say(f"    {case}: {total} connections held")
            if problem:
                break
    except (LoadgenError, ValueError, KeyError, OSError, subprocess.TimeoutExpired) as e:
        done = {s.case for s in samples}
        samples += [
            Sample(spec.name, run, scenario, c, {}, None, repr(e)) for c in cases if c not in done
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


#: a scenario run against a server process already listening
Scenario = Callable[[ServerProcess, dict[str, Path], Profile, int], list[Sample]]


def run_server(
    spec: ServerSpec,
    tmp: Path,
    urls: dict[str, Path],
    profile: Profile,
    run: int,
    scenarios: Sequence[str],
) -> list[Sample]:
    """Every scenario of `scenarios` that `spec` takes part in: fan-out, latency and round
    trips on one server process (started again if it died meanwhile); connections,
    fanout-deflate and connections-deflate each on fresh ones."""
    samples: list[Sample] = []
    steps: list[tuple[str, Scenario]] = [
        ("fanout", scenario_fanout),
        ("latency", scenario_latency),
        ("rtt", scenario_rtt),
    ]
    steps = [s for s in steps if s[0] in scenarios and takes_part(spec, s[0])]
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
            say(f"  {spec.name}: {name}")
            samples += fn(server, urls, profile, run)
    except RuntimeError as e:
        samples.append(Sample(spec.name, run, "start", "-", {}, None, str(e)))
    finally:
        if server is not None:
            server.stop()
    if "connections" in scenarios and takes_part(spec, "connections"):
        say(f"  {spec.name}: connections")
        samples += scenario_connections(spec, tmp, urls, profile, run)
    if "fanout-deflate" in scenarios and takes_part(spec, "fanout-deflate"):
        say(f"  {spec.name}: fanout-deflate")
        samples += _on_fresh_server(spec, tmp, urls, profile, run, scenario_fanout_deflate)
    if "connections-deflate" in scenarios and takes_part(spec, "connections-deflate"):
        say(f"  {spec.name}: connections-deflate")
        samples += scenario_connections_deflate(spec, tmp, urls, profile, run)
    return samples


def _on_fresh_server(
    spec: ServerSpec,
    tmp: Path,
    urls: dict[str, Path],
    profile: Profile,
    run: int,
    fn: Scenario,
) -> list[Sample]:
    """`fn` against a server of its own, started for it and stopped after it."""
    try:
        server = start_server(spec, tmp)
    except RuntimeError as e:
        return [Sample(spec.name, run, "start", "-", {}, None, str(e))]
    try:
        return fn(server, urls, profile, run)
    finally:
        server.stop()


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
