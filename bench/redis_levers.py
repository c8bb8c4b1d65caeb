"""The levers of the Redis publish script, each measured alone: Redis CPU per message.

No aether-fast here: a `redis-server` of our own and this process, which sends the publish
script of aether_fast/brokers/redis.py batches shaped like the round-trip scenario of
bench/redis_cpu.py (50 channels, one sender each, 20 messages a call, one call in flight,
every publication read by a subscriber connection), and reads the redis-server process's
utime + stime before and after. Each lever is the committed script with that one change
undone (or made), so its row says what the change is worth; the variants take turns, round
after round, and the median is reported. Each round uses new senders, whose dedupe windows
are young (at most 500 sequences each): what most senders have.

Rows: the committed script; without the window's highest sequence (`h`); `MAXLEN` exact
instead of `~`; a PEXPIRE per key and message instead of a PEXPIREAT per key and call; the
same script as a Redis Function (FCALL); over a Unix socket; `history_size` 0; the script
before issue 14 (from git, when the clone has that commit); and the floor of a PUBLISH
path with no offset and no dedupe (what a broker without those guarantees would cost).

Usage: python bench/redis_levers.py [--rounds 5] [--messages 25000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hiredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aether_fast.brokers import redis as broker  # noqa: E402
from aether_fast.brokers.redis_link import PREFIX  # noqa: E402

RESULTS = ROOT / "bench" / "results"
#: the commit whose publish script was measured as "before" (16-18 µs end to end)
BEFORE = "6d876b7"
CHANNELS = 50
BATCH = 20
HEAD = (
    '{"type":"message","action":"send","data":{"channel":"%s","content":"M%020d'
    + "x" * 43
    + '","metadata":{"sequence":%d,"timestamp":"2026-12-07T00:00:00.000Z","offset":'
)
TAIL = ',"client_id":"%s","user_id":"%s"}}}'
TS = "2026-12-07T00:00:00.000Z"


class Conn:
    """One blocking RESP connection (hiredis packs and parses)."""

    def __init__(self, port: int, path: str | None = None) -> None:
        if path is not None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(path)
        else:
            self.sock = socket.create_connection(("127.0.0.1", port))
        self.reader = hiredis.Reader()

    def send(self, args: list[Any]) -> None:
        self.sock.sendall(hiredis.pack_command(tuple(args)))

    def read(self) -> Any:
        while (reply := self.reader.gets()) is False:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("redis closed the connection")
            self.reader.feed(data)
        if isinstance(reply, hiredis.ReplyError):
            raise RuntimeError(str(reply))
        return reply

    def call(self, *args: Any) -> Any:
        self.send(list(args))
        return self.read()


Message = dict[str, Any]
#: a variant: (load it on a connection -> how to call it, build one call's arguments)
Builder = Callable[[list[Message], str], list[Any]]


def message_keys(m: Message) -> list[Any]:
    """A message's 3 keys in both layouts: the channel's meta, its history, the dedupe key."""
    meta, hist = broker._keys(m["channel"])
    return [meta, hist, f"{PREFIX}dedupe:{{{m['channel']}}}:{m['who']}"]


def new_layout(history: int) -> Builder:
    """The committed script's arguments (brokers/redis.py)."""

    def build(batch: list[Message], how: str) -> list[Any]:
        keys: list[Any] = []
        args: list[Any] = []
        for m in batch:
            keys += message_keys(m)
            args += [m["seq"], m["seq"] % 1024, history, broker.PUB + m["channel"], m["who"]]
            args += [m["head"], m["tail"], TS]
        return [*how.split(), len(keys), *keys, 3600000, 300000, 86400000, "0badcafe", *args]

    return build


def old_layout(batch: list[Message], how: str) -> list[Any]:
    """The arguments of the script before issue 14: 3 keys and 12 arguments a message."""
    keys: list[Any] = []
    args: list[Any] = []
    for m in batch:
        keys += message_keys(m)
        args += [m["seq"], 100, 3600000, 300000, broker.PUB + m["channel"], m["who"]]
        args += [m["head"], m["tail"], "0badcafe", TS, m["seq"] % 1024, 86400000]
    return [*how.split(), len(keys), *keys, *args]


def publish_only(batch: list[Message], how: str) -> list[Any]:
    args: list[Any] = []
    for m in batch:
        args += [broker.PUB + m["channel"], m["head"] + b"0" + m["tail"]]
    return [*how.split(), 0, *args]


PUBLISH_ONLY = """
for i = 1, #ARGV, 2 do redis.call('PUBLISH', ARGV[i], ARGV[i + 1]) end
return #ARGV / 2
"""


def undo(script: str, old: str, new: str) -> str:
    """`script` with `old` replaced: the lever's text must be there (else this bench is out
    of date with the script, and says so)."""
    if old not in script:
        raise SystemExit(f"bench/redis_levers.py: the publish script no longer has {old!r}")
    return script.replace(old, new)


