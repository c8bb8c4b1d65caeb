"""The README's *Try it*, run as a newcomer runs it: its `sh` blocks, as written, typed into an
interactive bash on a terminal of its own (job control on, so a background job that reads the
terminal is stopped as it would be for a user). Only the ports change (free ones, through
WS_PORT and METRICS_PORT and in the URLs), and the test waits for the server between the first
two blocks as a reader does.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

from tests.conftest import ROOT
from tools.common import free_ports

# markers the shell prints (`$((6*7))` tells its output from the terminal's echo of our input)
READY, DONE = "__ready__", "__done__"


def try_it_blocks() -> list[str]:
    """The `sh` blocks of the README's *Try it* section, in order."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Try it\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S)


def _controlling_tty() -> None:  # in the child, after setsid: the terminal becomes its own
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _session(sid: int) -> list[int]:
    """The processes of session `sid` (the shell's: every job it started)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == sid:
                found.append(int(stat.parent.name))
    return found


def test_readme_try_it_works_as_pasted(tmp_path: Path) -> None:
    port, metrics_port = free_ports(2)
    blocks = [
        b.replace(":8000", f":{port}").replace(":9090", f":{metrics_port}") for b in try_it_blocks()
    ]
    assert len(blocks) == 3, blocks
    # the README's paths are relative to a checkout: run in a directory of our own (its ./data
    # too) that has the checkout's .venv
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    ready = f"until curl -sf -o /dev/null 127.0.0.1:{port}/health; do sleep 0.1; done\n"
    script = (
        blocks[0]
        + "echo SERVER_PID=$!\n"
        + ready
        + blocks[1]
        + blocks[2]
        + f"wait; echo {DONE}$((6*7))\n"
    )
    env = {
        **{k: v for k, v in os.environ.items() if k not in {"JWT_SECRET", "ADMIN_TOKEN"}},
        "WS_HOST": "127.0.0.1",
        "WS_PORT": str(port),
        "METRICS_PORT": str(metrics_port),
        "PS1": "$ ",
        "TERM": "dumb",
        "INPUTRC": "/dev/null",
        "HISTFILE": "/dev/null",
    }
    master, slave = os.openpty()
    shell = subprocess.Popen(
        ["bash", "--norc", "--noprofile", "-i"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        preexec_fn=_controlling_tty,
    )
    os.close(slave)
    out = b""

    def read_until(marker: str, timeout: float) -> None:
        nonlocal out
        deadline = time.monotonic() + timeout
        while f"{marker}42".encode() not in out and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    out += os.read(master, 65536)
                except OSError:  # the shell is gone
                    return

    try:
        os.write(master, f"stty -echo; echo {READY}$((6*7))\n".encode())
        read_until(READY, 15)
        out = b""
        os.write(master, script.encode())
        read_until(DONE, 90)
    finally:
        text = out.decode(errors="replace")
        server = re.search(r"SERVER_PID=(\d+)", text)
        if server:  # whatever happened, the README's server does not outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(server.group(1)), signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.write(master, b"exit\n")
        try:
            shell.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait()
        os.close(master)
        for pid in _session(shell.pid):  # the README's clients, should one be left
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    assert f"{DONE}42" in text, f"the README's commands did not finish:\n{text}"
    assert "Stopped" not in text, text  # a background job stopped on the terminal (SIGTTIN)
    # Bob got Alice's message, Alice got her ack (the websockets CLI prints what it receives
    # after "< ")
    bob = re.findall(r'< (\{"type":"message","action":"send".*?\})\r?\n', text)
    assert len(bob) == 1, text
    assert '"content":"hi"' in bob[0] and '"client_id":"alice-1"' in bob[0], bob
    assert re.search(r'< \{"type":"message","action":"ack".*"sequence":1,"offset":1', text), text
    # the REST and metrics calls answered
    assert '"name":"news"' in text, text
    assert "aether_connections" in text, text
    assert '"level":"error"' not in text, text
    assert '"event":"server_stopped"' in text, text
