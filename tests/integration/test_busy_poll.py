"""BUSY_POLL_US: a worker that busy-polls after sending still answers, and goes back to
sleep once traffic stops (it must not spin an idle core)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Server
from tests.integration.wsclient import Client


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_busy_poll_answers_then_sleeps(make_server: Callable[..., Server]) -> None:
    srv = make_server(BUSY_POLL_US="5000", RATE_LIMIT_MESSAGES="0")
    assert srv.proc is not None
    with Client(srv.ws_url, token=srv.token("alice"), client_id="a", channel="room") as a:
        a.recv()
        for seq in range(1, 201):
            a.publish("room", f"m{seq}", sequence=seq)
            ack = a.recv()
            assert ack["action"] == "ack" and ack["data"]["metadata"]["sequence"] == seq
        time.sleep(0.2)  # past the busy-poll window
        before = _cpu_s(srv.proc.pid)
        time.sleep(1.0)
        idle = _cpu_s(srv.proc.pid) - before
    # a spinning worker would use the whole second; an idle one a few ticks at most
    assert idle < 0.3, f"the worker used {idle:.2f} s of CPU in 1 s without traffic"