def variants() -> dict[str, tuple[str, Builder, bool]]:
    """name -> (Lua text, argument builder, as a Function)"""
    now = broker._PUBLISH
    no_high = undo(
        now, "local high = tonumber(redis.call('HGET', dedupe, 'h'))", "local high = false"
    ).replace("local first = not high and redis.call('EXISTS', dedupe) == 0", "local first = false")
    exact = undo(now, "'MAXLEN', '~',", "'MAXLEN',")
    per_message = now
    for key, ttl in (("meta", "ARGV[3]"), ("hist", "ARGV[1]"), ("dedupe", "ARGV[2]")):
        per_message = undo(per_message, f"if not ttl_set[{key}] then", "if true then")
        per_message = undo(
            per_message,
            f"redis.call('PEXPIREAT', {key}, {key}_at)",
            f"redis.call('PEXPIRE', {key}, {ttl})",
        )
    rows: dict[str, tuple[str, Builder, bool]] = {
        "committed script": (now, new_layout(100), False),
        "without the highest sequence 'h'": (no_high, new_layout(100), False),
        "MAXLEN exact instead of ~": (exact, new_layout(100), False),
        "PEXPIRE per key and message": (per_message, new_layout(100), False),
        "as a Redis Function (FCALL)": (now, new_layout(100), True),
        "over a Unix socket": (now, new_layout(100), False),
        "history_size 0": (now, new_layout(0), False),
    }
    old = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{BEFORE}:aether_fast/brokers/redis.py"],
        capture_output=True,
        text=True,
    )
    if old.returncode == 0:
        namespace: dict[str, Any] = {}
        start = old.stdout.index('_PUBLISH = """')
        exec(old.stdout[start : old.stdout.index('"""', start + 14) + 3], namespace)
        rows[f"script before issue 14 ({BEFORE})"] = (namespace["_PUBLISH"], old_layout, False)
    rows["floor: PUBLISH only (no offset, no dedupe)"] = (PUBLISH_ONLY, publish_only, False)
    return rows


def drain(sub: Conn) -> None:
    """Read (and drop) every publication, as a worker's subscriber would."""
    while sub.sock.recv(1 << 20):
        pass


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(tmp: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    for _ in range(5):  # a free port may be taken by someone else before redis binds it
        port = free_port()
        path = str(tmp / f"redis-{port}.sock")
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(tmp), "--unixsocket", path]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                Conn(port).call("PING")
                return proc, port, path
            except OSError:
                time.sleep(0.05)
        proc.kill()
        proc.wait()
    raise RuntimeError("redis-server did not start")


def measure(rounds: int = 5, messages: int = 25000) -> dict[str, Any]:
    rows = variants()  # first: an out-of-date lever stops here, before Redis is started
    tmp = Path(tempfile.mkdtemp(prefix="aether-levers-"))
    proc, port, path = start_redis(tmp)
    samples: dict[str, list[float]] = {name: [] for name in rows}
    try:
        tcp, unix = Conn(port), Conn(port, path)
        loaded: dict[str, str] = {}
        for i, (name, (text, _, function)) in enumerate(rows.items()):
            if function:
                lib = f"#!lua name=lever{i}\nredis.register_function('publish{i}', "
                lib += f"function(KEYS, ARGV)\n{text}\nend)\n"
                tcp.call("FUNCTION", "LOAD", "REPLACE", lib)
                loaded[name] = f"FCALL publish{i}"
            else:
                tcp.call("SCRIPT", "LOAD", text)
                loaded[name] = "EVALSHA " + hashlib.sha1(text.encode()).hexdigest()
        sub = Conn(port)
        sub.send(["PSUBSCRIBE", broker.PUB + "*"])
        sub.read()
        threading.Thread(target=drain, args=(sub,), daemon=True).start()
        seq = int(time.time() * 1e6)
        for r in range(rounds + 1):  # the first round warms up and is not counted
            for v, (name, (_, build, _)) in enumerate(rows.items()):
                conn = unix if name == "over a Unix socket" else tcp
                senders = [
                    {"channel": f"lv{v}-r{r}-c{c}", "who": f"u{v}-{r}-{c}\x1fc{c}"}
                    for c in range(CHANNELS)
                ]
                before = cpu_s(proc.pid)
                for n in range(0, messages, BATCH):
                    batch = []
                    for k in range(BATCH):
                        s = senders[(n + k) % CHANNELS]
                        seq += 1
                        batch.append(
                            {
                                **s,
                                "seq": seq,
                                "head": (HEAD % (s["channel"], seq, seq)).encode(),
                                "tail": (TAIL % (s["who"][-2:], s["who"][:4])).encode(),
                            }
                        )
                    conn.send(build(batch, loaded[name]))
                    conn.read()
                if r:
                    samples[name].append(round((cpu_s(proc.pid) - before) * 1e6 / messages, 2))
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "rounds": rounds,
        "messages_per_round": messages,
        "channels": CHANNELS,
        "batch": BATCH,
        "us_per_message": {name: statistics.median(s) for name, s in samples.items()},
        "samples": samples,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--messages", type=int, default=25000)
    args = p.parse_args()
    if shutil.which("redis-server") is None:
        print("bench/redis_levers.py: redis-server is missing", file=sys.stderr)
        return 2
    result = measure(args.rounds, args.messages)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (RESULTS / f"redis-levers-{stamp}.json").write_text(json.dumps(result, indent=1))
    for name, us in result["us_per_message"].items():
        print(f"{us:6.2f} µs  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
