"""A real Redis Cluster for the cluster-mode tests: `redis-server --cluster-enabled yes`
processes on free ports in a tmp dir, joined by `redis-cli --cluster create`, ended by
their PIDs.

`ClusterProcs(workdir, masters=3, replicas=0|1, tls=False)`: `url` (the BROKER_URL naming
every live node as a seed; `rediss+cluster://` with its CA when `tls`), `nodes` (every
process, a `Node` each: `client()`, `kill()` by PID), `masters()`, `owner(slot)`,
`replica_of(master)`, `wait_ok()`, `migrate_slot()`/`finish_migration()`, `stop()`.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis


def _cluster_port() -> int:
    """A free port P <= 55535 whose bus port P + 10000 is free too (Redis Cluster's rule)."""
    for _ in range(1000):
        port = random.randint(20000, 55000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass(frozen=True)
class Tls:
    """The files of a cluster that speaks only TLS (clients and the cluster bus)."""

    ca: Path
    cert: Path
    key: Path

    @staticmethod
    def make(d: Path) -> Tls:
        import trustme

        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1")
        tls = Tls(d / "ca.pem", d / "node.pem", d / "node.key")
        ca.cert_pem.write_to_path(str(tls.ca))
        server.cert_chain_pems[0].write_to_path(str(tls.cert))
        server.private_key_pem.write_to_path(str(tls.key))
        return tls


class Node:
    """One `redis-server --cluster-enabled yes` process that the tests own."""

    def __init__(self, workdir: Path, tls: Tls | None = None) -> None:
        self.tls = tls
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH: the cluster tests need a real Redis")
        self.port = _cluster_port()
        self.dir = workdir / str(self.port)
        self.dir.mkdir(parents=True)
        if tls is None:
            ports = ["--port", str(self.port)]
        else:
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cluster", "yes"]
            ports += ["--tls-replication", "yes", "--tls-auth-clients", "no"]
            ports += ["--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key)]
            ports += ["--tls-ca-cert-file", str(tls.ca)]
        self.proc = subprocess.Popen(
            [
                binary,
                *ports,
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{self.port}.conf",
                "--cluster-node-timeout",
                "1000",
                "--appendonly",
                "no",
                "--save",
                "",
                "--dir",
                str(self.dir),
                "--logfile",
                str(self.dir / "redis.log"),
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def client(self) -> redis.Redis:
        if self.tls is not None:
            return redis.Redis(
                host="127.0.0.1",
                port=self.port,
                socket_timeout=5,
                ssl=True,
                ssl_ca_certs=str(self.tls.ca),
            )
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def ping(self) -> bool:
        try:
            with self.client() as r:
                return bool(r.ping())
        except redis.RedisError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.running:
            os.kill(self.proc.pid, sig)
            self.proc.wait(10)

    def log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


class ClusterProcs:
    def __init__(
        self, workdir: Path, masters: int = 3, replicas: int = 0, *, tls: bool = False
    ) -> None:
        self.nodes: list[Node] = []
        workdir.mkdir(parents=True, exist_ok=True)
        self.tls = Tls.make(workdir) if tls else None
        try:
            self.nodes = [Node(workdir, self.tls) for _ in range(masters * (1 + replicas))]
            deadline = time.monotonic() + 10
            for node in self.nodes:
                while not node.ping():
                    if not node.running or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server {node.port} did not start: {node.log()}")
                    time.sleep(0.02)
            cli = shutil.which("redis-cli")
            if cli is None:
                raise RuntimeError("redis-cli is not on PATH: the cluster tests need it")
            cli_tls = [] if self.tls is None else ["--tls", "--cacert", str(self.tls.ca)]
            subprocess.run(
                [
                    cli,
                    *cli_tls,
                    "--cluster",
                    "create",
                    *(n.addr for n in self.nodes),
                    "--cluster-replicas",
                    str(replicas),
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=30,
            )
            self.wait_ok(replicas=replicas)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        """BROKER_URL: the live nodes as seeds."""
        seeds = ",".join(n.addr for n in self.nodes if n.running)
        if self.tls is not None:
            return f"rediss+cluster://{seeds}?ssl_ca_certs={self.tls.ca}"
        return "redis+cluster://" + seeds

    def by_port(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.running]

    def slots(self) -> list[Any]:
        """CLUSTER SLOTS as a live node says it."""
        for node in self.live():
            try:
                with node.client() as r:
                    return list(r.execute_command("CLUSTER SLOTS"))
            except redis.RedisError:
                continue
        raise RuntimeError("no cluster node answers")

    def owner(self, slot: int) -> Node:
        """The master serving `slot`, as a live node says it."""
        for start, end, master, *_ in self.slots():
            if start <= slot <= end:
                return self.by_port(int(master[1]))
        raise LookupError(slot)

    def masters(self) -> list[Node]:
        ports = {int(entry[2][1]) for entry in self.slots()}
        return [self.by_port(p) for p in sorted(ports)]

    def replica_of(self, master: Node) -> Node:
        for _start, _end, first, *replicas in self.slots():
            if int(first[1]) == master.port and replicas:
                return self.by_port(int(replicas[0][1]))
        raise LookupError(master.port)

    def wait_ok(self, timeout: float = 20.0, replicas: int = 0) -> None:
        """Every live node says `cluster_state:ok` and agrees on who serves every slot (and
        each master has `replicas` replicas)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                views = set()
                ok = True
                for node in self.live():
                    with node.client() as r:
                        info = r.execute_command("CLUSTER INFO")
                        ok = ok and info.get("cluster_state") == "ok"
                        table = r.execute_command("CLUSTER SLOTS")
                        views.add(tuple(sorted((s, e, int(m[1])) for s, e, m, *_ in table)))
                        ok = ok and all(len(entry) - 3 >= replicas for entry in table)
                if ok and len(views) == 1 and sum(e - s + 1 for s, e, _ in views.pop()) == 16384:
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not become ok")
            time.sleep(0.05)

    def node_id(self, node: Node) -> str:
        with node.client() as r:
            return str(r.execute_command("CLUSTER MYID").decode())

    def migrate_slot(self, slot: int, target: Node, *, finish: bool = True) -> Node:
        """Move `slot` (its keys too) to `target`: SETSLOT IMPORTING/MIGRATING, MIGRATE of
        every key, then (with `finish`) SETSLOT NODE on both and on every other master.
        Returns the source. Without `finish` the slot stays mid-migration (ASK)."""
        source = self.owner(slot)
        src_id, dst_id = self.node_id(source), self.node_id(target)
        with target.client() as t, source.client() as s:
            t.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
            s.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
            while keys := s.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
                s.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            if finish:
                self.finish_migration(slot, source, target)
        return source

    def finish_migration(self, slot: int, source: Node, target: Node) -> None:
        dst_id = self.node_id(target)
        with target.client() as t:
            t.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        with source.client() as s:
            s.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        for node in self.masters():
            if node not in (source, target):
                with node.client() as r:
                    r.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        self.wait_ok()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
